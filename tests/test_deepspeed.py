"""DeepSpeed ZeRO-1/2 through accelerate, on the CPU (gloo, DeepSpeed's CPU accelerator), two processes.

DeepSpeed is not in the dev extra (it builds only with ``DS_BUILD_OPS=0 pip install --no-build-isolation
deepspeed`` after torch); scripts/setup.sh installs it that way, so CI runs this module, and it is skipped
only where DeepSpeed is not installed. Each run trains a DeLoRA
adapter (Conv2d and Linear) for three AdamW steps with gradient clipping on two halves of a batch: both ranks
must end where a single process training on the whole batch ends. (On a CPU, accelerate's
``process_index`` is 0 on both DeepSpeed ranks, so the worker shards by torch.distributed's rank.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys, torch
from torch import nn
import delora_diffusion as dd

def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    dd.inject_delora(net, dd.DeLoRAConfig(rank=2, lambda_init=3.0, target_modules=["0", "3"]))
    with torch.no_grad():  # off the paper init's dW = 0, where lambda's gradient is pure rounding noise
        for _, _, _, a in dd.iter_delora_layers(net):
            a.delora_B.add_(0.3 * torch.randn(a.delora_B.shape))
    return net

g = torch.Generator().manual_seed(1)
X, Y = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 4, generator=g)
stage = int(sys.argv[1])
net = build()
params = [p for p in net.parameters() if p.requires_grad]
if stage == 0:  # the single-process reference on the whole batch
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        (net(X) - Y).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad()
    rank = 0
else:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    world = int(os.environ["WORLD_SIZE"])
    config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * world, "gradient_clipping": 1.0,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage}}
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    assert acc.distributed_type.value == "DEEPSPEED", acc.distributed_type
    model, opt = acc.prepare(net, torch.optim.AdamW(params, lr=1e-2))
    rank = torch.distributed.get_rank()  # accelerate's own process_index says 0 on both CPU ranks
    for _ in range(3):
        acc.backward((model(X[2 * rank : 2 * rank + 2]) - Y[2 * rank : 2 * rank + 2]).pow(2).mean())
        opt.step(); opt.zero_grad()
out = {k: v.tolist() for k, v in net.state_dict().items() if "delora_" in k}
open(os.environ["RESULT"] + str(rank), "w").write(json.dumps(out))
if stage:  # gloo's threads outliving the interpreter abort it ("terminate called without an active exception")
    acc.end_training()
"""


def _run(stage: int, tmp_path: Path) -> list[dict[str, list]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = tmp_path / f"stage{stage}.json"
    cmd = [sys.executable, str(script), str(stage)]
    if stage:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *cmd[1:]]
    env = {"RESULT": str(result), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    import os

    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=400, env={**os.environ, **env}, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{result}{rank}").read_text()) for rank in range(2 if stage else 1)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[str, list]:
    (reference,) = _run(0, tmp_path_factory.mktemp("reference"))
    return reference


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_matches_single_process(stage, tmp_path, single_process):
    reference = single_process
    ranks = _run(stage, tmp_path)
    assert all(r.keys() == reference.keys() for r in ranks) and any("lambda" in k for k in reference)
    for key, want in reference.items():
        for got in ranks:
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want), rtol=1e-4, atol=2e-5)


# --- the training script under `accelerate launch --use_deepspeed` -------------------------------------------
# One process: accelerate gives each CPU DeepSpeed rank process_index 0 (see above), so the script refuses a
# multi-process CPU DeepSpeed run with a clear error (tests/test_training.py) and runs a single-process one.


def _deepspeed_launch(args: list[str], stage: int, processes: int = 1) -> str:
    from test_training import SCRIPT, env

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(stage)]
    cmd += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", "29555", str(SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=400, cwd=ROOT)
    assert (proc.returncode == 0) == (processes == 1), proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_training_script_zero2_matches_plain_run_and_resumes(tmp_path):
    """ZeRO-2 trains the adapter as a plain run does, checkpoints in DeepSpeed's layout, and resumes."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from test_training import common, launch
    from tiny_pipelines import MAKERS

    model = MAKERS["sd"](tmp_path / "model")
    images = tmp_path / "instance"
    images.mkdir()
    for i in range(2):
        pixels = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(images / f"{i}.png")
    steps = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--max_grad_norm", "1.0"]
    launch(*common(model, images, tmp_path / "plain", "sd"), *steps)
    log = _deepspeed_launch([*common(model, images, tmp_path / "ds", "sd"), *steps], stage=2)
    assert "DistributedType.DEEPSPEED" in log

    plain = load_file(tmp_path / "plain" / "delora_weights.safetensors")
    zero2 = load_file(tmp_path / "ds" / "delora_weights.safetensors")
    assert plain.keys() == zero2.keys()
    for key, value in plain.items():  # same AdamW math; DeepSpeed clips and steps the flat fp32 groups
        torch.testing.assert_close(zero2[key], value, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ds" / "checkpoint-1" / "pytorch_model").is_dir()  # DeepSpeed's own layout

    resumed = [*common(model, images, tmp_path / "ds", "sd"), *steps, "--resume_from_checkpoint", "latest"]
    (tmp_path / "ds" / "checkpoint-2").rename(tmp_path / "ds" / "later")  # resume from step 1
    log = _deepspeed_launch(resumed, stage=2)
    assert "Resuming from" in log
    again = load_file(tmp_path / "ds" / "delora_weights.safetensors")
    for key, value in zero2.items():
        torch.testing.assert_close(again[key], value, rtol=1e-5, atol=1e-6)

    log = _deepspeed_launch(resumed, stage=2, processes=2)  # refused before any model loads, nothing written
    assert "error: The accelerate config asks for DEEPSPEED" in log and "(exitcode: 2)" in log  # a usage
    # error from the script on each rank (the Traceback in the log is the launcher's own report)
    assert load_file(tmp_path / "ds" / "delora_weights.safetensors").keys() == again.keys()
