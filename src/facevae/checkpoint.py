"""The model file and the resume checkpoint: safetensors for tensors, JSON for the rest, every write atomic. No pickle.

RUN_DIR/model.safetensors   the model's weights, its config as JSON in the metadata
RUN_DIR/checkpoint/         what resume needs: model.safetensors, optimizer.safetensors (tensors),
                            state.json (step, epoch, position in the epoch, optimiser hyper-parameters,
                            RNG states, and a SHA-256 of each tensor file)
A new checkpoint is written whole under checkpoint.new/ and swapped in by renames; checkpoint.old/ is the previous
one while the swap is in flight, and loading falls back to it if a crash came between the two renames.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from facevae.config import Config
from facevae.errors import UserError
from facevae.fileio import atomic_write, fsync_path
from facevae.model import VAE

MODEL_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- the model file
def model_bytes(vae: VAE) -> bytes:
    """The weights (unwrapped, on the CPU) as a safetensors file with the config in its metadata."""
    return st_save(_cpu_state(vae), metadata=vae.metadata())


def save_model(vae: VAE, path: Path, *, data: bytes | None = None) -> None:
    """Write the model file (`data`, when the caller has already serialised the weights with model_bytes)."""
    atomic_write(path, data if data is not None else model_bytes(vae))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything else (a pickle, say) is refused, never executed."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e}); facevae loads only safetensors weights") from None
    return tensors, metadata


def load_state_into(vae: VAE, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Check names, shapes and dtypes against the model before loading anything into it."""
    expected = vae.state_dict()
    # Files written before the likelihood owned its parameters name them at the top level (log_sigma, ...).
    tensors = {k if k in expected or f"likelihood_params.{k}" not in expected else f"likelihood_params.{k}": v
               for k, v in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{source} does not match its config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise UserError(f"{source}: tensor '{name}' is {tuple(t.shape)} {t.dtype}, the config needs "
                            f"{tuple(expected[name].shape)} {expected[name].dtype}")
    vae.load_state_dict(tensors)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> VAE:
    """A model from its weights file alone (the config is in its metadata), in eval mode."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if "config" not in metadata:
        raise UserError(f"{path} has no facevae config in its metadata; was it written by facevae?")
    config = Config.from_dict(json.loads(metadata["config"]), source=str(path)).validate()
    vae = VAE(config)
    load_state_into(vae, tensors, path)
    return vae.to(device).eval()


# ---------------------------------------------------------------- the resume checkpoint
def save_checkpoint(run_dir: Path, vae: VAE, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                    model: bytes | None = None) -> None:
    """Everything resume needs, written whole under checkpoint.new/ and swapped in by renames (`model`: the weights
    already serialised by model_bytes, so that an epoch's end serialises them once)."""
    new, cur, old = (run_dir / f"{CHECKPOINT_DIR}{s}" for s in (".new", "", ".old"))
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = _rng_state()
    files = {"model.safetensors": model if model is not None else model_bytes(vae),
             "optimizer.safetensors": st_save({**opt_tensors, **rng_tensors})}
    for name, data in files.items():
        atomic_write(new / name, data)
    meta = {**state, "optimizer": opt_meta, "rng": rng_meta, "sha256": {n: sha256(d) for n, d in files.items()}}
    atomic_write(new / "state.json", json.dumps(meta, indent=1))
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(cur, old)
    os.replace(new, cur)
    fsync_path(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / f"{CHECKPOINT_DIR}{s}" / "state.json").is_file() for s in ("", ".old"))


def load_checkpoint(run_dir: Path, vae: VAE, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimiser and RNG states; return the saved training state (step, epoch, ...)."""
    ckpt = run_dir / CHECKPOINT_DIR
    if not (ckpt / "state.json").is_file():
        ckpt = run_dir / f"{CHECKPOINT_DIR}.old"  # a crash came between the two renames of save_checkpoint
    try:
        meta = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"the checkpoint in {run_dir} is damaged ({e}); delete {ckpt} to start over") from None
    tensors = {}
    for name, digest in meta["sha256"].items():
        data = (ckpt / name).read_bytes() if (ckpt / name).is_file() else b""
        if sha256(data) != digest:
            raise UserError(f"checkpoint file {ckpt / name} is damaged (checksum mismatch); "
                            f"delete {ckpt} to start over")
        tensors[name] = st_load(data)
    load_state_into(vae, tensors["model.safetensors"], ckpt / "model.safetensors")
    flat = tensors["optimizer.safetensors"]
    optimizer.load_state_dict(_optimizer_from_flat(flat, meta["optimizer"]))
    _match_parameter_layout(optimizer)
    _set_rng_state(flat, meta["rng"])
    return meta


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each moment buffer its parameter's memory layout (e.g. channels_last): safetensors stores tensors
    contiguous, and fused Adam walks parameter and moments as raw memory, so the layouts must agree."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _cpu_state(vae: VAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser state_dict as safetensors tensors plus JSON (hyper-parameters, non-tensor state)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, numpy, torch CPU and CUDA generator states: tensors for safetensors, the rest for JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(py_state), gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))
