"""Switching from diffusers' DreamBooth LoRA scripts: every flag, datasets, trackers, exports, card, hub, buckets.

Library functions are called directly; one ``accelerate launch`` per family group checks the pieces together
(see ``test_launch_*``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import tiny_pipelines as tp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TSV = Path(__file__).parent / "data" / "diffusers_dreambooth_flags.tsv"
"""Every flag of diffusers' train_dreambooth_lora{,_sdxl,_sd3,_flux}.py (diffusers main, 2026-11)."""


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


# --- item 2: every diffusers flag is accepted or refused with our equivalent --------------------------------


def diffusers_flags() -> list[tuple[str, str]]:
    rows = [
        line.rstrip("\n").split("\t") for line in TSV.read_text().splitlines() if not line.startswith("#")
    ]
    return [(flag, scripts) for flag, scripts in rows]


SAMPLES = {"--lora_blocks": "0,12", "--lora_layers": "attn.to_q,attn.to_k", "--report_to": "tensorboard"}


def sample_argv(flag: str) -> list[str]:
    """The flag with a value its parser takes (a choice, a number, a word), or alone for a switch."""
    from delora_diffusion.training.args import build_parser
    from delora_diffusion.training.compat import str2bool

    if flag in SAMPLES:
        return [flag, SAMPLES[flag]]
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, str(list(action.choices)[-1])]
    if action.type is str2bool:
        return [flag, "false"]
    if action.type in (int, float):
        return [flag, "1"]
    return [flag, "x"]


def test_every_diffusers_flag_is_accepted_or_refused_with_our_equivalent():
    from delora_diffusion.training import TrainingConfigError, parse_args
    from delora_diffusion.training.compat import REFUSED

    flags = diffusers_flags()
    assert len(flags) == 91
    refused = []
    for flag, _ in flags:
        argv = ["--pretrained_model_name_or_path", "someone/model", *sample_argv(flag)]
        try:
            parse_args(argv)
        except TrainingConfigError as err:
            name = flag[2:]
            assert name in REFUSED, (flag, err)
            others = set(re.findall(r"--\w+", str(err))) - {flag}
            assert others, f"{flag} is refused without naming what to use instead: {err}"
            refused.append(flag)
    assert sorted(refused) == sorted(f"--{n}" for n in REFUSED)
    # diffusers' own defaults of the refused LoRA flags change nothing, so copied commands still run.
    parse_args(["--pretrained_model_name_or_path", "m", "--lora_dropout", "0.0"])


def test_lora_layers_and_blocks_become_targets(tmp_path):
    from delora_diffusion import DeLoRAConfig
    from delora_diffusion.targets import find_targets, module_matches
    from delora_diffusion.training import TrainingConfigError, parse_args
    from delora_diffusion.training.loop import denoiser_targets

    pipe = tp.load_pipeline(tp.make_sd3_pipeline(tmp_path / "sd3"))
    base = ["--pretrained_model_name_or_path", "m"]

    def names(argv: list[str]) -> set[str]:
        args = parse_args(base + argv)
        config = DeLoRAConfig(target_modules=denoiser_targets(args.delora_targets))
        return {n for n, _ in find_targets(pipe.transformer, config)}

    layers = names(["--lora_layers", "attn.to_q,attn.to_out.0"])
    assert layers and {n.rsplit(".attn.", 1)[1] for n in layers} == {"to_q", "to_out.0"}
    blocks = names(["--lora_blocks", "0"])
    assert blocks and all(n.startswith("transformer_blocks.0.") for n in blocks)
    assert "transformer_blocks.0.attn.add_k_proj" in blocks
    patterns = denoiser_targets(parse_args([*base, "--lora_blocks", "1"]).delora_targets)
    assert module_matches("transformer_blocks.1.attn.to_q", patterns)
    for other in ("transformer_blocks.10.attn.to_q", "single_transformer_blocks.1.attn.to_q"):
        assert not module_matches(other, patterns)
    both = names(["--lora_layers", "attn.to_k", "--lora_blocks", "0"])
    assert both == {"transformer_blocks.0.attn.to_k"}
    with pytest.raises(TrainingConfigError, match="both choose"):
        parse_args([*base, "--lora_layers", "to_q", "--delora_targets", "unet"])
    with pytest.raises(TrainingConfigError, match="--train_text_encoder"):
        parse_args([*base, "--pre_compute_text_embeddings", "--train_text_encoder"])
    args = parse_args([*base, "--prodigy_decouple", "False", "--prodigy_safeguard_warmup", "no"])
    assert (args.prodigy_decouple, args.prodigy_use_bias_correction, args.prodigy_safeguard_warmup) == (
        False,
        True,
        False,
    )


