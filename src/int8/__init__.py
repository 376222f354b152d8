"""int8: convert FP32 language-model checkpoints into int8 ones that transformers loads and vLLM serves.

    int8.convert(source, out, ...)   # a preset, Hub id or folder -> an int8 checkpoint; returns the report
    int8.load(path_or_repo, ...)     # a transformers model whose linears stay int8 in memory (LoRA-ready)
    int8.verify.verify_checkpoint(target, ...)   # structure, integrity, loading, fidelity
"""

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "load"]


def __getattr__(name: str):
    # Lazy: `import int8` stays fast (the CLI's --help must not import torch).
    if name == "convert":
        from .conversion.api import convert

        return convert
    if name == "load":
        from .runtime.loader import load

        return load
    raise AttributeError(f"module 'int8' has no attribute {name!r}")
