"""`facevae export RUN --onnx DIR`: the model for other runtimes, with its config and a model card.

DIR/decoder.onnx   input `latent` (batch, latent_dim) float32 -> output `image` (batch, C, S, S) float32: the mean
                   of p(x|z) in [0, 1] (no sampling inside: the faces of `facevae sample` for the same z)
DIR/encoder.onnx   input `image` (batch, C, S, S) float32 in [0, 1] -> outputs `mean`, `logvar` (batch, latent_dim):
                   q(z|x), logvar clamped as facevae clamps it
DIR/config.json    shapes, names, the run's config and eval numbers
DIR/README.md      the model card (model_card.py), with an example that needs onnxruntime and numpy only

Exported by torch.onnx's dynamo exporter with a dynamic batch dimension; weights inside each file. Needs the
optional extra `facevae[onnx]` (onnx, onnxscript, onnxruntime). facevae writes into DIR only when it is new, empty
or an earlier export (marked by fileio's .facevae file), and replaces only the files it writes there.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facevae import __version__
from facevae.errors import UserError
from facevae.fileio import atomic_write, check_output_dir, mark_dir
from facevae.model import VAE
from facevae.run import Run

EXPORT_FORMAT = "facevae-onnx"  # config.json's "format"
FILES = ("decoder.onnx", "encoder.onnx", "config.json", "README.md")
OPSET = 18


class DecoderMean(nn.Module):
    """latent (B, latent_dim) -> image (B, C, S, S): the likelihood's mean in [0, 1], as `VAE.sample` draws it."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent).mean.float().clamp(0, 1)


class EncoderPosterior(nn.Module):
    """image (B, C, S, S) in [0, 1] -> (mean, logvar), each (B, latent_dim): q(z|x) as `VAE.encode` returns it."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(image)
        return posterior.mean, posterior.logvar


def require_onnx() -> None:
    """A one-line UserError when a package of the onnx extra is missing."""
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"facevae export needs the '{name}' package: pip install 'facevae[onnx]'") from None


def onnx_bytes(module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str]) -> bytes:
    """The module exported by the dynamo exporter with a dynamic batch, as one self-contained ONNX file's bytes."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notices: not ours to print
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), (example,), dynamo=True, input_names=[input_name],
                                        output_names=output_names, dynamic_shapes={input_name: {0: batch}},
                                        opset_version=OPSET, external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    return program.model_proto.SerializeToString()


def export_config(vae: VAE, report: dict[str, Any] | None) -> dict[str, Any]:
    """config.json: what a program using the ONNX files needs, plus the run's config and eval numbers."""
    c = vae.config
    return {"format": EXPORT_FORMAT, "facevae_version": __version__, "opset": OPSET,
            "latent_dim": c.latent_dim, "image_size": c.image_size, "channels": c.channels,
            "likelihood": c.likelihood,
            "decoder": {"file": "decoder.onnx", "inputs": {"latent": ["batch", c.latent_dim]},
                        "outputs": {"image": ["batch", c.channels, c.image_size, c.image_size]},
                        "output_range": [0.0, 1.0], "output_is": "mean of p(x|z)"},
            "encoder": {"file": "encoder.onnx",
                        "inputs": {"image": ["batch", c.channels, c.image_size, c.image_size]},
                        "input_range": [0.0, 1.0],
                        "outputs": {"mean": ["batch", c.latent_dim], "logvar": ["batch", c.latent_dim]}},
            "config": c.to_dict(), "eval": report}


def export_onnx(run: Run | str | Path, out: str | Path) -> dict[str, Path]:
    """Export a run's model to `out`: decoder.onnx, encoder.onnx, config.json, README.md; return their paths."""
    from facevae.model_card import model_card, run_eval

    require_onnx()
    out = Path(out)
    check_output_dir(out, "export", flag="--onnx")  # new, empty, or an earlier export (its .facevae marker)
    run = Run(run)
    vae = run.load_model()  # eval mode, on the CPU
    report = run_eval(run)
    c = vae.config
    files = {
        "decoder.onnx": onnx_bytes(DecoderMean(vae), torch.zeros(2, c.latent_dim), "latent", ["image"]),
        "encoder.onnx": onnx_bytes(EncoderPosterior(vae), torch.full((2, c.channels, c.image_size, c.image_size),
                                                                      0.5), "image", ["mean", "logvar"]),
        "config.json": json.dumps(export_config(vae, report), indent=1) + "\n",
        "README.md": model_card(run, vae.config, report, opset=OPSET),
    }
    mark_dir(out, "export")
    for name in FILES:
        atomic_write(out / name, files[name])
    return {name: out / name for name in FILES}
