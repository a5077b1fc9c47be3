"""CelebA preparation: layouts, splits, attributes, pixels, bad input and resuming, on generated fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import celeba_fixtures as cf
from facevae.data import load_cache, open_dataset, prepare
from facevae.data import decode as decode_module
from facevae.data.cache import is_cache
from facevae.data import celeba
from facevae.data.cache import Settings
from facevae.data.celeba import deck_test_count, detect_layout
from facevae.errors import UserError
from facevae.fileio import mark_dir


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Caches under tmp_path; one decoding process unless a test asks for more."""
    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FACEVAE_WORKERS", "1")


def run(root: Path, out: Path, **kw) -> dict:
    """The celeba source's prepare with the defaults of the command line, quiet; `split` names the scheme."""
    settings = dict(size=64, crop=148, split="official", seed=0)
    settings.update(kw)
    scheme = settings.pop("split")
    return celeba.prepare(root, out, Settings(scheme=scheme, **settings), progress=False)


def reasons(manifest: dict) -> dict[str, str]:
    """{file: reason} of the skipped entries."""
    return {e["file"]: e["reason"] for e in manifest["skipped"]}


# --- layout detection ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("named", ["top", "dataset", "images"])
def test_detects_the_original_layout(tmp_path, named):
    f = cf.make_celeba(tmp_path / "data", "original", count=3)
    layout = detect_layout({"top": f.top, "dataset": f.dataset, "images": f.images}[named])
    assert layout.name == "original"
    assert layout.images == f.images.resolve()
    assert layout.partition == f.partition.resolve() and layout.attributes == f.attributes_file.resolve()


@pytest.mark.parametrize("named", ["parent", "dataset", "outer", "images"])
def test_detects_the_kaggle_layout(tmp_path, named):
    f = cf.make_celeba(tmp_path / "downloads" / "archive", "kaggle", count=3)
    path = {"parent": tmp_path / "downloads", "dataset": f.dataset, "outer": f.images.parent, "images": f.images}
    layout = detect_layout(path[named])
    assert layout.name == "kaggle"
    assert layout.images == f.images.resolve()
    assert layout.partition.name == "list_eval_partition.csv" and layout.attributes.name == "list_attr_celeba.csv"


@pytest.mark.parametrize("layout", ["original", "kaggle"])
@pytest.mark.parametrize("piece", ["partition", "attributes", "images"])
def test_a_missing_piece_is_named_in_one_line(tmp_path, layout, piece):
    f = cf.make_celeba(tmp_path / "data", layout, count=2)
    if piece == "images":
        shutil.rmtree(f.images)
        expected = "img_align_celeba/ with .jpg files"
    else:
        gone = f.partition if piece == "partition" else f.attributes_file
        gone.unlink()
        expected = gone.name
    with pytest.raises(UserError) as e:
        detect_layout(f.dataset)
    message = str(e.value)
    assert "\n" not in message
    assert expected in message and str(f.dataset.resolve()) in message
    present = {f.partition.name, f.attributes_file.name} - {expected}
    assert not any(f"lacks {p}" in message or f", {p}" in message.split(";")[0] for p in present)


def test_a_path_that_does_not_exist_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