def test_xformers_missing_is_a_clear_error():
    from delora_diffusion.training import TrainingConfigError, parse_args
    from delora_diffusion.training.compat import enable_attention_backends
    from delora_diffusion.training.util import is_installed

    if is_installed("xformers"):
        pytest.skip("xformers is installed here")
    args = parse_args(
        ["--pretrained_model_name_or_path", "m", "--enable_xformers_memory_efficient_attention"]
    )
    with pytest.raises(TrainingConfigError, match="pip install xformers"):
        enable_attention_backends(torch.nn.Linear(1, 1), args)


# --- item 2 and 5: datasets, caption sources, trigger word, caption dropout --------------------------------


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate(sizes):
        names.append(f"{i}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / names[-1])
    return names


def test_imagefolder_through_datasets_and_caption_warnings(tmp_path, caplog):
    from delora_diffusion.training import parse_args
    from delora_diffusion.training.sources import read_instances

    folder = tmp_path / "dogs"
    names = write_images(folder, [(48, 32), (32, 48), (40, 40)])
    lines = [json.dumps({"file_name": n, "text": f"a dog number {i}"}) for i, n in enumerate(names)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "0.txt").write_text("a sidecar caption")
    common = [
        "--pretrained_model_name_or_path",
        "m",
        "--instance_prompt",
        "a photo of sks dog",
        "--resolution",
        "32",
    ]
    common += ["--cache_dir", str(tmp_path / "cache")]

    args = parse_args([*common, "--dataset_name", str(folder), "--caption_column", "text"])
    with caplog.at_level("WARNING"):
        examples = read_instances(args)
    assert [e.prompt for e in examples] == [f"sks dog, a dog number {i}" for i in range(3)]
    assert [e.original_size for e in examples] == [(32, 48), (48, 32), (40, 40)]
    assert [min(e.image.size) for e in examples] == [32, 32, 32]
    assert "0.txt" not in caplog.text and "1 .txt caption file(s)" in caplog.text

    caplog.clear()
    args = parse_args([*common, "--dataset_name", str(folder), "--class_prompt", "a photo of dog"])
    with caplog.at_level("WARNING"):
        examples = read_instances(args)
    assert {e.prompt for e in examples} == {"a photo of sks dog"}  # the trigger 'sks' is in it already
    assert "column(s) ['text'] are ignored" in caplog.text and "--caption_column text" in caplog.text

    caplog.clear()
    args = parse_args([*common, "--instance_data_dir", str(folder), "--trigger_word", ""])
    with caplog.at_level("WARNING"):
        examples = read_instances(args)
    assert "metadata.jsonl" in caplog.text and f"--dataset_name {folder}" in caplog.text
    assert sorted(e.prompt for e in examples) == ["a photo of sks dog"] * 2 + ["a sidecar caption"]

    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{n},cap {n}\n" for n in names))
    args = parse_args(
        [*common, "--dataset_name", str(folder), "--caption_column", "caption", "--trigger_word", "zz"]
    )
    assert sorted(e.prompt for e in read_instances(args)) == [f"zz, cap {n}" for n in names]


def test_hub_dataset_id_from_the_cache(tmp_path, monkeypatch):
    """--dataset_name org/name offline: the copy in --cache_dir (laid out as datasets caches a hub download)."""
    import datasets
    from huggingface_hub import constants

    from delora_diffusion.training import parse_args
    from delora_diffusion.training.sources import read_instances

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "dogs"
    names = write_images(folder, [(40, 32), (32, 32)])
    lines = [json.dumps({"file_name": n, "caption": f"sks dog {i}"}) for i, n in enumerate(names)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    datasets.load_dataset(str(folder), cache_dir=str(cache))
    (cache / "dogs").rename(cache / "someone___dogs")
    assert list(cache.glob("someone___dogs/*/*/*/dogs-train.arrow"))  # named after the dataset, as a download
    argv = [
        "--pretrained_model_name_or_path",
        "m",
        "--instance_prompt",
        "a photo of sks dog",
        "--resolution",
        "32",
    ]
    argv += ["--dataset_name", "someone/dogs", "--cache_dir", str(cache), "--caption_column", "caption"]
    assert [e.prompt for e in read_instances(parse_args(argv))] == ["sks dog 0", "sks dog 1"]


def test_image_interpolation_mode_reaches_folder_and_dataset_images(tmp_path):
    from delora_diffusion.training import parse_args
    from delora_diffusion.training.sources import read_instances

    folder = tmp_path / "imgs"
    write_images(folder, [(64, 48)])
    base = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "sks", "--resolution", "24"]
    pixels = {}
    for mode in ("nearest", "lanczos", None):
        argv = [*base, "--instance_data_dir", str(folder)] + (
            ["--image_interpolation_mode", mode] if mode else []
        )
        (example,) = read_instances(parse_args(argv))
        pixels[mode] = np.asarray(example.image)
    expected = Image.open(folder / "0.png").convert("RGB").resize((32, 24), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(pixels["nearest"], np.asarray(expected))
    assert not np.array_equal(pixels["nearest"], pixels["lanczos"])
    assert not np.array_equal(pixels[None], pixels["lanczos"])  # the default stays bicubic


def test_trigger_word_and_caption_dropout():
    from delora_diffusion.training import data
    from delora_diffusion.training.sources import caption_dropout, derive_trigger, has_trigger

    assert derive_trigger("a photo of sks dog", "a photo of dog") == "sks"
    assert derive_trigger("a photo of sks dog") == "sks dog"
    assert has_trigger("A SKS dog, grass", "sks") and not has_trigger("a sksdog", "sks")
    items = [
        {
            "instance": {
                "pixel_values": torch.zeros(3, 2, 2),
                "prompt": f"p{i}",
                "original_size": (2, 2),
                "crop_top_left": (0, 0),
            },
            "class": {
                "pixel_values": torch.zeros(3, 2, 2),
                "prompt": "c",
                "original_size": (2, 2),
                "crop_top_left": (0, 0),
            },
        }
        for i in range(400)
    ]
    batch = caption_dropout(data.collate, 0.25, seed=0)(items)
    dropped = sum(p == "" for p in batch["prompts"][:400])
    assert 60 < dropped < 140 and batch["prompts"][400:] == ["c"] * 400  # class captions are kept
    assert caption_dropout(data.collate, 0.0) is data.collate


# --- item 5: buckets, SDXL size conditioning, latent caching and augmentation -------------------------------


def examples_of(sizes: list[tuple[int, int]], resolution: int) -> list:
    from delora_diffusion.training import data
    from delora_diffusion.training.sources import resize_short_side

    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate(sizes):
        image = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
        small = resize_short_side(image, resolution, Image.Resampling.BICUBIC)
        out.append(data.Example(small, f"p{i}", (h, w), Path(f"{i}.png")))
    return out


def test_buckets_batches_and_sdxl_time_ids(caplog):
    from delora_diffusion.training import TrainingConfigError, parse_args
    from delora_diffusion.training.buckets import (
        check_bucket_args,
        make_buckets,
        make_dataset,
        nearest_bucket,
    )
    from delora_diffusion.training.families.sdxl import StableDiffusionXL

    buckets = make_buckets(1024, 256, 2048, 64)
    assert (1024, 1024) in buckets and all(
        w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 for w, h in buckets
    )
    assert nearest_bucket((1920, 1080), buckets) == (1344, 768)  # kohya's 16:9 bucket at 1024
    assert nearest_bucket((1080, 1920), buckets) == (768, 1344)

    sizes = [(96, 48), (100, 50), (48, 96), (64, 64), (64, 64), (50, 100)]
    argv = [
        "--pretrained_model_name_or_path",
        "m",
        "--instance_prompt",
        "a photo of sks dog",
        "--resolution",
        "32",
    ]
    argv += [
        "--enable_bucket",
        "--min_bucket_reso",
        "16",
        "--bucket_reso_steps",
        "16",
        "--train_batch_size",
        "2",
    ]
    args = parse_args(argv)
    assert args.cache_latents is False
    dataset, kwargs = make_dataset(examples_of(sizes, 32), None, args, pixel_multiple=8)
    loader = torch.utils.data.DataLoader(dataset, **kwargs)
    seen = []
    for batch in loader:
        shapes = {tuple(t.shape[-2:]) for t in batch["pixel_values"]}
        assert len(shapes) == 1, "a batch mixes buckets"
        (h, w) = shapes.pop()
        assert batch["target_sizes"] == [(h, w)] * len(batch["prompts"])
        seen.append((w, h))
    assert sorted(seen) == [(16, 48), (32, 32), (48, 16)]  # two images per bucket, batch 2

    class Recorder(torch.nn.Module):
        def forward(self, x, t, states, added_cond_kwargs, return_dict):
            self.time_ids = added_cond_kwargs["time_ids"]
            return (x,)

    from delora_diffusion.training.families.base import Noised

    batch = next(b for b in loader if b["target_sizes"][0] == (16, 48))
    recorder = Recorder()
    cond = {
        "prompt_embeds": torch.zeros(len(batch["prompts"]), 4, 8),
        "pooled_prompt_embeds": torch.zeros(2, 8),
    }
    family = StableDiffusionXL.__new__(StableDiffusionXL)
    family.predict(recorder, Noised(torch.zeros(2, 4, 2, 6), torch.zeros(2), None), cond, batch, args)
    for row, original, crop in zip(
        recorder.time_ids.tolist(), batch["original_sizes"], batch["crops_top_left"]
    ):
        assert row == [*original, *crop, 16, 48]  # original (h, w), crop (top, left), bucket (h, w)
        assert original[0] < original[1] and 0 <= crop[0] <= 48 - 16 and crop[1] >= 0

    with pytest.raises(TrainingConfigError, match="multiple of 16"):
        check_bucket_args(parse_args([*argv, "--bucket_reso_steps", "24"]), 16)  # Flux: VAE 8 x packing 2
    with pytest.raises(TrainingConfigError, match="max_bucket_reso"):
        check_bucket_args(parse_args([*argv, "--max_bucket_reso", "16"]), 8)

    caplog.clear()
    args = parse_args([*argv, "--cache_latents", "--random_flip"])
    with caplog.at_level("WARNING"):
        dataset, _ = make_dataset(examples_of(sizes, 32), None, args)
    assert "--random_flip and random crop are off" in caplog.text and "--no_cache_latents" in caplog.text
    dataset.cache_latents(lambda px: px[:, :1])
    assert {tuple(v.shape) for v, _ in dataset.latent_cache.values()} == {
        (1, 16, 48),
        (1, 32, 32),
        (1, 48, 16),
    }
    assert "latent_params" in dataset[0]["instance"] and "pixel_values" not in dataset[0]["instance"]


def test_cache_latents_is_a_switch_on_the_bundled_model():
    from delora_diffusion.training import parse_args

    assert parse_args([]).cache_latents is True
    assert parse_args(["--no_cache_latents"]).cache_latents is False
    assert parse_args(["--random_flip"]).cache_latents is False  # augmentation asked for beats a default
    assert (
        parse_args(["--random_flip", "--cache_latents"]).cache_latents is True
    )  # both asked: the warning says
    assert parse_args(["--pretrained_model_name_or_path", "m"]).cache_latents is False


# --- item 1: images reach every tracker -------------------------------------------------------------------


def read_events(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return {"images": acc.Tags()["images"], "acc": acc}


def test_validation_images_to_tensorboard_events(tmp_path):
    from accelerate.tracking import TensorBoardTracker

    from delora_diffusion.training.trackers import log_images

    tracker = TensorBoardTracker("run", str(tmp_path))
    tracker.start()  # as accelerate's init_trackers does
    images = [Image.new("RGB", (24, 16), (255, 0, 0)), Image.new("RGB", (24, 16), (0, 0, 255))]
    assert log_images([tracker], "validation", images, 3) == ["tensorboard"]

    class Broken:
        name = "broken"

        def log_images(self, *a, **k):
            raise RuntimeError("nope")

    assert log_images([Broken()], "validation", images, 3) == []  # a warning, not a crash
    tracker.finish()
    events = read_events(tmp_path / "run")
    assert sorted(events["images"]) == ["validation/0", "validation/1"]
    event = events["acc"].Images("validation/0")[0]
    assert (event.step, event.width, event.height) == (3, 24, 16)
    decoded = np.asarray(Image.open(__import__("io").BytesIO(event.encoded_image_string)))
    assert decoded.shape == (16, 24, 3) and tuple(decoded[0, 0]) == (255, 0, 0)


def test_validation_images_to_wandb_offline(tmp_path, monkeypatch):
    """wandb, when installed, gets the images too (offline mode: written under its run dir, no login)."""
    pytest.importorskip("wandb")
    from accelerate.tracking import WandBTracker

    from delora_diffusion.training.trackers import log_images

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    tracker = WandBTracker("dreambooth-delora", dir=str(tmp_path))
    tracker.start()
    images = [Image.new("RGB", (24, 16), (255, 0, 0))]
    assert log_images([tracker], "validation", images, 1, ["a prompt"]) == ["wandb"]
    tracker.finish()
    assert list(tmp_path.rglob("media/images/validation_*.png"))


# --- item 4: the model card -------------------------------------------------------------------------------


def card_args(tmp_path: Path, model: str, *extra: str) -> argparse.Namespace:
    from delora_diffusion.training import parse_args

    prompt = 'a "sks" dog\'s photo: #1 [test]'
    argv = [
        "--pretrained_model_name_or_path",
        model,
        "--instance_prompt",
        prompt,
        "--validation_prompt",
        prompt,
    ]
    args = parse_args([*argv, "--output_dir", str(tmp_path / "out"), "--resolution", "32", *extra])
    return args


def test_model_card_is_hub_ready(tmp_path):
    import yaml
    from huggingface_hub import ModelCard

    from delora_diffusion.training.model_card import write_model_card

    args = card_args(tmp_path, "someone/tiny-sdxl", "--output_kohya_format")
    out = Path(args.output_dir)
    grids = {
        "final": out / "validation/final.png",
        "final_0": out / "image_0.png",
        "final_1": out / "image_1.png",
    }
    grids["lambda_sweep"] = out / "validation/lambda_sweep.png"
    path = write_model_card(args, "StableDiffusionXLPipeline", "/abs/resolved/path", out, grids, 10)
    text = path.read_text()
    header = yaml.safe_load(text.split("---")[1])
    card = ModelCard.load(path)
    for data in (header, card.data.to_dict()):
        assert data["base_model"] == "someone/tiny-sdxl"
        assert data["instance_prompt"] == args.instance_prompt  # quotes survive the YAML round trip
        assert data["license"] == "openrail++"
        assert {"lora", "template:sd-lora", "delora", "diffusers", "stable-diffusion-xl"} <= set(data["tags"])
        assert data["widget"] == [
            {"text": args.validation_prompt, "output": {"url": f"image_{i}.png"}} for i in range(2)
        ]
    assert "/abs/resolved/path" not in text
    assert "pipe.load_delora_weights(" in text and "pipe.load_lora_weights(" in text
    assert "pytorch_lora_weights_kohya.safetensors" in text and "lambda_sweep.png" in text

    local = tmp_path / "my-model"
    local.mkdir()
    args = card_args(tmp_path, str(local), "--license", "mit")
    data = yaml.safe_load(
        write_model_card(args, "StableDiffusionPipeline", None, out, {}, 1).read_text().split("---")[1]
    )
    assert "base_model" not in data and data["license"] == "mit"  # a local path is not a Hub id
    assert (
        str(tmp_path) not in (out / "README.md").read_text()
        and "`my-model (a local model)`" in (out / "README.md").read_text()
    )


# --- item 2: --push_to_hub against a local endpoint -------------------------------------------------------


class FakeHub:
    """A tiny HTTP server speaking the part of the Hub API that create_repo + upload_folder use; it records
    every request and the files committed (the real Hub was not tried: none is reachable here)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, dict]] = []
        self.files: dict[str, bytes] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path, dict(self.headers)))
                self.reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                self.reply(*hub.answer(self.path, body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: bytes) -> tuple[int, dict]:
        import base64

        import yaml

        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": str(err)}]}
            return 200, {"errors": [], "warnings": []}
        if path == "/api/repos/create":
            payload = json.loads(body)
            return 200, {"url": f"{self.url}/{payload.get('organization') or 'someone'}/{payload['name']}"}
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return 200, {
                "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            }
        if "/commit/" in path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40}
        return 404, {"error": "unknown"}

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield hub
    hub.close()


def test_push_to_hub_sends_the_output_dir(tmp_path, fake_hub):
    from delora_diffusion.training import TrainingConfigError, parse_args
    from delora_diffusion.training.hub import check_hub_args, push_to_hub

    out = tmp_path / "my-dog-adapter"
    for name in ("README.md", "pytorch_lora_weights.safetensors", "checkpoint-5/state.bin", "logs/run/ev"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"---\nlicense: mit\n---\nhi" if name == "README.md" else b"\x00\x01")
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(out), "--push_to_hub"]
    args = parse_args([*base, "--hub_token", "hf_test"])
    assert push_to_hub(args) == "someone/my-dog-adapter"
    assert sorted(fake_hub.files) == ["README.md", "pytorch_lora_weights.safetensors"]
    posts = [p for m, p, _ in fake_hub.requests if m == "POST"]  # huggingface_hub also GETs a registry
    assert posts[0] == "/api/repos/create" and posts[-1] == "/api/models/someone/my-dog-adapter/commit/main"
    assert all(h.get("authorization") == "Bearer hf_test" for m, _, h in fake_hub.requests if m == "POST")

    args = parse_args([*base, "--hub_model_id", "org/custom"])
    seen = []
    assert push_to_hub(args, before_upload=seen.append) == "org/custom" and seen == ["org/custom"]
    args = parse_args([*base, "--hub_token", "hf_test", "--report_to", "wandb"])
    with pytest.raises(TrainingConfigError, match="hf auth login"):
        check_hub_args(args)


# --- real runs: the pieces together through accelerate launch ---------------------------------------------

SCRIPT = ROOT / "train_scripts" / "dreambooth_delora.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCH += ["--num_cpu_threads_per_process", "2"]


def launch(args: list[str], extra_env: dict[str, str] | None = None) -> str:
    import os
    import subprocess

    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", HF_HUB_DISABLE_TELEMETRY="1"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra_env or {"HF_HUB_OFFLINE": "1"})
    proc = subprocess.run([*LAUNCH, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc.stderr


def run_flags(model: Path, out: Path, resolution: int) -> list[str]:
    flags = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out)]
    flags += ["--instance_prompt", "a photo of sks dog", "--resolution", str(resolution), "--rank", "2"]
    flags += [
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--seed",
        "0",
        "--max_sequence_length",
        "16",
    ]
    return flags + ["--enable_bucket", "--min_bucket_reso", "16", "--bucket_reso_steps", "16"]


def test_launch_sdxl_dataset_buckets_tensorboard_exports_card_hub(sdxl_model, tmp_path):
    """One SDXL run with what a diffusers user brings: an imagefolder dataset with captions, tensorboard
    (the default tracker) and a validation prompt, kohya output and a push to a (local) hub; plus buckets."""
    import yaml
    from huggingface_hub import ModelCard

    import delora_diffusion  # noqa: F401

    folder = tmp_path / "dogs"
    names = write_images(folder, [(48, 24), (24, 48), (32, 32), (50, 25)])
    lines = [json.dumps({"file_name": n, "text": f"a dog number {i}"}) for i, n in enumerate(names)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "sdxl-out"
    prompt = 'a "sks" dog\'s photo'
    flags = run_flags(sdxl_model, out, 32) + ["--dataset_name", str(folder), "--caption_column", "text"]
    flags += ["--cache_dir", str(tmp_path / "cache"), "--image_interpolation_mode", "lanczos"]
    flags += ["--max_train_steps", "3", "--train_text_encoder", "--caption_dropout_rate", "0.3"]
    flags += [
        "--validation_prompt",
        prompt,
        "--num_validation_images",
        "2",
        "--validation_inference_steps",
        "2",
    ]
    flags += ["--output_kohya_format", "--push_to_hub", "--hub_token", "hf_test", "--lora_dropout", "0.0"]
    hub = FakeHub()
    try:
        stderr = launch(flags, {"HF_ENDPOINT": hub.url, "HF_DATASETS_OFFLINE": "1"})
    finally:
        hub.close()
    assert "Aspect-ratio buckets (w x h) in use: 16x48, 32x32, 48x16" in stderr
    assert "Prepended the trigger word 'sks dog' to 4 caption(s)" in stderr

    events = read_events(out / "logs" / "dreambooth-delora")
    assert {"validation/0", "validation/1", "lambda_sweep/0"} <= set(events["images"])
    assert [e.step for e in events["acc"].Scalars("loss")] == [1, 2, 3]
    sweep = events["acc"].Images("lambda_sweep/0")[0]
    assert (sweep.width, sweep.height) == (2 * 32, 4 * 32)  # 2 images per row, 4 lambda scales

    files = {p.name for p in out.iterdir()}
    expected = {"delora_weights.safetensors", "pytorch_lora_weights.safetensors", "README.md", "image_0.png"}
    assert expected | {"pytorch_lora_weights_kohya.safetensors", "training_args.json"} <= files
    card = ModelCard.load(out / "README.md")
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert header["widget"][0]["text"] == prompt == card.data.widget[0]["text"]
    assert "someone/sdxl-out" in card.text  # the pushed repo id in the usage
    assert {
        "README.md",
        "pytorch_lora_weights.safetensors",
        "delora_weights.safetensors",
        "image_1.png",
    } <= set(hub.files)
    assert not any(name.startswith(("checkpoint-", "logs/")) for name in hub.files)
    assert all(b"hf_test" not in content for content in hub.files.values())  # the token is in no file

    delora = tp.load_pipeline(sdxl_model)
    base = tp.run(delora, "sdxl")
    delora.load_delora_weights(str(out))
    expected_images = tp.run(delora, "sdxl")
    lora = tp.load_pipeline(sdxl_model)
    lora.load_lora_weights(str(out))  # diffusers' own loader on the output dir, UNet and both CLIPs
    assert np.abs(expected_images - base).max() > 1e-4
    np.testing.assert_allclose(tp.run(lora, "sdxl"), expected_images, atol=2e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_launch_flow_models_with_buckets_and_lora_layers(family, tmp_path):
    """SD3 and Flux train on buckets (cached latents with SD3), with diffusers' --lora_layers / --lora_blocks."""
    from safetensors.torch import load_file

    model = tp.MAKERS[family](tmp_path / family)
    folder = tmp_path / "images"
    write_images(folder, [(64, 32), (32, 64), (40, 40), (66, 30)])
    out = tmp_path / "out"
    res = 32
    flags = run_flags(model, out, res) + ["--instance_data_dir", str(folder), "--max_train_steps", "2"]
    flags += ["--report_to", "none", "--class_prompt", "a photo of dog"]
    if family == "sd3":
        flags += [
            "--lora_layers",
            "attn.to_q,attn.to_v",
            "--lora_blocks",
            "0",
            "--cache_latents",
            "--random_flip",
        ]
    else:
        flags += ["--lora_layers", "attn.to_k", "--bucket_reso_steps", "32", "--min_bucket_reso", "32"]
    stderr = launch(flags)
    assert "Aspect-ratio buckets" in stderr
    if family == "sd3":
        assert "--random_flip and random crop are off" in stderr
    layers = {k.split(".delora_")[0] for k in load_file(out / "delora_weights.safetensors")}
    suffixes = {name.rsplit(".", 1)[-1] for name in layers}
    assert suffixes == ({"to_q", "to_v"} if family == "sd3" else {"to_k"}), layers
    if family == "sd3":
        assert all(".transformer_blocks.0." in f".{name}" for name in layers), layers
    assert (out / "pytorch_lora_weights.safetensors").is_file()


# --- model flags: separate VAE, tokenizer options, SD3 preconditioning ------------------------------------


def test_separate_vae_tokenizer_flags_and_sd3_preconditioning(tmp_path):
    import shutil

    from delora_diffusion.training import parse_args
    from delora_diffusion.training.families import inspect_model, load_component

    model = tp.make_sd_pipeline(tmp_path / "sd")
    vae_dir = tmp_path / "my-vae"
    shutil.copytree(model / "vae", vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    (vae_dir / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.123}))
    argv = [
        "--pretrained_model_name_or_path",
        str(model),
        "--pretrained_vae_model_name_or_path",
        str(vae_dir),
    ]
    argv += ["--tokenizer_name", str(model / "tokenizer"), "--tokenizer_max_length", "8"]
    args = parse_args(argv)
    info, family = inspect_model(args)
    vae = load_component(info, "vae", args)
    assert vae.config.scaling_factor == 0.123  # the separate VAE, read from its root
    components = {n: load_component(info, n, args) for n in ("tokenizer", "text_encoder")}
    family.bind(components, torch.device("cpu"))
    encoders = {"text_encoder": components["text_encoder"]}
    with torch.no_grad():
        plain = family.encode_prompts(components, encoders, ["a dog"], args)["prompt_embeds"]
        args.text_encoder_use_attention_mask = True
        masked = family.encode_prompts(components, encoders, ["a dog"], args)["prompt_embeds"]
    assert plain.shape[1] == 8 and masked.shape == plain.shape
    assert not torch.equal(plain, masked)  # the mask reaches the encoder

    from delora_diffusion.training.families.base import Noised
    from delora_diffusion.training.families.sd3 import StableDiffusion3

    sd3 = StableDiffusion3.__new__(StableDiffusion3)
    latents, noise, sigma = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([0.2, 0.7])
    s = sigma.reshape(-1, 1, 1, 1)
    noised = Noised((1 - s) * latents + s * noise, sigma * 1000, latents, extra={"sigmas": s})
    velocity = torch.randn(2, 4, 2, 2)

    def denoiser(**kwargs):
        return (velocity,)

    cond = {"prompt_embeds": None, "pooled_prompt_embeds": None}
    pred = sd3.predict(denoiser, noised, cond, {}, argparse.Namespace(precondition_outputs=1))
    # x_t - sigma * v: the error is sigma * (flow target - v), diffusers' preconditioned SD3 loss
    torch.testing.assert_close(pred - latents, s * ((noise - latents) - velocity))
