"""The int8 linear layer: int8 codes and per-block scales in memory, de-quantized just in time.

`Int8Linear` stands in for an ``nn.Linear`` (or a GPT-2 style ``Conv1D``) whose
weight was quantized by `int8.quantize`: ``W[o, i] = code[o, i] * scale[o, i // block]``.
It keeps

* ``codes``: int8 ``(out, in)``, the codes themselves (the checkpoint's
  ``weight_packed`` bytes with the +128 offset removed, in place, so loading
  needs no second copy);
* the scales ``(out, in / block)`` in the checkpoint's dtype, stored as their
  raw bits in an integer buffer so that ``model.half()`` / ``model.to(dtype)``
  can never round them (they stay byte-for-byte what the checkpoint holds);
* an ordinary ``bias`` parameter when the layer has one.

``state_dict()`` speaks the checkpoint's language (``weight_packed`` int32,
``weight_scale``, ``weight_shape``), so ``load_state_dict`` and
``save_pretrained`` round-trip the compressed-tensors ``pack-quantized`` layout.

The forward pass never materialises the whole float weight. On CPU it walks
the output rows in chunks of about `CHUNK_ELEMENTS` values: each chunk is
converted to the compute dtype and scaled in a reusable workspace that stays in
the CPU cache, then multiplied (``W_chunk @ x.T``) straight into its rows of
the output. On CUDA the weight is de-quantized once per call in the compute
dtype (the GPU is compute-, not cache-bound) and freed right after the
multiplication. The backward pass keeps no de-quantized weight either: it
de-quantizes again (``grad_x = grad_out @ W``, chunk by chunk), as the 8-bit
GPT-J seeds did. The codes and scales never receive gradients.

On CUDA, when triton is installed (it ships with CUDA builds of torch), the
forward and backward multiplications run fused kernels instead
(`int8.runtime.triton_matmul`): codes and scales go straight into the matmul
and no float weight is ever written. ``Int8Linear.kernel`` chooses: `Kernel.AUTO`
(the default: the fused kernel where it runs, else de-quantizing; above
`FUSED_MAX_TOKENS` tokens, Triton's one-pass de-quantization into a reusable
workspace, then cuBLAS, which is faster there),
`Kernel.TRITON` (the fused kernel at every size, errors are raised) or `Kernel.DEQUANTIZE`;
``Int8Linear.kernel_path`` says which one the layer's device gets. Should the
kernel fail at run time under `Kernel.AUTO` (a GPU triton cannot compile for),
a warning is logged and the process keeps to the de-quantize path.
"""

from __future__ import annotations

import logging
import math
import threading
from enum import Enum

import torch
from torch import nn

from ..formats.compressed_tensors import PACK_FACTOR, pack_codes, unpack_codes

CHUNK_ELEMENTS = 1 << 21
"""Weight values de-quantized at a time on CPU (8 MiB in fp32: fits the L2/L3 caches
of current x86 CPUs, large enough that each matmul call runs at full speed).
Measured on GPT-J shapes by ``bench/runtime``."""

MIN_CHUNK_ROWS = 256
"""At least this many output rows per chunk: fewer makes the per-chunk matmul too thin."""

FUSED_MAX_TOKENS = 128
"""Under `Kernel.AUTO` on CUDA, up to this many tokens (rows of ``x``) per call run the fused kernel;
more de-quantize the weight with Triton (one pass at memory bandwidth) and multiply with cuBLAS,
whose matmul beats the fused tiled kernel there (bench/gpu on an H200: README)."""

_INT_FOR = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

log = logging.getLogger("int8.runtime")


class Kernel(str, Enum):
    """How an `Int8Linear` multiplies on a GPU."""

    AUTO = "auto"              # the fused Triton kernel where it runs (CUDA + triton), else DEQUANTIZE
    TRITON = "triton"          # the fused Triton kernel; failures are raised
    DEQUANTIZE = "dequantize"  # de-quantize the weight, then torch's matmul (on CPU: chunk by chunk)


TRITON_DEVICE_TYPES = frozenset({"cuda"})
"""Devices whose tensors go to the Triton kernels (the tests add "cpu" under Triton's interpreter)."""

