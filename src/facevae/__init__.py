"""facevae: variational auto-encoders for faces, correct, fast and pleasant.

    from facevae import load_run, open_dataset
    vae = load_run("runs/lfw-faces")          # the trained model, eval mode, on the CPU
    images = open_dataset("lfw", split="test", size=32)
"""

__version__ = "0.1.0"

from facevae.checkpoint import load_run  # noqa: E402
from facevae.config import Config  # noqa: E402
from facevae.data import ImageSet, open_dataset  # noqa: E402
from facevae.distributions import DiagonalGaussian, Likelihood  # noqa: E402
from facevae.model import VAE  # noqa: E402
from facevae.objectives import ELBO  # noqa: E402

__all__ = ["Config", "DiagonalGaussian", "ELBO", "ImageSet", "Likelihood", "VAE", "__version__", "load_run",
           "open_dataset"]
