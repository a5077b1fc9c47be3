"""Checks that need a CUDA GPU: skipped elsewhere (CI has none). On a GPU machine: `pytest tests/test_gpu.py`.

They check on the real device what the CPU tests can only imitate: no training step waits for the GPU (torch's own
sync detector, not a count of Python-level reads), the likelihoods' device-side formulas equal the CPU's, and
evaluation on the GPU gives the CPU's figures.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch

from conftest import tiny_config
from facevae.distributions import LIKELIHOODS, DiscretizedLogistic, gaussian_bin_log_mass
from facevae.evaluate import evaluate
from facevae.run import Run
from facevae.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _syncs_while_training(out, **overrides) -> tuple[list[str], dict]:
    """Train a tiny model on the GPU with torch's sync debug mode on; the places (file:line) that synchronised."""
    config = tiny_config(device="cuda", epochs=1, log_every=1000, checkpoint_every=0, hflip=True, **overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            record = train(config, out, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return places, record


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_training_steps_do_not_wait_for_the_gpu(tmp_path, likelihood):
    """An epoch of 10 steps synchronises exactly as often as one of 5: no step waits for the device (the syncs left
    are the epoch's end, its evaluation and its files). Every likelihood, in the default precision (bf16 on CUDA)."""
    _syncs_while_training(tmp_path / "warm-up", likelihood=likelihood)  # CUDA's and cuDNN's one-time set-up
    syncs = {}
    for batch_size in (8, 16):
        syncs[batch_size], record = _syncs_while_training(tmp_path / f"b{batch_size}", batch_size=batch_size,
                                                          likelihood=likelihood)
        assert record["skipped_steps"] == 0 and math.isfinite(record["test_density_elbo_nats"])
    extra = Counter(syncs[8]) - Counter(syncs[16])  # the places that synchronised more often in more steps
    assert len(syncs[8]) == len(syncs[16]), f"{len(syncs[8])} syncs in 10 steps, {len(syncs[16])} in 5: {extra}"


def test_gaussian_8bit_mass_on_the_gpu_equals_the_cpu():
    """The exact 8-bit Gaussian on CUDA (both of its paths: few wide bins picked by index, many blended) equals the
    float64 CPU value per pixel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 16, 16), generator=g).double() / 255
    for sigma in (0.004, 0.5):  # about 1% of the bins wide, and all of them
        mu = (x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        cpu = gaussian_bin_log_mass(x, mu, torch.tensor(math.log(sigma), dtype=torch.float64))
        gpu = gaussian_bin_log_mass(x.float().cuda(), mu.float().cuda(), torch.tensor(math.log(sigma)).cuda())
        torch.testing.assert_close(gpu.double().cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_discretized_logistic_mean_on_the_gpu_equals_the_cpu():
    """On CUDA the mean takes the branch-free form (no boolean index): the same values as the CPU's picked path."""
    mu = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    log_scale = torch.linspace(math.log(1e-4), math.log(0.2), 192, dtype=torch.float64).view(3, 1, 8, 8)
    cpu = DiscretizedLogistic(mu, log_scale, min_scale=1e-5).mean
    gpu = DiscretizedLogistic(mu.cuda(), log_scale.cuda(), min_scale=1e-5).mean
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12)


def test_evaluation_on_the_gpu_gives_the_cpu_figures(tmp_path):
    """A model trained on the CPU, evaluated in float32 on both devices: the deterministic figures agree (the ELBO's
    sampled z differs between devices' generators, so it is compared within its Monte Carlo error)."""
    train(tiny_config(device="cpu", precision="float32", epochs=3), tmp_path / "run", progress=False)
    run = Run(tmp_path / "run")
    vae = run.load_model()
    images = run.data(vae.config, "test")
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # float32 against float32
    try:
        torch.manual_seed(0)
        cpu = evaluate(vae, images, iw_samples=50, device="cpu")
        torch.manual_seed(0)
        gpu = evaluate(vae.cuda(), images, iw_samples=50, device="cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for key in ("psnr_db", "ssim", "mse"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-4), key
    mc = math.hypot(cpu["elbo_mc_stderr"], gpu["elbo_mc_stderr"])  # the one-z ELBO's Monte Carlo error (K = 50: less)
    for key in ("elbo_nats", "nll_iw_nats", "density_elbo_nats"):
        assert abs(gpu[key] - cpu[key]) < 6 * mc + 1e-3, (key, gpu[key], cpu[key], mc)


def test_fp16_training_through_the_loss_scaler(tmp_path):
    """fp16 (CUDA only) trains through the loss scaler: its gradients are unscaled before the finite check and the
    step, so the weights move and stay finite (early steps that overflow at the scaler's first scale are skipped)."""
    record = train(tiny_config(device="cuda", precision="fp16", epochs=2, batch_size=8), tmp_path / "run",
                   progress=False)
    assert record["skipped_steps"] < 10 and math.isfinite(record["test_density_elbo_nats"])
    weights = Run(tmp_path / "run").load_model().state_dict()
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
