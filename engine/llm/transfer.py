"""Host values to device tensors without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory and synchronises the stream, so
the host waits for every kernel already queued. With async scheduling (core.py) the host builds
step N+1's inputs while step N runs, and such a copy would wait for step N. On CUDA the values go
through pinned memory with a non-blocking copy (PyTorch's pinned-memory allocator does not hand a
block out again before the copies using it are done); elsewhere these are plain copies.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)`, without a stream sync on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def array_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy array on `device`, without a stream sync on CUDA."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
