"""The web demo in a real browser: `evlgen serve` on the miniature demo model, driven by headless Chromium
(Debian's `chromium` through Playwright; no browser download). Uploads an image, reads the caption,
saves a screenshot, then sends bad uploads and checks the page says why and the server keeps serving.

Skipped when chromium, playwright or gradio is missing, unless EVLGEN_REQUIRE_BROWSER=1 (CI sets it).
EVLGEN_SERVE_CHECKPOINT=DIR serves that model instead (e.g. `make demo`'s runs/demo/run/model), and
EVLGEN_SCREENSHOT=path copies the screenshot there: docs/serving.png is made that way.
"""

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import evlgen
from evlgen.synth import world
from evlgen.synth.demo import run_demo
from test_demo import FAST, SIZES, TINY

pytestmark = pytest.mark.slow


def chromium_or_skip():
    problems = []
    for module, hint in (("playwright.sync_api", "playwright"), ("gradio", "gradio")):
        try:
            __import__(module)
        except ImportError:
            problems.append(f"the {hint} package is missing (pip install -e '.[dev]')")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        problems.append("no chromium on PATH (Debian: apt-get install chromium)")
    if problems:
        message = "browser test not run: " + "; ".join(problems)
        if os.environ.get("EVLGEN_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (EVLGEN_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    return exe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    chromium_or_skip()
    if os.environ.get("EVLGEN_SERVE_CHECKPOINT"):
        return Path(os.environ["EVLGEN_SERVE_CHECKPOINT"])
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, sizes=SIZES, recipe=TINY, cache_dir=out / "cache", overrides=FAST)
    return out / "run" / "model"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "evlgen", "serve", "--checkpoint", str(model)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--max-upload-mb", "0.5"], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"evlgen serve exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"evlgen serve did not answer in 180 s:\n{log_path.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def upload(page, path, wait=True):
    clear = page.locator("#upload button[aria-label=Clear]")  # the file input exists only when empty
    if clear.count():
        clear.click()
    page.locator("#upload input[type=file]").set_input_files(str(path))
    if wait:
        page.locator("#upload").get_by_text(Path(path).stem).wait_for(timeout=30_000)  # upload finished


def caption_of(page):
    page.click("#caption-button")
    page.wait_for_function("document.querySelector('#result textarea').value.length > 0", timeout=90_000)
    return page.locator("#result textarea").input_value()


def test_caption_in_a_browser_and_bad_uploads(model, server, tmp_path):
    from playwright.sync_api import sync_playwright

    image = tmp_path / "scene.png"
    world.render(world.sample_scene(random.Random(7)), size=192).save(image)  # an unseen scene
    expected = evlgen.load(model).caption([image])[0]  # what `evlgen caption` says
    expected = expected.replace("\r\n", "\n").replace("\r", "\n")  # as an HTML textarea holds it
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a picture")
    big = tmp_path / "big.bmp"
    Image.new("RGB", (500, 400), "white").save(big)  # 600 kB, over the server's 0.5 MB limit

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_or_skip(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 460})
        page.goto(server)
        upload(page, image)
        assert caption_of(page) == expected and expected
        page.locator("#preview img").wait_for()
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot))
        assert Image.open(shot).size == (1100, 460)
        if os.environ.get("EVLGEN_SCREENSHOT"):
            shutil.copy(shot, os.environ["EVLGEN_SCREENSHOT"])

        upload(page, junk)
        page.click("#caption-button")
        page.get_by_text("junk.png: not an image this demo can read").wait_for(timeout=30_000)
        assert page.locator("#result textarea").input_value() == ""  # no stale caption beside the error

        upload(page, big, wait=False)  # refused by the server before it is stored
        page.get_by_text('exceed the maximum allowed size of 488.3 Kb: "big.bmp"').wait_for(timeout=30_000)
        page.click("#caption-button")
        page.get_by_text("Upload an image or a short video first.").wait_for(timeout=30_000)

        # The server kept serving: a good upload after the bad ones is captioned as before.
        upload(page, image)
        assert caption_of(page) == expected
        page.fill("#question textarea", "what colour is the shape?")
        page.click("#answer-button")
        page.wait_for_function("document.querySelector('#result textarea').value.length > 0", timeout=90_000)
        browser.close()