_triton_module = None


def _triton():
    """`int8.runtime.triton_matmul`, imported on first use (it imports triton, when installed)."""
    global _triton_module
    if _triton_module is None:
        from . import triton_matmul

        _triton_module = triton_matmul
    return _triton_module


def triton_ready(device_type: str, kernel: str = Kernel.AUTO) -> bool:
    """Whether ``kernel`` sends the multiplications of tensors on ``device_type`` to the Triton kernels."""
    if kernel == Kernel.DEQUANTIZE or device_type not in TRITON_DEVICE_TYPES:
        return False
    return _triton().available(device_type)


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why the Triton kernels do not run for tensors on ``device_type``, or None when they do."""
    if device_type not in TRITON_DEVICE_TYPES:
        return f"the fused kernel runs on CUDA GPUs only, not {device_type}"
    return _triton().unavailable_reason(device_type)


def _fused(op, kernel: str, *args, **kwargs) -> torch.Tensor | None:
    """Run a Triton op; under `Kernel.AUTO` a failure disables the kernels (logged) and gives None."""
    try:
        return op(*args, **kwargs)
    except (torch.cuda.OutOfMemoryError, _triton().OperandError):
        raise  # not the kernel's fault (de-quantizing would need more memory still; the operands are wrong)
    except Exception as e:
        if kernel == Kernel.TRITON:
            raise
        _triton().disable(f"it failed: {type(e).__name__}: {e}")
        log.warning("int8: the fused Triton kernel failed (%s: %s); de-quantizing from now on", type(e).__name__, e)
        return None

_workspaces = threading.local()


def _triton_takes(device: torch.device, kernel: str, dtype: torch.dtype, codes: torch.Tensor) -> bool:
    """Whether this multiplication goes to Triton: a Triton device, a compute dtype the kernels take (others,
    float64 say, de-quantize) and a non-empty weight. The kernels check the rest of the operands themselves:
    malformed ones raise OperandError rather than de-quantize."""
    return triton_ready(device.type, kernel) and dtype in _triton().DTYPES and codes.numel() > 0


def _triton_dequantized(codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype,
                        kernel: str) -> torch.Tensor | None:
    """The whole weight in ``dtype``, de-quantized by Triton into this thread's workspace (None if the kernel failed)."""
    return _fused(_triton().dequantize, kernel, codes, scales, block_size, dtype,
                  out=_workspace(codes.numel(), dtype, codes.device))


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat scratch tensor (per thread, dtype and device).

    Allocating a fresh multi-MiB buffer per call costs page faults that are
    slower than the de-quantization itself.
    """
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    key = (dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        # A normal tensor even when first needed under inference_mode: an inference tensor
        # could not be written to by a later call outside it (a training step after generate).
        with torch.inference_mode(False):
            buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def chunk_rows(out_features: int, in_features: int) -> int:
    """Output rows de-quantized per chunk on CPU."""
    return max(1, min(out_features, max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, in_features))))


def _dequantize_rows(
    codes: torch.Tensor, scales: torch.Tensor, block_size: int, r0: int, r1: int, out: torch.Tensor
) -> torch.Tensor:
    """``out[:r1-r0] = codes[r0:r1] * scales[r0:r1]`` (block-wise), in ``out``'s dtype."""
    n, cols = r1 - r0, codes.shape[1]
    w = out[: n * cols].view(n, cols)
    w.copy_(codes[r0:r1])
    nb = scales.shape[1]
    s = scales[r0:r1].to(w.dtype)
    if nb * block_size == cols:
        w.view(n, nb, block_size).mul_(s.unsqueeze(-1))
    else:  # ragged last block
        full = cols // block_size
        if full:
            w[:, : full * block_size].view(n, full, block_size).mul_(s[:, :full].unsqueeze(-1))
        w[:, full * block_size :].mul_(s[:, full:])
    return w


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole de-quantized weight ``(out, in)`` in ``dtype`` (a fresh tensor)."""
    out = torch.empty(codes.numel(), dtype=dtype, device=codes.device)
    return _dequantize_rows(codes, scales, block_size, 0, codes.shape[0], out)


def int8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
    bias: torch.Tensor | None = None,
    kernel: str = Kernel.AUTO,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the block-quantized ``W``, without materialising ``W``; no autograd.

    ``x`` is ``(..., in)`` in the compute dtype; the result has ``x``'s dtype.
    ``kernel`` (a `Kernel`) picks the fused Triton kernel or de-quantizing.
    """
    out_features, in_features = codes.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    tokens = x2.shape[0]
    dtype = x.dtype
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if tokens == 0:
        y = x2.new_zeros(0, out_features)
        return y.reshape(*lead, out_features)
    if _triton_takes(x.device, kernel, dtype, codes):
        if tokens > FUSED_MAX_TOKENS and kernel == Kernel.AUTO:
            w = _triton_dequantized(codes, scales, block_size, dtype, kernel)
            if w is not None:
                return torch.nn.functional.linear(x2, w, bias).reshape(*lead, out_features)
        else:
            y = _fused(_triton().linear, kernel, x2, codes, scales, block_size, bias)
            if y is not None:
                return y if x.dim() == 2 else y.view(*lead, out_features)
    if x.device.type != "cpu":
        w = dequantize_weight(codes, scales, block_size, dtype)
        y = torch.nn.functional.linear(x2, w, bias)
        del w
        return y.reshape(*lead, out_features)
    rows = chunk_rows(out_features, in_features)
    work = _workspace(min(rows, out_features) * in_features, dtype, x.device)
    # y.T = W @ x.T, one chunk of W's rows (= rows of y.T) at a time.
    y_t = torch.empty(out_features, tokens, dtype=dtype, device=x.device)
    x_t = x2.t()
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        w = _dequantize_rows(codes, scales, block_size, r0, r1, work)
        if bias is not None:
            torch.addmm(bias[r0:r1].unsqueeze(1), w, x_t, out=y_t[r0:r1])
        else:
            torch.mm(w, x_t, out=y_t[r0:r1])
    y = y_t.t()
    if tokens > 1:
        y = y.contiguous()
    return y.reshape(*lead, out_features)


