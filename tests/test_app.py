"""The Gradio app's service functions, without a browser: inputs, adapters, uploads, generation, concurrency."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import struct
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace
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
    DEFAULT_MAX_WORK,
    MAX_PROMPT_CHARS,
    SEED_RANGE,
    AppError,
    AppService,
    build_parser,
    clamp_number,
    format_adapter_info,
    make_request,
    parse_sweep_values,
    server,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def _save_adapter(model_dir: Path, out_dir: Path, seed: int, lambda_init: float = 2.0) -> Path:
    """A trained-looking adapter written the way users get one: ``pipe.save_delora_weights``."""
    pipe = load_pipeline(model_dir)
    inject_delora(pipe.unet, DeLoRAConfig(rank=2, lambda_init=lambda_init, target_modules="unet"))
    perturb_delora(pipe.unet, seed=seed, std=2.0)
    pipe.save_delora_weights(str(out_dir), training_args={"learning_rate": 1e-3, "rank": 2, "seed": seed})
    return out_dir


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
    assert service.list_adapters() == ["loose.safetensors", "run1", "run1/checkpoint-2"]
    assert service.unreadable == {}


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


def test_models_are_the_given_ones_or_hub_ids(tiny) -> None:
    svc = AppService([str(tiny["model"])], adapters_dir=tiny["adapters"], allow_hub_models=True)
    assert svc.resolve_model(str(tiny["model"])) == str(tiny["model"])
    assert svc.resolve_model("some-org/some-model") == "some-org/some-model"
    for bad in (str(tiny["adapters"]), "/etc", "../x/y", "tests/..", "a/b/c", "", "tests"):
        with pytest.raises(AppError):
            svc.resolve_model(bad)
    with pytest.raises(AppError, match="--model"):
        AppService(["m"]).resolve_model("/etc")


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


def _count_calls(monkeypatch: pytest.MonkeyPatch, obj, names: tuple[str, ...]) -> Counter:
    """Count calls of `obj`'s methods `names` by wrapping them on the instance (the real method still runs)."""
    counts: Counter = Counter()
    for name in names:
        real = getattr(obj, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)
    return counts


PIPE_CALLS = ("set_delora_scale", "set_delora_adapters", "enable_delora", "disable_delora", "delora_report")


def test_slider_moves_never_reload_the_model(service: AppService, tiny, monkeypatch) -> None:
    model = str(tiny["model"])
    pipe = service.pipeline(model)
    monkeypatch.setattr(service, "_load_pipeline", lambda m: pytest.fail(f"reloaded {m}"))
    for value in (0.0, 0.35, 1.0, 2.0, 1.5):
        assert service.set_scale(model, [("run1", 1.0)], value) == value
        assert get_delora_scale(pipe.unet) == pytest.approx(value)
        service.adapter_info(model, [("run1", 1.0)], value)
    assert service.set_scale(model, [("run1", 1.0)], 7) == 2.0  # clamped
    assert service.pipeline(model) is pipe


def _ui_handler(demo, component, event: str = "change"):
    """The function the built UI runs for `event` on `component` (what a browser event triggers)."""
    fns = [f.fn for f in demo.fns.values() if (component._id, event) in f.targets]
    assert len(fns) == 1
    return fns[0]


