"""Small, fast tests written against the mutants that `make mutate` (tools/mutate.py, issue 18) found alive: each
asserts real behaviour, and each was checked to fail on the mutant it names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from facevae import evaluate as ev
from facevae.data.cache import Cache, seeded_split
from facevae.distributions import DiagonalGaussian, Gaussian
from facevae.metrics import importance_samples
from facevae.errors import UserError
from facevae.model import VAE
from facevae.train import train


class _LinearGaussianModel:
    """A latent model small enough to reason about: q(z|x) = N(0, I), p(x|z) = N(z_0, 1) per pixel; records the
    number of images of each decoder call."""

    def __init__(self):
        self.decoded: list[int] = []
        self.encoded = 0

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self.encoded += 1
        return DiagonalGaussian(torch.zeros(len(x), 2), torch.zeros(len(x), 2))

    def decode(self, z: torch.Tensor) -> Gaussian:
        self.decoded.append(len(z))
        return Gaussian(z[:, :1, None, None].expand(-1, 1, 2, 2).contiguous())


# ------------------------------------------------------------------ metrics.importance_samples
def test_importance_samples_decode_at_most_chunk_samples_at_a_time():
    """chunk bounds the decoder's batch (its memory): chunk=1 decodes one sample of each image per call, chunk=0 is
    taken as 1, and the K samples are all scored."""
    x = torch.rand(3, 1, 2, 2)
    for chunk, calls in ((1, [3] * 4), (0, [3] * 4), (3, [9, 3]), (None, [12]), (10, [12])):
        model = _LinearGaussianModel()
        s = importance_samples(model, x, 4, chunk=chunk)
        assert model.decoded == calls, chunk
        assert s.log_density.shape == s.log_ratio.shape == (4, 3)


def test_importance_samples_use_the_posterior_given():
    """A posterior passed in is the proposal (evaluation encodes once for every figure): the encoder is not called,
    and the samples come from it: with a posterior far from N(0, I) the log ratio log p(z) - log q(z|x) is about
    -|mean|^2 / 2 - log std^2 per dimension, not the 0 of q = N(0, I)."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, 2, 2)
    model = _LinearGaussianModel()
    mean = torch.full((3, 2), 4.0)
    posterior = DiagonalGaussian(mean, torch.full((3, 2), -8.0))  # std e^-4: z is 4 within 0.1
    s = importance_samples(model, x, 5, posterior=posterior)
    assert model.encoded == 0
    # log N(z; 0, I) - log N(z; 4, e^-8) per dimension = -z^2/2 + eps^2/2 + logvar/2 with z = 4 + e^-4 eps:
    # about -8 + 1/2 - 4 = -11.5, so -23 for two dimensions (q = N(0, I) would give 0)
    assert torch.allclose(s.log_ratio.mean(), torch.tensor(-23.0), atol=1.0)


# ------------------------------------------------------------------ train and checkpoint: stop, resume, in-process
def _tiny_run(**extra):
    """Two epochs of 10 steps of 8 images, flips on, a checkpoint every 4 steps, a step record every 3."""
    return tiny_config(**{"batch_size": 8, "epochs": 2, "log_every": 3, "checkpoint_every": 4, "image_every": 100,
                          "hflip": True, **extra})


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without the run headers and the timings."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "seconds")} for r in lines if r["kind"] != "run"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run that every stopped and resumed one must match bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_tiny_run(), out, progress=False)
    return out