# --- splits and attributes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["original", "kaggle"])
def test_official_split_and_attributes(tmp_path, layout):
    f = cf.make_celeba(tmp_path / "data", layout, count=30)
    manifest = run(f.top, tmp_path / "out")
    cache = load_cache(tmp_path / "out")
    assert manifest["images"] == 30 and manifest["skipped"] == []
    assert manifest["splits"] == {"train": 24, "valid": 3, "test": 3}
    np.testing.assert_array_equal(cache.split_codes, f.codes)
    assert cache.manifest["attribute_names"] == cf.ATTRIBUTE_NAMES
    assert cache.attributes.dtype == np.int8 and cache.attributes.shape == (30, 40)
    np.testing.assert_array_equal(cache.attributes, f.attributes)
    assert manifest["source"]["kind"] == "celeba" and manifest["source"]["layout"] == layout
    assert manifest["resample"] == "bilinear"
    assert manifest["source"]["path"] == str(f.dataset.resolve())
    assert manifest["crop"] == 148 and manifest["size"] == 64 and manifest["split"] == {"scheme": "official"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_deck_split_is_seeded_and_proportional(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=40)
    first = run(f.top, tmp_path / "a", split="deck", seed=3)
    run(f.top, tmp_path / "b", split="deck", seed=3)
    run(f.top, tmp_path / "c", split="deck", seed=4)
    assert first["splits"] == {"train": 28, "valid": 0, "test": 12}
    assert first["split"] == {"scheme": "deck", "seed": 3}
    codes = [load_cache(tmp_path / d).split_codes for d in "abc"]
    np.testing.assert_array_equal(codes[0], codes[1])
    assert not np.array_equal(codes[0], codes[2])
    with pytest.raises(UserError, match="no 'valid' split"):
        load_cache(tmp_path / "a").split_indices("valid")


def test_deck_proportion_gives_the_decks_counts_on_full_celeba():
    assert deck_test_count(202_599) == 60_780 and 202_599 - deck_test_count(202_599) == 141_819
    assert deck_test_count(40) == 12 and deck_test_count(10) == 3


# --- pixels -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "crop"), [(64, 148), (32, 148), (64, 140), (64, 128)])
def test_crop_and_resize_match_pillow(tmp_path, size, crop):
    f = cf.make_celeba(tmp_path / "data", "original", count=8)
    run(f.top, tmp_path / "out", size=size, crop=crop)
    images = load_cache(tmp_path / "out").images
    assert images.shape == (8, 3, size, size) and images.dtype == np.uint8
    reference = np.stack([cf.pillow_square(f.images / n, crop, size) for n in f.names])
    difference = np.abs(images.astype(np.float64) - reference).mean()
    assert difference <= 1.0, difference


def test_a_crop_wider_than_celeba_is_refused(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=2)
    with pytest.raises(UserError, match="at most 178"):
        run(f.top, tmp_path / "out", crop=200)


def test_open_dataset_returns_uint8_images(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "kaggle", count=20)
    images = open_dataset("celeba:" + str(f.top), "train", size=32, crop=148, progress=False)
    assert tuple(images.images.shape) == (16, 3, 32, 32)
    assert str(images.images.dtype) == "torch.uint8"
    assert images.attribute_names == cf.ATTRIBUTE_NAMES and tuple(images.attributes.shape) == (16, 40)


# --- bad input ----------------------------------------------------------------------------------------------------

def _corrupt(f):
    (f.images / f.names[1]).write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(1).bytes(3000))
    return f.names[1], "unreadable"


