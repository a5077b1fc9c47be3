"""Pixels: 8-bit images are uint8 (N, C, H, W) in 0..255, the network's images float in [0, 1]; one convention."""

from __future__ import annotations

import torch


def to_float(images: torch.Tensor, device: torch.device | str | None = None, *,
             memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1], converted on `device` (moved there first) into `memory_format` in
    the same pass (e.g. channels_last); float input is clamped."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return torch.empty_like(images, dtype=torch.float32, memory_format=memory_format).copy_(images).div_(255)
    images = images.float().clamp(0, 1)
    return images if memory_format == torch.preserve_format else images.contiguous(memory_format=memory_format)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (N, C, H, W) in [0, 1] -> uint8, rounded as a PNG would be; uint8 input is returned as it is."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
