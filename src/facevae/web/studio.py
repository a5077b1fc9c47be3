"""The model side of the page: a loaded run, its latent directions, faces in and out as PNG bytes. No HTTP here.

A view of the latent tools, not a second implementation: images in through facevae.faces (load_image, encode), faces
out through faces.decode, paths from latent.latent_path, principal directions from latent.principal_directions,
attribute vectors from attributes.load_attribute_vectors, prior codes from VAE.prior (what VAE.sample decodes).

Every model call runs under one lock and in torch.inference_mode: a module is not made for concurrent calls, and on
a CPU one call already uses every core. Everything a request sends is checked here before the model sees it.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from facevae.attributes import load_attribute_vectors
from facevae.data import SplitView
from facevae.data.decode import MAX_PIXELS
from facevae.errors import UserError
from facevae.faces import decode, encode, encode_split, load_image
from facevae.images import to_hwc
from facevae.latent import latent_path, principal_directions
from facevae.config import MAX_SEED
from facevae.run import MAX_TEMPERATURE, Run

MAX_EVAL_BYTES = 1 << 20  # a run directory may come from someone else: its size is checked before it is read
MAX_EDIT = 100.0  # slider amounts are a few units; anything far beyond is a mistake


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_upload_bytes: int = 10 * 1024 * 1024  # an uploaded photo; larger ones get 413 before they are read whole
    max_pixels: int = MAX_PIXELS  # a decoded photo, as prepare's budget: a decompression bomb never decodes
    max_json_bytes: int = 1024 * 1024  # a JSON body (a latent of 128 numbers is about 3 kB)
    max_temperature: float = MAX_TEMPERATURE  # as `facevae sample`
    max_abs_latent: float = 1e4  # the prior has standard deviation 1: far beyond this is no face at all
    max_steps: int = 32  # faces in an interpolation strip
    principal_count: int = 10  # principal directions offered as sliders
    principal_images: int = 10_000  # training images whose posterior means give them (a 1.4% error on a variance)
    workers: int = 2  # requests doing image or model work at once; the others wait their turn


class BadRequest(Exception):
    """A request the client must change; answered as JSON {"error": message} with this HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True)
class Direction:
    """A slider: moving it by 1 adds `vector` to the latent."""

    id: str  # "attribute:NAME" or "pc:K", what a decode request's "edits" name
    label: str
    kind: str  # "attribute" (units of the vector's length) or "principal" (standard deviations)
    vector: torch.Tensor  # (latent_dim,)
    explained: float | None = None  # principal directions: the fraction of the variance along it


