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
