"""The converter's arithmetic on the CPU, on numpy arrays: no torch is imported.

The engine hands these functions the source bytes as numpy views of the page cache
(`int8.checkpoint.CheckpointReader.view_array`; bfloat16 as its raw ``uint16`` bits) and buffers
of its own to fill:

* `quantize_blocks`: block-absmax int8 codes (+128, the packed bytes) and scales, through the
  fused numba kernel of `int8.kernels` or its numpy twin (`Kernel`: the same bytes; numpy costs
  nothing to start, numba runs about ten times faster once compiled); float16, bfloat16 and
  float64 sources are widened to float32 in cache-sized pieces first, as the scheme says
  (float64 rounds to nearest).
* `cast_into`: a kept tensor in the output dtype, rounded to nearest even exactly as torch rounds
  (float32 to bfloat16 in one pass of `int8.kernels`; float64 through float32, as torch does).
* `all_finite`: whether a tensor has no NaN or Inf, from its bits in one pass; `cast_finite` casts and
  checks at once.

The casts and checks use numba's one-pass kernels once they are loaded (for a large conversion), else
numpy ufuncs: the same results.

Without numba (`int8.kernels.available()` false) everything here runs as plain numpy.
"""

from __future__ import annotations

import threading
from enum import Enum

import numpy as np

from .. import kernels
from ..formats.safetensors import NUMPY_DTYPES
from ..scheme import ErrorStats, NonFiniteWeights

SUBCHUNK_VALUES = 1 << 20
"""A non-float32 source is widened to float32 this many values at a time (4 MiB: it stays in cache)."""

NUMPY_SUBCHUNK_VALUES = 1 << 18
"""The numpy kernel's piece: 1 MiB of float32 and two temporaries of that size, which stay in a 2 MiB L2 well enough.
The kernel makes a dozen numpy calls per piece and two workers share the GIL between them: in a whole conversion
this size streamed a 0.34 GB checkpoint about 8% faster than 64K values (README's bench/convert machine), though
64K is faster for one thread alone."""

CAST_PIECE_VALUES = 1 << 17
"""The float32 to bfloat16 rounding's piece in numpy (512 KiB of bits and a temporary as large: in L2)."""

NUMBA_FROM_BYTES = 900_000_000
"""Bytes of weights to quantize from which numba's start-up (importing it and loading the compiled kernels: 0.2 s,
0.3 s where scipy is installed, whose BLAS numba probes) pays for itself over numpy's ufuncs. Whole conversions on
README's bench/convert machine, each kernel forced, interleaved: 0.60 GB to quantize, numpy 0.64 s against numba
0.74 s; 0.81 GB, 0.85 s against 0.90 s; 1.2 GB (BLOOM-560m's shape, with 1 GB of embedding to cast, which numba
also does in one pass), numba 0.37 s ahead; 1.61 GB, numba 1.02 s against 1.31 s."""


class Kernel(str, Enum):
    """Which implementation of the scheme quantizes on the CPU: the same bytes whichever it is."""

    NUMBA = "numba"  # `int8.numba_kernels`: fused, compiled
    NUMPY = "numpy"  # `int8.kernels.quantize_rows_numpy`
    TORCH = "torch"  # `int8.quantize.quantize_into` (what runs on a GPU), through `int8.conversion.torch_ops`


def choose_kernel(quantized_bytes: int) -> Kernel:
    """numba for large conversions, numpy for small ones (and where numba is missing)."""
    return Kernel.NUMBA if quantized_bytes >= NUMBA_FROM_BYTES and kernels.available() else Kernel.NUMPY

_local = threading.local()


def _scratch(values: int) -> np.ndarray:
    """This thread's float32 scratch buffer of at least ``values`` values (grown as needed and kept:
    fresh memory is page-faulted in on first touch, which costs more than the arithmetic)."""
    buf = getattr(_local, "f32", None)
    if buf is None or buf.size < values:
        buf = _local.f32 = np.empty(max(values, 1), np.float32)
    return buf