def int8_linear_grad_input(
    grad_out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int, kernel: str = Kernel.AUTO
) -> torch.Tensor:
    """``grad_out @ W`` (the input gradient): the fused kernel, or de-quantizing ``W`` again chunk by chunk."""
    out_features, in_features = codes.shape
    lead = grad_out.shape[:-1]
    g = grad_out.reshape(-1, out_features)
    dtype = grad_out.dtype
    if g.shape[0] and _triton_takes(g.device, kernel, dtype, codes):
        if g.shape[0] > FUSED_MAX_TOKENS and kernel == Kernel.AUTO:
            w = _triton_dequantized(codes, scales, block_size, dtype, kernel)
            if w is not None:
                return (g @ w).reshape(*lead, in_features)
        else:
            gx = _fused(_triton().linear_grad_input, kernel, g, codes, scales, block_size)
            if gx is not None:
                return gx.reshape(*lead, in_features)
    if g.device.type != "cpu":
        w = dequantize_weight(codes, scales, block_size, dtype)
        gx = g @ w
        del w
        return gx.reshape(*lead, in_features)
    rows = chunk_rows(out_features, in_features)
    work = _workspace(min(rows, out_features) * in_features, dtype, g.device)
    gx = torch.zeros(g.shape[0], in_features, dtype=dtype, device=g.device)
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        w = _dequantize_rows(codes, scales, block_size, r0, r1, work)
        gx.addmm_(g[:, r0:r1], w)
    return gx.reshape(*lead, in_features)


class Int8LinearFunction(torch.autograd.Function):
    """Autograd for `int8_linear`: saves only the int8 codes and scales (no float weight)."""

    @staticmethod
    def forward(ctx, x, codes, scales, bias, block_size, kernel=Kernel.AUTO):
        ctx.save_for_backward(codes, scales)
        ctx.block_size = block_size
        ctx.kernel = kernel
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return int8_linear(x, codes, scales, block_size, bias, kernel)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scales = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = int8_linear_grad_input(grad_out, codes, scales, ctx.block_size, ctx.kernel)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None, None


