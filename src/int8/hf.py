"""What int8 knows about transformers models, and the one way int8 asks transformers for them.

int8 never runs code that comes with a model. transformers would import a
folder's (or another Hub repo's) ``*.py`` files for a config or tokenizer that
names them in ``auto_map``, and for ``trust_remote_code=None`` it even asks on
stdin ("Do you wish to run the custom code? [y/N]"), so a "y" piped into a CI
job would run them. Every config, tokenizer and model int8 loads goes through
here: the folder's ``config.json`` and ``tokenizer_config.json`` are read
first and a model that needs remote code (an ``auto_map``, or a
``model_type`` transformers does not know) is refused with
`int8.errors.UnsupportedModel` before transformers sees it; and
``trust_remote_code=False`` is passed on every call regardless.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CorruptCheckpoint, UnsupportedModel, UsageError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
REMOTE_HINT = "int8 never runs code shipped with a model: use a model whose architecture is built into transformers."


def read_json_object(path: Path, *, what: str | None = None) -> dict[str, Any]:
    """A JSON file that must hold an object; `CorruptCheckpoint` (exit 2) otherwise."""
    path = Path(path)
    label = what or path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{label} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    except ValueError as e:
        raise CorruptCheckpoint(f"{label} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{label} holds a JSON {_json_kind(data)}, not an object")
    return data


def _json_kind(value: Any) -> str:
    return {type(None): "null", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def known_model_types() -> frozenset[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return frozenset(CONFIG_MAPPING_NAMES)


def _known_model_type(model_type: str) -> bool:
    """In int8's architecture table (no import of transformers' config registry, which imports torch) or transformers'."""
    from .architectures import ARCHITECTURES

    return model_type in ARCHITECTURES or model_type in known_model_types()


def remote_code_problem(folder: Path) -> str | None:
    """Why loading ``folder`` would need code from a model repo (None: it would not)."""
    folder = Path(folder)
    for name in (CONFIG_NAME, TOKENIZER_CONFIG_NAME):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # unreadable: the caller's own reading says why
        if not isinstance(data, dict):
            continue
        if "auto_map" in data:
            return f"{name} has an auto_map: loading it needs custom code from the model repo"
        if name == CONFIG_NAME:
            model_type = data.get("model_type")
            if model_type is not None and (not isinstance(model_type, str) or not _known_model_type(model_type)):
                return f"{name}: model_type {model_type!r} is not an architecture transformers knows"
    return None


def refuse_remote_code(folder: Path) -> None:
    """`UnsupportedModel` when ``folder``'s config or tokenizer would need code from a model repo;
    `int8.errors.UnsafePath` when a file transformers would read there (config, tokenizer, generation
    settings: any file at the top of the folder) is a link out of it (`int8.paths.inside`)."""
    from .paths import inside

    folder = Path(folder)
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        if entry.is_symlink():
            inside(folder, entry.name)
    why = remote_code_problem(folder)
    if why:
        raise UnsupportedModel(f"{Path(folder).name}: {why}", REMOTE_HINT)


def load_config(folder: Path, **kwargs):
    """``AutoConfig.from_pretrained(folder)``, never with remote code."""
    from transformers import AutoConfig

    refuse_remote_code(folder)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except Exception as e:  # transformers' own validation (wrong types, unknown values): the file is what is wrong
        text = " ".join(str(e).split())
        raise CorruptCheckpoint(
            f"transformers cannot read {Path(folder).name}/{CONFIG_NAME} ({type(e).__name__}: {text[:300]})",
            "Fix config.json (or fetch it again): its fields must have the types transformers expects.",
        ) from None


def load_tokenizer(folder: Path, **kwargs):
    """``AutoTokenizer.from_pretrained(folder)``, never with remote code."""
    from transformers import AutoTokenizer

    refuse_remote_code(folder)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)


def load_model(cls, folder: Path, **kwargs):
    """``cls.from_pretrained(folder, ...)`` for a class transformers ships, never with remote code, and never
    with Hub kernels (``use_kernels=False``): transformers 5.25 turns them on by default, which would fetch
    compiled code from the Hub into the process and, on the ``meta`` device, fails to load at all."""
    refuse_remote_code(folder)
    return cls.from_pretrained(folder, trust_remote_code=False, use_kernels=False, **kwargs)


def model_class(config) -> type:
    """The model class transformers ships for ``config``: from ``architectures``, else the Auto mappings.

    Only concrete `PreTrainedModel` subclasses of transformers itself count (an
    ``architectures`` entry naming an Auto class or anything else is passed over),
    so no class is ever resolved through remote code."""
    import transformers
    from transformers import PreTrainedModel

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.__module__.startswith("transformers."):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM):
        try:
            return auto._model_mapping[type(config)]
        except (KeyError, ValueError):
            continue
    archs = getattr(config, "architectures", None)
    raise UnsupportedModel(
        f"transformers has no causal-LM or seq2seq class for model type {getattr(config, 'model_type', None)!r}"
        + (f" (architectures {archs})" if archs else ""),
        "int8 converts models that transformers can build without trust_remote_code.",
    )


