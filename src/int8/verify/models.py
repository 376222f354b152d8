"""Building the models that the loading and fidelity checks run: the original, the converted, the reference.

* The converted checkpoint is loaded by stock transformers with
  compressed-tensors, as its users will load it: run-compressed (the linear
  layers hold int8 codes) for every architecture that transformers can build
  that way; T5-family models de-quantized at load (T5's code reads
  ``.weight``, which a run-compressed layer does not have). GPT-2 style Conv1D
  layers are not loadable by compressed-tensors at all: for them int8 builds
  the model itself from config.json with the de-quantized weights
  (``codes x scale``, transposed back to Conv1D's layout).
* The original is loaded by stock transformers from its own folder.
* The *reference* is the original, modified in place after its own logits have
  been taken: every tensor the checkpoint keeps unquantized is rounded to the
  dtype the checkpoint stores it in (so that rounding counts the same on both
  sides), and every weight the checkpoint quantizes gets uniform noise of
  +-scale/2, ``scale`` being absmax/127 of its own block: the size of the error
  an ideal int8 rounding makes, without its values. One draw of that noise is
  itself a random figure (on 500 tokens, draws of SmolLM2's KL spread by about
  +-10%), so the reference is `NOISE_SEEDS` draws, one after the other on the
  same model (`Reference`), and the thresholds are held to the least favourable
  of them. It is computed from the original alone (the checkpoint under test
  only says which weights are quantized, in which blocks, and in which dtypes),
  so a wrong checkpoint cannot make its own bar easier. The fidelity thresholds
  are relative to it.

Only one model is in memory at a time. Logits are computed window by window
(see `int8.verify.sample`); the original's log-probabilities are kept on the
CPU in float32 to compare the others with, which is why the number of scored
tokens is capped so that they take at most `LOGPROB_BUDGET` bytes.
"""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader, find_checkpoint
from ..formats.safetensors import DTYPES
from ..hf import WeightLayout, torch_dtype
from .layout import Layout
from .sample import Window

T5_FAMILY = {"t5", "mt5", "umt5", "longt5"}
"""Model types whose transformers code cannot run with run-compressed linear layers."""

LOGPROB_BUDGET = 1 << 30
"""Bytes of the original's float32 log-probabilities kept for comparison (caps the scored tokens)."""

NOISE_SEEDS = (0, 1, 2)
"""The reference's noise draws (deterministic): each costs one forward pass over the sample."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' and compressed-tensors' logging, warnings and progress bars."""
    import warnings

    import transformers

    log = transformers.utils.logging
    level = log.get_verbosity()
    bars = log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compute_dtype(device: torch.device, layout: Layout) -> torch.dtype:
    """The dtype both models run in.

    float32 whenever it fits: every stored dtype widens to it exactly, so the
    figures measure the checkpoint and not the arithmetic. On a GPU whose free
    memory could not hold the model in float32 (with room for activations),
    the checkpoint's own dtype (half the memory)."""
    if device.type == "cpu":
        return torch.float32
    report = layout.report
    params = report.totals.params_quantized + report.totals.params_kept if report else 0
    free, _ = torch.cuda.mem_get_info(device)
    if params and 4 * params <= 0.6 * free:
        return torch.float32
    return torch_dtype(layout.dtype) if layout.dtype in ("F16", "BF16") else torch.float32


class LoadMode(Enum):
    """How the converted checkpoint is loaded for the loading and fidelity checks."""

    COMPRESSED = "run-compressed"  # stock transformers + compressed-tensors, int8 codes in the layers
    DEQUANTIZED = "de-quantized at load"  # stock transformers + compressed-tensors, weights de-quantized
    INT8 = "int8's de-quantized build"  # compressed-tensors cannot load it (Conv1D): int8 builds the model
    INT8_LOAD = "int8.load"  # quantized embeddings: stock run-compressed loading fails on them; int8.load runs them


def load_mode(layout: Layout) -> LoadMode:
    """How stock transformers loads this checkpoint (`LoadMode.INT8`: not at all)."""
    if layout.embeddings:
        return LoadMode.INT8_LOAD
    if layout.conv1d:
        return LoadMode.INT8
    if (layout.model_type or "") in T5_FAMILY:
        return LoadMode.DEQUANTIZED
    return LoadMode.COMPRESSED


def _placement(device: torch.device) -> dict:
    return {} if device.type == "cpu" else {"device_map": {"": str(device)}}


