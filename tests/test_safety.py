"""Nothing lost, nothing read that the user did not name (issue 11): safe outputs, run and cache locks, crash-tolerant
logs, untrusted run directories and model files, hostile caches and images, bad values. Each case is one line on
stderr, exit status 2, and nothing touched."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import celeba_fixtures as cf
from conftest import tiny_config
from facevae import checkpoint as ckpt
from facevae.cli import main
from facevae.data import load_cache, prepare
from facevae.errors import UserError
from facevae.fileio import LOCK, MARKER, DirLock
from facevae.model import VAE
from facevae.train import train


def one_line(capsys) -> str:
    """The one error line a refused command printed (and nothing else on stderr)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("facevae: error:") and len(err.splitlines()) == 1, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes: what "nothing touched" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    """A folder of a user's own files, with the names a run would write."""
    (path / "checkpoint").mkdir(parents=True)
    for name in ("model.safetensors", "metrics.jsonl", "checkpoint/notes.txt", "holiday.jpg", "config.toml"):
        (path / name).write_bytes(f"the user's {name}\n".encode())
    return path


def make_run(path: Path, **overrides) -> Path:
    """A run directory (random weights, config.toml, marker) like the ones facevae writes; no training needed."""
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    path.mkdir(parents=True)
    ckpt.save_model(VAE(config).eval(), path / "model.safetensors")
    (path / "config.toml").write_text(config.to_toml())
    (path / MARKER).write_text('{"kind": "run"}\n')
    return path


TRAIN = ["--set", "image_size=32", "--set", "channels=1", "--set", "widths=[8, 16]", "--set", "latent_dim=4",
         "--set", "batch_size=40", "--set", "log_every=1", "--set", "image_count=8", "--data", "lfw", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run trained for one epoch through the Python API (two steps)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(), out, progress=False)
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


# ---------------------------------------------------------------- data loss
def test_prepare_never_removes_or_writes_into_a_folder_it_did_not_make(tmp_path, capsys):
    photos = tmp_path / "photos"
    cf.make_folder(photos)
    other = user_folder(tmp_path / "other")
    celeba = cf.make_celeba(tmp_path / "celeba", "original", count=4).top
    (tmp_path / "file.txt").write_text("mine")
    cases = [(f"folder:{photos}", photos, "files facevae did not write"),
             (f"folder:{photos}", other, "files facevae did not write"),
             (f"celeba:{celeba}", celeba, "files facevae did not write"),
             (f"folder:{photos}", tmp_path / "file.txt", "is a file"),
             (f"folder:{photos}", Path("/"), "root of the file system")]
    before = snapshot(tmp_path)
    for spec, out, message in cases:
        assert main(["prepare", "--data", spec, "--out", str(out)]) == 2, out
        assert message in one_line(capsys)
    assert snapshot(tmp_path) == before


def test_prepare_into_an_empty_folder_and_a_users_partial_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACEVAE_WORKERS", "1")
    cf.make_folder(tmp_path / "photos")
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--data", f"folder:{tmp_path / 'photos'}", "--out", str(tmp_path / "empty")]) == 0
    assert load_cache(tmp_path / "empty").images.shape[0] == 20
    capsys.readouterr()
    mine = user_folder(tmp_path / "c.partial")  # the user's folder where prepare would put its work in progress
    before = snapshot(mine)
    assert main(["prepare", "--data", f"folder:{tmp_path / 'photos'}", "--out", str(tmp_path / "c")]) == 2
    assert "c.partial (where prepare keeps the cache" in one_line(capsys)
    assert snapshot(mine) == before and not (tmp_path / "c").exists()
    (tmp_path / "d.partial").mkdir()  # even an empty one: prepare removes its partial cache when the source fails
    assert main(["prepare", "--data", f"folder:{tmp_path / 'photos'}", "--out", str(tmp_path / "d")]) == 2
    assert "a folder facevae did not make" in one_line(capsys)
    assert (tmp_path / "d.partial").is_dir() and not any((tmp_path / "d.partial").iterdir())


