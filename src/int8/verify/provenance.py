"""Who wrote a checkpoint: `int8 convert`, or another tool (llm-compressor, compressed-tensors, ...).

`int8 verify` holds int8's own outputs to every check, and checkpoints other
tools wrote in the same format to the checks that apply to them: another
tool writes no ``int8_report.json`` (so there is no manifest to hash the files
against), no int8 model card, its own scale rule, and may use the code -128.

A folder is int8's when it carries any mark int8 leaves:

* an ``int8_report.json``, valid or not (a damaged report is damage, not
  another tool's checkpoint);
* a model card (README.md) int8 rendered: its body says ``Converted with
  int8 VERSION`` (the line of ``int8/hub/card_template.md``).

Only a folder with neither is another tool's. ``int8_verify.json`` is no
mark: `int8 verify` writes it into every local folder it checks. A damaged
int8 output whose report and card were both deleted is treated as another
tool's checkpoint, which loses the manifest's byte-for-byte guarantee but no
numbers check: the codes and scales are still compared with the original
value by value, and the model with it prediction by prediction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import Int8Error
from ..files import CARD_NAME
from ..paths import open_inside
from ..report import REPORT_NAME

CARD_MARK = re.compile(r"Converted with int8 \d")
"""What every card int8 renders says (``int8/hub/card_template.md``); tests hold the template to it."""
CARD_BYTES = 1 << 20
"""Cards are read up to this size (int8's are a few KB)."""

NOT_INT8 = "not written by int8"
NO_MARKS = f"no {REPORT_NAME}, no int8 model card"


class Provenance(str, Enum):
    """Who wrote the checkpoint (the value is what the JSON result says)."""

    INT8 = "int8"
    FOREIGN = "foreign"


@dataclass(frozen=True)
class Origin:
    """Who wrote a folder, and the marks that tell."""

    provenance: Provenance = Provenance.INT8
    marks: tuple[str, ...] = ()  # what shows int8 wrote it: REPORT_NAME, "README.md (int8's model card)"

    @property
    def own(self) -> bool:
        """int8 wrote it: every check applies."""
        return self.provenance is Provenance.INT8

    @property
    def report_removed(self) -> bool:
        """int8 wrote it (its card says so), but its int8_report.json is gone."""
        return self.own and bool(self.marks) and REPORT_NAME not in self.marks

    @property
    def why(self) -> str:
        """Why checks of int8's own files are skipped (another tool's checkpoint)."""
        return f"{NOT_INT8} ({NO_MARKS})"


def read_origin(folder: Path) -> Origin:
    """Who wrote ``folder`` (see the module docstring). Reads no more than the card's first MB."""
    folder = Path(folder)
    marks = []
    report = folder / REPORT_NAME
    if report.is_symlink() or report.exists():
        marks.append(REPORT_NAME)
    if int8_card(folder):
        marks.append(f"{CARD_NAME} (int8's model card)")
    return Origin(Provenance.INT8 if marks else Provenance.FOREIGN, tuple(marks))


def int8_card(folder: Path) -> bool:
    """Whether ``folder``'s README.md is a model card int8 rendered (a card that links outside the
    folder is not read: the contained check reports it)."""
    import os

    try:
        fd = open_inside(folder, CARD_NAME, what="model card")
    except (Int8Error, OSError):  # missing, a link out of the folder, not a regular file
        return False
    with os.fdopen(fd, "rb") as f:
        text = f.read(CARD_BYTES).decode("utf-8", errors="replace")
    return bool(CARD_MARK.search(text))