def _truncated(f):
    data = (f.images / f.names[2]).read_bytes()
    (f.images / f.names[2]).write_bytes(data[: len(data) // 2])
    return f.names[2], "unreadable: truncated"


def _not_an_image(f):
    (f.images / f.names[3]).write_text("this is a text file with a .jpg name\n")
    return f.names[3], "not an image"


def _missing(f):
    (f.images / f.names[4]).unlink()
    return f.names[4], "missing"


def _attributes_short(f):
    lines = f.attributes_file.read_text().splitlines()
    f.attributes_file.write_text("\n".join(lines[:-1]) + "\n")  # the last image has no row; the count line stays
    return f.names[-1], "no attributes"


@pytest.mark.parametrize("damage", [_corrupt, _truncated, _not_an_image, _missing, _attributes_short])
@pytest.mark.parametrize("layout", ["original", "kaggle"])
def test_unusable_files_are_skipped_and_named(tmp_path, capsys, damage, layout):
    f = cf.make_celeba(tmp_path / "data", layout, count=12)
    name, reason = damage(f)
    manifest = run(f.top, tmp_path / "out")
    assert reasons(manifest) == {name: reasons(manifest)[name]} and reasons(manifest)[name].startswith(reason)
    cache = load_cache(tmp_path / "out")
    kept = [i for i, n in enumerate(f.names) if n != name]
    assert manifest["images"] == len(cache.images) == 11
    np.testing.assert_array_equal(cache.attributes, f.attributes[kept])  # rows stay with their images
    np.testing.assert_array_equal(cache.split_codes, f.codes[kept])
    reference = np.stack([cf.pillow_square(f.images / f.names[i], 148, 64) for i in kept])
    assert np.abs(cache.images.astype(np.float64) - reference).mean() <= 1.0
    err = capsys.readouterr().err
    assert "skipped 1 file (" in err and reason.split(":")[0] in err


def test_extra_unlisted_files_are_left_out(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=6)
    (f.images / "999999.jpg").write_bytes(cf.jpeg_bytes(cf.smooth_image(np.random.default_rng(5))))
    manifest = run(f.top, tmp_path / "out")
    assert manifest["images"] == 6
    assert reasons(manifest)["999999.jpg"].startswith("not listed")


def test_grey_and_cmyk_jpegs_are_converted_not_skipped(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=6)
    rng = np.random.default_rng(9)
    (f.images / f.names[0]).write_bytes(cf.jpeg_bytes(cf.smooth_image(rng), mode="L"))
    (f.images / f.names[1]).write_bytes(cf.jpeg_bytes(cf.smooth_image(rng), mode="CMYK"))
    assert Image.open(f.images / f.names[1]).mode == "CMYK"
    manifest = run(f.top, tmp_path / "out")
    assert manifest["images"] == 6 and manifest["skipped"] == []
    images = load_cache(tmp_path / "out").images
    grey = images[0].astype(int)
    assert np.abs(grey[0] - grey[1]).max() <= 1 and np.abs(grey[0] - grey[2]).max() <= 1
    for i in (0, 1):
        reference = cf.pillow_square(f.images / f.names[i], 148, 64)
        assert np.abs(images[i].astype(np.float64) - reference).mean() <= 1.0


def test_crlf_lists_read_like_lf_lists(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=10)
    lf = run(f.top, tmp_path / "lf")
    cf.write_lists(f, newline="\r\n")
    assert b"\r\n" in f.partition.read_bytes()
    crlf = run(f.top, tmp_path / "crlf")
    assert crlf["skipped"] == [] and crlf["splits"] == lf["splits"]
    a, b = load_cache(tmp_path / "lf"), load_cache(tmp_path / "crlf")
    np.testing.assert_array_equal(a.attributes, b.attributes)
    np.testing.assert_array_equal(a.split_codes, b.split_codes)


def test_attribute_list_with_another_count_keeps_the_common_images(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=10)
    lines = f.attributes_file.read_text().splitlines()
    extra = "555555.jpg " + " ".join(" 1" for _ in cf.ATTRIBUTE_NAMES)  # a row for an image that is not there
    f.attributes_file.write_text("\n".join(["12"] + lines[1:9] + [extra]) + "\n")  # rows for 7 of the 10
    manifest = run(f.top, tmp_path / "out")
    assert manifest["images"] == 7
    assert sorted(reasons(manifest)) == f.names[7:]
    assert all(r.startswith("no attributes") for r in reasons(manifest).values())
    np.testing.assert_array_equal(load_cache(tmp_path / "out").attributes, f.attributes[:7])


def test_malformed_list_lines_skip_only_their_images(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=8)
    partition = f.partition.read_text().splitlines()
    partition[1] = f"{f.names[1]} 7"  # not a partition code
    f.partition.write_text("\n".join(partition) + "\n")
    attributes = f.attributes_file.read_text().splitlines()  # count, names, then one row per image
    attributes[2 + 2] = f"{f.names[2]} 1 -1"  # too few values: numpy's fast parse gives way to the row-by-row one
    attributes[2 + 3] = f.names[3] + " 2" * 40  # a value that is not 1 or -1
    f.attributes_file.write_text("\n".join(attributes) + "\n")
    manifest = run(f.top, tmp_path / "out")
    skipped = reasons(manifest)
    assert sorted(skipped) == f.names[1:4] and all(r.startswith("bad list line") for r in skipped.values())
    kept = [0] + list(range(4, 8))
    np.testing.assert_array_equal(load_cache(tmp_path / "out").attributes, f.attributes[kept])


def test_attributes_written_as_0_and_1_are_read_as_minus_1_and_1(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "kaggle", count=4)
    f.attributes_file.write_text(f.attributes_file.read_text().replace("-1", "0"))
    run(f.top, tmp_path / "out")
    np.testing.assert_array_equal(load_cache(tmp_path / "out").attributes, f.attributes)


def test_lists_that_contradict_the_images_fail_in_one_line(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=5)
    for name in f.names:  # the images carry other names than the lists
        (f.images / name).rename(f.images / ("x" + name))
    with pytest.raises(UserError) as e:
        run(f.top, tmp_path / "out")
    assert "\n" not in str(e.value) and "5 are not in" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_nothing_decodable_fails_and_leaves_nothing(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=4)
    for name in f.names:
        (f.images / name).write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="none of the 4 image files"):
        run(f.top, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_every_kind_of_damage_at_once_with_two_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEVAE_WORKERS", "2")
    f = cf.make_celeba(tmp_path / "data", "kaggle", count=40)
    damaged = dict([_corrupt(f), _truncated(f), _not_an_image(f), _missing(f), _attributes_short(f)])
    (f.images / "999999.jpg").write_bytes(cf.jpeg_bytes(cf.smooth_image(np.random.default_rng(5))))
    cf.write_lists(f, newline="\r\n")
    lines = f.attributes_file.read_bytes().splitlines()
    f.attributes_file.write_bytes(b"\r\n".join(lines[:-1]) + b"\r\n")
    manifest = run(f.top, tmp_path / "out", split="deck", seed=1)
    assert set(reasons(manifest)) == set(damaged) | {"999999.jpg"}
    kept = [i for i, n in enumerate(f.names) if n not in damaged]
    cache = load_cache(tmp_path / "out")
    assert len(cache.images) == manifest["images"] == len(kept) == 35
    assert manifest["splits"] == {"train": 35 - deck_test_count(35), "valid": 0, "test": deck_test_count(35)}
    np.testing.assert_array_equal(cache.attributes, f.attributes[kept])
    reference = np.stack([cf.pillow_square(f.images / f.names[i], 148, 64) for i in kept])
    assert np.abs(cache.images.astype(np.float64) - reference).mean() <= 1.0


# --- atomic and resumable -----------------------------------------------------------------------------------------

class Interrupt(Exception):
    """Stands for Ctrl-C or a killed process in the middle of decoding."""


def test_an_interrupted_prepare_is_finished_by_running_it_again(tmp_path, monkeypatch):
    f = cf.make_celeba(tmp_path / "data", "original", count=40)
    _truncated(f)  # a failure before the interruption must be found again, and compacted away, on resume
    whole = run(f.top, tmp_path / "whole", split="deck", seed=2)

    real_chunk = decode_module._decode_chunk
    calls = []

    stop_at = [3]  # the first run stops at its third chunk; the second runs through

    def chunk_then_stop(slots):
        calls.append(len(slots))
        if len(calls) == stop_at[0]:
            raise Interrupt
        return real_chunk(slots)

    monkeypatch.setattr(decode_module, "_decode_chunk", chunk_then_stop)
    out = tmp_path / "cache" / "celeba-resumed"
    with pytest.raises(Interrupt):
        run(f.top, out, split="deck", seed=2)
    assert not out.exists() and not is_cache(out)
    assert (out.parent / "celeba-resumed.partial" / "done.npy").exists()
    done_before = int(np.load(out.parent / "celeba-resumed.partial" / "done.npy").sum())
    assert 0 < done_before < 40

    calls.clear()
    stop_at[0] = 0
    resumed = run(f.top, out, split="deck", seed=2)
    assert sum(calls) == 40 - done_before  # only what was not done is decoded again
    assert is_cache(out) and not (out.parent / "celeba-resumed.partial").exists()
    assert not (out / "done.npy").exists() and not (out / "progress.json").exists()
    a, b = load_cache(tmp_path / "whole"), load_cache(out)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.split_codes, b.split_codes)
    np.testing.assert_array_equal(a.attributes, b.attributes)
    assert {k: v for k, v in resumed.items()} == whole


def test_a_partial_cache_of_another_job_is_started_afresh(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=6)
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    mark_dir(partial, "cache")  # an earlier prepare's, left by a kill: facevae marks every partial cache it makes
    stale = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8, shape=(6, 3, 64, 64))
    stale[:] = 7
    del stale
    np.save(partial / "done.npy", np.ones(6, dtype=bool))
    (partial / "progress.json").write_text('{"key": "another job"}\n')
    run(f.top, out)
    reference = np.stack([cf.pillow_square(f.images / n, 148, 64) for n in f.names])
    assert np.abs(load_cache(out).images.astype(np.float64) - reference).mean() <= 1.0