# --------------------------------------------------------------------------- the model's structure


class WeightLayout(str, Enum):
    """How a layer int8 quantizes stores its weight (the value is what reports and verify results say)."""

    LINEAR = "linear"  # nn.Linear: (out_features, in_features)
    CONV1D = "conv1d"  # transformers' GPT-2 style Conv1D: (in_features, out_features)
    EMBEDDING = "embedding"  # nn.Embedding (`int8 convert --embeddings int8`): (num_embeddings, embedding_dim), as LINEAR


def weight_layout(module) -> WeightLayout | None:
    """`WeightLayout` of a module whose weight int8 quantizes: a plain ``nn.Linear`` (not a subclass with
    its own forward) or transformers' ``Conv1D``; None for anything else."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear) and type(module).__name__ == "Linear":
        return WeightLayout.LINEAR
    if isinstance(module, Conv1D):
        return WeightLayout.CONV1D
    return None


def stored_layout(module) -> WeightLayout | None:
    """`weight_layout`, and `WeightLayout.EMBEDDING` for an ``nn.Embedding`` (whose weight int8 quantizes only
    with ``--embeddings int8``): how a module that a checkpoint may store packed holds its weight."""
    import torch

    layout = weight_layout(module)
    if layout is None and isinstance(module, torch.nn.Embedding):
        return WeightLayout.EMBEDDING
    return layout


@dataclass(frozen=True)
class TokenEmbeddings:
    """Where a model keeps its vocabulary matrices: the input token embedding, the output head, and which
    modules transformers ties to the input embedding's weight (T5's ``encoder.embed_tokens``; BLOOM's,
    SmolLM2's, T5's ``lm_head`` when the head is tied)."""

    input: str | None = None  # the module `get_input_embeddings` returns (an nn.Embedding), by name
    head: str | None = None  # the module `get_output_embeddings` returns, by name
    copies: frozenset[str] = frozenset()  # embedding modules whose weight is tied to the input embedding's
    head_tied: bool = False  # the head's weight is tied to the input embedding's (stored once, as the embedding)

    @classmethod
    def of(cls, model) -> TokenEmbeddings:
        import torch

        def name_of(get: str) -> str | None:
            module = getattr(model, get)() if hasattr(model, get) else None
            return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None

        inp, head = name_of("get_input_embeddings"), name_of("get_output_embeddings")
        if inp is None or not isinstance(model.get_submodule(inp), torch.nn.Embedding):
            return cls(head=head)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        onto = {t.rpartition(".")[0] for t, s in tied.items() if s == f"{inp}.weight" and t.endswith(".weight")}
        modules = dict(model.named_modules())
        copies = frozenset(n for n in onto if n != head and isinstance(modules.get(n), torch.nn.Embedding))
        return cls(inp, head, copies, head is not None and head in onto)


def out_in(shape: tuple[int, ...], layout: WeightLayout | str) -> tuple[int, int]:
    """(out_features, in_features) of a 2-D weight stored in ``layout``."""
    return (shape[1], shape[0]) if layout == WeightLayout.CONV1D else (shape[0], shape[1])


def build_meta_model(config):
    """The model class of ``config`` built on the meta device: the structure, no weights, no memory."""
    import torch

    cls = model_class(config)
    try:
        with torch.device("meta"):
            return cls._from_config(config)
    except Exception as e:  # a config that the class rejects is the user's checkpoint problem
        raise UnsupportedModel(f"{cls.__name__} cannot be built from this config.json: {e}") from None


@dataclass(frozen=True)
class NameMap:
    """Checkpoint tensor names onto the model's: checkpoints may store names with or without the model
    class's ``base_model_prefix`` (``transformer.`` for BLOOM), and transformers loads either."""

    keys: frozenset[str]
    prefix: str = ""

    @classmethod
    def of(cls, model) -> NameMap:
        return cls(frozenset(model.state_dict(keep_vars=True)), getattr(model, "base_model_prefix", "") or "")

    def model_name(self, name: str) -> str:
        """``name`` as the model names it (the prefix added or stripped when that gives one of its keys)."""
        if name in self.keys or not self.prefix:
            return name
        if f"{self.prefix}.{name}" in self.keys:
            return f"{self.prefix}.{name}"
        if name.startswith(self.prefix + ".") and name[len(self.prefix) + 1 :] in self.keys:
            return name[len(self.prefix) + 1 :]
        return name


