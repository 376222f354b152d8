"""The int8 runtime: load converted checkpoints with int8 linears, generate, fine-tune with LoRA.

`load` returns a transformers model whose quantized linears are `Int8Linear`
layers (int8 codes + per-block scales in memory, de-quantized just in time).
Importing this package also teaches PEFT to put LoRA adapters on those layers
(see `int8.runtime.lora`).
"""

from __future__ import annotations

from .layer import Int8Linear
from .load import load
from .lora import Int8LoraLinear, adapter_optimizer, register_peft

__all__ = ["Int8Linear", "Int8LoraLinear", "adapter_optimizer", "load", "register_peft"]

register_peft()
