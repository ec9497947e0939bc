"""DreamBooth DeLoRA training script: the real script through ``accelerate launch`` on tiny pipelines.

Runs are a few steps at resolution 32 (Flux 16) on CPU. Bad inputs and data handling are checked in-process
through the same ``main`` the script calls (they fail before any model loads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import tiny_pipelines as tp  # noqa: E402

from delora_diffusion.training.util import is_installed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_scripts" / "dreambooth_delora.py"
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--cpu",
    "--num_processes",
    "1",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--num_cpu_threads_per_process",
    "2",
]
RES = {"sd": 32, "sdxl": 32, "sd3": 32, "flux": 16}


def env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


def launch(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*LAUNCH, str(SCRIPT), *args], capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: maker(root / family) for family, maker in tp.MAKERS.items()}


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = (rng.random((40, 48, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "1.txt").write_text("a photo of sks dog on grass")
    return folder


def common(model: Path, instance_dir: Path, out: Path, family: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(instance_dir),
        "--instance_prompt",
        "a photo of sks dog",
        "--output_dir",
        str(out),
        "--resolution",
        str(RES[family]),
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--rank",
        "2",
        "--seed",
        "0",
        "--max_sequence_length",
        "16",
        "--report_to",
        "none",
    ]


def validation_flags() -> list[str]:
    return [
        "--validation_prompt",
        "a photo of sks dog",
        "--num_validation_images",
        "1",
        "--validation_inference_steps",
        "2",
    ]


def metadata(path: Path) -> dict:
    from delora_diffusion.io import read_safetensors_header

    return read_safetensors_header(path)[1]


def assert_adapter_changes_output(model: Path, out: Path, family: str) -> None:
    import delora_diffusion  # noqa: F401  (adds load_delora_weights)

    pipe = tp.load_pipeline(model)
    before = tp.run(pipe, family)
    pipe.load_delora_weights(out)
    after = tp.run(pipe, family)
    assert np.isfinite(after).all()
    assert np.abs(after - before).max() > 1e-4, "the trained adapter does not change the images"


# --- real runs ---------------------------------------------------------------------------------------------


def test_sd_prior_preservation_text_encoder_checkpoint_resume(models, instance_dir, tmp_path):
    """Class images generated (reusing existing ones), text encoder trained, checkpoints pruned, resume."""
    out, class_dir = tmp_path / "out", tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (32, 32), "red").save(class_dir / "mine.png")
    args = common(models["sd"], instance_dir, out, "sd") + [
        "--with_prior_preservation",
        "--class_data_dir",
        str(class_dir),
        "--class_prompt",
        "a photo of a dog",
        "--num_class_images",
        "3",
        "--sample_batch_size",
        "2",
        "--train_text_encoder",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "1",
        "--snr_gamma",
        "5",
    ]
    launch(*args, "--max_train_steps", "2", *validation_flags())
    class_images = sorted(p.name for p in class_dir.iterdir())
    assert len(class_images) == 3 and "mine.png" in class_images
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "delora_weights.safetensors").is_file()
    for name in (
        "delora_weights.safetensors",
        "README.md",
        "validation/final.png",
        "validation/lambda_sweep.png",
    ):
        assert (out / name).is_file(), name
    sweep = Image.open(out / "validation" / "lambda_sweep.png")
    assert sweep.size == (32, 4 * 32)  # one row per lambda scale
    card = (out / "README.md").read_text()
    assert "a photo of sks dog" in card and "load_delora_weights" in card and "lambda_sweep.png" in card

    keys = load_file(out / "delora_weights.safetensors").keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    meta = json.dumps(metadata(out / "delora_weights.safetensors"))  # shareable: no local paths
    assert str(Path(models["sd"]).resolve()) not in meta and str(instance_dir.resolve()) not in meta
    assert (
        str(instance_dir.resolve()) in (out / "training_args.json").read_text()
    )  # the local record has them

    resumed = launch(*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert "Resuming from" in resumed.stderr + resumed.stdout
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert len(list(class_dir.iterdir())) == 3  # nothing regenerated
    assert_adapter_changes_output(models["sd"], out, "sd")


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_family_runs_and_reloads(family, models, instance_dir, tmp_path):
    out = tmp_path / "out"
    launch(*common(models[family], instance_dir, out, family), "--max_train_steps", "2", *validation_flags())
    assert (out / "validation" / "lambda_sweep.png").is_file()
    assert_adapter_changes_output(models[family], out, family)


DDP_WRAPPER = """
import os, sys
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from delora_diffusion.training import parse_args, train
from delora_diffusion.training.checkpointing import adapter_tensors
result = train(parse_args(sys.argv[2:]))
rank = os.environ["RANK"]  # the process group is gone after end_training
state = {f"{n}.{k}": v.contiguous() for n, m in result.adapted.items() for k, v in adapter_tensors(m).items()}
sharded = sum(isinstance(p, DTensor) for p in result.adapted["unet"].parameters())
metadata = {"world": os.environ["WORLD_SIZE"], "sharded": str(sharded)}
save_file(state, f"{sys.argv[1]}/rank{rank}.safetensors", metadata=metadata)
"""

# accelerate turns FSDP on only for GPU-like process groups (state.py: the FSDP branch sits under
# `elif self.distributed_type in [MULTI_GPU, MULTI_NPU, ...]`), so on CPU a FSDP config gives plain DDP. This
# prefix lets accelerate take its FSDP path on a CPU (gloo) process group by presenting it as multi-GPU before
# the Accelerator is built; everything after that (accelerate's FSDP2 prepare, torch's fully_shard, the
# script) is the real thing.
FSDP_WRAPPER = (
    """
