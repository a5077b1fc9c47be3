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
import math
import os
import random
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from facevae.config import Config
from facevae.errors import UserError
from facevae.fileio import atomic_write, fsync_path, remove_own_dir
from facevae.model import MAX_PARAMETERS, VAE, expected_state

MODEL_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- the model file
def model_bytes(vae: VAE, *, training: dict[str, Any] | None = None) -> bytes:
    """The weights (unwrapped, on the CPU) as a safetensors file with the config in its metadata, and `training`
    (how far training had gone: step, epoch, epochs, finished) where given."""
    metadata = vae.metadata()
    if training is not None:
        metadata["training"] = json.dumps(training)
    return st_save(_cpu_state(vae), metadata=metadata)


def read_training(path: str | Path) -> dict[str, Any] | None:
    """How far training had gone when a model file was written ({"step", "epoch", "epochs", "finished"}), read from
    its checked header alone; None for a file that does not record it (an older facevae's) or cannot be read."""
    try:
        _, metadata = read_header(Path(path))
        training = json.loads(metadata["training"])
    except (UserError, OSError, KeyError, TypeError, ValueError, RecursionError):
        return None
    keys = {"step": int, "epoch": int, "epochs": int, "finished": bool}  # a run may come from someone else: checked
    if not isinstance(training, dict) or not all(isinstance(training.get(k), t) for k, t in keys.items()):
        return None
    return {k: training[k] for k in keys}


def save_model(vae: VAE, path: Path, *, data: bytes | None = None) -> None:
    """Write the model file (`data`, when the caller has already serialised the weights with model_bytes)."""
    atomic_write(path, data if data is not None else model_bytes(vae))


# safetensors dtype names and their sizes in bytes (the format's specification)
DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
          "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2),
          "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1)}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
MAX_MODEL_BYTES = MAX_PARAMETERS * 8 + MAX_HEADER_BYTES  # no facevae model file is larger (float64 at most)
Header = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape)


def read_header(path: Path, *, max_bytes: int = MAX_MODEL_BYTES, follow_links: bool = True) -> tuple[Header, dict]:
    """The tensor names, dtypes and shapes, and the metadata, of a safetensors file, read from its header alone:
    every offset is checked against the file's size, no tensor is read, and anything that is not a well-formed
    safetensors file (a pickle, say) is refused, never executed."""
    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a valid safetensors file ({why}); facevae loads only safetensors weights")

    size = _regular_file_size(path, follow_links=follow_links)
    if size > max_bytes:
        raise bad(f"{size:,} bytes, more than the {max_bytes:,} its config allows")
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            raise bad("no header" if length < 0 else f"a header of {length:,} bytes in a file of {size:,}")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its metadata is not a table of strings")
    entries, end = {}, 0
    for name, entry in header.items():
        try:
            dtype, itemsize = DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            start, stop = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name[:80]!r} is described wrongly") from None
        if len(shape) > 8 or min(shape, default=0) < 0 or not 0 <= start <= stop or \
                stop - start != math.prod(shape) * itemsize:
            raise bad(f"tensor {name[:80]!r} has shape {shape[:8]} and offsets {start}..{stop}")
        entries[name], end = (dtype, shape), max(end, stop)
    if 8 + length + end != size:
        raise bad(f"its tensors end at byte {8 + length + end:,} of {size:,}")
    return entries, metadata


