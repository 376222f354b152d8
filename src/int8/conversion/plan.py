"""Decide, before any data moves, what becomes of every tensor of a checkpoint.

The model's structure (`int8.architectures.ModelFacts`: from a table for the architectures int8
knows, else from the model class built on the ``meta`` device) tells which tensors are ``nn.Linear`` weights,
which are tied to which, what the model class keeps in fp32, and the names
transformers expects. The result is a `ConversionPlan`: one `TensorPlan` per
source tensor (quantize, keep, or drop, with the reason) and the exact layout
of every output shard, so shards can be written front to back as data streams.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from ..architectures import Config, ModelFacts, ModuleKind, model_facts
from ..blocks import DEFAULT_BLOCK_SIZE, block_candidates, choose_block
from ..errors import UnsupportedModel
from ..formats import OutputFormat
from ..formats import bitsandbytes as bnb_format
from ..formats.compressed_tensors import packed_columns
from ..formats.safetensors import FLOAT_DTYPES, OutputTensor, SourceTensor
from ..hf import TokenEmbeddings, WeightLayout, bnb_default_skips, build_meta_model, out_in
from ..scheme import num_blocks


class Action(str, Enum):
    """What becomes of a source tensor (the value is what the report says, in the past tense there)."""

    QUANTIZE = "quantize"
    KEEP = "keep"
    DROP = "drop"


QUANTIZE, KEEP, DROP = Action.QUANTIZE, Action.KEEP, Action.DROP


class Embeddings(str, Enum):
    """What `int8 convert --embeddings` does with the token embeddings and the output head (the value is the flag's)."""

    KEEP = "keep"  # the default: both stay unquantized in --dtype (every stock loader reads the output)
    INT8 = "int8"  # both quantized like a linear, in blocks along the embedding dimension (int8.load reads it; see
    # `int8.formats.compressed_tensors.EMBEDDING_LOADERS`)


@dataclass
class TensorPlan:
    """What happens to one source tensor."""

    source: SourceTensor
    name: str  # the model's name for it (may add a prefix the checkpoint lacked)
    action: str  # QUANTIZE, KEEP or DROP
    reason: str = ""
    out_dtype: str | None = None  # KEEP: dtype written; QUANTIZE: scale dtype
    layout: WeightLayout = WeightLayout.LINEAR  # QUANTIZE: how the source stores the weight
    outputs: list[OutputTensor] = field(default_factory=list)
    tied_to: str | None = None  # DROP of a tied copy: the tensor it duplicates
    block_size: int | None = None  # QUANTIZE: values per scale along each row (`int8.blocks.choose_block`)

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def out_features(self) -> int:
        return out_in(self.source.shape, self.layout)[0]

    @property
    def in_features(self) -> int:
        return out_in(self.source.shape, self.layout)[1]

    @property
    def out_nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclass
class ShardPlan:
    filename: str
    entries: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        return sum(e.out_nbytes for e in self.entries)


@dataclass
class ConversionPlan:
    model_class: str
    model_type: str
    is_encoder_decoder: bool
    block_size: int  # the preferred (largest) block size; each quantized entry has its own
    dtype: str  # of everything not quantized
    entries: list[TensorPlan]
    shards: list[ShardPlan]
    ignore: list[str]  # Linear modules left unquantized (compressed-tensors `ignore`)
    warnings: list[str] = field(default_factory=list)
    scale_dtype: str = "F32"  # of the weight scales (each QUANTIZE entry's out_dtype)
    embeddings: Embeddings = Embeddings.KEEP
    format: OutputFormat = OutputFormat.COMPRESSED_TENSORS

    @property
    def quantized_embeddings(self) -> list[str]:
        """The nn.Embedding modules quantized (`Embeddings.INT8`): config groups must name them, no class target does."""
        return [e.module for e in self.quantized if e.layout == WeightLayout.EMBEDDING]

    @property
    def quantized(self) -> list[TensorPlan]:
        return [e for e in self.entries if e.action == QUANTIZE]

    @property
    def groups(self) -> dict[int, list[str]]:
        """Block size (largest first) -> the modules quantized with it: one compressed-tensors config group each."""
        out: dict[int, list[str]] = {}
        for e in sorted(self.quantized, key=lambda e: -(e.block_size or 0)):
            out.setdefault(e.block_size, []).append(e.module)
        return out

    @property
    def written(self) -> list[TensorPlan]:
        return [e for e in self.entries if e.action != DROP]

    @property
    def bytes_in(self) -> int:
        return sum(e.source.nbytes for e in self.entries)

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((e.source.nbytes for e in self.entries), default=0)


def check_pattern(pattern: str) -> None:
    """Refuse a skip pattern that cannot match as meant: empty, or a ``re:`` that is not a regular expression."""
    if not pattern.strip() or pattern.strip() == "re:":
        raise UnsupportedModel("an empty skip pattern", "Give a module name (lm_head), a glob (*.attn.*) or re:REGEX.")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise UnsupportedModel(
                f"{pattern[3:]!r} is not a valid regular expression ({e})", "Check the brackets and escapes of the re: pattern."
            ) from None


def unmatched_patterns(plan: ConversionPlan, patterns: Iterable[str]) -> list[str]:
    """The skip patterns that match no module holding a tensor of the plan (they would change nothing)."""
    modules = {e.module for e in plan.entries}
    return [p for p in patterns if not any(matches(m, p) for m in modules)]


def matches(module: str, pattern: str) -> bool:
    """A skip pattern matches a module name.

    ``re:REGEX`` is a regular expression matched at the start of the name;
    a pattern with ``*``, ``?`` or ``[`` is a glob over the whole dotted name;
    any other pattern matches when it equals the name or one of its dotted
    components (``lm_head``, ``wo``, ``transformer.h.0.mlp``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(module, pattern)
    return f".{pattern}." in f".{module}."


def _keep_dtype(dtype: str, default: str, fp32_module: bool) -> str:
    if dtype not in FLOAT_DTYPES:
        return dtype
    if fp32_module and default == "F16":
        return "F32"  # transformers upcasts these modules to fp32 when loading in fp16
    return default


def make_plan(
    config,
    tensors: Sequence[SourceTensor],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: str = "BF16",
    scale_dtype: str = "F32",
    skip: Iterable[str] = (),
    max_shard_size: int = 5_000_000_000,
    same_data: Callable[[SourceTensor, SourceTensor], bool] | None = None,
    embeddings: Embeddings = Embeddings.KEEP,
    format: OutputFormat = OutputFormat.COMPRESSED_TENSORS,
) -> ConversionPlan:
    """Plan the conversion of ``tensors`` (a checkpoint's tensors) for ``config``.

    ``dtype`` is what every tensor kept unquantized is stored in, ``scale_dtype`` what the
    scales of the quantized weights are stored in (safetensors names: ``F32``, ``F16``, ``BF16``).

    Each linear weight is quantized in blocks of the largest of ``block_size`` and the smaller
    fallbacks (`int8.blocks.block_candidates`: 64 and 32 below a preferred 128) that divides its
    input dimension; one that none divides is kept, with a warning.

    A tensor that the model ties to another (``lm_head`` to the embeddings,
    T5's ``embed_tokens`` to ``shared``) is dropped when the checkpoint also
    holds the tensor it is tied to, as ``save_pretrained`` does: only if
    ``same_data(copy, original)`` says they are equal, when given — transformers
    itself refuses to tie copies that differ.

    ``embeddings`` (`Embeddings.INT8`) quantizes the input token embedding (`int8.hf.TokenEmbeddings`), in
    blocks along its embedding dimension, and the output head like any linear; a tied head is stored once,
    as the embedding's codes. By default both are kept.

    With ``format=OutputFormat.BNB`` (bitsandbytes' layout) a block is a whole row: ``block_size`` does not
    apply, the scales are float32, and the linears kept are those transformers' ``load_in_8bit`` keeps
    (`int8.hf.bnb_default_skips`) plus ``skip``.
    """
    embeddings = Embeddings(embeddings)
    bnb = format == OutputFormat.BNB
    if bnb:
        scale_dtype = "F32"
    if bnb and embeddings == Embeddings.INT8:
        raise UnsupportedModel("--embeddings int8 applies to --format compressed-tensors only (bitsandbytes' layout "
                               "quantizes linear layers alone)")
    if block_size < 1:
        raise UnsupportedModel(f"--block-size must be a positive integer, got {block_size}")
    sizes = ", ".join(map(str, block_candidates(block_size)))
    skip = list(skip)
    for pattern in skip:
        check_pattern(pattern)
    facts = model_facts(config)  # `int8.architectures`: from its table, or from the model class built on meta
    names = facts.names
    params = facts.params
    tied = dict(facts.tied)
    fp32_modules = facts.fp32_modules
    out_emb_names = facts.output_embeddings
    model_class = facts.model_class
    vocab = facts.vocab if embeddings == Embeddings.INT8 else TokenEmbeddings()
    if embeddings == Embeddings.INT8:
        out_emb_names = set()  # the head is quantized like any linear
    # bitsandbytes: what transformers' load_in_8bit keeps, asked of transformers itself (on the meta model)
    bnb_skips = bnb_default_skips(build_meta_model(_transformers_config(config))) if bnb else []
    entries: list[TensorPlan] = []
    warnings: list[str] = []
    by_model_name = {names.model_name(t.name): t for t in tensors}
    dropped_unknown: list[str] = []
    ragged: list[str] = []  # linear weights kept only because no block size divides their rows
    for t in tensors:
        name = names.model_name(t.name)
        if name not in params:
            entries.append(TensorPlan(t, name, DROP, "not a parameter or buffer of " + model_class))
            dropped_unknown.append(t.name)
            continue
        expected = tuple(params[name])
        if expected != t.shape:
            raise UnsupportedModel(
                f"tensor {t.name!r} has shape {list(t.shape)} but {model_class} built from config.json "
                f"expects {list(expected)}",
                "The weights and config.json do not belong together.",
            )
        src = tied.get(name)
        if src is not None and src in by_model_name:
            if same_data is None or same_data(t, by_model_name[src]):
                entries.append(TensorPlan(t, name, DROP, f"tied to {src}", tied_to=src))
                continue
            # Different values (T5 v1.1's lm_head, say): transformers will not tie them; keep both.
        module_name, _, pname = name.rpartition(".")
        fp32 = any(matches(module_name, m) for m in fp32_modules)
        layout = facts.layout(module_name)
        if pname == "weight" and len(t.shape) == 2 and layout is not None and t.dtype in FLOAT_DTYPES:
            in_features = out_in(t.shape, layout)[1]
            block = in_features if bnb else choose_block(in_features, block_size)
            reason = None
            hit = next((p for p in skip if matches(module_name, p)), None)
            if module_name in out_emb_names:
                reason = "output head: kept unquantized for accuracy"
            elif module_name == vocab.head and vocab.head_tied and f"{vocab.input}.weight" not in by_model_name:
                reason = "output head stored in place of the embedding it is tied to: kept (transformers ties it back)"
            elif hit is not None:
                reason = f"matches skip pattern {hit!r}"
            elif fp32:
                reason = f"{model_class} keeps it in fp32 (_keep_in_fp32_modules)"
            elif bnb and bnb_format.is_skipped(module_name, bnb_skips):
                reason = "transformers' load_in_8bit keeps it unquantized (a tied weight or the model's last module)"
            elif block is None:
                reason = f"input dimension {in_features} is not a multiple of any block size ({sizes})"
                ragged.append(name)
            if reason is None:
                entries.append(TensorPlan(t, name, QUANTIZE, out_dtype=scale_dtype, layout=layout, block_size=block))
                continue
            entries.append(TensorPlan(t, name, KEEP, reason, _keep_dtype(t.dtype, dtype, fp32), layout=layout))
            continue
        if module_name == vocab.input and pname == "weight" and len(t.shape) == 2 and t.dtype in FLOAT_DTYPES:
            block = choose_block(t.shape[1], block_size)
            hit = next((p for p in skip if matches(module_name, p)), None)
            if hit is None and block is not None:
                entries.append(TensorPlan(t, name, QUANTIZE, out_dtype=scale_dtype, layout=WeightLayout.EMBEDDING,
                                          block_size=block))
                continue
            warnings.append(f"--embeddings int8: {name} kept unquantized: " + (
                f"it matches skip pattern {hit!r}" if hit is not None
                else f"its embedding dimension {t.shape[1]} is not a multiple of any block size ({sizes})"))
        kind = "embedding" if facts.kind(module_name) == ModuleKind.EMBEDDING else (
            "bias" if pname == "bias" else ("buffer" if name in facts.buffers else "parameter")
        )
        entries.append(TensorPlan(t, name, KEEP, kind, _keep_dtype(t.dtype, dtype, fp32)))

    missing = _missing_keys(facts, params, tied, {e.name for e in entries if e.action != DROP or e.tied_to})
    if missing:
        raise UnsupportedModel(
            f"the checkpoint lacks {len(missing)} tensor(s) that {model_class} needs, e.g. "
            + ", ".join(sorted(missing)[:4]),
            "The weights and config.json do not belong together, or the download is incomplete.",
        )
    if dropped_unknown:
        warnings.append(
            f"dropped {len(dropped_unknown)} tensor(s) that {model_class} does not use: "
            + ", ".join(dropped_unknown[:4]) + (" ..." if len(dropped_unknown) > 4 else "")
        )
    quantized = [e for e in entries if e.action == QUANTIZE]
    if not quantized:
        if ragged:
            dims = sorted({e.in_features for e in entries if e.name in ragged})
            raise UnsupportedModel(
                f"no block size ({sizes}) divides any of the linear layers' input dimensions ({', '.join(map(str, dims[:5]))})",
                "Choose a --block-size that divides them.",
            )
        raise UnsupportedModel(
            f"{model_class} has no nn.Linear weights that int8 would quantize",
            "int8 converts models whose big weights are nn.Linear layers.",
        )
    if ragged:
        warnings.append(
            f"{len(ragged)} linear weight(s) kept unquantized because their input dimension is not a multiple "
            f"of any block size ({sizes}; compressed-tensors groups must divide the row), e.g. {ragged[0]}"
        )
    if not bnb and any(e.layout == WeightLayout.CONV1D for e in quantized):
        warnings.append(
            "GPT-2 style Conv1D layers were quantized; compressed-tensors only loads nn.Linear, "
            "so load this checkpoint with int8.load rather than plain transformers"
        )
    for e in entries:
        e.outputs = _outputs(e, format)
    # The linears left unquantized: compressed-tensors' ``ignore`` (every nn.Linear), or bitsandbytes'
    # ``llm_int8_skip_modules`` (every layer transformers would otherwise convert, Conv1D included, by its exact name).
    convertible = [n for n in facts.modules if facts.layout(n) is not None] if bnb else facts.linear_modules
    ignore = sorted(n for n in convertible if n not in {e.module for e in quantized})
    shards = _shard(entries, max_shard_size)
    return ConversionPlan(
        model_class=model_class,
        model_type=config.model_type,
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        block_size=block_size,
        dtype=dtype,
        entries=entries,
        shards=shards,
        ignore=ignore,
        warnings=warnings,
        scale_dtype=scale_dtype,
        embeddings=embeddings,
        format=format,
    )


def _missing_keys(facts: ModelFacts, params, tied: dict[str, str], provided: set[str]) -> set[str]:
    """Model tensors that neither the checkpoint nor weight tying will fill."""
    ignore = [re.compile(p) for p in facts.ignore_missing]
    tied_group: dict[str, set[str]] = {}
    for target, source in tied.items():
        group = tied_group.setdefault(source, {source}) | tied_group.get(target, {target}) | {target}
        for name in group:
            tied_group[name] = group
    return {
        name
        for name in params
        if not (tied_group.get(name, {name}) & provided) and not any(p.search(name) for p in ignore)
    }


def _outputs(e: TensorPlan, format: OutputFormat = OutputFormat.COMPRESSED_TENSORS) -> list[OutputTensor]:
    if e.action == DROP:
        return []
    if e.action == KEEP:
        return [OutputTensor(e.name, e.out_dtype or e.source.dtype, e.source.shape)]
    out, inp = e.out_features, e.in_features
    if format == OutputFormat.BNB:
        return bnb_format.outputs(e.module, out, inp)
    return [
        OutputTensor(f"{e.module}.weight_packed", "I32", (out, packed_columns(inp))),
        OutputTensor(f"{e.module}.weight_scale", e.out_dtype, (out, num_blocks(inp, e.block_size))),
        OutputTensor(f"{e.module}.weight_shape", "I64", (2,)),
    ]


def _shard(entries: list[TensorPlan], max_shard_size: int) -> list[ShardPlan]:
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for e in entries:
        if e.action == DROP:
            continue
        n = e.out_nbytes
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += n
    total = len(groups)
    return [ShardPlan(f"model-{i + 1:05d}-of-{total:05d}.safetensors", g) for i, g in enumerate(groups)]


def _transformers_config(config):
    """transformers' config for ``config`` (an `int8.architectures.Config` read from config.json, or one already)."""
    return config.transformers() if isinstance(config, Config) else config
