"""Plain LoRA files in the app, beside DeLoRA adapters: listing, uploads, loading, weights, Rescan, the panel.

Real tiny diffusers pipelines and real LoRA files: our exporter's diffusers and kohya files (exact LoRA forms of
a DeLoRA adapter, so the app can show both side by side) and a PEFT LoRA saved by diffusers' save_lora_weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_pipelines import load_pipeline, make_sd_pipeline, perturb_delora

from delora_diffusion import DeLoRAConfig, inject_delora
from delora_diffusion.app import AppError, AppService, make_request

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

PEFT_LORA = "trained/pytorch_lora_weights.safetensors"
RUN_LORA = "run1/pytorch_lora_weights.safetensors"  # the exact LoRA export of run1, where training puts it
KOHYA = "run1-kohya-half.safetensors"  # run1 as a kohya LoRA at λ scale 0.5
LORA_EXACT = 2  # pixel levels: a LoRA export reproduces its DeLoRA adapter (fp32 rounding only)


def _peft_lora(model: Path, out_dir: Path) -> Path:
    """A LoRA trained-looking with PEFT and saved by diffusers (``pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = load_pipeline(model)
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    pipe.unet.add_adapter(config)
    state = {k: v * 4.0 for k, v in get_peft_model_state_dict(pipe.unet).items()}  # a visible change
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state, safe_serialization=True)
    return out_dir / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD model; an adapters dir with a DeLoRA run, its LoRA exports, a PEFT LoRA, and bad entries."""
    from delora_diffusion.export import export_lora

    root = tmp_path_factory.mktemp("app_lora")
    model = make_sd_pipeline(root / "model")
    adapters = root / "adapters"
    pipe = load_pipeline(model)
    inject_delora(pipe.unet, DeLoRAConfig(rank=2, lambda_init=2.0, target_modules="unet"))
    perturb_delora(pipe.unet, seed=1, std=2.0)
    pipe.save_delora_weights(str(adapters / "run1"), training_args={"rank": 2})
    export_lora(adapters / "run1", adapters / "run1")  # run1/pytorch_lora_weights.safetensors
    export_lora(adapters / "run1", adapters / KOHYA, format="kohya", scale=0.5)
    _peft_lora(model, adapters / "trained")
    save_file({"w": torch.zeros(2)}, str(adapters / "optimizer.safetensors"))  # other weights: skipped
    a = torch.ones(2, 32)
    save_file({"unet.x.to_q.lora_A.weight": a}, str(adapters / "half.safetensors"))  # no lora_B
    save_file({"unet.x.to_q.lora_A.weight": a, "unet.x.to_q.lora_B.weight": torch.ones(32, 2), "extra": a.clone()},
              str(adapters / "mixed.safetensors"))  # fmt: skip
    return {"root": root, "model": model, "adapters": adapters}


@pytest.fixture(scope="module")
def service(tiny: dict[str, Path]) -> AppService:
    return AppService([str(tiny["model"])], adapters_dir=tiny["adapters"], device="cpu")


def _request(model: Path, scale: float, adapters, seed: int = 7):
    args = {"steps": 2, "guidance": 3.0, "width": 32, "height": 32}
    return make_request(str(model), list(adapters), scale, "a photo of sks dog", "", seed, False, **args)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _lora_names(pipe) -> set[str]:
    return {n for names in pipe.get_list_adapters().values() for n in names}


def test_lora_files_are_listed_and_marked_from_their_header_only(tiny, monkeypatch) -> None:
    import safetensors.torch

    from delora_diffusion.app.ui import adapter_choices

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("the listing must read headers only")

    monkeypatch.setattr(safetensors.torch, "load_file", no_tensor_reads)
    monkeypatch.setattr(torch, "load", no_tensor_reads)
    svc = AppService([str(tiny["model"])], adapters_dir=tiny["adapters"])
    assert svc.list_adapters() == ["run1", KOHYA, RUN_LORA, PEFT_LORA]
    assert [svc.adapter_kind(n) for n in svc.list_adapters()] == ["delora", "lora", "lora", "lora"]
    labels = dict((v, k) for k, v in adapter_choices(svc))
    assert labels["run1"] == "run1" and labels[KOHYA] == f"{KOHYA} (LoRA)"
    assert "no up (lora_B) factor" in svc.unreadable["half.safetensors"]
    assert (
        "'extra'" in svc.unreadable["mixed.safetensors"]
        and "not a plain LoRA key" in svc.unreadable["mixed.safetensors"]
    )
    assert "optimizer.safetensors" not in svc.unreadable


def test_a_lora_changes_the_image_and_weight_or_scale_zero_is_the_base(service, tiny) -> None:
    plain = service.generate(_request(tiny["model"], 1.0, []))
    on = service.generate(_request(tiny["model"], 1.0, [(PEFT_LORA, 1.0)]))
    base = _pixels(plain.base)
    assert np.array_equal(_pixels(on.base), base), "the base image has LoRA off"
    assert np.abs(_pixels(on.adapted) - base).max() > 4, "the LoRA changes the image"
    for scale, weight in ((0.0, 1.0), (1.0, 0.0)):
        off = service.generate(_request(tiny["model"], scale, [(PEFT_LORA, weight)]))
        assert np.array_equal(_pixels(off.adapted), base) and np.array_equal(_pixels(off.base), base)
    again = service.generate(_request(tiny["model"], 1.0, [(PEFT_LORA, 1.0)]))
    assert np.array_equal(_pixels(again.adapted), _pixels(on.adapted)), "the base image turned LoRA back on"
    half = service.generate(_request(tiny["model"], 0.5, [(PEFT_LORA, 1.0)]))
    assert not np.array_equal(_pixels(half.adapted), _pixels(on.adapted))  # the scale sets the LoRA weight


def test_lora_exports_reproduce_their_delora_adapter_in_the_app(service, tiny) -> None:
    """The comparison the feature is for: run1 and its exact LoRA forms, side by side in one app."""
    for scale, lora in ((1.0, RUN_LORA), (0.5, KOHYA)):
        delora = service.generate(_request(tiny["model"], scale, [("run1", 1.0)]))
        exported = service.generate(_request(tiny["model"], 1.0, [(lora, 1.0)]))
        assert np.abs(_pixels(delora.adapted) - _pixels(delora.base)).max() > 4
        assert np.abs(_pixels(exported.adapted) - _pixels(delora.adapted)).max() <= LORA_EXACT


def test_delora_and_lora_together(service, tiny) -> None:
    model = tiny["model"]
    alone = {n: service.generate(_request(model, 1.0, [(n, 1.0)])) for n in ("run1", PEFT_LORA)}
    both = service.generate(_request(model, 1.0, [("run1", 1.0), (PEFT_LORA, 0.5)]))
    assert np.array_equal(_pixels(both.base), _pixels(alone["run1"].base)), "the base image has both off"
    for result in alone.values():
        assert np.abs(_pixels(both.adapted) - _pixels(result.adapted)).max() > 2
    for name, result in alone.items():  # each alone again: the other one is switched off exactly
        again = service.generate(_request(model, 1.0, [(name, 1.0)]))
        assert np.array_equal(_pixels(again.adapted), _pixels(result.adapted))
    text = both.adapted.info["parameters"]
    assert "DeLoRA: run1:1 (λ scale 1)" in text and f"LoRA: {PEFT_LORA}:0.5 (scale 1)" in text
    assert "LoRA" not in both.base.info["parameters"]
    info = service.adapter_info(str(model), [("run1", 1.0), (PEFT_LORA, 0.5)], 0.8)
    lora_part = info.split(f"### {PEFT_LORA} (LoRA)")[1]
    assert "λ per layer" in info.split("(LoRA)")[0]  # the DeLoRA section is unchanged
    assert "plain LoRA (diffusers/PEFT keys)" in lora_part and "LoRA weight 0.4" in lora_part
    assert "rank: 2" in lora_part and "target modules: to_k, to_q, to_v" in lora_part
    assert "layers: 24 (unet 24)" in lora_part  # 4 transformer blocks × 2 attentions × to_q, to_k, to_v
    kohya = service.adapter_info(str(model), [(KOHYA, 1.0)], 1.0)
    assert "kohya keys" in kohya and "rank: 4" in kohya and "delora_scale: `0.5`" in kohya


def test_a_lora_sweep_starts_at_the_base_image(service, tiny) -> None:
    base = service.generate(_request(tiny["model"], 1.0, [])).base
    grid, images = service.sweep(_request(tiny["model"], 1.0, [(PEFT_LORA, 1.0)]), [0.0, 1.0])
    assert np.array_equal(_pixels(images[0]), _pixels(base))
    assert not np.array_equal(_pixels(images[1]), _pixels(base))
    assert "LoRA: " in images[1].info["parameters"] and grid.width == 2 * 48


def test_rescan_unloads_loras_whose_files_are_gone_or_changed(tiny, tmp_path: Path) -> None:
    src = tiny["adapters"]
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name, source in (("gone", PEFT_LORA), ("changed", RUN_LORA), ("kept", KOHYA)):
        shutil.copy(src / source, adapters / f"{name}.safetensors")
    svc = AppService([str(tiny["model"])], adapters_dir=adapters)
    model = str(tiny["model"])
    pipe = svc.pipeline(model)
    chosen = [(f"{n}.safetensors", 1.0) for n in ("gone", "changed", "kept")]
    svc.select(model, chosen, 1.0)
    keys = {c: svc._loaded[model][c] for c, _ in chosen}
    assert _lora_names(pipe) == set(keys.values())
    kept = svc.generate(_request(tiny["model"], 1.0, [("kept.safetensors", 1.0)]))
    old = svc.generate(_request(tiny["model"], 1.0, [("changed.safetensors", 1.0)]))
    (adapters / "gone.safetensors").unlink()
    shutil.copy(src / PEFT_LORA, adapters / "changed.safetensors")  # retrained: other content
    os.utime(adapters / "changed.safetensors", ns=(1, 1))
    assert svc.rescan() == ["changed.safetensors", "kept.safetensors"]
    assert _lora_names(pipe) == {keys["kept.safetensors"]}, "gone and changed files are unloaded"
    again = svc.generate(_request(tiny["model"], 1.0, [("kept.safetensors", 1.0)]))
    assert np.array_equal(_pixels(again.adapted), _pixels(kept.adapted))
    changed = svc.generate(_request(tiny["model"], 1.0, [("changed.safetensors", 1.0)]))
    assert not np.array_equal(_pixels(changed.adapted), _pixels(old.adapted)), "the new file is loaded"
    for name in ("changed", "kept"):
        (adapters / f"{name}.safetensors").unlink()
    assert svc.rescan() == [] and _lora_names(pipe) == set()  # the last ones: LoRA unloaded entirely
    assert np.array_equal(_pixels(svc.generate(_request(tiny["model"], 1.0, [])).base), _pixels(kept.base))


def test_bad_uploads_are_refused_and_a_failed_load_leaves_the_pipeline_as_it_was(service, tiny, tmp_path):
    model = str(tiny["model"])
    chosen = [("run1", 1.0), (PEFT_LORA, 1.0)]
    before = service.generate(_request(tiny["model"], 1.0, chosen))
    pipe = service.pipeline(model)
    loras, uploads = _lora_names(pipe), service.list_adapters()
    a, b = torch.ones(2, 32), torch.ones(32, 2)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a safetensors file at all, just text")
    unknown = tmp_path / "loha.safetensors"
    save_file({"unet.x.hada_w1_a": a, "unet.x.to_q.lora_A.weight": a.clone()}, str(unknown))
    shapes = tmp_path / "shapes.safetensors"
    save_file({"unet.x.to_q.lora_A.weight": a, "unet.x.to_q.lora_B.weight": torch.ones(32, 3)}, str(shapes))
    nan = tmp_path / "nan.safetensors"
    save_file({"unet.x.to_q.lora_A.weight": a * float("nan"), "unet.x.to_q.lora_B.weight": b}, str(nan))
    ints = tmp_path / "ints.safetensors"
    save_file({"x.lora_A.weight": a.long(), "x.lora_B.weight": b.long()}, str(ints))
    cases = {
        text: r"not a valid DeLoRA adapter or LoRA file: 'notes.safetensors' is .*not a safetensors file",
        unknown: r"not a valid LoRA file: .*'unet.x.hada_w1_a'.* LoHa, LoKr, DoRA .*delora-diffusion export",
        shapes: r"not a valid LoRA file: .*do not multiply",
        nan: r"not a valid LoRA file: .*NaN",
        ints: r"not a valid LoRA file: .*dtype I64",
    }
    for path, message in cases.items():
        with pytest.raises(AppError, match=message) as err:
            service.add_upload(path)
        assert str(tmp_path) not in str(err.value)
    assert service.list_adapters() == uploads and len(list(service._upload_dir.iterdir())) == 0
    # A valid LoRA file for another model: accepted as a file, but diffusers cannot load it into this one.
    wrong = tmp_path / "other-model.safetensors"
    layer = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {f"{layer}.lora_A.weight": torch.ones(2, 64), f"{layer}.lora_B.weight": torch.ones(32, 2)}, str(wrong)
    )
    name = service.add_upload(wrong)
    assert service.adapter_label(name).endswith("(LoRA)")
    with pytest.raises(AppError, match=f"Could not load adapter '{name}'"):
        service.select(model, [*chosen, (name, 1.0)], 1.0)
    assert _lora_names(pipe) == loras, "the failed load left no adapter behind"
    after = service.generate(_request(tiny["model"], 1.0, chosen))
    assert np.array_equal(_pixels(after.adapted), _pixels(before.adapted))
    assert np.array_equal(_pixels(after.base), _pixels(before.base))


def test_an_uploaded_lora_is_usable(service, tiny, tmp_path) -> None:
    upload = tmp_path / "style.safetensors"
    shutil.copy(tiny["adapters"] / KOHYA, upload)
    name = service.add_upload(upload)
    assert name.startswith("upload:style-") and service.adapter_kind(name) == "lora"
    listed = service.generate(_request(tiny["model"], 1.0, [(KOHYA, 1.0)]))
    uploaded = service.generate(_request(tiny["model"], 1.0, [(name, 1.0)]))
    assert np.array_equal(_pixels(uploaded.adapted), _pixels(listed.adapted))
    assert f"LoRA: {name}:1" in uploaded.adapted.info["parameters"]