# --------------------------------------------------------------------------- dtypes and devices


DTYPE_ALIASES = {
    "fp32": "F32", "float32": "F32", "float": "F32",
    "fp16": "F16", "float16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
}
"""What users may type for a floating dtype -> its safetensors name."""
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
"""safetensors name -> the name transformers writes in config.json's ``dtype``."""
FROM_TORCH_NAME = {v: k for k, v in TORCH_NAMES.items()}


def parse_dtype(name: str) -> str:
    """'fp16' / 'bf16' / 'fp32' (or torch names) -> safetensors dtype name (``F16``...)."""
    try:
        return DTYPE_ALIASES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}", "Use fp16, bf16 or fp32.") from None


def torch_dtype(name: str):
    """A safetensors dtype name (``F32``, ``I8``...) -> the torch dtype."""
    from .formats.safetensors import DTYPES

    return DTYPES[name]


GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")
"""Files a GPU driver puts on a Linux machine (NVIDIA, ROCm, WSL2): with none of them, CUDA cannot be available."""


def gpu_possible() -> bool:
    """Whether this machine may have a GPU torch can use; False only where it provably has none (a Linux machine
    without any GPU driver's device node), so that ``--device auto`` on such a machine need not import torch."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in GPU_DEVICE_NODES)


def device_name(device) -> str:
    """The device to run on, as torch names it: 'auto' (or None) picks CUDA when there is a GPU; 'cpu',
    'cuda', 'cuda:1' are taken as said and checked (`UsageError`). torch is imported only when a GPU may be
    there (`gpu_possible`) or one is asked for."""
    if device is None or device == "auto":
        if not gpu_possible():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device) == "cpu":
        return "cpu"
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}", "Use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device}: no CUDA GPU is available", "Use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device}: there are only {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UsageError(f"device {device}: int8 runs on cpu or cuda")
    return str(dev)


def resolve_device(device) -> torch.device:
    """`device_name` as a torch device."""
    import torch

    return torch.device(device_name(device))


# --------------------------------------------------------------------------- running a model layer by layer


@dataclass(frozen=True)
class Stack:
    """A stack of identical blocks that one hidden state runs through, and the norm after it."""

    blocks: str  # the ModuleList of blocks ("transformer.h")
    norm: str  # the final norm of the stack ("transformer.ln_f")
    carries: tuple[tuple[int, int], ...] = ()  # (output index, argument index): what a block hands the next (T5's biases)


@dataclass(frozen=True)
class Split:
    """How a model runs as stages: the stacks in order (encoder then decoder), then the head."""

    stacks: tuple[Stack, ...]
    head: str = "lm_head"

    @property
    def seq2seq(self) -> bool:
        return len(self.stacks) == 2


_CAUSAL_MODEL = Split((Stack("model.layers", "model.norm"),))
_T5 = Split((
    Stack("encoder.block", "encoder.final_layer_norm", carries=((1, 2),)),
    Stack("decoder.block", "decoder.final_layer_norm", carries=((1, 2), (2, 5))),
))
SPLITS: dict[str, Split] = {
    "gptj": Split((Stack("transformer.h", "transformer.ln_f"),)),
    "bloom": Split((Stack("transformer.h", "transformer.ln_f"),)),
    **{t: _CAUSAL_MODEL for t in ("llama", "mistral", "qwen2", "qwen3", "olmo2")},
    **{t: _T5 for t in ("t5", "mt5")},
}
"""Model types that `int8.verify.stream` runs a block at a time: the blocks see only their hidden states and
what the first block was given (masks, positions), so each block can run on its own."""


def split_of(config) -> Split | None:
    """How a model of this config runs layer by layer (None: it runs whole only).

    A model whose layers differ in kind (``layer_types``: sliding-window and full attention mixed) is not
    split: each kind of layer is handed its own mask."""
    if len(set(getattr(config, "layer_types", None) or ())) > 1:
        return None
    return SPLITS.get(getattr(config, "model_type", None) or "")


def bnb_default_skips(model) -> list[str]:
    """The ``modules_to_not_convert`` patterns transformers' bitsandbytes quantizer uses for ``model`` when
    ``llm_int8_skip_modules`` is not given: its output embedding, both sides of every tied weight, the
    module of its last parameter (``get_keys_to_not_convert``), and ``_keep_in_fp32_modules`` (T5's ``wo``).
    Asked of the installed transformers itself, so int8 keeps exactly what ``load_in_8bit`` keeps."""
    from transformers.quantizers.base import HfQuantizer

    return sorted(HfQuantizer.get_modules_to_not_convert(model, None, list(getattr(model, "_keep_in_fp32_modules", None) or [])))