def widen_into(x: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """``x`` (safetensors dtype ``dtype``) as float32 in ``out`` (flat float32, large enough), shaped as ``x``."""
    y = out[: x.size].reshape(x.shape)
    if dtype == "BF16":
        if kernels.loaded():
            kernels.bf16_to_f32(x.reshape(-1), y.reshape(-1))
        else:
            np.left_shift(x, np.uint32(16), out=y.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(y, x, casting="unsafe")  # F16: exact; F64: nearest even, as torch's .float()
    return y


def quantize_blocks(
    w: np.ndarray,
    dtype: str,
    block_size: int,
    codes: np.ndarray,
    scales: np.ndarray,
    scale_dtype: str,
    *,
    transposed: bool = False,
    kernel: Kernel = Kernel.NUMBA,
) -> ErrorStats:
    """Quantize the rows of ``w`` (``(rows, in)``; with ``transposed``, a Conv1D weight stored ``(in, rows)``)
    into ``codes`` (uint8 ``(rows, >= in)``: code + 128 in the first ``in`` columns) and ``scales``
    (``(rows, in / block_size)`` in ``scale_dtype``'s numpy form), with ``kernel``. Raises `NonFiniteWeights`."""
    numba = Kernel(kernel) == Kernel.NUMBA
    if transposed:
        w = np.ascontiguousarray(widen_into(w, dtype, np.empty(w.size, np.float32)).T) if dtype != "F32" else (
            np.ascontiguousarray(w.T))
        dtype = "F32"
    rows, cols = w.shape
    nblocks = cols // block_size
    piece = SUBCHUNK_VALUES if numba else NUMPY_SUBCHUNK_VALUES
    step = rows if dtype == "F32" and numba else max(1, piece // max(1, cols))
    widened = 0 if dtype == "F32" else step * cols
    work_values = 0 if numba else 2 * step * cols  # the numpy kernel's temporaries
    space = _scratch(widened + work_values + step * nblocks)
    work = space[widened : widened + work_values]
    s32 = space[widened + work_values : widened + work_values + step * nblocks]
    stats = ErrorStats()
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        x = w[r0:r1] if dtype == "F32" else widen_into(w[r0:r1], dtype, space)
        part = s32[: n * nblocks].reshape(n, nblocks)
        if numba:
            x = x.view()
            x.flags.writeable = False  # one compiled variant of the kernel: read-only float32 input
            status, a, b, zero_blocks = kernels.quantize_rows(x, block_size, codes[r0:r1], part, scale_dtype)
        else:
            status, a, b, zero_blocks = kernels.quantize_rows_numpy(x, block_size, codes[r0:r1], part, scale_dtype, work)
        if status == kernels.NON_FINITE:
            raise NonFiniteWeights("NaN or Inf values")
        if status == kernels.SCALE_OVERFLOW:
            amax = float(np.abs(x[a, b * block_size : (b + 1) * block_size]).max())
            raise NonFiniteWeights(f"values too large for {scale_dtype.lower()} scales (|w| up to {amax:.3g})")
        store_scales(part, scales[r0:r1], scale_dtype)
        stats.merge(ErrorStats(max_abs=a / 16777216.0, sum_abs=status, count=n * cols, zero_blocks=zero_blocks))
    return stats


def store_scales(s32: np.ndarray, out: np.ndarray, scale_dtype: str) -> None:
    """float32 scales that the kernel already rounded to ``scale_dtype`` into ``out`` (exact)."""
    if scale_dtype == "BF16":
        np.right_shift(s32.view(np.uint32), 16, out=out, casting="unsafe")  # the low bits are zero
    else:
        np.copyto(out, s32, casting="unsafe")


def all_finite(x: np.ndarray, dtype: str) -> bool:
    """No NaN or Inf in ``x`` (a float tensor of safetensors dtype ``dtype``, contiguous)."""
    if not x.size:
        return True
    flat = x.reshape(-1)
    if dtype == "F64":
        return bool(np.isfinite(flat).all())
    bits = flat.view(np.uint32 if dtype == "F32" else np.uint16)
    if kernels.loaded():
        return kernels.all_finite_bits(bits, dtype)
    if dtype == "F32":
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(kernels.sum_columns(flat)):  # one pass; a sum of finite values is finite, barring overflow
                return True
    below = kernels.FINITE_BELOW[dtype]
    return bool(((bits & (0x7FFFFFFF if dtype == "F32" else 0x7FFF)) < below).all())


def cast_finite(x: np.ndarray, dtype: str, out_dtype: str, out: np.ndarray) -> np.ndarray | None:
    """`cast_into` for a float tensor not yet checked: None when ``x`` holds a NaN or an Inf (``out`` then holds
    garbage). float32 to bfloat16, once numba is loaded, takes one pass: the cast finds the largest magnitude on its
    way; other casts check first (`all_finite`), then cast."""
    if dtype == "F32" and out_dtype == "BF16" and kernels.loaded():
        y = out[: x.size * 2].view(np.uint16).reshape(x.shape)
        return y if kernels.f32_to_bf16(x.reshape(-1), y.reshape(-1)) else None
    if not all_finite(x, dtype):
        return None
    return cast_into(x, dtype, out_dtype, out)


def cast_into(x: np.ndarray, dtype: str, out_dtype: str, out: np.ndarray) -> np.ndarray:
    """``x`` (finite, safetensors dtype ``dtype``) cast to ``out_dtype`` into the bytes of ``out`` (flat uint8,
    large enough), rounded to nearest even as torch's ``.to()`` rounds; returns the typed view of ``out``."""
    y = out[: x.size * NUMPY_DTYPES[out_dtype].itemsize].view(NUMPY_DTYPES[out_dtype]).reshape(x.shape)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, which the engine then refuses with its own message
        _cast(x, dtype, out_dtype, y)
    return y


def _cast(x: np.ndarray, dtype: str, out_dtype: str, y: np.ndarray) -> None:
    if dtype == "F64":  # torch rounds float64 to float16/bfloat16 through float32
        x, dtype = x.astype(np.float32), "F32"
    if out_dtype == "BF16":
        f = x if dtype == "F32" else widen_into(x, dtype, np.empty(x.size, np.float32))
        _round_to_bf16(f.reshape(-1), y.reshape(-1))
    elif dtype == "BF16":
        if out_dtype == "F32":
            widen_into(x, dtype, y.reshape(-1))
        else:
            np.copyto(y, widen_into(x, dtype, np.empty(x.size, np.float32)), casting="unsafe")
    else:
        np.copyto(y, x, casting="unsafe")  # float32 <-> float16 (nearest even), float16 -> float32 (exact)


def _round_to_bf16(f: np.ndarray, out: np.ndarray) -> None:
    """float32 ``f`` (flat, finite) to bfloat16 bits in ``out``, nearest even: ``(bits + 0x7FFF + lsb) >> 16``,
    in cache-sized pieces (twice as fast as whole-array passes); no overflow, NaN never comes here."""
    if kernels.loaded():
        kernels.f32_to_bf16(f, out)
        return
    bits = f.view(np.uint32)
    buf = getattr(_local, "u32", None)
    if buf is None:
        buf = _local.u32 = np.empty(CAST_PIECE_VALUES, np.uint32)
    for i in range(0, bits.size, buf.size):
        b = bits[i : i + buf.size]
        t = buf[: b.size]
        np.right_shift(b, 16, out=t)
        t &= 1
        t += 0x7FFF
        t += b
        np.right_shift(t, 16, out=out[i : i + buf.size], casting="unsafe")