def load_original(folder: Path, dtype: torch.dtype, device: torch.device):
    """The original model, by stock transformers, from its own folder and config."""
    from ..hf import load_config, load_model
    from ..hf import model_class as model_class_for

    with quiet():
        config = load_config(folder)
        if getattr(config, "quantization_config", None):
            raise ValueError(f"{folder} is itself quantized: compare with the full-precision original")
        cls = model_class_for(config)
        model = load_model(cls, folder, dtype=dtype, **_placement(device))
    return model.eval()


def load_converted(folder: Path, mode: LoadMode, dtype: torch.dtype, device: torch.device):
    """(model, loading info) by stock transformers + compressed-tensors."""
    from transformers import CompressedTensorsConfig

    from ..hf import load_config, load_model
    from ..hf import model_class as model_class_for

    with quiet():
        qc = CompressedTensorsConfig(dequantize=mode is not LoadMode.COMPRESSED)
        config = load_config(folder)
        cls = model_class_for(config)
        model, info = load_model(
            cls, folder, quantization_config=qc, dtype=dtype, output_loading_info=True, **_placement(device)
        )
    return model.eval(), info


def load_int8(folder: Path, dtype: torch.dtype, device: torch.device):
    """The converted model as `int8.load` runs it (int8 codes kept, de-quantized per multiplication)."""
    from ..runtime.loader import load

    with quiet():
        return load(folder, device=device, dtype=dtype, kernel="dequantize")


def build_dequantized(layout: Layout, dtype: torch.dtype, device: torch.device):
    """The converted model built by int8 from config.json with de-quantized weights (for Conv1D models).

    Returns (model, missing keys)."""
    from ..formats.compressed_tensors import unpack_codes
    from ..hf import load_config
    from ..hf import model_class as model_class_for
    from ..quantize import dequantize

    with quiet():
        config = load_config(layout.folder)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        cls = model_class_for(config)
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype)
    state = {}
    with CheckpointReader(find_checkpoint(layout.folder)) as reader:
        stored = {t.name: t for t in reader.tensors}
        for name in layout.kept:
            state[name] = reader.read(stored[name])
        for q in layout.quantized.values():
            codes = unpack_codes(reader.read(stored[q.packed.name]), q.in_features)
            w = dequantize(codes, reader.read(stored[q.scale.name]), q.group, torch.float32)
            state[f"{q.module}.weight"] = w.t().contiguous() if q.layout == WeightLayout.CONV1D else w
    result = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = set(dict(getattr(model, "all_tied_weights_keys", None) or {}))
    missing = [k for k in result.missing_keys if k not in tied]
    return model.eval(), missing


def build_skeleton(layout: Layout):
    """The converted checkpoint's model class built from its config.json with every parameter on ``meta``
    (buffers real: rotary tables and the like are computed, not stored), in float32: what
    `int8.verify.stream` fills a stage at a time."""
    from accelerate import init_empty_weights

    from ..hf import load_config
    from ..hf import model_class as model_class_for

    with quiet():
        config = load_config(layout.folder)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        cls = model_class_for(config)
        with init_empty_weights():
            model = cls._from_config(config, dtype=torch.float32)
    return model.eval()


def outputs(model, windows: list[Window], device: torch.device) -> Iterator[tuple[torch.Tensor, bool]]:
    """(float32 CPU output of the scored positions, whether it is logits) of each window, one at a time.

    A language model gives its logits; a model without a head (an encoder) its
    last hidden state, which the forward check can still hold to finiteness."""
    with torch.inference_mode(), quiet():
        for w in windows:
            inputs = {k: v.to(device) for k, v in w.inputs.items()}
            try:
                out = model(**inputs, use_cache=False)
            except TypeError:  # a forward without use_cache
                out = model(**inputs)
            lg = getattr(out, "logits", None)
            if lg is not None:
                yield lg[0, w.scored].float().cpu(), True
            else:
                yield out[0][0, w.scored].float().cpu(), False


def logits(model, windows: list[Window], device: torch.device) -> Iterator[torch.Tensor]:
    """Float32 CPU logits of the scored positions of each window, one window at a time."""
    for out, is_logits in outputs(model, windows, device):
        if not is_logits:
            raise NotALanguageModel(f"{type(model).__name__} gives no next-token logits")
        yield out


class NotALanguageModel(ValueError):
    """The model has no language-modelling head: there are no predictions to compare."""


