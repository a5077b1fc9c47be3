"""Making faces on a model trained on data with known structure: a CelebA copy where Eyeglasses is a dark band
across the eyes and Smiling a bright bar at the mouth, the other 38 attributes coin flips (tests/celeba_fixtures.py).
One short training per module (about 5 s of CPU); every command, its identities, and every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import celeba_fixtures as cf
from facevae.attributes import INDEX_FILE, VECTORS_FILE, load_attribute_vectors, model_digest
from facevae.checkpoint import MODEL_FILE, save_model
from facevae.cli import main
from facevae.config import Config
from facevae.data.decode import load_square
from facevae.errors import UserError
from facevae.faces import analogy, decode, edit, encode, interpolate, load_image, traverse
from facevae.model import VAE
from facevae.run import Run, load_run
from facevae.train import train

SIZE = 16  # the prepared side: small enough to train in seconds, large enough for the planted bands
CROP_TOP, CROP_LEFT = (cf.HEIGHT - 148) // 2, (cf.WIDTH - 148) // 2  # the 148 px centre crop's offset


def band(rows: tuple[int, int], columns: tuple[int, int]) -> tuple[slice, slice]:
    """A planted region of the 178x218 pictures, in pixels of the prepared SIZE x SIZE image (its inner part)."""
    def to(a: int, b: int, offset: int) -> slice:
        return slice(math.ceil((a - offset) / 148 * SIZE), math.floor((b - offset) / 148 * SIZE))
    return to(*rows, CROP_TOP), to(*columns, CROP_LEFT)


EYES, MOUTH = band(cf.EYE_ROWS, cf.EYE_COLUMNS), band(cf.MOUTH_ROWS, cf.MOUTH_COLUMNS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The planted CelebA copy (200 train / 200 test images), trained for 6 epochs of 10 steps."""
    top = tmp_path_factory.mktemp("planted")
    fixture = cf.make_planted_celeba(top, count=400)
    # threads = 1: on a shared 2-core machine two torch threads wait on each other (a tiny step took 50x longer)
    config = Config(data=f"celeba:{fixture.dataset}", image_size=SIZE, channels=3, widths=[16, 32], latent_dim=8,
                    epochs=6, batch_size=20, likelihood="gaussian", sigma=0.1, learning_rate=3e-3, log_every=100,
                    image_every=100, image_count=4, eval_batch_size=200, precision="float32", threads=1).validate()
    out = top / "run"
    train(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def vae(run_dir) -> VAE:
    return load_run(run_dir)


@pytest.fixture(scope="module")
def lfw_run(tmp_path_factory) -> Path:
    """A run (untrained weights suffice) whose data, the bundled LFW faces, has no attributes."""
    out = tmp_path_factory.mktemp("lfw-run")
    config = Config(data="lfw", image_size=32, channels=1, widths=[8, 16], latent_dim=4).validate()
    save_model(VAE(config).eval(), out / MODEL_FILE)
    (out / "config.toml").write_text(config.to_toml())  # a run's data comes from its config.toml
    return out


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_planted_attributes_are_read_and_random_ones_are_not(run_dir, capsys):
    report = run_json(capsys, "attributes", str(run_dir), "--out", str(run_dir / "a.png"))
    rows = {r["name"]: r for r in report["attributes"]}
    assert list(rows) == list(cf.ATTRIBUTE_NAMES)
    for r in rows.values():
        assert r["positives"] + r["negatives"] == 200 and r["test_positives"] + r["test_negatives"] == 200
    for name in cf.PLANTED:
        assert rows[name]["auc"] >= 0.9 and rows[name]["auc_balanced"] >= 0.9, rows[name]
    random = np.array([r["auc"] for n, r in rows.items() if n not in cf.PLANTED])
    # each of the 38 is a null AUC of about 100 against 100 test images: standard deviation 0.041
    assert np.abs(random - 0.5).max() < 0.2 and np.abs(random - 0.5).mean() < 0.08, random
    assert (run_dir / VECTORS_FILE).is_file() and Image.open(run_dir / "a.png").size[1] > 40 * 64
    index = json.loads((run_dir / INDEX_FILE).read_text())
    assert index["model_sha256"] == model_digest(Run(run_dir)) and index["attributes"] == report["attributes"]
    stamp = (run_dir / VECTORS_FILE).stat().st_mtime_ns
    vectors, again = load_attribute_vectors(run_dir)  # read back, not computed again
    assert (run_dir / VECTORS_FILE).stat().st_mtime_ns == stamp and again == index
    assert vectors.names == list(cf.ATTRIBUTE_NAMES) and vectors.plain.shape == (40, 8)
    (run_dir / INDEX_FILE).write_text("{damaged")  # computed again, not trusted
    assert load_attribute_vectors(run_dir)[1] == index and json.loads((run_dir / INDEX_FILE).read_text()) == index


def test_vectors_of_another_model_are_computed_again(run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    vae = load_run(run_dir)
    with torch.no_grad():
        vae.encoder.to_mean.bias += 1.0  # every code moves: a different model
    save_model(vae, other / MODEL_FILE)
    (other / "config.toml").write_bytes((run_dir / "config.toml").read_bytes())  # the data: never from the weights
    load_attribute_vectors(run_dir)  # saved in the run, then copied beside the other model
    for name in (VECTORS_FILE, INDEX_FILE):
        (other / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(UserError, match="no attribute vectors of its current model"):
        load_attribute_vectors(other, compute=False)
    vectors, index = load_attribute_vectors(other)
    assert index["model_sha256"] == model_digest(Run(other)) != model_digest(Run(run_dir))


def test_the_eyeglasses_vector_darkens_the_eye_band(run_dir, vae, capsys):
    test = Run(run_dir).data(vae.config, "test")
    vectors, _ = load_attribute_vectors(run_dir)
    eyes = cf.ATTRIBUTE_NAMES.index("Eyeglasses")
    attributes = np.loadtxt(run_dir.parent / "celeba" / "list_attr_celeba.txt", skiprows=2, usecols=range(1, 41))
    without = [i for i in range(len(test)) if attributes[200 + i, eyes] < 0][:8]  # test faces without glasses
    assert len(without) == 8
    for i in without:
        before, after = edit(vae, test[i], vectors.vector("Eyeglasses"), steps=2)  # (C, S, S) each
        darker = (before[:, EYES[0], EYES[1]].mean() - after[:, EYES[0], EYES[1]].mean()).item()
        mouth = (before[:, MOUTH[0], MOUTH[1]] - after[:, MOUTH[0], MOUTH[1]]).abs().mean().item()
        assert darker > 0.2 and mouth < darker / 3, (i, darker, mouth)
    report = run_json(capsys, "edit", str(run_dir), f"test:{without[0]}", "--add", "Eyeglasses=1", "--add",
                      "Smiling=0.5", "--steps", "3", "--out", str(run_dir / "e.png"))
    assert report["add"] == {"Eyeglasses": 1.0, "Smiling": 0.5} and report["fractions"] == [0.0, 0.5, 1.0]
    assert Image.open(run_dir / "e.png").size[0] >= 4 * 64


@pytest.mark.parametrize("mode", ["slerp", "lerp"])
def test_interpolation_ends_are_the_reconstructions(run_dir, vae, mode, capsys):
    test = Run(run_dir).data(vae.config, "test")
    a, b = test[0], test[5]
    faces = interpolate(vae, a, b, steps=6, mode=mode)
    assert faces.shape == (6, 3, SIZE, SIZE)
    assert torch.allclose(faces[0], vae.reconstruct(a[None].float() / 255)[0], atol=1e-5)
    assert torch.allclose(faces[-1], vae.reconstruct(b[None].float() / 255)[0], atol=1e-5)
    report = run_json(capsys, "interpolate", str(run_dir), "test:0", "test:5", "--mode", mode, "--steps", "6",
                      "--out", str(run_dir / f"i-{mode}.png"))
    norms = report["norms"]
    if mode == "slerp":  # the norm stays between the ends' norms
        assert all(min(norms[0], norms[-1]) - 1e-5 <= n <= max(norms[0], norms[-1]) + 1e-5 for n in norms)
    assert report["t"][0] == 0 and report["t"][-1] == 1 and len(report["t"]) == 6


def test_traversal_orders_by_kl_and_an_inactive_dimension_changes_nothing(run_dir, tmp_path, capsys):
    """Dimension 3 made inactive: the encoder gives it the prior (mean 0, log-variance 0: KL 0) and the decoder's
    first layer ignores it. Its row comes last, marked inactive, and is constant; the active rows are not."""
    vae = load_run(run_dir)
    with torch.no_grad():
        for layer in (vae.encoder.to_mean, vae.encoder.to_logvar):
            layer.weight[3], layer.bias[3] = 0, 0
        vae.decoder.from_latent.weight[:, 3] = 0
    dead = tmp_path / "dead"
    dead.mkdir()
    for name in ("config.toml",):
        (dead / name).write_bytes((run_dir / name).read_bytes())
    save_model(vae, dead / MODEL_FILE)
    report = run_json(capsys, "traverse", str(dead), "--image", "test:1", "--dims", "8", "--range", "2")
    kl = [d["kl_nats"] for d in report["dims"]]
    assert kl == sorted(kl, reverse=True) and report["values"] == pytest.approx([-2, -4 / 3, -2 / 3, 0, 2 / 3, 4 / 3, 2])
    assert report["dims"][-1]["dim"] == 3 and report["dims"][-1]["active"] is False and kl[-1] < 1e-6
    assert all(d["active"] for d in report["dims"][:-1])
    center = encode(vae, Run(run_dir).data(vae.config, "test")[1][None])[0]
    rows = traverse(vae, center, [d["dim"] for d in report["dims"]], torch.tensor(report["values"]))
    change = (rows.amax(1) - rows.amin(1)).flatten(1).amax(1)  # (R,): the largest pixel change along each row
    assert change[-1] < 1e-6 and (change[:-1] > 0.05).all(), change


def test_analogy_edit_and_sample_identities(run_dir, vae, capsys):
    test = Run(run_dir).data(vae.config, "test")
    a, c = test[2], test[7]
    rec_c = vae.reconstruct(c[None].float() / 255)[0]
    assert torch.allclose(analogy(vae, a, a, c), rec_c, atol=1e-5)  # B - A = 0: C itself
    unchanged = edit(vae, c, torch.zeros(8), steps=3)
    assert all(torch.allclose(f, rec_c, atol=1e-5) for f in unchanged)
    report = run_json(capsys, "analogy", str(run_dir), "test:2", "test:4", "test:7", "--out", str(run_dir / "y.png"))
    assert report["faces"] == {"A": "test:2", "B": "test:4", "C": "test:7"} and report["shift_norm"] > 0
    cold = vae.sample(5, generator=torch.Generator().manual_seed(3), temperature=0.0)
    assert torch.allclose(cold, decode(vae, torch.zeros(1, 8)).expand(5, -1, -1, -1), atol=1e-6)
    warm = vae.sample(5, generator=torch.Generator().manual_seed(3), temperature=0.5)
    assert torch.allclose(warm, decode(vae, 0.5 * torch.randn(5, 8, generator=torch.Generator().manual_seed(3))),
                          atol=1e-6)
    report = run_json(capsys, "sample", str(run_dir), "-n", "12", "--temperature", "0.7", "--out",
                      str(run_dir / "s.png"))
    assert report["temperature"] == 0.7 and Image.open(run_dir / "s.png").size[0] >= 8 * 64


def test_own_photos_any_size_turned_upright(run_dir, vae, tmp_path, capsys):
    """A 300x200 JPEG stored on its side with EXIF orientation 6 reads as the upright picture, centre-cropped and
    resized as prepare does (decode.load_square); grey runs read it as luma."""
    upright = cf.planted_image(np.random.default_rng(1), True, False)[:200, :178]  # (200, 178, 3)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a camera would store it
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to display
    stored.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    face = load_image(tmp_path / "sideways.jpg", size=SIZE, channels=3)
    want = torch.from_numpy(np.array(load_square(str(tmp_path / "upright.png"), crop=None, size=SIZE)))
    assert face.shape == (3, SIZE, SIZE) and (face.int() - want.int()).abs().float().mean() < 3  # JPEG's loss only
    grey = load_image(tmp_path / "upright.png", size=SIZE, channels=1)
    luma = (want.double() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    assert grey.shape == (1, SIZE, SIZE) and (grey[0].double() - luma).abs().max() <= 1
    report = run_json(capsys, "reconstruct", str(run_dir), "--image", str(tmp_path / "sideways.jpg"), "test:0",
                      "--out", str(tmp_path / "r.png"))
    assert [f["face"] for f in report["faces"]] == [str(tmp_path / "sideways.jpg"), "test:0"]
    assert all(f["psnr_db"] > 10 for f in report["faces"])
    assert Image.open(tmp_path / "r.png").size[1] >= 2 * 64


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "notes.jpg").write_text("not a picture")
    good = cf.jpeg_bytes(cf.planted_image(np.random.default_rng(0), False, False))
    (tmp / "cut.jpg").write_bytes(good[: len(good) // 3])
    (tmp / "folder.png").mkdir(exist_ok=True)
    return [
        (["edit", "{run}", "test:0", "--add", "Smileing=1"], "unknown attribute 'Smileing'; the known ones: "
                                                             "5_o_Clock_Shadow, Arched_Eyebrows"),
        (["edit", "{run}", "test:0", "--add", "Smiling"], "--add takes NAME=AMOUNT"),
        (["edit", "{lfw}", "test:0", "--add", "Smiling=1"], "has no attributes"),
        (["attributes", "{lfw}"], "has no attributes"),
        (["reconstruct", "{run}", "--image", str(tmp / "notes.jpg")], "not an image"),
        (["reconstruct", "{run}", "--image", str(tmp / "cut.jpg")], "unreadable"),
        (["reconstruct", "{run}", "--image", str(tmp / "folder.png")], "is a folder"),
        (["reconstruct", "{run}", "--image", str(tmp / "missing.png")], "no such file"),
        (["interpolate", "{run}", "test:0", "test:200"], "the 'test' split has 200 images, numbered 0 to 199"),
        (["analogy", "{lfw}", "train:0", "train:1", "train:80"], "the 'train' split has 80 images"),
        (["interpolate", "{run}", "test:0", "test:1", "--steps", "1"], "--steps must be at least 2"),
    ]


def test_bad_input_is_one_line_and_exit_status_2(run_dir, lfw_run, tmp_path, capsys):
    for argv, message in bad_inputs(tmp_path):
        argv = [a.format(run=run_dir, lfw=lfw_run) for a in argv]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
