"""The CPU kernels: the scheme of `int8.quantize`, one pass per block, compiled with numba (`int8.numba_kernels`).

Torch's eager ops make about ten passes over each chunk (absmax, divide,
round, error, narrow, ...), which on a 2-core machine caps the converter well
below the memory bandwidth. Here each block of ``block_size`` values is read
once from memory and everything happens while it sits in L1: absmax, the
scale (rounded to the scale dtype exactly as torch rounds: nearest, ties to
even, subnormals and overflow included), the IEEE float32 division, the
rounding (``rint``: nearest, ties to even), the error statistics and the
packed byte (code + 128).

The bytes are identical to `int8.quantize.quantize_into` (the torch
implementation, which the CUDA path uses): the tests compare both with an
independent numpy reference. Only the error *sum* may differ in its last
bits (its additions are reassociated to vectorize).

Beside it, the one-pass casts the converter needs for the tensors it keeps (float32 to bfloat16,
rounded to nearest even as torch rounds; bfloat16 to float32) and the finiteness checks, each
over raw bits. Everything here works on numpy arrays: no torch (the CPU converter does not import it).

`quantize_rows_numpy` is the same scheme in numpy ufuncs, for conversions too small to pay numba's
start-up (and where numba is missing): the same bytes, about a tenth of the speed.

numba is optional: without it, `available()` is False.
"""

from __future__ import annotations

import numpy as np

from .scheme import SCALE_FORMATS

NON_FINITE = -1.0
SCALE_OVERFLOW = -2.0

_numba_kernels = None
_numba_missing = False


def available() -> bool:
    """Whether numba is installed and its kernels load (loading them, once, costs about half a second)."""
    return _kernels() is not None


def loaded() -> bool:
    """Whether the numba kernels are already loaded: the one-pass casts and checks use them then."""
    return _numba_kernels is not None


def _kernels():
    global _numba_kernels, _numba_missing
    if _numba_kernels is None and not _numba_missing:
        try:
            from . import numba_kernels
        except ImportError:  # pragma: no cover - numba is a dependency
            _numba_missing = True
        else:
            _numba_kernels = numba_kernels
    return _numba_kernels


def quantize_rows(w: np.ndarray, block_size: int, packed: np.ndarray, scales32: np.ndarray, scale_dtype: str):
    """Run the kernel (see `_quantize_rows`): ``w`` float32 C-contiguous ``(rows, in)``, ``packed`` uint8
    ``(rows, >= in)``, ``scales32`` float32 ``(rows, in / block)``; ``scale_dtype`` a safetensors name
    (F32, BF16, F16) of the dtype the scales are rounded to."""
    f = SCALE_FORMATS[scale_dtype]
    return _kernels()._quantize_rows(w, block_size, f.mantissa_bits, f.min_exponent, np.float32(f.max_finite), packed,
                                     scales32)


FINITE_BELOW = {"F32": 0x7F800000, "BF16": 0x7F80, "F16": 0x7C00}
"""A float of each dtype is finite iff its bits without the sign are below this (NaN and Inf at or above)."""


def all_finite_bits(bits: np.ndarray, dtype: str) -> bool:
    """No NaN or Inf among ``bits``: a flat uint32 (F32) or uint16 (BF16, F16) view of the values."""
    k = _kernels()
    m = k._max_abs_bits32(bits) if dtype == "F32" else k._max_abs_bits16(bits)
    return int(m) < FINITE_BELOW[dtype]


def f32_to_bf16(src: np.ndarray, dst: np.ndarray) -> bool:
    """Cast flat float32 values to bfloat16 bits in ``dst`` (uint16), nearest even, in one pass; return
    whether every value was finite (when not, ``dst`` holds garbage for those values)."""
    return int(_kernels()._f32_bits_to_bf16(src.view(np.uint32), dst)) < FINITE_BELOW["F32"]


def bf16_to_f32(src: np.ndarray, dst: np.ndarray) -> None:
    """Widen flat bfloat16 bits (uint16) into ``dst`` float32 (exact)."""
    _kernels()._bf16_bits_to_f32(src, dst.view(np.uint32))