from accelerate.state import PartialState
from accelerate.utils import DistributedType
PartialState(cpu=True)
PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
"""
    + DDP_WRAPPER
)


def dump_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


def assert_ranks_match_file(ranks: list[dict], adapter_file: Path) -> None:
    """Both processes hold the same adapter, and it is the one in the saved file."""
    from delora_diffusion.io import read_delora_file

    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    layers, _ = read_delora_file(adapter_file)
    saved = layers["unet"]  # "<layer>.<tensor name>"
    assert len(saved) == len(ranks[0])
    for key, value in ranks[0].items():
        layer, tensor = key.removeprefix("unet.").split(".delora.default.")
        assert torch.equal(saved[f"{layer}.{tensor}"], value), key


def two_process_args(models, instance_dir, out: Path) -> list[str]:
    """Same flags for the DDP and the FSDP run, so their adapters can be compared."""
    return [
        *common(models["sd"], instance_dir, out, "sd"),
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "1",
    ]


@pytest.fixture(scope="module")
def ddp_run(models, instance_dir, tmp_path_factory) -> tuple[list[dict], Path]:
    """Two gloo processes under torchrun: the per-rank adapters and the output dir (shared by two tests)."""
    root = tmp_path_factory.mktemp("ddp")
    wrapper = root / "wrapper.py"
    wrapper.write_text(DDP_WRAPPER)
    out = root / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    cmd += [str(wrapper), str(root), *two_process_args(models, instance_dir, out)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(env(), OMP_NUM_THREADS="1"), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "MULTI_CPU" in proc.stderr + proc.stdout
    assert dump_metadata(root / "rank0.safetensors") == {"world": "2", "sharded": "0"}
    return [load_file(root / f"rank{r}.safetensors") for r in (0, 1)], out


def test_two_process_ddp_identical_adapters(ddp_run):
    ranks, out = ddp_run
    assert any(
        "delora_lambda" in k and not torch.allclose(v, torch.tensor(15.0)) for k, v in ranks[0].items()
    )
    assert_ranks_match_file(ranks, out / "delora_weights.safetensors")


def launch_fsdp(wrapper: Path, ranks_dir: Path, args: list[str]) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2"]
    cmd += [
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29544"]
    cmd += ["--num_cpu_threads_per_process", "1"]
    proc = subprocess.run(
        [*cmd, str(wrapper), str(ranks_dir), *args], capture_output=True, text=True, env=env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_fsdp2_two_process_matches_ddp_and_resumes(models, instance_dir, tmp_path, ddp_run):
    """FSDP2 shards the frozen UNet; the adapter stays whole, trains like DDP, checkpoints and resumes."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(FSDP_WRAPPER)
    out, first, resumed = tmp_path / "out", tmp_path / "first", tmp_path / "resumed"
    first.mkdir()
    resumed.mkdir()
    args = [*two_process_args(models, instance_dir, out), "--checkpointing_steps", "1"]
    log = launch_fsdp(wrapper, first, [*args, *validation_flags()])
    assert "DistributedType.FSDP" in log
    for r in (0, 1):  # the frozen UNet weights were sharded (DTensors)
        assert int(dump_metadata(first / f"rank{r}.safetensors")["sharded"]) > 0
    ranks = [load_file(first / f"rank{r}.safetensors") for r in (0, 1)]
    assert_ranks_match_file(ranks, out / "delora_weights.safetensors")
    ddp_ranks, _ = ddp_run
    assert ranks[0].keys() == ddp_ranks[0].keys()
    for key, value in ranks[0].items():  # same math as DDP, up to float rounding (Adam scales tiny grads;
        # lambda sits on its relative bound, where Adam's normalised step turns rounding into ~1e-5 moves)
        tolerance = 1e-4 if key.endswith("delora_lambda") else 1e-5
        assert torch.allclose(value, ddp_ranks[0][key], rtol=tolerance, atol=tolerance), key
    assert (out / "validation" / "lambda_sweep.png").is_file()  # every process ran the sharded UNet
    for step in (1, 2):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
        assert (checkpoint / "delora_weights.safetensors").is_file()

    log = launch_fsdp(wrapper, resumed, [*args, "--resume_from_checkpoint", "checkpoint-1"])
    assert "Resuming from" in log and "checkpoint-1" in log
    ranks = [load_file(resumed / f"rank{r}.safetensors") for r in (0, 1)]
    assert_ranks_match_file(ranks, out / "delora_weights.safetensors")
    assert_ranks_match_file(ranks, out / "checkpoint-2" / "delora_weights.safetensors")
    step1 = load_file(out / "checkpoint-1" / "delora_state.safetensors")
    changed = [k for k in step1 if "delora_A" in k and not torch.equal(step1[k], ranks[0][k])]
    assert changed and all(torch.isfinite(v).all() for v in ranks[0].values())


