"""The Gradio app's service functions, without a browser: inputs, adapters, uploads, generation, concurrency."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_pipelines import load_pipeline, make_sd_pipeline, perturb_delora

from delora_diffusion import DeLoRAConfig, get_delora_scale, inject_delora
from delora_diffusion.app import (
    ADAPTER_SLOTS,
    DEFAULT_ADAPTERS_DIR,
    MAX_PROMPT_CHARS,
    SEED_RANGE,
    AppError,
    AppService,
    build_parser,
    clamp_number,
    format_adapter_info,
    make_request,
    parse_sweep_values,
)


def _save_adapter(model_dir: Path, out_dir: Path, seed: int, lambda_init: float = 2.0) -> Path:
    """A trained-looking adapter written the way users get one: ``pipe.save_delora_weights``."""
    pipe = load_pipeline(model_dir)
    inject_delora(pipe.unet, DeLoRAConfig(rank=2, lambda_init=lambda_init, target_modules="unet"))
    perturb_delora(pipe.unet, seed=seed, std=2.0)
    pipe.save_delora_weights(str(out_dir), training_args={"learning_rate": 1e-3, "rank": 2, "seed": seed})
    return out_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and on a shared 2-core machine far more predictably."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD model and an adapters dir laid out like the training script's output, plus decoys."""
    pytest.importorskip("delora_diffusion.pipeline", reason="needs the diffusers integration (issue 3)")
    from delora_diffusion.io import WEIGHT_NAME

    root = tmp_path_factory.mktemp("app")
    model = make_sd_pipeline(root / "model")
    adapters = root / "adapters"
    _save_adapter(model, adapters / "run1", seed=1)
    _save_adapter(model, adapters / "run1" / "checkpoint-2", seed=2)
    loose = _save_adapter(model, root / "loose", seed=3)
    shutil.copy(loose / WEIGHT_NAME, adapters / "loose.safetensors")
    # Decoys: not safetensors, other safetensors, hidden, too deep, and a symlink leaving the adapters dir.
    (adapters / "notes.txt").write_text("not an adapter")
    save_file({"w": torch.zeros(2)}, str(adapters / "run1" / "optimizer.safetensors"))
    shutil.copytree(loose, adapters / ".hidden")
    shutil.copytree(loose, adapters / "a" / "b" / "c")
    outside = root / "outside"
    shutil.copytree(loose, outside)
    os.symlink(outside, adapters / "escape")
    return {"root": root, "model": model, "adapters": adapters, "loose": loose}


@pytest.fixture(scope="module")
def service(tiny: dict[str, Path]) -> AppService:
    return AppService([str(tiny["model"])], adapters_dir=tiny["adapters"], device="cpu")


def _request(model: Path, scale: float, adapters=(("run1", 1.0),), seed: int = 7, **kw):
    args = {"steps": 2, "guidance": 3.0, "width": 32, "height": 32} | kw
    return make_request(str(model), list(adapters), scale, "a photo of sks dog", "", seed, False, **args)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------- inputs


def test_clamp_number_clamps_with_a_note_and_rejects_non_numbers() -> None:
    notes: list[str] = []
    assert clamp_number(3.5, (0.0, 2.0), "λ scale", notes) == 2.0
    assert clamp_number(-1, (0.0, 2.0), "λ scale", notes) == 0.0
    assert clamp_number("1.25", (0.0, 2.0), "λ scale", notes) == 1.25
    assert clamp_number(7.6, (1, 100), "Steps", notes, integer=True) == 8
    assert len(notes) == 3 and "outside [0.0, 2.0]" in notes[0] and "whole number" in notes[2]
    for bad in (math.nan, math.inf, "abc", None, True, [1]):
        with pytest.raises(AppError, match="must be a"):
            clamp_number(bad, (0.0, 2.0), "λ scale")