class Reference:
    """The loaded original turned into the reference in place, one noise draw at a time (see the module docstring).

    Uses nothing of the checkpoint under test but its plan: which weights are
    quantized (in blocks of what size, scales in what dtype) and in which dtype
    the others are stored. Building it rounds the kept tensors and records each
    quantized weight's ideal scales (one float32 per block: 1/block of the
    weight's size); `draw` then replaces the noise of the previous draw by that
    of another seed, the previous one re-generated from its seed and taken off,
    so no copy of the weights is kept (the weights drift by a float32 rounding
    per draw, some 1e-7 of the noise's size)."""

    def __init__(self, model, layout: Layout):
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        self.unmatched: list[str] = []  # names that found no parameter of the original (a wrong original)
        self._device = next(iter(params.values())).device
        self._seed: int | None = None
        self._layers: list[tuple[torch.Tensor, bool, int, list[tuple[int, int, torch.Tensor]], int]] = []
        scale_dtype = torch_dtype(layout.scale_dtype or "F32")
        with torch.no_grad():
            for name, t in layout.kept.items():
                p = params.get(name)
                if p is None or tuple(p.shape) != tuple(t.shape):
                    self.unmatched.append(name)
                    continue
                if p.is_floating_point() and t.dtype in DTYPES:
                    p.copy_(p.to(torch_dtype(t.dtype)).to(p.dtype))  # rounded as the checkpoint stores it
            for index, q in enumerate(layout.quantized.values()):
                p = params.get(f"{q.module}.weight")
                conv1d = q.layout == WeightLayout.CONV1D
                want = (q.in_features, q.out_features) if conv1d else (q.out_features, q.in_features)
                if p is None or tuple(p.shape) != want:
                    self.unmatched.append(f"{q.module}.weight")
                    continue
                w = p.t() if conv1d else p
                self._layers.append((p, conv1d, q.group, ideal_scales(w, q.group, scale_dtype), index))

    def draw(self, seed: int) -> None:
        """Make the model the original plus the noise drawn with ``seed`` (in place of the previous draw's)."""
        with torch.no_grad():
            for p, conv1d, g, chunks, index in self._layers:
                in_features = p.shape[0] if conv1d else p.shape[1]
                new = layer_noise(chunks, in_features, g, seed, index, self._device)
                old = None if self._seed is None else layer_noise(chunks, in_features, g, self._seed, index, self._device)
                for r0, r1, noise in new:
                    if old is not None:
                        noise = noise - next(old)[2]
                    if conv1d:
                        p[:, r0:r1].add_(noise.t().to(p.dtype))
                    else:
                        p[r0:r1].add_(noise.to(p.dtype))
        self._seed = seed


def ideal_scales(w: torch.Tensor, g: int, scale_dtype: torch.dtype) -> list[tuple[int, int, torch.Tensor]]:
    """absmax/127 of each block of ``w`` (out, in), rounded to ``scale_dtype``, by row chunks (r0, r1, scales)."""
    out_features, in_features = w.shape
    chunks = []
    step = _rows_per_step(in_features)
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        blocks = torch.nn.functional.pad(w[r0:r1].float(), (0, (-in_features) % g)).view(r1 - r0, -1, g)
        chunks.append((r0, r1, (blocks.abs().amax(-1) / 127).to(scale_dtype).float()))
    return chunks


def layer_noise(chunks, in_features: int, g: int, seed: int, index: int, device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The reference noise of quantized layer number ``index`` for draw ``seed``: uniform in +-scale/2, by row chunks.

    Each layer draws from a generator of its own (``seed`` and ``index``), so the noise of a layer is the
    same whether the whole model is in memory or its layers come one at a time (`int8.verify.stream`)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    for r0, r1, scale in chunks:
        half = scale.to(device).repeat_interleave(g, dim=1)[:, :in_features] / 2
        yield r0, r1, _uniform(half.shape, gen) * half


def _uniform(shape, gen: torch.Generator) -> torch.Tensor:
    """Uniform in [-1, 1), from ``gen``."""
    return torch.rand(shape, generator=gen, device=gen.device) * 2 - 1


def _rows_per_step(in_features: int) -> int:
    return max(1, (8 << 20) // max(1, in_features))


def max_positions(config) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_cap(vocab: int) -> int:
    """Most tokens whose float32 log-probabilities fit `LOGPROB_BUDGET`."""
    return max(64, LOGPROB_BUDGET // (4 * max(1, vocab)))
