"""Folder-of-images preparation: every format, any size, largest center square, bad files, the fixed split."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import celeba_fixtures as cf
from facevae.data import load_cache, open_dataset
from facevae.data import folder
from facevae.data.cache import Settings
from facevae.data.folder import list_images
from facevae.errors import UserError


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Caches under tmp_path; one decoding process unless a test asks for more."""
    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FACEVAE_WORKERS", "1")


def test_every_format_and_size_is_read_as_its_largest_center_square(tmp_path):
    sizes = cf.make_folder(tmp_path / "photos")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / ".hidden.jpg").write_bytes(b"ignored")
    manifest = folder.prepare(tmp_path / "photos", tmp_path / "out", Settings(size=32), progress=False)
    cache = load_cache(tmp_path / "out")
    names = sorted(sizes)
    assert manifest["images"] == len(names) == 20
    assert cache.images.shape == (20, 3, 32, 32)
    assert manifest["source"] == {"kind": "folder", "path": str((tmp_path / "photos").resolve()), "layout": "folder"}
    assert manifest["crop"] is None and manifest["split"]["scheme"] == "fixed"
    assert [e["file"] for e in manifest["skipped"]] == ["notes.txt"]
    for i, name in enumerate(names):  # the cache keeps the sorted order of the relative paths
        reference = cf.pillow_square(tmp_path / "photos" / name, None, 32)
        difference = np.abs(cache.images[i].astype(np.float64) - reference).mean()
        assert difference <= 1.0, (name, difference)


def test_big_photos_use_reduced_jpeg_decoding_within_one_grey_level(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(3):
        (tmp_path / "big").mkdir(exist_ok=True)
        (tmp_path / "big" / f"{i}.jpg").write_bytes(cf.jpeg_bytes(cf.smooth_image(rng, 1600, 1200)))
    folder.prepare(tmp_path / "big", tmp_path / "out", Settings(size=64), progress=False)
    images = load_cache(tmp_path / "out").images
    reference = np.stack([cf.pillow_square(tmp_path / "big" / f"{i}.jpg", None, 64) for i in range(3)])
    assert np.abs(images.astype(np.float64) - reference).mean() <= 1.0


def test_exif_orientation_is_applied(tmp_path):
    pixels = cf.smooth_image(np.random.default_rng(4), 160, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show rotated by 90 degrees clockwise
    (tmp_path / "photos").mkdir()
    Image.fromarray(pixels).save(tmp_path / "photos" / "turned.jpg", quality=95, exif=exif)
    folder.prepare(tmp_path / "photos", tmp_path / "out", Settings(size=32), progress=False)
    upright = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270)  # 100 wide, 160 high
    reference = np.asarray(upright.crop((0, 30, 100, 130)).resize((32, 32), Image.Resampling.BILINEAR))
    got = load_cache(tmp_path / "out").images[0].transpose(1, 2, 0).astype(np.float64)
    assert np.abs(got - reference).mean() <= 2.0  # JPEG loss on top of the resize


def test_the_split_is_a_fixed_seeded_90_10(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(25):
        (tmp_path / "photos" / f"{i:02d}.png").write_bytes(_png(cf.smooth_image(rng, 40, 40)))
    a = folder.prepare(tmp_path / "photos", tmp_path / "a", Settings(size=16), progress=False)
    folder.prepare(tmp_path / "photos", tmp_path / "b", Settings(size=16), progress=False)
    assert a["splits"] == {"train": 22, "valid": 0, "test": 3} and a["split"]["seed"] == 0
    np.testing.assert_array_equal(load_cache(tmp_path / "a").split_codes, load_cache(tmp_path / "b").split_codes)


def test_bad_files_are_skipped_and_named(tmp_path, capsys):
    cf.make_folder(tmp_path / "photos")
    (tmp_path / "photos" / "broken.png").write_bytes(_png(cf.smooth_image(np.random.default_rng(1), 50, 50))[:60])
    (tmp_path / "photos" / "text.jpg").write_text("hello")
    manifest = folder.prepare(tmp_path / "photos", tmp_path / "out", Settings(size=16), progress=False)
    skipped = {e["file"]: e["reason"] for e in manifest["skipped"]}
    assert set(skipped) == {"broken.png", "text.jpg"}
    assert skipped["text.jpg"].startswith("not an image") and skipped["broken.png"].startswith("unreadable")
    assert manifest["images"] == len(load_cache(tmp_path / "out").images) == 20
    assert "skipped 2 files" in capsys.readouterr().err


def test_no_images_is_a_one_line_user_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("no pictures here")
    with pytest.raises(UserError, match="no images in") as e:
        folder.prepare(tmp_path / "empty", tmp_path / "out", Settings(size=16), progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        folder.prepare(tmp_path / "nowhere", tmp_path / "out", Settings(size=16), progress=False)


def test_only_unreadable_images_fail_and_leave_nothing(tmp_path):
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="none of the 3 image files"):
        folder.prepare(tmp_path / "bad", tmp_path / "out", Settings(size=16), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_cache_inside_the_folder_is_not_read_as_images(tmp_path):
    cf.make_folder(tmp_path / "photos")
    names, _, _ = list_images(tmp_path / "photos", exclude=(tmp_path / "photos" / "cache",))
    (tmp_path / "photos" / "cache").mkdir()
    (tmp_path / "photos" / "cache" / "x.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    again, _, _ = list_images(tmp_path / "photos", exclude=(tmp_path / "photos" / "cache",))
    assert names == again


def test_open_dataset_on_a_folder_with_two_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEVAE_WORKERS", "2")
    cf.make_folder(tmp_path / "photos")
    train = open_dataset("folder:" + str(tmp_path / "photos"), "train", size=32, progress=False)
    test = open_dataset("folder:" + str(tmp_path / "photos"), "test", size=32, progress=False)
    assert tuple(train.images.shape) == (18, 3, 32, 32) and tuple(test.images.shape) == (2, 3, 32, 32)
    assert train.attributes is None


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
