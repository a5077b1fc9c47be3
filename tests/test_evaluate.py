"""The metrics report: the importance-weighted bound against an exact likelihood, batching, units, PSNR/SSIM, active
units, FID (the distance against scipy, the plumbing with a stand-in feature network) and every bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from facevae import fid
from facevae.checkpoint import save_model
from facevae.run import load_run
from facevae.cli import main
from facevae.data import open_dataset
from facevae.device import resolve_precision
from facevae.distributions import DiagonalGaussian, Gaussian
from facevae.evaluate import evaluate, evaluate_run
from facevae.metrics import ssim
from facevae.model import VAE
from conftest import density_iw
from facevae.metrics import bits_per_dim, importance_samples, iw_bound, psnr
from facevae.model import elbo


# ---------------------------------------------------------------- a linear Gaussian model with an exact log p(x)
class LinearGaussian:
    """x = W z + b + N(0, s^2 I), z ~ N(0, I): log p(x) = log N(x; b, W W^T + s^2 I) exactly.

    W has orthogonal columns, so the exact posterior is diagonal: covariance (I + W^T W / s^2)^-1 and mean that
    times W^T (x - b) / s^2. The encoder returns it with its mean moved by `shift` posterior standard deviations and
    its variance multiplied by `var_scale` (shift 0, var_scale 1: the exact posterior). Duck-types VAE.encode/decode.
    """

    def __init__(self, *, shape: tuple[int, int, int] = (1, 4, 4), scales: tuple[float, ...] = (2.0, 1.0, 0.5),
                 s: float = 0.5, shift: float = 0.0, var_scale: float = 1.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(math.prod(shape), len(scales), generator=g, dtype=torch.float64))
        self.W = q * torch.tensor(scales, dtype=torch.float64)  # (D, d), orthogonal columns
        self.b = torch.rand(math.prod(shape), generator=g, dtype=torch.float64)  # (D,)
        self.s, self.shape, self.shift, self.var_scale = s, shape, shift, var_scale

    def exact_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (B, d) of p(z|x), float64."""
        var = 1 / (1 + (self.W**2).sum(0) / self.s**2)  # (d,): diag of (I + W^T W / s^2)^-1
        mean = (x.double().flatten(1) - self.b) @ self.W / self.s**2 * var  # (B, d)
        return mean, var.expand_as(mean)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, var = self.exact_posterior(x)
        return DiagonalGaussian((mean + self.shift * var.sqrt()).float(), torch.log(var * self.var_scale).float())

    def decode(self, z: torch.Tensor) -> Gaussian:
        mu = (z.double() @ self.W.T + self.b).float().view(-1, *self.shape)  # (B, C, H, W)
        return Gaussian(mu, math.log(self.s))

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """The exact log p(x), (B,) nats, float64."""
        cov = self.W @ self.W.T + self.s**2 * torch.eye(len(self.b), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.double().flatten(1))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n images (n, C, H, W) drawn from the model itself."""
        z = torch.randn(n, self.W.shape[1], generator=generator, dtype=torch.float64)
        noise = self.s * torch.randn(n, len(self.b), generator=generator, dtype=torch.float64)
        return (z @ self.W.T + self.b + noise).float().view(n, *self.shape)


def test_exact_posterior_makes_elbo_and_every_iw_estimate_exact():
    model = LinearGaussian()
    x = model.sample(32, torch.Generator().manual_seed(1))
    exact = model.log_px(x)  # (32,)
    torch.manual_seed(0)
    for k in (1, 5):  # p(x, z) / q(z|x) = p(x) for every z: no Monte Carlo error at all
        assert torch.allclose(density_iw(model, x, k).double(), exact, atol=1e-4)
    # The ELBO: E_q[log p(x|z)] in closed form minus the closed-form KL equals log p(x).
    q = model.encode(x)
    mean, var = model.exact_posterior(x)
    residual = ((x.double().flatten(1) - mean @ model.W.T - model.b) ** 2).sum(1)
    expected_recon = (-0.5 * (residual + (var * (model.W**2).sum(0)).sum(1)) / model.s**2
                      - 0.5 * len(model.b) * math.log(2 * math.pi * model.s**2))
    assert torch.allclose(expected_recon - q.kl().double(), exact, atol=1e-4)
    # And objectives.elbo, one sample at a time, averages to it.
    draws = torch.stack([elbo(q, model.decode(q.sample()), x).elbo.double() for _ in range(2000)])  # (2000, 32)
    err = draws.mean(0) - exact
    assert (err.abs() < 4 * draws.std(0) / math.sqrt(2000) + 1e-4).all()


def iw_figures(ks: tuple[int, ...] = (1, 10, 100, 1000)) -> dict[int, tuple[float, float, float]]:
    """Exact log p(x) and the IW estimate, both averaged over 64 images, and the gap's standard error, for each K."""
    model = LinearGaussian(shift=0.5, var_scale=1.5)
    x = model.sample(64, torch.Generator().manual_seed(1))
    exact = model.log_px(x)
    torch.manual_seed(0)
    out = {}
    for k in ks:
        repeats = 40 if k < 1000 else 8
        est = torch.stack([density_iw(model, x, k).double() for _ in range(repeats)])  # (repeats, 64)
        gap = (exact - est).flatten()
        out[k] = (exact.mean().item(), est.mean().item(), gap.std().item() / math.sqrt(len(gap)))
    return out


