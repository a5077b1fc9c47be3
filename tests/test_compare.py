"""`facevae compare`: evaluated runs side by side in one Markdown table and one picture, and its bad inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from facevae.checkpoint import save_model
from facevae.run import load_run
from facevae.cli import main
from facevae.compare import comparison_rows, markdown_table, run_labels
from facevae.data import open_dataset
from facevae.evaluate import evaluate_run
from facevae.model import VAE


def make_run(path: Path, **overrides) -> Path:
    """A run directory with a tiny random-weight model (what evaluate and compare read; no training needed)."""
    torch.manual_seed(len(str(path)))
    config = tiny_config(**overrides)
    path.mkdir(parents=True)
    save_model(VAE(config).eval(), path / "model.safetensors")
    (path / "config.toml").write_text(config.to_toml())
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two evaluated runs on the same data, the deck's two decoders: Gaussian and Bernoulli."""
    root = tmp_path_factory.mktemp("compare")
    out = [make_run(root / "gauss"), make_run(root / "bern", likelihood="bernoulli")]
    for run in out:
        evaluate_run(run, iw_samples=3)  # a full evaluation of the test split (20 images) writes eval.json
    return out


def test_compare_prints_one_table_and_writes_one_picture(runs, tmp_path, capsys):
    png = tmp_path / "deck.png"
    assert main(["compare", *map(str, runs), "--out", str(png), "-n", "5"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "| | gauss | bern |" and lines[1] == "|---|---:|---:|"
    table = [line for line in lines if line.startswith("|")]
    reports = [json.loads((r / "eval.json").read_text()) for r in runs]
    assert "| likelihood | gaussian | bernoulli |" in table
    assert f"| {reports[0]['psnr_db']:.2f} | {reports[1]['psnr_db']:.2f} |" in next(r for r in table if "PSNR" in r)
    assert "(K=3)" in next(r for r in table if "importance-weighted" in r)
    assert "n/a" in next(r for r in table if "-ELBO, bits/dim" in r)  # the Bernoulli has no bits/dim
    assert "bern: the likelihood is not a normalised density" in out
    assert not any("FID" in r for r in table)  # no run computed it
    assert str(png) in err
    picture = Image.open(png)
    assert picture.mode == "L"  # grey faces stay grey
    assert picture.height >= 3 * 64 and picture.width > 5 * 64  # 3 rows (real + 2 runs) of 5, a label margin


def test_picture_rows_are_the_real_images_then_each_runs_reconstructions(runs):
    vaes = [load_run(r) for r in runs]
    real = open_dataset("lfw", split="test", size=32, progress=False).images[:4]
    rows = comparison_rows(vaes, real)
    assert rows.shape == (12, 1, 32, 32)
    assert torch.equal(rows[:4], real.float() / 255)
    for i, vae in enumerate(vaes, start=1):
        assert torch.allclose(rows[4 * i:4 * (i + 1)], vae.reconstruct(real.float() / 255))


def test_table_shows_fid_when_a_run_has_it_and_flags_different_settings():
    base = {"elbo_nats": -900.0, "recon_nats": -890.0, "kl_nats": 10.0, "nll_iw_nats": 895.5, "nll_iw_stderr": 1.5,
            "iw_samples": 100, "elbo_bpd": 9.2, "nll_iw_bpd": 9.1, "loss_nats": 900.0, "kl_weight": 1.0,
            "psnr_db": 20.0, "ssim": 0.5, "mse": 0.01, "active_units": 7, "latent_dim": 8, "likelihood": "gaussian",
            "split": "test", "images": 100}
    other = {**base, "iw_samples": 10, "images": 50, "fid_recon": 41.25, "fid_samples": 60.5, "fid_images": 50}
    table = markdown_table(["a|b", "c"], [base, other])
    assert "| a\\|b | c |" in table.splitlines()[0]  # a bar in a name cannot break the table
    assert "| FID reconstructions (lower is better) | n/a | 41.25 |" in table
    assert "| FID images | n/a | 50 |" in table
    assert "895.50 ± 1.50 (K=100)" in table
    assert "evaluated on different data" in table and "different K" in table


def test_labels_are_paths_where_names_collide():
    assert run_labels([Path("a/run"), Path("b/run")]) == ["a/run", "b/run"]
    assert run_labels([Path("x/gauss"), Path("x/bern")]) == ["gauss", "bern"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("facevae: error:"), err
    return err


def test_run_without_eval_json_is_one_line_and_exit_2(runs, tmp_path, capsys):
    fresh = make_run(tmp_path / "fresh")
    assert main(["compare", str(runs[0]), str(fresh), "--out", str(tmp_path / "c.png")]) == 2
    assert f"run `facevae evaluate {fresh}` first" in _one_line_error(capsys)
    (fresh / "eval.json").write_text("{not json")
    assert main(["compare", str(fresh), "--out", str(tmp_path / "c.png")]) == 2
    assert "unreadable" in _one_line_error(capsys)
    assert not (tmp_path / "c.png").exists()


def test_runs_of_different_size_are_one_line_and_exit_2(runs, tmp_path, capsys):
    small = make_run(tmp_path / "small", image_size=16)
    evaluate_run(small)
    capsys.readouterr()  # the evaluation's progress bar
    assert main(["compare", str(runs[0]), str(small), "--out", str(tmp_path / "c.png")]) == 2
    err = _one_line_error(capsys)
    assert "different data, image size or channels" in err and "16x16x1" in err and "32x32x1" in err


@pytest.mark.parametrize("argv,message", [
    (["-n", "0"], "-n must be at least 1"),
    (["--split", "valid"], "no 'valid' split"),
])
def test_compare_bad_arguments_are_one_line_and_exit_2(argv, message, runs, tmp_path, capsys):
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "c.png"), *argv]) == 2
    assert message in _one_line_error(capsys)


def test_compare_missing_run_or_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    (tmp_path / "eval.json").write_text(json.dumps({"elbo_nats": 1, "nll_iw_nats": 1, "psnr_db": 1,
                                                    "likelihood": "gaussian"}))
    assert main(["compare", str(tmp_path)]) == 2
    assert "holds no trained model" in _one_line_error(capsys)
    assert main(["compare"]) == 2
    _one_line_error(capsys)


def test_a_model_newer_than_its_eval_json_is_flagged(runs, tmp_path, capsys):
    copy = tmp_path / "retrained"
    shutil.copytree(runs[0], copy)
    later = (copy / "eval.json").stat().st_mtime + 10
    os.utime(copy / "model.safetensors", (later, later))
    assert main(["compare", str(runs[1]), str(copy), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "retrained: the model is newer than eval.json" in out and "bern: the model is newer" not in out
