"""Runs, photos and a real server for the web page's tests. Everything is written under the given temporary paths."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as st_save

from facevae.checkpoint import save_model
from facevae.config import Config
from facevae.model import VAE

ATTRIBUTES = ["Eyeglasses", "Smiling", "Male"]
EVAL = {"elbo_nats": 650.0, "nll_iw_nats": 660.0, "likelihood": "gaussian", "elbo_bpd": 7.123, "nll_iw_bpd": 7.05,
        "psnr_db": 19.5, "iw_samples": 10, "split": "test", "settings": {"nested": "dropped"}}


def make_run(run_dir: Path, *, latent_dim: int = 8, image_size: int = 32, channels: int = 1,
             widths: tuple[int, ...] = (8, 16), attributes: bool = True, evaluated: bool = True) -> Path:
    """A run directory with seeded random weights (faces change with the code, which is all these tests need), on
    the bundled faces (so principal directions can be computed), with attribute vectors and eval.json if asked."""
    torch.manual_seed(0)
    config = Config(data="lfw", image_size=image_size, channels=channels, widths=list(widths),
                    latent_dim=latent_dim).validate()
    vae = VAE(config).eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(vae, run_dir / "model.safetensors")
    (run_dir / "config.toml").write_text(config.to_toml())  # where a run's data is named
    if attributes:  # the latent tools' format: (A, D) vectors, names and the model's digest in the metadata
        vectors = torch.randn(len(ATTRIBUTES), latent_dim, generator=torch.Generator().manual_seed(1))
        digest = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
        tensors = {"plain": vectors, "balanced": vectors * 0.5, "positives": torch.ones(3, dtype=torch.int64),
                   "negatives": torch.ones(3, dtype=torch.int64), "is_balanced": torch.ones(3, dtype=torch.uint8)}
        metadata = {"format": "facevae-attributes", "names": json.dumps(ATTRIBUTES), "model_sha256": digest}
        (run_dir / "attributes.safetensors").write_bytes(st_save(tensors, metadata=metadata))
        (run_dir / "attributes.json").write_text(json.dumps({"model_sha256": digest, "attributes": []}))
    if evaluated:
        (run_dir / "eval.json").write_text(json.dumps(EVAL))
    return run_dir


def photo_bytes(width: int = 120, height: int = 90, *, seed: int = 0, format: str = "JPEG") -> bytes:
    """A colourful test photo: smooth gradients and a bright disc, so that the centre square has structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    r = (xx / width * 255).astype(np.uint8)
    g = (yy / height * 255).astype(np.uint8)
    b = np.full_like(r, int(rng.integers(0, 255)))
    disc = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 4) ** 2
    rgb = np.stack([r, g, b], -1)
    rgb[disc] = 255 - rgb[disc]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=format)
    return buf.getvalue()


def portrait_bytes() -> bytes:
    """A real portrait as a JPEG photo: the face of scikit-image's astronaut image (NASA, public domain), 180x160,
    so that its centre square is what the model sees."""
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[45:205, 140:320]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@contextmanager
def serving(run_dir: Path, log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`facevae serve RUN --port 0 ARGS` in a real process, its stderr in the file `log`: yields the URL it printed
    and the process; stopped by Ctrl-C (SIGINT) at the end, and killed if it does not stop within 20 s."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "facevae", "serve", str(run_dir), "--port", "0", *args],
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        url = proc.stdout.readline().strip()  # the URL, printed once the server can be opened
        if not url.startswith("http://"):
            proc.wait(30)
            raise AssertionError(f"facevae serve printed {url!r}; stderr:\n{log.read_text()}")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll until predicate() is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(interval)
