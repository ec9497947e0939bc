"""The app end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python package).

The app runs as a subprocess (``python app/app.py``) on a free port with a tiny model and an adapters dir. The
test moves the λ slider with the keyboard, generates, fetches the displayed images' PNG bytes through the page
and compares their pixels: at λ = 0 the adapted image must equal the base image exactly. It then uploads an
adapter, and picks a plain LoRA file beside the DeLoRA ones with another sampler and two images per click. A
screenshot goes to ``tests/artifacts/app.png`` (``DELORA_ARTIFACTS_DIR`` overrides); with
``DELORA_UPDATE_SCREENSHOT=1`` it is also copied to ``docs/app_screenshot.png`` for the README.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180  # about 15 s on an idle 2-core machine; generous for a shared, busy one
LORA_FILE = "sks-dog-kohya.safetensors"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (/usr/bin/chromium); scripts/setup.sh installs it",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A running app on a tiny SD model with one adapter in its adapters dir: (url, adapters dir)."""
    pytest.importorskip("playwright.sync_api", reason="needs Playwright's Python package")
    pytest.importorskip("delora_diffusion.pipeline", reason="needs the diffusers integration (issue 3)")
    from tiny_pipelines import load_pipeline, make_sd_pipeline, perturb_delora

    from delora_diffusion import DeLoRAConfig, inject_delora

    root = tmp_path_factory.mktemp("app_e2e")
    model = make_sd_pipeline(root / "model")
    pipe = load_pipeline(model)
    inject_delora(pipe.unet, DeLoRAConfig(rank=2, lambda_init=2.0, target_modules="unet"))
    perturb_delora(pipe.unet, seed=1, std=2.0)
    pipe.save_delora_weights(
        str(root / "adapters" / "sks-dog"), training_args={"learning_rate": 1e-3, "rank": 2}
    )
    from delora_diffusion.export import export_lora  # a plain LoRA file beside it: the app compares both

    export_lora(root / "adapters" / "sks-dog", root / "adapters" / LORA_FILE, format="kohya", scale=0.5)

    os.symlink("loop", root / "adapters" / "loop")  # one bad entry: listed as unreadable, nothing breaks
    (root / "tmp").mkdir()
    port = _free_port()
    env = os.environ | {
        "TMPDIR": str(root / "tmp"),  # where the app's own temp dir goes: checked below, after it exits
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, str(REPO / "app" / "app.py"), "--model", str(model), "--device", "cpu"]
    cmd += ["--adapters_dir", str(root / "adapters"), "--port", str(port), "--steps", "2"]
    log = open(root / "server.log", "wb")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"the app exited with {server.returncode}:\n{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the app did not start in {STARTUP_TIMEOUT_S} s:\n{(root / 'server.log').read_text()}"
                )
            time.sleep(0.3)
        yield url, root / "adapters"
    finally:
        server.terminate()  # SIGTERM: the app shuts down cleanly and removes its temp dir
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    left = list((root / "tmp").iterdir())
    assert not left, f"the app left {left} behind:\n{(root / 'server.log').read_text()}"


def _choose(page, elem_id: str, label: str) -> None:
    """Pick the option `label` in the Gradio dropdown `elem_id`, as a user would: open it, click the option."""
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=label, exact=True).click()
    page.wait_for_function(
        "([id, label]) => document.querySelector(`#${id} input`).value === label", arg=[elem_id, label]
    )


def _image_pixels(page, elem_id: str, parameters: list[str] | None = None) -> np.ndarray:
    """The pixels of the image the page shows in `elem_id`: its PNG bytes fetched by the page, decoded here
    (its parameters text is appended to `parameters` when given)."""
    from PIL import Image

    data = page.evaluate(
        """async (id) => {
            const img = document.querySelector(`#${id} img`);
            const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
            let s = ""; for (const b of bytes) s += String.fromCharCode(b);
            return btoa(s);
        }""",
        elem_id,
    )
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "the app must serve lossless PNGs for a pixel comparison"
    image = Image.open(io.BytesIO(raw))
    assert "Steps: 2, Sampler: " in image.text["parameters"], "every PNG carries A1111-style parameters"
    if parameters is not None:
        parameters.append(image.text["parameters"])
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _generate(page, expect: str) -> None:
    """Click Generate and wait until the status line says `expect`, both images are shown, and the History
    gallery has one image more."""
    before = page.locator("#gallery img").count()
    page.click("#generate")
    page.wait_for_function(
        """([expect, before]) => {
            const s = document.querySelector('#status');
            return s && s.innerText.includes(expect)
                && document.querySelector('#base-image img') && document.querySelector('#adapted-image img')
                && document.querySelectorAll('#gallery img').length > before;
        }""",
        arg=[expect, before],
        timeout=60_000,
    )


