"""Shared test set-up: every cache goes to a temporary directory; tiny configs keep the CPU tests fast."""

from __future__ import annotations

import os

import pytest
import torch

from facevae.config import Config


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    """Prepared caches go to a temporary directory, never to ~/.cache (subprocesses inherit the variable)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FACEVAE_CACHE", str(tmp_path_factory.mktemp("facevae-cache")))
    torch.set_num_threads(int(os.environ.get("FACEVAE_TEST_THREADS", "2")))  # tools/mutate.py: 1 per mutant
    yield
    mp.undo()


def tiny_config(**overrides) -> Config:
    """A network small enough to train in a fraction of a second on the bundled 32x32 grey faces."""
    values = dict(data="lfw", image_size=32, channels=1, widths=[8, 16], latent_dim=4, likelihood="gaussian",
                  epochs=1, batch_size=40, eval_batch_size=64, log_every=1, image_count=8,
                  image_every=1000)  # pictures and curves at the last epoch only: matplotlib is most of a tiny run
    values.update(overrides)
    return Config(**values).validate()


@pytest.fixture
def tiny():
    return tiny_config


def density_iw(vae, x: torch.Tensor, samples: int, *, chunk: int | None = None) -> torch.Tensor:
    """The importance-weighted bound on log p(x) of the continuous density (x need not be 8-bit), (B,) nats."""
    from facevae.metrics import importance_samples, iw_bound

    s = importance_samples(vae, x, samples, chunk=chunk)
    return iw_bound(s.log_density, s.log_ratio)