def test_prepare_reuses_a_finished_cache(tmp_path):
    f = cf.make_celeba(tmp_path / "data", "original", count=5)
    first_path, first = prepare("celeba:" + str(f.top), size=32, crop=148, progress=False)
    (f.images / f.names[0]).unlink()  # a finished cache is not rebuilt
    again_path, again = prepare("celeba:" + str(f.top), size=32, crop=148, progress=False)
    assert first_path == again_path and first == again


def test_a_cache_of_another_split_is_not_reused(tmp_path, monkeypatch):
    """--out naming a cache prepared with --split official must not be handed back for --split deck (or another seed)."""
    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "celeba"
    cf.make_celeba(root, "original", count=12)
    out = tmp_path / "one-cache"
    prepare(f"celeba:{root}", out=out, size=32, scheme="official", progress=False)
    assert prepare(f"celeba:{root}", out=out, size=32, scheme="official", progress=False)[0] == out  # reused
    with pytest.raises(UserError, match="other settings"):
        prepare(f"celeba:{root}", out=out, size=32, scheme="deck", progress=False)
    deck0, _ = prepare(f"celeba:{root}", size=32, scheme="deck", seed=0, progress=False)
    deck1, _ = prepare(f"celeba:{root}", size=32, scheme="deck", seed=1, progress=False)
    assert deck0 != deck1  # default cache paths differ by seed


@pytest.mark.parametrize("recipe", ["celeba64-deck-gaussian", "celeba64-deck-bernoulli"])
def test_deck_recipe_trains_from_celeba_as_it_is(tmp_path, monkeypatch, recipe):
    """`facevae train --config <deck recipe> --data celeba:PATH` prepares on first use and trains (one step here)."""
    from facevae.cli import main

    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "CelebA"
    cf.make_celeba(root, "kaggle", count=20)
    config = Path(__file__).resolve().parent.parent / "configs" / f"{recipe}.toml"
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", f"celeba:{root}", "--out", str(out), "--quiet",
                 "--set", "max_steps=1", "--set", "batch_size=8"]) == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    manifest = next((tmp_path / "cache").glob("celeba-*")).joinpath("manifest.json").read_text()
    assert json.loads(manifest)["split"] == {"scheme": "deck", "seed": 0}