def _regular_file_size(path: Path, *, follow_links: bool) -> int:
    """The size of a regular file; pipes, devices, folders (and links, unless followed) are refused."""
    try:
        st = os.stat(path) if follow_links else os.lstat(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UserError(f"{path} is {kind}; facevae reads weights only from regular files")
    return st.st_size


def current_name(name: str, expected: dict) -> str:
    """A tensor's name in today's network: files written before the likelihood owned its parameters name them at
    the top level (log_sigma, running_log_sigma, ...)."""
    return name if name in expected or f"likelihood_params.{name}" not in expected else f"likelihood_params.{name}"


def check_header(header: Header, expected: Header, source: Path) -> None:
    """Names, shapes and dtypes of a file's tensors against those a network needs, before anything is read."""
    header = {current_name(n, expected): v for n, v in header.items()}
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise UserError(f"{source} does not match its config: missing {missing[:3]}, unexpected "
                        f"{[n[:80] for n in extra[:3]]}")
    for name, (dtype, shape) in header.items():
        if (dtype, shape) != expected[name]:
            raise UserError(f"{source}: tensor '{name}' is {shape} {dtype}, the config needs "
                            f"{expected[name][1]} {expected[name][0]}")


def read_tensors(path: Path, expected: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file whose header has been checked (read_header), read lazily (memory-mapped,
    one tensor at a time); named as in `expected` (a state dict's names) where given."""
    with safe_open(str(path), framework="pt") as f:
        return {current_name(name, expected or {}): f.get_tensor(name) for name in f.keys()}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, its header checked first; anything else is refused."""
    _, metadata = read_header(Path(path))
    return read_tensors(Path(path)), metadata


def model_config(path: Path, metadata: dict[str, str]) -> Config:
    """The validated config in a model file's metadata; one line for anything else."""
    if metadata.get("config") is None:
        raise UserError(f"{path} has no facevae config in its metadata; was it written by facevae?")
    try:
        values = json.loads(metadata["config"])
    except (ValueError, RecursionError):
        raise UserError(f"{path}: the config in its metadata is not JSON") from None
    return Config.from_dict(values, source=str(path)).validate()


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> VAE:
    """A model from its weights file alone (the config is in its metadata), ready for inference: eval mode, and no
    parameter requires a gradient (so nothing it returns tracks one).

    The config is validated, the network's size bounded and the header's shapes compared with the network's
    (computed on the meta device) before anything is allocated or read.
    """
    path = Path(path)
    header, metadata = read_header(path)
    config = model_config(path, metadata)
    expected = {n: (d, s) for n, (s, d) in expected_state(config).items()}
    check_header(header, expected, path)
    vae = VAE(config)
    vae.load_state_dict(read_tensors(path, expected))
    return vae.requires_grad_(False).to(device).eval()


# ---------------------------------------------------------------- the resume checkpoint
def save_checkpoint(run_dir: Path, vae: VAE, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                    model: bytes | None = None) -> None:
    """Everything resume needs, written whole under checkpoint.new/ and swapped in by renames (`model`: the weights
    already serialised by model_bytes, so that an epoch's end serialises them once)."""
    new, cur, old = (run_dir / f"{CHECKPOINT_DIR}{s}" for s in (".new", "", ".old"))
    remove_own_dir(new, CHECKPOINT_WRITES)  # a half-written one from a killed run; never a folder of someone else's
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
        remove_own_dir(old, CHECKPOINT_WRITES)
        os.replace(cur, old)
    os.replace(new, cur)
    fsync_path(run_dir)
    remove_own_dir(old, CHECKPOINT_WRITES)


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / f"{CHECKPOINT_DIR}{s}" / "state.json").is_file() for s in ("", ".old"))


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors")  # the only files a checkpoint opens
CHECKPOINT_WRITES = {*CHECKPOINT_FILES, "state.json"}  # all that save_checkpoint writes into its folder
MAX_STATE_BYTES = 4 << 20  # state.json: hyper-parameters, counters and RNG states, a few KB


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be resumed from: one line naming what is wrong."""

    def __init__(self, ckpt: Path, why: str):
        super().__init__(f"the checkpoint {ckpt} is damaged ({why}); delete {ckpt} to start over")


def load_checkpoint(run_dir: Path, vae: VAE, optimizer: torch.optim.Optimizer, *,
                    expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore model, optimiser and RNG states; return the saved training state (step, epoch, ...).

    Only the fixed files of the checkpoint folder are opened (never a name state.json gives), each checked (no link,
    its size, its SHA-256, its tensors' shapes) before it is read; `expected` maps state keys to values of the
    types they must have. Anything malformed is a DamagedCheckpoint.
    """
    ckpt = run_dir / CHECKPOINT_DIR
    if not (ckpt / "state.json").is_file():
        ckpt = run_dir / f"{CHECKPOINT_DIR}.old"  # a crash came between the two renames of save_checkpoint
    if ckpt.is_symlink():
        raise DamagedCheckpoint(ckpt, "it is a link; facevae reads only files inside the run")
    meta = _read_state(ckpt, expected or {})
    params = list(vae.state_dict().values())
    limit = sum(t.numel() * t.element_size() for t in params) * 2 + MAX_HEADER_BYTES  # Adam: two moments each
    headers = {}
    for name in CHECKPOINT_FILES:
        path = ckpt / name
        try:
            size = _regular_file_size(path, follow_links=False)
        except UserError as e:
            raise DamagedCheckpoint(ckpt, str(e)) from None
        if size > limit or _file_sha256(path) != meta["sha256"][name]:
            raise DamagedCheckpoint(ckpt, f"checksum mismatch of {name}")
        try:
            headers[name], _ = read_header(path, max_bytes=limit, follow_links=False)
        except UserError as e:
            raise DamagedCheckpoint(ckpt, str(e)) from None
    expected_model = {n: (t.dtype, tuple(t.shape)) for n, t in vae.state_dict().items()}
    check_header(headers["model.safetensors"], expected_model, ckpt / "model.safetensors")
    _check_optimizer_header(ckpt, headers["optimizer.safetensors"], [p.shape for p in vae.parameters()])
    try:
        vae.load_state_dict(read_tensors(ckpt / "model.safetensors", expected_model))
        flat = read_tensors(ckpt / "optimizer.safetensors")
        optimizer.load_state_dict(_optimizer_from_flat(flat, meta["optimizer"]))
        _match_parameter_layout(optimizer)
        _set_rng_state(flat, meta["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError) as e:
        raise DamagedCheckpoint(ckpt, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    return meta


def _read_state(ckpt: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """state.json, every field the loader relies on checked for its type."""
    path = ckpt / "state.json"
    try:
        if path.is_symlink() or path.stat().st_size > MAX_STATE_BYTES:
            raise DamagedCheckpoint(ckpt, "state.json is a link or too large")
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DamagedCheckpoint(ckpt, f"state.json: {' '.join(str(e).split())[:160]}") from None
    digests = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(digests, dict) or sorted(digests) != sorted(CHECKPOINT_FILES) or not all(
            isinstance(d, str) and len(d) == 64 for d in digests.values()):
        raise DamagedCheckpoint(ckpt, f"state.json must give the SHA-256 of exactly {', '.join(CHECKPOINT_FILES)}")
    if not isinstance(meta.get("optimizer"), dict) or not isinstance(meta.get("rng"), dict):
        raise DamagedCheckpoint(ckpt, "state.json lacks the optimizer or rng table")
    for key, default in expected.items():
        value = meta.get(key, default)
        numbers = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value) and len(value) == len(default or [])
        ok = {int: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
              list: numbers, dict: isinstance(value, dict)}.get(type(default), True)
        if not ok:
            raise DamagedCheckpoint(ckpt, f"state.json has {key} = {str(value)[:40]!r}")
    return meta


def _check_optimizer_header(ckpt: Path, header: Header, shapes: list[torch.Size]) -> None:
    """Adam's moments have their parameter's shape, its step is a scalar; RNG states are flat byte or int tensors."""
    for name, (dtype, shape) in header.items():
        part = name.split(".")
        if part[0] == "optim" and len(part) == 3 and part[1].isdigit() and int(part[1]) < len(shapes):
            ok = shape in (tuple(shapes[int(part[1])]), ())
        else:
            ok = part[0] == "rng" and len(shape) == 1 and dtype in (torch.uint8, torch.int64) and shape[0] < 1 << 20
        if not ok:
            raise DamagedCheckpoint(ckpt, f"optimizer.safetensors holds {name[:80]!r} {shape[:4]}")


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks (memory stays small whatever its size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
