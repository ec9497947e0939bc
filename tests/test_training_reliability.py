"""Training reliability (issue 13, items 4, 5, 10, 11, 12): checkpoints tied to their run and replaced
atomically, resume at the final step, 16-bit and non-UTF-8 data, file modes, stale temp files, mistyped model
paths, and the divergence guard on the adapter itself.

Runs go through the same ``main`` the script calls, in-process, on the tiny SD pipeline (a few seconds each);
checkpoint mechanics are tested on the library functions directly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import tiny_pipelines as tp  # noqa: E402

from delora_diffusion.training import checkpointing  # noqa: E402
from delora_diffusion.training.util import TrainingConfigError  # noqa: E402


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory) -> Path:
    return tp.make_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def flags(model: Path | str, data: Path, out: Path, *extra: str) -> list[str]:
    base = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data)]
    base += ["--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "32"]
    base += ["--train_batch_size", "2", "--learning_rate", "1e-2", "--rank", "2", "--seed", "0"]
    return [*base, "--report_to", "none", *extra]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    from delora_diffusion.training import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def last_good(err: str) -> str:
    """The checkpoint a divergence error names as the last good one (its folder name)."""
    match = re.search(r"Last good checkpoint: (\S+) \(left intact\)", err)
    assert match, err
    return Path(match.group(1)).name


def steps_in_card(out: Path) -> int:
    (count,) = {int(n) for n in re.findall(r"\b(\d+) (?:training )?steps\b", (out / "README.md").read_text())}
    return count


def manifest(folder: Path) -> dict:
    return json.loads((folder / checkpointing.MANIFEST).read_text())


def adapter_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


# --- real runs ---------------------------------------------------------------------------------------------


def test_runs_resume_final_step_and_checkpoints_tied_to_their_run(
    sd_model, instance_dir, tmp_path, capsys, caplog
):
    """Run A (rank 2): 2 steps; resuming it at its last step trains nothing more (issue 13.10). Run B (rank 3)
    in the same dir: its checkpoint is never pruned in favour of A's, and `latest` resumes B's, not A's
    (13.5). No absolute local path in the adapter metadata; stale temp files of a killed run are cleaned
    (13.12)."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".delora_weights.safetensors.k1ll3d_x.tmp", out / ".training_args.json.abc123.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    (out / "checkpoint-9.tmp").mkdir()  # a checkpoint being written when the run was killed
    run_a = flags(sd_model, instance_dir, out, "--checkpointing_steps", "1", "--max_train_steps", "2")
    assert run_main(run_a, capsys)[0] == 0
    assert not any(p.exists() for p in stale) and not (out / "checkpoint-9.tmp").exists()
    first = load_file(out / "delora_weights.safetensors")
    assert steps_in_card(out) == 2

    meta = json.dumps(adapter_metadata(out / "delora_weights.safetensors"))
    for local in (str(tmp_path), str(sd_model.resolve()), str(instance_dir.resolve())):
        assert local not in meta
    shared = json.loads(adapter_metadata(out / "delora_weights.safetensors")["delora_training_args"])
    assert (
        shared["pretrained_model_name_or_path"] == "tiny-sd"
        and shared["instance_data_dir"] == instance_dir.name
    )
    assert json.loads((out / "training_args.json").read_text())["instance_data_dir"] == str(
        instance_dir.resolve()
    )
    for name in ("training_args.json", "delora_weights.safetensors", "README.md"):  # not mkstemp's 0600
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o666 & ~_umask(), (name, oct(mode))

    code, log = run_main([*run_a, "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0 and "nothing left to train" in caplog.text
    assert steps_in_card(out) == 2  # the card said 3 before the fix
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    meta = adapter_metadata(out / "delora_weights.safetensors")
    assert json.loads(meta["delora_training_args"])["global_step"] == 2
    again = load_file(out / "delora_weights.safetensors")  # the same adapter, not one step more
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    run_a_id = manifest(out / "checkpoint-2")["run_id"]

    caplog.clear()
    run_b = flags(sd_model, instance_dir, out, "--rank", "3", "--checkpointing_steps", "1")
    run_b += ["--checkpoints_total_limit", "1", "--max_train_steps", "1"]
    assert run_main(run_b, capsys)[0] == 0
    assert "of another run" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    run_b_id = manifest(out / "checkpoint-1")["run_id"]
    assert run_b_id != run_a_id and manifest(out / "checkpoint-2")["run_id"] == run_a_id

    code, log = run_main([*run_b[:-1], "2", "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, log
    assert (
        "checkpoint-1" in caplog.text
        and "skips ['checkpoint-2']: written for a different adapter" in caplog.text
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # B's step 2; its 1 pruned
    assert manifest(out / "checkpoint-2")["run_id"] == run_b_id

    code, log = run_main([*run_a, "--resume_from_checkpoint", "checkpoint-2"], capsys)
    assert code == 2 and "holds a different adapter" in log and "shape" in log and "Traceback" not in log


def _umask() -> int:
    from delora_diffusion.util import current_umask

    return current_umask()


def test_guard_stops_on_absurd_lambda_before_saving_it(sd_model, instance_dir, tmp_path, capsys):
    """Step 1 (warm-up, lr 0) is good and checkpointed; step 2 moves A and B off the paper init (where ΔW = 0,
    so λ's gradient is exactly 0 and λ stays put) and is checkpointed too; step 3 takes λ to ~1e29 with a
    finite loss. The run stops there, names checkpoint-2 as the last good one, and never writes checkpoint-3
    nor the final file (13.4)."""
    out = tmp_path / "out"
    argv = flags(sd_model, instance_dir, out, "--learning_rate", "1e30", "--max_grad_norm", "1e30")
    argv += ["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2"]
    argv += ["--delora_lambda", "15"]  # an absolute lambda: under the default relative bound it cannot grow
    code, err = run_main([*argv, "--max_train_steps", "30", "--checkpointing_steps", "1"], capsys)
    assert code == 1 and "adapter diverged" in err and "unet." in err, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert last_good(err) == "checkpoint-2"
    assert not (out / "delora_weights.safetensors").exists()
    good = load_file(out / "checkpoint-2" / "delora_weights.safetensors")
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for k, v in good.items() if "lambda" in k)


def test_non_finite_loss_skips_then_stops(sd_model, instance_dir, tmp_path, capsys, monkeypatch):
    """The loss side of the guard: after the first step every loss is NaN; 5 skipped updates stop the run."""
    from delora_diffusion.training import steps

    real, calls = steps.compute_loss, []

    def nan_after_first(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss if len(calls) == 1 else loss * torch.tensor(float("nan"))

    monkeypatch.setattr(steps, "compute_loss", nan_after_first)
    out = tmp_path / "out"
    argv = flags(sd_model, instance_dir, out, "--max_train_steps", "30", "--checkpointing_steps", "1")
    code, err = run_main(argv, capsys)
    assert code == 1 and "non-finite" in err and "5 steps in a row" in err, err
    assert last_good(err) == "checkpoint-1"


# --- checkpoint mechanics ----------------------------------------------------------------------------------


class FakeAccelerator:
    """What save_checkpoint needs of accelerate: one process that writes a state file."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / checkpointing.STATE_FILE).write_bytes(os.urandom(64))


SHAPES = {"unet.x.delora_A": [2, 8]}


def identity(run_id: str = "run-a") -> checkpointing.RunIdentity:
    return checkpointing.RunIdentity(run_id, SHAPES)


def test_checkpoint_replace_survives_a_kill_at_every_point(tmp_path, monkeypatch):
    """Replacing checkpoint-3: a kill before, between and after the two renames of the replace (the last
    while deleting the old copy) leaves, after recovery, a complete checkpoint-3: the old or the new (13.5)."""
    accelerator = FakeAccelerator()
    real_replace, real_rmtree = os.replace, shutil.rmtree
    for renames_before_kill in (0, 1, 2):
        out = tmp_path / f"kill{renames_before_kill}"
        checkpointing.save_checkpoint(accelerator, out, 3, identity())
        old_state = (out / "checkpoint-3" / checkpointing.STATE_FILE).read_bytes()
        done = []

        def dying_replace(src, dst, done=done, limit=renames_before_kill):
            if len(done) == limit:
                raise KeyboardInterrupt("killed")
            done.append(1)
            real_replace(src, dst)

        def dying_rmtree(path, *args, **kwargs):
            if str(path).endswith(".old"):
                (Path(path) / checkpointing.MANIFEST).unlink()  # half deleted
                raise KeyboardInterrupt("killed")
            real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(checkpointing.os, "replace", dying_replace)
        monkeypatch.setattr(checkpointing.shutil, "rmtree", dying_rmtree)
        with pytest.raises(KeyboardInterrupt):
            checkpointing.save_checkpoint(accelerator, out, 3, identity())
        monkeypatch.setattr(checkpointing.os, "replace", real_replace)
        monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
        assert checkpointing.resolve_resume("latest", out).name == "checkpoint-3"  # before recovery, too
        checkpointing.recover(out)
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]
        found, reason = checkpointing.read_checkpoint(out / "checkpoint-3")
        assert found is not None, reason
        new_state = (out / "checkpoint-3" / checkpointing.STATE_FILE).read_bytes()
        assert (new_state == old_state) == (renames_before_kill == 0)  # killed before the swap: the old one


def test_latest_skips_incomplete_checkpoints_with_a_warning(tmp_path, caplog):
    """A checkpoint-N left partial (no manifest, or a truncated file) is never picked by `latest` (13.5)."""
    out = tmp_path / "out"
    accelerator = FakeAccelerator()
    checkpointing.save_checkpoint(accelerator, out, 3, identity())
    checkpointing.save_checkpoint(accelerator, out, 4, identity())
    (out / "checkpoint-5").mkdir()  # the rmtree-then-rename of old versions could leave this
    (out / "checkpoint-5" / checkpointing.STATE_FILE).write_bytes(b"partial")
    state = out / "checkpoint-4" / checkpointing.STATE_FILE
    state.write_bytes(state.read_bytes()[:10])  # truncated after its manifest was written
    assert checkpointing.resolve_resume("latest", out).name == "checkpoint-3"
    with caplog.at_level(logging.WARNING):
        chosen = checkpointing.choose_resume("latest", out, SHAPES)
    assert chosen.path.name == "checkpoint-3"
    assert "checkpoint-5: no delora_checkpoint.json" in caplog.text and "checkpoint-4: " in caplog.text
    with pytest.raises(TrainingConfigError, match="is incomplete"):
        checkpointing.resolve_resume("checkpoint-5", out)


def test_prune_keeps_other_runs_and_the_newest_of_this_one(tmp_path):
    out = tmp_path / "out"
    accelerator = FakeAccelerator()
    other = identity("run-old")
    for step in (500, 1000):
        checkpointing.save_checkpoint(accelerator, out, step, other)
    for step in (100, 200):
        checkpointing.save_checkpoint(accelerator, out, step, identity(), total_limit=1)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1000", "checkpoint-200", "checkpoint-500"]
    assert checkpointing.choose_resume("latest", out, SHAPES).path.name == "checkpoint-200"


# --- data and paths (fail before any model loads) ----------------------------------------------------------


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    from delora_diffusion.training.data import read_examples

    ramp = (np.arange(48 * 48, dtype=np.float64).reshape(48, 48) / (48 * 48 - 1) * 65535).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    (example,) = read_examples(tmp_path, "sks", 48)
    pixels = np.asarray(example.image)
    assert example.image.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.01  # clipping made 99.6% of a real photo white
    assert abs(int(pixels[24, 24, 0]) - round(ramp[24, 24] / 257)) <= 1


def test_bad_caption_encoding_and_mistyped_model_paths_are_clear_errors(
    sd_model, instance_dir, tmp_path, capsys, monkeypatch
):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: asked.append(a) or 1 / 0)
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 40), "red").save(data / "a.png")
    (data / "a.txt").write_bytes("a photo of sks caf\xe9".encode("cp1252"))
    code, err = run_main(flags(sd_model, data, tmp_path / "out"), capsys)
    assert code == 2 and "a.txt" in err and "not UTF-8" in err and "Traceback" not in err, err

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for typo in ("outputs/dreambooth-delra", "./models/sd-tny", "a/b/c"):
        code, err = run_main(flags(typo, instance_dir, tmp_path / "out"), capsys)
        assert code == 2 and "local path that does not exist" in err and typo in err, (typo, err)
    assert not asked, "a mistyped local path was sent to the hub"
    assert not (tmp_path / "out").exists()


def test_atomic_write_uses_the_umask(tmp_path):
    from delora_diffusion.util import atomic_write_text

    previous = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
