"""Switching from diffusers' DreamBooth LoRA scripts: every flag, datasets, trackers, exports, card, hub, buckets.

Library functions are called directly; one ``accelerate launch`` per family group checks the pieces together
(see ``test_launch_*``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_pipelines as tp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT.parent / "shared" / "reference" / "diffusers_dreambooth_flags.tsv"


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    return tp.make_sdxl_pipeline(tmp_path_factory.mktemp("models") / "sdxl")


# --- item 3: plain LoRA files in the output dir -------------------------------------------------------------


def test_output_dir_loads_with_diffusers_and_clip_keys_carry_text_model(sdxl_model, tmp_path):
    """pytorch_lora_weights.safetensors next to the DeLoRA file: diffusers' own load_lora_weights(output_dir)
    reproduces the DeLoRA adapter (UNet and both CLIPs), and the CLIP keys are the ones ComfyUI maps."""
    from safetensors.torch import load_file

    import delora_diffusion  # noqa: F401
    from delora_diffusion import DeLoRAConfig, inject_delora
    from delora_diffusion.io import save_delora_file
    from delora_diffusion.training.exports import KOHYA_NAME, LORA_NAME, write_lora_files

    pipe = tp.load_pipeline(sdxl_model)
    adapted = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for i, model in enumerate(adapted.values()):
        inject_delora(model, DeLoRAConfig(rank=2, lambda_init=4.0), "default")
        tp.perturb_delora(model, seed=i)
    expected = tp.run(pipe, "sdxl")
    path = save_delora_file(
        tmp_path / "delora_weights.safetensors", adapted, pipeline_class="StableDiffusionXLPipeline"
    )
    written = write_lora_files(path, tmp_path, kohya=True)
    assert written == {"diffusers": tmp_path / LORA_NAME, "kohya": tmp_path / KOHYA_NAME}

    keys = list(load_file(tmp_path / LORA_NAME))
    te = [k for k in keys if k.startswith("text_encoder")]
    assert te and all(k.split(".", 1)[1].startswith("text_model.encoder.layers.") for k in te), te[:3]
    assert any(k.startswith("text_encoder_2.text_model.") for k in te)
    kohya = list(load_file(tmp_path / KOHYA_NAME))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in kohya)
    assert any(k.startswith("lora_unet_") for k in kohya)

    fresh = tp.load_pipeline(sdxl_model)
    base = tp.run(fresh, "sdxl")
    fresh.load_lora_weights(str(tmp_path))  # the directory, as a diffusers user would
    got = tp.run(fresh, "sdxl")
    assert np.abs(expected - base).max() > 1e-3
    np.testing.assert_allclose(got, expected, atol=2e-4)