def test_train_never_writes_into_a_folder_that_is_not_a_run(tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    assert main(["train", "--out", str(mine), *TRAIN]) == 2
    assert "files facevae did not write" in one_line(capsys)
    assert snapshot(mine) == before


def test_a_run_made_before_markers_is_still_resumed(run_copy):
    (run_copy / MARKER).unlink()
    train(tiny_config(epochs=2), run_copy, progress=False)
    assert (run_copy / MARKER).is_file()


PICTURE_ARGS = {"sample": ["-n", "4"], "reconstruct": ["-n", "4"], "compare": ["-n", "4"],
                "interpolate": ["test:0", "test:1"], "analogy": ["test:0", "test:1", "test:2"],
                "traverse": ["--dims", "2"]}


@pytest.mark.parametrize("command", list(PICTURE_ARGS))
def test_picture_outputs_replace_only_facevae_pictures(command, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    target = tmp_path / "mine.png"
    target.write_bytes(b"my own picture")
    if command == "compare":
        assert main(["evaluate", str(run)]) == 0  # a full test evaluation: it writes eval.json
    argv = [command, str(run), *PICTURE_ARGS[command], "--out", str(target)]
    capsys.readouterr()
    assert main(argv) == 2
    assert "facevae did not write it" in one_line(capsys) and target.read_bytes() == b"my own picture"
    assert main([*argv, "--force"]) == 0 and target.read_bytes().startswith(b"\x89PNG")
    assert main(argv) == 0  # a picture facevae wrote is replaced without --force
    capsys.readouterr()
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "faces.jpg", "does not end in .png")):
        assert main([command, str(run), *PICTURE_ARGS[command], "--out", str(out)]) == 2
        assert message in one_line(capsys)


def test_a_second_train_on_a_locked_run_says_who_holds_it(run_copy, capsys):
    before = snapshot(run_copy)
    with DirLock(run_copy, "run"):  # another process training it (flock conflicts across file descriptors)
        assert main(["train", "--out", str(run_copy), "--epochs", "2", "--quiet"]) == 2
    err = one_line(capsys)
    assert f"in use by process {os.getpid()} on " in err and " since " in err
    assert {k: v for k, v in snapshot(run_copy).items() if k != LOCK} == \
           {k: v for k, v in before.items() if k != LOCK}


def test_a_stale_lock_of_a_killed_process_is_taken_over(run_copy, capsys):
    (run_copy / LOCK).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "yesterday"}))
    train(tiny_config(epochs=2), run_copy, progress=False)
    err = capsys.readouterr().err
    assert "took over the lock" in err and "process 999999 on elsewhere since yesterday" in err
    assert (run_copy / LOCK).read_text() == ""  # released on exit


def test_a_cache_being_prepared_is_locked(tmp_path, capsys):
    cf.make_folder(tmp_path / "photos")
    (tmp_path / "c.partial").mkdir()
    (tmp_path / "c.partial" / MARKER).write_text('{"kind": "cache"}')
    with DirLock(tmp_path / "c.partial", "the cache"):
        assert main(["prepare", "--data", f"folder:{tmp_path / 'photos'}", "--out", str(tmp_path / "c")]) == 2
    assert "in use by process" in one_line(capsys)


def test_a_partial_last_metrics_line_is_repaired_on_resume(run_copy, capsys):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 3, "train_lo')  # what a crash in the middle of a write leaves
    train(tiny_config(epochs=2), run_copy, progress=False)
    assert "dropped 1 damaged line" in capsys.readouterr().err
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


@pytest.mark.parametrize("argv", [["--set", "channels=3"], ["--data", "folder:/definitely/not/here"],
                                  ["--data", "celeba:/definitely/not/here"]])
