"""The delora-diffusion command, run in-process through main(argv) (and once as the installed console script)."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import tiny_pipelines as tp
from conftest import max_diff
from safetensors import safe_open

from delora_diffusion import cli, io


def test_inspect_prints_layers_bounds_and_metadata(trained, capsys):
    t = trained("sd")
    assert cli.main(["inspect", str(t.adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "unet (UNet2DConditionModel)" in out and "text_encoder (CLIPTextModel)" in out
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in out
    assert "|dW|/|W|" in out and "bound/|W|" in out
    assert '"learning_rate": 0.001' in out  # the training args from the metadata
    assert cli.main(["inspect", str(t.adapter_dir / io.WEIGHT_NAME), "--json", "--scale", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metadata"]["pipeline_class"] == "StableDiffusionPipeline"
    assert all(0 < r["relative_delta"] <= r["relative_bound"] * (1 + 1e-5) for r in report["layers"])


def test_export_lora_and_peft(trained, tmp_path, capsys):
    t = trained("sd")
    assert (
        cli.main(
            [
                "export-lora",
                str(t.adapter_dir),
                str(tmp_path / "k.safetensors"),
                "--format",
                "kohya",
                "--scale",
                "0.5",
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["delora_scale"] == "0.5"
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert cli.main(["export-lora", str(t.adapter_dir), str(tmp_path / "lora_dir")]) == 0
    assert (tmp_path / "lora_dir" / "pytorch_lora_weights.safetensors").is_file()
    assert cli.main(["export-peft", str(t.adapter_dir), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "unet" / io.PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "DELORA" and config["r"] == 4  # paper init: rank 2r in PEFT
    assert config["auto_mapping"]["base_model_class"] == "UNet2DConditionModel"
    assert "wrote PEFT DeLoRA adapter for text_encoder" in capsys.readouterr().out


def test_merge_writes_a_full_pipeline_with_the_update_baked_in(trained, tmp_path):
    t = trained("sd")
    out = tmp_path / "merged"
    assert (
        cli.main(["merge", "--base", str(t.base_dir), "--adapter", str(t.adapter_dir), "--out", str(out)])
        == 0
    )
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        assert not any("delora" in k for k in handle.keys())
    merged = tp.load_pipeline(out)
    assert max_diff(tp.run(merged, "sd"), t.adapted) < 2e-3
    assert max_diff(tp.run(merged, "sd"), t.base) > 2e-2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "/no/such/adapter.safetensors"], "does not exist"),
        (["export-lora", "/no/such/dir/", "/tmp/x.safetensors"], "does not exist"),
        (["export-peft", "./missing_adapter_dir", "/tmp/y"], "does not exist"),
        (["merge", "--base", "/no/such/base", "--adapter", "ADAPTER", "--out", "/tmp/z"], "Base model '/no/such/base' does not exist"),
        (["inspect", "TRUNCATED"], "is truncated"),
        (["export-lora", "ADAPTER", "/tmp/q.safetensors", "--format", "kohya", "--scale", "nan"], "finite"),
    ],
)  # fmt: skip
def test_bad_paths_and_files_exit_non_zero_with_a_clear_error(argv, message, trained, tmp_path, capsys):
    adapter = trained("sd").adapter_dir
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes((adapter / io.WEIGHT_NAME).read_bytes()[:-64])
    argv = [str(adapter) if a == "ADAPTER" else str(truncated) if a == "TRUNCATED" else a for a in argv]
    assert cli.main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert "Traceback" not in err


def test_usage_errors_and_app_passthrough(monkeypatch, capsys):
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["export-lora", "only-one-arg"]) == 2
    seen = {}
    fake = types.ModuleType("delora_diffusion.app")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "delora_diffusion.app", fake)
    assert cli.main(["app", "--port", "7861", "--share"]) == 0
    assert seen["argv"] == ["--port", "7861", "--share"]


def test_console_script_reads_a_hub_id_from_an_offline_cache(trained, tmp_path, monkeypatch, capsys):
    """`delora-diffusion inspect org/name` with HF_HUB_OFFLINE=1 and a cache laid out like the hub's.

    Run in-process (a subprocess re-imports torch and diffusers: tens of seconds on the shared CI cores); the
    installed console script is checked to point at cli.main, and huggingface_hub's settings are patched the
    way the environment variables set them at import.
    """
    from importlib.metadata import entry_points

    import huggingface_hub.constants

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("delora-diffusion") == "delora_diffusion.cli:main"
    revision = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "cache" / "models--someone--tiny-delora"
    (repo / "snapshots" / revision).mkdir(parents=True)
    shutil.copy(trained("sd").adapter_dir / io.WEIGHT_NAME, repo / "snapshots" / revision / io.WEIGHT_NAME)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert cli.main(["inspect", "someone/tiny-delora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["components"] == ["unet", "text_encoder"]
    assert cli.main(["inspect", "someone/absent"]) == cli.EXIT_ERROR
    assert "Could not get a DeLoRA adapter from 'someone/absent'" in capsys.readouterr().err


# --- outputs: clear errors, atomic writes, no silent overwrites (issue 13 item 9) ---------------------------
def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_unwritable_outputs_give_a_clear_error_in_every_writing_command(trained, tmp_path, capsys):
    """An output under a regular file cannot be created (root ignores permission bits, so this is the
    unwritable case every user can hit): each command says so in one line, exit 1, no traceback."""
    adapter = str(trained("sd").adapter_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for argv in (
        ["export-lora", adapter, str(blocker / "x.safetensors")],
        ["export-peft", adapter, str(blocker / "peft")],
        ["merge", "--base", str(trained("sd").base_dir), "--adapter", adapter, "--out", str(blocker / "m")],
    ):
        code, err = _run(argv, capsys)
        assert code == cli.EXIT_ERROR, argv
        assert "error: cannot use" in err and "a_file" in err and "Traceback" not in err, err
    assert blocker.read_text() == "not a folder"


def test_permission_denied_is_a_clear_error(trained, tmp_path, capsys, monkeypatch):
    """A PermissionError from the write itself (a read-only folder for a non-root user) reads the same way."""
    import os

    real = os.replace

    def deny(src, dst):
        if str(dst).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", deny)
    code, err = _run(
        ["export-lora", str(trained("sd").adapter_dir), str(tmp_path / "ro" / "x.safetensors")], capsys
    )
    assert code == cli.EXIT_ERROR and "Permission denied" in err and "Traceback" not in err
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ro").iterdir())


def test_outputs_are_not_overwritten_without_the_flag(trained, tmp_path, capsys):
    adapter = trained("sd").adapter_dir
    out = tmp_path / "lora.safetensors"
    assert cli.main(["export-lora", str(adapter), str(out)]) == 0
    first = out.read_bytes()
    code, err = _run(["export-lora", str(adapter), str(out), "--scale", "0.5"], capsys)
    assert code == cli.EXIT_ERROR and "already exists; pass --overwrite" in err
    assert out.read_bytes() == first
    assert cli.main(["export-lora", str(adapter), str(out), "--scale", "0.5", "--overwrite"]) == 0
    assert out.read_bytes() != first
    # the adapter itself is never the output, with or without --overwrite
    copy = tmp_path / "x.safetensors"
    shutil.copy(adapter / io.WEIGHT_NAME, copy)
    for extra in ([], ["--overwrite"]):
        code, err = _run(["export-lora", str(copy), str(copy), *extra], capsys)
        assert code == cli.EXIT_ERROR and ("over its input" in err or "already exists" in err)
    assert copy.read_bytes() == (adapter / io.WEIGHT_NAME).read_bytes()
    code, err = _run(["export-lora", str(copy), str(copy), "--overwrite"], capsys)
    assert "Refusing to write the export over its input" in err


def test_export_peft_is_atomic_and_refuses_a_non_empty_dir(trained, tmp_path, capsys, monkeypatch):
    adapter = str(trained("sd").adapter_dir)
    out = tmp_path / "peft"
    from delora_diffusion import export

    calls = []
    real = io.write_safetensors_atomic

    def fail_on_second(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(export.io, "write_safetensors_atomic", fail_on_second)
    code, err = _run(["export-peft", adapter, str(out)], capsys)
    assert code == cli.EXIT_ERROR and "No space left on device" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no temp folder left
    monkeypatch.undo()
    assert cli.main(["export-peft", adapter, str(out)]) == 0
    assert sorted(p.name for p in (out / "unet").iterdir()) == [io.PEFT_CONFIG_NAME, io.PEFT_WEIGHT_NAME]
    code, err = _run(["export-peft", adapter, str(out)], capsys)
    assert code == cli.EXIT_ERROR and "is not empty; pass --overwrite" in err
    (out / "unet" / "stale.txt").write_text("old")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["export-peft", adapter, str(out), "--overwrite"]) == 0
    assert not (out / "unet" / "stale.txt").exists() and (out / "notes.txt").read_text() == "mine"


def test_merge_refuses_a_non_empty_dir_and_replaces_it_whole(trained, tmp_path, capsys):
    t = trained("sd")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    argv = ["merge", "--base", str(t.base_dir), "--adapter", str(t.adapter_dir), "--out", str(out)]
    code, err = _run(argv, capsys)
    assert code == cli.EXIT_ERROR and "is not empty; pass --overwrite" in err
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not (out / "stale.bin").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


@pytest.mark.parametrize("command", ["inspect", "export-lora", "merge"])
def test_non_finite_scale_exits_non_zero(command, trained, tmp_path, capsys):
    adapter = str(trained("sd").adapter_dir)
    argv = {
        "inspect": ["inspect", adapter],
        "export-lora": ["export-lora", adapter, str(tmp_path / "l.safetensors")],
        "merge": [
            "merge",
            "--base",
            str(trained("sd").base_dir),
            "--adapter",
            adapter,
            "--out",
            str(tmp_path / "m"),
        ],
    }[command]
    for value in ("nan", "inf"):
        code, err = _run([*argv, "--scale", value], capsys)
        assert code == cli.EXIT_ERROR and "--scale must be a finite number" in err
    assert list(tmp_path.iterdir()) == []