def test_iw_bound_converges_to_the_exact_log_likelihood_from_below():
    model = LinearGaussian(shift=0.5, var_scale=1.5)
    x = model.sample(64, torch.Generator().manual_seed(1))
    mean, var = model.exact_posterior(x)
    q = model.encode(x)
    qv = q.logvar.double().exp()
    # E[L_1] = log p(x) - KL(q || p(z|x)): the K = 1 gap is this KL, in closed form for two diagonal Gaussians.
    kl_to_posterior = 0.5 * (qv / var + (q.mean.double() - mean) ** 2 / var - 1 - qv.log() + var.log()).sum(1).mean()
    figures = iw_figures()
    print("\nlinear Gaussian, 64 images, D = 16, latent 3: K, exact log p(x), IW estimate, gap +- stderr (nats)")
    for k, (exact, est, se) in figures.items():
        print(f"  K={k:5d}  exact {exact:.4f}  estimate {est:.4f}  gap {exact - est:+.4f} +- {se:.4f}")
    gaps = {k: exact - est for k, (exact, est, _) in figures.items()}
    ses = {k: se for k, (_, _, se) in figures.items()}
    for k in figures:
        assert gaps[k] > -3 * ses[k], k  # below the exact value in expectation, for every K
    assert gaps[1] == pytest.approx(kl_to_posterior.item(), abs=3 * ses[1])
    assert gaps[1] > gaps[10] > gaps[100] - 3 * ses[100]  # rises with K ...
    assert abs(gaps[1000]) < 0.01 and abs(gaps[100]) < 0.02  # ... to the exact value


