"""Device and precision choices, made in one place for training and evaluation."""

from __future__ import annotations

import contextlib

import torch

from facevae.errors import UserError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when present, else cpu; an explicit cuda without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but torch sees no CUDA GPU; use device=cpu or device=auto")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast speeds training up."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 on a CUDA GPU or CPU that has it natively, else float32 (fp16 with a scaler is never automatic).

    bf16 or fp16 asked for where the device lacks them is a UserError.
    """
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "float32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("precision 'bf16' was asked for but this GPU has no bf16; use precision=fp16 or auto")
    if name == "fp16" and device.type != "cuda":
        raise UserError("precision 'fp16' needs a CUDA GPU; use precision=bf16 or float32 on the CPU")
    return name


def setup(config, *, device: str | None = None) -> tuple[torch.device, str]:
    """The run's hardware choices, made the same way for training and evaluation: CPU threads, device, precision.

    `device` overrides the config's device (evaluate --device).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    dev = resolve_device(device or config.device)
    return dev, resolve_precision(config.precision, dev)


def eval_batch_size(device: torch.device, configured: int = 0) -> int:
    """Images per decoder call when evaluating: `configured` (the config's eval_batch_size) when set, else 32 on a
    CPU and 256 on a GPU. On a CPU the activations of larger batches pass glibc's 32 MB mmap threshold and are mapped
    and page-faulted in afresh at every call, which slows the decoder (benchmarks/evaluate.py prints both)."""
    return configured or (32 if device.type == "cpu" else 256)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for the network; likelihood and KL sums stay float32 (distributions.py casts)."""
    if precision == "float32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
