"""The adapter file format: metadata, atomic writes, and every bad file giving a clear error while the pipeline
it was loaded into stays exactly as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import tiny_pipelines as tp
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import delora_diffusion as dd
from delora_diffusion import io, pipeline
from delora_diffusion.io import planner

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def rewrite(
    src: Path,
    dst: Path,
    tensors: Callable[[dict], dict] | None = None,
    metadata: Callable[[dict], dict] | None = None,
    fix_checksum: bool = True,
) -> Path:
    """Copy an adapter file with edits (a hand-made bad file); the checksum is redone unless told not to."""
    state = load_file(str(src))
    with safe_open(str(src), "pt") as handle:
        meta = dict(handle.metadata())
    state = tensors(state) if tensors else state
    meta = metadata(meta) if metadata else meta
    if fix_checksum:
        meta["delora_checksum"] = io.tensor_checksum(state)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst), metadata=meta)
    return dst


def snapshot(pipe) -> dict:
    state = {}
    for name, module in pipeline.delora_components(pipe).items():
        state[name] = (
            {k: v.clone() for k, v in module.state_dict().items()},
            [
                (n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
                for n, m in module.named_modules()
            ],
            [p.requires_grad for p in module.parameters()],
        )
    return state


def assert_unchanged(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for name in before:
        (sd_b, mods_b, grads_b), (sd_a, mods_a, grads_a) = before[name], after[name]
        assert mods_a == mods_b, f"{name}: modules or hooks changed"
        assert grads_a == grads_b
        assert sd_a.keys() == sd_b.keys()
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_b), f"{name}: weights changed"
    assert pipe.get_list_delora_adapters() == {}
    assert pipeline._metadata_store(pipe) == {}


def _drop(key: str) -> Callable[[dict], dict]:
    return lambda s: {k: v for k, v in s.items() if k != key}


def _grow_layer(s: dict) -> dict:
    s = dict(s)
    for name in ("delora_A", "delora_A0"):
        s[f"unet.{LAYER}.{name}"] = torch.cat([s[f"unet.{LAYER}.{name}"], torch.ones(2, 1)], dim=1)
    s[f"unet.{LAYER}.delora_w_norm"] = torch.cat([s[f"unet.{LAYER}.delora_w_norm"], torch.ones(1)])
    return s


def _nan_lambda(s: dict) -> dict:
    return {**s, f"unet.{LAYER}.delora_lambda": torch.tensor([float("nan")])}


def _unknown_tensor(s: dict) -> dict:
    return {**s, f"unet.{LAYER}.delora_C": torch.ones(3)}


def _unknown_layer(s: dict) -> dict:
    extra = {k.replace(LAYER, LAYER.replace("attn1", "attn9")): v.clone() for k, v in s.items() if LAYER in k}
    return {**s, **extra}


def _no_layer_list(m: dict) -> dict:
    """A file written before the exact layer list was recorded: its tensors alone say which layers it adapts."""
    return {k: v for k, v in m.items() if k != "delora_layers"}


def _as_component(old: str, new: str) -> tuple[Callable, Callable]:
    def tensors(s: dict) -> dict:
        return {
            (new + k[len(old) :] if k.startswith(old + ".") else k): v
            for k, v in s.items()
            if not k.startswith(new + ".")
        }

    def meta(m: dict) -> dict:
        for key in (
            "delora_configs",
            "delora_component_classes",
            "delora_w_norm_fingerprint",
            "delora_layers",
        ):
            value = json.loads(m[key])
            value[new] = value.pop(old)
            m[key] = json.dumps(value)
        m["delora_components"] = json.dumps([new])
        return m

    return tensors, meta


_te_as_unet = _as_component("text_encoder", "unet")

BAD_FILES = {
    # case: (tensor edit, metadata edit, fix checksum, expected message)
    "other_component": (*_te_as_unet, True, r"made for another architecture: its 'unet' adapter is for a CLIPTextModel"),
    "missing_component": (
        None,
        lambda m: {**m, "delora_components": '["unet", "text_encoder", "transformer"]',
                   "delora_configs": json.dumps({**json.loads(m["delora_configs"]), "transformer": {}})},
        True,
        r"unknown key|no tensors for component 'transformer'",
    ),  # fmt: skip
    "shape": (_grow_layer, None, True, rf"Shape mismatch .* unet\.{LAYER}: delora_A should be \(2, 32\) .* has \(2, 33\)"),
    "missing_key": (_drop(f"unet.{LAYER}.delora_B"), None, True, rf"missing keys \['unet\.{LAYER}\.delora_B'\]"),
    "missing_layer": (
        lambda s: {k: v for k, v in s.items() if f"{LAYER}." not in k},
        None,
        True,
        rf"missing keys: it records 1 layer\(s\) of unet that have no tensors .*{LAYER}",
    ),
    "unknown_key": (_unknown_tensor, None, True, rf"unknown keys \['unet\.{LAYER}\.delora_C'\]"),
    "unknown_layer": (_unknown_layer, _no_layer_list, True, r"layers that unet \(UNet2DConditionModel\) does not have: .*attn9"),
    "unrecorded_layer": (_unknown_layer, None, True, r"unknown keys for layers .*attn9.* its layer list does not record"),
    "non_finite": (_nan_lambda, None, True, rf"unet\.{LAYER}\.delora_lambda has non-finite values"),
    "version": (None, lambda m: {**m, "delora_format_version": "99"}, True, r"format version 99.*Upgrade delora-diffusion"),
    "bitflip": (lambda s: {**s, f"unet.{LAYER}.delora_A": s[f"unet.{LAYER}.delora_A"] + 1e-3}, None, False, r"corrupted: its tensors do not match the checksum"),
    "no_metadata": (None, lambda m: {"format": "pt"}, False, r"not a delora-diffusion adapter file"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_clear_error_and_leaves_pipeline_unchanged(case, sd_pipe, good_file, tmp_path):
    edit_tensors, edit_meta, fix, message = BAD_FILES[case]
    bad = rewrite(good_file, tmp_path / "bad" / io.WEIGHT_NAME, edit_tensors, edit_meta, fix)
    before = snapshot(sd_pipe)
    with pytest.raises(io.DeLoRAFileError, match=message):
        sd_pipe.load_delora_weights(bad.parent)
    assert_unchanged(sd_pipe, before)


def test_truncated_and_garbage_files(sd_pipe, good_file, tmp_path):
    data = good_file.read_bytes()
    cases = {
        "truncated_data.safetensors": (data[: len(data) - 100], r"is truncated: it should hold \d+ bytes"),
        "truncated_header.safetensors": (data[:50], r"truncated or not a safetensors file"),
        "tiny.safetensors": (data[:3], r"truncated .* too short"),
        "garbage.safetensors": (data[:8] + b"\xff" * (len(data) - 8), r"corrupted or not a safetensors file"),
    }
    before = snapshot(sd_pipe)
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(io.DeLoRAFileError, match=message):
            sd_pipe.load_delora_weights(path)
        assert_unchanged(sd_pipe, before)


def test_bad_paths_and_foreign_files(sd_pipe, tmp_path):
    before = snapshot(sd_pipe)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd_pipe.load_delora_weights(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="holds no DeLoRA adapter"):
        sd_pipe.load_delora_weights(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04")
    with pytest.raises(
        io.DeLoRAFileError, match="pickle-based file; delora-diffusion reads safetensors only"
    ):
        sd_pipe.load_delora_weights(tmp_path / "weights.bin")
    save_file(
        {"unet.a.lora_A.weight": torch.ones(2, 4), "unet.a.lora_B.weight": torch.ones(4, 2)},
        tmp_path / "l.safetensors",
    )
    with pytest.raises(io.DeLoRAFileError, match="is a LoRA file.*load_lora_weights"):
        sd_pipe.load_delora_weights(tmp_path / "l.safetensors")
    with pytest.raises(FileNotFoundError, match="pass weight_name"):
        sd_pipe.load_delora_weights(tmp_path)
    with pytest.raises(TypeError, match=r"Unknown arguments \['revison'\]"):
        sd_pipe.load_delora_weights("someone/repo", revison="main")
    assert_unchanged(sd_pipe, before)


def test_adapter_for_another_architecture(trained, pipeline_dir):
    """An SDXL adapter into an SD pipeline: SD has no text_encoder_2 (and other layer sizes)."""
    pipe = tp.load_pipeline(pipeline_dir("sd"))
    before = snapshot(pipe)
    with pytest.raises(
        io.DeLoRAFileError, match=r"adapter for 'text_encoder_2'.*no such component.*another architecture"
    ):
        pipe.load_delora_weights(trained("sdxl").adapter_dir)
    assert_unchanged(pipe, before)
    sdxl_unet = {k: v for k, v in _state(trained("sdxl")).items() if k.startswith("unet.")}
    with pytest.raises(
        io.DeLoRAFileError, match=r"Shape mismatch .*attn2\.to_k: delora_A should be \(2, 32\)"
    ):
        pipe.load_delora_weights(sdxl_unet)
    assert_unchanged(pipe, before)


def _state(t) -> dict:
    tensors, _ = io.read_delora_file(t.adapter_dir / io.WEIGHT_NAME)
    return {f"{c}.{k}": v for c, comp in tensors.items() for k, v in comp.items()}


def test_failure_while_applying_rolls_back(sd_pipe, good_file, monkeypatch):
    before = snapshot(sd_pipe)
    real = planner.inject_delora

    def fail_on_text_encoder(module, config, name):
        if type(module).__name__ == "CLIPTextModel":
            raise RuntimeError("out of memory")
        return real(module, config, name)

    monkeypatch.setattr(planner, "inject_delora", fail_on_text_encoder)
    with pytest.raises(RuntimeError, match="out of memory"):
        sd_pipe.load_delora_weights(good_file)
    assert_unchanged(sd_pipe, before)


def test_metadata_contents(trained):
    t = trained("sdxl")
    tensors, meta = io.read_delora_file(t.adapter_dir / io.WEIGHT_NAME)
    assert meta["format_version"] == io.FORMAT_VERSION
    assert meta["components"] == ["unet", "text_encoder", "text_encoder_2"]
    assert meta["component_classes"]["text_encoder_2"] == "CLIPTextModelWithProjection"
    assert dd.DeLoRAConfig.from_dict(meta["configs"]["unet"]).init == "paper"
    assert meta["base_model"] == t.base_dir.name  # a local folder by its name: no absolute paths in files
    assert meta["pipeline_class"] == "StableDiffusionXLPipeline"
    assert meta["training_args"] == {"family": "sdxl", "learning_rate": 1e-3}
    fingerprint = meta["w_norm_fingerprint"]["unet"]
    assert fingerprint["layers"] == len(io.split_layers(tensors["unet"])) and len(fingerprint["sha256"]) == 16
    assert all(k.endswith(io.TENSOR_NAMES) for comp in tensors.values() for k in comp)
    rows = io.layer_report(io.load_adapter(t.adapter_dir))
    assert all(0 < r["delta_norm"] <= r["bound"] * (1 + 1e-5) for r in rows)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=["0"]))
    path = io.save_delora_file(tmp_path / io.WEIGHT_NAME, {"unet": model}, base_model="x")
    good = path.read_bytes()
    wrapped = io.save_delora_file(tmp_path / "w.safetensors", {"unet": torch.nn.DataParallel(model)})
    tensors, meta = io.read_delora_file(wrapped)
    assert meta["component_classes"] == {"unet": "Sequential"} and "0.delora_A" in tensors["unet"]
    (tmp_path / "w.safetensors").unlink()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_delora_file(path, {"unet": model})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [io.WEIGHT_NAME]
    with pytest.raises(ValueError, match="No component has a DeLoRA adapter named 'other'"):
        io.save_delora_file(tmp_path / "x.safetensors", {"unet": model}, adapter_name="other")


def test_file_written_elsewhere_then_copied_keeps_loading(trained, tmp_path):
    """Directories are found with no weight_name; an explicit weight_name picks another file."""
    t = trained("sd")
    shutil.copy(t.adapter_dir / io.WEIGHT_NAME, tmp_path / "step_500.safetensors")
    pipe = tp.load_pipeline(t.base_dir)
    pipe.load_delora_weights(tmp_path, weight_name="step_500.safetensors", adapter_name="s500")
    assert pipe.get_list_delora_adapters()["unet"] == ["s500"]


# --- paths and shareable metadata (issue 13 item 12) -------------------------------------------------------
def _no_hub(monkeypatch) -> None:
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def test_a_mistyped_local_path_is_reported_at_once_not_sent_to_the_hub(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained("sd").adapter_dir, tmp_path / "outputs" / "dreambooth-delora")
    _no_hub(monkeypatch)
    pipe = tp.load_pipeline(trained("sd").base_dir)
    with pytest.raises(
        FileNotFoundError,
        match=r"'outputs/dreambooth-delra' does not exist.*Did you mean .*dreambooth-delora",
    ):
        pipe.load_delora_weights("outputs/dreambooth-delra")
    for typo in ("runs/a/b", "./adapter", "../adapter", "adapter.safetensors", "~/adapter", "dir\\adapter"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            pipe.load_delora_weights(typo)
    assert pipe.load_delora_weights("outputs/dreambooth-delora") == "default"  # the right path loads
    assert io.looks_like_local_path("outputs/x") and not io.looks_like_local_path("someone/tiny-delora")
    assert not io.looks_like_local_path("gpt2")


def test_saved_metadata_holds_no_absolute_local_paths(trained, tmp_path):
    t = trained("sd")
    pipe = tp.load_pipeline(t.base_dir)
    pipe.load_delora_weights(t.adapter_dir)
    assert pipe.name_or_path == str(t.base_dir) and Path(pipe.name_or_path).is_absolute()
    args = {"instance_data_dir": str(tmp_path / "photos" / "dog"), "output_dir": "out/run", "rank": 4}
    pipe.save_delora_weights(tmp_path / "saved", training_args=args)
    _, meta = io.read_delora_file(tmp_path / "saved" / io.WEIGHT_NAME)
    assert meta["base_model"] == t.base_dir.name
    assert meta["training_args"] == {"instance_data_dir": "dog", "output_dir": "out/run", "rank": 4}
    raw = (tmp_path / "saved" / io.WEIGHT_NAME).read_bytes()[:100_000]
    assert str(tmp_path).encode() not in raw and str(t.base_dir).encode() not in raw
    hub_id = io.save_delora_file(tmp_path / "h.safetensors", {"unet": pipe.unet}, base_model="org/model")
    assert (
        io.read_delora_file(hub_id)[1]["base_model"] == "org/model"
    )  # a hub id is kept as the user named it
    from delora_diffusion import export

    lora = export.export_lora(tmp_path / "saved", tmp_path / "lora.safetensors")
    with safe_open(str(lora), "pt") as handle:
        assert all(str(tmp_path) not in value for value in handle.metadata().values())


def test_older_files_with_local_paths_show_only_folder_names(sd_pipe, good_file, tmp_path):
    """Files written before paths were cut still load; what the pipeline reports (the app's info) is cut."""
    old = rewrite(
        good_file,
        tmp_path / "old" / io.WEIGHT_NAME,
        metadata=lambda m: {
            **m,
            "delora_base_model": "/home/someone/models/tiny-sd",
            "delora_training_args": json.dumps({"instance_data_dir": "/home/someone/photos/dog", "rank": 2}),
        },
    )
    sd_pipe.load_delora_weights(old, adapter_name="old")
    try:
        meta = sd_pipe.get_delora_metadata("old")
        assert meta["base_model"] == "tiny-sd"
        assert meta["training_args"] == {"instance_data_dir": "dog", "rank": 2}
    finally:
        sd_pipe.unload_delora_weights()
