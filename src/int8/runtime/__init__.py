"""The int8 runtime: load converted checkpoints with int8 linears, generate, fine-tune with LoRA.

`load` returns a transformers model whose quantized linears are `Int8Linear`
layers (int8 codes + per-block scales in memory, de-quantized just in time).
`get_peft_model` / `load_adapter` put PEFT LoRA adapters on those layers
(see `int8.runtime.lora`). The names below are imported on first use, so that
importing `int8.runtime.generate` for the CLI does not import torch and PEFT.
"""

from __future__ import annotations

__all__ = ["Int8Linear", "Int8LoraLinear", "adapter_optimizer", "get_peft_model", "load", "load_adapter", "lora_config_for"]


def __getattr__(name: str):
    if name == "load":
        from .loader import load

        return load
    if name == "Int8Linear":
        from .layer import Int8Linear

        return Int8Linear
    if name in ("Int8LoraLinear", "adapter_optimizer", "get_peft_model", "load_adapter", "lora_config_for"):
        from . import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'int8.runtime' has no attribute {name!r}")