def test_make_request_clamps_out_of_range_values_and_says_so() -> None:
    req = make_request("m", [("a", 5.0)], 9.0, "p", "", -3, False, 0, 99.0, 5000, 37)
    assert (req.scale, req.seed, req.steps, req.guidance) == (2.0, 0, 1, 20.0)
    assert req.adapters == (("a", 2.0),)
    assert (req.width, req.height) == (1024, 32)  # 37 is rounded down to a multiple of 8
    text = " ".join(req.notes)
    for word in ("λ scale", "Seed", "Steps", "Guidance", "Width", "Height", "weight of 'a'"):
        assert word in text
    empty_slots = [("", 1.0)] * ADAPTER_SLOTS
    assert make_request("m", empty_slots, 1.0, "p").adapters == ()
    seeded = make_request("m", [], 1.0, "p", seed=5, randomize_seed=True)
    assert SEED_RANGE[0] <= seeded.seed <= SEED_RANGE[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "  "}, "Write a prompt"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "limit is"),
        ({"negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "negative prompt"),
        ({"adapters": [("a", 1.0), ("a", 0.5)]}, "selected twice"),
        ({"scale": math.nan}, "finite"),
        ({"model": ""}, "Choose a model"),
    ],
)
def test_make_request_rejects_unusable_inputs(kwargs: dict, message: str) -> None:
    args = {"model": "m", "adapters": [("a", 1.0)], "scale": 1.0, "prompt": "p"} | kwargs
    with pytest.raises(AppError, match=message):
        make_request(**args)


def test_parse_sweep_values() -> None:
    notes: list[str] = []
    assert parse_sweep_values("0, 0.5 1,3", notes) == [0.0, 0.5, 1.0, 2.0]
    assert notes and "Sweep λ" in notes[0]
    with pytest.raises(AppError, match="at most"):
        parse_sweep_values(",".join(["1"] * 10))
    with pytest.raises(AppError, match="must be a number"):
        parse_sweep_values("0, one")
    with pytest.raises(AppError, match="Give the λ values"):
        parse_sweep_values("")


# ------------------------------------------------------------------------------------- adapters and models


def test_lists_every_adapter_in_the_adapters_dir_and_nothing_else(service: AppService) -> None:
    from delora_diffusion.app import WEIGHT_NAME
    from delora_diffusion.io import WEIGHT_NAME as IO_WEIGHT_NAME

    assert WEIGHT_NAME == IO_WEIGHT_NAME
    assert service.list_adapters() == ["loose.safetensors", "run1", "run1/checkpoint-2"]


def test_adapters_dir_itself_is_listed_as_dot(tiny: dict[str, Path]) -> None:
    svc = AppService([str(tiny["model"])], adapters_dir=tiny["loose"])
    assert svc.list_adapters() == ["."]
    assert svc.resolve_adapter(".") == tiny["loose"].resolve()
    assert svc.adapter_label(".") == f"{tiny['loose'].name} (the adapters dir)"  # never a bare "." in the UI
    assert svc.adapter_label("run1/checkpoint-2") == "run1/checkpoint-2"
    assert AppService(["m"], adapters_dir=tiny["root"] / "missing").list_adapters() == []


@pytest.mark.parametrize(
    "name",
    [
        "../loose",
        "run1/../../loose",
        "/etc/passwd",
        "C:\\Windows",
        "~/.ssh/id_rsa",
        "escape",
        ".hidden",
        "a/b/c",
        "notes.txt",
        "run1/optimizer.safetensors",
        "run1/../run1",
        "",
        None,
    ],
)
def test_adapter_names_never_become_paths_outside_the_listing(service: AppService, name) -> None:
    with pytest.raises(AppError):
        service.resolve_adapter(name)


def test_listed_adapter_names_resolve_inside_the_adapters_dir(service: AppService, tiny) -> None:
    for name in service.list_adapters():
        assert service.resolve_adapter(name).is_relative_to(tiny["adapters"].resolve())


