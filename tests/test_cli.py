"""The real command line: train two steps, resume, sample, reconstruct, evaluate --json, and every bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from facevae import load_run, open_dataset
from facevae.cli import main

TINY = ["--set", "image_size=32", "--set", "channels=1", "--set", "widths=[8, 16]", "--set", "latent_dim=4",
        "--set", "batch_size=40", "--set", "log_every=1", "--set", "image_count=8", "--data", "lfw"]
EVAL_KEYS = {"elbo_nats", "elbo_stderr", "elbo_mc_stderr", "recon_nats", "kl_nats", "nll_iw_nats", "nll_iw_stderr",
             "iw_samples", "elbo_bpd", "density_elbo_nats", "density_recon_nats", "loss_nats",
             "nll_iw_bpd", "psnr_db", "ssim", "mse", "active_units", "latent_dim", "likelihood", "split", "images"}


def facevae(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m facevae ARGS` as a user would, in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "facevae", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"facevae {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run trained for one epoch (two steps of 40 of the 80 training faces) through the real command line."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    facevae("train", "--out", str(out), "--epochs", "1", "--quiet", *TINY)
    return out


def test_train_writes_the_run_directory(run_dir):
    for name in ("config.toml", "model.safetensors", "metrics.jsonl", "checkpoint/state.json",
                 "images/reconstructions.png", "images/samples.png", "images/samples_e001.png"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2]
    assert len(epochs) == 1 and epochs[0]["step"] == 2
    for key in ("train_loss", "train_elbo", "train_psnr_sampled", "test_elbo_nats", "test_density_elbo_nats",
                "test_psnr_db", "img_per_s"):
        assert math.isfinite(epochs[0][key]), key
    assert "latent_dim = 4" in (run_dir / "config.toml").read_text()


def test_resume_continues_from_the_checkpoint(run_dir, tmp_path):
    copy = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    proc = facevae("train", "--out", str(copy), "--epochs", "2", "--quiet")  # the saved config is reused
    assert "resuming" in proc.stderr
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]
    state = json.loads((copy / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (2, 4)
    again = facevae("train", "--out", str(copy), "--epochs", "2", "--quiet")
    assert "already trained 2 epoch(s)" in again.stderr


def test_sample_and_reconstruct_write_pngs(run_dir, tmp_path):
    facevae("sample", str(run_dir), "-n", "10", "--out", str(tmp_path / "s.png"))
    facevae("reconstruct", str(run_dir), "-n", "4", "--out", str(tmp_path / "r.png"))
    s, r = Image.open(tmp_path / "s.png"), Image.open(tmp_path / "r.png")
    assert s.width > s.height > 0  # 8 columns, 2 rows
    assert r.height > 0


def test_evaluate_json(run_dir):
    proc = facevae("evaluate", str(run_dir), "--json", "--iw-samples", "4")
    report = json.loads(proc.stdout)  # stdout holds one JSON object and nothing else
    assert EVAL_KEYS <= set(report)
    for key in ("elbo_nats", "recon_nats", "kl_nats", "nll_iw_nats", "elbo_bpd", "nll_iw_bpd", "psnr_db", "ssim", "mse"):
        assert math.isfinite(report[key]), key
    assert report["elbo_nats"] == pytest.approx(report["recon_nats"] - report["kl_nats"], rel=1e-6)
    assert report["images"] == 20 and report["split"] == "test" and report["iw_samples"] == 4
    assert "ELBO" in proc.stderr  # the human-readable table
    assert json.loads((run_dir / "eval.json").read_text())["nll_iw_nats"] == report["nll_iw_nats"]


def test_python_api(run_dir):
    vae = load_run(run_dir)
    assert not vae.training
    images = open_dataset("lfw", split="test", size=32)
    assert images.images.dtype == torch.uint8 and images.images.shape == (20, 1, 32, 32)
    x = images.images[:3].float() / 255
    q = vae.encode(x)
    assert q.mean.shape == q.logvar.shape == (3, 4)
    assert q.kl().shape == q.log_prob(q.sample()).shape == (3,)
    p = vae.decode(q.sample())
    assert p.log_prob(x).shape == (3,) and p.mean.shape == x.shape
    terms = vae(x)
    assert torch.allclose(terms.elbo, terms.recon - terms.kl)


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "nowhere:/x", "--epochs", "1"], "unknown data source"),
    (["train", "--data", "/definitely/not/here", "--epochs", "1"], "unknown data source"),
    (["train", "--set", "latent_dims=3"], "unknown config key 'latent_dims'"),
    (["train", "--set", "batch_size=big"], "'batch_size'"),
    (["train", "--set", "image_size=40"], "'image_size'"),
    (["train", "--config", "/no/such.toml"], "config file not found"),
    (["train", "--set", "noequals"], "key=value"),
    (["train", "--data", "lfw", "--set", "channels=3", "--set", "image_size=32", "--set", "widths=[8]"],
     "channels"),
    (["train", "--set", "device=cuda"] if not torch.cuda.is_available() else ["train", "--set", "device=tpu"], "device"),
    (["frobnicate"], "invalid choice"),
    ([], "name a command"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and err.startswith("facevae: error:")


@pytest.mark.parametrize("command", ["evaluate", "sample", "reconstruct", "summary"])
def test_empty_run_directory(command, tmp_path, capsys):
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no trained model" in err and len(err.splitlines()) == 1


def test_evaluate_bad_arguments(run_dir, capsys):
    for argv, message in ((["--iw-samples", "0"], "--iw-samples"), (["--limit", "1000"], "--limit"),
                          (["--split", "valid"], "no 'valid' split")):
        assert main(["evaluate", str(run_dir), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_pickle_weights_are_refused(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_Exploit(str(marker))))
    assert main(["sample", str(tmp_path)]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def test_user_error_has_no_traceback_in_a_real_process():
    proc = facevae("train", "--set", "latent_dim=0", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["prepare", "--size", "0"], ["prepare", "--crop", "-3", "--data", "celeba:/x"]])
def test_prepare_bad_sizes_are_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be positive" in err


def test_the_deck_split_does_not_move_with_the_training_seed(tmp_path):
    from facevae.config import Config
    from facevae.data import default_cache_path, with_data_shape
    from facevae.data.cache import Settings

    base = with_data_shape(Config(data="celeba:/data/celeba", split_scheme="deck"))
    paths = {default_cache_path(c.data, Settings(size=c.image_size, crop=c.crop, scheme=c.split_scheme,
                                                 seed=c.split_seed))
             for c in (base, base.updated({"seed": 7}))}
    assert len(paths) == 1  # the training seed leaves the split (and its cache) alone
