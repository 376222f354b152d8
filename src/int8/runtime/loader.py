"""`int8.load`: a converted checkpoint as a transformers model whose big linears stay int8.

transformers does the loading (shards, tied weights, the modules a model keeps
in fp32, non-persistent buffers, generation config, device placement); int8
hooks in as a transformers *quantizer* (``quant_method = "int8-runtime"``,
registered with transformers' public ``register_quantizer``, on first use): before the weights
load it swaps every layer that the checkpoint stores as ``weight_packed`` for an
`Int8Linear` with buffers of the checkpoint's names, shapes and dtypes, so
transformers' loader fills them as they are, with no conversion. After loading,
each layer turns its packed bytes into int8 codes in place.

The model keeps the checkpoint's compressed-tensors ``quantization_config``:
``model.save_pretrained`` writes a checkpoint that `int8.load` and stock
transformers both read again.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpoint, Int8Error, NoWeightsFound, SourceNotFound, UnsupportedModel
from ..formats.compressed_tensors import LINEAR, ConfigGroup, check_config, matching_groups
from ..hf import (
    FROM_TORCH_NAME,
    NameMap,
    TokenEmbeddings,
    WeightLayout,
    out_in,
    parse_dtype,
    resolve_device,
    stored_layout,
    torch_dtype,
)
from ..hf import model_class as model_class_for
from .embedding import Int8Embedding, TiedInt8Embedding, TiedInt8Head
from .layer import Int8Linear, Kernel, triton_ready, triton_unavailable_reason

log = logging.getLogger("int8.runtime")

QUANT_METHOD = "int8-runtime"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# --------------------------------------------------------------------------------------------
# What the checkpoint holds


class QuantizedLayerSpec:
    """One quantized linear of the checkpoint, as its safetensors headers describe it."""

    __slots__ = ("name", "out_features", "in_features", "block_size", "scale_dtype")

    def __init__(self, name: str, out_features: int, in_features: int, block_size: int, scale_dtype: torch.dtype):
        self.name = name
        self.out_features = out_features
        self.in_features = in_features
        self.block_size = block_size
        self.scale_dtype = scale_dtype


def _headers(folder: Path) -> dict[str, dict]:
    """name -> safetensors header entry, over all shards (each inside ``folder``, see `int8.paths`)."""
    from ..formats.safetensors import index_files, read_index, read_safetensors_header
    from ..paths import inside

    index = folder / INDEX_NAME
    if index.is_file() or index.is_symlink():
        inside(folder, INDEX_NAME, what="index")
        paths = list(index_files(index, read_index(index)))
    elif (folder / SINGLE_NAME).is_file():
        paths = [inside(folder, SINGLE_NAME, what="weight file")]
    else:
        raise NoWeightsFound(
            f"no {SINGLE_NAME} or {INDEX_NAME} in {folder}",
            "int8.load reads the safetensors checkpoints that `int8 convert` writes.",
        )
    return {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for p in paths for t in read_safetensors_header(p)}


def check_quantization_config(qc: Any, folder: Path) -> tuple[ConfigGroup, ...]:
    """The config groups (each with its group size, the block size of its layers) of an int8 checkpoint's
    ``quantization_config``; `UnsupportedModel` when it is not one int8.load runs (the rules are
    `int8.formats.compressed_tensors.check_config`'s)."""
    if not qc:
        raise UnsupportedModel(f"{folder.name} is not an int8 checkpoint: its config.json has no quantization_config",
                               "Convert it first with `int8 convert`, or load it with plain transformers.")
    raw = qc if isinstance(qc, dict) else qc.to_dict()
    if str(raw.get("quant_method")) in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES"):
        raise UnsupportedModel(
            f"{folder.name} is in bitsandbytes' 8-bit layout (`int8 convert --format bnb`): int8.load runs "
            "compressed-tensors checkpoints only",
            "Load it with plain transformers and bitsandbytes (the model class's from_pretrained on the folder, "
            "no quantization_config needed); "
            "or convert with the default --format compressed-tensors for int8.load.",
        )
    found = check_config(raw)
    if found.problems or not found.groups:
        raise UnsupportedModel(
            f"{folder.name} is not an int8 weight-only checkpoint: " + "; ".join(found.problems[:3] or ["no config group"]),
            "int8.load reads checkpoints written by `int8 convert` (compressed-tensors pack-quantized, 8-bit int weights).",
        )
    return found.groups


def quantized_layers(folder: Path, groups: tuple[ConfigGroup, ...]) -> dict[str, QuantizedLayerSpec]:
    """Every ``M`` with ``M.weight_packed`` in the checkpoint -> its shapes, block size (its config group's
    group size; every layer stored packed is a linear, a Conv1D included) and scale dtype."""
    header = _headers(folder)
    specs: dict[str, QuantizedLayerSpec] = {}
    for key, entry in header.items():
        if not key.endswith(".weight_packed"):
            continue
        name = key[: -len(".weight_packed")]
        scale = header.get(name + ".weight_scale")
        if scale is None:
            raise CorruptCheckpoint(f"{folder}: {key} has no {name}.weight_scale beside it")
        if entry.get("dtype") != "I32" or len(entry.get("shape", ())) != 2:
            raise CorruptCheckpoint(f"{folder}: {key} is {entry.get('dtype')} {entry.get('shape')}, expected a 2-D I32 tensor")
        if scale.get("dtype") not in FROM_TORCH_NAME.values() or len(scale.get("shape", ())) != 2:
            raise CorruptCheckpoint(f"{folder}: {name}.weight_scale is {scale.get('dtype')} {scale.get('shape')}")
        out_features, nblocks = scale["shape"]
        if entry["shape"][0] != out_features:
            raise CorruptCheckpoint(f"{folder}: {key} and its weight_scale disagree on the number of rows")
        packed_cols = entry["shape"][1]
        found = matching_groups(name, (LINEAR,), groups)
        if not found:
            raise CorruptCheckpoint(f"{folder}: {key} is stored packed, but no config group of its "
                                    "quantization_config targets it")
        block = found[0].group_size
        in_features = nblocks * block
        if math.ceil(in_features / 4) != packed_cols:
            raise CorruptCheckpoint(
                f"{folder}: {key} has {packed_cols} packed columns but {nblocks} blocks of {block} values"
            )
        specs[name] = QuantizedLayerSpec(name, out_features, in_features, block, torch_dtype(scale["dtype"]))
    if not specs:
        raise UnsupportedModel(f"{folder} holds no int8 weights (no *.weight_packed tensors)",
                               "Convert the checkpoint with `int8 convert` first.")
    return specs


# --------------------------------------------------------------------------------------------
# The transformers quantizer


_registered = False


def _register() -> None:
    """Register int8's loader with transformers' public quantizer registry, once, on first `load`."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @register_quantization_config(QUANT_METHOD)
    class Int8RuntimeConfig(QuantizationConfigMixin):
        """Loads a compressed-tensors int8 checkpoint into `Int8Linear` layers.

        ``to_dict`` gives back the checkpoint's own compressed-tensors config, so
        a model saved with ``save_pretrained`` stays a standard checkpoint.
        """

        def __init__(self, checkpoint_config: dict | None = None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.checkpoint_config = copy.deepcopy(checkpoint_config or {})
            self.layers: dict[str, QuantizedLayerSpec] = kwargs.pop("layers", {})
            self.stored: frozenset[str] = kwargs.pop("stored", frozenset())  # every tensor name of the checkpoint

        def to_dict(self) -> dict[str, Any]:
            return copy.deepcopy(self.checkpoint_config)

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

        def __repr__(self) -> str:
            return f"Int8RuntimeConfig({len(self.layers)} int8 layers)"

    @register_quantizer(QUANT_METHOD)
    class Int8RuntimeQuantizer(HfQuantizer):
        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            vocab = TokenEmbeddings.of(model)  # before the swap: it looks for an nn.Embedding
            replace_linears(model, self.quantization_config.layers)
            share_embedding(model, vocab, self.quantization_config.stored)

        def _process_model_after_weight_loading(self, model, **kwargs):
            for module in model.modules():
                if isinstance(module, (Int8Linear, Int8Embedding, TiedInt8Head, TiedInt8Embedding)):
                    module.finalize()
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_compileable(self) -> bool:
            return True

    _registered = True


def _model_names(model, specs: dict[str, QuantizedLayerSpec]) -> dict[str, QuantizedLayerSpec]:
    """Map checkpoint module names onto the model's (`int8.hf.NameMap`: a base-model prefix added or stripped)."""
    names = NameMap(frozenset(n for n, _ in model.named_modules()), getattr(model, "base_model_prefix", "") or "")
    out = {}
    for name, spec in specs.items():
        cand = names.model_name(name)
        if cand not in names.keys:
            raise CorruptCheckpoint(f"the checkpoint has int8 weights for {name!r}, a module the model does not have",
                                    "The weights and config.json do not belong together.")
        out[cand] = spec
    return out


def replace_linears(model: torch.nn.Module, specs: dict[str, QuantizedLayerSpec]) -> list[str]:
    """Swap the named ``nn.Linear`` / ``Conv1D`` modules of ``model`` for empty `Int8Linear`, and a quantized
    ``nn.Embedding`` (``--embeddings int8``) for an empty `Int8Embedding` (checkpoint layout)."""
    replaced = []
    for name, spec in _model_names(model, specs).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        layout = stored_layout(old)
        if layout is None:
            raise UnsupportedModel(f"{name} is a {type(old).__name__}; int8.load de-quantizes only nn.Linear, Conv1D "
                                   "and nn.Embedding layers")
        if layout == WeightLayout.EMBEDDING:
            if (old.num_embeddings, old.embedding_dim) != (spec.out_features, spec.in_features):
                raise CorruptCheckpoint(
                    f"{name}: the checkpoint's int8 embedding is {spec.out_features}x{spec.in_features} but the model "
                    f"expects {old.num_embeddings}x{old.embedding_dim}", "The weights and config.json do not belong together.")
            setattr(parent, child, Int8Embedding(
                old.num_embeddings, old.embedding_dim, old.padding_idx, block_size=spec.block_size,
                scale_dtype=spec.scale_dtype, device=torch.device("meta"), dtype=old.weight.dtype))
            replaced.append(name)
            continue
        out_f, in_f = out_in(tuple(old.weight.shape), layout)
        if out_f != spec.out_features or math.ceil(in_f / 4) != math.ceil(spec.in_features / 4) or in_f > spec.in_features:
            raise CorruptCheckpoint(
                f"{name}: the checkpoint's int8 weight is {spec.out_features}x{spec.in_features} but the model "
                f"expects {out_f}x{in_f}", "The weights and config.json do not belong together.")
        bias = getattr(old, "bias", None)
        new = Int8Linear(
            in_f, out_f, bias is not None, block_size=spec.block_size, scale_dtype=spec.scale_dtype,
            device=torch.device("meta"), dtype=bias.dtype if bias is not None else None, checkpoint_layout=True,
        )
        if in_f != spec.in_features:  # channel strategy: the packed width rounded in_features up
            new.weight_scale = torch.empty(out_f, math.ceil(in_f / spec.block_size), dtype=spec.scale_dtype, device="meta")
        setattr(parent, child, new)
        replaced.append(name)
    return replaced


def share_embedding(model: torch.nn.Module, vocab: TokenEmbeddings, stored: frozenset[str]) -> list[str]:
    """Make the modules that transformers ties to a quantized input embedding share its codes.

    transformers ties by parameter (``lm_head.weight = embed.weight``), which an `Int8Embedding` has not:
    those ties are taken out of the model's ``all_tied_weights_keys``, and each tied module the
    checkpoint does not store on its own becomes a `TiedInt8Head` (the output head) or a
    `TiedInt8Embedding` (T5's ``encoder.embed_tokens``). Returns the modules so replaced."""
    if vocab.input is None or not isinstance(model.get_submodule(vocab.input), Int8Embedding):
        return []
    source = model.get_submodule(vocab.input)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = NameMap(frozenset(k for k, _ in model.named_modules()), getattr(model, "base_model_prefix", "") or "")
    stored_modules = {names.model_name(n.rpartition(".")[0]) for n in stored}
    shared = []
    for target in [t for t, s in tied.items() if s == f"{vocab.input}.weight"]:
        del tied[target]
        module = target.rpartition(".")[0]
        if module in stored_modules:  # stored on its own (an untied head): loaded as it is
            continue
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if module == vocab.head:
            bias = getattr(old, "bias", None)
            new = TiedInt8Head(source, None if bias is None else torch.zeros_like(bias, device="cpu"), dtype=source._compute_dtype)
        else:
            new = TiedInt8Embedding(source, dtype=source._compute_dtype)
        setattr(parent, child, new)
        shared.append(module)
    return shared


# --------------------------------------------------------------------------------------------
# load()


def resolve_folder(path_or_repo: str | Path, revision: str | None = None, token: str | bool | None = None) -> Path:
    """A local checkpoint folder as is, else a Hub repo id downloaded with ``snapshot_download``."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceNotFound(f"{path_or_repo} is a file; int8.load takes a checkpoint folder or a Hub repo id")
        return path.resolve()
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text.strip():
        raise SourceNotFound(f"folder {path_or_repo} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        got = snapshot_download(
            text, revision=revision, token=token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"],
        )
    except RepositoryNotFoundError:
        raise SourceNotFound(f"{text} is neither a local folder nor a Hub repo you can access",
                             "Check the spelling; for a private repo log in with `hf auth login` or pass a token.") from None
    except RevisionNotFoundError:
        raise SourceNotFound(f"{text} has no revision {revision!r}") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        from ..errors import HubError

        raise HubError(f"could not download {text}: {e}", "Check your connection (and HF_ENDPOINT), then retry.") from None
    return Path(got)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config) -> torch.dtype:
    """The compute dtype: as asked; by default float32 on CPU, the checkpoint's dtype on a GPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise Int8Error(f"dtype {dtype} is not a float dtype int8.load computes in", "Use fp32, fp16 or bf16.")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32  # CPUs without bf16 units multiply fp32 many times faster
        saved = getattr(config, "dtype", None)
        if isinstance(saved, str):
            saved = torch_dtype(FROM_TORCH_NAME[saved]) if saved in FROM_TORCH_NAME else None
        return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16
    return torch_dtype(parse_dtype(dtype))


def load(
    path_or_repo: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    attn_implementation: str | None = None,
    kernel: str | Kernel = "auto",
):
    """Load an int8 checkpoint (a folder `int8 convert` wrote, or a Hub repo id) as a transformers model.

    The model class comes from the config (causal LM or seq2seq). Every layer
    stored as int8 becomes an `Int8Linear`: codes and scales stay in memory as
    int8 (+ scales), de-quantized block-wise just in time for each
    multiplication. Everything else loads as transformers loads it (layers a
    model keeps in fp32, such as T5's ``wo``, stay in fp32).

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default: a GPU when there
    is one. ``dtype``: the compute dtype (``"fp32"``, ``"bf16"``, ``"fp16"``
    or a torch dtype); default float32 on CPU and the checkpoint's dtype on a
    GPU. ``kernel``: how the int8 layers multiply on a GPU: ``"auto"`` (the
    fused Triton kernel on CUDA when triton is installed, up to 128 tokens per call;
    beyond, Triton's one-pass de-quantization and cuBLAS; else de-quantizing),
    ``"triton"`` (the fused kernel, or an error where it cannot run) or
    ``"dequantize"``; ``model.int8_kernel`` and a log line (logger
    ``int8.runtime``, level INFO) say which one runs. Raises
    `int8.errors.Int8Error` for every problem with the input.
    """
    from ..hf import load_config, load_model

    kernel = resolve_kernel(kernel)
    folder = resolve_folder(path_or_repo, revision=revision, token=token)
    if not (folder / "config.json").is_file():
        raise NoWeightsFound(f"{folder} has no config.json", "int8.load reads the folders that `int8 convert` writes.")
    try:
        config = load_config(folder)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        raise UnsupportedModel(f"transformers cannot read {folder / 'config.json'}: {e}") from None
    qc = getattr(config, "quantization_config", None)
    groups = check_quantization_config(qc, folder)
    specs = quantized_layers(folder, groups)
    dev = resolve_device(device)
    check_kernel(kernel, dev)
    compute = resolve_dtype(dtype, dev, config)
    cls = model_class_for(config)

    _register()
    qc_dict = qc if isinstance(qc, dict) else qc.to_dict()
    # transformers builds the quantizer from this dict (see `_register`).
    config.quantization_config = {"quant_method": QUANT_METHOD, "checkpoint_config": qc_dict, "layers": specs,
                                  "stored": frozenset(_headers(folder))}
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = load_model(
            cls, folder, config=config, dtype=compute, device_map={"": dev}, output_loading_info=True, **kwargs
        )
    except Int8Error:
        raise
    except (ValueError, OSError, RuntimeError) as e:
        raise CorruptCheckpoint(f"transformers could not load {folder}: {e}") from None
    int8_names = {n for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Embedding))}
    missing = sorted(k for k in info.get("missing_keys", ()) if k.rpartition(".")[0] in int8_names)
    if missing:
        raise CorruptCheckpoint(f"{folder} lacks int8 tensors the model needs, e.g. {', '.join(missing[:3])}",
                                "The download is incomplete or the index is wrong: fetch the checkpoint again.")
    if len(int8_names) != len(specs):
        raise CorruptCheckpoint(f"{len(specs)} int8 layers in the checkpoint but {len(int8_names)} in the model")
    use_kernel(model, kernel, dev)
    model.eval()
    return model