def test_a_failed_train_creates_nothing(argv, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["train", "--out", str(out), *TRAIN, *argv]) == 2
    one_line(capsys)
    assert not (tmp_path / "new").exists()


def test_prepare_workers_exit_when_the_parent_is_killed(tmp_path):
    cf.make_folder(tmp_path / "photos")
    script = ("import time, facevae.data.decode as d\n"
              "real = d.load_square\n"
              "def slow(*a, **k):\n    time.sleep(3)\n    return real(*a, **k)\n"
              "d.load_square = slow\n"
              f"from facevae.data import prepare\nprepare('folder:{tmp_path / 'photos'}', out='{tmp_path / 'c'}')\n")
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "FACEVAE_WORKERS": "2"},
                              stderr=subprocess.DEVNULL)
    children: list[int] = []
    deadline = time.monotonic() + 60
    while len(children) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        children = [int(c) for t in Path(f"/proc/{parent.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    assert len(children) >= 2, "the workers never started"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


# ---------------------------------------------------------------- untrusted run directories and model files
def _rewrite_model(run: Path, **config_changes) -> None:
    """Replace the model's metadata config (the tensors stay) with `config_changes` applied."""
    tensors, metadata = ckpt.read_safetensors(run / "model.safetensors")
    config = {**json.loads(metadata["config"]), **config_changes}
    save_file(tensors, str(run / "model.safetensors"), metadata={**metadata, "config": json.dumps(config)})


@pytest.mark.parametrize("changes,message", [
    ({"widths": [32, 64, 8000, 8000]}, "parameters, more than facevae builds"),
    ({"widths": [8, 16], "latent_dim": 4000}, "the config needs (1024, 4000)"),
    ({"latent_dim": 2**31}, "'latent_dim' must be between"),
    ({"image_size": 2**20}, "'image_size' must be between"),
])
def test_a_model_config_is_checked_before_anything_is_allocated(changes, message, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    _rewrite_model(run, **changes)
    start = time.perf_counter()
    assert main(["sample", str(run), "--out", str(tmp_path / "s.png")]) == 2
    assert message in one_line(capsys) and time.perf_counter() - start < 5


def test_data_never_comes_from_the_weights_metadata_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "caches"))
    secret = tmp_path / "secret"
    cf.make_folder(secret)
    run = make_run(tmp_path / "run")
    _rewrite_model(run, data=f"folder:{secret}")
    assert main(["evaluate", str(run), "--limit", "2"]) == 0  # the run's config.toml says lfw: that is what is read
    assert not any("secret" in p.name for p in (tmp_path / "caches").iterdir())
    capsys.readouterr()
    (run / "config.toml").unlink()
    assert main(["reconstruct", str(run), "--out", str(tmp_path / "r.png")]) == 2
    assert "--data SPEC" in one_line(capsys)
    assert main(["reconstruct", str(run), "--out", str(tmp_path / "r.png"), "--data", "lfw"]) == 0


def test_a_huge_sparse_model_file_is_refused_from_its_size(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    with open(run / "model.safetensors", "r+b") as f:
        f.truncate(20 << 30)  # 20 GB, sparse: no disk used
    start = time.perf_counter()
    assert main(["sample", str(run), "--out", str(tmp_path / "s.png")]) == 2
    assert "not a valid safetensors file" in one_line(capsys) and time.perf_counter() - start < 5


_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def _damage_state(run: Path, how: str) -> None:
    path = run / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    if how == "no_sha256":
        del state["sha256"]
    elif how == "bad_rng":
        state["rng"]["python"] = [3, [1, 2, 3], None]
    elif how == "step_abc":
        state["step"] = "abc"
    elif how == "outside_file":
        state["sha256"]["/etc/hostname"] = "0" * 64
    elif how == "parent_file":
        state["sha256"] = {"../model.safetensors": state["sha256"]["model.safetensors"],
                           "optimizer.safetensors": state["sha256"]["optimizer.safetensors"]}
    elif how == "not_an_object":
        state = [1, 2, 3]
    elif how == "link_outside":
        target = run.parent / "elsewhere.safetensors"
        shutil.copy(run / "checkpoint" / "model.safetensors", target)
        (run / "checkpoint" / "model.safetensors").unlink()
        (run / "checkpoint" / "model.safetensors").symlink_to(target)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["no_sha256", "bad_rng", "step_abc", "outside_file", "parent_file",
                                 "not_an_object", "link_outside"])
def test_a_damaged_checkpoint_is_one_line_and_nothing_outside_it_is_opened(how, run_copy, capsys):
    _damage_state(run_copy, how)
    _OPENED[:] = ["(recording)"]
    try:
        assert main(["train", "--out", str(run_copy), "--epochs", "2", "--quiet"]) == 2
    finally:
        opened, _OPENED[:] = list(_OPENED[1:]), []
    assert "is damaged" in one_line(capsys)
    ours = str(run_copy.resolve())
    outside = [p for p in opened if p.startswith("/etc") or "elsewhere" in p or
               (p.endswith(".safetensors") and not os.path.realpath(p).startswith(ours + "/checkpoint"))]
    assert outside == []


@pytest.mark.parametrize("damage,message", [
    ("metadata_not_json", "not JSON"), ("metadata_list", "not a table of keys"), ("metadata_null", "not a table of keys"),
    ("no_metadata", "no facevae config"),
    ("config_not_utf8", "not UTF-8"), ("no_config_toml", "no config.toml"),
])
def test_bad_metadata_and_config_files_are_one_line(damage, message, run_copy, tmp_path, capsys):
    tensors, metadata = ckpt.read_safetensors(run_copy / "model.safetensors")
    values = {"metadata_not_json": "{config", "metadata_list": "[1, 2]", "metadata_null": "null", "no_metadata": None}
    if damage in values:
        meta = {"format": "facevae-model"} if values[damage] is None else {**metadata, "config": values[damage]}
        save_file(tensors, str(run_copy / "model.safetensors"), metadata=meta)
        argv = ["sample", str(run_copy), "--out", str(tmp_path / "s.png")]
    elif damage == "config_not_utf8":
        (run_copy / "config.toml").write_bytes(b"data = \"\xff\xfe\"\n")
        argv = ["train", "--out", str(run_copy), "--quiet"]
    else:
        (run_copy / "config.toml").unlink()
        argv = ["train", "--out", str(run_copy), "--quiet"]
    before = snapshot(run_copy)
    assert main(argv) == 2
    assert message in one_line(capsys)
    assert snapshot(run_copy) == before  # the defaults are never written over a checkpoint's config


def _npy_header(shape: tuple, descr: str = "|i1") -> bytes:
    """A .npy version 1.0 header claiming `shape`, with no data after it."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape})
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory) -> Path:
    path, _ = prepare("lfw", size=32, out=tmp_path_factory.mktemp("cache") / "lfw", progress=False)
    return path


@pytest.mark.parametrize("damage,message", [
    ("manifest_list", "format version"), ("manifest_nested", "damaged"), ("no_split_names", "split names"),
    ("images_empty", "no .npy header"), ("splits_huge", "header says"), ("images_lie", "header says"),
    ("attributes_shape", "disagree"),
])
def test_a_damaged_cache_is_one_line_and_nothing_is_allocated_from_its_headers(damage, message, good_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(good_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    if damage == "manifest_list":
        (cache / "manifest.json").write_text("[1, 2]")
    elif damage == "manifest_nested":
        (cache / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    elif damage == "no_split_names":
        del manifest["split_names"]
        (cache / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "images_empty":
        (cache / "images.npy").write_bytes(b"")
    elif damage == "splits_huge":
        (cache / "splits.npy").write_bytes(_npy_header((10**11,)))
    elif damage == "images_lie":
        (cache / "images.npy").write_bytes(_npy_header((10**6, 3, 1024, 1024), "|u1") + b"\0" * 100)
    else:
        np.save(cache / "attributes.npy", np.ones((len(np.load(cache / "splits.npy")), 7), np.int8))
    with pytest.raises(UserError, match=message) as e:
        load_cache(cache)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- hostile images
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height RGBA, with a tiny (empty) image data chunk: a decompression bomb's
    first bytes, without the gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header claims width x height (libjpeg would fill the rest with grey)."""
    small = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(small, "JPEG")
    data = bytearray(small.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_hostile_images_are_skipped_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEVAE_WORKERS", "1")
    photos = tmp_path / "photos"
    cf.make_folder(photos)
    (photos / "bomb.png").write_bytes(_png_header_only(13000, 13000))
    (photos / "grey.jpg").write_bytes(_jpeg_claiming(9000, 9000))
    os.mkfifo(photos / "pipe.jpg")
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(outside)
    (photos / "link.png").symlink_to(outside)
    (photos / "broken.png").symlink_to(tmp_path / "nothing.png")
    script = f"from facevae.data import prepare\nprepare('folder:{photos}', out='{tmp_path / 'c'}', progress=False)"
    subprocess.run([sys.executable, "-c", script], timeout=120, check=True)  # a FIFO used to hang it for ever
    manifest = load_cache(tmp_path / "c").manifest
    reasons = {e["file"]: e["reason"] for e in manifest["skipped"]}
    assert reasons["bomb.png"].startswith("too large: 13000x13000")
    assert reasons["grey.jpg"].startswith("truncated")
    assert reasons["pipe.jpg"].startswith("not a regular file") and reasons["broken.png"].startswith("not a regular")
    assert manifest["links_outside"] == {"link.png": str(outside)}
    assert manifest["images"] == 21  # the 20 photos and the link


def test_the_pixel_budget_is_configurable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACEVAE_WORKERS", "1")
    cf.make_folder(tmp_path / "photos")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "photos" / "small.png")
    spec = f"folder:{tmp_path / 'photos'}"
    assert main(["prepare", "--data", spec, "--out", str(tmp_path / "c"), "--max-pixels", "1024", "--size", "16"]) == 0
    manifest = load_cache(tmp_path / "c").manifest
    assert 1 <= manifest["images"] < 21 and all("--max-pixels" in e["reason"] for e in manifest["skipped"])


def test_an_unreadable_sub_folder_is_named(tmp_path, monkeypatch):
    from facevae.data import decode

    monkeypatch.setenv("FACEVAE_WORKERS", "1")
    cf.make_folder(tmp_path / "photos")
    (tmp_path / "photos" / "locked").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "photos" / "locked" / "x.png")
    real = decode.os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(decode.os, "scandir", scandir)
    manifest = prepare(f"folder:{tmp_path / 'photos'}", out=tmp_path / "c", progress=False)[1]
    assert {"file": "locked/", "reason": "unreadable folder: Permission denied; its images are not used"} in \
        manifest["skipped"]


