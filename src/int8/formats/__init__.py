"""The file formats int8 reads and writes, each in one module, apart from any knowledge of models.

    safetensors          header scan (validated at the edge) and build, the shard index, dtype names
    pytorch              PyTorch ``.bin`` checkpoints, loaded memory-mapped with ``weights_only=True``
    compressed_tensors   the ``pack-quantized`` layout: tensor names, code packing, ``quantization_config``
"""
