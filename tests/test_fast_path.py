"""The conversion's fast path: what int8 writes or knows without importing compressed-tensors or
transformers must equal what those libraries say."""

from __future__ import annotations

import json

import pytest

from int8.formats.compressed_tensors import build_config


def _reference_config(groups: dict[int, list[str]], ignore: list[str]) -> dict:
    """compressed-tensors' own serialization of the same quantization config."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    sizes = sorted(groups, reverse=True)
    schemes = {
        f"group_{i}": QuantizationScheme(
            targets=["Linear"] if len(sizes) == 1 else sorted(groups[size]),
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=size, dynamic=False),
            format="pack-quantized",
        )
        for i, size in enumerate(sizes)
    }
    qc = QuantizationConfig(config_groups=schemes, format="pack-quantized", quantization_status="compressed", ignore=ignore)
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(exclude={"quant_method"}, mode="json"),
    }


@pytest.mark.parametrize(
    "groups, ignore",
    [
        ({128: ["model.layers.0.mlp.up_proj"]}, ["lm_head"]),
        ({128: ["b.o_proj", "a.o_proj"], 64: ["a.down_proj"], 32: ["a.q_proj", "a.k_proj"]}, []),
        ({32: ["x"]}, ["lm_head", "encoder.block.0.layer.0.SelfAttention.q"]),
    ],
)
def test_quantization_config_is_compressed_tensors_serialization(groups, ignore):
    ours = build_config(groups, ignore)
    ref = _reference_config(groups, ignore)
    assert json.dumps(ours) == json.dumps(ref)  # same keys, same values, same order
    # and compressed-tensors parses it back to the same config
    from compressed_tensors.quantization import QuantizationConfig

    body = {k: v for k, v in ours.items() if k not in ("version", "sparsity_config", "transform_config")}
    assert QuantizationConfig.model_validate(body).model_dump(mode="json") == QuantizationConfig.model_validate(
        {k: v for k, v in ref.items() if k not in ("version", "sparsity_config", "transform_config")}
    ).model_dump(mode="json")
