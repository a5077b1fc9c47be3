"""`--set tensorboard=true`: the metrics.jsonl scalars and the epoch grids in RUN/tensorboard/, read back with
TensorBoard's own reader; without the package, one line and exit 2 before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from facevae.cli import main
from tiny_runs import import_extra, train_tiny

event_accumulator = import_extra("tensorboard.backend.event_processing.event_accumulator", "tensorboard")


def read_board(run: Path) -> "event_accumulator.EventAccumulator":
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("tb") / "run", "--set", "tensorboard=true")


def test_scalars_are_the_metrics_jsonl_numbers(run):
    acc = read_board(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for kind in ("step", "epoch"):
        for key in ("train_loss", "train_elbo", "train_psnr_sampled", "img_per_s") + (("test_elbo_nats", "test_psnr_db")
                                                                               if kind == "epoch" else ()):
            logged = [(r["step"], r[key]) for r in records if r["kind"] == kind]
            events = acc.Scalars(f"{kind}/{key}")
            assert [e.step for e in events] == [s for s, _ in logged], (kind, key)
            assert [e.value for e in events] == pytest.approx([v for _, v in logged], rel=1e-6), (kind, key)
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1, 2]


def test_grids_are_logged_each_picture_epoch(run):
    acc = read_board(run)
    assert {"reconstructions", "samples"} <= set(acc.Tags()["images"])
    steps = [e.step for e in acc.Images("samples")]
    assert steps == [2, 4]  # the end of epochs 1 and 2, in steps
    assert acc.Images("samples")[0].encoded_image_string.startswith(b"\x89PNG")


def test_resume_hides_events_past_the_checkpoint(run, tmp_path):
    """A resumed run continues the same event history; purge_step hides what a killed run logged past the
    checkpoint, as metrics.jsonl drops those lines."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    killed = SummaryWriter(str(copy / "tensorboard"))  # a process killed after logging steps 5 to 7, unsaved
    for step in (5, 6, 7):
        killed.add_scalar("step/train_loss", -1.0, global_step=step)
    killed.close()
    assert main(["train", "--out", str(copy), "--epochs", "3", "--quiet"]) == 0
    events = read_board(copy).Scalars("step/train_loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    logged = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events] == pytest.approx([r["train_loss"] for r in logged if r["kind"] == "step"])


def test_without_the_package_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError, as when missing
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--data", "lfw", "--quiet",
                 "--set", "tensorboard=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'facevae[tensorboard]'" in err
    assert not out.exists()  # nothing made, nothing trained
