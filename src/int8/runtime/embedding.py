"""Quantized token embeddings (`int8 convert --embeddings int8`) at run time: codes looked up, scaled per row.

`Int8Embedding` stands in for the ``nn.Embedding`` of the vocabulary. The checkpoint stores its weight
``(num_embeddings, embedding_dim)`` exactly as a linear's (``weight_packed`` / ``weight_scale`` /
``weight_shape``, one scale per block of the embedding dimension), so a lookup is
``code[id] * scale[id, j // block]``: only the looked-up rows are ever de-quantized.

Modules that transformers ties to the embedding's weight share its codes instead of a copy:
`TiedInt8Head` (a tied output head, BLOOM's or SmolLM2's ``lm_head``: ``x @ W.T`` with the same
int8 matmul as `Int8Linear`) and `TiedInt8Embedding` (T5's ``encoder.embed_tokens``). Neither has
tensors of its own, so the state dict holds the embedding once, as the checkpoint does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats.compressed_tensors import PACK_FACTOR, pack_codes, unpack_codes
from .layer import _INT_FOR, Int8LinearFunction, Kernel, dequantize_weight, int8_linear


def _stand_in(rows: int, cols: int, dtype) -> torch.Tensor:
    """A flagged meta ``weight`` for while transformers loads: its ``_init_weights`` (``init.normal_(m.weight)``)
    skips it, as for `Int8Linear`; `finalize` removes it."""
    t = torch.empty(rows, cols, device="meta", dtype=dtype or torch.get_default_dtype())
    t._is_hf_initialized = True
    return t


class Int8Embedding(nn.Module):
    """A frozen int8 token embedding: ``E[i] = code[i] * scale[i, block]``, built in the checkpoint layout and
    turned into ``codes`` / ``scale_bits`` by `finalize` (as `Int8Linear` is)."""

    kernel: str = Kernel.AUTO

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, block_size: int,
                 scale_dtype: torch.dtype, device=None, dtype=None):
        super().__init__()
        if scale_dtype not in _INT_FOR:
            raise ValueError(f"scale dtype must be float32, float16 or bfloat16, got {scale_dtype}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.block_size, self.scale_dtype = block_size, scale_dtype
        self._compute_dtype = dtype or torch.get_default_dtype()
        self.checkpoint_layout = True
        nblocks = math.ceil(embedding_dim / block_size)
        self.register_buffer("weight_packed", torch.empty(num_embeddings, math.ceil(embedding_dim / PACK_FACTOR),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, nblocks, dtype=scale_dtype, device=device))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64, device=device))
        self.__dict__["weight"] = _stand_in(num_embeddings, embedding_dim, dtype)

    # Int8Linear's names, so that the int8 matmul of a tied head reads the same tensors
    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def scales(self) -> torch.Tensor:
        return self.scale_bits.view(self.scale_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole de-quantized table ``(num_embeddings, embedding_dim)`` (a new tensor; for inspection)."""
        self.finalize()
        return dequantize_weight(self.codes, self.scales, self.block_size, dtype or self._compute_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, block_size={self.block_size}, "
                f"scale_dtype={str(self.scale_dtype).removeprefix('torch.')}")

    def finalize(self) -> None:
        """Leave the checkpoint layout: ``weight_packed`` becomes the int8 ``codes``, the scales their raw bits."""
        if not self.checkpoint_layout:
            return
        packed, scale, shape = self.weight_packed, self.weight_scale, self.weight_shape
        if [int(v) for v in shape.tolist()] != [self.num_embeddings, self.embedding_dim]:
            raise ValueError(f"weight_shape {shape.tolist()} does not match ({self.num_embeddings}, {self.embedding_dim})")
        del self.weight_packed, self.weight_scale, self.weight_shape
        self.__dict__.pop("weight", None)
        self.checkpoint_layout = False
        self.register_buffer("codes", unpack_codes(packed, self.embedding_dim).contiguous())
        self.scale_dtype = scale.dtype
        self.register_buffer("scale_bits", scale.contiguous().view(_INT_FOR[scale.dtype]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.finalize()
        dtype = self._compute_dtype
        rows = nn.functional.embedding(ids, self.codes).to(dtype)
        scales = nn.functional.embedding(ids, self.scales).to(dtype)
        nb, block = scales.shape[-1], self.block_size
        if nb * block == self.embedding_dim:
            return (rows.unflatten(-1, (nb, block)) * scales.unsqueeze(-1)).flatten(-2)
        return rows * scales.repeat_interleave(block, dim=-1)[..., : self.embedding_dim]

    def _apply(self, fn, recurse=True):
        # model.to(dtype) sets the compute dtype (the codes and scale bits are integers and stay as stored)
        probe = fn(torch.empty(0, dtype=self._compute_dtype))
        if probe.dtype.is_floating_point:
            self._compute_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.checkpoint_layout:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_packed"] = pack_codes(self.codes)
        destination[prefix + "weight_scale"] = self.scales.clone()
        destination[prefix + "weight_shape"] = torch.tensor([self.num_embeddings, self.embedding_dim], dtype=torch.int64)


class _Tied(nn.Module):
    """A module that uses an `Int8Embedding`'s tensors, held by reference (not a submodule: no second copy in
    the state dict, and ``model.to()`` moves the embedding once, where it is registered)."""

    def __init__(self, source: Int8Embedding, dtype=None):
        super().__init__()
        self.__dict__["source"] = source
        self.__dict__["weight"] = _stand_in(source.num_embeddings, source.embedding_dim, dtype)

    def finalize(self) -> None:
        self.__dict__.pop("weight", None)
        self.source.finalize()

    def extra_repr(self) -> str:
        return f"tied to the int8 embedding ({self.source.num_embeddings}, {self.source.embedding_dim})"


class TiedInt8Head(_Tied):
    """A tied output head: ``logits = x @ E.T`` (+ bias), the int8 matmul of `Int8Linear` on the embedding's codes."""

    def __init__(self, source: Int8Embedding, bias: torch.Tensor | None = None, dtype=None):
        super().__init__(source, dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def out_features(self) -> int:
        return self.source.num_embeddings

    @property
    def in_features(self) -> int:
        return self.source.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.source
        e.finalize()
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if torch.is_grad_enabled() and x.requires_grad:
            return Int8LinearFunction.apply(x, e.codes, e.scales, self.bias, e.block_size, e.kernel)
        return int8_linear(x, e.codes, e.scales, e.block_size, self.bias, e.kernel)


class TiedInt8Embedding(_Tied):
    """A tied copy of the token embedding (T5's ``encoder.embed_tokens`` and ``decoder.embed_tokens``)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source(ids)