class Int8Linear(nn.Module):
    """A frozen int8 block-quantized linear layer: ``y = x @ W.T + b``.

    Build it empty (``Int8Linear(in, out, ...)``, then load a state dict with
    ``weight_packed`` / ``weight_scale`` / ``weight_shape``) or from a float
    layer with `Int8Linear.from_linear`. ``kernel`` (a `Kernel`, default auto) picks
    how it multiplies on a GPU; `int8.load` sets it from its ``kernel`` argument.
    """

    kernel: str = Kernel.AUTO

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = 128,
        scale_dtype: torch.dtype = torch.bfloat16,
        device=None,
        dtype=None,
        checkpoint_layout: bool = False,
    ):
        super().__init__()
        if scale_dtype not in _INT_FOR:
            raise ValueError(f"scale dtype must be float32, float16 or bfloat16, got {scale_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.scale_dtype = scale_dtype
        nblocks = math.ceil(in_features / block_size)
        self.checkpoint_layout = checkpoint_layout
        if checkpoint_layout:
            # Buffers named and typed as in the checkpoint, for transformers' loader to fill;
            # `finalize()` then turns them into `codes` / `scale_bits` in place.
            cols = math.ceil(in_features / PACK_FACTOR)
            self.register_buffer("weight_packed", torch.empty(out_features, cols, dtype=torch.int32, device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, nblocks, dtype=scale_dtype, device=device))
            self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64, device=device))
            # While transformers loads the model, its `_init_weights` of a parent module may call
            # `init.normal_(child.weight)` (T5 does). A flagged meta stand-in makes that a no-op;
            # `finalize()` removes it, so a loaded layer has no `weight`.
            stand_in = torch.empty(out_features, in_features, device="meta", dtype=dtype or torch.get_default_dtype())
            stand_in._is_hf_initialized = True
            self.__dict__["weight"] = stand_in
        else:
            self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer(
                "scale_bits", torch.empty(out_features, nblocks, dtype=_INT_FOR[scale_dtype], device=device)
            )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Quantize a float ``nn.Linear`` (or transformers ``Conv1D``) with `int8.quantize.quantize`."""
        from ..quantize import quantize

        weight = linear.weight.detach()
        if type(linear).__name__ == "Conv1D":  # (in, out) layout
            weight = weight.t()
        out_features, in_features = weight.shape
        q = quantize(weight.float(), block_size, scale_dtype)
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, bias is not None, block_size=block_size, scale_dtype=scale_dtype,
                    device=weight.device, dtype=bias.dtype if bias is not None else None)
        layer.codes.copy_(q.codes)
        layer.scale_bits.copy_(q.scales.view(layer.scale_bits.dtype))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    # -- views ----------------------------------------------------------------------------------

    @property
    def scales(self) -> torch.Tensor:
        """The per-block scales ``(out, in / block)`` in the checkpoint's dtype (a view, no copy)."""
        return self.scale_bits.view(self.scale_dtype)

    @property
    def qweight(self) -> torch.Tensor:
        """The int8 codes, under the name PEFT looks for on quantized layers (to find their device)."""
        return self.codes if not self.checkpoint_layout else self.weight_packed

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype this layer computes in by default: its bias's, else the model's default."""
        if self.bias is not None:
            return self.bias.dtype
        return getattr(self, "_compute_dtype", torch.get_default_dtype())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The de-quantized weight ``(out, in)`` (a new tensor; for inspection and merging)."""
        return dequantize_weight(self.codes, self.scales, self.block_size, dtype or self.compute_dtype)

    @property
    def kernel_path(self) -> str:
        """What the forward and backward run on the layer's device now: "triton" or "dequantize"."""
        device = (self.weight_packed if self.checkpoint_layout else self.codes).device
        return "triton" if triton_ready(device.type, self.kernel) else "dequantize"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, scale_dtype={str(self.scale_dtype).removeprefix('torch.')}"
        )

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_layout:
            self.finalize()
        dtype = x.dtype
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        elif not dtype.is_floating_point:
            dtype = self.compute_dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        # the module's dicts directly: nn.Module's attribute lookup costs a microsecond a name, per call, per layer
        buffers = self._buffers
        codes, scales = buffers["codes"], buffers["scale_bits"].view(self.scale_dtype)
        bias = self._parameters["bias"]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if not needs_grad:
            return int8_linear(x, codes, scales, self.block_size, bias, self.kernel)
        return Int8LinearFunction.apply(x, codes, scales, bias, self.block_size, self.kernel)

    # -- checkpoint layout ----------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.checkpoint_layout:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "weight_packed"] = pack_codes(self.codes)
        destination[prefix + "weight_scale"] = self.scales.clone()
        destination[prefix + "weight_shape"] = torch.tensor([self.out_features, self.in_features], dtype=torch.int64)

    def finalize(self) -> None:
        """Leave the checkpoint layout: the loaded ``weight_packed`` becomes ``codes`` in place."""
        if not self.checkpoint_layout:
            return
        packed, scale, shape = self.weight_packed, self.weight_scale, self.weight_shape
        del self.weight_packed, self.weight_scale, self.weight_shape
        self.__dict__.pop("weight", None)
        self.checkpoint_layout = False
        self.register_buffer("codes", torch.empty(0, dtype=torch.int8, device=packed.device))
        self.register_buffer("scale_bits", torch.empty(0, dtype=_INT_FOR[self.scale_dtype], device=packed.device))
        self.adopt_packed(packed, scale, shape)

    def adopt_packed(self, packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor | None = None) -> None:
        """Take over checkpoint tensors: ``packed`` becomes ``codes`` in place (no copy when possible)."""
        if shape is not None and [int(v) for v in shape.tolist()] != [self.out_features, self.in_features]:
            raise ValueError(f"weight_shape {shape.tolist()} does not match ({self.out_features}, {self.in_features})")
        cols = math.ceil(self.in_features / PACK_FACTOR)
        if packed.dtype != torch.int32 or tuple(packed.shape) != (self.out_features, cols):
            raise ValueError(f"weight_packed must be int32 {(self.out_features, cols)}, got {packed.dtype} {tuple(packed.shape)}")
        nblocks = math.ceil(self.in_features / self.block_size)
        if tuple(scale.shape) != (self.out_features, nblocks) or scale.dtype not in _INT_FOR:
            raise ValueError(f"weight_scale must be float ({self.out_features}, {nblocks}), got {scale.dtype} {tuple(scale.shape)}")
        if packed.is_contiguous() and self.in_features % PACK_FACTOR == 0 and not packed.is_inference():
            raw = packed.view(torch.uint8)
            raw.bitwise_xor_(0x80)
            codes = raw.view(torch.int8).view(self.out_features, self.in_features)
        else:
            codes = unpack_codes(packed, self.in_features).contiguous()
        if scale.dtype != self.scale_dtype:
            self.scale_dtype = scale.dtype
        self.codes = codes
        self.scale_bits = scale.contiguous().view(_INT_FOR[scale.dtype])


def _load_pre_hook(module: Int8Linear, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Accept the checkpoint layout (``weight_packed`` / ``weight_scale`` / ``weight_shape``) in load_state_dict."""
    if module.checkpoint_layout:
        return
    packed = state_dict.pop(prefix + "weight_packed", None)
    scale = state_dict.pop(prefix + "weight_scale", None)
    shape = state_dict.pop(prefix + "weight_shape", None)
    if packed is None and scale is None:
        return
    if packed is None or scale is None:
        error_msgs.append(f"{prefix}: weight_packed and weight_scale must be loaded together")
        return
    codes = unpack_codes(packed, module.in_features)
    if shape is not None and [int(v) for v in shape.tolist()] != [module.out_features, module.in_features]:
        error_msgs.append(f"{prefix}weight_shape {shape.tolist()} does not match the layer")
        return
    state_dict[prefix + "codes"] = codes
    state_dict[prefix + "scale_bits"] = scale.to(module.scale_dtype).view(module.scale_bits.dtype)
