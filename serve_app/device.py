"""Which device a replica computes on, and how much of it is in use."""

from __future__ import annotations

import torch


def assigned_device(gpu_ids: list[str], requested: str = "auto") -> str:
    """The GPU Ray assigned (Ray narrows CUDA_VISIBLE_DEVICES to it, so it is cuda:0), else CPU."""
    if requested != "auto":
        return requested
    if gpu_ids and torch.cuda.is_available():
        return "cuda:0"
    return "cpu"


def device_responds(device: torch.device | str) -> None:
    """A one-element op on the device and back (microseconds): raises if the device is lost."""
    value = torch.ones(1, device=device).add_(1).item()
    if value != 2.0:
        raise RuntimeError(f"device {device} computed 1 + 1 = {value}")


def memory_gb(device: str) -> tuple[float, float]:
    """(used, total) GiB of the whole device, not just this process's tensors."""
    if not device.startswith("cuda"):
        return 0.0, 0.0
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return (total - free) / 2**30, total / 2**30
