"""A run's attribute vectors: computed once over its data's training split, kept in the run directory.

RUN_DIR/attributes.safetensors   plain and balanced vectors, float32 (A, latent_dim) each; names in the metadata
RUN_DIR/attributes.json          the index: per attribute its counts and how well its vector reads it (test ROC AUC)
Both record the SHA-256 of the model file they were computed from: a retrained model gets new vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from facevae.checkpoint import read_safetensors
from facevae.config import Config
from facevae.data import SplitView, checked_cache, split_view
from facevae.device import setup
from facevae.errors import UserError
from facevae.faces import encode_split
from facevae.fileio import atomic_write
from facevae.latent import AttributeVectors, attribute_vectors, project, readout
from facevae.run import Run

VECTORS_FILE = "attributes.safetensors"
INDEX_FILE = "attributes.json"
CONFOUNDER = "Male"  # the balanced vectors equalise this attribute's groups (REFERENCES.md: White 2016)


def model_digest(run: Run) -> str:
    """SHA-256 of the run's model file: what its attribute vectors belong to."""
    return hashlib.sha256(run.model_file.read_bytes()).hexdigest()


def attribute_names(config: Config, *, progress: bool = True) -> list[str]:
    """The names of the attributes of a run's data; a UserError when it has none."""
    cache = checked_cache(config, progress=progress)
    names = list(cache.manifest.get("attribute_names", []))
    if cache.attributes is None or not names:
        raise UserError(f"the run's data ({config.data}) has no attributes; attribute vectors need labelled data "
                        f"such as celeba:PATH")
    return names


def _labelled_split(cache, split: str) -> tuple[SplitView, torch.Tensor]:
    """A split's images (a view, no copy) and its attribute labels, bool (N, A)."""
    view = split_view(cache, split)
    return view, view.attributes > 0


def compute_attribute_vectors(run: str | Path | Run, *, batch_size: int = 256, device: str | None = None,
                              progress: bool = False) -> tuple[AttributeVectors, dict[str, Any]]:
    """One encoder pass over the training split (vectors) and one over the test split (their readout), at
    evaluation speed on the run's device and precision; saves both files in the run and returns vectors and index."""
    run = Run(run)
    vae = run.load_model()
    names = attribute_names(vae.config, progress=progress)
    cache = checked_cache(vae.config, progress=progress)
    dev, precision = setup(vae.config, device=device)
    if vae.config.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    (train, train_labels), (test, test_labels) = (_labelled_split(cache, s) for s in ("train", "test"))
    train_codes, test_codes = (encode_split(vae, images, batch_size=batch_size, device=dev, precision=precision,
                                            progress=progress).means for images in (train, test))
    confounder = train_labels[:, names.index(CONFOUNDER)] if CONFOUNDER in names else None
    vectors = attribute_vectors(train_codes, train_labels, names, confounder)
    scores = {kind: (project(train_codes, v), project(test_codes, v))  # (N_train, A), (N_test, A)
              for kind, v in (("plain", vectors.plain), ("balanced", vectors.balanced))}
    rows = []
    for a, name in enumerate(names):
        plain, balanced = (readout((train[:, a], train_labels[:, a]), (test[:, a], test_labels[:, a]))
                           for train, test in scores.values())
        rows.append({"name": name, "auc": _finite(plain["auc"]), "positives": int(vectors.positives[a]),
                     "negatives": int(vectors.negatives[a]), "test_positives": int(test_labels[:, a].sum()),
                     "test_negatives": int((~test_labels[:, a]).sum()), "threshold": plain["threshold"],
                     "accuracy": _finite(plain["accuracy"]), "balanced_accuracy": plain["balanced_accuracy"],
                     "auc_balanced": _finite(balanced["auc"]), "is_balanced": bool(vectors.is_balanced[a]),
                     "norm": vectors.plain[a].norm().item(), "norm_balanced": vectors.balanced[a].norm().item()})
    index = {"format": "facevae-attributes", "model_sha256": model_digest(run), "data": vae.config.data,
             "vectors_from": "train", "auc_on": "test", "train_images": len(train), "test_images": len(test),
             "confounder": CONFOUNDER if confounder is not None else None, "attributes": rows}
    _save(run, vectors, index)
    return vectors, index


def _finite(value: float) -> float | None:
    """NaN (an AUC with an empty class) as JSON null."""
    return None if math.isnan(value) else value


def _save(run: Run, vectors: AttributeVectors, index: dict[str, Any]) -> None:
    tensors = {"plain": vectors.plain.contiguous(), "balanced": vectors.balanced.contiguous(),
               "positives": vectors.positives.contiguous(), "negatives": vectors.negatives.contiguous(),
               "is_balanced": vectors.is_balanced.to(torch.uint8).contiguous()}
    metadata = {"format": "facevae-attributes", "names": json.dumps(vectors.names),
                "model_sha256": index["model_sha256"]}
    atomic_write(run.path / VECTORS_FILE, st_save(tensors, metadata=metadata))
    atomic_write(run.path / INDEX_FILE, json.dumps(index, indent=1) + "\n")


def load_attribute_vectors(run: str | Path | Run, *, compute: bool = True,
                           progress: bool = False) -> tuple[AttributeVectors, dict[str, Any]]:
    """The run's attribute vectors and index: read from the run directory when they belong to its current model,
    else computed and saved (compute=True) or a UserError."""
    run = Run(run)
    saved = _read(run)
    if saved is not None:
        return saved
    if not compute:
        raise UserError(f"{run} has no attribute vectors of its current model; run `facevae attributes {run}`")
    return compute_attribute_vectors(run, progress=progress)


def _read(run: Run) -> tuple[AttributeVectors, dict[str, Any]] | None:
    """The saved vectors and index when both are there, readable and made from the run's current model."""
    try:
        tensors, metadata = read_safetensors(run.path / VECTORS_FILE)
        index = json.loads((run.path / INDEX_FILE).read_text())
        digest = model_digest(run)
        if metadata.get("model_sha256") != digest or index.get("model_sha256") != digest:
            return None
        vectors = AttributeVectors(json.loads(metadata["names"]), tensors["plain"], tensors["balanced"],
                                   tensors["positives"], tensors["negatives"], tensors["is_balanced"].bool())
    except (UserError, OSError, KeyError, ValueError):  # missing or damaged: computed again
        return None
    return vectors, index