def test_a_slider_move_is_one_set_delora_scale_call_and_the_report_is_taken_once_per_load(
    service: AppService, tiny, monkeypatch
) -> None:
    from delora_diffusion.app import build_ui

    model = str(tiny["model"])
    service.rescan()  # nothing loaded: the next selection loads run1 again
    pipe = service.pipeline(model)
    counts = _count_calls(monkeypatch, pipe, (*PIPE_CALLS, "load_delora_weights"))
    demo = build_ui(service)
    slider = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lambda-scale")
    on_slider = _ui_handler(demo, slider)
    slots = ["run1", 1.0] + ["", 1.0] * (ADAPTER_SLOTS - 1)
    service.adapter_info(model, [("run1", 1.0)], 1.0)  # the info panel loads the adapter and takes its report
    assert counts["load_delora_weights"] == 1 and counts["delora_report"] == 1
    service.generate(_request(tiny["model"], 1.0))
    counts.clear()
    for i, value in enumerate((0.0, 0.35, 2.0, 1.5, 0.7), start=1):
        text = on_slider(model, value, *slots)
        assert f"λ scale {value:g}" in text
        assert get_delora_scale(pipe.unet) == pytest.approx(value)
        assert counts == Counter({"set_delora_scale": i}), "a slider move is exactly one set_delora_scale"
    # Generating and changing weights never takes the report again; only a new load does.
    service.generate(_request(tiny["model"], 0.7, adapters=[("run1", 0.5)]))
    service.adapter_info(model, [("run1", 0.5)], 1.2)
    assert counts["delora_report"] == 0 and counts["load_delora_weights"] == 0
    service.rescan()
    service.adapter_info(model, [("run1", 1.0)], 1.0)
    assert counts["delora_report"] == 1 and counts["load_delora_weights"] == 1


def test_a_slider_move_never_waits_for_a_running_generation(service: AppService, tiny, monkeypatch) -> None:
    """Every generation sets its own λ under the lock, so a move made meanwhile need not queue behind it."""
    model = str(tiny["model"])
    service.generate(_request(tiny["model"], 1.0))
    counts = _count_calls(monkeypatch, service.pipeline(model), PIPE_CALLS)
    held, release = threading.Event(), threading.Event()

    def generation() -> None:
        with service._lock:
            held.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=generation)
    thread.start()
    try:
        assert held.wait(timeout=30)
        assert service.set_scale(model, [("run1", 1.0)], 0.25) == 0.25  # returns at once
        assert counts == Counter()
    finally:
        release.set()
        thread.join(timeout=30)
    result = service.generate(_request(tiny["model"], 0.25))
    assert "λ scale 0.25" in result.message and counts["set_delora_scale"] == 1


@pytest.mark.parametrize(("weight", "scale"), [(1.0, 1.0), (0.5, 1.5), (2.0, 0.3)])
def test_the_cached_report_is_the_live_report_at_any_weight_and_scale(
    service: AppService, tiny, weight: float, scale: float
) -> None:
    from delora_diffusion.app.info import scaled_rows

    model = str(tiny["model"])
    service.select(model, [("run1", weight)], scale)
    pipe = service.pipeline(model)
    key = service._loaded[model]["run1"]
    live = {r["layer"]: r for r in pipe.delora_report(key)}
    cached = {r["layer"]: r for r in scaled_rows(service._info[(model, "run1")], weight * scale)}
    assert live.keys() == cached.keys() and live
    for layer, row in live.items():
        for column in ("relative_delta", "relative_bound", "delta_norm", "bound", "lambda"):
            assert cached[layer][column] == pytest.approx(row[column], rel=1e-5, abs=1e-9), (layer, column)


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