@pytest.mark.parametrize("damage,line", [("rows_41_wide", 3), ("header_39", 3), ("duplicate_row", 6),
                                         ("one_row_wider", 5)])
def test_celeba_attribute_lists_that_disagree_are_refused_with_the_line(damage, line, tmp_path):
    from facevae.data import celeba
    from facevae.data.cache import Settings

    f = cf.make_celeba(tmp_path / "data", "original", count=6)
    lines = f.attributes_file.read_text().splitlines()  # count, names, then one row per image
    if damage == "rows_41_wide":
        lines[2:] = [row + " 1" for row in lines[2:]]
    elif damage == "header_39":
        lines[1] = " ".join(lines[1].split()[:39])
    elif damage == "duplicate_row":
        lines[5] = lines[2]
    else:
        lines[4] += " -1"
    f.attributes_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"list_attr_celeba.txt line {line}:"):
        celeba.prepare(f.top, tmp_path / "out", Settings(size=16), progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad values: one line, exit 2, before any work
NESTED = "[" * 1500 + "]" * 1500  # deeper than Python's recursion limit, shorter than a --set value may be


@pytest.mark.parametrize("argv,message", [
    (["--set", "kl_weight=nan"], "'kl_weight' must be a finite number"),
    (["--set", "kl_weight=inf"], "'kl_weight' must be a finite number"),
    (["--set", "weight_decay=nan"], "'weight_decay' must be a finite number"),
    (["--set", "seed=-1"], "'seed' must be between 0"),
    (["--set", "split_seed=-1"], "'split_seed' must be between 0"),
    (["--set", "seed=4294967296"], "'seed' must be between 0"),
    (["--set", "threads=100000"], "cores"),
    (["--set", "image_size=2048"], "'image_size' must be between"),
    (["--set", "image_count=1000000"], "'image_count' must be between"),
    (["--data", "folder:/" + "a" * 300], "too long for a file name"),
    (["--set", "data=\"" + "a" * 5000 + "\""], "characters long"),
    (["--set", "widths=" + NESTED], "nested too deeply"),
    (["--set", "widths=[" + ",".join(["8"] * 100_000) + "]"], "characters long"),
    (["--set", "widths=[8,8,8,8,8,8,8,8,8,8,8,8]"], "'widths' must be a list of 1 to 10"),
    (["--set", "x" * 10000 + "=1"], "unknown config key"),
])
def test_bad_values_are_refused_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TRAIN, *argv]) == 2
    err = one_line(capsys)
    assert message in err and len(err) < 2000
    assert not out.exists()


