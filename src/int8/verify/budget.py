"""How much memory the model-level checks may take, and how they run within it.

`plan` decides from sizes alone (the checkpoint's tensors, the sample's
length), never from what the machine happens to be doing, except for the
default budget (the memory available when verify starts):

* ``WHOLE``: the original, then the converted model, each whole in memory
  (`int8.verify.phases`), when `whole_bytes` fits the budget;
* ``STREAMED``: a block at a time (`int8.verify.stream`), when the model can be
  split (`int8.hf.split_of`) and `streamed_bytes` fits;
* otherwise `BudgetTooSmall`, with the smallest budget that works.

A budget larger than the machine's memory is refused before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from ..errors import UsageError

BASE_BYTES = 1 << 30
"""What a verify process holds before any model: Python, torch, transformers, tokenizers, the readers (measured:
about 0.9 GB resident on CPU with torch 2.13 and transformers 5.24)."""
WHOLE_FACTOR = 1.3
"""Peak of the whole-model run per float32 byte of the model (measured on GPT-J-shaped checkpoints: 1 GB + 1.3x)."""


class Mode(str, Enum):
    WHOLE = "whole model"
    STREAMED = "layer by layer"


class BudgetTooSmall(UsageError):
    """The budget cannot hold what one step of the run needs."""


@dataclass(frozen=True)
class Plan:
    mode: Mode
    budget: int  # bytes of CPU memory allowed
    needed: int  # the estimated peak of the chosen mode
    gpu_budget: int | None = None
    whole: int = 0  # the estimated peak of the whole-model run
    streamed: int | None = None  # the estimated peak of the layer-by-layer run (None: the model does not split)

    @property
    def metrics(self) -> dict[str, float]:
        """The figures a verify result records about memory."""
        out = {"memory_budget_bytes": self.budget, "memory_whole_bytes": self.whole,
               "layer_by_layer": float(self.mode is Mode.STREAMED)}
        if self.streamed is not None:
            out["memory_layer_by_layer_bytes"] = self.streamed
        return out


def size_text(n: float, up: bool = False) -> str:
    """Bytes as people write a budget: 8.00 GB, 512 MB (``up``: rounded up, so that the text still suffices)."""
    unit, scale, digits = ("GB", 1e9, 2) if n >= 1e8 else ("MB", 1e6, 0)
    value = n / scale
    if up:
        value = math.ceil(value * 10**digits) / 10**digits
    return f"{value:.{digits}f} {unit}"


def machine_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine's memory; available counts what this process holds already
    (the budget is a peak of this process, which has imported torch by then)."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), min(int(vm.total), int(vm.available) + int(psutil.Process().memory_info().rss))


def gpu_memory(device) -> tuple[int, int]:
    """(total, free) bytes of a CUDA device's memory."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(total), int(free)


def parse_budget(value: str | int | None, flag: str = "--max-memory") -> int | None:
    """'8GB', '1.5GB', '512MB' or bytes -> bytes (None stays None: the default)."""
    if value is None:
        return None
    from ..options import parse_size

    try:
        size = parse_size(value)
    except UsageError as e:
        raise UsageError(f"{flag} {value}: {e.message}", "Write it like 8GB, 1.5GB or 512MB.") from None
    if size <= 0:
        raise UsageError(f"{flag} {value}: must be more than zero", "Write it like 8GB, 1.5GB or 512MB.")
    return size


def check_budget(max_memory: int | None) -> int:
    """The CPU budget (default: the memory available now); one above the machine's memory is refused."""
    total, available = machine_memory()
    if max_memory is not None and max_memory > total:
        raise UsageError(
            f"--max-memory {size_text(max_memory)} is more than this machine's memory ({size_text(total)})",
            f"Give at most {size_text(total)}, or leave --max-memory out (default: what is available).",
        )
    return max_memory if max_memory is not None else available


def check_gpu_budget(max_gpu_memory: int | None, device) -> int | None:
    """The GPU budget on a CUDA ``device`` (default: what is free; None on the CPU); one above its memory is refused."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    total, free = gpu_memory(device)
    if max_gpu_memory is not None and max_gpu_memory > total:
        raise UsageError(
            f"--max-gpu-memory {size_text(max_gpu_memory)} is more than the GPU's memory ({size_text(total)})",
            f"Give at most {size_text(total)}, or leave it out (default: what is free).",
        )
    return max_gpu_memory if max_gpu_memory is not None else free


def whole_bytes(fp32_bytes: int, activations: int) -> int:
    """Estimated peak of the whole-model run."""
    return BASE_BYTES + math.ceil(WHOLE_FACTOR * fp32_bytes) + activations


def activation_bytes(tokens: int, window: int, hidden: int, heads: int, vocab: int) -> int:
    """Hidden states of the five passes (in and out of a block), one window's attention scores, the head's chunks."""
    from .stream import HEAD_ROWS

    passes = 5
    states = passes * 2 * tokens * hidden * 4
    attention = 4 * max(1, heads) * window * window * 4 + 8 * window * hidden * 4 * 4  # scores, softmax; MLP temporaries
    head = 4 * min(HEAD_ROWS, tokens) * vocab * 4
    return states + attention + head


def streamed_bytes(stage_bytes: dict[str, int], activations: int) -> int:
    """Estimated peak of the streamed run: two copies of its largest block or embeddings, three of the head."""
    head = stage_bytes.get("head", 0)
    others = max((b for n, b in stage_bytes.items() if n != "head"), default=0)
    return BASE_BYTES + max(2 * others, 3 * head) + activations


def plan(budget: int, whole: int, streamed: int | None, gpu_budget: int | None = None) -> Plan:
    """Whole when it fits, else layer by layer when the model splits and that fits; else `BudgetTooSmall`.

    ``whole`` and ``streamed`` are the estimates of `whole_bytes` and `streamed_bytes` (None: it does not split)."""
    if whole <= budget and (gpu_budget is None or whole - BASE_BYTES <= gpu_budget):
        return Plan(Mode.WHOLE, budget, whole, gpu_budget, whole, streamed)
    if streamed is None:
        raise BudgetTooSmall(
            f"--max-memory {size_text(budget)} cannot hold this model, which runs only whole "
            f"(about {size_text(whole, up=True)} needed)",
            f"Give --max-memory {size_text(whole, up=True)} or more, or --quick for structure and integrity only.",
        )
    if streamed > budget:
        raise BudgetTooSmall(
            f"--max-memory {size_text(budget)} is too small for one layer of this model "
            f"(the smallest budget that works is {size_text(streamed, up=True)})",
            f"Give --max-memory {size_text(streamed, up=True)} or more, or fewer --tokens.",
        )
    if gpu_budget is not None and streamed - BASE_BYTES > gpu_budget:
        raise BudgetTooSmall(
            f"--max-gpu-memory {size_text(gpu_budget)} is too small for one layer of this model "
            f"(the smallest that works is {size_text(streamed - BASE_BYTES, up=True)})",
            "Give more, or --device cpu.",
        )
    return Plan(Mode.STREAMED, budget, streamed, gpu_budget, whole, streamed)
