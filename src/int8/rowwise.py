"""Row-wise absmax int8 quantization (bitsandbytes' LLM.int8 weights): the math, as pure functions on tensors.

It is what bitsandbytes 0.50's ``Int8Params`` does when transformers loads a model with
``BitsAndBytesConfig(load_in_8bit=True)`` (``int8_vectorwise_quant``, its default backend), exactly:

* The weight ``W`` ``(out, in)`` is first cast to float16 (round to nearest even). A value beyond
  float16's range would become infinite: such a weight is refused (`NonFiniteWeights`).
* ``SCB = max(|w16|)`` over each row, widened to float32 (so every SCB is a float16 value).
* ``q = round_half_even(w16 * (127 / SCB))`` in float32, ``127 / SCB`` being torch's ``127.0 / tensor``:
  the float32 reciprocal of SCB times 127 (two roundings, not one division), and each value is
  *multiplied* by it (not divided by the scale). ``|q| <= 127``. One ulp off anywhere changes codes
  that lie at a half.
* A row whose SCB is 0 (all zeros, or values that underflow float16) gets ``q = 0`` (bitsandbytes
  computes ``0 * inf``, a NaN, which the CPU casts to 0).
* No outliers are held back when quantizing (``int8_vectorwise_quant`` runs with threshold 0 there):
  ``llm_int8_threshold`` only splits the *activations* at run time.
* Decoding is ``w' = q * SCB / 127``; ``|w16 - w'| <= SCB / 127 / 2`` (plus float32 rounding), and
  ``|w - w16|`` adds at most half a float16 ulp of ``w``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheme import QMAX, ErrorStats, NonFiniteWeights

DEQUANT_FACTOR = 7.874015718698502e-3
"""bitsandbytes' float literal for 1/127 in ``int8_vectorwise_dequant``."""


@dataclass(frozen=True)
class RowQuantized:
    """int8 ``codes`` ``(out, in)`` and float32 ``scb`` ``(out,)`` (each row's absmax)."""

    codes: torch.Tensor
    scb: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.codes, self.scb, dtype)


def row_scale(scb: torch.Tensor) -> torch.Tensor:
    """The step between two codes of each row: ``SCB / 127`` (float32)."""
    return scb.float() / QMAX


def quantize_rows(w: torch.Tensor) -> RowQuantized:
    """Quantize a 2-D weight ``(out, in)`` row-wise, as bitsandbytes does (see the module). Raises `NonFiniteWeights`."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scb = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    quantize_rows_into(w, codes, scb)
    return RowQuantized(codes, scb)


def quantize_rows_into(w: torch.Tensor, codes_out: torch.Tensor, scb_out: torch.Tensor) -> ErrorStats:
    """Quantize the rows of ``w`` into ``codes_out`` (int8, same shape) and ``scb_out`` (float32, one per row).

    The error statistics are in units of each row's own scale ``SCB / 127``, measured against ``w``
    itself (so they include the float16 cast); ``zero_blocks`` counts rows whose SCB is 0."""
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteWeights("NaN or Inf values")
    w16 = w.to(torch.float16)
    if not bool(torch.isfinite(w16).all()):
        amax = float(w.abs().max())
        raise NonFiniteWeights(f"values beyond float16's range (|w| up to {amax:.3g}; bitsandbytes casts weights to float16)")
    scb = w16.abs().amax(dim=1).float()
    zero = scb == 0
    recip = 127.0 / scb.masked_fill(zero, 1.0).unsqueeze(1)  # torch: reciprocal, then times 127 (as bitsandbytes)
    q = torch.round(w16.float() * recip)
    q.masked_fill_(zero.unsqueeze(1), 0.0)
    codes_out.copy_(q)
    scb_out.copy_(scb)
    step = row_scale(scb).masked_fill(zero, 1.0).unsqueeze(1)
    err = (w.float() - q * row_scale(scb).unsqueeze(1)).abs_().div_(step)
    return ErrorStats(
        max_abs=float(err.max()) if err.numel() else 0.0,
        sum_abs=float(err.double().sum()),
        count=err.numel(),
        zero_blocks=int(zero.sum()),
    )


def dequantize_rows(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * SCB * (1/127)`` in float32, in that order (bitsandbytes' ``int8_vectorwise_dequant``), then cast to ``dtype``."""
    if codes.ndim != 2 or tuple(scb.shape) != (codes.shape[0],):
        raise ValueError(f"SCB {tuple(scb.shape)} does not fit codes {tuple(codes.shape)}")
    return (codes.float() * scb.float().view(-1, 1) * DEQUANT_FACTOR).to(dtype)
