"""The page end to end in headless Chromium (Playwright's Python package, Debian's chromium): load it, ask for a face,
move a slider, upload a photo, blend two faces, download; the faces change, and nothing is requested from
anywhere but the server on 127.0.0.1.

Skipped, with the reason, where the playwright package or a Chromium is missing (.ci/run installs both).
FACEVAE_WEB_RUN=RUN_DIR runs it on a real run, and FACEVAE_WEB_SCREENSHOT=FILE.png keeps its screenshot there
(the README's docs/web.png: FACEVAE_WEB_RUN=runs/lfw-faces FACEVAE_WEB_SCREENSHOT=docs/web.png).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the web extra is not installed: pip install 'facevae[web]'")
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install 'facevae[web]'")
pytest.importorskip("playwright", reason="browser tests skipped: the playwright package is not installed "
                                         "(pip install playwright; never `playwright install`)")
CHROMIUM = os.environ.get("FACEVAE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"browser tests skipped: no Chromium at {CHROMIUM} (apt-get install chromium, or set "
                f"FACEVAE_CHROMIUM)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

from web_helpers import make_run, portrait_bytes, serving, wait_for  # noqa: E402

PIXELS = """id => {  // the natural pixels of an image element, RGBA, read through a canvas
  const img = document.getElementById(id);
  const canvas = Object.assign(document.createElement("canvas"), {width: img.naturalWidth, height: img.naturalHeight});
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
}"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    given = os.environ.get("FACEVAE_WEB_RUN")
    return Path(given) if given else make_run(tmp_path_factory.mktemp("web-browser") / "run")


DECODED = "id => { const img = document.getElementById(id); return img.complete && img.naturalWidth > 0; }"


def pixels(page, element_id: str) -> np.ndarray:
    """The element's pixels once its picture is decoded: a redraw queued behind the one waited for (a slider moved
    meanwhile) may have just given it a new source."""
    wait_for(lambda: page.evaluate(DECODED, element_id), timeout=30)
    return np.array(page.evaluate(PIXELS, element_id), dtype=np.uint8)


def draws(page) -> int:
    return int(page.get_attribute("#face", "data-draws") or 0)


def after_redraw(page, action) -> np.ndarray:
    """Do `action`, wait until the face has been drawn again, and return its pixels. (Polled from Python: the
    page's Content-Security-Policy forbids the string evaluation that page.wait_for_function uses.)"""
    before = draws(page)
    action()
    wait_for(lambda: draws(page) > before, timeout=30)
    return pixels(page, "face")


def test_the_page_makes_faces_in_a_real_browser(run_dir, tmp_path):
    photo = tmp_path / "portrait.jpg"
    photo.write_bytes(portrait_bytes())
    with serving(run_dir, tmp_path / "serve.log") as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 620}, accept_downloads=True)
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            check_the_page(page, run_dir, photo, tmp_path)
            page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
            if os.environ.get("FACEVAE_WEB_SCREENSHOT"):
                shutil.copyfile(tmp_path / "web.png", os.environ["FACEVAE_WEB_SCREENSHOT"])
        finally:
            browser.close()
    assert not errors, errors
    outside = [u for u in requested if not (u.startswith(url) or u.startswith(("blob:", "data:")))]
    assert not outside, outside
    paths = {u[len(url) - 1:].split("?")[0] for u in requested if u.startswith(url)}
    assert {"/", "/static/app.js", "/static/style.css", "/api/info", "/api/directions", "/api/sample",
            "/api/decode", "/api/encode", "/api/interpolate"} <= paths, paths


def check_the_page(page, run_dir: Path, photo: Path, tmp_path: Path) -> None:
    """The user's walk through the page, asserting that each step changes what it should."""
    assert page.inner_text("#run") == run_dir.resolve().name
    assert page.locator("#principal-sliders input").count() > 0
    first = pixels(page, "face")
    assert first.size > 0 and first.std() > 0

    page.fill("#seed", "12345")  # a face from the prior
    second = after_redraw(page, lambda: page.click("#new-face"))
    assert not np.array_equal(first, second)
    assert "from the prior" in page.inner_text("#face-caption")

    third = after_redraw(page, lambda: page.locator("#slider-pc_1").fill("2.5"))  # move a slider
    assert not np.array_equal(second, third)
    assert float(page.get_attribute("#face", "data-redraw-ms")) > 0

    fourth = after_redraw(page, lambda: page.set_input_files("#upload", str(photo)))  # upload a photo
    assert not np.array_equal(third, fourth)
    assert page.inner_text("#face-caption") == "reconstruction of portrait.jpg"
    assert page.is_visible("#photo") and page.locator("#slider-pc_1").input_value() == "0"
    slider = "#slider-attribute_Smiling" if page.locator("#slider-attribute_Smiling").count() else "#slider-pc_2"
    edited = after_redraw(page, lambda: page.locator(slider).fill("-2"))  # edit the photo
    assert not np.array_equal(fourth, edited)

    page.click("#set-a")  # two faces and the path between them
    page.fill("#seed", "777")
    after_redraw(page, lambda: page.locator("#seed").dispatch_event("change"))
    page.click("#set-b")
    page.wait_for_selector("#strip:not([hidden])")
    wait_for(lambda: page.evaluate("() => document.getElementById('strip').naturalWidth") > 0, timeout=30)
    size = int(page.evaluate("() => document.getElementById('face').naturalWidth"))
    assert page.evaluate("() => document.getElementById('strip').naturalWidth") == 8 * size
    assert not np.array_equal(pixels(page, "face-a"), pixels(page, "face-b"))
    assert page.is_hidden("#photo")  # the face is the prior's now, not the photo's

    again = after_redraw(page, lambda: page.set_input_files("#upload", str(photo)))  # the same photo again
    assert np.array_equal(again, fourth) and page.is_visible("#photo")  # the same code, the same face
    assert not np.array_equal(again, after_redraw(page, lambda: page.locator("#slider-pc_1").fill("1.5")))

    with page.expect_download() as download:  # the current face as a PNG
        page.click("#download")
    saved = tmp_path / "face.png"
    download.value.save_as(saved)
    face = Image.open(io.BytesIO(saved.read_bytes()))
    assert face.format == "PNG" and face.size == (size, size)
    shown = pixels(page, "face").reshape(size, size, 4)[..., :3]
    assert np.array_equal(np.asarray(face.convert("RGB")), shown)
