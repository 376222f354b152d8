"""The one containment rule for checkpoint files: everything int8 reads lies inside its folder.

Names that come from files (shard names in an index, entries of a report's
manifest) and files found in a folder (side files, single weight files) all go
through `inside` before they are opened. A name is refused when it is absolute,
climbs out with ``..``, or resolves (through symlinks, at any level) to a place
outside the folder. The one allowed case is the Hugging Face cache's own layout:
a file in ``.../models--ORG--NAME/snapshots/REV/`` is a symlink into
``.../models--ORG--NAME/blobs/``, so inside a cache snapshot the boundary is the
cache repo folder (``models--ORG--NAME``) rather than the snapshot folder.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from .errors import UnsafePath

_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
_SHOWN = 120
_MAX_NAME = 1024
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,119}")
_HINT = (
    "int8 reads only files inside the checkpoint folder (symlinks included): "
    "replace the link by a copy of the file, or remove the entry."
)


def show(name: object, limit: int = _SHOWN) -> str:
    """A name taken from a file, safe to print: escaped by repr (and ``[``) and cut to ``limit`` characters."""
    text = str(name)
    # "[" is written as its escape too, so that no name can act as console markup (rich) where it is printed
    return repr(text[:limit]).replace("[", "\\x5b") + ("..." if len(text) > limit else "")


def plain(name: object) -> str:
    """A name taken from a file (a shard in an index, a manifest entry, a tensor): as is when it is made of
    plain characters only, else `show` (escaped and cut)."""
    text = str(name)
    return text if _PLAIN.fullmatch(text) else show(text)


def boundary(folder: Path) -> Path:
    """The folder that files of ``folder`` may resolve into: the folder itself, or the cache repo
    folder when ``folder`` is a snapshot of the Hugging Face cache."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(_CACHE_REPO_PREFIXES):
        return real.parent.parent
    return real


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def inside(folder: Path, name: str, *, what: str = "file") -> Path:
    """``folder / name``, after checking that it stays inside ``folder`` once resolved.

    ``name`` is a relative POSIX path as written in an index or manifest (or the name of an
    entry of ``folder``). Raises `UnsafePath`, naming the entry (never its content), when it is
    empty, absolute, has a ``..`` part or a NUL, or resolves outside the folder's `boundary`.
    The file need not exist; the caller checks that."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"{folder.name}: a {what} entry has an empty or non-text name", _HINT)
    parts = PurePosixPath(name).parts
    if len(name) > _MAX_NAME or any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):
        raise UnsafePath(f"{folder.name}: {what} {show(name)} has a name longer than a file system allows", _HINT)
    if "\x00" in name or "\\" in name or PurePosixPath(name).is_absolute() or ".." in parts:
        raise UnsafePath(f"{folder.name}: {what} {plain(name)} points outside the folder", _HINT)
    path = folder / name
    real = Path(os.path.realpath(path))
    if not _is_within(real, boundary(folder)):
        raise UnsafePath(f"{folder.name}: {what} {plain(name)} is a link to a file outside the folder", _HINT)
    return path


def links_outside(folder: Path) -> list[str]:
    """The symlinks anywhere under ``folder`` (not followed into linked folders) that resolve outside it,
    as relative POSIX names: files that a copy or an upload of the folder would carry in from elsewhere."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for entry in (*dirs, *files):
            path = Path(root, entry)
            if path.is_symlink():
                rel = path.relative_to(folder).as_posix()
                try:
                    inside(folder, rel)
                except UnsafePath:
                    found.append(rel)
    return sorted(found)


def open_inside(folder: Path, name: str, *, what: str = "file") -> int:
    """A read-only descriptor of the regular file ``folder / name`` after `inside` has passed it.

    The resolved path is opened with ``O_NOFOLLOW`` (a link swapped in after the check is refused)
    and must be a regular file."""
    path = inside(folder, name, what=what)
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UnsafePath(f"{folder.name}: {what} {plain(name)} cannot be opened ({e.strerror})", _HINT) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{folder.name}: {what} {plain(name)} is not a regular file", _HINT)
    return fd


def copy_inside(folder: Path, name: str, dst: Path, *, what: str = "file") -> None:
    """Copy the bytes of ``folder / name`` (checked by `open_inside`) to ``dst``, which must not exist."""
    fd = open_inside(folder, name, what=what)
    try:
        with open(fd, "rb", closefd=False) as src, open(dst, "xb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    finally:
        os.close(fd)
