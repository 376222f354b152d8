"""Checkpoints that other tools write: compressed-tensors' own compressor, following llm-compressor's schemes.

`make_foreign(source, out, scheme="W8A16")` does what llm-compressor's
``model_free_ptq(source, out, scheme="W8A16", ignore=["lm_head", ...])`` does,
with compressed-tensors' public API only: the preset scheme (W8A16: 8-bit
symmetric int weights in groups of 128 along the input dimension), the
memoryless min-max observer's scales (``calculate_qparams`` of each group's
minimum and maximum: absmax / 127.5), the ``pack-quantized`` compressor, the
``quantization_config`` of `ModelCompressor`, an index written by
compressed-tensors' ``update_safetensors_index``, and the source's tokenizer
and generation files copied. No int8_report.json and no model card. The
weights are quantized in the dtype they are stored in. For the tiny GPT-J, T5
and BLOOM (float32) and GPT-J (bf16) the tensors are byte for byte those
llm-compressor 0.14's ``model_free_ptq`` writes (``bench/foreign`` runs it and
compares).

Other presets (W4A16, W8A8, FP8_DYNAMIC) give the checkpoints `int8 verify` must
refuse to judge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from models import load_original

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _calibrate(module: torch.nn.Module) -> None:
    """The weight's scale (and zero point) as llm-compressor's default memoryless min-max observer sets them."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = module.quantization_scheme.weights
    w = module.weight.data
    if args.strategy == "group":
        view = w.reshape(w.shape[0], -1, args.group_size)
    elif args.strategy == "channel":
        view = w.reshape(w.shape[0], 1, -1)
    else:
        view = w.reshape(1, 1, -1)
    scale, zero_point = calculate_qparams(view.amin(-1), view.amax(-1), args)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))


def make_foreign(source: Path, out: Path, *, scheme: str = "W8A16", index: bool = True,
                 ignore: tuple[str, ...] = ("lm_head",)) -> Path:
    """Quantize the tiny checkpoint ``source`` into ``out`` as another tool would; return ``out``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.utils.safetensors_load import update_safetensors_index

    stored = json.loads((Path(source) / "config.json").read_text()).get("dtype", "float32")
    model = load_original(source, getattr(torch, stored))  # quantized in the dtype it is stored in, as model_free_ptq does
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme, ["Linear"])}, ignore=list(ignore))
    apply_quantization_config(model, config)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None and hasattr(module, "weight_scale"):
            _calibrate(module)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out = Path(out)
    model.save_pretrained(out)
    compressor.update_config(out)
    for name in COPIED:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, out / name)
    if index:  # model_free_ptq always writes one, with compressed-tensors' own helper
        from safetensors.torch import load_file

        tensors = load_file(out / "model.safetensors")
        update_safetensors_index(out, sum(t.nbytes for t in tensors.values()), dict.fromkeys(tensors, "model.safetensors"))
    return out


def quantization_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
