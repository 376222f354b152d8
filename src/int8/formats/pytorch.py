"""PyTorch ``.bin`` checkpoints (``pytorch_model.bin``, or shards with ``pytorch_model.bin.index.json``).

They are loaded with ``torch.load(mmap=True, weights_only=True)``: no pickled object other than
tensors and plain containers is ever built, so no code from the file runs, and no tensor is read
until it is used. torch is imported when a ``.bin`` is loaded, not before.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptCheckpoint, UnsupportedModel, first_line

if TYPE_CHECKING:
    import torch

BIN_INDEX = "pytorch_model.bin.index.json"


BIN_SINGLE = "pytorch_model.bin"


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsupportedModel(
            f"{path.name} holds pickled Python objects besides tensors; int8 loads .bin files with "
            f"weights_only=True and will not unpickle arbitrary code ({first_line(e)})",
            "If you trust the file, load it with torch.load and save the state dict with safetensors.",
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        msg = str(e)
        if "mmap" in msg:
            raise UnsupportedModel(
                f"{path.name} cannot be memory-mapped: it was saved in PyTorch's legacy (pre-1.6) format",
                "Re-save it with a current torch (torch.save(torch.load(f, weights_only=True), f)) "
                "or convert it to safetensors, then run int8 again.",
            ) from None
        raise CorruptCheckpoint(f"{path} could not be read: {first_line(e, 200)}", "Download or save it again.") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state
