"""What the conversion plan needs to know about a model class, from a table or from the class itself.

`ModelFacts` is the structure of a model as the plan sees it: every state-dict key with its shape,
the kind of module holding it (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``), which
weights transformers ties to which, the modules it keeps in fp32, the output head and the
base-model prefix. Two sources give it:

* `from_model`: the model class built on the meta device (`int8.hf.build_meta_model`). Always right,
  but importing transformers' modeling code and building the model costs seconds.
* `from_table`: a few lines per architecture int8 supports (GPT-J, GPT-2, BLOOM, Llama, T5, mT5),
  computed from ``config.json`` alone, with transformers' config defaults for the fields a
  ``config.json`` leaves out. No transformers, no torch. The test suite checks every entry against
  `from_model` (tests/test_fast_path.py).

`model_facts(config)` takes the table where it applies and builds the meta model otherwise.
`Config` is ``config.json`` read without transformers (the transformers config is built only
when the fallback needs it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpoint
from .hf import NameMap, TokenEmbeddings, WeightLayout


class ModuleKind(str, Enum):
    """The modules the plan tells apart (every other module is OTHER)."""

    LINEAR = "linear"  # a plain nn.Linear
    CONV1D = "conv1d"  # transformers' GPT-2 style Conv1D
    EMBEDDING = "embedding"  # nn.Embedding
    LINEAR_SUBCLASS = "linear-subclass"  # an nn.Linear subclass with its own forward: a Linear, never quantized
    OTHER = "other"


@dataclass(frozen=True)
class ModelFacts:
    model_class: str
    prefix: str  # base_model_prefix
    params: Mapping[str, tuple[int, ...]]  # every state-dict key (parameters) -> shape
    modules: Mapping[str, ModuleKind]  # module name -> kind, for the modules holding params (and every Linear)
    tied: Mapping[str, str] = field(default_factory=dict)  # tied key -> the key it is tied to
    fp32_modules: frozenset[str] = frozenset()  # _keep_in_fp32_modules(_strict) patterns
    output_embeddings: frozenset[str] = frozenset()  # module names of the output head
    ignore_missing: tuple[str, ...] = ()  # _keys_to_ignore_on_load_missing (regular expressions)
    buffers: frozenset[str] = frozenset()  # state-dict keys that are buffers, not parameters
    input_embedding: str | None = None  # the module get_input_embeddings returns, by name

    @property
    def names(self) -> NameMap:
        return NameMap(frozenset(self.params), self.prefix)

    def kind(self, module: str) -> ModuleKind:
        return self.modules.get(module, ModuleKind.OTHER)

    def layout(self, module: str) -> WeightLayout | None:
        """`WeightLayout` of a module whose weight int8 quantizes (`int8.hf.weight_layout`), else None."""
        return {ModuleKind.LINEAR: WeightLayout.LINEAR, ModuleKind.CONV1D: WeightLayout.CONV1D}.get(self.kind(module))

    @property
    def vocab(self) -> TokenEmbeddings:
        """`int8.hf.TokenEmbeddings` (as ``TokenEmbeddings.of`` finds it on the model)."""
        inp, head = self.input_embedding, min(self.output_embeddings, default=None)
        if inp is None or self.kind(inp) != ModuleKind.EMBEDDING:
            return TokenEmbeddings(head=head)
        onto = {t.rpartition(".")[0] for t, s in self.tied.items() if s == f"{inp}.weight" and t.endswith(".weight")}
        copies = frozenset(n for n in onto if n != head and self.kind(n) == ModuleKind.EMBEDDING)
        return TokenEmbeddings(inp, head, copies, head is not None and head in onto)

    @property
    def linear_modules(self) -> list[str]:
        """Every nn.Linear (subclasses included): those not quantized are compressed-tensors' ``ignore``."""
        return sorted(n for n, k in self.modules.items() if k in (ModuleKind.LINEAR, ModuleKind.LINEAR_SUBCLASS))


# --------------------------------------------------------------------------- from the model class


def from_model(model) -> ModelFacts:
    """The facts of a (meta) model instance, as transformers built it."""
    import torch

    from .hf import weight_layout

    state = model.state_dict(keep_vars=True)
    modules = {}
    for name, m in model.named_modules():
        layout = weight_layout(m)
        if layout is not None:
            modules[name] = ModuleKind(layout.value)
        elif isinstance(m, torch.nn.Embedding):
            modules[name] = ModuleKind.EMBEDDING
        elif isinstance(m, torch.nn.Linear):
            modules[name] = ModuleKind.LINEAR_SUBCLASS
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return ModelFacts(
        model_class=type(model).__name__,
        prefix=getattr(model, "base_model_prefix", "") or "",
        params={k: tuple(v.shape) for k, v in state.items()},
        modules=modules,
        tied=dict(getattr(model, "all_tied_weights_keys", None) or {}),
        fp32_modules=frozenset(getattr(model, "_keep_in_fp32_modules", None) or ())
        | frozenset(getattr(model, "_keep_in_fp32_modules_strict", None) or ()),
        output_embeddings=frozenset(n for n, m in model.named_modules() if out is not None and m is out),
        ignore_missing=tuple(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()),
        buffers=frozenset(k for k, v in state.items() if not isinstance(v, torch.nn.Parameter)),
        input_embedding=next((n for n, m in model.named_modules() if inp is not None and m is inp), None),
    )


