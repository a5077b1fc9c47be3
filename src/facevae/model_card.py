"""The model card (README.md) of an ONNX export: what the model is, its data, likelihood, numbers, use, limits, license.

The card states only what the run directory records (its config and eval.json); a figure the run does not have is
said to be missing, never guessed.
"""

from __future__ import annotations

from typing import Any

from facevae.compare import markdown_table
from facevae.config import Config
from facevae.distributions import LIKELIHOODS
from facevae.errors import UserError
from facevae.run import Run

# The card's example: new faces with onnxruntime and numpy alone, written as a PGM (grey) or PPM (colour) file.
EXAMPLE = '''import json
import numpy as np
import onnxruntime as ort

config = json.load(open("config.json"))
decoder = ort.InferenceSession("decoder.onnx")
z = np.random.default_rng(0).standard_normal((16, config["latent_dim"])).astype(np.float32)  # z ~ N(0, I)
(faces,) = decoder.run(["image"], {"latent": z})  # (16, C, S, S): means of p(x|z), in [0, 1]
c, s = faces.shape[1], faces.shape[2]
grid = faces.reshape(4, 4, c, s, s).transpose(0, 3, 1, 4, 2).reshape(4 * s, 4 * s, c)  # 4 x 4 faces
pixels = (grid * 255).round().astype(np.uint8)
name = "faces.ppm" if c == 3 else "faces.pgm"
with open(name, "wb") as f:  # a PPM / PGM file: any image viewer opens it
    f.write(f"P{6 if c == 3 else 5}\\n{4 * s} {4 * s}\\n255\\n".encode() + pixels.tobytes())
print("wrote", name)
'''

def run_eval(run: Run) -> dict[str, Any] | None:
    """The run's eval.json, or None when it has none (or an unreadable one)."""
    try:
        return run.read_eval()
    except UserError:
        return None


def describe_likelihood(name: str) -> str:
    """The likelihood class's own one-line description (its docstring's first line), Markdown-safe."""
    doc = (LIKELIHOODS[name].__doc__ or name).strip().splitlines()[0] if name in LIKELIHOODS else name
    return doc.replace("|", "\\|")


def describe_data(config: Config) -> str:
    """The training data in words, from the data SPEC's kind (a local path is not repeated in the card)."""
    kind = config.data.split(":", 1)[0] if ":" in config.data else config.data
    size = f"{config.image_size}x{config.image_size}, {'RGB' if config.channels == 3 else 'grey'}"
    if kind == "lfw":
        return (f"the 100 Labeled Faces in the Wild images bundled with scikit-image (`skimage.data.lfw_subset`, "
                f"25x25 grey), 80 for training and 20 held out, resized to {size}")
    if kind == "celeba":
        return (f"CelebA (Liu et al., 2015), aligned faces, centre-cropped to {config.crop} pixels and resized to "
                f"{size}; split '{config.split_scheme}' (official: 162,770 train / 19,867 valid / 19,962 test; deck: 70/30)")
    if kind == "folder":
        return f"a folder of images, centre squares resized to {size}, a fixed 90/10 train/test split"
    return f"a prepared facevae image cache, {size}"


def _objective(config: Config) -> str:
    """The training objective in words: the ELBO, or a beta-weighted objective."""
    if config.kl_weight == 1:
        return "Trained on the true ELBO (KL weight 1)."
    return f"Trained on a beta-weighted objective, -recon + {config.kl_weight:g} KL: not the ELBO."


def _numbers(name: str, report: dict[str, Any] | None) -> str:
    """The eval.json figures as a Markdown table with units, or why there are none."""
    try:
        return markdown_table([name], [report]) if report else (
            "The run had not been evaluated when it was exported (no eval.json): run `facevae evaluate RUN`, "
            "then export again.\n")
    except (KeyError, TypeError, ValueError):
        return "The run's eval.json lacks some figures: run `facevae evaluate RUN` again, then export again.\n"


def model_card(run: Run, config: Config, report: dict[str, Any] | None, *, opset: int) -> str:
    """The README.md of an export, in Markdown."""
    name = run.path.resolve().name
    c = config
    numbers = _numbers(name, report)
    return f"""# facevae model: {name}

A variational auto-encoder of {c.image_size}x{c.image_size} {'colour' if c.channels == 3 else 'grey'} face images,
trained with facevae and exported to ONNX (opset {opset}).

| file | what it is |
| --- | --- |
| `decoder.onnx` | input `latent` (batch, {c.latent_dim}) float32 -> output `image` (batch, {c.channels}, {c.image_size}, {c.image_size}) float32: the mean of p(x\\|z), in [0, 1]; nothing is sampled inside |
| `encoder.onnx` | input `image` (batch, {c.channels}, {c.image_size}, {c.image_size}) float32 in [0, 1] -> outputs `mean`, `logvar` (batch, {c.latent_dim}): the posterior q(z\\|x) = N(mean, exp(logvar)) |
| `config.json` | these shapes and names, the run's full configuration and its evaluation numbers |

The batch dimension is free. The prior is N(0, I): decode standard normal draws to make new faces; encode a face
and decode its `mean` to reconstruct it.

## Data

Trained on {describe_data(c)}.

## Likelihood

p(x\\|z), `{c.likelihood}`: {describe_likelihood(c.likelihood)} {_objective(c)} Latent dimension {c.latent_dim},
encoder widths {c.widths} (stride-2 convolutions; the decoder mirrors them).

## Evaluation

{numbers}
## Make faces with onnxruntime and numpy alone

Run in this directory (`pip install onnxruntime numpy`):

```python
{EXAMPLE}```

## Intended use and limits

- For learning, research and demonstrations of generative models of faces: sampling, reconstruction,
  interpolation in the latent space.
- Not for identifying, verifying or judging people, and not for making images of real, identifiable people
  without their consent. The faces it makes are blurry averages, and they reproduce the biases of the training
  data (who is in it, how they are lit and posed); they are not a fair sample of human faces.
- Faces unlike the training data (other crops, sizes, poses, or not faces at all) are encoded and reconstructed
  poorly, and the likelihood numbers above hold only for data like the test split they were measured on.

## License

The facevae code is MIT-licensed. These weights were learnt from the data above, and that data's terms apply to
them: CelebA, for example, is available for non-commercial research and educational use only. Check the terms of
the training data before using the model for anything else.
"""
