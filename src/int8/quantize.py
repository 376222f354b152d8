"""Block-wise absmax int8 quantization: the math, as pure functions on tensors.

The scheme, exactly (it is what makes CPU and CUDA outputs byte-identical):

* A weight ``W`` of shape ``(out, in)`` is cut into blocks of ``block_size``
  consecutive values along the input dimension (rows are never mixed).
* ``amax = max(|w|)`` over a block, in float32 (sources in fp16/bf16 are
  widened exactly first).
* ``scale = amax / 127`` as an IEEE float32 division, then rounded to nearest
  (ties to even) into the scale dtype (``--scale-dtype``, fp32 by default). The *stored*
  scale is the one used below, so the checkpoint is self-consistent.
* ``q = clamp(round_half_even(w / scale), -127, 127)`` with ``w / scale`` an
  IEEE float32 division (not a multiplication by a reciprocal). A block whose
  stored scale is 0 (all zeros, or an fp16 scale that underflowed) gets
  ``q = 0``.
* Decoding is ``w' = q * scale``; ``|w - w'| <= scale / 2`` for every value,
  because rounding the scale to fp16/bf16 moves it by at most 2^-9 relative, so
  ``|w / scale| <= 127.25`` and the clamp never bites.

Packed layout (compressed-tensors ``pack-quantized`` with ``num_bits=8``): the
codes of a row, offset by +128 into ``[1, 255]``, are stored as consecutive
bytes, four to a little-endian int32, the row padded with zero bytes to a
multiple of four: `int8.formats.compressed_tensors` packs and unpacks them.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import torch

from . import kernels
from .blocks import DEFAULT_BLOCK_SIZE
from .scheme import QMAX, ErrorStats, NonFiniteWeights

# Rows are quantized in sub-chunks of about this many values (4 MiB of fp32),
# so every intermediate stays in the CPU's L2/L3 cache.
_SUBCHUNK_VALUES = 1 << 20

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("int8 writes little-endian checkpoints and needs a little-endian machine")


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized 2-D weight: int8 ``codes`` (out, in) and ``scales`` (out, in/block)."""

    codes: torch.Tensor
    scales: torch.Tensor
    block_size: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.block_size, dtype)