def quantize_rows_numpy(
    w: np.ndarray, block_size: int, packed: np.ndarray, scales32: np.ndarray, scale_dtype: str, work: np.ndarray | None = None
):
    """`quantize_rows` in numpy ufuncs, same bytes and the same return values: about a sixth of the fused
    kernel's speed, but with no compilation or numba import to pay first, so the faster of the two for a
    small model (and the CPU path where numba is missing). ``work``: float32 scratch of at least twice
    ``w``'s values, reused across calls (fresh temporaries cost page faults, more than the arithmetic)."""
    rows, cols = w.shape
    n = rows * cols
    nb = cols // block_size
    if work is None or work.size < 2 * n:
        work = np.empty(2 * n, np.float32)
    t1, t2 = work[:n], work[n : 2 * n]
    b = w.reshape(rows, nb, block_size)
    amax = _block_absmax(w, rows * nb, block_size, t1, t2).reshape(rows, nb)
    if not np.isfinite(amax).all():
        r, c = np.argwhere(~np.isfinite(amax))[0]
        return NON_FINITE, int(r), int(c), 0
    s = round_scales(amax / np.float32(127.0), scale_dtype)
    over = s > np.float32(SCALE_FORMATS[scale_dtype].max_finite)
    if over.any():
        r, c = np.argwhere(over)[0]
        return SCALE_OVERFLOW, int(r), int(c), 0
    scales32[...] = s
    zero = s == 0
    x = np.divide(b, np.where(zero, np.float32(1.0), s)[..., None], out=t1.reshape(rows, nb, block_size))
    q = np.rint(x, out=t2.reshape(rows, nb, block_size))
    if (s < np.float32(2.0 ** SCALE_FORMATS[scale_dtype].min_exponent)).any():
        np.clip(q, -127.0, 127.0, out=q)  # a subnormal fp16 scale is coarse: clamp, as the kernel does
    e = np.abs(np.subtract(x, q, out=x), out=x)
    esum = float(sum_columns(e.reshape(-1))) if e.size else 0.0
    emax = int(min(float(e.max()), 64.0) * 16777216.0) if e.size else 0  # the kernel's units: 2**-24 of a scale
    codes = packed[:, :cols]
    codes.view(np.int8)[...] = q.reshape(rows, cols)  # exact: whole numbers in [-127, 127]
    np.bitwise_xor(codes, np.uint8(0x80), out=codes)  # code + 128, on a quarter of the bytes a float addition reads
    return esum, emax, 0, int(zero.sum())


SUM_WIDTH = 1024
"""`sum_columns` adds rows of this many values, element by element."""


def sum_columns(a: np.ndarray) -> np.floating:
    """The sum of flat float32 ``a``: its rows of `SUM_WIDTH` values added element by element (vectorized, twice
    as fast as numpy's pairwise ``sum``, which sums a row at a time), then those partial sums pairwise. Each partial
    sum adds ``a.size / SUM_WIDTH`` values in float32: for the kernel's non-negative errors, a relative error of
    about 1e-6 at most of the ones measured, which the report's statistics do not notice."""
    n = a.size - a.size % SUM_WIDTH
    if n == 0:
        return a.sum()
    total = np.add.reduce(a[:n].reshape(-1, SUM_WIDTH), axis=0).sum()
    return total + a[n:].sum() if n < a.size else total


def _block_absmax(w: np.ndarray, nblocks: int, block_size: int, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """max |w| of each run of ``block_size`` values of ``w`` (``nblocks`` runs), using the scratch ``t1`` and ``t2``
    (``w.size`` values each). abs first, so an all-zero block's max is +0, not -0; a NaN propagates.

    numpy reduces along a short last axis an element at a time (5x slower than along a long one). So the
    blocks are halved first, each half's elementwise maximum with the other (contiguous rows, full SIMD), down
    to 16 values; those are reduced across the rows of a transposed copy, a sixteenth of the data for block
    128. Same maxima, about twice as fast as transposing the whole block."""
    a = np.abs(w, out=t1[: w.size].reshape(w.shape)).reshape(nblocks, block_size)
    width, spare = block_size, (t2, t1)
    while width > 16 and width % 2 == 0:
        half = width // 2
        out = spare[0][: nblocks * half].reshape(nblocks, half)
        np.maximum(a[:, :half], a[:, half:width], out=out)
        a, width, spare = out, half, (spare[1], spare[0])
    at = spare[0][: nblocks * width].reshape(width, nblocks)
    np.copyto(at, a.T)
    return at.max(axis=0)


def round_scales(s: np.ndarray, scale_dtype: str) -> np.ndarray:
    """float32 scales rounded to nearest-even in ``scale_dtype`` (F32, BF16, F16), back in float32."""
    if scale_dtype == "F32":
        return s
    if scale_dtype == "F16":
        with np.errstate(over="ignore"):  # beyond fp16: inf, which the caller reports as an overflow
            return s.astype(np.float16).astype(np.float32)
    bits = s.view(np.uint32).astype(np.uint64)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
