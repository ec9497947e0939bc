"""Everything a GPU must show for the fast path, in one command: speed, memory, fused inference, training runs.

On the GPU machine (H100/H200; under 8 minutes). It lacks diffusers, so fetch the pure-Python wheels here once
(network needed; they land in the git-ignored ``.whl``)::

    bash ../shared/tools/device-wheels.sh

then run, with the device tool, ``carry: [".whl"]``, ``timeout_s: 600`` and this command::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 benchmarks/device_suite.py --out $OUT

It writes ``device_suite.json`` (every number) and ``device_suite.log`` (the tables) into ``--out``
(default ``$OUT``, else ./device_suite_out), after every section. Sections, each timed and allowed to fail
alone, run in this order (the cheapest and most needed first, the compile and the SDXL-size pipeline last):

1. ``speed_eager``: training step and peak memory, SD1.5 layout (bf16, 512 px, batch 4) and SDXL layout
   (bf16, 1024 px, batch 2, gradient checkpointing), ours (paper, zero) vs PEFT LoRA vs PEFT DeLoRA,
   interleaved rounds (benchmarks/speed.py's ``train_benchmark``).
2. ``inference``: SD1.5 forward unfused / fused / base, and the time of a lambda change (unfused: a refold;
   fused: a re-merge of every layer).
3. ``train_sd15``: the real training script (accelerate launch, bf16, gradient checkpointing, 8-bit Adam when
   bitsandbytes imports) on a random-init SD1.5-size pipeline built from configs and saved with
   ``save_pretrained`` to a temporary folder.
4. ``speed_compiled``: section 1 on SD1.5 under ``torch.compile`` (``--compile-backend``, default inductor),
   our default init against PEFT LoRA, each also uncompiled in the same rounds (compiled / uncompiled).
5. ``train_sdxl``: section 3 on an SDXL-size pipeline (1024 px).

The device's time is scarce, so the suite keeps to ``--budget`` seconds (default 450 on a GPU, leaving a
600 s device call room for the wheels, imports and the transfers): a section still running at the budget's end
is stopped (its training subprocess killed with its children) and recorded as over the budget, and a section
with under 30 s left is skipped; both are named on the last line. Timed rounds stop early, after whole
rounds, once their share of what is left has passed.

``--smoke`` runs the same code paths on a CPU with tiny shapes (eager-backend compile, fp32 speed, bf16
training; the in-process sections on the fast path's accelerator settings, stacked fold and factor fold, which
a CPU does not take by default) in under 3 minutes and prints ``device suite ok`` last; a failed, stopped or skipped section prints
``device suite FAILED: ...`` instead and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests")]
import _common as C  # noqa: E402
import speed  # noqa: E402

# --- pipelines to train on --------------------------------------------------------------------------------------


def _clip_text(hidden: int, layers: int, heads: int, projection: bool = False) -> torch.nn.Module:
    """A random-init CLIP text encoder of real width and depth; the vocabulary is the tiny test tokenizer's."""
    import tiny_pipelines as tp
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=tp.CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=tp.MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def make_real_size_pipeline(family: str, path: Path, device: torch.device) -> Path:
    """SD1.5- or SDXL-size pipeline (UNet, VAE, text encoders at real sizes, random init), saved to `path` in
    bf16. Its modules are made on `device` (a GPU's random init takes no time; a CPU's takes tens of seconds
    for SDXL's 3.3 B parameters) and saved in the dtype the training run computes in (half the bytes to write
    and read back)."""
    import tiny_pipelines as tp
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    spec = C.sd15_spec() if family == "sd15" else C.sdxl_spec()
    with torch.device(device):
        unet = UNet2DConditionModel(**spec.unet).eval()
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        ).eval()
        text_encoder = _clip_text(768, 12, 12)
        text_encoder_2 = _clip_text(1280, 32, 20, projection=True) if family == "sdxl" else None
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tp.clip_tokenizer(),
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tp.clip_tokenizer(),
            tokenizer_2=tp.clip_tokenizer(),
            scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="leading"),
        )
    pipe.to("cpu", torch.bfloat16).save_pretrained(path, safe_serialization=True)
    del pipe, unet, vae, text_encoder, text_encoder_2
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the training subprocess needs the GPU memory the build held
    return path


def _instance_images(folder: Path, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def training_run(family: str, smoke: bool, work: Path, steps: int, device: torch.device) -> dict[str, Any]:
    """The real script through ``accelerate launch``: bf16, gradient checkpointing, 8-bit Adam if available."""
    import tiny_pipelines as tp
    from diffusers import DiffusionPipeline

    start = time.perf_counter()
    model = work / f"model-{family}"
    if smoke:  # saved in bf16 like the real-size ones
        fp32 = (tp.make_sd_pipeline if family == "sd15" else tp.make_sdxl_pipeline)(work / f"fp32-{family}")
        DiffusionPipeline.from_pretrained(fp32).to(torch.bfloat16).save_pretrained(model)
    else:
        make_real_size_pipeline(family, model, device)
    built_s = time.perf_counter() - start
    resolution = 32 if smoke else (512 if family == "sd15" else 1024)
    try:
        import bitsandbytes  # noqa: F401

        eight_bit = ["--use_8bit_adam"] if torch.cuda.is_available() else []
    except ImportError:
        eight_bit = []
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "bf16", "--dynamo_backend", "no"] + (["--cpu"] if smoke else [])
    args = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(work / f"out-{family}")]
    args += ["--instance_data_dir", str(_instance_images(work / f"images-{family}", resolution))]
    args += ["--instance_prompt", "a photo of sks dog", "--resolution", str(resolution), "--rank", "32"]
    args += ["--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "1e-3"]
    args += ["--gradient_checkpointing", "--seed", "0", "--report_to", "none", "--mixed_precision", "bf16"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [*launch, str(ROOT / "train_scripts" / "dreambooth_delora.py"), *args, *eight_bit]
    run_start = time.perf_counter()
    returncode, stdout, stderr = _run_killable(command, env)
    losses = [float(x) for x in re.findall(r"loss=([0-9.eE+-]+)", stderr + stdout)]
    if returncode != 0:
        raise RuntimeError(f"training script exit {returncode}:\n{stderr[-4000:]}")
    saved = work / f"out-{family}" / "delora_weights.safetensors"
    if not saved.exists():
        raise RuntimeError(f"no adapter saved at {saved}")
    return {
        "steps": steps,
        "resolution": resolution,
        "eight_bit_adam": bool(eight_bit),
        "build_s": built_s,
        "run_s": time.perf_counter() - run_start,
        "losses_shown": losses[-3:],
        "adapter_mib": saved.stat().st_size / 2**20,
    }


def _run_killable(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run `command` in a process group of its own, and kill the whole group if we are interrupted (the
    suite's time budget): ``accelerate launch`` runs the script as a child, which would otherwise go on
    holding the GPU."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        raise
    return proc.returncode, stdout, stderr


# --- the runner ---------------------------------------------------------------------------------------------------

MIN_SECTION_S = 30.0  # a section with less time than this left is skipped: none shows anything sooner


class OverBudget(BaseException):
    """Raised in a running section when the suite's time budget ends. A BaseException, so that the
    ``except Exception`` fallbacks inside torch.compile and the libraries do not swallow it."""


class Suite:
    """Runs named sections, keeps going after a failure, and writes the JSON and the log as it goes. With a
    `budget` (seconds), a section running at its end is stopped (``OverBudget``) and one that would start with
    under ``MIN_SECTION_S`` left is skipped."""

    def __init__(self, out: Path, budget: float | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.results, self.failed, self.skipped = out, {"sections": {}}, [], []
        self.log_file = (out / "device_suite.log").open("w")
        self.deadline = None if budget is None else time.perf_counter() + budget

    def remaining(self) -> float | None:
        """Seconds left of the budget (None: no budget)."""
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def share(self, fraction: float, cap: float) -> float | None:
        """A time budget for a section's timed rounds: `fraction` of what is left, at most `cap` seconds."""
        left = self.remaining()
        return None if left is None else max(0.0, min(cap, fraction * left))

    def log(self, text: str) -> None:
        print(text, flush=True)
        self.log_file.write(text + "\n")
        self.log_file.flush()

    def section(self, name: str, fn: Callable[[], Any], render: Callable[[Any], str] | None = None) -> None:
        self.log(f"\n== {name}")
        left = self.remaining()
        if left is not None and left < MIN_SECTION_S:
            self.log(f"skipped: {max(left, 0.0):.0f} s left of the time budget (--budget)")
            self.skipped.append(name)
            self.results["sections"][name] = {"ok": False, "skipped": True, "seconds": 0.0}
            self._write()
            return
        start = time.perf_counter()
        try:
            value = _within(left, fn)
            entry = {"ok": True, "seconds": time.perf_counter() - start, "result": value}
            self.log(render(value) if render else json.dumps(value, indent=1, default=str))
        except (Exception, OverBudget) as error:  # noqa: BLE001 - one failed section must not hide the others
            entry = {"ok": False, "seconds": time.perf_counter() - start, "error": repr(error)}
            entry["over_budget"] = isinstance(error, OverBudget)
            self.log(traceback.format_exc())
            self.failed.append(name)
        self.log(f"({name}: {entry['seconds']:.1f} s)")
        self.results["sections"][name] = entry
        self._write()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _write(self) -> None:
        (self.out / "device_suite.json").write_text(json.dumps(self.results, indent=1, default=str))

    def summary(self) -> str:
        """The last line: ``device suite ok`` only when every section ran and passed."""
        if not (self.failed or self.skipped):
            return "device suite ok"
        parts = [f"failed or stopped: {', '.join(self.failed)}"] if self.failed else []
        parts += [f"skipped for time: {', '.join(self.skipped)}"] if self.skipped else []
        return "device suite FAILED: " + "; ".join(parts)


def _within(seconds: float | None, fn: Callable[[], Any]) -> Any:
    """fn(), interrupted by ``OverBudget`` after `seconds` (SIGALRM: the suite runs in the main thread)."""
    if seconds is None:
        return fn()

    def on_alarm(signum: int, frame: Any) -> None:
        raise OverBudget(f"stopped at the end of the suite's time budget ({seconds:.0f} s were left)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 5.0)  # and again every 5 s, should one be swallowed anyway
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, same code paths, < 3 minutes")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else ./device_suite_out")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (GPU default 10)")
    parser.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, eager in --smoke")
    parser.add_argument(
        "--train-steps", type=int, default=None, help="training-script steps (GPU default 20)"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], help="section names to skip (speed_eager, speed_compiled, ...)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole suite (GPU default 450; none in --smoke)",
    )
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        parser.error("--budget must be a positive number of seconds")

    out = args.out or Path(os.environ.get("OUT") or "device_suite_out")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        specs = [C.smoke_spec()]
        rounds, warmup, backend, steps = (
            args.rounds or 2,
            1,
            args.compile_backend or "eager",
            args.train_steps or 2,
        )
    else:
        specs = [C.sd15_spec(), C.sdxl_spec()]
        rounds, warmup, steps = args.rounds or 10, 3, args.train_steps or 20
        backend = args.compile_backend or "inductor"
    budget = args.budget if args.budget is not None or args.smoke else 450.0
    suite = Suite(out, budget)
    suite.results["environment"] = _environment(device)
    suite.results["command"] = " ".join(["python", "benchmarks/device_suite.py", *(argv or sys.argv[1:])])
    suite.log(json.dumps(suite.results["environment"]))
    # ours without the factor fold too: what the fold buys on this device (tests/test_fold_factors.py counts
    # the kernels; only a device can time them)
    variants = [*C.VARIANTS, "ours-paper-per-layer"]

    def speed_eager() -> list[dict[str, Any]]:
        rows = []
        for i, spec in enumerate(specs):  # timed rounds: a share of what is left for each layout
            rows += speed.train_benchmark(
                spec, device, variants, rounds, warmup, suite.share(0.2 / (2 - i), 90)
            )
        return rows

    from delora_diffusion.fastpath import fastpath_options

    # On a GPU the fast path's defaults are already these; the smoke takes them on the CPU too.
    accelerator_path = (
        fastpath_options(stack_fold=True, fold_factors=True) if args.smoke else contextlib.nullcontext()
    )
    with tempfile.TemporaryDirectory() as tmp, accelerator_path:

        def train(family: str) -> dict[str, Any]:
            return training_run(family, args.smoke, Path(tmp), steps, device)

        sections: list[tuple[str, Callable[[], Any], Callable[[Any], str] | None]] = [
            ("speed_eager", speed_eager, speed.markdown_train),
            (
                "inference",
                lambda: speed.inference_benchmark(specs[0], device, rounds, warmup, suite.share(0.1, 30)),
                speed.markdown_inference,
            ),
            ("train_sd15", lambda: train("sd15"), None),
            (
                "speed_compiled",
                lambda: speed.train_benchmark(
                    specs[0],
                    device,
                    [speed.DEFAULT_VARIANT, "peft-lora"],
                    rounds,
                    warmup,
                    suite.share(0.2, 60),
                    backend,
                    True,
                ),
                speed.markdown_train,
            ),
            ("train_sdxl", lambda: train("sdxl"), None),
        ]
        for name, fn, render in sections:
            if name not in args.skip:
                suite.section(name, fn, render)
    suite.results["failed"], suite.results["skipped"] = suite.failed, suite.skipped
    suite._write()
    suite.log("\n" + suite.summary())
    return 1 if suite.failed or suite.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