def scales_from_absmax(amax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """``amax / 127`` in float32, rounded to nearest into ``scale_dtype``.

    The divisor is a tensor on ``amax``'s device: CUDA torch divides by a Python
    scalar as a multiplication by its reciprocal, which rounds differently (seen on
    an H200: float32 scales, and so the codes, differed from the CPU's).
    """
    amax = amax.float()
    return torch.div(amax, torch.full((), float(QMAX), dtype=torch.float32, device=amax.device)).to(scale_dtype)


def quantize(
    w: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, scale_dtype: torch.dtype = torch.float32, *, backend: str | None = None
) -> QuantizedWeight:
    """Quantize a 2-D weight ``(out, in)`` block-wise along ``in``.

    A ragged last block (``in`` not a multiple of ``block_size``) is quantized
    with its own scale, as if padded with zeros. Raises ``NonFiniteWeights``.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    rows, cols = w.shape
    pad = (-cols) % block_size
    src = torch.nn.functional.pad(w.float(), (0, pad)) if pad else w.contiguous()
    codes = torch.empty(rows, cols + pad, dtype=torch.int8, device=w.device)
    scales = torch.empty(rows, (cols + pad) // block_size, dtype=scale_dtype, device=w.device)
    quantize_into(src, block_size, codes, scales, backend=backend)
    return QuantizedWeight(codes[:, :cols].contiguous() if pad else codes, scales, block_size)


def quantize_into(
    w: torch.Tensor,
    block_size: int,
    codes_out: torch.Tensor,
    scales_out: torch.Tensor,
    *,
    offset_codes: bool = False,
    backend: str | None = None,
) -> ErrorStats:
    """Quantize rows of ``w`` into preallocated outputs; return the error statistics.

    ``w`` is a contiguous ``(rows, in)`` tensor with ``in % block_size == 0``
    (any float dtype; it is widened to float32 in cache-sized pieces).
    ``codes_out`` is int8 ``(rows, >= in)``: columns ``[:in]`` receive the codes.
    With ``offset_codes=True`` it receives the packed bytes instead (code + 128,
    as uint8 viewed through int8), ready to be written as ``weight_packed``.
    ``scales_out`` is ``(rows, in / block_size)`` in the scale dtype.

    On CPU the fused numba kernel (`int8.kernels`) does the work when numba is
    installed, else (and on CUDA) torch ops do; ``backend`` ("numba", "numpy" or
    "torch") forces one. All produce the same bytes.
    """
    rows, cols = w.shape
    if cols % block_size:
        raise ValueError(f"{cols} input features are not a multiple of block size {block_size}")
    if not w.is_contiguous():
        raise ValueError("quantize_into needs a contiguous tensor")
    if backend is None:
        backend = "numba" if w.device.type == "cpu" and kernels.available() else "torch"
    if backend in ("numba", "numpy"):
        return _quantize_into_cpu(w, block_size, codes_out, scales_out, offset_codes, backend)
    return _quantize_into_torch(w, block_size, codes_out, scales_out, offset_codes)


def _quantize_into_cpu(w, block_size, codes_out, scales_out, offset_codes, kernel) -> ErrorStats:
    """The converter's CPU path (`int8.conversion.arrays.quantize_blocks`) over numpy views of the tensors."""
    from .conversion import arrays
    from .formats.safetensors import to_numpy

    cols = w.shape[1]
    codes = codes_out.view(torch.uint8).numpy()
    st = arrays.quantize_blocks(to_numpy(w), _DTYPE_NAMES[w.dtype], block_size, codes, to_numpy(scales_out),
                                _SCALE_NAMES[scales_out.dtype], kernel=kernel)
    if not offset_codes:
        codes[:, :cols] ^= 0x80
    return st


def _quantize_into_torch(w, block_size, codes_out, scales_out, offset_codes) -> ErrorStats:
    rows, cols = w.shape
    nblocks = cols // block_size
    step = max(1, _SUBCHUNK_VALUES // cols)
    dev = w.device
    space = _workspace(dev, step * cols, step * nblocks)
    wide = space.f32[0][: step * cols].view(step, cols) if w.dtype != torch.float32 else None
    scaled_buf = space.f32[1][: step * cols].view(step, cols)
    q_buf = space.f32[2][: step * cols].view(step, cols)
    q8_buf = space.i8[: step * cols].view(step, cols)
    amax_buf = space.small[0][: step * nblocks].view(step, nblocks)
    amin_buf = space.small[1][: step * nblocks].view(step, nblocks)
    err_max = torch.zeros((), dtype=torch.float32, device=dev)
    err_sum = torch.zeros((), dtype=torch.float64, device=dev)
    zero_blocks = torch.zeros((), dtype=torch.int64, device=dev)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        x = w[r0:r1]
        if wide is not None:
            x = wide[:n].copy_(x)
        blocks = x.view(n, nblocks, block_size)
        # max(|w|) as max(max, -min): two reductions, no |w| temporary. NaN propagates.
        amax = torch.amax(blocks, -1, out=amax_buf[:n])
        amin = torch.amin(blocks, -1, out=amin_buf[:n]).neg_()
        torch.maximum(amax, amin, out=amax).abs_()  # abs: max(0, -0) may be -0; an all-zero block's scale is +0
        scales = scales_from_absmax(amax, scales_out.dtype)
        if not bool(torch.isfinite(scales).all()):
            bad = "NaN or Inf values" if not bool(torch.isfinite(amax).all()) else (
                f"values too large for {scales_out.dtype} scales (|w| up to {float(amax.max()):.3g})"
            )
            raise NonFiniteWeights(bad)
        scales_out[r0:r1] = scales
        divisor = scales.float()
        zero = divisor == 0
        zero_blocks += zero.sum()
        divisor.masked_fill_(zero, 1.0)
        scaled = torch.div(blocks, divisor.unsqueeze(-1), out=scaled_buf[:n].view(n, nblocks, block_size))
        q = torch.round(scaled, out=q_buf[:n].view(n, nblocks, block_size))
        if bool((divisor < torch.finfo(scales_out.dtype).tiny).any()):
            # A subnormal scale (fp16, |w| < ~0.008) is rounded coarsely: only then can
            # |w / scale| exceed 127.5. Normal scales never need the clamp.
            q.clamp_(-QMAX, QMAX)
        err = scaled.sub_(q).abs_()
        err_max = torch.maximum(err_max, err.amax())
        err_sum += err.sum()
        q8 = q8_buf[:n].copy_(q.view(n, cols))
        if offset_codes:
            torch.bitwise_xor(q8.view(torch.uint8), 0x80, out=codes_out[r0:r1, :cols].view(torch.uint8))
        else:
            codes_out[r0:r1, :cols] = q8
    return ErrorStats(
        max_abs=float(err_max),
        sum_abs=float(err_sum),
        count=rows * cols,
        zero_blocks=int(zero_blocks),
    )


class _Workspace:
    """Scratch buffers of one thread on one device, grown as needed and kept.

    Reusing them matters: fresh memory is page-faulted in on first touch,
    which costs more than the quantization arithmetic itself.
    """

    def __init__(self, device: torch.device, values: int, blocks: int):
        self.values, self.blocks = values, blocks
        self.f32 = [torch.empty(values, dtype=torch.float32, device=device) for _ in range(3)]
        self.i8 = torch.empty(values, dtype=torch.int8, device=device)
        self.small = [torch.empty(blocks, dtype=torch.float32, device=device) for _ in range(2)]


_local = threading.local()

_SCALE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPE_NAMES = {**_SCALE_NAMES, torch.float64: "F64"}


def _workspace(device: torch.device, values: int, blocks: int) -> _Workspace:
    spaces = _local.__dict__.setdefault("spaces", {})
    space = spaces.get(device)
    if space is None or space.values < values or space.blocks < blocks:
        grown = max(values, space.values if space else 0), max(blocks, space.blocks if space else 0)
        space = spaces[device] = _Workspace(device, *grown)
    return space


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reconstruct ``q * scale`` (float32 product, then cast to ``dtype``)."""
    rows, cols = codes.shape
    nblocks = scales.shape[-1]
    pad = nblocks * block_size - cols
    if pad < 0 or pad >= block_size:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit codes {tuple(codes.shape)} with block {block_size}")
    c = codes.float()
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    out = c.view(rows, nblocks, block_size) * scales.float().unsqueeze(-1)
    return out.view(rows, -1)[:, :cols].to(dtype)




