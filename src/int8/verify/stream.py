"""The model-level fidelity run a block at a time, in memory flat in the model's size.

The whole-model run (`int8.verify.phases`) holds the original in float32, then
the converted model: about 1 GB + 1.3x the float32 size. This run instead
builds the model once on the ``meta`` device (no weights) and goes through it
stage by stage: the embeddings, each block of each stack (T5: the encoder's,
then the decoder's), each stack's final norm, the head. For each stage the
weights are read from the memory-mapped checkpoints and put into the skeleton,
every model runs its hidden states of every sample window through it, and the
weights go back to ``meta``. The models are five streams of hidden states:

* the original (its own weights),
* the reference, one stream per noise draw (`int8.verify.models.NOISE_SEEDS`):
  the original's kept tensors rounded as the checkpoint stores them, each
  quantized weight plus the same noise as the whole-model reference draws
  (`int8.verify.models.layer_noise`, one generator per layer and draw),
* the converted checkpoint, its weights de-quantized as the stock loader
  decodes them (``q * scale`` in the scales' dtype).

So each weight is read once, the original and the converted never sit in
memory whole, and at most two copies of one stage are held (three of the head).
What a block is given besides its hidden state (masks, positions, rotary
tables, ALiBi) is what the model's own forward hands its first block: captured
there by stopping the forward at block 0 (`_Catcher`); what a block hands the
next (T5's position biases) is `int8.hf.Stack.carries`. The figures are those
of the whole-model run to float rounding: the same tokens, windows and noise,
the same modules' forward code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..checkpoint import CheckpointReader, find_checkpoint
from ..formats.compressed_tensors import unpack_codes
from ..hf import Split, WeightLayout, torch_dtype
from ..quantize import dequantize
from .fidelity import Agreement, _Original
from .layout import Layout
from .models import NOISE_SEEDS, ideal_scales, layer_noise, quiet
from .sample import Window

HEAD_ROWS = 256
"""Scored positions whose logits are computed at once (per model): bounds the head's activations."""


class _Stop(Exception):
    """Raised by `_Catcher` to end a forward at the first block."""


class _Catcher(torch.nn.Module):
    """Stands in for a stack's first block: records what the model's forward hands it, then stops the forward."""

    def __init__(self):
        super().__init__()
        self.seen: tuple[list, dict] | None = None

    def forward(self, *args, **kwargs):
        self.seen = (list(args), dict(kwargs))
        raise _Stop


@dataclass
class Pass:
    """One model run through the stages: the arguments of its next block call, window by window."""

    name: str
    calls: list[tuple[list, dict]] = field(default_factory=list)
    encoded: list[torch.Tensor] = field(default_factory=list)  # seq2seq: the encoder's output, window by window


@dataclass(frozen=True)
class Figures:
    """What the streamed run found: the converted model's and each reference draw's agreement with the original."""

    converted: Agreement
    references: tuple[Agreement, ...]
    bad_windows: tuple[str, ...]  # windows whose converted logits are not all finite


class OriginalMismatch(ValueError):
    """The original lacks a tensor the model needs, or has it in another shape: it is not this model's original."""


