"""What a new user meets first: defaults that fit the data, a quick `--help`, no abbreviated options, resumes and
short splits that say what they did, a model ready for inference, and pictures that say what they show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import celeba_fixtures as cf
from facevae.checkpoint import read_training
from facevae.run import load_run
from facevae.cli import main
from facevae.config import Config
from facevae.data import native_shape, open_dataset, with_data_shape

TINY_NET = ["--set", "widths=[8, 16]", "--set", "latent_dim=4", "--set", "log_every=1", "--set", "image_count=4",
            "--quiet"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """`facevae train --data lfw` with no config and no shape: the defaults take the data's."""
    out = tmp_path_factory.mktemp("first") / "run"
    assert main(["train", "--data", "lfw", "--out", str(out), "--epochs", "1", *TINY_NET]) == 0
    return out


def test_no_config_takes_the_datas_shape_and_the_default_likelihood(first_run):
    saved = tomllib.loads((first_run / "config.toml").read_text())
    assert (saved["channels"], saved["image_size"]) == (1, 32)  # the bundled faces: grey, 32x32
    assert saved["likelihood"] == "discretized_logistic"
    assert read_training(first_run / "model.safetensors") == {"step": 2, "epoch": 1, "epochs": 1, "finished": True}


def test_an_explicit_shape_that_disagrees_is_still_an_error(tmp_path, capsys):
    assert main(["train", "--data", "lfw", "--out", str(tmp_path / "r"), "--set", "channels=3", *TINY_NET]) == 2
    assert "the data has 1 channel(s) but the config says channels = 3" in capsys.readouterr().err


def test_auto_shapes_of_each_source(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "cache"))
    assert native_shape("lfw") == (1, 32)
    assert native_shape("celeba:/nowhere") == (3, 64) and native_shape("folder:/nowhere") == (3, 64)  # nothing read
    config = with_data_shape(Config(data="lfw", image_size=64))  # only the "auto" key is filled in
    assert (config.channels, config.image_size) == (1, 64)
    with pytest.raises(ValueError, match="auto"):
        Config().data_dims  # noqa: B018 - an unresolved shape has no D


def test_a_folder_trains_with_no_shape_given(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FACEVAE_WORKERS", "1")
    cf.make_folder(tmp_path / "photos")
    out = tmp_path / "run"
    assert main(["train", "--data", f"folder:{tmp_path / 'photos'}", "--out", str(out), "--epochs", "1",
                 "--set", "batch_size=8", *TINY_NET]) == 0
    saved = tomllib.loads((out / "config.toml").read_text())
    assert (saved["channels"], saved["image_size"]) == (3, 64)
    assert native_shape(saved["data"]) == (3, 64)


def test_resuming_with_changed_settings_says_what_changed(first_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(first_run), str(copy)], check=True)
    capsys.readouterr()
    assert main(["train", "--out", str(copy), "--epochs", "2", "--set", "learning_rate=5e-4", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings: epochs 1 -> 2, learning_rate 0.001 -> 0.0005" in err
    assert main(["train", "--out", str(copy), "--epochs", "2", "--quiet"]) == 0  # the saved config: no change
    assert "changed settings" not in capsys.readouterr().err


def test_reconstruct_says_when_the_split_is_short(first_run, tmp_path, capsys):
    assert main(["reconstruct", str(first_run), "-n", "32", "--out", str(tmp_path / "r.png")]) == 0
    assert "the 'test' split has 20 images: drawing 20, not 32" in capsys.readouterr().err


def test_load_run_is_ready_for_inference(first_run):
    vae = load_run(first_run)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x = open_dataset("lfw", split="test", size=32).images[:2].float() / 255
    assert not vae(x).elbo.requires_grad  # no graph is built, even outside inference_mode
    with torch.inference_mode():
        assert vae(x).elbo.shape == (2,)


@pytest.mark.parametrize("argv", [["train", "--epoch", "3"], ["evaluate", "run", "--iw", "5"],
                                  ["sample", "run", "--sc", "2"], ["--vers"]])
def test_abbreviated_options_are_refused(argv, capsys):
    assert main(argv) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# `python -m facevae ARGS` in a fresh interpreter, then whether torch was imported: prints "exit N torch B".
_PROBE = """
import runpy, sys
sys.argv = ["facevae", *sys.argv[1:]]
try:
    runpy.run_module("facevae", run_name="__main__", alter_sys=True)
except SystemExit as e:
    print("exit", e.code, "torch", "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv,status", [(["--help"], 0), (["evaluate", "--help"], 0), (["--version"], 0),
                                         (["train", "--epoch", "3"], 2), (["frobnicate"], 2), ([], 2)])
def test_help_and_argument_errors_do_not_import_torch(argv, status):
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.stdout.splitlines()[-1] == f"exit {status} torch False", proc.stdout + proc.stderr


def test_per_epoch_pictures_are_captioned(first_run):
    from PIL import Image

    picture = np.asarray(Image.open(first_run / "images" / "reconstructions_e001.png"))
    plain = np.asarray(Image.open(first_run / "images" / "samples_e001.png"))
    assert picture.shape[1] > plain.shape[1]  # the caption column ("real", "reconstruction")
    assert (picture[:12] < 128).any()  # the title line ("epoch 1: ...") has dark text


def test_one_progress_bar_for_the_whole_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "lfw", "--out", str(out), "--epochs", "3", "--set", "widths=[8, 16]",
            "--set", "latent_dim=4", "--set", "batch_size=40", "--set", "image_every=2", "--set", "image_count=4"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "| 6/6 [" in err and "/2 [" not in err  # one bar of 3 epochs x 2 steps, not a bar per epoch
    assert "epoch 3/3" in err
    epoch_lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("epoch ") and "|" in line
                   and "train elbo" in line]
    assert [line.split(" |")[0] for line in epoch_lines] == ["epoch 2", "epoch 3"]  # every image_every, and the last


def test_prepare_takes_the_sources_own_size_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "cache"))
    assert main(["prepare", "--data", "lfw", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == 32  # the cache `facevae train --data lfw` reads
    assert main(["prepare", "--data", "lfw", "--size", "big"]) == 2
    assert "--size" in capsys.readouterr().err