def test_every_image_carries_a1111_parameters_read_back_from_the_png(
    service: AppService, tiny, tmp_path
) -> None:
    from gradio.processing_utils import encode_pil_to_bytes
    from PIL import Image

    from delora_diffusion.app.outputs import sampler_name, save_png

    request = make_request(
        str(tiny["model"]),
        [("run1", 1.0), (".", 0.5)],
        0.5,
        "a photo of sks dog",
        "blurry",
        7,
        False,
        2,
        3.0,
        32,
        32,
    )
    dot = AppService([str(tiny["model"])], adapters_dir=tiny["loose"], device="cpu")
    with pytest.raises(AppError):  # '.' is not listed in the shared adapters dir
        service.generate(request)
    request = replace(request, adapters=(("run1", 1.0),))
    result = service.generate(request)
    sampler = sampler_name(service.pipeline(str(tiny["model"])).scheduler)
    head = (
        f"a photo of sks dog\nNegative prompt: blurry\nSteps: 2, Sampler: {sampler}, CFG scale: 3, Seed: 7, "
    )
    head += "Size: 32x32, Model: model"
    saved = save_png(result.adapted, tmp_path / "adapted.png")
    assert Image.open(saved).text["parameters"] == head + ", DeLoRA: run1:1 (λ scale 0.5)"
    assert Image.open(save_png(result.base, tmp_path / "base.png")).text["parameters"] == head
    served = tmp_path / "served.png"  # what Gradio sends to the browser and offers for download
    served.write_bytes(encode_pil_to_bytes(result.adapted, "png"))
    assert Image.open(served).text["parameters"] == head + ", DeLoRA: run1:1 (λ scale 0.5)"
    # The adapters dir itself ('.') by its folder name, never an absolute path.
    one = dot.generate(replace(request, adapters=((".", 1.0),), negative_prompt=""))
    text = Image.open(save_png(one.adapted, tmp_path / "dot.png")).text["parameters"]
    assert text.endswith("Model: model, DeLoRA: loose:1 (λ scale 0.5)") and "Negative prompt" not in text
    assert str(tiny["root"]) not in text
    dot.close()
    grid, images = service.sweep(request, [0.0, 2.0])
    assert [im.info["parameters"].split("DeLoRA: ")[1] for im in images] == [
        "run1:1 (λ scale 0)",
        "run1:1 (λ scale 2)",
    ]
    assert grid.info["parameters"].endswith('DeLoRA: run1:1 (λ scale 0.5), λ sweep: "0, 2"')


def test_the_sampler_is_chosen_per_request_on_the_cached_pipeline(service: AppService, tiny) -> None:
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from delora_diffusion.app.schedulers import SCHEDULERS, use_scheduler

    pipe = service.pipeline(str(tiny["model"]))
    own = pipe.scheduler
    default = service.generate(_request(tiny["model"], 1.0))
    euler_a = service.generate(_request(tiny["model"], 1.0, scheduler="Euler a"))
    assert (
        service.pipeline(str(tiny["model"])) is pipe
        and type(pipe.scheduler).__name__ == SCHEDULERS["Euler a"][0]
    )
    assert "Sampler: Euler a," in euler_a.adapted.info["parameters"]
    assert not np.array_equal(_pixels(euler_a.adapted), _pixels(default.adapted))
    built = pipe.scheduler
    service.generate(_request(tiny["model"], 1.0, scheduler="DPM++ 2M Karras"))
    assert pipe.scheduler.config.use_karras_sigmas
    again = service.generate(_request(tiny["model"], 1.0, scheduler="Euler a"))
    assert pipe.scheduler is built and np.array_equal(_pixels(again.adapted), _pixels(euler_a.adapted))
    back = service.generate(_request(tiny["model"], 1.0, scheduler=""))
    assert pipe.scheduler is own and np.array_equal(_pixels(back.adapted), _pixels(default.adapted))
    _, images = service.sweep(_request(tiny["model"], 1.0, scheduler="Euler a"), [1.0])
    assert np.array_equal(_pixels(images[0]), _pixels(euler_a.adapted)) and pipe.scheduler is built
    with pytest.raises(AppError, match="Unknown sampler"):
        _request(tiny["model"], 1.0, scheduler="../../etc")
    flow = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(AppError, match="only runs its own sampler"):
        use_scheduler(flow, "DDIM", {})


def test_several_images_per_click_fill_a_bounded_history_with_downloadable_pngs(
    service: AppService, tiny, tmp_path
) -> None:
    import gradio as gr
    from PIL import Image

    from delora_diffusion.app.inputs import HISTORY_LENGTH, IMAGES_RANGE
    from delora_diffusion.app.outputs import generate_batch, push_history
    from delora_diffusion.app.ui import _Handlers

    assert _request(tiny["model"], 1.0, count=99).count == IMAGES_RANGE[1]
    results = generate_batch(service, _request(tiny["model"], 1.0, count=2))
    assert [r.request.seed for r in results] == [7, 8]
    assert np.array_equal(
        _pixels(results[1].adapted), _pixels(service.generate(_request(tiny["model"], 1.0, seed=8)).adapted)
    )
    small = AppService([str(tiny["model"])], adapters_dir=tiny["adapters"], max_work=32 * 32 * 2 * 2)
    with pytest.raises(AppError, match=r"3-image click needs .* 3 image\(s\)"):  # every image counts
        generate_batch(small, _request(tiny["model"], 1.0, adapters=(), count=3))
    small.close()
    assert push_history(list(range(HISTORY_LENGTH)), ["a", "b"]) == ["a", "b", *range(HISTORY_LENGTH - 2)]
    # The UI handler: the first pair in the image boxes, every adapted image in the gallery, PNGs with parameters.
    values = [str(tiny["model"]), 1.0, "a photo of sks dog", "", 7, False, 2, 3.0, 32, 32, "", 2]
    values += ["run1", 1.0] + ["", 1.0] * (ADAPTER_SLOTS - 1)
    out = _Handlers(gr, service).generate(*values, [("old", "x")], progress=lambda f, desc: None)
    history = out[-1]
    assert out[2] == 7 and out[3].startswith("2 images, seeds 7 to 8.") and len(history) == 3
    assert [caption for _, caption in history] == ["seed 7, λ scale 1", "seed 8, λ scale 1", "x"]
    shown = gr.Gallery(format="png").postprocess(history[:2])
    texts = [Image.open(item.image.path).text["parameters"] for item in shown.root]
    assert "Seed: 7," in texts[0] and "Seed: 8," in texts[1] and "DeLoRA: run1:1" in texts[1]


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
    unet = service.pipeline(str(model)).unet
    real_forward = unet.forward

    def forward(*args, **kwargs):  # observes the steps from outside: the service has no test hooks
        out = real_forward(*args, **kwargs)
        if threading.current_thread().name == "user-a":
            steps_in_a.append(1)
            if len(steps_in_a) == 3:  # first step of A's adapted pass (the base pass has 2)
                a_paused.set()
                b_done.wait(timeout=1.0)
        return out

    results: dict[str, object] = {}

    def user(name: str, scale: float) -> None:
        if name == "user-b":
            assert a_paused.wait(timeout=30)
        results[name] = service.generate(_request(model, scale))
        if name == "user-b":
            b_done.set()

    real_lock = service._lock
    unet.forward = forward
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
        del unet.forward
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