# --------------------------------------------------------------------------- config.json without transformers


@dataclass(frozen=True)
class Config:
    """``config.json`` as read (the plan needs ``model_type`` and ``is_encoder_decoder``); `transformers()`
    builds transformers' config (`int8.hf.load_config`) for what the table does not cover."""

    data: Mapping[str, Any]
    folder: Path | None = None

    @property
    def model_type(self) -> str | None:
        return self.data.get("model_type")

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.data.get("is_encoder_decoder", ARCHITECTURES[self.model_type].encoder_decoder
                                  if self.model_type in ARCHITECTURES else False))

    def transformers(self):
        from .hf import load_config

        if self.folder is None:
            raise ValueError("no folder to load the transformers config from")
        return load_config(self.folder)


class _Fields:
    """A config's fields with transformers' defaults and aliases; each read is checked."""

    def __init__(self, data: Mapping[str, Any], defaults: Mapping[str, Any], aliases: Mapping[str, str]):
        self.data, self.defaults, self.aliases = data, defaults, aliases

    def get(self, name: str):
        for key in (name, *(a for a, n in self.aliases.items() if n == name)):
            if key in self.data:
                return self.data[key]
        return self.defaults[name]

    def int(self, name: str, default_from: str | None = None) -> int:
        v = self.get(name)
        if v is None and default_from is not None:
            return self.int(default_from)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CorruptCheckpoint(f"config.json: {name} is {v!r}, not a positive integer")
        return v

    def bool(self, name: str) -> bool:
        v = self.get(name)
        if not isinstance(v, bool):
            raise CorruptCheckpoint(f"config.json: {name} is {v!r}, not true or false")
        return v


@dataclass(frozen=True)
class Architecture:
    model_type: str
    model_class: str  # what transformers' Auto mapping gives for the model type
    prefix: str
    input_embedding: str  # the module get_input_embeddings returns
    defaults: Mapping[str, Any]  # transformers' config defaults of every field `build` reads
    build: Callable[[_Fields], tuple[dict, dict, dict]]  # -> (params, modules, tied)
    aliases: Mapping[str, str] = field(default_factory=dict)  # the config class's attribute_map
    fp32_modules: frozenset[str] = frozenset()
    encoder_decoder: bool = False
    unsupported: Callable[[_Fields], bool] = lambda f: False  # options the table does not model: use the model


class _Builder:
    def __init__(self):
        self.params: dict[str, tuple[int, ...]] = {}
        self.modules: dict[str, ModuleKind] = {}
        self.tied: dict[str, str] = {}

    def linear(self, name: str, out: int, inp: int, bias: bool = False) -> None:
        self.modules[name] = ModuleKind.LINEAR
        self.params[f"{name}.weight"] = (out, inp)
        if bias:
            self.params[f"{name}.bias"] = (out,)

    def conv1d(self, name: str, inp: int, out: int) -> None:
        self.modules[name] = ModuleKind.CONV1D
        self.params[f"{name}.weight"] = (inp, out)
        self.params[f"{name}.bias"] = (out,)

    def embedding(self, name: str, num: int, dim: int) -> None:
        self.modules[name] = ModuleKind.EMBEDDING
        self.params[f"{name}.weight"] = (num, dim)

    def norm(self, name: str, dim: int, bias: bool = True) -> None:
        self.params[f"{name}.weight"] = (dim,)
        if bias:
            self.params[f"{name}.bias"] = (dim,)

    def done(self):
        return self.params, self.modules, self.tied


def _gptj(f: _Fields):
    b, e, v = _Builder(), f.int("n_embd"), f.int("vocab_size")
    inner = f.get("n_inner") or 4 * e
    b.embedding("transformer.wte", v, e)
    for i in range(f.int("n_layer")):
        p = f"transformer.h.{i}"
        b.norm(f"{p}.ln_1", e)
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            b.linear(f"{p}.attn.{n}", e, e)
        b.linear(f"{p}.mlp.fc_in", inner, e, bias=True)
        b.linear(f"{p}.mlp.fc_out", e, inner, bias=True)
    b.norm("transformer.ln_f", e)
    b.linear("lm_head", v, e, bias=True)
    if f.bool("tie_word_embeddings"):
        b.tied["lm_head.weight"] = "transformer.wte.weight"
    return b.done()


