"""Checks of what the user typed, shared by the command line (as parse-time callbacks) and the library.

Each check raises `UsageError` (exit code 2, one line and a hint, no traceback) and returns the
parsed value. The CLI runs them while parsing, before anything is imported, downloaded or
written; `int8.convert` and friends run the same functions on their arguments.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

from .errors import Int8Error, UsageError

MAX_SHARD_BYTES = 1 << 62
"""Largest --max-shard-size accepted: safetensors offsets are 64-bit; anything bigger is a typo."""


# ------------------------------------------------------------------------------------------ values


def shard_size(text: str | int) -> int:
    """--max-shard-size: '5GB', '500MB', '2GiB' or bytes -> bytes, positive and within 64 bits."""

    try:
        size = parse_size(text)
    except Int8Error as e:
        raise UsageError(f"--max-shard-size: {e.message}", e.hint or "Write it like 5GB, 500MB or 2GiB.") from None
    if size > MAX_SHARD_BYTES:
        raise UsageError(f"--max-shard-size {text} is too large", "Write it like 5GB, 500MB or 2GiB.")
    return size


def finite(name: str, value: float | None, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float | None:
    """A finite float within [low, high] (``(low, high]`` with ``low_open``); None passes (not given)."""
    if value is None:
        return None
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise UsageError(f"{name} must be {'above' if low_open else 'at least'} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise UsageError(f"{name} must be at most {high:g}, got {value:g}")
    return value


def at_least(name: str, value: int | None, low: int) -> int | None:
    if value is not None and value < low:
        raise UsageError(f"{name} must be at least {low}, got {value}")
    return value


def max_new_tokens(value: int) -> int:
    """--max-new-tokens of `int8 generate`: at least one."""
    return at_least("--max-new-tokens", value, 1)


def temperature(value: float) -> float:
    """--temperature of `int8 generate`: 0 (greedy) or above."""
    return finite("--temperature", value, low=0.0)


def top_p(value: float) -> float:
    """--top-p of `int8 generate`: above 0, at most 1."""
    return finite("--top-p", value, low=0.0, high=1.0, low_open=True)


def embeddings(value: str | None):
    """--embeddings: keep (the default) or int8, as an `int8.conversion.plan.Embeddings`."""
    from .conversion.plan import Embeddings

    if value is None:
        return Embeddings.KEEP
    try:
        return Embeddings(str(getattr(value, "value", value)).strip().lower())
    except ValueError:
        raise UsageError(f"--embeddings {value!r} is not keep or int8",
                         "Use --embeddings keep (the default) or --embeddings int8.") from None


def skip_patterns(patterns: Sequence[str] | None) -> list[str]:
    """--skip: every pattern well formed (a ``re:`` one a valid regular expression)."""
    from .conversion.plan import check_pattern

    out = []
    for p in patterns or ():
        try:
            check_pattern(p)
        except Int8Error as e:
            raise UsageError(f"--skip {p!r}: {e.message}", e.hint) from None
        out.append(p)
    return out


def local_revision(source: str | Path, revision: str | None, option: str = "--revision") -> None:
    """A revision names a Hub commit: refuse it for a local folder, where it would be silently ignored."""
    if revision is not None and Path(source).expanduser().exists():
        raise UsageError(
            f"{option} {revision} was given, but {source} is a local folder, which has no revisions",
            f"Drop {option}, or give the Hub repo id to fetch that revision.",
        )


# ------------------------------------------------------------------------------------------ paths


STAGING_EXTRA = len(".") + len(".int8-partial-") + 8
"""What the staging folder's name adds to the output's name."""


def output_folder(path: str | Path) -> Path:
    """--out: an absolute path whose name, and its staging folder's, fit the filesystem; never the
    current folder or one that holds it (int8 renames a new folder into place); never a mount point."""
    from .conversion.output import name_max

    raw = Path(path).expanduser()
    out = Path(os.path.abspath(raw))
    if not out.name:
        raise UsageError(f"--out {path} is the root folder", "Give a folder to create, such as ./model-int8.")
    limit = name_max(out.parent)
    if len(os.fsencode(out.name)) + STAGING_EXTRA > limit:
        raise UsageError(
            f"--out name is too long ({len(os.fsencode(out.name))} bytes; at most {limit - STAGING_EXTRA} here, "
            "since int8 builds the output in a folder named .NAME.int8-partial-XXXXXXXX beside it)",
            "Choose a shorter --out.",
        )
    too_long = [p for p in out.parts if len(os.fsencode(p)) > limit]
    if too_long:
        raise UsageError(f"--out has a folder name longer than {limit} bytes: {too_long[0][:40]}...", "Choose a shorter --out.")
    cwd = Path.cwd().resolve()
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError) as e:
        raise UsageError(f"--out {path} cannot be resolved: {e}") from None
    if resolved == cwd or resolved in cwd.parents:
        raise UsageError(
            f"--out {path} is the current folder, or holds it; int8 replaces a folder by moving a new one into place",
            "Run int8 from outside that folder (e.g. its parent), or choose another --out.",
        )
    if out.is_dir() and not out.is_symlink() and os.path.ismount(out):
        raise UsageError(
            f"--out {path} is a mount point; int8 cannot replace it, as it moves a new folder into place",
            f"Write inside it instead, e.g. --out {out / 'model-int8'}.",
        )
    return out


def json_output(path: Path | None) -> Path | None:
    """--json FILE: a file (or a device such as /dev/stdout) that can be written, in an existing folder."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"--json {path} is a folder", "Give a file name, such as verify.json.")
    if not p.parent.is_dir():
        raise UsageError(f"--json {path}: the folder {p.parent} does not exist", "Create it first, or give another file.")
    return p


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, synced, then renamed.

    A device or pipe (``/dev/stdout``) is written directly. Raises OSError (the old file is kept,
    no temporary file is left)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    tmp = path.parent / f".{path.name}.int8-tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------------------------ typer callbacks