class Studio:
    """A run loaded for the page: faces from the prior, from photos, from latents; the sliders' directions."""

    def __init__(self, run: str | Path | Run, *, limits: Limits = Limits(), device: str = "cpu",
                 data: str | None = None):
        self.run = Run(run)
        self.vae = self.run.load_model(device=device, data=data)  # data: the run's config.toml's unless given
        self.config = self.vae.config
        self.limits = limits
        self.lock = threading.Lock()
        self.notes: list[str] = []  # why a kind of slider is missing, for the page and the console
        self.directions = self._attribute_directions() + self._principal_directions()
        self.by_id = {d.id: d for d in self.directions}

    def _attribute_directions(self) -> list[Direction]:
        """The run's attribute vectors (balanced: the Male groups equalised), where it has them."""
        try:
            vectors, _ = load_attribute_vectors(self.run, compute=False)  # 40 CelebA vectors take minutes: not here
        except UserError as e:
            self.notes.append(f"no attribute sliders: {e}")
            return []
        d = self.config.latent_dim
        if tuple(vectors.balanced.shape) != (len(vectors.names), d) or not vectors.balanced.isfinite().all():
            self.notes.append(f"no attribute sliders: the run's attribute vectors are not {len(vectors.names)} "
                              f"finite vectors of {d} numbers; run `facevae attributes {self.run}` again")
            return []
        return [Direction(f"attribute:{n}", n, "attribute", v.float()) for n, v in zip(vectors.names, vectors.balanced)]

    def _principal_directions(self) -> list[Direction]:
        """Principal directions of the training split's posterior means, in standard deviations."""
        try:
            view = self.run.data(self.config, "train")
        except UserError as e:
            self.notes.append(f"no principal directions: the run's training data cannot be opened ({e})")
            return []
        if len(view) < 2:
            self.notes.append("no principal directions: the training split has fewer than 2 images")
            return []
        if len(view) > self.limits.principal_images:  # a seeded sample, in file order (the cache is read forwards)
            chosen = torch.randperm(len(view), generator=torch.Generator().manual_seed(0))
            view = SplitView(view.source, view.index[chosen[:self.limits.principal_images].sort().values],
                             split=view.split, cache=view.cache)
        with self.lock:
            means = encode_split(self.vae, view).means  # (N, latent_dim)
        vectors, explained = principal_directions(means, self.limits.principal_count)
        return [Direction(f"pc:{i + 1}", f"PC{i + 1}", "principal", v, float(f))
                for i, (v, f) in enumerate(zip(vectors, explained))]

    # ------------------------------------------------------------ what the page reads once
    def info(self) -> dict[str, Any]:
        """The run: its name, config, eval numbers, attribute names, the number of principal directions, limits."""
        evaluation = self._eval_numbers()
        bpd_key = next((k for k in ("nll_iw_bpd", "elbo_bpd") if evaluation.get(k) is not None), None)
        return {
            "run": self.run.path.resolve().name,
            "config": self.config.to_dict(),
            "eval": evaluation or None,
            "bits_per_dim": evaluation.get(bpd_key) if bpd_key else None,
            "bits_per_dim_key": bpd_key,
            "psnr_db": evaluation.get("psnr_db"),
            "attributes": [d.label for d in self.directions if d.kind == "attribute"],
            "principal_directions": sum(d.kind == "principal" for d in self.directions),
            "notes": self.notes,
            "latent_dim": self.config.latent_dim,
            "image_size": self.config.image_size,
            "channels": self.config.channels,
            "limits": {"max_upload_bytes": self.limits.max_upload_bytes, "max_pixels": self.limits.max_pixels,
                       "max_temperature": self.limits.max_temperature, "max_steps": self.limits.max_steps},
        }

    def _eval_numbers(self) -> dict[str, Any]:
        """The top-level numbers and names of RUN/eval.json ({} when there is none, or it is not an evaluation)."""
        try:
            if self.run.eval_file.stat().st_size > MAX_EVAL_BYTES:
                return {}
            data = self.run.read_eval()
        except (OSError, UserError):
            return {}
        plain = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool, type(None)))}
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in plain.items()}

    def directions_json(self) -> dict[str, Any]:
        """Attribute vectors and principal directions (standard-deviation units), as lists of numbers."""
        def one(d: Direction) -> dict[str, Any]:
            out = {"id": d.id, "label": d.label, "vector": d.vector.tolist()}
            return out if d.explained is None else {**out, "explained": d.explained}
        return {"attributes": [one(d) for d in self.directions if d.kind == "attribute"],
                "principal": [one(d) for d in self.directions if d.kind == "principal"],
                "notes": self.notes}

    # ------------------------------------------------------------ latents in
    def sample_latent(self, seed: int, temperature: float) -> torch.Tensor:
        """A latent from the prior N(0, T^2 I), drawn with `seed`: (latent_dim,)."""
        if not 0 <= seed <= MAX_SEED:  # as `facevae sample`
            raise BadRequest(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
        if not 0 <= temperature <= self.limits.max_temperature:
            raise BadRequest(f"temperature must be from 0 to {self.limits.max_temperature:g}, got {temperature}")
        return self.vae.prior(1, generator=torch.Generator().manual_seed(seed), temperature=temperature)[0]

    def encode(self, data: bytes) -> torch.Tensor:
        """An uploaded photo -> the posterior mean of its centre square: (latent_dim,)."""
        self._check_pixels(data)
        try:
            x = load_image(io.BytesIO(data), size=self.config.image_size, channels=self.config.channels)
        except UserError as e:
            raise BadRequest(f"the image cannot be decoded: {e}") from None
        with self.lock, torch.inference_mode():
            return encode(self.vae, x[None])[0]

    def _check_pixels(self, data: bytes) -> None:
        """Refuse a file that is not an image, or holds too many pixels, from its header, before it is decoded."""
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                w, h = im.size
        except Image.DecompressionBombError:  # Pillow's own limit, far above ours
            raise BadRequest(f"the image holds more than {self.limits.max_pixels:,} pixels") from None
        except Exception:  # Pillow raises several kinds on what is not an image it knows
            raise BadRequest("not an image facevae can read (JPEG, PNG, WebP, GIF, BMP, ...)") from None
        if w * h > self.limits.max_pixels:
            raise BadRequest(f"the image is {w}x{h} = {w * h:,} pixels, over the limit of {self.limits.max_pixels:,}")

    def latent(self, value: Any, what: str = "latent") -> torch.Tensor:
        """A JSON list of latent_dim finite numbers -> (latent_dim,); anything else is a BadRequest."""
        d = self.config.latent_dim
        if not isinstance(value, list) or len(value) != d:
            got = f"{len(value)} numbers" if isinstance(value, list) else type(value).__name__
            raise BadRequest(f"{what} must be a list of {d} numbers (the run's latent_dim), got {got}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise BadRequest(f"{what} must hold numbers only")
        try:
            z = torch.tensor(value, dtype=torch.float64)
        except OverflowError:  # a whole number too large for a float
            raise BadRequest(f"{what} holds a value beyond +-{self.limits.max_abs_latent:g}") from None
        if not torch.isfinite(z).all():
            raise BadRequest(f"{what} holds a non-finite value (NaN or infinity)")
        if z.abs().max() > self.limits.max_abs_latent:
            raise BadRequest(f"{what} holds a value beyond +-{self.limits.max_abs_latent:g}")
        return z.float()

    def face(self, body: Any, what: str = "body") -> torch.Tensor:
        """{"latent": [...], "edits": {direction id: amount, ...}} -> the edited latent (latent_dim,)."""
        if not isinstance(body, dict):
            raise BadRequest(f"{what} must be a JSON object with a \"latent\" list")
        z = self.latent(body.get("latent"), f"{what}.latent" if what != "body" else "latent")
        edits = body.get("edits", {})
        if not isinstance(edits, dict):
            raise BadRequest("edits must be an object {direction id: amount}")
        for key, amount in edits.items():
            if key not in self.by_id:
                raise BadRequest(f"unknown direction {key!r}; GET /api/directions lists them")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not abs(amount) <= MAX_EDIT:
                raise BadRequest(f"the amount of {key!r} must be a number from -{MAX_EDIT:g} to {MAX_EDIT:g}")
            z = z + amount * self.by_id[key].vector
        return z

    def path(self, a: torch.Tensor, b: torch.Tensor, *, steps: int, mode: str) -> torch.Tensor:
        """Latents from a to b, both included: (steps, latent_dim)."""
        if not 2 <= steps <= self.limits.max_steps:
            raise BadRequest(f"steps must be from 2 to {self.limits.max_steps}, got {steps}")
        if mode not in ("slerp", "lerp"):
            raise BadRequest(f"mode must be slerp or lerp, got {mode!r}")
        return latent_path(a, b, steps, mode)

    # ------------------------------------------------------------ faces out
    def png(self, latents: torch.Tensor) -> bytes:
        """Decode latents (n, latent_dim) to the likelihood's means, side by side in one PNG (n faces wide)."""
        with self.lock, torch.inference_mode():
            faces = decode(self.vae, latents.reshape(-1, self.config.latent_dim))  # (n, C, S, S)
        faces = torch.nan_to_num(faces)  # a NaN pixel would become an arbitrary byte
        row = to_hwc(faces).transpose(1, 0, 2, 3).reshape(faces.shape[2], -1, faces.shape[1])  # (S, n*S, C)
        buf = io.BytesIO()
        Image.fromarray(row[..., 0] if row.shape[2] == 1 else row).save(buf, format="PNG")
        return buf.getvalue()
