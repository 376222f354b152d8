"""The numba-compiled kernels behind `int8.kernels` (importing this module imports numba, about half a
second: `int8.kernels` loads it only when a conversion is large enough to gain from it)."""

from __future__ import annotations

import numba
import numpy as np

from .kernels import NON_FINITE, SCALE_OVERFLOW

# `reassoc` lets LLVM vectorize the error sum; it cannot change a division, a rint or a
# conversion, so the codes and scales are exact. No `arcp` (reciprocals) and no `nnan`.
# error_model="numpy": no ZeroDivisionError check on each division (the divisor is never 0);
# Python's check, inside the inner loop, kept it scalar (3x slower with data in cache).
_jit_reassoc = numba.njit(
    nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "nsz"}, error_model="numpy"
)


@numba.njit(inline="always", cache=True)
def _pow2(e):
    """2**e as float32, for -149 <= e <= 127."""
    if e >= -126:
        return np.uint32((e + 127) << 23).view(np.float32)
    return np.uint32(1 << (e + 149)).view(np.float32)


@numba.njit(inline="always", cache=True)
def _round_scale(s, mant_bits, emin):
    """Round a finite non-negative float32 to `mant_bits` mantissa bits, nearest-even,
    with subnormals below 2**emin: x / ulp is a power-of-two scaling, so rint is exact."""
    if mant_bits >= 23 or s == 0:
        return s
    e = np.int32((np.float32(s).view(np.uint32) >> 23) & 0xFF) - 127
    if e < emin:
        e = emin
    ulp = _pow2(e - mant_bits)
    return np.rint(s / ulp) * ulp


@_jit_reassoc
def _quantize_rows(w, block, mant_bits, emin, max_finite, packed, scales):
    """w (rows, cols) float32 C-contiguous -> packed (rows, >= cols) uint8 = code + 128 in its first
    cols columns, scales (rows, cols / block) float32 (values representable in the scale dtype).

    Returns (status, a, b, zero_blocks): status >= 0 is the error sum and `a` the error max
    in units of 2**-24 of a scale; status NON_FINITE or SCALE_OVERFLOW names row a, block b.
    """
    rows, cols = w.shape
    nb = cols // block
    bits = w.view(np.uint32)
    tiny = _pow2(emin)
    esum = 0.0
    emax = np.int32(0)
    zero_blocks = 0
    for r in range(rows):
        for b in range(nb):
            base = b * block
            m = np.uint32(0)  # |w| as bits: same order as the floats, NaN/Inf >= 0x7F800000
            for j in range(block):
                v = np.uint32(bits[r, base + j] & np.uint32(0x7FFFFFFF))
                m = v if v > m else m
            if m >= np.uint32(0x7F800000):
                return NON_FINITE, r, b, zero_blocks
            s = _round_scale(np.uint32(m).view(np.float32) / np.float32(127.0), mant_bits, emin)
            if s > max_finite:
                return SCALE_OVERFLOW, r, b, zero_blocks
            scales[r, b] = s
            if s == 0:
                zero_blocks += 1
                d = np.float32(1.0)
            else:
                d = s
            bsum = np.float32(0.0)
            bmax = np.int32(0)
            if s >= tiny:  # a normal scale: |w / s| <= 127.25, no clamp needed
                for j in range(block):
                    x = w[r, base + j] / d
                    q = np.rint(x)
                    e = abs(x - q)
                    bsum += e
                    bmax = max(bmax, np.int32(e * np.float32(16777216.0)))
                    packed[r, base + j] = np.uint8(np.int32(q) + np.int32(128))
            else:  # a subnormal fp16 scale is coarse: clamp
                for j in range(block):
                    x = w[r, base + j] / d
                    q = min(max(np.rint(x), np.float32(-127.0)), np.float32(127.0))
                    e = abs(x - q)
                    bsum += e
                    bmax = max(bmax, np.int32(min(e, np.float32(64.0)) * np.float32(16777216.0)))
                    packed[r, base + j] = np.uint8(np.int32(q) + np.int32(128))
            esum += bsum
            emax = max(emax, bmax)
    return esum, emax, 0, zero_blocks


# One function per width, not one generic over both: numba widens a generic one's integers to 64 bits, and
# the loop no longer vectorizes (6x slower, measured).
@_jit_reassoc
def _max_abs_bits32(bits):
    """The largest ``bits & 0x7FFFFFFF`` of float32 bits: finite iff below 0x7F800000."""
    m = np.uint32(0)
    for i in range(bits.size):
        v = np.uint32(bits[i] & np.uint32(0x7FFFFFFF))
        m = v if v > m else m
    return m


@_jit_reassoc
def _max_abs_bits16(bits):
    """The largest ``bits & 0x7FFF`` of float16 or bfloat16 bits."""
    m = np.uint16(0)
    for i in range(bits.size):
        v = np.uint16(bits[i] & np.uint16(0x7FFF))
        m = v if v > m else m
    return m


@_jit_reassoc
def _f32_bits_to_bf16(src, dst):
    """float32 bits -> bfloat16 bits, nearest even (torch's rounding; a NaN or Inf becomes garbage, found by the caller).
    Returns the largest ``|bits|`` of the source, as `_max_abs_bits32`."""
    m = np.uint32(0)
    for i in range(src.size):
        b = src[i]
        v = np.uint32(b & np.uint32(0x7FFFFFFF))
        m = v if v > m else m
        dst[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return m


@_jit_reassoc
def _bf16_bits_to_f32(src, dst):
    """bfloat16 bits -> float32 bits (exact)."""
    for i in range(src.size):
        dst[i] = np.uint32(src[i]) << np.uint32(16)
