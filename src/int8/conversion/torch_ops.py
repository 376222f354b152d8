"""The converter's arithmetic through torch: on a CUDA device, on a CPU without numba, and for
bitsandbytes' row-wise layout (`int8.rowwise`). Importing this module imports torch.

Inputs and outputs are the engine's numpy arrays (`int8.conversion.arrays` has the same
contract); they are seen as tensors over the same memory, moved to the device and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from ..formats.safetensors import to_torch
from ..quantize import quantize_into
from ..rowwise import quantize_rows_into
from ..scheme import ErrorStats


def _weight(w: np.ndarray, dtype: str, transposed: bool) -> torch.Tensor:
    x = to_torch(w, dtype)
    return x.t().contiguous() if transposed else x


def quantize_blocks(
    w: np.ndarray,
    dtype: str,
    block_size: int,
    codes: np.ndarray,
    scales: np.ndarray,
    scale_dtype: str,
    *,
    device: str,
    transposed: bool = False,
) -> ErrorStats:
    """`int8.conversion.arrays.quantize_blocks` with torch ops (`int8.quantize.quantize_into`) on ``device``."""
    x = _weight(w, dtype, transposed)
    codes_t = torch.from_numpy(codes).view(torch.int8)
    scales_t = to_torch(scales, scale_dtype)
    if device == "cpu":
        return quantize_into(x, block_size, codes_t, scales_t, offset_codes=True)
    codes_d = torch.zeros(codes_t.shape, dtype=torch.int8, device=device)
    scales_d = torch.empty(scales_t.shape, dtype=scales_t.dtype, device=device)
    st = quantize_into(x.to(device), block_size, codes_d, scales_d, offset_codes=True)
    codes_t.copy_(codes_d)
    scales_t.copy_(scales_d)
    return st


def quantize_rows(
    w: np.ndarray, dtype: str, codes: np.ndarray, scb: np.ndarray, *, device: str, transposed: bool = False
) -> ErrorStats:
    """bitsandbytes' row-wise codes (int8 ``(rows, in)``, in ``codes``' bytes) and float32 SCB of ``w``
    (`int8.rowwise.quantize_rows_into`) on ``device``."""
    x = _weight(w, dtype, transposed)
    codes_t = torch.from_numpy(codes).view(torch.int8)
    scb_t = torch.from_numpy(scb)
    if device == "cpu":
        return quantize_rows_into(x, codes_t, scb_t)
    codes_d = torch.empty(codes_t.shape, dtype=torch.int8, device=device)
    scb_d = torch.empty(scb_t.shape, dtype=torch.float32, device=device)
    st = quantize_rows_into(x.to(device), codes_d, scb_d)
    codes_t.copy_(codes_d)
    scb_t.copy_(scb_d)
    return st


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Torch's OpenMP threads spin at barriers; beside the engine's own threads they oversubscribe the
    cores and slow everything down tenfold. While streaming, each torch op runs on the thread that
    calls it and the workers spread the work over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
