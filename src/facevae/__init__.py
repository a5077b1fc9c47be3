"""facevae: variational auto-encoders for faces, correct, fast and pleasant.

    from facevae import load_run, open_dataset
    vae = load_run("runs/lfw-faces")          # the trained model, eval mode, on the CPU
    images = open_dataset("lfw", split="test", size=32)
"""

from facevae.version import __version__

from facevae.config import Config
from facevae.data import ImageSet, SplitView, open_dataset
from facevae.distributions import LIKELIHOODS, DiagonalGaussian, Likelihood
from facevae.model import ELBO, VAE
from facevae.run import Run, load_run

__all__ = ["Config", "DiagonalGaussian", "ELBO", "ImageSet", "LIKELIHOODS", "Likelihood", "Run", "SplitView", "VAE",
           "__version__", "load_run", "open_dataset"]