def test_models_are_the_given_ones_or_hub_ids(service: AppService, tiny) -> None:
    assert service.resolve_model(str(tiny["model"])) == str(tiny["model"])
    assert service.resolve_model("some-org/some-model") == "some-org/some-model"
    for bad in (str(tiny["adapters"]), "/etc", "../x/y", "tests/..", "a/b/c", "", "tests"):
        with pytest.raises(AppError):
            service.resolve_model(bad)
    with pytest.raises(AppError, match="--model"):
        AppService(["m"], allow_hub_models=False).resolve_model("org/name")


def test_upload_validation(tiny: dict[str, Path], tmp_path: Path) -> None:
    from delora_diffusion.io import WEIGHT_NAME

    svc = AppService([str(tiny["model"])], adapters_dir=tiny["adapters"], max_upload_bytes=10**7)
    good = tmp_path / "mine.safetensors"
    shutil.copy(tiny["loose"] / WEIGHT_NAME, good)
    wrong_suffix = tmp_path / "mine.bin"
    shutil.copy(good, wrong_suffix)
    with pytest.raises(AppError, match=r"\.safetensors"):
        svc.add_upload(wrong_suffix)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(AppError, match="not a valid DeLoRA adapter"):
        svc.add_upload(corrupt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="not a valid DeLoRA adapter"):
        svc.add_upload(junk)
    small = AppService([str(tiny["model"])], adapters_dir=tiny["adapters"], max_upload_bytes=100)
    with pytest.raises(AppError, match="limit is"):
        small.add_upload(good)
    name = svc.add_upload(good)
    assert name.startswith("upload:mine-") and name in svc.list_adapters()
    assert svc.resolve_adapter(name).parent == svc._upload_dir
    assert svc.add_upload(good) == name  # same bytes, same name
    assert "corrupt" not in " ".join(svc.list_adapters())
    # The uploaded adapter is usable, and it is the same adapter as the file it came from.
    a = svc.generate(_request(tiny["model"], 1.0, adapters=[(name, 1.0)]))
    b = svc.generate(_request(tiny["model"], 1.0, adapters=[("loose.safetensors", 1.0)]))
    assert np.array_equal(_pixels(a.adapted), _pixels(b.adapted))


# ------------------------------------------------------------------------------------- generation


def test_slider_moves_never_reload_the_model(service: AppService, tiny) -> None:
    model = str(tiny["model"])
    pipe = service.pipeline(model)
    loads = service.load_count
    real_load = service._load_pipeline
    service._load_pipeline = lambda m: pytest.fail(f"reloaded {m}")  # type: ignore[method-assign]
    try:
        for value in (0.0, 0.35, 1.0, 2.0, 1.5):
            assert service.set_scale(model, [("run1", 1.0)], value) == value
            assert get_delora_scale(pipe.unet) == pytest.approx(value)
            service.adapter_info(model, [("run1", 1.0)], value)
        assert service.set_scale(model, [("run1", 1.0)], 7) == 2.0  # clamped
    finally:
        service._load_pipeline = real_load  # type: ignore[method-assign]
    assert service.pipeline(model) is pipe
    assert service.load_count == loads


def test_base_and_adapted_share_the_seed_and_lambda_zero_is_the_base(service: AppService, tiny) -> None:
    zero = service.generate(_request(tiny["model"], 0.0))
    one = service.generate(_request(tiny["model"], 1.0))
    other_seed = service.generate(_request(tiny["model"], 1.0, seed=8))
    assert zero.base.size == (32, 32)
    assert np.array_equal(_pixels(zero.adapted), _pixels(zero.base))
    assert np.array_equal(_pixels(one.base), _pixels(zero.base))  # the base ignores λ
    assert np.abs(_pixels(one.adapted) - _pixels(one.base)).max() > 2
    assert not np.array_equal(_pixels(other_seed.base), _pixels(one.base))
    assert "Seed 7" in one.message
    no_adapter = service.generate(_request(tiny["model"], 1.0, adapters=()))
    assert np.array_equal(_pixels(no_adapter.adapted), _pixels(zero.base))
    assert "No adapter selected" in no_adapter.message


