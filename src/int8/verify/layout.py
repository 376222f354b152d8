"""What the structure checks learn about a converted checkpoint: its stored tensors and quantized layers.

The model-level checks (loading, fidelity) work from this description rather
than re-reading headers or rebuilding the model's structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats.safetensors import itemsize
from ..hf import NameMap, WeightLayout
from ..report import ConversionReport


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a shard of the converted checkpoint."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of its data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (math.prod(self.shape[1:]) if self.shape else 1) * itemsize(self.dtype)

    @property
    def end(self) -> int:
        return self.start + self.nbytes


@dataclass(frozen=True)
class QuantLayer:
    """A quantized linear layer: its three stored tensors and the weight's logical shape."""

    module: str
    out_features: int
    in_features: int
    layout: WeightLayout  # how the model stores the weight (Conv1D: (in, out)); stored packed as (out, in)
    packed: StoredTensor
    scale: StoredTensor
    shape: StoredTensor | None


@dataclass
class Layout:
    """What the structure pass learned about the checkpoint, for the model-level checks."""

    folder: Path
    config: dict[str, Any] | None = None
    model_class: str | None = None
    model_type: str | None = None
    seq2seq: bool = False
    block_size: int | None = None
    scale_dtype: str | None = None
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    quantized: dict[str, QuantLayer] = field(default_factory=dict)
    report: ConversionReport | None = None
    model_keys: frozenset[str] = frozenset()  # the state dict names transformers expects
    base_prefix: str = ""  # the model class's base_model_prefix ("transformer" for BLOOM)
    tied: dict[str, str] = field(default_factory=dict)  # tied tensor -> the tensor it copies
    bytes_checked: int = 0  # bytes of the shards read (and hashed)
    scan_seconds: float = 0.0  # time of the data pass over the shards
    seconds: float = 0.0  # time of all structure checks (imports, meta model, tokenizer included)

    @property
    def kept(self) -> dict[str, StoredTensor]:
        mine = {n for q in self.quantized.values() for n in (q.packed.name, q.scale.name, q.shape and q.shape.name)}
        return {n: t for n, t in self.tensors.items() if n not in mine}

    def model_name(self, name: str) -> str:
        """A checkpoint's tensor name as the model names it (`int8.hf.NameMap`)."""
        return NameMap(self.model_keys, self.base_prefix).model_name(name)

    @property
    def conv1d(self) -> bool:
        return any(q.layout == WeightLayout.CONV1D for q in self.quantized.values())