# --- bad inputs (in-process; they fail before any model loads) ---------------------------------------------


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    from delora_diffusion.training import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_inputs_give_clear_errors(models, instance_dir, tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", str(models["sd"]), "--instance_prompt", "a photo of sks dog"]
    base += ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    cases = {
        "does not exist": ["--instance_data_dir", str(tmp_path / "missing")],
        "No usable image": ["--instance_data_dir", str(empty)],
        "a.png": ["--instance_data_dir", str(broken)],
        "not divisible by 2": ["--instance_data_dir", str(instance_dir), "--resolution", "33"],
        "needs --class_prompt": ["--instance_data_dir", str(instance_dir), "--with_prior_preservation"],
        "no checkpoint-N": ["--instance_data_dir", str(instance_dir), "--resume_from_checkpoint", "latest"],
        "pip install prodigyopt": ["--instance_data_dir", str(instance_dir), "--optimizer", "prodigy"],
        "pip install bitsandbytes": ["--instance_data_dir", str(instance_dir), "--use_8bit_adam"],
        "needs --validation_prompt": [
            "--instance_data_dir",
            str(instance_dir),
            "--extra_validation_prompts",
            "a",
        ],
        "--num_validation_images must be 0 (no validation images) or more": [
            "--instance_data_dir",
            str(instance_dir),
            "--num_validation_images",
            "-1",
        ],
        "--delora_relative_bound: DeLoRAConfig.relative_bound must be": [
            "--instance_data_dir",
            str(instance_dir),
            "--delora_relative_bound",
            "0",
        ],
        "--delora_lambda: DeLoRAConfig.lambda_init must be a finite": [
            "--instance_data_dir",
            str(instance_dir),
            "--delora_lambda",
            "inf",
        ],
    }
    for tracker in ("tensorboard", "wandb"):  # a missing tracker (the dev extra installs tensorboard)
        if not is_installed(tracker) and not (tracker == "tensorboard" and is_installed("tensorboardX")):
            cases[f"pip install {tracker}"] = [
                "--instance_data_dir",
                str(instance_dir),
                "--report_to",
                tracker,
            ]
    for expected, extra in cases.items():
        code, err = run_main(base + extra, capsys)
        assert code == 2 and expected in err, (expected, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_sharded_configs_give_clear_errors(models, instance_dir, tmp_path, capsys, monkeypatch):
    """DeepSpeed without its package (or without a launcher), FSDP1, FSDP with --train_text_encoder, FSDP
    where accelerate cannot."""
    from accelerate.state import AcceleratorState

    launch_ds = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_deepspeed",
        "--num_processes",
        "2",
    ]
    deepspeed_missing = not is_installed("deepspeed")  # the missing-package messages need it missing
    if deepspeed_missing:
        proc = subprocess.run(
            [*launch_ds, str(SCRIPT)], capture_output=True, text=True, env=env(), timeout=120, cwd=ROOT
        )
        assert (
            proc.returncode != 0 and "pip3 install deepspeed" in proc.stderr
        )  # accelerate's launcher says it

    base = common(models["sd"], instance_dir, tmp_path / "out", "sd")
    fsdp2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}
    cases = [
        (
            {"ACCELERATE_USE_DEEPSPEED": "true"},
            [],
            "pip install deepspeed" if deepspeed_missing else "--use_deepspeed",
        ),
        ({"ACCELERATE_USE_FSDP": "true"}, [], "fsdp_version: 2"),
        (fsdp2, ["--train_text_encoder"], "--train_text_encoder does not work with FSDP"),
    ]
    if not torch.cuda.is_available():
        cases.append((fsdp2, [], "enables FSDP on GPUs (and other accelerators) only"))
    for variables, extra, expected in cases:
        with monkeypatch.context() as patch:
            for name, value in variables.items():
                patch.setenv(name, value)
            code, err = run_main(base + extra, capsys)
        AcceleratorState._reset_state(reset_partial_state=True)  # later in-process runs start afresh
        assert code == 2 and expected in err and "Traceback" not in err, (expected, err)
    assert not (tmp_path / "out").exists()


