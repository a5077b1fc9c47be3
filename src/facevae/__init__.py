"""facevae: variational auto-encoders for faces, correct, fast and pleasant.

    from facevae import load_run, open_dataset
    vae = load_run("runs/lfw-faces")          # the trained model, ready for inference, on the CPU
    images = open_dataset("lfw", split="test", size=32)

The public names are imported on first use (PEP 562), so that `import facevae` (and `facevae --help`) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from facevae.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "Config": "facevae.config",
    "DiagonalGaussian": "facevae.distributions",
    "ELBO": "facevae.model",
    "ImageSet": "facevae.data",
    "LIKELIHOODS": "facevae.distributions",
    "Likelihood": "facevae.distributions",
    "Run": "facevae.run",
    "SplitView": "facevae.data",
    "VAE": "facevae.model",
    "load_run": "facevae.run",
    "open_dataset": "facevae.data",
}
__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'facevae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
