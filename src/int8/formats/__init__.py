"""The file formats int8 reads and writes, each in one module, apart from any knowledge of models.

    safetensors          header scan (validated at the edge) and build, the shard index, dtype names
    pytorch              PyTorch ``.bin`` checkpoints, loaded memory-mapped with ``weights_only=True``
    compressed_tensors   the ``pack-quantized`` layout: tensor names, code packing, ``quantization_config``
    bitsandbytes         transformers' serialized ``load_in_8bit`` layout: ``weight``/``SCB``/``weight_format``, its config
"""

from enum import Enum


class OutputFormat(str, Enum):
    """The layout `int8 convert --format` writes (the value is what the user types)."""

    COMPRESSED_TENSORS = "compressed-tensors"  # pack-quantized, block-wise absmax: `compressed_tensors`
    BNB = "bnb"  # bitsandbytes' serialized LLM.int8 layout, row-wise absmax: `bitsandbytes`