def hub_cache_with(model_dir: Path, cache: Path, repo_id: str) -> None:
    """Lay `model_dir` out as the hub cache does (models--org--name/snapshots/<rev>/, refs/main)."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_no_validation_images_means_no_validation(models, instance_dir, tmp_path, capsys):
    """--num_validation_images 0 (diffusers' scripts then make no image): training ends well, with the adapter
    and no validation folder; it used to crash in the pipeline after saving."""
    out = tmp_path / "out"
    argv = [*common(models["sd"], instance_dir, out, "sd"), "--max_train_steps", "2", *validation_flags()]
    argv[argv.index("--num_validation_images") + 1] = "0"
    code, err = run_main([*argv, "--validation_steps", "1"], capsys)
    assert code == 0, err[-3000:]
    assert (out / "delora_weights.safetensors").is_file() and not (out / "validation").exists()


def test_hub_id_gradient_checkpointing_validation_steps_fp16(models, instance_dir, tmp_path):
    """Flags no other run uses: a hub model id (from an offline hub cache), checkpointed activations,
    validation every 2 steps and every epoch, fp16 (on CPU: unscaled)."""
    out = tmp_path / "out"
    hub_cache_with(models["sd"], tmp_path / "hub", "someone/tiny-sd")
    cmd = [*LAUNCH, str(SCRIPT), *common(models["sd"], instance_dir, out, "sd"), "--max_train_steps", "3"]
    cmd[cmd.index("--pretrained_model_name_or_path") + 1] = "someone/tiny-sd"
    cmd[cmd.index("--mixed_precision") + 1] = "fp16"  # the launcher's; the script's flag follows
    cmd += ["--gradient_checkpointing", "--validation_steps", "2", "--validation_epochs", "1"]
    cmd += ["--mixed_precision", "fp16"]
    run_env = {**env(), "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run(
        [*cmd, *validation_flags()], capture_output=True, text=True, env=run_env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fp16 on CPU runs without loss scaling" in proc.stderr
    written = sorted(p.name for p in (out / "validation").iterdir())
    assert written == ["epoch-1.png", "final.png", "lambda_sweep.png", "step-2.png"]  # 3 images, batch 2
    record = json.loads((out / "training_args.json").read_text())
    assert record["gradient_checkpointing"] and record["mixed_precision"] == "fp16"
    assert record["pretrained_model_name_or_path"] == "someone/tiny-sd"
    tensors = load_file(out / "delora_weights.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert_adapter_changes_output(models["sd"], out, "sd")


def test_no_flags_means_embedded_default():
    from delora_diffusion.embedded import default_model_path
    from delora_diffusion.training import (
        DEFAULT_OUTPUT_DIR,
        EMBEDDED_DEFAULTS,
        TrainingConfigError,
        parse_args,
    )
    from delora_diffusion.training.args import resolve_embedded

    args = parse_args([])
    assert args.embedded and args.output_dir == DEFAULT_OUTPUT_DIR
    assert args.resolution == EMBEDDED_DEFAULTS["resolution"] == 64
    assert args.learning_rate == EMBEDDED_DEFAULTS["learning_rate"]
    assert parse_args(["--rank", "3", "--output_dir", "x"]).rank == 3  # flags win over the defaults
    if not (default_model_path() / "model_index.json").is_file():
        with pytest.raises(TrainingConfigError, match="train_embedded_base.py"):
            resolve_embedded(args)
        return
    args = resolve_embedded(args)
    assert args.pretrained_model_name_or_path == str(default_model_path())
    assert args.instance_prompt == "a photo of sks star" and args.class_prompt == "a photo of a star"
    assert "sks star" in args.validation_prompt and Path(args.instance_data_dir).is_dir()


# --- data --------------------------------------------------------------------------------------------------


def test_data_formats_exif_modes_captions_and_unreadable(tmp_path, caplog):
    from delora_diffusion.training.data import read_examples

    folder = tmp_path / "imgs"
    (folder / "heldout").mkdir(parents=True)
    Image.new("RGB", (40, 40), "blue").save(folder / "heldout" / "x.png")  # sub-folders are not read
    Image.new("L", (40, 40), 128).save(folder / "gray.jpg")
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(folder / "alpha.png")
    Image.new("CMYK", (40, 40), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (40, 40), "green").save(folder / "web.webp")
    Image.new("RGB", (40, 40), "green").save(folder / "bit.bmp")
    rotated = Image.new("RGB", (60, 40), "white")
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    rotated.save(folder / "rot.jpg", exif=exif)
    (folder / "rot.txt").write_text("a photo of sks dog upside down\n")
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    (folder / "notes.md").write_text("ignored")
    with caplog.at_level("WARNING"):
        examples = read_examples(folder, "a photo of sks dog", 32)
    names = sorted(e.path.name for e in examples)
    assert names == ["alpha.png", "bit.bmp", "cmyk.jpg", "gray.jpg", "rot.jpg", "web.webp"]
    assert all(e.image.mode == "RGB" and min(e.image.size) == 32 for e in examples)
    by_name = {e.path.name: e for e in examples}
    assert by_name["rot.jpg"].original_size == (60, 40)  # (height, width) after EXIF transpose
    assert by_name["rot.jpg"].prompt == "a photo of sks dog upside down"
    assert by_name["gray.jpg"].prompt == "a photo of sks dog"
    assert "broken.png" in caplog.text and "Skipped 1" in caplog.text


def test_dataset_batches_with_prior_preservation(tmp_path):
    from delora_diffusion.training.data import DreamBoothDataset, collate, read_examples

    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (48, 32), color).save(tmp_path / name)
    instances = read_examples(tmp_path, "sks", 32)
    dataset = DreamBoothDataset(instances, 32, classes=instances[:1], repeats=3, random_flip=True)
    assert len(dataset) == 6
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["num_instance"] == 2
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_bf16_mixed_precision_run(models, instance_dir, tmp_path):
    """Frozen models in bf16, adapters in fp32, and validation images from the bf16 pipeline."""
    out = tmp_path / "out"
    cmd = [*LAUNCH, str(SCRIPT), *common(models["sd"], instance_dir, out, "sd"), "--max_train_steps", "2"]
    cmd[cmd.index("--mixed_precision") + 1] = "bf16"
    cmd += ["--mixed_precision", "bf16", *validation_flags()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tensors = load_file(out / "delora_weights.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert (out / "validation" / "lambda_sweep.png").is_file()
    assert json.loads((out / "training_args.json").read_text())["mixed_precision"] == "bf16"
    assert_adapter_changes_output(models["sd"], out, "sd")
