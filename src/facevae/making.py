"""The making-faces commands on a run directory: each draws a labelled PNG grid and returns its numbers as a dict
(the command line prints it with --json). The tensor work is in facevae.faces and facevae.latent."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from facevae.attributes import attribute_names, compute_attribute_vectors, load_attribute_vectors
from facevae.device import eval_batch_size, setup
from facevae.errors import UserError
from facevae.evaluate import ACTIVE_UNIT_THRESHOLD
from facevae.faces import (analogy, decode, edit, encode, encode_split, face_label, interpolate, load_face,
                           load_faces, traverse)
from facevae.images import labelled_grid, save_png
from facevae.latent import MODES, latent_grid, latent_path
from facevae.metrics import psnr
from facevae.run import Run, check_count, prior_faces

TRAVERSAL_COLUMNS = 7  # values from -range to +range
ATTRIBUTE_AMOUNTS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # the attributes picture: each vector's multiples around z = 0


def _out(run: Run, name: str, out: str | Path | None, force: bool) -> Path:
    """The picture's path (default RUN_DIR/images/NAME.png), checked before any work: it replaces only a picture
    facevae wrote, unless `force`."""
    return run.picture_out(out, f"{name}.png", force=force)


def _at_least(name: str, value: int, least: int) -> None:
    if value < least:
        raise UserError(f"{name} must be at least {least}, got {value}")


def reconstruct_faces(run: str | Path | Run, faces: list[str], *, out: str | Path | None = None,
                      force: bool = False) -> dict[str, Any]:
    """Each face beside its reconstruction (the decoded posterior mean), one row per face."""
    run = Run(run)
    target = _out(run, "reconstruct", out, force)
    vae = run.load_model()
    images = load_faces(vae.config, faces)  # uint8 (N, C, S, S)
    rec = decode(vae, encode(vae, images))  # (N, C, S, S) in [0, 1]
    x = images.float() / 255
    mse = ((rec - x) ** 2).flatten(1).mean(1)  # (N,)
    picture = labelled_grid([torch.stack(pair) for pair in zip(x, rec)], row_labels=[face_label(f) for f in faces],
                            column_labels=["input", "reconstruction"])
    rows = [{"face": f, "mse": m, "psnr_db": p} for f, m, p in zip(faces, mse.tolist(), psnr(rec, x).tolist())]
    return {"out": str(save_png(picture, target)), "faces": rows}


def interpolate_faces(run: str | Path | Run, a: str, b: str, *, steps: int = 8, mode: str = "slerp",
                      out: str | Path | None = None,
                      force: bool = False) -> dict[str, Any]:
    """One row: A, the path between the posterior means of A and B (its ends are their reconstructions), B."""
    _at_least("--steps", steps, 2)
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    run = Run(run)
    target = _out(run, "interpolate", out, force)
    vae = run.load_model()
    images = load_faces(vae.config, [a, b])
    faces = interpolate(vae, images[0], images[1], steps=steps, mode=mode)
    za, zb = encode(vae, images).cpu()
    path = latent_path(za, zb, steps, mode)  # (steps, D): the codes of those faces
    t = torch.linspace(0, 1, steps, dtype=torch.float64).tolist()
    row = torch.cat([images[:1].float() / 255, faces, images[1:].float() / 255])
    picture = labelled_grid([row], row_labels=[mode],
                            column_labels=[f"A {face_label(a)}", *(f"t={v:.2f}" for v in t), f"B {face_label(b)}"])
    cosine = torch.nn.functional.cosine_similarity(za, zb, dim=0).clamp(-1, 1).item()
    return {"out": str(save_png(picture, target)), "mode": mode, "t": t,
            "norms": path.norm(dim=1).tolist(), "angle_degrees": math.degrees(math.acos(cosine))}


def traverse_faces(run: str | Path | Run, *, image: str | None = None, dims: int = 10, range_: float = 3.0,
                   device: str | None = None, out: str | Path | None = None,
                   force: bool = False) -> dict[str, Any]:
    """One row per latent dimension, most informative first (average KL over the test split; inactive ones
    marked), columns from -range to +range prior standard deviations around the image's posterior mean (or 0)."""
    _at_least("--dims", dims, 1)
    if not range_ > 0:
        raise UserError(f"--range must be positive, got {range_}")
    run = Run(run)
    target = _out(run, "traverse", out, force)
    vae = run.load_model()
    center = encode(vae, load_face(vae.config, image)[None])[0].cpu() if image else torch.zeros(vae.config.latent_dim)
    dev, precision = setup(vae.config, device=device)
    stats = encode_split(vae, run.data(vae.config, "test"), batch_size=eval_batch_size(dev, vae.config.eval_batch_size),
                         device=dev, precision=precision)
    vae = vae.cpu()
    order = torch.argsort(stats.kl_per_dim, descending=True, stable=True)[:dims].tolist()
    values = torch.linspace(-range_, range_, TRAVERSAL_COLUMNS, dtype=torch.float64)
    faces = traverse(vae, center, order, values)  # (R, V, C, S, S)
    active = [bool(stats.activity[d] > ACTIVE_UNIT_THRESHOLD) for d in order]
    labels = [f"z{d} KL {stats.kl_per_dim[d]:.2f}" + ("" if on else " inactive") for d, on in zip(order, active)]
    title = f"traversal around {face_label(image) if image else 'z = 0'} (columns in prior standard deviations)"
    picture = labelled_grid(list(faces), row_labels=labels, column_labels=[f"{v:+.1f}" for v in values.tolist()],
                            title=title)
    rows = [{"dim": d, "kl_nats": stats.kl_per_dim[d].item(), "activity": stats.activity[d].item(), "active": on}
            for d, on in zip(order, active)]
    return {"out": str(save_png(picture, target)), "center": image or "0",
            "values": values.tolist(), "dims": rows}


