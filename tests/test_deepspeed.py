"""DeepSpeed ZeRO-1/2 through accelerate, on the CPU (gloo, DeepSpeed's CPU accelerator), two processes.

DeepSpeed is not in the dev extra (it builds only with ``DS_BUILD_OPS=0 pip install --no-build-isolation
deepspeed`` after torch), so this module is skipped where it is not installed. Each run trains a DeLoRA
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


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_matches_single_process(stage, tmp_path):
    (reference,) = _run(0, tmp_path)
    ranks = _run(stage, tmp_path)
    assert all(r.keys() == reference.keys() for r in ranks) and any("lambda" in k for k in reference)
    for key, want in reference.items():
        for got in ranks:
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want), rtol=1e-4, atol=2e-5)
