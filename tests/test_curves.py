"""Training curves: images/curves.png while training, `facevae plot` of several runs, runs without curves, bad --out."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from facevae.cli import main
from facevae.fileio import is_facevae_png
from facevae.curves import CURVES_FILE, EPOCH_PANELS, draw, plot_runs, read_metrics
from tiny_runs import train_tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """A Gaussian and a Bernoulli run (the deck's two decoders), two epochs each."""
    root = tmp_path_factory.mktemp("curves")
    return [train_tiny(root / "gaussian"), train_tiny(root / "bernoulli", "--set", "likelihood=bernoulli")]


def test_training_draws_curves_png(runs):
    for run in runs:
        with Image.open(run / "images" / CURVES_FILE) as img:
            assert img.format == "PNG" and img.width > 600
        assert is_facevae_png(run / "images" / CURVES_FILE)


def test_curves_are_the_logged_numbers(runs):
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    fig = draw([read_metrics(runs[0])])
    by_title = {ax.get_title(): ax for ax in fig.axes}
    elbo = by_title[EPOCH_PANELS[0][0]]
    lines = {line.get_label(): line for line in elbo.lines}
    assert list(lines["test"].get_xdata()) == [1, 2]
    assert list(lines["test"].get_ydata()) == pytest.approx([-r["test_density_elbo_nats"] for r in epochs])
    assert list(lines["train"].get_ydata()) == pytest.approx([-r["train_elbo"] for r in epochs])
    psnr = {line.get_label(): line for line in by_title[EPOCH_PANELS[2][0]].lines}
    assert list(psnr["test (posterior mean)"].get_ydata()) == pytest.approx([r["test_psnr_db"] for r in epochs])
    step_ax = [ax for ax in fig.axes if ax.get_xlabel() == "step"][0]
    assert list(step_ax.lines[0].get_xdata()) == [r["step"] for r in steps] == [1, 2, 3, 4]
    assert list(step_ax.lines[0].get_ydata()) == pytest.approx([r["train_loss"] for r in steps])


def test_bits_per_dim_panel_is_empty_for_bernoulli(runs):
    fig = draw([read_metrics(runs[1])])
    bpd = [ax for ax in fig.axes if ax.get_title() == EPOCH_PANELS[1][0]][0]
    assert not bpd.lines and "not logged" in bpd.texts[0].get_text()


def test_plot_labels_several_runs(runs, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG"
    fig = draw([read_metrics(r) for r in runs])
    labels = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert {"gaussian train", "gaussian test", "bernoulli test", "gaussian", "bernoulli"} <= labels
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0  # its own picture: replaced
    assert is_facevae_png(out)


def test_a_run_without_curves_still_plots(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs[0], old)
    (old / "images" / CURVES_FILE).unlink()
    with (old / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "epoch", "epoch": 3, "train_elbo": NaN, "step"')  # a torn last line, as a crash leaves
    curves = read_metrics(old)
    assert [r["epoch"] for r in curves.epochs] == [1, 2] and len(curves.steps) == 4
    assert plot_runs([old], out=tmp_path / "old.png").is_file()
    assert math.isfinite(curves.epochs[-1]["test_elbo_nats"])


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "mine.png").write_text("my notes"), "facevae did not write it"),
    (lambda d: Image.new("L", (4, 4)).save(d / "mine.png"), "facevae did not write it"),
    (lambda d: None, "does not end in .png"),
])
def test_plot_refuses_files_it_did_not_write(runs, tmp_path, capsys, setup, message):
    setup(tmp_path)
    out = tmp_path / ("mine.txt" if ".png" in message else "mine.png")
    before = out.read_bytes() if out.exists() else None
    assert main(["plot", str(runs[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert (out.read_bytes() if out.exists() else None) == before


def test_plot_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