def attributes_report(run: str | Path | Run, *, recompute: bool = False, device: str | None = None,
                      out: str | Path | None = None,
                      force: bool = False) -> dict[str, Any]:
    """The run's attribute vectors (computed now, or read when they belong to the current model) and a picture:
    one row per attribute, best AUC first, each balanced vector's multiples added to z = 0."""
    run = Run(run)
    target = _out(run, "attributes", out, force)
    if recompute:
        vectors, index = compute_attribute_vectors(run, device=device, progress=True)
    else:
        vectors, index = load_attribute_vectors(run, progress=True)
    rows = sorted(index["attributes"], key=lambda r: -(r["auc"] if r["auc"] is not None else -1))
    directions = torch.stack([vectors.vector(r["name"]) for r in rows])  # (A, D)
    amounts = torch.tensor(ATTRIBUTE_AMOUNTS)
    vae = run.load_model()
    faces = decode(vae, latent_grid(torch.zeros(vae.config.latent_dim), directions, amounts))  # (A, V, C, S, S)
    labels = [f"{r['name']} AUC {r['auc']:.2f}" if r["auc"] is not None else r["name"] for r in rows]
    picture = labelled_grid(list(faces), row_labels=labels, column_labels=[f"{a:+g}" for a in ATTRIBUTE_AMOUNTS],
                            title="z = 0 plus multiples of each attribute vector (balanced)")
    return {**index, "out": str(save_png(picture, target))}


def parse_amounts(pairs: list[str]) -> dict[str, float]:
    """["Smiling=1.5", "Eyeglasses=1"] -> {"Smiling": 1.5, "Eyeglasses": 1.0}."""
    amounts = {}
    for pair in pairs:
        name, sep, value = (part.strip() for part in pair.partition("="))
        try:
            amount = float(value) if sep and name else math.nan
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount):
            raise UserError(f"--add takes NAME=AMOUNT (e.g. Smiling=1.5), got '{pair}'")
        amounts[name] = amount
    return amounts


def edit_face(run: str | Path | Run, image: str, amounts: dict[str, float], *, steps: int = 5,
              out: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """A row from the face's reconstruction to it with the attribute vectors added (amounts in units of each
    vector's length; balanced vectors); the vectors are computed on first use."""
    _at_least("--steps", steps, 2)
    if not amounts:
        raise UserError("say what to add, e.g. --add Smiling=1.5")
    run = Run(run)
    target = _out(run, "edit", out, force)
    vae = run.load_model()
    known = attribute_names(vae.config)
    unknown = [name for name in amounts if name not in known]
    if unknown:  # said before any vector is computed
        raise UserError(f"unknown attribute '{unknown[0]}'; the known ones: {', '.join(known)}")
    face = load_face(vae.config, image)
    vectors, _ = load_attribute_vectors(run, progress=True)
    direction = vectors.combine(amounts)  # (D,)
    faces = edit(vae, face, direction, steps=steps)
    what = ", ".join(f"{n} {a:+g}" for n, a in amounts.items())
    fractions = torch.linspace(0, 1, steps, dtype=torch.float64).tolist()
    picture = labelled_grid([torch.cat([face[None].float() / 255, faces])], row_labels=[what],
                            column_labels=["input", *(f"x{f:.2f}" for f in fractions)])
    return {"out": str(save_png(picture, target)), "face": image, "add": amounts,
            "fractions": fractions, "norm": direction.norm().item()}


def sample_faces(run: str | Path | Run, *, n: int = 64, temperature: float = 1.0, seed: int = 0,
                 out: str | Path | None = None, force: bool = False, scale: int | None = None) -> dict[str, Any]:
    """n faces from the prior scaled by the temperature: z ~ N(0, T^2 I), in rows of 8; `scale`: the
    nearest-neighbour factor (default: faces at least 64 pixels wide)."""
    check_count(n)
    run = Run(run)
    target = _out(run, "sample", out, force)
    faces = prior_faces(run.load_model(), n, seed=seed, temperature=temperature)  # uint8 (n, C, S, S)
    picture = labelled_grid(list(faces.split(8)), scale=scale,
                            title=f"{run.title()}: {n} faces from the prior, temperature {temperature:g}, seed {seed}")
    return {"out": str(save_png(picture, target)), "n": n, "temperature": temperature,
            "seed": seed}


def analogy_faces(run: str | Path | Run, a: str, b: str, c: str, *, out: str | Path | None = None,
                  force: bool = False) -> dict[str, Any]:
    """A is to B as C is to C + (B - A), on posterior means: the inputs above, their reconstructions and the
    result below."""
    run = Run(run)
    target = _out(run, "analogy", out, force)
    vae = run.load_model()
    images = load_faces(vae.config, [a, b, c])
    result = analogy(vae, *images)
    rec = decode(vae, encode(vae, images))
    blank = torch.ones_like(result)[None]
    picture = labelled_grid([torch.cat([images.float() / 255, blank]), torch.cat([rec, result[None]])],
                            row_labels=["input", "decoded"],
                            column_labels=[f"A {face_label(a)}", f"B {face_label(b)}", f"C {face_label(c)}",
                                           "C + (B - A)"])
    za, zb, zc = encode(vae, images).cpu()
    return {"out": str(save_png(picture, target)), "faces": {"A": a, "B": b, "C": c},
            "shift_norm": (zb - za).norm().item()}