# ---------------------------------------------------------------- a tiny trained VAE
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[VAE, torch.Tensor]:
    """The tiny VAE after 30 Adam steps on the bundled training faces, in eval mode, and the 20 test faces."""
    from conftest import tiny_config

    torch.manual_seed(0)
    vae = VAE(tiny_config())
    train = open_dataset("lfw", split="train", size=32, progress=False).images.float() / 255  # (80, 1, 32, 32)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for step in range(30):
        loss = vae(train[(step % 2) * 40:(step % 2 + 1) * 40]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval(), open_dataset("lfw", split="test", size=32, progress=False).images


def iw_8bit(vae, x: torch.Tensor, samples: int) -> torch.Tensor:
    """The importance-weighted bound on log P(x) of 8-bit images, (B,) nats."""
    s = importance_samples(vae, x, samples)
    return iw_bound(s.log_prob_8bit, s.log_ratio)


def test_bound_does_not_decrease_with_k_on_a_trained_model(trained):
    vae, images = trained
    x = images.float() / 255
    torch.manual_seed(0)
    with torch.inference_mode():
        bounds = {k: torch.stack([iw_8bit(vae, x, k) for _ in range(3)]).double().mean(0)
                  for k in (1, 10, 100)}  # (20,) each: log P(x) estimates per image
    for lo, hi in ((1, 10), (10, 100)):
        diff = bounds[hi] - bounds[lo]
        assert diff.mean() > -3 * diff.std() / math.sqrt(len(diff)), (lo, hi)
    assert (bounds[100] - bounds[1]).mean() > 0  # the posterior of a briefly trained model is far from exact


def test_k_equals_one_is_the_elbo_and_reports_are_consistent(trained):
    vae, images = trained
    torch.manual_seed(0)
    r = evaluate(vae, images, iw_samples=1, batch_size=8)
    assert r["nll_iw_nats"] == -r["elbo_nats"] and r["nll_iw_bpd"] == r["elbo_bpd"]
    assert r["elbo_nats"] == pytest.approx(r["recon_nats"] - r["kl_nats"], rel=1e-6)
    assert r["images"] == 20 and r["dims"] == 32 * 32 and r["iw_samples"] == 1
    assert sum(r["kl_per_dim_nats"]) == pytest.approx(r["kl_nats"], rel=1e-4)
    torch.manual_seed(0)
    r100 = evaluate(vae, images, iw_samples=100, batch_size=256)
    assert r100["nll_iw_nats"] < -r["elbo_nats"]  # a tighter bound than the ELBO
    assert r100["nll_iw_stderr"] > 0


def test_decoder_batches_are_bounded_and_run_in_inference_mode(trained):
    vae, images = trained
    seen: list[tuple[int, bool]] = []
    hook = vae.decoder.register_forward_hook(
        lambda mod, inp, out: seen.append((inp[0].shape[0], torch.is_inference_mode_enabled())))
    try:
        reports = {}
        for k, batch in ((1, 7), (37, 16), (100, 64), (5, 3), (64, 256)):
            seen.clear()
            torch.manual_seed(0)
            reports[(k, batch)] = evaluate(vae, images, iw_samples=k, batch_size=batch)
            assert max(b for b, _ in seen) <= batch, (k, batch)
            assert all(mode for _, mode in seen)
            # each image is decoded at a sample and at the mean, plus K times for the bound (K > 1); nothing else
            # (the likelihood's support is its class's declaration)
            assert sum(b for b, _ in seen) == len(images) * (2 + (k if k > 1 else 0))
    finally:
        hook.remove()
    # What does not depend on random draws does not depend on the batch size either.
    a, b = reports[(1, 7)], reports[(64, 256)]
    for key in ("kl_nats", "psnr_db", "ssim", "mse", "active_units"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_bf16_evaluation_sums_in_float32(trained):
    vae, images = trained
    torch.manual_seed(0)
    full = evaluate(vae, images, iw_samples=4, batch_size=32)
    torch.manual_seed(0)
    half = evaluate(vae, images, iw_samples=4, batch_size=32, precision="bf16")
    for key in ("elbo_nats", "nll_iw_nats", "kl_nats"):
        assert math.isfinite(half[key])
        assert half[key] == pytest.approx(full[key], rel=0.02, abs=0.5), key


# ---------------------------------------------------------------- units, PSNR, SSIM, active units
@pytest.mark.parametrize("likelihood", ["gaussian", "continuous_bernoulli", "bernoulli", "discretized_logistic"])
def test_bits_per_dim_are_nats_of_the_8bit_probability(likelihood, tiny):
    """bits/dim = -log P(x) / (D ln 2) with no dequantisation term; the ELBO terms add up; the training density's
    figures are reported apart; a Bernoulli on grey levels has no 8-bit figures."""
    assert bits_per_dim(-1000.0, 12288) == pytest.approx(1000 / (12288 * math.log(2)))
    torch.manual_seed(0)
    vae = VAE(tiny(likelihood=likelihood)).eval()
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    r = evaluate(vae, images, iw_samples=3, batch_size=4)
    assert r["density_elbo_nats"] == pytest.approx(r["density_recon_nats"] - r["kl_nats"], rel=1e-6)
    assert r["loss_nats"] == pytest.approx(-r["density_elbo_nats"], rel=1e-6)  # kl_weight 1
    if likelihood == "bernoulli":
        assert all(r[k] is None for k in ("elbo_nats", "recon_nats", "nll_iw_nats", "elbo_bpd", "nll_iw_bpd"))
        return
    assert r["elbo_nats"] == pytest.approx(r["recon_nats"] - r["kl_nats"], rel=1e-6)
    assert r["recon_nats"] < 0 and r["nll_iw_nats"] > 0  # a probability: log P(x|z) <= 0
    for nats, bpd in ((r["elbo_nats"], r["elbo_bpd"]), (-r["nll_iw_nats"], r["nll_iw_bpd"])):
        assert bpd == pytest.approx(-nats / (1024 * math.log(2)), rel=1e-9)
    same = likelihood == "discretized_logistic"  # its density is already the 8-bit probability
    assert (r["recon_nats"] == pytest.approx(r["density_recon_nats"], rel=1e-6)) == same


def _torchmetrics_ssim_valid(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torchmetrics' SSIM map (reflect-padded to the full image) averaged over the valid region, per image (B,).

    Inside the 5-pixel border the padded map equals the unpadded one; the mean over it is the convention of Wang et
    al.'s reference code and scikit-image, which facevae follows (torchmetrics' own mean includes the border).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none", return_full_image=True)
    return full[..., 5:-5, 5:-5].flatten(1).mean(1)


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 1, 16, 16), (2, 3, 64, 48)])
def test_psnr_and_ssim_against_torchmetrics_and_scikit_image(shape):
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g)
    smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # a structured, imperfect "reconstruction"
    y = (0.7 * smooth + 0.3 * torch.rand(shape, generator=g)).clamp(0, 1)
    ours = ssim(y, x)
    assert torch.allclose(ours, _torchmetrics_ssim_valid(y, x), atol=1e-5)
    by_skimage = [structural_similarity(a.double().numpy(), b.double().numpy(), data_range=1.0, channel_axis=0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                  for a, b in zip(y, x)]
    assert torch.allclose(ours.double(), torch.tensor(by_skimage), atol=1e-5)
    expected_psnr = peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert torch.allclose(psnr(y, x), expected_psnr, atol=1e-4)
    # Hand-computed cases: identical images; a uniform offset of 0.1 is an MSE of 0.01, 20 dB.
    assert torch.allclose(ssim(x, x), torch.ones(shape[0]), atol=1e-6)
    assert torch.allclose(psnr((x * 0.8 + 0.1), x * 0.8), torch.full((shape[0],), 20.0), atol=1e-3)


def test_report_psnr_and_ssim_are_those_of_the_posterior_mean_reconstruction(trained):
    from torchmetrics.functional.image import peak_signal_noise_ratio

    vae, images = trained
    r = evaluate(vae, images, batch_size=6)
    x = images.float() / 255
    rec = vae.reconstruct(x)
    assert r["psnr_db"] == pytest.approx(peak_signal_noise_ratio(rec, x, data_range=1.0, reduction="none",
                                                                 dim=(1, 2, 3)).mean().item(), rel=1e-5)
    assert r["ssim"] == pytest.approx(_torchmetrics_ssim_valid(rec, x).mean().item(), rel=1e-4)
    assert r["mse"] == pytest.approx(((rec - x) ** 2).mean().item(), rel=1e-5)


def test_active_units_with_known_dead_dimensions(tiny):
    torch.manual_seed(0)
    vae = VAE(tiny(latent_dim=6)).eval()
    images = torch.randint(0, 256, (24, 1, 32, 32), dtype=torch.uint8)
    dead = [0, 3, 4]
    with torch.no_grad():
        vae.encoder.to_mean.weight.mul_(50.0)  # the live units' means vary a lot across images
        vae.encoder.to_mean.weight[dead] = 0.0
        vae.encoder.to_mean.bias[dead] = 0.0  # E_q[z_u | x] = 0 for every x: no activity
    r = evaluate(vae, images, batch_size=10)
    assert r["active_units"] == 6 - len(dead)
    with torch.no_grad():
        vae.encoder.to_mean.weight.zero_()
    assert evaluate(vae, images, batch_size=10)["active_units"] == 0


# ---------------------------------------------------------------- FID
def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root, on features (N, F)."""
    from scipy import linalg

    mu1, mu2, c1, c2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * root))


def test_frechet_distance_against_scipy():
    rng = np.random.default_rng(0)
    for n, f in ((200, 16), (500, 64)):
        a = rng.normal(size=(n, f)) @ rng.normal(size=(f, f))
        b = 0.8 * rng.normal(size=(n, f)) @ rng.normal(size=(f, f)) + 0.3
        ours = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert ours == pytest.approx(_scipy_frechet(a, b), rel=1e-7)
    # One dimension by hand: (m1 - m2)^2 + v1 + v2 - 2 sqrt(v1 v2).
    assert fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == \
        pytest.approx(4 + 4 + 9 - 2 * 6)
    # Identical distributions, and fewer images than features (singular covariances): 0, never negative.
    a = rng.normal(size=(10, 32))
    assert fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), a.mean(0), np.cov(a, rowvar=False)) == \
        pytest.approx(0, abs=1e-9)


def test_feature_moments_match_numpy():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(103, 8)) * 3 + 1e4  # a large offset: the shifted sums keep their precision
    moments = fid.FeatureMoments()
    for part in np.split(feats, [10, 11, 60]):  # uneven batches
        moments.add(torch.from_numpy(part).float())
    mean, cov = moments.mean_cov()
    f32 = feats.astype(np.float32).astype(np.float64)
    assert np.allclose(mean, f32.mean(0), rtol=1e-12) and np.allclose(cov, np.cov(f32, rowvar=False), rtol=1e-9)


class StandIn(torch.nn.Module):
    """A fixed random feature network with the Inception extractor's interface: (B, 3, H, W) uint8 -> (B, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.calls: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append((images.dtype, tuple(images.shape)))
        return torch.relu(self.conv(images.float() / 128 - 1)).mean((2, 3))


def test_fid_plumbing_with_a_stand_in_network(trained):
    vae, images = trained
    net = StandIn()
    r = fid.fid_report(vae, images, net, batch_size=8, seed=3, features="stand-in")
    assert set(r) == {"fid_recon", "fid_samples", "fid_images", "fid_features"} and r["fid_images"] == 20
    assert all(dtype == torch.uint8 and shape[1] == 3 and shape[0] <= 8 for dtype, shape in net.calls)
    assert len(net.calls) == 3 * 3  # real, reconstructions and samples, in 3 batches of at most 8
    # The same number by hand: features of the real images and of the rounded posterior-mean reconstructions.
    with torch.no_grad():
        real = net(images.expand(-1, 3, -1, -1)).double().numpy()
        rec = (vae.reconstruct(images.float() / 255) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        rec = net(rec).double().numpy()
    expected = fid.frechet_distance(real.mean(0), np.cov(real, rowvar=False), rec.mean(0), np.cov(rec, rowvar=False))
    assert r["fid_recon"] == pytest.approx(expected, rel=1e-5)
    again = fid.fid_report(vae, images, net, batch_size=20, seed=3)
    assert again["fid_samples"] == pytest.approx(r["fid_samples"], rel=1e-5)  # seeded prior draws, any batch size
    assert r["fid_recon"] >= 0 and r["fid_samples"] >= 0


# ---------------------------------------------------------------- evaluate_run and the command line
@pytest.fixture(scope="module")
def run_dir(trained, tmp_path_factory) -> Path:
    """A run directory holding the trained tiny model (model.safetensors and config.toml only)."""
    out = tmp_path_factory.mktemp("eval-run")
    vae, _ = trained
    save_model(vae, out / "model.safetensors")
    (out / "config.toml").write_text(vae.config.to_toml())
    return out


def test_evaluate_run_is_seeded_and_notes_missing_fid(run_dir):
    first = evaluate_run(run_dir, iw_samples=5, limit=12, batch_size=16)
    second = evaluate_run(run_dir, iw_samples=5, limit=12, batch_size=16)
    assert first["nll_iw_nats"] == second["nll_iw_nats"] and first["images"] == 12
    assert "fid_recon" not in first and "--fid-weights" in first["fid_note"] and "facevae[fid]" in first["fid_note"]
    assert first["settings"]["device"] == "cpu"
    assert first["settings"]["precision"] == resolve_precision(load_run(run_dir).config.precision, torch.device("cpu"))


def test_only_a_full_evaluation_of_the_test_split_writes_eval_json(run_dir, capsys):
    eval_json = run_dir / "eval.json"
    full = evaluate_run(run_dir, iw_samples=2)
    assert json.loads(eval_json.read_text())["nll_iw_nats"] == full["nll_iw_nats"] and full["images"] == 20
    kept = eval_json.read_bytes()
    for argv in (["--limit", "5"], ["--split", "train"], ["--split", "test", "--limit", "20"]):
        assert main(["evaluate", str(run_dir), *argv]) == 0
        assert eval_json.read_bytes() == kept, argv  # a partial evaluation leaves compare's figures alone
        assert "eval.json left as it was" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--iw-samples", "3"]) == 0
    assert json.loads(eval_json.read_text())["iw_samples"] == 3 and "wrote" in capsys.readouterr().err


def test_evaluating_an_unfinished_run_says_so(run_dir, tmp_path, capsys):
    from facevae.checkpoint import model_bytes
    from facevae.compare import markdown_table

    vae = load_run(run_dir)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    progress = {"step": 10, "epoch": 0, "epochs": 1000, "finished": False}
    save_model(vae, unfinished / "model.safetensors", data=model_bytes(vae, training=progress))
    (unfinished / "config.toml").write_text(vae.config.to_toml())
    assert main(["evaluate", str(unfinished), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["training"] == progress
    assert json.loads((unfinished / "eval.json").read_text())["training"] == progress
    assert "training is unfinished (epoch 0 of 1000, step 10)" in out.err
    done = {**json.loads((unfinished / "eval.json").read_text()), "training": {**progress, "epoch": 1000,
                                                                              "finished": True}}
    table = markdown_table(["early", "done"], [json.loads((unfinished / "eval.json").read_text()), done])
    assert "| trained | epoch 0 / 1000 (unfinished, step 10) | epoch 1000 / 1000 |" in table
    assert "Note: early: training unfinished" in table and "done: training" not in table


def test_evaluate_run_reports_fid_with_a_feature_network(run_dir, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"checked by the stand-in loader")
    calls = []

    def fake_loader(path, device):
        calls.append(Path(path))
        return StandIn(), None

    monkeypatch.setattr(fid, "load_extractor", fake_loader)
    assert main(["evaluate", str(run_dir), "--fid-weights", str(weights), "--limit", "10", "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert calls == [weights]
    assert report["fid_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert report["fid_images"] == 10 and report["fid_recon"] >= 0 and report["fid_samples"] >= 0
    assert "fid_note" not in report and "FID reconstructions (10 vs 10 images" in out.err


def _signature_weights(path: Path) -> Path:
    """A small file with the names and shapes the check looks for (not the real weights)."""
    torch.save({name: torch.zeros(shape) for name, shape in fid.SIGNATURE.items()}, path)
    return path


def test_fid_without_the_extra_is_a_note_not_an_error(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if the extra were not installed
    weights = _signature_weights(tmp_path / "inception.pth")
    assert main(["evaluate", str(run_dir), "--fid-weights", str(weights), "--limit", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "fid_recon" not in report and "facevae[fid]" in report["fid_note"]


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def _bad_weights(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"\x00not a weights file" * 10)
    elif kind == "safetensors":
        save_file({"fc.bias": torch.zeros(1008)}, str(path))
    elif kind == "wrong-shapes":
        torch.save({name: torch.zeros(2) for name in fid.SIGNATURE}, path)
    elif kind == "other-network":
        torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(_Exploit(str(tmp_path / "pwned"))))
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file"), ("directory", "is not a file"), ("garbage", "not a PyTorch weights file"),
    ("safetensors", "not a PyTorch weights file"), ("wrong-shapes", "not the inception-2015-12-05 weights"),
    ("other-network", "not the inception-2015-12-05 weights"), ("pickle", "not a PyTorch weights file"),
])
def test_bad_fid_weights_are_one_line_and_exit_2(kind, message, run_dir, tmp_path, capsys):
    weights = _bad_weights(kind, tmp_path)
    assert main(["evaluate", str(run_dir), "--fid-weights", str(weights), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("facevae: error:")
    assert not (tmp_path / "pwned").exists()  # the pickle was refused, never run


def test_bad_weights_in_a_real_process_print_one_line_and_no_traceback(run_dir, tmp_path):
    weights = _bad_weights("pickle", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "facevae", "evaluate", str(run_dir), "--fid-weights", str(weights)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr  # no torch warning either
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("argv,message", [
    (["--iw-samples", "0"], "--iw-samples must be at least 1"),
    (["--iw-samples", "-5"], "--iw-samples must be at least 1"),
    (["--limit", "21"], "--limit 21 is outside 1..20"),
    (["--limit", "0"], "--limit 0 is outside"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--split", "valid"], "no 'valid' split"),
    (["--split", "holdout"], "no 'holdout' split"),
    (["--iw-samples", "many"], "invalid int value"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(argv, message, run_dir, capsys):
    assert main(["evaluate", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("facevae: error:")


@pytest.mark.parametrize("where", ["empty", "nowhere"])
def test_evaluate_without_a_model_is_one_line_and_exit_2(where, tmp_path, capsys):
    target = tmp_path if where == "empty" else tmp_path / "nowhere"
    assert main(["evaluate", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("holds no trained model" in err or "does not exist" in err)