def _fake_launch(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace Blocks.launch: record its arguments (and what exists while it runs) instead of serving."""
    import gradio as gr

    launched: dict = {}

    def launch(self, **kw):
        launched.update(kw, demo=self, gradio_temp_dir=os.environ.get("GRADIO_TEMP_DIR"))

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    return launched


def test_main_builds_the_ui_on_loopback_and_never_shares(tiny, monkeypatch) -> None:
    from delora_diffusion import app

    args = build_parser().parse_args([])
    assert (args.host, args.port, Path(args.adapters_dir)) == ("127.0.0.1", 7860, DEFAULT_ADAPTERS_DIR)
    launched = _fake_launch(monkeypatch)
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
        "adapter-problems",
    }
    assert wanted | {f"adapter-{i}" for i in range(ADAPTER_SLOTS)} <= ids
    app.main(["--model", str(tiny["model"]), "--host", "0.0.0.0", "--port", "7999"])
    assert (launched["server_name"], launched["server_port"], launched["share"]) == ("0.0.0.0", 7999, False)


def test_the_default_model_is_the_embedded_one(tiny, monkeypatch) -> None:
    import gradio as gr

    from delora_diffusion import app, embedded

    launched = _fake_launch(monkeypatch)
    monkeypatch.setattr(embedded, "default_model_path", lambda: tiny["root"] / "not-trained-yet")
    with pytest.raises(SystemExit, match="embedded model is missing"):
        app.main(["--adapters_dir", str(tiny["adapters"])])
    monkeypatch.setattr(embedded, "default_model_path", lambda: tiny["model"])
    built: list[AppService] = []
    monkeypatch.setattr(server, "build_ui", lambda service, **kw: built.append(service) or gr.Blocks())
    app.main(["--adapters_dir", str(tiny["adapters"])])
    assert built[0].models == [str(tiny["model"])] and launched["share"] is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "0"],
        ["--port", "70000"],
        ["--max_upload_mb", "-1"],
        ["--device", "no-such-device"],
        ["--max_work", "0"],
        ["--max_work", "nan"],
    ],
)
def test_bad_flags_exit_with_a_message(argv: list[str], capsys) -> None:
    from delora_diffusion import app

    with pytest.raises(SystemExit) as exc:
        app.main([*argv, "--model", "unused"])
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_cli_app_subcommand_reaches_the_app(monkeypatch) -> None:
    from delora_diffusion import cli

    seen: list = []
    monkeypatch.setattr(server, "main", lambda argv: seen.append(argv))
    assert cli.main(["app", "--port", "7001"]) == 0
    assert seen == [["--port", "7001"]]


# ------------------------------------------------------------------------------------- bad entries (issue 13.2)


def _bad_adapters_dir(tiny: dict[str, Path], tmp_path: Path) -> Path:
    """A good adapter next to: a 31-byte file whose metadata is a JSON list, a symlink loop, a corrupt
    delora_weights.safetensors, an unreadable folder, and an unreadable file (made unreadable below)."""
    from delora_diffusion.io import WEIGHT_NAME

    root = tmp_path / "adapters"
    shutil.copytree(tiny["adapters"] / "run1", root / "good", ignore=shutil.ignore_patterns("checkpoint-*"))
    header = b'{"__metadata__": ["x"]}'
    (root / "meta-list.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert (root / "meta-list.safetensors").stat().st_size == 31
    os.symlink("loop", root / "loop")
    os.symlink(root / "loop2.safetensors", root / "loop2.safetensors")
    (root / "broken").mkdir()
    (root / "broken" / WEIGHT_NAME).write_bytes(b"\x00" * 7)
    locked = root / "locked.safetensors"
    shutil.copy(tiny["loose"] / WEIGHT_NAME, locked)
    return root


@pytest.fixture
def bad_dir(tiny, tmp_path: Path, monkeypatch) -> Path:
    """`_bad_adapters_dir`, with ``locked.safetensors`` unreadable even for root (whose reads chmod cannot
    stop): opening it fails with the PermissionError a real unreadable file gives."""
    import builtins
    import io

    root = _bad_adapters_dir(tiny, tmp_path)
    (root / "locked.safetensors").chmod(0)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "locked.safetensors":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)  # what pathlib.Path.open calls
    yield root
    (root / "locked.safetensors").chmod(0o644)


def test_one_bad_entry_never_breaks_listing_rescan_or_generate(tiny, bad_dir: Path) -> None:
    svc = AppService([str(tiny["model"])], adapters_dir=bad_dir)
    assert svc.list_adapters() == ["good"]
    bad = svc.unreadable
    assert set(bad) == {"meta-list.safetensors", "loop", "loop2.safetensors", "broken", "locked.safetensors"}
    assert "__metadata__" in bad["meta-list.safetensors"]
    assert bad["loop"] == "symlink loop" and bad["loop2.safetensors"] == "symlink loop"
    assert "Permission denied" in bad["locked.safetensors"]
    assert "truncated" in bad["broken"]
    assert not any(str(bad_dir) in reason for reason in bad.values())  # reasons reach the browser
    with pytest.raises(AppError, match="unreadable"):
        svc.resolve_adapter("loop")
    assert svc.rescan() == ["good"]
    result = svc.generate(_request(tiny["model"], 1.0, adapters=[("good", 1.0)]))
    assert np.abs(_pixels(result.adapted) - _pixels(result.base)).max() > 2
    assert svc.rescan() == ["good"] and svc.generate(_request(tiny["model"], 1.0, adapters=[("good", 1.0)]))


def test_bad_entries_never_break_startup(tiny, bad_dir: Path, monkeypatch, capsys) -> None:
    from delora_diffusion import app

    launched = _fake_launch(monkeypatch)
    app.main(["--model", str(tiny["model"]), "--adapters_dir", str(bad_dir)])
    from delora_diffusion.app.ui import problems_text

    out = capsys.readouterr().out
    assert "1 adapters found" in out and "skipped unreadable entry 'loop': symlink loop" in out
    blocks = {getattr(b, "elem_id", None): b for b in launched["demo"].blocks.values()}
    assert blocks["adapter-0"].value == "good"
    shown = blocks["adapter-problems"].value
    assert "meta-list.safetensors" in shown and "symlink loop" in shown and "Permission denied" in shown
    assert problems_text(AppService(["m"], adapters_dir=tiny["adapters"])) == ""


# ------------------------------------------------------------------------------------- limits (issue 13.7)


def test_each_request_has_a_work_budget(tiny) -> None:
    one = 32 * 32 * 2  # pixel-steps of one 32x32 image at 2 steps
    svc = AppService([str(tiny["model"])], adapters_dir=tiny["adapters"], max_work=2 * one)
    assert svc.generate(_request(tiny["model"], 1.0))  # base + adapted: exactly the budget
    with pytest.raises(AppError, match=r"4,096 pixel-steps.*allows 4,096|--max_work") as exc:
        svc.generate(_request(tiny["model"], 1.0, steps=3))
    assert "--max_work" in str(exc.value) and "6,144" in str(exc.value)
    assert svc.sweep(_request(tiny["model"], 1.0), [0.0, 1.0])
    with pytest.raises(
        AppError, match="3-value sweep needs .* 12,288"
    ):  # each value fits; the total does not
        svc.sweep(_request(tiny["model"], 1.0, steps=4), [0.0, 0.5, 1.0])
    # The default refuses what the sliders alone would allow (1024² at 100 steps, two images), at once.
    big = _request(tiny["model"], 1.0, steps=100, width=1024, height=1024)
    with pytest.raises(AppError, match="--max_work"):
        AppService([str(tiny["model"])], adapters_dir=tiny["adapters"]).generate(big)
    assert DEFAULT_MAX_WORK == 512 * 512 * 100
    assert build_parser().parse_args(["--max_work", "1e9"]).max_work == 1e9


def test_uploads_are_deleted_once_loaded_or_rejected_and_the_temp_dir_at_close(tiny, tmp_path: Path) -> None:
    from delora_diffusion.io import WEIGHT_NAME

    svc = AppService([str(tiny["model"])], adapters_dir=tiny["adapters"])
    good = tmp_path / "mine.safetensors"
    shutil.copy(tiny["loose"] / WEIGHT_NAME, good)
    name = svc.add_upload(good, consume=True)
    assert not good.exists() and svc.resolve_adapter(name).is_file()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="not a valid DeLoRA adapter"):
        svc.add_upload(junk, consume=True)
    assert not junk.exists()
    assert len(list(svc._upload_dir.iterdir())) == 1  # the rejected copy is gone too
    kept = tmp_path / "kept.safetensors"
    shutil.copy(tiny["loose"] / WEIGHT_NAME, kept)
    svc.add_upload(kept)
    assert kept.exists()  # only the web server's own copy is consumed
    upload_dir = svc._upload_dir
    svc.close()
    assert not upload_dir.exists()


def test_main_removes_its_temp_dir_and_points_gradio_into_it(tiny, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    launched = _fake_launch(monkeypatch)
    server.main(["--model", str(tiny["model"]), "--adapters_dir", str(tiny["adapters"])])
    work = Path(launched["gradio_temp_dir"]).parent
    assert work.parent == tmp_path and work.name.startswith("delora-app-")
    assert launched["demo"].delete_cache is not None
    assert list(tmp_path.iterdir()) == [] and "GRADIO_TEMP_DIR" not in os.environ


def test_hub_models_are_off_unless_the_flag_allows_them(tiny) -> None:
    svc = AppService([str(tiny["model"])], adapters_dir=tiny["adapters"])
    with pytest.raises(AppError, match="--allow_hub_models"):
        svc.resolve_model("some-org/some-model")
    assert not build_parser().parse_args([]).allow_hub_models
    assert build_parser().parse_args(["--allow_hub_models"]).allow_hub_models


def _post(url: str, origin: str | None, body: bytes, content_type: str) -> int:
    headers = {"Content-Type": content_type} | ({"Origin": origin} if origin else {})
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_a_launched_server_refuses_cross_origin_posts(
    service: AppService, tmp_path: Path, monkeypatch
) -> None:
    """A real server (the options main() uses) and real HTTP: a foreign Origin's upload is refused unread."""
    import socket

    from delora_diffusion.app import build_ui

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = build_parser().parse_args(["--port", str(port)])
    demo = build_ui(service)
    demo.launch(**server.launch_options(service, args), prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        boundary = "delora"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.safetensors"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\nnot an adapter\r\n--{boundary}--\r\n"
        ).encode()
        kind = f"multipart/form-data; boundary={boundary}"
        for origin in (
            "http://evil.example",
            "null",
            f"http://localhost:{port}",
            f"http://127.0.0.1:{port + 1}",
        ):
            assert _post(url, origin, body, kind) == 403, origin
        assert not list((tmp_path / "gradio").rglob("x.safetensors"))  # refused before anything was written
        assert _post(url, f"http://127.0.0.1:{port}", body, kind) == 200  # the app's own page
        assert _post(url, None, body, kind) == 200  # not a browser acting for another site
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            assert response.status == 200  # reads are untouched
        rebound = urllib.request.Request(
            f"http://127.0.0.1:{port}/config", headers={"Host": f"evil.example:{port}"}
        )
        with pytest.raises(urllib.error.HTTPError, match="403"):  # DNS rebinding: a foreign Host on loopback
            urllib.request.urlopen(rebound, timeout=30)
    finally:
        demo.close()


# ------------------------------------------------------------------------------------- paths (issue 13.12)


def test_the_info_panel_and_messages_show_no_absolute_local_paths(tiny, tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    pipe = load_pipeline(tiny["model"])
    inject_delora(pipe.unet, DeLoRAConfig(rank=2, lambda_init=2.0, target_modules="unet"))
    perturb_delora(pipe.unet, seed=4, std=2.0)
    args = {
        "pretrained_model_name_or_path": str(tiny["model"]),
        "output_dir": "/home/someone/outputs/run9",
        "instance_data_dir": str(tmp_path / "photos"),
        "cache_dirs": ["/var/cache/x", "relative/dir"],
        "rank": 2,
    }
    pipe.save_delora_weights(str(adapters / "run9"), training_args=args)
    svc = AppService([str(tiny["model"])], adapters_dir=adapters)
    text = svc.adapter_info(str(tiny["model"]), [("run9", 1.0)], 1.0)
    for secret in (str(tmp_path), str(tiny["root"]), "/home/someone", "/var/cache"):
        assert secret not in text
    assert "output_dir: run9" in text and "instance_data_dir: photos" in text and "relative/dir" in text
    assert f"base_model: `{tiny['model'].name}`" in text
    assert list(svc.model_labels) == [tiny["model"].name]  # the model box shows the folder name
    assert svc.resolve_model(tiny["model"].name) == str(tiny["model"])
    with pytest.raises(AppError) as exc:
        svc.resolve_adapter("missing")
    assert str(adapters) not in str(exc.value)
    (adapters / "bad").mkdir()
    (adapters / "bad" / "delora_weights.safetensors").write_bytes(b"\x00" * 9)
    svc.rescan()
    assert str(adapters) not in svc.unreadable["bad"]
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(AppError, match="'not-a-model'") as exc:
        AppService([str(tmp_path / "not-a-model")]).pipeline("not-a-model")
    assert str(tmp_path) not in str(exc.value)
