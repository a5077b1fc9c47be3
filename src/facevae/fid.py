"""Frechet Inception Distance of reconstructions and prior samples against real images, offline and optional.

FID needs Inception-v3 features computed with the "inception-2015-12-05" weights. facevae uses torch-fidelity's
extractor (pool3, 2048 features) with a weights file the user already has, never a download: torch-fidelity needs
torchvision, which does not import with every torch build and whose newest release would make pip swap torch, so it
lives behind the optional extra `facevae[fid]` and is imported only inside `load_extractor`.
The Frechet distance itself (numpy only) and the plumbing take any feature network: (B, 3, H, W) uint8 -> (B, F).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from facevae.device import autocast
from facevae.errors import UserError, first_line
from facevae.pixels import to_float, to_uint8

if TYPE_CHECKING:
    from facevae.model import VAE

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) uint8 -> (B, F) float

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's conversion of the TF weights
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
FEATURES = "inception-2015-12-05 pool3 (2048 features, torch-fidelity)"
# A few tensors that identify the file (names and shapes of torch-fidelity's FeatureExtractorInceptionV3).
SIGNATURE = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.bias": (1008,),
}
NOTE_NO_WEIGHTS = (f"FID not computed: pass --fid-weights FILE (the inception-2015-12-05 weights, torch-fidelity's "
                   f"{WEIGHTS_FILE} from {WEIGHTS_URL}) and install the extra: pip install 'facevae[fid]'")


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) between two Gaussians; means (F,), covariances (F, F).

    tr (C1 C2)^(1/2) is the sum of the square roots of the eigenvalues of C1^(1/2) C2 C1^(1/2), which is symmetric
    positive semi-definite: two symmetric eigendecompositions in float64, no complex matrix square root, and
    singular covariances (fewer images than features) are fine. Round-off below zero is clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # C1^(1/2), (F, F)
    m = root1 @ cov2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)
    return max(d, 0.0)


class FeatureMoments:
    """Running mean and covariance of feature batches (B, F), in float64 about a shift for accuracy."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None  # (F,): the first batch's mean
        self.sum: torch.Tensor | None = None  # (F,) sum of (f - shift)
        self.outer: torch.Tensor | None = None  # (F, F) sum of (f - shift)(f - shift)^T

    def add(self, features: torch.Tensor) -> None:
        """Accumulate a batch of features (B, F)."""
        f = features.detach().double().cpu()
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64)
        f = f - self.shift
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean (F,) and the unbiased covariance (F, F), as np.cov computes them."""
        if self.n < 2:
            raise ValueError("a covariance needs at least two feature vectors")
        m = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(m, m)) / (self.n - 1)
        return (m + self.shift).numpy(), cov.numpy()


def load_extractor(weights: str | Path, device: torch.device) -> tuple[FeatureExtractor | None, str | None]:
    """The Inception feature network from a local weights file: (extractor, None), or (None, note) without the extra.

    An unreadable file, or one that is not the inception-2015-12-05 weights, is a UserError (checked before the
    optional import, so the check works without the extra). The file is read with torch.load(weights_only=True):
    tensors only, never arbitrary pickled objects.
    """
    path = Path(weights)
    check_weights(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:  # not installed, or torchvision present but broken for this torch build
        return None, (f"FID not computed: the optional extra is not usable ({type(e).__name__}: {first_line(e)}); "
                      f"install it "
                      f"with pip install 'facevae[fid]' where torchvision supports the installed torch")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as e:
        raise UserError(f"--fid-weights {path} could not be loaded as the inception-2015-12-05 weights "
                        f"({type(e).__name__}: {first_line(e, limit=120)}); use {WEIGHTS_FILE}") from None
    net = net.to(device).eval()

    def extract(images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) uint8 -> (B, 2048) float32
        return net(images)[0]

    return extract, None


def check_weights(path: Path) -> None:
    """Fail with one line unless `path` is a readable PyTorch file holding the inception-2015-12-05 tensors."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "no such file"
        raise UserError(f"--fid-weights {path}: {what}; download {WEIGHTS_FILE} from {WEIGHTS_URL} "
                        f"on a machine with internet and pass its path")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols would break the one-line error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"--fid-weights {path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # not a PyTorch file, or one holding more than tensors (refused, never executed)
        raise UserError(f"--fid-weights {path} is not a PyTorch weights file of tensors ({first_line(e, limit=120)}); "
                        f"use {WEIGHTS_FILE}") from None
    if not isinstance(state, dict):
        raise UserError(f"--fid-weights {path} holds a {type(state).__name__}, not a state dict; use {WEIGHTS_FILE}")
    for name, shape in SIGNATURE.items():
        t = state.get(name)
        if not torch.is_tensor(t) or tuple(t.shape) != shape:
            found = tuple(t.shape) if torch.is_tensor(t) else "missing"
            raise UserError(f"--fid-weights {path} is not the inception-2015-12-05 weights ('{name}' is {found}, "
                            f"expected {shape}); use {WEIGHTS_FILE}")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks: which weights a FID figure was computed with."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [0, 1] or uint8 -> uint8 (B, 3, H, W): rounded as a PNG would be, grey repeated."""
    images = to_uint8(images)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.inference_mode()
def fid_report(vae: "VAE", images: torch.Tensor, extractor: FeatureExtractor, *, batch_size: int = 256,
               device: torch.device | str = "cpu", precision: str = "float32", seed: int = 0,
               features: str = FEATURES) -> dict[str, Any]:
    """FID of posterior-mean reconstructions and of as many prior samples against the real uint8 images (N, C, H, W).

    Every image goes through the extractor as uint8 RGB; at most `batch_size` images at a time.
    """
    device = torch.device(device)
    n = len(images)
    if n < 2:
        raise UserError(f"FID needs at least 2 images, got {n}")
    real, recon, samples = FeatureMoments(), FeatureMoments(), FeatureMoments()
    generator = torch.Generator().manual_seed(seed)  # the prior draws, on the CPU so they match across devices
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]  # (B, C, H, W) uint8
        x = to_float(batch, device)
        z = torch.randn(len(batch), vae.config.latent_dim, generator=generator).to(device)  # (B, latent_dim)
        with autocast(device, precision):
            x_rec = vae.decode(vae.encode(x).mode()).mean  # (B, C, H, W) in [0, 1]
            x_new = vae.decode(z).mean
        real.add(extractor(_as_uint8_rgb(batch.to(device))))
        recon.add(extractor(_as_uint8_rgb(x_rec)))
        samples.add(extractor(_as_uint8_rgb(x_new)))
    stats = real.mean_cov()
    return {
        "fid_recon": frechet_distance(*stats, *recon.mean_cov()),
        "fid_samples": frechet_distance(*stats, *samples.mean_cov()),
        "fid_images": n,  # real images, reconstructions and prior samples each
        "fid_features": features,
    }