def _gpt2(f: _Fields):
    b, e, v = _Builder(), f.int("n_embd"), f.int("vocab_size")
    inner = f.get("n_inner") or 4 * e
    b.embedding("transformer.wte", v, e)
    b.embedding("transformer.wpe", f.int("n_positions"), e)
    for i in range(f.int("n_layer")):
        p = f"transformer.h.{i}"
        b.norm(f"{p}.ln_1", e)
        b.conv1d(f"{p}.attn.c_attn", e, 3 * e)
        b.conv1d(f"{p}.attn.c_proj", e, e)
        b.norm(f"{p}.ln_2", e)
        b.conv1d(f"{p}.mlp.c_fc", e, inner)
        b.conv1d(f"{p}.mlp.c_proj", inner, e)
    b.norm("transformer.ln_f", e)
    b.linear("lm_head", v, e)
    if f.bool("tie_word_embeddings"):
        b.tied["lm_head.weight"] = "transformer.wte.weight"
    return b.done()


def _bloom(f: _Fields):
    b, h, v = _Builder(), f.int("hidden_size"), f.int("vocab_size")
    b.embedding("transformer.word_embeddings", v, h)
    b.norm("transformer.word_embeddings_layernorm", h)
    for i in range(f.int("n_layer")):
        p = f"transformer.h.{i}"
        b.norm(f"{p}.input_layernorm", h)
        b.linear(f"{p}.self_attention.query_key_value", 3 * h, h, bias=True)
        b.linear(f"{p}.self_attention.dense", h, h, bias=True)
        b.norm(f"{p}.post_attention_layernorm", h)
        b.linear(f"{p}.mlp.dense_h_to_4h", 4 * h, h, bias=True)
        b.linear(f"{p}.mlp.dense_4h_to_h", h, 4 * h, bias=True)
    b.norm("transformer.ln_f", h)
    b.linear("lm_head", v, h)
    if f.bool("tie_word_embeddings"):
        b.tied["lm_head.weight"] = "transformer.word_embeddings.weight"
    return b.done()


def _llama(f: _Fields):
    b, h, v = _Builder(), f.int("hidden_size"), f.int("vocab_size")
    heads = f.int("num_attention_heads")
    kv = f.int("num_key_value_heads", default_from="num_attention_heads")
    hd = f.get("head_dim") or h // heads
    inter, ab, mb = f.int("intermediate_size"), f.bool("attention_bias"), f.bool("mlp_bias")
    b.embedding("model.embed_tokens", v, h)
    for i in range(f.int("num_hidden_layers")):
        p = f"model.layers.{i}"
        b.linear(f"{p}.self_attn.q_proj", heads * hd, h, ab)
        b.linear(f"{p}.self_attn.k_proj", kv * hd, h, ab)
        b.linear(f"{p}.self_attn.v_proj", kv * hd, h, ab)
        b.linear(f"{p}.self_attn.o_proj", h, heads * hd, ab)
        b.linear(f"{p}.mlp.gate_proj", inter, h, mb)
        b.linear(f"{p}.mlp.up_proj", inter, h, mb)
        b.linear(f"{p}.mlp.down_proj", h, inter, mb)
        b.norm(f"{p}.input_layernorm", h, bias=False)
        b.norm(f"{p}.post_attention_layernorm", h, bias=False)
    b.norm("model.norm", h, bias=False)
    b.linear("lm_head", v, h)
    if f.bool("tie_word_embeddings"):
        b.tied["lm_head.weight"] = "model.embed_tokens.weight"
    return b.done()