def resolve_kernel(kernel: str | Kernel) -> Kernel:
    try:
        return Kernel(kernel)
    except ValueError:
        raise Int8Error(f"unknown kernel {kernel!r}", "Use kernel='auto', 'triton' or 'dequantize'.") from None


def check_kernel(kernel: Kernel, device: torch.device) -> None:
    """``kernel="triton"`` must be able to run on ``device``."""
    if kernel == Kernel.TRITON and not triton_ready(device.type, kernel):
        raise Int8Error(f"kernel='triton' asked for on {device}, but it cannot run there: "
                        f"{triton_unavailable_reason(device.type)}",
                        "The fused kernel needs a CUDA GPU and triton (bundled with CUDA builds of torch; "
                        "else pip install triton). Use kernel='auto' to fall back to de-quantizing.")


def use_kernel(model: torch.nn.Module, kernel: Kernel, device: torch.device) -> str:
    """Set ``kernel`` on every `Int8Linear` of ``model``; record and log the path that runs."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for m in [*layers, *(e for e in model.modules() if isinstance(e, Int8Embedding))]:
        m.kernel = kernel
    path = "triton" if triton_ready(device.type, kernel) else "dequantize"
    model.int8_kernel = path
    if path == "triton":
        log.info("int8.load: %d int8 layers on %s run the fused Triton kernel", len(layers), device)
    else:
        why = "asked for" if kernel == Kernel.DEQUANTIZE else triton_unavailable_reason(device.type)
        log.info("int8.load: %d int8 layers on %s de-quantize before each matmul (%s)", len(layers), device, why)
    return path