def test_a_config_file_that_is_a_pipe_or_deeply_nested_is_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.toml")
    (tmp_path / "deep.toml").write_text("widths = " + NESTED + "\n")
    for name, message in (("pipe.toml", "not a regular file"), ("deep.toml", "not valid TOML")):
        assert main(["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "run")]) == 2
        assert message in one_line(capsys)


@pytest.mark.parametrize("argv,message", [
    (["sample", "{run}", "-n", "1000000"], "at most 4096"),
    (["sample", "{run}", "--seed", str(2**70)], "--seed must be between"),
    (["sample", "{run}", "--out", "{tmp}"], "is a folder"),
    (["sample", "{run}", "--temperature", "inf"], "--temperature must be between 0 and 100"),
    (["reconstruct", "{run}", "-n", "100000"], "at most 4096"),
    (["evaluate", "{run}", "--iw-samples", str(10**10)], "add --yes"),
    (["prepare", "--seed", "-1", "--data", "lfw", "--out", "{tmp}/c"], "--seed must be between"),
    (["prepare", "--size", "5000", "--data", "lfw", "--out", "{tmp}/c"], "larger than facevae trains on"),
    (["prepare", "--max-pixels", "10", "--data", "lfw", "--out", "{tmp}/c"], "smaller than one"),
])
def test_bad_command_values_are_one_line(argv, message, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    before = snapshot(tmp_path)
    assert main([a.format(run=run, tmp=tmp_path) for a in argv]) == 2
    assert message in one_line(capsys)
    assert snapshot(tmp_path) == before


def test_evaluate_estimates_its_time_and_yes_runs_beyond_the_limit(tmp_path, capsys, monkeypatch):
    from facevae import evaluate

    run = make_run(tmp_path / "run")
    monkeypatch.setattr(evaluate, "MAX_EVAL_HOURS", 1e-9)
    assert main(["evaluate", str(run), "--iw-samples", "4", "--limit", "4"]) == 2
    assert "would take about" in one_line(capsys)
    assert main(["evaluate", str(run), "--iw-samples", "4", "--limit", "4", "--yes"]) == 0


def test_the_stop_message_never_cites_a_checkpoint_that_does_not_exist(tmp_path, monkeypatch):
    original = VAE.forward

    def poisoned(self, x, **kw):
        terms = original(self, x, **kw)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(VAE, "forward", poisoned)
    with pytest.raises(UserError, match="no checkpoint had been written yet"):
        train(tiny_config(batch_size=8, max_bad_steps=2), tmp_path / "run", progress=False)
    assert not ckpt.has_checkpoint(tmp_path / "run")


def test_a_lock_file_that_is_a_link_is_never_written_through(run_copy, tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (run_copy / LOCK).unlink(missing_ok=True)
    (run_copy / LOCK).symlink_to(precious)
    assert main(["train", "--out", str(run_copy), "--epochs", "2", "--quiet"]) == 2
    assert "is a link" in one_line(capsys) and precious.read_text() == "keep me"


def test_evaluate_writes_eval_json_only_into_a_run(tmp_path, capsys):
    stranger = make_run(tmp_path / "stranger")
    (stranger / MARKER).unlink()
    (stranger / "eval.json").write_text("my own notes")
    (stranger / "notes.txt").write_text("not a run's file")
    assert main(["evaluate", str(stranger), "--limit", "2"]) == 2
    assert "files facevae did not write" in one_line(capsys)
    assert (stranger / "eval.json").read_text() == "my own notes"


# ---------------------------------------------------------------- more hostile inputs
def test_a_model_file_that_is_a_pipe_is_never_read(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "model.safetensors").unlink()
    os.mkfifo(run / "model.safetensors")
    script = (f"import sys; from facevae.cli import main; "
              f"sys.exit(main(['sample', '{run}', '--out', '{tmp_path / 's.png'}']))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)  # used to hang
    assert proc.returncode == 2 and "not a regular file" in proc.stderr


@pytest.mark.parametrize("line", ['{"kind": "step", "st', '[1, 2]', '"text"', '{"step": "abc"}'])
def test_metrics_lines_that_are_not_records_are_dropped(line, run_copy, capsys):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    train(tiny_config(epochs=2), run_copy, progress=False)
    assert all(isinstance(json.loads(x), dict) for x in (run_copy / "metrics.jsonl").read_text().splitlines())


def test_a_network_too_large_is_refused_by_summary(capsys):
    assert main(["summary", "--set", "widths=[32, 64, 4096, 8192]"]) == 2
    assert "parameters, more than facevae builds" in one_line(capsys)


def test_a_checkpoint_folder_that_is_a_link_is_refused(run_copy, tmp_path, capsys):
    shutil.move(run_copy / "checkpoint", tmp_path / "elsewhere")
    (run_copy / "checkpoint").symlink_to(tmp_path / "elsewhere")
    assert main(["train", "--out", str(run_copy), "--epochs", "2", "--quiet"]) == 2
    assert "is damaged (it is a link" in one_line(capsys)


def test_an_optimizer_state_of_the_wrong_shape_is_a_damaged_checkpoint(run_copy, capsys):
    from safetensors.torch import load_file

    folder = run_copy / "checkpoint"
    tensors = load_file(str(folder / "optimizer.safetensors"))
    tensors["optim.0.exp_avg"] = torch.zeros(3, 3)  # sha256 made to match: a consistent but hostile checkpoint
    save_file(tensors, str(folder / "optimizer.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    state["sha256"]["optimizer.safetensors"] = ckpt.sha256((folder / "optimizer.safetensors").read_bytes())
    (folder / "state.json").write_text(json.dumps(state))
    assert main(["train", "--out", str(run_copy), "--epochs", "2", "--quiet"]) == 2
    assert "is damaged" in one_line(capsys)


def test_a_runs_own_pictures_drawn_before_the_mark_are_replaced_and_nothing_else(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "images").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(run / "images" / "sample.png")  # a PNG without facevae's mark
    assert main(["sample", str(run), "-n", "4"]) == 0  # one of the run's own files: replaced
    capsys.readouterr()
    (run / "images" / "reconstruct.png").write_bytes(b"not a picture")
    assert main(["reconstruct", str(run), "-n", "4"]) == 2
    assert "facevae did not write it" in one_line(capsys)
    assert (run / "images" / "reconstruct.png").read_bytes() == b"not a picture"


def test_atomic_write_never_touches_a_file_or_link_at_its_temporary_name(tmp_path):
    """The temporary is created new (O_EXCL, O_NOFOLLOW): a file, or a link to a precious file, already at the
    first temporary name is passed over, neither truncated nor removed."""
    from facevae.fileio import atomic_write

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    taken = [tmp_path / f".out.json.tmp-{os.getpid()}{n}" for n in ("", "-0")]  # the old name and the first new one
    for link in taken:
        link.symlink_to(precious)
    atomic_write(tmp_path / "out.json", "{}")
    assert (tmp_path / "out.json").read_text() == "{}"
    assert all(link.is_symlink() for link in taken) and precious.read_text() == "keep me"


def test_checkpoint_folders_holding_other_files_are_never_removed(tmp_path, capsys):
    """save_checkpoint removes checkpoint.new and checkpoint.old only when they hold nothing but its own files."""
    vae = VAE(tiny_config())
    opt = torch.optim.Adam(vae.parameters())
    ckpt.save_checkpoint(tmp_path, vae, opt, {"step": 1})
    ckpt.save_checkpoint(tmp_path, vae, opt, {"step": 2})  # its own checkpoint.old is removed
    assert not (tmp_path / "checkpoint.old").exists()
    mine = tmp_path / "checkpoint.new"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        ckpt.save_checkpoint(tmp_path, vae, opt, {"step": 3})
    assert (mine / "notes.txt").read_text() == "mine"
    mine.rename(tmp_path / "elsewhere")
    (tmp_path / "checkpoint.old").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="a link or a file"):
        ckpt.save_checkpoint(tmp_path, vae, opt, {"step": 3})
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine"


def test_an_aborted_cache_keeps_files_it_did_not_write(tmp_path):
    """A failed prepare removes its partial cache, but not a file somebody put there meanwhile."""
    from facevae.data.cache import CacheWriter

    writer = CacheWriter(tmp_path / "c", count=2, channels=1, size=4)
    (tmp_path / "c.partial" / "mine.txt").write_text("mine")
    writer.abort()
    assert (tmp_path / "c.partial" / "mine.txt").read_text() == "mine"
    clean = CacheWriter(tmp_path / "d", count=2, channels=1, size=4)
    clean.abort()
    assert not (tmp_path / "d.partial").exists()


def test_a_cache_writer_never_takes_over_a_partial_folder_it_did_not_make(tmp_path):
    """CacheWriter itself (not only prepare) refuses an existing <name>.partial without facevae's mark, even an empty
    one: it would replace images.npy, remove done.npy and, on abort, the folder. Nothing in it is touched."""
    from facevae.data.cache import CacheWriter

    theirs = tmp_path / "c.partial"
    theirs.mkdir()
    for name in ("images.npy", "done.npy"):
        (theirs / name).write_text("mine")
    with pytest.raises(UserError, match="c.partial .* already holds files facevae did not write"):
        CacheWriter(tmp_path / "c", count=2, channels=1, size=4)
    assert sorted(p.name for p in theirs.iterdir()) == ["done.npy", "images.npy"]
    assert all((theirs / name).read_text() == "mine" for name in ("images.npy", "done.npy"))
    (tmp_path / "e.partial").mkdir()
    with pytest.raises(UserError, match="a folder facevae did not make"):
        CacheWriter(tmp_path / "e", count=2, channels=1, size=4)
    assert (tmp_path / "e.partial").is_dir()
