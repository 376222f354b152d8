"""Which block size each layer gets: the preferred one (``--block-size``) where it divides the layer's
input width, else the largest smaller fallback that does (pure functions; no torch, so the card and
verify's small-file readers can use them)."""

from __future__ import annotations

DEFAULT_BLOCK_SIZE = 32
"""`int8 convert`'s preferred block size when neither ``--block-size`` nor the preset gives one. On trained
models 32 is what meets the fidelity goal (bench/fidelity, README: on SmolLM2-135M, mean KL 0.00110 nats/token and
top-1 97.75% against 0.00151 and 96.28% at 128) for about 9% more bytes of quantized weights (fp32 scales)."""

FALLBACK_BLOCKS = (128, 64, 32)
"""The smaller block sizes a layer falls back to when the preferred one does not divide its rows
(the group sizes vLLM's int8 kernels take)."""


def block_candidates(preferred: int) -> tuple[int, ...]:
    """The block sizes a layer may get, largest first: ``preferred``, then each fallback below it."""
    return (preferred, *(b for b in FALLBACK_BLOCKS if b < preferred))


def choose_block(in_features: int, preferred: int) -> int | None:
    """The largest of `block_candidates` that divides ``in_features`` (None: none does)."""
    return next((b for b in block_candidates(preferred) if in_features % b == 0), None)
