"""int8: convert FP32 language-model checkpoints into int8 ones that transformers loads and vLLM serves."""

__version__ = "0.1.0"

__all__ = ["__version__", "convert"]


def __getattr__(name: str):
    # Lazy: `import int8` stays fast (the CLI's --help must not import torch).
    if name == "convert":
        from .converter import convert

        return convert
    raise AttributeError(f"module 'int8' has no attribute {name!r}")
