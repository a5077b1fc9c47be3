"""`facevae report RUN`: one self-contained HTML file. Parsed here: its numbers, pictures, attribute table and config;
every string from the run escaped; nothing fetched from anywhere; only its own files replaced."""

from __future__ import annotations

import base64
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from facevae.cli import main
from facevae.evaluate import evaluate_run
from facevae.report import REPORT_MARK, build_report
from tiny_runs import train_tiny

HOSTILE = '<script>alert("x")</script><img src="https://example.com/x.png">'


class Page(HTMLParser):
    """The tags, attributes, and text of a document."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all_text(self) -> str:
        return " ".join(self.text)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A trained, evaluated run with an attribute index, and a config value someone else might have planted."""
    run = train_tiny(tmp_path_factory.mktemp("report") / "run")
    evaluate_run(run, iw_samples=3)
    (run / "attributes.json").write_text(json.dumps({"format": "facevae-attributes", "model_sha256": "0" * 64,
                                                     "attributes": [
        {"name": "Smiling", "auc": 0.8734, "auc_balanced": 0.8512, "positives": 9, "negatives": 11},
        {"name": HOSTILE, "auc": None, "positives": 1, "negatives": 2}]}))
    config = (run / "config.toml").read_text()
    (run / "config.toml").write_text(config + f"note = {json.dumps(HOSTILE)}\n")
    return run


@pytest.fixture(scope="module")
def page(run, tmp_path_factory) -> tuple[str, Page]:
    out = tmp_path_factory.mktemp("out") / "report.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = out.read_text()
    return text, Page(text)


def test_the_report_holds_numbers_curves_pictures_attributes_config(run, page):
    text, doc = page
    report = json.loads((run / "eval.json").read_text())
    words = doc.all_text()
    assert text.startswith("<!DOCTYPE html>\n" + REPORT_MARK)
    for label, value in [("ELBO of the 8-bit images, nats/image (higher is better)", f"{report['elbo_nats']:.2f}"),
                         ("-ELBO, bits/dim (lower is better)", f"{report['elbo_bpd']:.4f}"),
                         ("PSNR, dB (higher is better)", f"{report['psnr_db']:.2f}"),
                         ("SSIM (higher is better)", f"{report['ssim']:.4f}")]:
        assert label in words and value in words
    alts = [attrs.get("alt") for tag, attrs in doc.tags if tag == "img"]
    assert alts == ["training curves", "Reconstructions", "Samples"]
    for tag, attrs in doc.tags:
        if tag == "img":
            assert base64.b64decode(attrs["src"].removeprefix("data:image/png;base64,"))[:4] == b"\x89PNG"
    assert "Smiling" in words and "0.873" in words and "0.851" in words and "n/a" in words
    assert "computed for another model" in words  # the index names another model's SHA-256
    assert "latent_dim" in words and "4" in words


def test_every_string_from_the_run_is_escaped(page):
    text, doc = page
    assert not [tag for tag, _ in doc.tags if tag == "script"]
    assert HOSTILE in doc.all_text()  # shown as text, twice: the attribute table and the config
    assert doc.all_text().count('<script>alert("x")</script>') == 2


def test_nothing_is_fetched(page):
    text, doc = page
    for tag, attrs in doc.tags:
        for name in ("src", "href", "srcset", "action", "data", "poster"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value or value.startswith("data:"), (tag, name, value)
    assert "http://" not in text.split("<body>")[0] and "@import" not in text and "url(" not in text


def test_pictures_of_the_making_commands_when_present(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.copy(copy / "images" / "samples.png", copy / "images" / "interpolate.png")
    alts = [attrs.get("alt") for tag, attrs in Page(build_report(copy)).tags if tag == "img"]
    assert alts == ["training curves", "Reconstructions", "Samples", "Interpolation"]


def test_a_bare_run_still_reports(tmp_path):
    """No eval.json, no pictures, no metrics: a report that says what is missing and how to get it."""
    (tmp_path / "bare").mkdir()
    doc = Page(build_report(tmp_path / "bare"))
    words = doc.all_text()
    assert "Not evaluated" in words and "No curves" in words and "facevae sample" in words
    assert "No readable config.toml" in words


def test_links_out_of_the_run_are_not_followed(run, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + b"my private bytes")
    bare = tmp_path / "linked"
    (bare / "images").mkdir(parents=True)
    os.symlink(secret, bare / "images" / "sample.png")
    (bare / "eval.json").write_text("[1, 2")  # someone else's broken file
    text = build_report(bare)
    assert base64.b64encode(secret.read_bytes()).decode() not in text
    assert "None in the run" in Page(text).all_text()


def test_replaces_only_its_own_reports(run, tmp_path, capsys):
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    assert main(["report", str(run), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "not a facevae report" in err and err.count("\n") == 1
    assert mine.read_text() == "<p>my notes</p>"
    assert main(["report", str(run), "--out", str(mine), "--force"]) == 0  # asked for: replaced
    assert mine.read_text().startswith("<!DOCTYPE html>\n" + REPORT_MARK)
    default = run / "report.html"
    assert main(["report", str(run)]) == 0 and default.is_file()
    assert main(["report", str(run)]) == 0  # its own report: replaced
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_opens_in_a_headless_browser_without_requests(page, tmp_path):
    """The report in a real browser (Debian's Chromium, as the web page's tests use): it renders its pictures and
    asks the network for nothing."""
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("no chromium on PATH (.ci/run installs it for the browser tests): the report was parsed, not "
                    "rendered")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                   "(.ci/run installs it for the browser tests)")
    out = tmp_path / "report.html"
    out.write_text(page[0])
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        tab = browser.new_page()
        tab.on("request", lambda r: requests.append(r.url))
        tab.goto(out.as_uri())
        widths = tab.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        title = tab.title()
        browser.close()
    assert title == "facevae run run"
    assert len(widths) == 3 and all(w > 0 for w in widths)
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
