"""The files int8 writes into a converted folder besides the weights, and how their bytes are hashed.

The manifest in ``int8_report.json`` lists every other file with its size and SHA-256; these three
are outside it because they legitimately change after the conversion (the card is re-rendered by
``int8 card``/``int8 push``, the verify record by ``int8 verify``, and the report holds the manifest).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CARD_NAME = "README.md"
REPORT_NAME = "int8_report.json"
VERIFY_NAME = "int8_verify.json"
OWN_FILES = (CARD_NAME, REPORT_NAME, VERIFY_NAME)
"""int8's own files of a converted folder that the manifest leaves out."""


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """The SHA-256 of a file's bytes, read in ``chunk``-sized pieces (memory stays flat)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        view = memoryview(bytearray(chunk))  # one buffer, filled again and again: no allocation per chunk
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()