def _t5(f: _Fields):
    b, d, v = _Builder(), f.int("d_model"), f.int("vocab_size")
    inner, ff, buckets = f.int("num_heads") * f.int("d_kv"), f.int("d_ff"), f.int("relative_attention_num_buckets")
    gated = f.get("is_gated_act")  # T5Config derives it from feed_forward_proj; a stored value wins
    gated = str(f.get("feed_forward_proj")).startswith("gated-") if gated is None else bool(gated)
    b.embedding("shared", v, d)

    def attention(p: str, relative: bool) -> None:
        for n in ("q", "k", "v"):
            b.linear(f"{p}.{n}", inner, d)
        b.linear(f"{p}.o", d, inner)
        if relative:
            b.embedding(f"{p}.relative_attention_bias", buckets, f.int("num_heads"))

    def mlp(p: str) -> None:
        for n in ("wi_0", "wi_1") if gated else ("wi",):
            b.linear(f"{p}.DenseReluDense.{n}", ff, d)
        b.linear(f"{p}.DenseReluDense.wo", d, ff)
        b.norm(f"{p}.layer_norm", d, bias=False)

    for stack, layers in (("encoder", f.int("num_layers")), ("decoder", f.int("num_decoder_layers", default_from="num_layers"))):
        b.embedding(f"{stack}.embed_tokens", v, d)
        b.tied[f"{stack}.embed_tokens.weight"] = "shared.weight"
        for i in range(layers):
            p = f"{stack}.block.{i}.layer"
            attention(f"{p}.0.SelfAttention", relative=i == 0)
            b.norm(f"{p}.0.layer_norm", d, bias=False)
            if stack == "decoder":
                attention(f"{p}.1.EncDecAttention", relative=False)
                b.norm(f"{p}.1.layer_norm", d, bias=False)
            mlp(f"{p}.{2 if stack == 'decoder' else 1}")
        b.norm(f"{stack}.final_layer_norm", d, bias=False)
    b.linear("lm_head", v, d)
    # T5Config and MT5Config force tie_word_embeddings to True whatever config.json says (transformers 5;
    # T5 v1.1's stored False only turns off the output scaling): the head is always tied
    b.tied["lm_head.weight"] = "shared.weight"
    return b.done()


_T5_DEFAULTS = dict(d_kv=64, relative_attention_num_buckets=32, num_decoder_layers=None, is_gated_act=None)
ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "gptj", "GPTJForCausalLM", "transformer", "transformer.wte",
            {"vocab_size": 50400, "n_embd": 4096, "n_layer": 28, "n_inner": None, "tie_word_embeddings": False},
            _gptj, aliases={"hidden_size": "n_embd", "num_hidden_layers": "n_layer"},
        ),
        Architecture(
            "gpt2", "GPT2LMHeadModel", "transformer", "transformer.wte",
            {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_inner": None,
             "tie_word_embeddings": True, "add_cross_attention": False},
            _gpt2, aliases={"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "max_position_embeddings": "n_positions"},
            unsupported=lambda f: f.get("add_cross_attention") is not False,
        ),
        Architecture(
            "bloom", "BloomForCausalLM", "transformer", "transformer.word_embeddings",
            {"vocab_size": 250880, "hidden_size": 64, "n_layer": 2, "tie_word_embeddings": True},
            _bloom, aliases={"num_hidden_layers": "n_layer", "n_embed": "hidden_size"},
        ),
        Architecture(
            "llama", "LlamaForCausalLM", "model", "model.embed_tokens",
            {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "attention_bias": False,
             "mlp_bias": False, "tie_word_embeddings": False},
            _llama,
        ),
        Architecture(
            "t5", "T5ForConditionalGeneration", "transformer", "shared",
            {**_T5_DEFAULTS, "vocab_size": 32128, "d_model": 512, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
             "feed_forward_proj": "relu"},
            _t5, aliases={"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"},
            fp32_modules=frozenset({"wo"}), encoder_decoder=True,
        ),
        Architecture(
            "mt5", "MT5ForConditionalGeneration", "transformer", "shared",
            {**_T5_DEFAULTS, "vocab_size": 250112, "d_model": 512, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
             "feed_forward_proj": "gated-gelu"},
            _t5, aliases={"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"},
            fp32_modules=frozenset({"wo"}), encoder_decoder=True,
        ),
    )
}
"""model_type -> how int8 derives its `ModelFacts` from config.json alone."""


def from_table(data: Mapping[str, Any]) -> ModelFacts | None:
    """The facts of ``config.json``'s model from `ARCHITECTURES`; None when the table does not cover it
    (another model type, an ``architectures`` entry naming another class, an option it does not model)."""
    arch = ARCHITECTURES.get(data.get("model_type"))
    if arch is None:
        return None
    named = data.get("architectures")
    if named and (not isinstance(named, list) or named[0] != arch.model_class):
        return None
    fields = _Fields(data, arch.defaults, arch.aliases)
    if arch.unsupported(fields):
        return None
    params, modules, tied = arch.build(fields)
    return ModelFacts(
        model_class=arch.model_class,
        prefix=arch.prefix,
        params=params,
        modules=modules,
        tied=tied,
        fp32_modules=arch.fp32_modules,
        output_embeddings=frozenset({"lm_head"}),
        input_embedding=arch.input_embedding,
    )


def model_facts(config) -> ModelFacts:
    """`from_table` for a `Config` the table covers, else `from_model` of the meta model (a `Config` is
    then read by transformers first)."""
    from .hf import build_meta_model

    if isinstance(config, Config):
        facts = from_table(config.data)
        if facts is not None:
            return facts
        config = config.transformers()
    return from_model(build_meta_model(config))


def table_covers(model_type: object) -> bool:
    return isinstance(model_type, str) and model_type in ARCHITECTURES