def test_two_adapters_with_weights_and_progress(service: AppService, tiny) -> None:
    seen: list[float] = []
    both = _request(tiny["model"], 1.0, adapters=[("run1", 1.0), ("loose.safetensors", 0.5)])
    result = service.generate(both, progress=lambda f, _d: seen.append(f))
    only = service.generate(_request(tiny["model"], 1.0))
    assert not np.array_equal(_pixels(result.adapted), _pixels(only.adapted))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) == 4
    muted = service.generate(
        _request(tiny["model"], 1.0, adapters=[("run1", 1.0), ("loose.safetensors", 0.0)])
    )
    assert np.array_equal(_pixels(muted.adapted), _pixels(only.adapted))


def test_lambda_sweep_grid(service: AppService, tiny) -> None:
    request = _request(tiny["model"], 1.0)
    grid, images = service.sweep(request, [0.0, 1.0, 2.0])
    assert grid.size == (3 * 48, 32 + 14) and len(images) == 3
    base = service.generate(request)
    assert np.array_equal(_pixels(images[0]), _pixels(base.base))
    assert np.array_equal(_pixels(images[1]), _pixels(base.adapted))
    assert get_delora_scale(service.pipeline(str(tiny["model"])).unet) == pytest.approx(1.0)  # restored
    with pytest.raises(AppError, match="Select an adapter"):
        service.sweep(_request(tiny["model"], 1.0, adapters=()), [0.0])


def test_info_panel_reports_rank_lambda_bound_and_norms_at_the_current_scale(
    service: AppService, tiny
) -> None:
    text = service.adapter_info(str(tiny["model"]), [("run1", 1.0)], 1.0)
    assert "rank: 2" in text and "λ per layer" in text and "bound" in text and "actual" in text
    assert "learning_rate: 0.001" in text and "seed: 1" in text
    zero = service.adapter_info(str(tiny["model"]), [("run1", 1.0)], 0.0)
    assert "actual ‖ΔW‖/‖W‖ now: min 0 · mean 0 · max 0" in zero
    assert service.adapter_info(str(tiny["model"]), [], 1.0) == "No adapter selected."


def test_format_adapter_info_shows_training_args_as_inert_text() -> None:
    rows = [
        {
            "layer": "down.attn.to_q",
            "component": "unet",
            "rank": 4,
            "lambda": 12.0,
            "relative_delta": 0.01,
            "relative_bound": 0.2,
        },
        {
            "layer": "up.attn.to_v",
            "component": "unet",
            "rank": 4,
            "lambda": 15.0,
            "relative_delta": 0.03,
            "relative_bound": 0.3,
        },
    ]
    meta = {"training_args": '{"learning_rate": 0.001, "rank": 4, "instance_prompt": "```<b>x</b>\\nsks"}'}
    text = format_adapter_info("run1", 1.0, 0.5, rows, meta)
    assert "rank: 4" in text and "min 12 · mean 13.5 · max 15" in text
    assert "learning_rate: 0.001" in text
    assert text.count("```") == 2  # the value's backticks cannot close the code block
    assert text.index("unet.up.attn.to_v") < text.index("unet.down.attn.to_q")  # largest update first
    assert "No training arguments" in format_adapter_info("x", 1.0, 1.0, rows, {})


# ------------------------------------------------------------------------------------- concurrency