def callback(check: Callable, *args, **kwargs) -> Callable:
    """A typer callback running ``check(value, *args, **kwargs)`` while the command line is parsed."""

    def run(value):
        return check(*args, value, **kwargs) if args else check(value, **kwargs)

    return run


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot read size {text!r}", "Write it like 5GB, 500MB or 2GiB.")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    if len(m.group(1)) > 30:
        raise UsageError(f"size {text.strip()[:40]!r} is too large", "Write it like 5GB, 500MB or 2GiB.")
    size = int(Fraction(m.group(1)) * base**power)  # exact: no float overflow or rounding
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


# ------------------------------------------------------------------------------------------ output format


def output_format(value):
    """--format: ``compressed-tensors`` (the default) or ``bnb`` -> `int8.formats.OutputFormat`."""
    from .formats import OutputFormat

    if isinstance(value, OutputFormat):
        return value
    try:
        return OutputFormat(str(value).strip().lower())
    except ValueError:
        raise UsageError(
            f"--format {value!r} is not a format int8 writes", "Use compressed-tensors (the default) or bnb."
        ) from None


def format_allows(fmt, *, block_size=None, scale_dtype=None, embeddings=None) -> None:
    """Refuse the options that do not apply to ``fmt``: with ``bnb`` a block is a whole row (one float32 SCB each)."""
    from .formats import OutputFormat

    if output_format(fmt) != OutputFormat.BNB:
        return
    if block_size is not None:
        raise UsageError(
            "--block-size does not apply to --format bnb: bitsandbytes' LLM.int8 layout has one scale per row",
            "Drop --block-size, or use --format compressed-tensors for block-wise scales.",
        )
    if scale_dtype is not None:
        raise UsageError(
            "--scale-dtype does not apply to --format bnb: its row scales (SCB) are always float32",
            "Drop --scale-dtype, or use --format compressed-tensors.",
        )
    if embeddings is not None and str(getattr(embeddings, "value", embeddings)) == "int8":
        raise UsageError(
            "--embeddings int8 does not apply to --format bnb: bitsandbytes' 8-bit layout quantizes linear layers only",
            "Drop --embeddings, or use --format compressed-tensors to quantize the embeddings too.",
        )