class _Sources:
    """Each stage's weights as each model has them, read from the two checkpoints."""

    def __init__(self, layout: Layout, model, orig: CheckpointReader | None, conv: CheckpointReader, dtype: torch.dtype,
                 device: torch.device):
        self.layout, self.dtype, self.device = layout, dtype, device
        self.orig_reader, self.conv_reader = orig, conv
        self.original = _Original(orig, layout) if orig is not None else None
        self.kept = {layout.model_name(n): t for n, t in layout.kept.items()}
        self.quantized = {f"{q.module}.weight": (i, q) for i, q in enumerate(layout.quantized.values())}
        self.stored = {t.name: t for t in conv.tensors}
        self.scale_dtype = torch_dtype(layout.scale_dtype or "F32")
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        self.aliases: dict[str, list[str]] = {}
        for a, b in (*tied.items(), *layout.tied.items()):
            self.aliases.setdefault(a, []).append(b)
            self.aliases.setdefault(b, []).append(a)

    def _names(self, name: str) -> tuple[str, ...]:
        return (name, *self.aliases.get(name, ()))

    def original_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            src = next((s for s in map(self.original.find, self._names(name)) if s is not None), None)
            if src is None:
                raise OriginalMismatch(f"it has no tensor {name}")
            if tuple(src.shape) != self.shapes[name]:
                raise OriginalMismatch(f"its {src.name} has shape {list(src.shape)}, the model's {list(self.shapes[name])}")
            out[name] = self.orig_reader.read(src).to(self.device, self.dtype)
        return out

    def rounded(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The original's weights with the kept tensors rounded to the dtype the checkpoint stores them in."""
        out = {}
        for name, w in weights.items():
            t = next((self.kept[n] for n in self._names(name) if n in self.kept), None)
            if t is not None and w.is_floating_point() and t.dtype in ("F16", "BF16", "F32", "F64"):
                w = w.to(torch_dtype(t.dtype)).to(w.dtype)
            out[name] = w
        return out

    def draws(self, rounded: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """The reference's weights for each noise draw in turn (`int8.verify.models.layer_noise`).

        Made as the whole-model `int8.verify.models.Reference` makes them, one copy updated in place (the
        previous draw's noise taken off, the next one's added), so that the weights are the same to the bit."""
        out = dict(rounded)
        layers = []
        for name, w in rounded.items():
            if name in self.quantized:
                index, q = self.quantized[name]
                conv1d = q.layout == WeightLayout.CONV1D
                copy = w.clone()
                out[name] = copy
                layers.append((copy.t() if conv1d else copy, q, index, ideal_scales(w.t() if conv1d else w, q.group,
                                                                                 self.scale_dtype)))
        previous = None
        for seed in NOISE_SEEDS:
            for p, q, index, chunks in layers:
                new = layer_noise(chunks, q.in_features, q.group, seed, index, self.device)
                old = None if previous is None else layer_noise(chunks, q.in_features, q.group, previous, index, self.device)
                for r0, r1, noise in new:
                    if old is not None:
                        noise = noise - next(old)[2]
                    p[r0:r1].add_(noise.to(p.dtype))
            previous = seed
            yield out

    def converted(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The converted checkpoint's weights: kept tensors as stored, quantized ones as the stock loader decodes them."""
        out = {}
        for name in names:
            if name in self.quantized:
                _, q = self.quantized[name]
                codes = unpack_codes(self.conv_reader.read(self.stored[q.packed.name]), q.in_features)
                scales = self.conv_reader.read(self.stored[q.scale.name])
                conv1d = q.layout == WeightLayout.CONV1D
                w = dequantize(codes, scales, q.group, torch.float32 if conv1d else scales.dtype)
                out[name] = (w.t() if conv1d else w).to(self.device, self.dtype)
                continue
            t = next((self.kept[n] for n in self._names(name) if n in self.kept), None)
            if t is None:
                raise ValueError(f"the checkpoint has no tensor {name}")
            out[name] = self.conv_reader.read(self.stored[t.name]).to(self.device, self.dtype)
        return out


def _install(model, weights: dict[str, torch.Tensor]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, w in weights.items():
        set_module_tensor_to_device(model, name, w.device, value=w)


def _release(model, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, "meta")


def _params_under(model, prefixes: tuple[str, ...]) -> list[str]:
    return [n for n, _ in model.named_parameters(remove_duplicate=False) if n.startswith(tuple(p + "." for p in prefixes))]


@dataclass(frozen=True)
class Stage:
    """One step of the run: the parameters it needs, and what it does to each pass."""

    what: str  # "embeddings", "transformer.h.3", "head", ...
    names: tuple[str, ...]
    run: Callable[[Pass], None]


def stages(model, split: Split, windows: list[Window], scored: Callable) -> list[Stage]:
    """The run's stages in order (see the module docstring).

    The head's ``run`` takes (pass, window index, first row) and hands ``scored(pass, logits, window, first row)``
    the logits of `HEAD_ROWS` scored positions from there."""
    everything = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    inner = tuple(s.blocks for s in split.stacks) + tuple(s.norm for s in split.stacks) + (split.head,)
    pre = tuple(n for n in everything if not n.startswith(tuple(p + "." for p in inner)))
    config = model.config
    out: list[Stage] = []
    for k, stack in enumerate(split.stacks):
        blocks = model.get_submodule(stack.blocks)
        out.append(Stage("embeddings" if k == 0 else "decoder embeddings", pre,
                         lambda p, k=k, blocks=blocks: _capture(model, split, blocks, windows, p, k)))
        for i, block in enumerate(blocks):
            names = tuple(_params_under(model, (f"{stack.blocks}.{i}",)))
            out.append(Stage(f"{stack.blocks}.{i}", names, lambda p, block=block, stack=stack: _through(block, stack, p)))
        norm = model.get_submodule(stack.norm)
        if k < len(split.stacks) - 1:
            names = tuple(_params_under(model, (stack.norm,)))
            out.append(Stage(stack.norm, names, lambda p, norm=norm: _encode(norm, p)))
    last = split.stacks[-1]
    norm, head = model.get_submodule(last.norm), model.get_submodule(split.head)
    scale = config.d_model ** -0.5 if split.seq2seq and getattr(config, "scale_decoder_outputs", False) else None
    names = tuple(_params_under(model, (last.norm, split.head)))
    out.append(Stage("head", names, lambda p, i, r0: _logits(norm, head, scale, windows[i], p, i, r0, scored)))
    return out


def _capture(model, split: Split, blocks, windows: list[Window], p: Pass, k: int) -> None:
    """What the model's own forward hands the first block of stack ``k``, window by window."""
    first = blocks[0]
    catcher = _Catcher()
    blocks[0] = catcher
    try:
        calls = []
        for i, w in enumerate(windows):
            try:
                if not split.seq2seq:
                    model(**w.inputs, use_cache=False)
                elif k == 0:
                    model.get_encoder()(input_ids=w.inputs["input_ids"], attention_mask=w.inputs["attention_mask"])
                else:
                    model.get_decoder()(input_ids=w.inputs["decoder_input_ids"], encoder_hidden_states=p.encoded[i],
                                        encoder_attention_mask=w.inputs["attention_mask"], use_cache=False)
            except _Stop:
                pass
            if catcher.seen is None:
                raise RuntimeError(f"{type(model).__name__}'s forward did not reach its first block")
            calls.append(catcher.seen)
            catcher.seen = None
        p.calls = calls
    finally:
        blocks[0] = first


def _through(block, stack, p: Pass) -> None:
    for args, kwargs in p.calls:
        out = block(*args, **kwargs)
        args[0] = out[0] if isinstance(out, tuple) else out
        for o, a in stack.carries:
            if isinstance(out, tuple) and len(out) > o and len(args) > a:
                args[a] = out[o]


def _encode(norm, p: Pass) -> None:
    p.encoded = [norm(args[0]) for args, _ in p.calls]
    p.calls = []


def _logits(norm, head, scale, w: Window, p: Pass, i: int, r0: int, scored: Callable) -> None:
    h = norm(p.calls[i][0][0])[0, w.scored][r0 : r0 + HEAD_ROWS]
    if scale is not None:
        h = h * scale
    scored(p, head(h).float().cpu(), i, r0)


def run(layout: Layout, split: Split, model, original_folder, windows: list[Window], dtype: torch.dtype,
        device: torch.device, bar=None) -> Figures:
    """The original, the reference draws and the converted model through ``model`` (a meta skeleton), stage by stage.

    Without an original (``original_folder`` None) the converted model runs alone, for the forward check."""
    windows = [Window({k: v.to(device) for k, v in w.inputs.items()}, w.targets, w.scored) for w in windows]
    if device.type != "cpu":  # the skeleton's buffers (rotary tables...) are real, on the CPU
        _install(model, {n: b.to(device) for n, b in model.named_buffers() if b.device.type != "meta"})
    original = Pass("original")
    refs = [Pass(f"reference {i + 1}") for i in range(len(NOISE_SEEDS))]
    conv = Pass("converted")
    converted = Agreement()
    drawn = [Agreement() for _ in NOISE_SEEDS]
    bad: dict[int, int] = {}
    pending: dict[tuple[int, int], torch.Tensor] = {}  # the original's log-probabilities of the chunk being scored

    def scored(p: Pass, logits: torch.Tensor, i: int, r0: int) -> None:
        targets = windows[i].targets[r0 : r0 + logits.shape[0]]
        if p is original:
            pending[(i, r0)] = torch.log_softmax(logits, dim=-1)
            return
        if p is conv:
            n_bad = int((~torch.isfinite(logits)).sum())
            if n_bad:
                bad[i] = bad.get(i, 0) + n_bad
            if original_folder is not None:
                converted.update(pending.pop((i, r0)), logits, targets)
            return
        drawn[refs.index(p)].update(pending[(i, r0)], logits, targets)

    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet())
        stack.enter_context(torch.inference_mode())
        o_reader = None if original_folder is None else stack.enter_context(CheckpointReader(find_checkpoint(original_folder)))
        c_reader = stack.enter_context(CheckpointReader(find_checkpoint(layout.folder)))
        src = _Sources(layout, model, o_reader, c_reader, dtype, device)
        plan = stages(model, split, windows, scored)
        passes = [conv] if original_folder is None else [original, *refs, conv]
        if bar is not None:
            bar.start(len(plan), sum(w.tokens for w in windows) * len(passes))
        for stage in plan:
            names = list(stage.names)
            if stage.what == "head":
                _head_stage(model, stage, src, names, windows, passes)
            elif original_folder is None:
                _install(model, src.converted(names))
                stage.run(conv)
                _release(model, names)
            else:
                orig = src.original_weights(names)
                _install(model, orig)
                stage.run(original)
                rounded = src.rounded(orig)
                del orig
                for weights, ref in zip(src.draws(rounded), refs, strict=True):
                    _install(model, weights)
                    stage.run(ref)
                del rounded, weights  # the noisy copy goes before the converted weights come
                _release(model, names)
                _install(model, src.converted(names))
                stage.run(conv)
                _release(model, names)
            if bar is not None:
                bar.advance(stage.what)
    if bar is not None:
        bar.finish()
    lengths = [w.tokens for w in windows]
    bad_windows = tuple(f"window {i}: {n} of {lengths[i] * _vocab(model)} logits are NaN or infinite" for i, n in sorted(bad.items()))
    return Figures(converted, tuple(drawn), bad_windows)


def _head_stage(model, stage: Stage, src: _Sources, names: list[str], windows: list[Window], passes: list[Pass]) -> None:
    """The head, chunk of positions by chunk: the original's logits first, then each other pass's, so that only one
    chunk of the original's log-probabilities waits to be compared (the passes' weight sets are held at once)."""
    if len(passes) == 1:
        weights = [src.converted(names)]
    else:
        orig = src.original_weights(names)
        rounded = src.rounded(orig)
        noisy = [{n: w.clone() if n in src.quantized else w for n, w in draw.items()} for draw in src.draws(rounded)]
        weights = [orig, *noisy, src.converted(names)]
    for i, w in enumerate(windows):
        for r0 in range(0, w.tokens, HEAD_ROWS):
            for p, ws in zip(passes, weights, strict=True):
                _install(model, ws)
                stage.run(p, i, r0)
    _release(model, names)


def _vocab(model) -> int:
    return int(getattr(model.config, "vocab_size", 0) or 0)


def stage_bytes(model, split: Split) -> dict[str, int]:
    """float32 bytes of each stage's weights (see `stages`), by stage name: what the budget is planned on."""
    sizes = {n: math.prod(p.shape) * 4 for n, p in model.named_parameters(remove_duplicate=False)}
    everything = list(sizes)
    inner = tuple(s.blocks for s in split.stacks) + tuple(s.norm for s in split.stacks) + (split.head,)
    out = {"embeddings": sum(sizes[n] for n in everything if not n.startswith(tuple(p + "." for p in inner)))}
    for stack in split.stacks:
        for i in range(len(model.get_submodule(stack.blocks))):
            out[f"{stack.blocks}.{i}"] = sum(sizes[n] for n in _params_under(model, (f"{stack.blocks}.{i}",)))
    out["head"] = sum(sizes[n] for n in _params_under(model, (split.stacks[-1].norm, split.head)))
    return out