def _race(service: AppService, model: Path, lock: bool) -> tuple:
    """A (λ = 0.5) is paused inside its adapted pass while B (λ = 2) tries to generate.

    Without serialization B would run right then and leave λ = 2 on the shared pipeline for A's next step.
    """
    a_paused, b_done = threading.Event(), threading.Event()
    steps_in_a = []

    def hook(step: int) -> None:
        if threading.current_thread().name == "user-a":
            steps_in_a.append(step)
            if len(steps_in_a) == 3:  # first step of A's adapted pass (the base pass has 2)
                a_paused.set()
                b_done.wait(timeout=1.0)

    results: dict[str, object] = {}

    def user(name: str, scale: float) -> None:
        if name == "user-b":
            assert a_paused.wait(timeout=30)
        results[name] = service.generate(_request(model, scale))
        if name == "user-b":
            b_done.set()

    real_lock = service._lock
    service.step_hook = hook
    if not lock:
        service._lock = contextlib.nullcontext()  # type: ignore[assignment]
    try:
        threads = [
            threading.Thread(target=user, args=a, name=a[0]) for a in (("user-a", 0.5), ("user-b", 2.0))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        service.step_hook = None
        service._lock = real_lock
    return results["user-a"], results["user-b"]


def test_concurrent_users_each_get_their_own_lambda(service: AppService, tiny) -> None:
    model = tiny["model"]
    expected = {s: _pixels(service.generate(_request(model, s)).adapted) for s in (0.5, 2.0)}
    assert not np.array_equal(expected[0.5], expected[2.0])
    a, b = _race(service, model, lock=True)
    assert np.array_equal(_pixels(a.adapted), expected[0.5])
    assert np.array_equal(_pixels(b.adapted), expected[2.0])
    # The same interleaving without the lock does mix λ up: the test above can tell.
    a, _ = _race(service, model, lock=False)
    assert not np.array_equal(_pixels(a.adapted), expected[0.5])
    assert np.array_equal(_pixels(service.generate(_request(model, 0.5)).adapted), expected[0.5])


# ------------------------------------------------------------------------------------- UI and CLI


def test_main_builds_the_ui_on_loopback_and_never_shares(tiny, monkeypatch) -> None:
    import gradio as gr

    from delora_diffusion import app

    args = build_parser().parse_args([])
    assert (args.host, args.port, Path(args.adapters_dir)) == ("127.0.0.1", 7860, DEFAULT_ADAPTERS_DIR)
    launched: dict = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, demo=self))
    app.main(["--model", str(tiny["model"]), "--adapters_dir", str(tiny["adapters"]), "--device", "cpu"])
    assert launched["share"] is False and launched["server_name"] == "127.0.0.1"
    assert launched["server_port"] == 7860
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    ids = {getattr(b, "elem_id", None) for b in launched["demo"].blocks.values()}
    wanted = {"model", "lambda-scale", "prompt", "negative", "seed", "randomize", "steps", "guidance"}
    wanted |= {
        "width",
        "height",
        "generate",
        "sweep",
        "base-image",
        "adapted-image",
        "adapter-info",
        "upload",
    }
    assert wanted | {f"adapter-{i}" for i in range(ADAPTER_SLOTS)} <= ids
    app.main(["--model", str(tiny["model"]), "--host", "0.0.0.0", "--port", "7999"])
    assert (launched["server_name"], launched["server_port"], launched["share"]) == ("0.0.0.0", 7999, False)


def test_the_default_model_is_the_embedded_one(tiny, monkeypatch) -> None:
    import gradio as gr

    from delora_diffusion import app, embedded

    launched: dict = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    monkeypatch.setattr(embedded, "default_model_path", lambda: tiny["root"] / "not-trained-yet")
    with pytest.raises(SystemExit, match="embedded model is missing"):
        app.main(["--adapters_dir", str(tiny["adapters"])])
    monkeypatch.setattr(embedded, "default_model_path", lambda: tiny["model"])
    built: list[AppService] = []
    monkeypatch.setattr(app, "build_ui", lambda service, **kw: built.append(service) or gr.Blocks())
    app.main(["--adapters_dir", str(tiny["adapters"])])
    assert built[0].models == [str(tiny["model"])] and launched["share"] is False


@pytest.mark.parametrize(
    "argv", [["--port", "0"], ["--port", "70000"], ["--max_upload_mb", "-1"], ["--device", "no-such-device"]]
)
def test_bad_flags_exit_with_a_message(argv: list[str], capsys) -> None:
    from delora_diffusion import app

    with pytest.raises(SystemExit) as exc:
        app.main([*argv, "--model", "unused"])
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err