@pytest.mark.parametrize("stop_at", [3, 14])  # inside the first epoch (before any checkpoint), inside the second
def test_a_run_stopped_and_resumed_in_process_is_bit_identical(reference_run, tmp_path, stop_at):
    """The in-process twin of the SIGKILL test (mutants never reach a subprocess): stop at max_steps, leave what a
    crash leaves (a record past the checkpoint, a half-written line), resume: the same weights, optimiser state and
    records as the uninterrupted run, which needs the data order, the RNG state, the optimiser, the position in the
    epoch and the epoch's running sums all restored."""
    run = tmp_path / "run"
    train(_tiny_run(max_steps=stop_at), run, progress=False)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == stop_at
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "step", "step": stop_at + 1}) + '\n{"kind": "st')
    record = train(_tiny_run(), run, progress=False)
    assert record["step"] == 20 and record["epoch"] == 2
    for name in ("model.safetensors", "checkpoint/model.safetensors", "checkpoint/optimizer.safetensors"):
        a, b = load_file(str(reference_run / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _records(run) == _records(reference_run)


# ------------------------------------------------------------------ data.cache: the splits
def test_seeded_split_is_int8_with_exactly_the_test_count():
    """splits.npy is int8 (one byte an image, as the format says); `test` images are test, drawn by the seed."""
    codes = seeded_split(1000, 100, seed=5)
    assert codes.dtype == np.int8 and codes.shape == (1000,)
    assert (codes == 2).sum() == 100 and (codes == 0).sum() == 900
    assert np.array_equal(codes, seeded_split(1000, 100, seed=5))
    assert not np.array_equal(codes, seeded_split(1000, 100, seed=6))


def _cache(split_names, codes, splits=None) -> Cache:
    manifest = {"split_names": split_names, **({"splits": splits} if splits is not None else {})}
    return Cache(Path("unused"), manifest, np.zeros((len(codes), 1, 2, 2), np.uint8), np.array(codes, np.int8), None)


def test_split_indices_without_split_counts_in_the_manifest():
    """A manifest without "splits" counts: the indices come from the codes alone."""
    cache = _cache(["train", "valid", "test"], [0, 2, 0, 2, 2])
    assert cache.split_indices("test").tolist() == [1, 3, 4]
    assert cache.split_indices("test").dtype == np.int64
    assert cache.split_indices("valid").tolist() == []


def test_a_missing_split_names_only_the_splits_that_have_images():
    """Asking for a split that is absent or empty says which ones have images: a split of one image counts, a split
    of none does not, and one the counts do not mention is taken as present."""
    cache = _cache(["train", "valid", "test"], [0, 0, 2], splits={"train": 2, "valid": 0, "test": 1})
    with pytest.raises(UserError, match=r"no 'valid' split \(it has: train, test\)"):
        cache.split_indices("valid")
    cache = _cache(["train", "test"], [0, 0, 1], splits={"train": 2})
    with pytest.raises(UserError, match=r"no 'valid' split \(it has: train, test\)"):
        cache.split_indices("valid")


# ------------------------------------------------------------------ evaluate: the figures, their errors, active units
FIGURES = ("elbo_nats", "elbo_stderr", "elbo_mc_stderr", "recon_nats", "nll_iw_nats", "nll_iw_stderr")


def test_figures_of_a_likelihood_without_8bit_probability_are_named_and_none():
    """Without an 8-bit probability the unprefixed figures are there, each None; the density's are numbers."""
    v = {"kl": torch.tensor([1.0, 2.0, 4.0]), "density_recon": torch.tensor([-10.0, -20.0, -30.0])}
    out = ev._likelihood_figures(v, 3, 1)
    assert set(out) == {"kl_nats", "iw_samples", *FIGURES, *("density_" + k for k in FIGURES)}
    assert all(out[k] is None for k in FIGURES)
    assert out["density_elbo_nats"] == pytest.approx(-(11 + 22 + 34) / 3)
    assert out["density_elbo_mc_stderr"] is None  # K = 1: no Monte Carlo variance


def test_standard_errors_of_two_images():
    """The standard error of the mean over images is std / sqrt(N) from N = 2 on (None for one image); the ELBO's
    Monte Carlo error is sqrt(sum of the per-image variances) / N."""
    v = {"kl": torch.tensor([0.0, 0.0]), "density_recon": torch.tensor([-1.0, -3.0]),
         "density_log_px": torch.tensor([-0.5, -2.5]), "density_recon_var": torch.tensor([4.0, 5.0])}
    out = ev._likelihood_figures(v, 2, 8)
    assert out["density_elbo_stderr"] == pytest.approx(torch.tensor([1.0, 3.0]).std().item() / 2**0.5)
    assert out["density_nll_iw_nats"] == pytest.approx(1.5)
    assert out["density_nll_iw_stderr"] == pytest.approx(out["density_elbo_stderr"])
    assert out["density_elbo_mc_stderr"] == pytest.approx(3.0 / 2)
    one = ev._likelihood_figures({k: t[:1] for k, t in v.items()}, 1, 8)
    assert one["density_elbo_stderr"] is None and one["density_nll_iw_stderr"] is None


def test_a_unit_at_exactly_the_threshold_is_not_active_and_kl_is_rounded_to_micronats(tiny):
    """Burda et al.: active when the variance is above 0.01 (not at it); kl_per_dim_nats keeps 6 decimals."""
    vae = VAE(tiny(latent_dim=3))
    v = {"kl": torch.tensor([1.0, 2.0]), "density_recon": torch.tensor([-1.0, -3.0]), "loss": torch.tensor([1.0, 2.0]),
         "psnr": torch.tensor([20.0, 30.0]), "ssim": torch.tensor([0.5, 0.7]), "mse": torch.tensor([0.1, 0.2])}
    report = ev._report(vae, v, torch.tensor([0.01, 0.0100001, 0.0], dtype=torch.float64),
                        torch.tensor([0.123456789, 1.0, 2.5]), dims=1024, iw_samples=1)
    assert report["active_units"] == 1
    assert report["kl_per_dim_nats"] == [0.123457, 1.0, 2.5]


def test_evaluation_encodes_each_batch_once_and_counts_every_importance_sample(tiny, monkeypatch):
    """The bound reuses the ELBO pass's posterior (one encoder pass per batch, whatever K is), and the progress bar
    counts the N * K importance samples it decodes."""
    vae = VAE(tiny()).eval()
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    encoded = []
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: encoded.append(len(x)) or original(x))
    counted = []

    class Bar:
        def __init__(self, *a, **kw):
            pass

        def update(self, n):
            counted.append(n)

        def close(self):
            pass

    monkeypatch.setattr(ev, "tqdm", Bar)
    ev.evaluate(vae, images, iw_samples=3, batch_size=4)
    assert encoded == [4, 4, 2]
    assert sum(counted) == 10 * 3
