"""The block-absmax int8 scheme's constants and results, free of any array library.

`int8.quantize` (torch, CPU and CUDA) and `int8.kernels` (numpy + numba, the CPU converter)
implement the scheme README defines; both report their error statistics as `ErrorStats` and refuse
what they cannot encode with `NonFiniteWeights`. Nothing here imports torch or numpy, so the
converter's CPU path, the report and the card can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

QMAX = 127
"""Codes lie in [-QMAX, QMAX]: symmetric, so -128 is never produced."""


@dataclass(frozen=True)
class ScaleFormat:
    """How a scale dtype rounds: explicit mantissa bits, exponent of its smallest normal, largest finite."""

    mantissa_bits: int
    min_exponent: int
    max_finite: float


SCALE_FORMATS: dict[str, ScaleFormat] = {
    "F32": ScaleFormat(23, -126, 3.4028234663852886e38),
    "BF16": ScaleFormat(7, -126, 3.3895313892515355e38),
    "F16": ScaleFormat(10, -14, 65504.0),
}
"""The scale dtypes (safetensors names) and their rounding: what `int8.kernels` rounds scales to."""


class NonFiniteWeights(ValueError):
    """A block's absmax (or its scale in the scale dtype) is NaN or infinite."""


@dataclass
class ErrorStats:
    """Quantization error of one tensor, in units of each value's own block scale.

    ``max_abs`` is at most 0.5 by construction; ``mean_abs`` is about 0.25 for
    smooth weights.
    """

    max_abs: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    zero_blocks: int = 0

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.count if self.count else 0.0

    def merge(self, other: ErrorStats) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sum_abs += other.sum_abs
        self.count += other.count
        self.zero_blocks += other.zero_blocks


def num_blocks(in_features: int, block_size: int) -> int:
    return math.ceil(in_features / block_size)
