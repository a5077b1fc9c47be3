"""Tests written against bugs that the rest of the suite let through (issue 18), each checked by planting the bug:
the epoch order, the atomic write, the active-units threshold, the flip axis, the bound's standard error, and the
training path's reparameterisation."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from facevae import evaluate as ev
from facevae import fileio
from facevae.distributions import DiagonalGaussian
from facevae.model import VAE
from facevae.pixels import to_float
from facevae.train import Trainer, epoch_order, train


# ------------------------------------------------------------------ the data order: a function of (seed, epoch)
def test_epoch_order_changes_with_the_epoch_and_the_seed():
    orders = [epoch_order(50, seed=3, epoch=e) for e in range(4)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(50))  # a permutation
    assert len({tuple(o.tolist()) for o in orders}) == 4  # every epoch its own order
    assert not torch.equal(epoch_order(50, seed=4, epoch=0), orders[0])  # and the seed counts
    assert torch.equal(epoch_order(50, seed=3, epoch=2), orders[2])  # a function of (seed, epoch) alone


def test_training_visits_a_new_order_each_epoch(tiny, tmp_path, monkeypatch):
    """The loop draws each epoch's order for that epoch: the first batches of epochs 1, 2, 3 are not the same."""
    seen: list[torch.Tensor] = []
    original = Trainer._batch

    def recording(self, order, b):
        if b == 0:
            seen.append(order.clone())
        return original(self, order, b)

    monkeypatch.setattr(Trainer, "_batch", recording)
    train(tiny(epochs=3, batch_size=64, log_every=100, checkpoint_every=0, image_every=100), tmp_path / "run",
          progress=False)
    assert len(seen) == 3
    assert len({tuple(o.tolist()) for o in seen}) == 3
    for o in seen:
        assert sorted(o.tolist()) == list(range(len(o)))


# ------------------------------------------------------------------ atomic writes: temp sibling, fsync, rename
def test_atomic_write_fsyncs_a_sibling_temp_file_then_renames_it(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.fspath(src), os.fspath(dst)))
        assert not target.exists()  # nothing was written under the final name before the rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fileio.atomic_write(target, "new")
    assert target.read_text() == "new"
    kinds = [e[0] for e in events]
    assert kinds.count("replace") == 1
    r = kinds.index("replace")
    _, tmp_inode, src, dst = events[r]
    assert os.path.dirname(src) == str(tmp_path) and src != dst == str(target)  # a sibling: same file system
    assert ("fsync", tmp_inode) in events[:r]  # the temp file's data reached the disk before its rename
    assert ("fsync", os.stat(tmp_path).st_ino) in events[r + 1:]  # and the rename itself after
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temp file left


def test_atomic_write_failing_midway_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old content")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        fileio.atomic_write(target, b"new content, longer")
    assert target.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # the temp file is cleaned up


# ------------------------------------------------------------------ the report: active units and the standard error
def _stub_vae(latent_dim: int) -> SimpleNamespace:
    config = SimpleNamespace(kl_weight=1.0, latent_dim=latent_dim, likelihood="gaussian")
    return SimpleNamespace(config=config, likelihood_type=SimpleNamespace(support="continuous"))


def _per_image(log_px: list[float]) -> dict[str, torch.Tensor]:
    keys = ("kl", "recon", "density_recon", "loss", "log_px", "density_log_px", "mse", "psnr", "ssim")  # per image
    v = {k: torch.zeros(len(log_px), dtype=torch.float64) for k in keys}
    v["log_px"] = torch.tensor(log_px, dtype=torch.float64)
    return v


def test_iw_standard_error_is_the_sample_std_over_sqrt_n():
    log_px = [-10.0, -12.0, -13.0, -17.0, -18.0]  # nll 10, 12, 13, 17, 18: mean 14, sample variance 11.5
    r = ev._report(_stub_vae(2), _per_image(log_px), torch.zeros(2), torch.zeros(2), dims=4, iw_samples=5)
    assert r["nll_iw_nats"] == pytest.approx(14.0)
    assert r["nll_iw_stderr"] == pytest.approx(math.sqrt(11.5 / 5), rel=1e-12)
    one = ev._report(_stub_vae(2), _per_image([-3.0]), torch.zeros(2), torch.zeros(2), dims=4, iw_samples=5)
    assert one["nll_iw_stderr"] is None


