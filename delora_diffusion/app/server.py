"""``delora-diffusion app`` / ``python app/app.py``: flags, the server's guards, and a clean exit.

- Bound to loopback unless ``--host`` says otherwise; never shared publicly.
- A state-changing request (POST, PUT, PATCH, DELETE) whose ``Origin`` is not the app's own host is refused
  with 403 before Gradio sees it. Gradio's own CORS layer only withholds response headers, so without this a
  page on any site could post uploads and generations to a local app (the browser sends them; it only hides
  the answer).
- Everything the app writes (uploads, Gradio's cache) lives under one temp dir, removed at exit, SIGTERM
  included; uploads are deleted as soon as they are loaded or rejected.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .inputs import DEFAULT_MAX_WORK, GUIDANCE_RANGE, STEPS_RANGE, AppError, clamp_number
from .service import DEFAULT_ADAPTERS_DIR, DEFAULT_MAX_UPLOAD_MB, AppService
from .ui import CSS, build_ui, disable_telemetry

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class SameOriginOnly:
    """ASGI middleware: refuse state-changing requests from another origin (CSRF from any web page).

    A request without an ``Origin`` header (curl, scripts, the Python client) is not a browser acting for some
    other page, and passes. `allowed` adds origins (``https://host[:port]``), e.g. a reverse proxy's. With
    `loopback_only` (the app bound to loopback), a request whose Host is not a loopback name is refused too:
    that is a page on another site reaching the app through DNS rebinding.
    """

    def __init__(self, app: Any, allowed: Sequence[str] = (), loopback_only: bool = False) -> None:
        self.app = app
        self.allowed = {_netloc(o) for o in allowed}
        self.loopback_only = loopback_only

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # Gradio serves over HTTP (SSE); lifespan and the like pass
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.loopback_only and _hostname(headers.get("host", "")) not in LOOPBACK_NAMES:
            await _refuse(send, "This app answers only on its loopback address.")
            return
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None:
                netloc = _netloc(origin)
                if not netloc or (netloc != headers.get("host", "").lower() and netloc not in self.allowed):
                    await _refuse(send, f"Cross-origin request refused (Origin {origin[:100]!r}).")
                    return
        await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


def _netloc(origin: str) -> str:
    try:
        return urlsplit(origin.strip()).netloc.lower()
    except ValueError:
        return ""


async def _refuse(send: Any, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_parser() -> argparse.ArgumentParser:
    """The app's flags (also used by ``delora-diffusion app``)."""
    parser = argparse.ArgumentParser(
        prog="delora-diffusion app",
        description="Gradio UI: generate with DeLoRA adapters, a λ slider, base vs adapted, λ sweeps.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="Model dir or hub id; repeat for several (default: embedded).",
    )
    parser.add_argument(
        "--adapters_dir",
        default=str(DEFAULT_ADAPTERS_DIR),
        help=f"Adapters are listed from here (default: {DEFAULT_ADAPTERS_DIR}, the training script's output).",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda, else mps, else cpu).")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    parser.add_argument("--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument(
        "--max_work",
        type=float,
        default=DEFAULT_MAX_WORK,
        help="Most pixel-steps one request may cost: width × height × steps × images, summed over a sweep "
        f"(default {DEFAULT_MAX_WORK:,} = 512² × 100).",
    )
    parser.add_argument("--steps", type=int, default=20, help="Default number of steps in the UI.")
    parser.add_argument("--guidance", type=float, default=7.5, help="Default guidance scale in the UI.")
    parser.add_argument(
        "--allow_hub_models",
        action="store_true",
        help="Let the model box load any hub id a client types (off: only the --model ones).",
    )
    # Hub models used to be on by default, with this flag to turn them off; it is still accepted.
    parser.add_argument("--no_hub_models", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--allowed_origin",
        action="append",
        default=[],
        help="Another origin allowed to post (e.g. https://proxy.example:443 in front of the app); repeatable.",
    )
    return parser


def default_device() -> str:
    """cuda, else mps, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Exit with a usage error for a bad flag; returns the torch device to use."""
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}.")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        parser.error(f"--max_upload_mb must be a positive number, got {args.max_upload_mb}.")
    if not (math.isfinite(args.max_work) and args.max_work >= 1):
        parser.error(f"--max_work must be a positive number of pixel-steps, got {args.max_work}.")
    device = args.device or default_device()
    try:
        import torch

        torch.device(device)
    except (RuntimeError, ValueError) as err:
        parser.error(f"--device {device!r} is not a torch device: {err}")
    return device


def _models(args: argparse.Namespace) -> list[str]:
    if args.model:
        return list(args.model)
    from ..embedded import default_model_path

    path = default_model_path()
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"The embedded model is missing at {path}; pass --model DIR_OR_HUB_ID.")
    return [str(path)]


@contextmanager
def app_temp_dir() -> Iterator[Path]:
    """One temp dir for everything the app writes (uploads, and Gradio's cache through GRADIO_TEMP_DIR),
    removed at exit; SIGTERM (a plain ``kill``) is turned into a clean shutdown so the removal runs."""
    work = Path(tempfile.mkdtemp(prefix="delora-app-"))
    old_env = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # Gradio's launch() closes the server on it and returns

    try:
        old_handler = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: no signal handlers there
        old_handler = None
    try:
        yield work
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if old_env is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old_env
        shutil.rmtree(work, ignore_errors=True)


def launch_options(service: AppService, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``Blocks.launch``: never shared, the upload limit, the origin guard."""
    from starlette.middleware import Middleware

    loopback = args.host in LOOPBACK_NAMES or args.host.startswith("127.")
    return {
        "server_name": args.host,
        "server_port": args.port,
        "share": False,
        "max_file_size": service.max_upload_bytes,
        "show_error": True,
        "footer_links": [],
        "css": CSS,
        "app_kwargs": {
            "middleware": [Middleware(SameOriginOnly, allowed=args.allowed_origin, loopback_only=loopback)]
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Start the app on --host:--port (loopback by default). It is never shared publicly."""
    disable_telemetry()
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _check_args(parser, args)
    models = _models(args)
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    with app_temp_dir() as work:
        service = AppService(
            models,
            adapters_dir=args.adapters_dir,
            device=device,
            dtype=dtype,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            allow_hub_models=args.allow_hub_models and not args.no_hub_models,
            max_work=int(args.max_work),
            upload_dir=work / "uploads",
        )
        try:
            service.pipeline(service.models[0])  # load before serving, so the first request is quick
        except AppError as err:
            raise SystemExit(str(err)) from None
        print(
            f"Adapters dir: {service.adapters_dir} ({len(service.list_adapters())} adapters found)",
            flush=True,
        )
        for name, reason in sorted(service.unreadable.items()):
            print(f"  skipped unreadable entry {name!r}: {reason}", flush=True)
        demo = build_ui(
            service,
            default_steps=int(clamp_number(args.steps, STEPS_RANGE, "steps", integer=True)),
            default_guidance=float(clamp_number(args.guidance, GUIDANCE_RANGE, "guidance")),
        )
        demo.queue(default_concurrency_limit=1)
        try:
            demo.launch(**launch_options(service, args))
        finally:
            service.close()
