"""Fused de-quantize-and-multiply kernels for `Int8Linear`, written in Triton.

The layer's weight is ``W[n, k] = code[n, k] * scale[n, k // block]`` with
``codes`` int8 ``(out, in)`` (row-major: ``k`` contiguous) and ``scales``
``(out, ceil(in / block))`` in fp16, bf16 or fp32. The kernels read the codes
and scales straight into the multiplication; no float copy of ``W`` ever exists
in GPU memory:

* `linear` (``y = x @ W.T + bias``):

  - one token (decoding): `_gemv_kernel`, a GEMV on the CUDA cores. Each
    program streams ``BLOCK_N`` rows of codes along ``k``; the products
    ``code * x`` are summed per scale block in float32 and multiplied by the
    block's scale once (one multiply per block, not per weight), so the kernel
    reads 1 byte per weight and is bound by memory bandwidth only.
  - 2 tokens and more (batched decoding, prefill, training): `_tiled_kernel`, a
    tiled matmul on the tensor cores. Each weight tile is de-quantized in
    registers in the compute dtype (``code * scale``, rounded exactly as the
    de-quantize path rounds it) and fed to ``tl.dot`` with float32 accumulation.

* `linear_grad_input` (``dx = dy @ W``, the backward pass): the same tiled
  kernel with the transposed access (the reduction runs over the output rows
  ``n``, the result over ``k``).

* `dequantize` (``W`` in the compute dtype, into a caller's buffer):
  `_dequant_kernel`, one pass at memory bandwidth, with the de-quantize path's
  exact values. `int8.runtime.layer` uses it for many tokens (prefill,
  training), where cuBLAS on the de-quantized weight beats the fused tiled
  kernel (measured on an H200: README, bench/gpu).

Launches: after a kernel's first launch for a specialization, later launches
with the same one go straight to the compiled kernel (`_launch`), skipping
Triton's per-call argument binding, which costs more than the one-token GEMV
itself takes on the GPU.

Any block size works. When a K tile lies inside one scale block (block sizes
with a power-of-two factor >= 16: 16, 32, 48, 64, 128, ...), one scale per row
is loaded per tile; otherwise the scales are gathered per value.

Triton is optional: without it (or on a torch without CUDA) `unavailable_reason`
says why and the layer keeps its de-quantize path. When ``TRITON_INTERPRET=1``
was set before triton was first imported, the kernels run on CPU tensors in
Triton's interpreter, which is how the tests check them without a GPU; the
production dispatch in `int8.runtime.layer` uses them on CUDA only.

Note on the interpreter: it stores bf16 as raw 16-bit integers and only
converts them to and from float32 correctly, so the kernels do all arithmetic
in float32 and use bf16 only for loads, stores and roundings (which is also
what the GPU does); the interpreted bf16 ``tl.dot`` gets float32 operands
(`linear` and `linear_grad_input` set ``UPCAST``), holding the same
bf16-rounded values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

try:  # triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except Exception as _e:  # ImportError, or a broken install that fails on import
    triton = tl = None
    _IMPORT_ERROR: str | None = f"triton is not importable ({type(_e).__name__}: {_e})"
else:
    _IMPORT_ERROR = None

DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
"""The compute and scale dtypes the kernels take."""

GEMV_MAX_TOKENS = 1
"""Up to this many tokens the forward pass uses the CUDA-core GEMV; beyond it, the tiled kernel."""

_disabled: str | None = None


class OperandError(ValueError):
    """The operands do not fit the kernels (dtypes, shapes, devices): the caller's mistake, not the kernel's."""


# --------------------------------------------------------------------------------------------
# Availability


def available(device_type: str = "cuda") -> bool:
    """Whether the kernels can run on tensors of ``device_type`` here (see `unavailable_reason`)."""
    return unavailable_reason(device_type) is None


def unavailable_reason(device_type: str = "cuda") -> str | None:
    """Why the kernels cannot run on ``device_type`` tensors here, or None when they can.

    CUDA: triton importable, a CUDA GPU, and no earlier failure (`disable`).
    CPU: only in Triton's interpreter (`interpreted`), which is for tests.
    """
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if _disabled is not None:
        return _disabled
    if device_type == "cpu":
        return None if interpreted() else "on CPU the Triton kernels run only in Triton's interpreter (TRITON_INTERPRET=1)"
    if device_type != "cuda":
        return f"the Triton kernels run on CUDA, not {device_type}"
    if not _cuda_present():
        return "torch sees no CUDA GPU"
    return None


@functools.lru_cache(maxsize=1)
def _cuda_present() -> bool:
    return torch.cuda.is_available()


def disable(reason: str) -> None:
    """Stop using the kernels in this process (after a failure): `available()` turns False."""
    global _disabled
    _disabled = reason


def supports(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> bool:
    """Whether the kernels take these operands (dtypes and shapes; device not checked)."""
    return _supports(x.dtype, codes, scales, block_size)


def _supports(dtype: torch.dtype, codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> bool:
    return (
        dtype in DTYPES
        and codes.dtype == torch.int8
        and codes.dim() == 2
        and scales.dim() == 2
        and scales.dtype in DTYPES
        and block_size >= 1
        and scales.shape[0] == codes.shape[0]
        and scales.shape[1] == math.ceil(codes.shape[1] / block_size)
        and codes.shape[0] > 0
        and codes.shape[1] > 0
    )


# --------------------------------------------------------------------------------------------
# Launch configurations


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of `_gemv_kernel`: ``block_n`` rows per program, ``block_k`` values per step."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class TileConfig:
    """Tiles of `_tiled_kernel`: ``block_m`` tokens x ``block_j`` outputs, ``block_r`` reduction values per step."""

    block_m: int = 64
    block_j: int = 64
    block_r: int = 64
    num_warps: int = 4
    num_stages: int = 3


def _pow2_factor(n: int) -> int:
    """The largest power of two that divides ``n``."""
    return n & -n


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


PROGRAMS_WANTED = 264
"""Programs a launch should have to fill a large GPU (two per SM of an H100/H200): the
one-token and few-token kernels do not split K, so they get their parallelism from N."""


GEMV_PROGRAMS = 1024
"""Programs the GEMV aims at: on an H200, 4 rows per program were fastest for GPT-J's 4096-row
weights and 16 for its 16384-row one (bench/gpu's tile sweep), about 1024 programs both times."""


@functools.lru_cache(maxsize=256)
def gemv_config(n: int, k: int) -> GemvConfig:
    """The default GEMV tiles: 4 to 16 rows per program, about `GEMV_PROGRAMS` programs."""
    block_n = max(4, min(16, _next_pow2(max(1, n // GEMV_PROGRAMS))))
    block_k = min(1024 if k >= 4096 else 512, max(16, _next_pow2(k)))
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=1024)
def tile_config(m: int, j: int, dtype: torch.dtype) -> TileConfig:
    """The default tiled-matmul tiles for ``m`` tokens and ``j`` outputs (``j`` = in features for the backward)."""
    wide = dtype == torch.float32
    if m <= 16:
        block_j = 32 if j >= 32 * PROGRAMS_WANTED else 16
        return TileConfig(block_m=16, block_j=block_j, block_r=64 if wide else 128, num_warps=4, num_stages=4)
    if m <= 64:
        return TileConfig(block_m=32 if m <= 32 else 64, block_j=64, block_r=64, num_warps=4, num_stages=3)
    if wide:
        return TileConfig(block_m=64, block_j=128, block_r=32, num_warps=8, num_stages=2)
    # 512 tokens on an H200: 60-227 us against 70-262 us for 128 x 128 x 64 with 8 warps (bench/gpu's sweep)
    return TileConfig(block_m=128, block_j=64, block_r=64, num_warps=4, num_stages=4)


DEQUANT_TILE = (32, 256)
"""Rows x columns of the weight each program of `_dequant_kernel` writes."""


# --------------------------------------------------------------------------------------------
# The kernels

if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, c_ptr, s_ptr, b_ptr, y_ptr,
        N, K, stride_xm, stride_cn, stride_sn, stride_ym,
        BLOCK: tl.constexpr,        # values per scale
        GROUPED: tl.constexpr,      # True: each SUB-wide sub-block of a K step lies in one scale block
        SUB: tl.constexpr,
        GROUPS: tl.constexpr,       # BLOCK_K = SUB * GROUPS
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DT: tl.constexpr,           # compute dtype (x, bias, y)
    ):
        """y[m, n] = sum_k x[m, k] * code[n, k] * scale[n, k // BLOCK] (+ bias[n]); grid (N / BLOCK_N, M)."""
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        c_rows = c_ptr + offs_n.to(tl.int64) * stride_cn
        s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
        x_row = x_ptr + m * stride_xm
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if GROUPED:
            g = tl.arange(0, GROUPS)
            sub = tl.arange(0, SUB)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + g[:, None] * SUB + sub[None, :]                      # (GROUPS, SUB)
                k_ok = offs_k < K
                x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                c = tl.load(c_rows[:, None, None] + offs_k[None, :, :],
                            mask=n_ok[:, None, None] & k_ok[None, :, :], other=0).to(tl.float32)
                part = tl.sum(c * x[None, :, :], axis=2)                          # (BLOCK_N, GROUPS)
                kb = (k0 + g * SUB) // BLOCK
                s = tl.load(s_rows[:, None] + kb[None, :], mask=n_ok[:, None] & (k0 + g * SUB < K)[None, :], other=0.0)
                acc += tl.sum(part * s.to(DT).to(tl.float32), axis=1)
        else:
            kk = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + kk
                k_ok = offs_k < K
                ok = n_ok[:, None] & k_ok[None, :]
                x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                c = tl.load(c_rows[:, None] + offs_k[None, :], mask=ok, other=0).to(tl.float32)
                s = tl.load(s_rows[:, None] + (offs_k // BLOCK)[None, :], mask=ok, other=0.0)
                w = (c * s.to(DT).to(tl.float32)).to(DT).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(DT), mask=n_ok)

    @triton.jit
    def _tiled_kernel(
        a_ptr, c_ptr, s_ptr, b_ptr, y_ptr,
        M, N, K, stride_am, stride_ar, stride_cn, stride_sn, stride_ym, stride_yj,
        BLOCK: tl.constexpr,        # values per scale
        TRANSPOSED: tl.constexpr,   # False: y = a @ W.T (reduce over k); True: y = a @ W (reduce over n)
        SCALE_TILE: tl.constexpr,   # True: a tile spans one scale block along k (one scale per row n)
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_R: tl.constexpr,
        DT: tl.constexpr,           # compute dtype (a, bias, y, and the de-quantized tile)
        UPCAST: tl.constexpr,       # feed tl.dot float32 operands (the interpreter's bf16)
        PRECISION: tl.constexpr,    # tl.dot input_precision for float32 ("ieee" or "tf32"), else None
    ):
        """Forward: y[m, n] = sum_k a[m, k] W[n, k] (+ bias); backward: y[m, k] = sum_n a[m, n] W[n, k].

        Grid (M / BLOCK_M, J / BLOCK_J), the token tiles fastest so that programs
        running together share each weight tile (it is read from memory once).
        """
        pid_m = tl.program_id(0)
        pid_j = tl.program_id(1)
        if TRANSPOSED:
            R = N
            J = K
        else:
            R = K
            J = N
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        m_ok = offs_m < M
        j_ok = offs_j < J
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + rr
            r_ok = offs_r < R
            a = tl.load(a_rows + offs_r[None, :] * stride_ar, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            ok = r_ok[:, None] & j_ok[None, :]                                  # (BLOCK_R, BLOCK_J)
            if TRANSPOSED:
                n2 = offs_r.to(tl.int64)[:, None]
                k2 = offs_j[None, :]
            else:
                n2 = offs_j.to(tl.int64)[None, :]
                k2 = offs_r[:, None]
            c = tl.load(c_ptr + n2 * stride_cn + k2, mask=ok, other=0).to(tl.float32)
            if SCALE_TILE:
                if TRANSPOSED:
                    s = tl.load(s_ptr + offs_r.to(tl.int64) * stride_sn + (pid_j * BLOCK_J) // BLOCK, mask=r_ok, other=0.0)
                    s2 = s.to(DT).to(tl.float32)[:, None]
                else:
                    s = tl.load(s_ptr + offs_j.to(tl.int64) * stride_sn + r0 // BLOCK, mask=j_ok, other=0.0)
                    s2 = s.to(DT).to(tl.float32)[None, :]
            else:
                s = tl.load(s_ptr + n2 * stride_sn + k2 // BLOCK, mask=ok, other=0.0)
                s2 = s.to(DT).to(tl.float32)
            w = (c * s2).to(DT)                       # the de-quantize path's exact values
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_j[None, :] * stride_yj
        tl.store(y, acc.to(DT), mask=m_ok[:, None] & j_ok[None, :])


    @triton.jit
    def _dequant_kernel(
        c_ptr, s_ptr, w_ptr,
        N, K, stride_cn, stride_sn, stride_wn,
        BLOCK: tl.constexpr,        # values per scale
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DT: tl.constexpr,           # the weight's dtype
    ):
        """w[n, k] = code[n, k] * scale[n, k // BLOCK], rounded to DT as the de-quantize path rounds; grid (N / BLOCK_N, K / BLOCK_K)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        c = tl.load(c_ptr + rows * stride_cn + offs_k[None, :], mask=ok, other=0).to(tl.float32)
        s = tl.load(s_ptr + rows * stride_sn + (offs_k // BLOCK)[None, :], mask=ok, other=0.0)
        w = (c * s.to(DT).to(tl.float32)).to(DT)
        tl.store(w_ptr + rows * stride_wn + offs_k[None, :], w, mask=ok)


# --------------------------------------------------------------------------------------------
# Launching


_LAUNCHES: dict[tuple, object] = {}
_LAUNCHES_MAX = 4096
FAST_LAUNCH = True
"""Whether `_launch` reuses compiled kernels directly (False: every launch goes through Triton's JIT)."""
_fast_launch_error: str | None = None


def _launch(fn, grid: tuple, key: tuple | None, args: tuple, constexprs: dict, num_warps: int, num_stages: int) -> None:
    """``fn[grid](*args, **constexprs, num_warps=, num_stages=)``, the second time on through the compiled kernel.

    ``key`` must determine everything Triton specializes the compiled kernel on
    for these arguments: the values of the integer arguments (Triton specializes
    on 1 and on divisibility by 16), each tensor's dtype and whether its address
    is 16-byte aligned, the constexprs and the launch options; the caller builds
    it (cheaply, from the values it already has) and passes None where it cannot.
    The compiled kernel is then called as Triton's JIT calls it, with every
    argument in signature order (`CompiledKernel.__getitem__`). A failure there
    turns this off for the process and relaunches through the JIT.
    """
    if _launch_compiled(key, grid, args):
        return
    compiled = fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    if key is None or not FAST_LAUNCH or interpreted() or not hasattr(compiled, "__getitem__"):
        return
    names = list(getattr(fn, "arg_names", ()))
    if len(names) != len(args) + len(constexprs) or set(names[len(args):]) != set(constexprs):
        return  # not the signature this module's kernels have (constexprs last): keep to the JIT
    if len(_LAUNCHES) >= _LAUNCHES_MAX:
        _LAUNCHES.clear()
    _LAUNCHES[key] = (compiled, tuple(constexprs[n] for n in names[len(args):]))


def _launch_compiled(key: tuple | None, grid: tuple, args: tuple) -> bool:
    """Launch the kernel `_launch` compiled for ``key``, if there is one; False when there is none (or it failed)."""
    global FAST_LAUNCH, _fast_launch_error
    entry = _LAUNCHES.get(key) if (key is not None and FAST_LAUNCH) else None
    if entry is None:
        return False
    compiled, tail = entry
    try:
        compiled[grid](*args, *tail)
        return True
    except Exception as e:  # an API change in a new Triton: fall back to its JIT for good
        FAST_LAUNCH = False
        _fast_launch_error = f"{type(e).__name__}: {e}"
        _LAUNCHES.clear()
        return False


def fast_launch_status() -> str:
    """How launches run now: "compiled" (straight to the compiled kernels after the first), "interpreted"
    (Triton's interpreter: nothing is compiled), or why they go through Triton's JIT."""
    if interpreted():
        return "interpreted"
    if FAST_LAUNCH:
        return "compiled"
    return f"triton-jit ({_fast_launch_error or 'turned off'})"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _align(t: torch.Tensor) -> int:
    return t.data_ptr() & 15


def interpreted() -> bool:
    """Whether triton runs in its interpreter (``TRITON_INTERPRET=1`` was set before triton was imported).

    The interpreter runs kernels on CPU tensors, with numpy; it is how the tests
    check the kernels without a GPU. triton decides it once, when
    ``triton.language`` is imported (its own library functions are wrapped then).
    """
    return triton is not None and type(tl.zeros).__name__ == "InterpretedFunction"


_TL_DTYPE: dict[torch.dtype, object] = {}


def _tl_dtype(dtype: torch.dtype):
    if not _TL_DTYPE:
        _TL_DTYPE.update({torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32})
    return _TL_DTYPE[dtype]


def _check(a: torch.Tensor | torch.dtype, codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> None:
    """Raise unless the kernels take ``a`` (an activation, or for `dequantize` a dtype) with this weight."""
    if triton is None:
        raise RuntimeError(_IMPORT_ERROR)
    dtype, device = (a, codes.device) if isinstance(a, torch.dtype) else (a.dtype, a.device)
    if not _supports(dtype, codes, scales, block_size):
        shape = "" if isinstance(a, torch.dtype) else f" {tuple(a.shape)}"
        raise OperandError(
            f"unsupported operands: x {dtype}{shape}, codes {codes.dtype} {tuple(codes.shape)}, "
            f"scales {scales.dtype} {tuple(scales.shape)}, block {block_size}"
        )
    if not (device == codes.device == scales.device):
        raise OperandError(f"operands on different devices: {device}, {codes.device}, {scales.device}")
    if device.type == "cpu" and not interpreted():
        raise RuntimeError("the Triton kernels run on CPU tensors only in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before triton is first imported")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype: torch.dtype, interpret: bool):
    if dtype != torch.float32 or interpret:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# --------------------------------------------------------------------------------------------
# Public entry points


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
    bias: torch.Tensor | None = None,
    *,
    gemv: GemvConfig | None = None,
    tiles: TileConfig | None = None,
    max_gemv_tokens: int | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` ``(M, in)``; returns ``(M, out)`` in ``x``'s dtype.

    CUDA tensors run the compiled kernels, CPU tensors Triton's interpreter
    (slow: for tests). ``gemv`` / ``tiles`` override the launch configuration
    and ``max_gemv_tokens`` the GEMV/tiled switch (for tests and benchmarks).
    """
    _check(x, codes, scales, block_size)
    x = _row_major(x)
    codes = _row_major(codes)
    scales = _row_major(scales)
    m, k = x.shape
    n = codes.shape[0]
    if k != codes.shape[1]:
        raise OperandError(f"x has {k} features, the weight {codes.shape[1]}")
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    b_arg = bias if bias is not None else y  # never read when HAS_BIAS is False
    limit = GEMV_MAX_TOKENS if max_gemv_tokens is None else max_gemv_tokens
    if m <= limit:  # decoding: the hot path, a few microseconds of Python per call on a hit
        cfg = gemv or gemv_config(n, k)
        grid = (_cdiv(n, cfg.block_n), m)
        # y is fresh and contiguous: 16-byte aligned, row stride n
        args = (x, codes, scales, b_arg, y, n, k, x.stride(0), codes.stride(0), scales.stride(0), n)
        key = ("gemv", x.device.index, x.dtype, scales.dtype, x.data_ptr() & 15, codes.data_ptr() & 15,
               scales.data_ptr() & 15, b_arg.data_ptr() & 15, n, k, args[7], args[8], args[9], block_size,
               bias is not None, cfg)
        if _launch_compiled(key, grid, args):
            return y
        sub = min(_pow2_factor(block_size), cfg.block_k)
        grouped = sub >= 16
        groups = cfg.block_k // sub if grouped else 1
        _launch(_gemv_kernel, grid, key, args,
                dict(BLOCK=block_size, GROUPED=grouped, SUB=sub if grouped else 1, GROUPS=groups, BLOCK_K=cfg.block_k,
                     BLOCK_N=cfg.block_n, HAS_BIAS=bias is not None, DT=_tl_dtype(x.dtype)),
                cfg.num_warps, cfg.num_stages)
        return y
    interpret = interpreted()
    dt = _tl_dtype(x.dtype)
    cfg = tiles or tile_config(m, n, x.dtype)
    block_r, scale_tile = _k_tile(cfg.block_r, block_size)
    grid = (_cdiv(m, cfg.block_m), _cdiv(n, cfg.block_j))
    args = (x, codes, scales, b_arg, y, m, n, k, x.stride(0), x.stride(1), codes.stride(0), scales.stride(0), y.stride(0),
            y.stride(1))
    precision = _precision(x.dtype, interpret)
    key = ("tiled", x.device.index, x.dtype, scales.dtype, _align(x), _align(codes), _align(scales), _align(b_arg),
           _align(y), *args[5:], block_size, bias is not None, cfg, precision)
    _launch(_tiled_kernel, grid, key, args,
            dict(BLOCK=block_size, TRANSPOSED=False, SCALE_TILE=scale_tile, HAS_BIAS=bias is not None,
                 BLOCK_M=cfg.block_m, BLOCK_J=cfg.block_j, BLOCK_R=block_r, DT=dt,
                 UPCAST=interpret and x.dtype == torch.bfloat16, PRECISION=precision),
            cfg.num_warps, cfg.num_stages)
    return y


def linear_grad_input(
    grad_out: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
    *,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """``grad_out @ W`` for ``grad_out`` ``(M, out)``; returns ``(M, in)`` in ``grad_out``'s dtype."""
    _check(grad_out, codes, scales, block_size)
    g = _row_major(grad_out)
    codes = _row_major(codes)
    scales = _row_major(scales)
    m, n = g.shape
    k = codes.shape[1]
    if n != codes.shape[0]:
        raise OperandError(f"grad_out has {n} features, the weight {codes.shape[0]} rows")
    gx = torch.empty(m, k, dtype=g.dtype, device=g.device)
    if m == 0:
        return gx
    interpret = interpreted()
    cfg = tiles or tile_config(m, k, g.dtype)
    block_j, scale_tile = _k_tile(cfg.block_j, block_size)
    grid = (_cdiv(m, cfg.block_m), _cdiv(k, block_j))
    args = (g, codes, scales, gx, gx, m, n, k, g.stride(0), g.stride(1), codes.stride(0), scales.stride(0), gx.stride(0),
            gx.stride(1))
    precision = _precision(g.dtype, interpret)
    key = ("tiled-t", g.device.index, g.dtype, scales.dtype, _align(g), _align(codes), _align(scales), _align(gx),
           *args[5:], block_size, cfg, precision)
    _launch(_tiled_kernel, grid, key, args,
            dict(BLOCK=block_size, TRANSPOSED=True, SCALE_TILE=scale_tile, HAS_BIAS=False,
                 BLOCK_M=cfg.block_m, BLOCK_J=block_j, BLOCK_R=cfg.block_r, DT=_tl_dtype(g.dtype),
                 UPCAST=interpret and g.dtype == torch.bfloat16, PRECISION=precision),
            cfg.num_warps, cfg.num_stages)
    return gx


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight ``(out, in)`` in ``dtype``: ``code * scale`` rounded exactly as `int8.runtime.layer`'s de-quantize path.

    ``out``, when given, is a contiguous tensor of ``dtype`` with at least ``out * in`` elements
    (a reusable workspace); the result is a view of its start.
    """
    _check(dtype, codes, scales, block_size)
    codes = _row_major(codes)
    scales = _row_major(scales)
    n, k = codes.shape
    if out is None:
        w = torch.empty(n, k, dtype=dtype, device=codes.device)
    else:
        if out.dtype != dtype or out.device != codes.device or not out.is_contiguous() or out.numel() < n * k:
            raise OperandError(f"out must be a contiguous {dtype} tensor of >= {n * k} elements on {codes.device}")
        w = out.view(-1)[: n * k].view(n, k)
    block_n, block_k = DEQUANT_TILE
    grid = (_cdiv(n, block_n), _cdiv(k, block_k))
    args = (codes, scales, w, n, k, codes.stride(0), scales.stride(0), w.stride(0))
    key = ("dequant", codes.device.index, dtype, scales.dtype, _align(codes), _align(scales), _align(w), *args[3:], block_size)
    _launch(_dequant_kernel, grid, key, args, dict(BLOCK=block_size, BLOCK_N=block_n, BLOCK_K=block_k, DT=_tl_dtype(dtype)),
            4, 1)
    return w


def _k_tile(tile: int, block_size: int) -> tuple[int, bool]:
    """The tile along ``k`` and whether it lies in one scale block (then one scale per row and tile)."""
    sub = _pow2_factor(block_size)
    if sub >= 16:
        return min(tile, sub), True
    return tile, False