def test_app_in_a_real_browser(app_server: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    app_url, adapters_dir = app_server
    upload_file = tmp_path / "sks-dog.safetensors"
    shutil.copy(adapters_dir / "sks-dog" / "delora_weights.safetensors", upload_file)

    def local_only(route) -> None:  # the page must work with no network: nothing outside loopback is fetched
        if route.request.url.startswith("http://127.0.0.1"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)  # generous: the machine may be shared and busy
            page.route("**/*", local_only)
            page.goto(app_url, wait_until="domcontentloaded")
            page.wait_for_selector("#generate", timeout=60_000)
            page.wait_for_function("document.querySelector('#adapter-info').innerText.includes('rank')")
            assert "symlink loop" in page.inner_text("#adapter-problems")
            page.fill("#prompt textarea", "a photo of sks dog")

            slider = page.locator("#lambda-scale input[type=range]")
            number = page.locator("#lambda-scale input[type=number]")
            assert number.input_value() == "1"
            slider.focus()
            page.keyboard.press("Home")  # move the slider to its minimum, λ = 0
            page.wait_for_function("document.querySelector('#lambda-scale input[type=number]').value === '0'")
            _generate(page, "λ scale 0.")
            base0 = _image_pixels(page, "base-image")
            adapted0 = _image_pixels(page, "adapted-image")
            assert base0.shape == (32, 32, 3)
            assert np.array_equal(adapted0, base0), "λ = 0 must reproduce the base image exactly"

            slider.focus()
            for _ in range(20):  # 20 steps of 0.05: back to λ = 1
                page.keyboard.press("ArrowRight")
            page.wait_for_function("document.querySelector('#lambda-scale input[type=number]').value === '1'")
            _generate(page, "λ scale 1.")
            base1 = _image_pixels(page, "base-image")
            adapted1 = _image_pixels(page, "adapted-image")
            assert np.array_equal(base1, base0), "the base image must not depend on λ"
            assert np.abs(adapted1 - base1).max() > 2, "at λ = 1 the adapter must change the image"
            assert "actual ‖ΔW‖/‖W‖" in page.inner_text("#adapter-info")
            assert "learning_rate: 0.001" in page.inner_text("#adapter-info")

            page.click("#sweep")
            page.wait_for_function(
                "document.querySelector('#sweep-image img') && "
                "document.querySelector('#status').innerText.includes('λ sweep')",
                timeout=60_000,
            )
            sweep = _image_pixels(page, "sweep-image")
            assert sweep.shape[1] == 5 * 48  # five λ values, one cell each
            page.evaluate("window.scrollTo(0, 0)")

            artifacts = Path(os.environ.get("DELORA_ARTIFACTS_DIR", REPO / "tests" / "artifacts"))
            artifacts.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(artifacts / "app.png"), full_page=True)
            if os.environ.get("DELORA_UPDATE_SCREENSHOT") == "1":
                (REPO / "docs").mkdir(exist_ok=True)
                shutil.copy(artifacts / "app.png", REPO / "docs" / "app_screenshot.png")

            # An upload is validated, offered in the dropdowns, and put into the first free adapter slot.
            page.get_by_text("More adapters").click()
            page.set_input_files("#upload input[type=file]", str(upload_file))
            page.wait_for_function(
                "document.querySelector('#status').innerText.includes('Uploaded and validated')",
                timeout=60_000,
            )
            assert page.locator("#adapter-1 input").input_value().startswith("upload:sks-dog-")
            work = next((adapters_dir.parent / "tmp").glob("delora-app-*"))
            assert len(list((work / "uploads").iterdir())) == 1  # the validated copy the app loads from
            assert not list((work / "gradio").rglob("*.safetensors")), "the web server's copy is deleted"
            _generate(page, "λ scale 1.")  # the uploaded adapter is usable, next to the listed one
            assert "upload:sks-dog-" in page.inner_text("#adapter-info")
            assert not np.array_equal(_image_pixels(page, "adapted-image"), adapted1)  # two adapters now

            # A plain LoRA file beside the DeLoRA ones, the Euler sampler, and two images per click.
            _choose(page, "adapter-2", f"{LORA_FILE} (LoRA)")
            page.wait_for_function("document.querySelector('#adapter-info').innerText.includes('plain LoRA')")
            _choose(page, "sampler", "Euler")
            page.locator("#count input[type=range]").focus()
            page.keyboard.press("ArrowRight")  # 1 -> 2 images
            _generate(page, "2 images, seeds 0 to 1.")
            text: list[str] = []
            assert not np.array_equal(
                _image_pixels(page, "adapted-image", text), _image_pixels(page, "base-image")
            )
            assert "Sampler: Euler," in text[0] and f"LoRA: {LORA_FILE}:1 (scale 1)" in text[0]
            assert page.locator("#gallery img").count() >= 5  # 1 + 1 + 1 + 2 adapted images so far
        finally:
            browser.close()
    assert not outside, f"the page tried to reach outside loopback: {outside}"