def test_active_units_threshold_is_burdas_0_01(tiny, monkeypatch):
    """Posterior means +-s_u over images (population variance s_u^2 exactly) straddling 0.01 and 0.1."""
    variances = torch.tensor([0.0, 0.005, 0.0125, 0.05, 0.09, 0.2])  # active above 0.01: the last four
    vae = VAE(tiny(latent_dim=len(variances))).eval()
    images = torch.zeros(20, 1, 32, 32, dtype=torch.uint8)
    images[::2] = 255  # first pixel says the sign of each image's means

    def encode(x):
        sign = 2 * x[:, 0, 0, 0] - 1  # (B,) +-1, half of each
        return DiagonalGaussian(sign[:, None] * variances.sqrt(), torch.zeros(len(x), len(variances)))

    monkeypatch.setattr(vae, "encode", encode)
    assert ev.evaluate(vae, images, batch_size=7)["active_units"] == 4


# ------------------------------------------------------------------ training: the flip axis, the reparameterisation
def test_hflip_mirrors_left_and_right(tiny, tmp_path, monkeypatch):
    """Every training image is itself or its left-right mirror (never upside down), and both happen."""
    outcomes = {"same": 0, "mirrored": 0}
    original = Trainer._batch

    def checking(self, order, b):
        x, eps, count = original(self, order, b)
        idx = order[b * self.state.global_batch:(b + 1) * self.state.global_batch]
        raw = to_float(self.train_images[idx], self.device)  # (B, C, H, W) before any flip
        for xi, ri in zip(x, raw):
            assert not torch.equal(ri.flip(-1), ri.flip(-2))  # a face is not symmetric both ways
            same, mirrored = torch.equal(xi, ri), torch.equal(xi, ri.flip(-1))
            assert same or mirrored
            outcomes["same" if same else "mirrored"] += 1
        return x, eps, count

    monkeypatch.setattr(Trainer, "_batch", checking)
    train(tiny(hflip=True, max_steps=3, log_every=100, checkpoint_every=0, image_every=100), tmp_path / "run",
          progress=False)
    assert outcomes["same"] > 10 and outcomes["mirrored"] > 10  # 120 images, half flipped on average


def test_training_path_sample_is_mean_plus_std_times_eps(tiny):
    """vae(x, eps=eps) decodes z = mean + exp(logvar / 2) * eps, the standard deviation (not the variance)."""
    torch.manual_seed(0)
    vae = VAE(tiny(latent_dim=5)).eval()
    x = torch.rand(3, 1, 32, 32)
    eps = torch.randn(3, 5)
    decoded: list[torch.Tensor] = []
    decode = vae.decode
    vae.decode = lambda z: decoded.append(z) or decode(z)
    with torch.no_grad():
        vae.encoder.to_logvar.bias.fill_(-1.5)  # std = exp(-0.75), variance exp(-1.5): far apart
        posterior = vae.encode(x)
        vae(x, eps=eps)
    expected = posterior.mean + torch.exp(0.5 * posterior.logvar) * eps
    assert not torch.allclose(expected, posterior.mean + posterior.logvar.exp() * eps, atol=1e-2)
    torch.testing.assert_close(decoded[0], expected, rtol=1e-6, atol=1e-6)


def test_posterior_sample_uses_the_standard_deviation():
    mean, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[-1.0, 2.0]])
    torch.manual_seed(5)
    z = DiagonalGaussian(mean, logvar).sample(4)
    torch.manual_seed(5)
    eps = torch.randn(4, 1, 2)
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * eps)


def test_atomic_write_that_cannot_open_its_temp_file_raises_that_error(tmp_path, monkeypatch):
    """The clean-up of a temp file that was never made must not hide the real error behind a FileNotFoundError."""

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(fileio.os, "open", refused)
        with pytest.raises(PermissionError):
            fileio.atomic_write(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []
