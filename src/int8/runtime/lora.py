"""LoRA adapters on `Int8Linear` layers, through PEFT's custom-module mechanism.

PEFT lets a ``LoraConfig`` map a layer type to a LoRA class
(``LoraConfig._register_custom_module``, its documented extension point). int8
uses it explicitly, per config, and never changes PEFT itself:

    from int8.runtime import lora
    model = lora.get_peft_model(int8.load(path), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...
    model.save_pretrained("my-adapter")                      # PEFT's own files
    model = lora.load_adapter(int8.load(path), "my-adapter")

``lora.get_peft_model`` / ``lora.load_adapter`` are PEFT's ``get_peft_model`` /
``PeftModel.from_pretrained`` with the config prepared by `lora_config_for`
(which also resolves ``target_modules="all-linear"`` to the int8 layers); with
PEFT's functions directly, pass ``lora_config_for(model, config)`` as the config.
The int8 codes and scales are frozen and never change.

`Int8LoraLinear` computes ``base(x) + B(A(dropout(x))) * scaling`` with the
adapter matrices in their own (usually float32) dtype. Merging an adapter into
the int8 weight is refused: it would re-quantize the base weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from .layer import Int8Linear


class Int8LoraLinear(torch.nn.Module, LoraLayer):
    """A LoRA adapter around a frozen `Int8Linear`."""

    def __init__(
        self,
        base_layer: torch.nn.Module,
        adapter_name: str,
        config=None,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config, **kwargs):
        variants = [
            name
            for name, on in (
                ("use_dora", getattr(config, "use_dora", False)),
                ("alora", getattr(config, "alora_invocation_tokens", None) is not None),
                ("arrow", getattr(config, "arrow_config", None) is not None),
                ("velora", getattr(config, "velora_config", None) is not None),
            )
            if on
        ]
        if variants:
            raise ValueError(f"{type(self).__name__} supports plain LoRA only, not {', '.join(variants)}")
        return None

    def _get_in_out_features(self, module):
        base = _base(module)
        if isinstance(base, Int8Linear):
            return base.in_features, base.out_features
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer):
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if isinstance(base, Int8Linear):
            return base.codes.device, base.compute_dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    # -- merging is refused: the base weight is int8 -------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(
            "LoRA adapters cannot be merged into int8 layers (that would re-quantize the frozen weights). "
            "Keep the adapter separate (PeftModel.save_pretrained), or merge it into the FP32 original."
        )

    def unmerge(self) -> None:
        if self.merged:  # pragma: no cover - merge() never succeeds
            raise NotImplementedError("nothing can be merged into int8 layers")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    # -- forward -------------------------------------------------------------------------------

    def _lora(self, x: torch.Tensor, adapter: str, expected: torch.dtype) -> torch.Tensor:
        lora_a = self.lora_A[adapter]
        lora_b = self.lora_B[adapter]
        if not torch.is_autocast_enabled(x.device.type):
            x = self._cast_input_dtype(x, lora_a.weight.dtype)
        out = lora_b(lora_a(self.lora_dropout[adapter](x))) * self.scaling[adapter]
        return out.to(expected)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:  # a different adapter per sample
            for adapter in set(adapter_names):
                if adapter == "__base__" or adapter not in self.lora_A:
                    continue
                idx = [i for i, name in enumerate(adapter_names) if name == adapter]
                result[idx] += self._lora(x[idx], adapter, result.dtype)
            return result
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = result + self._lora(x, adapter, result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def adapter_optimizer(model: torch.nn.Module, lr: float = 2e-4, weight_decay: float = 0.0, eight_bit: bool | None = None):
    """An AdamW over the trainable parameters of ``model`` (the LoRA adapters).

    By default, on CPU and CUDA alike, bitsandbytes' 8-bit ``AdamW8bit``: both moment estimates are
    kept as 8-bit block-quantized state (every adapter matrix, however small: ``min_8bit_size=0``),
    a quarter of fp32 Adam's optimizer memory. Where bitsandbytes cannot be loaded, torch's
    ``AdamW`` is used and a warning says so once. ``eight_bit=False`` asks for torch's AdamW;
    ``eight_bit=True`` fails (`Int8Error`) when bitsandbytes cannot be loaded.
    """
    from ..errors import Int8Error

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise Int8Error("the model has no trainable parameters", "Attach LoRA adapters with int8.runtime.get_peft_model first.")
    if eight_bit is not False:
        bnb, why = _bitsandbytes()
        if bnb is not None:
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=0)
        if eight_bit:
            raise Int8Error(f"8-bit Adam needs bitsandbytes, which cannot be loaded ({why})", "pip install bitsandbytes")
        _warn_once(f"bitsandbytes cannot be loaded ({why}): using torch's AdamW (32-bit optimizer state)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import warnings

    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _bitsandbytes():
    """(the bitsandbytes module, "") or (None, why it cannot be loaded)."""
    import logging

    # its CPU backend logs a warning about an optional 4-bit kernel package at import; 8-bit Adam does not use it
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb

        return bnb, ""
    except Exception as e:  # not installed, or its native library does not load on this machine
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip(": ")
    finally:
        cpu_ops.setLevel(level)


LORA_MAPPING = {Int8Linear: Int8LoraLinear}
"""For ``LoraConfig._register_custom_module(LORA_MAPPING)`` (what `lora_config_for` does)."""


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def lora_config_for(model: torch.nn.Module, config):
    """``config`` (a PEFT ``LoraConfig``), made to put `Int8LoraLinear` adapters on ``model``'s `Int8Linear` layers.

    Uses PEFT's custom-module registration (``LoraConfig._register_custom_module``)
    on this config only, so nothing in PEFT changes for other models. With
    ``target_modules="all-linear"`` the int8 layers are named explicitly (PEFT's
    own expansion sees ``nn.Linear`` only), leaving out the output head as PEFT does.
    Returns the same config object.
    """
    config._register_custom_module(LORA_MAPPING)
    target = getattr(config, "target_modules", None)
    if isinstance(target, str) and target.lower() == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_names = {n for n, m in model.named_modules() if m is head}
        names = {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, (Int8Linear, torch.nn.Linear)) and m is not head and n not in head_names
        }
        if not names:
            raise ValueError("target_modules='all-linear': the model has no linear layers to adapt")
        config.target_modules = names
    return config


def get_peft_model(model: torch.nn.Module, config, **kwargs):
    """`peft.get_peft_model` for an int8 model: the config is prepared with `lora_config_for` first."""
    import peft

    return peft.get_peft_model(model, lora_config_for(model, config), **kwargs)


def load_adapter(model: torch.nn.Module, adapter: str | Path, **kwargs):
    """`peft.PeftModel.from_pretrained` for an int8 model: a saved LoRA adapter put back on its int8 layers.

    ``kwargs`` go to ``PeftModel.from_pretrained`` (``is_trainable``, ``adapter_name``, ``revision``, ...).
    """
    from peft import PeftConfig, PeftModel

    config = kwargs.pop("config", None) or PeftConfig.from_pretrained(str(adapter), **{
        k: v for k, v in kwargs.items() if k in ("revision", "subfolder", "token")
    })
    return PeftModel.from_pretrained(model, adapter, config=lora_config_for(model, config), **kwargs)
