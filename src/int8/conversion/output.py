"""Where `int8 convert` writes: one rule for what it may replace, and an exclusive, atomic swap.

The output is built in a staging folder beside ``--out`` (``.NAME.int8-partial-XXXXXXXX``) and
moved into place only when everything has been written. The rules:

* **Ownership.** An existing ``--out`` is replaced (with ``--overwrite`` only) when int8 provably
  wrote it: its ``int8_report.json`` is int8's conversion report, and the folder holds exactly the
  files of that report's manifest (plain files, the recorded sizes) plus int8's own ``README.md``,
  ``int8_report.json`` and ``int8_verify.json``. Anything else in it — a user's file, a sub-folder,
  a symbolic link, a file whose size or content differs from the manifest — is in the way: the run
  is refused (exit 2), naming it, and nothing is deleted. Names and sizes are checked for every
  file; the SHA-256 of every manifest file up to ``HASH_ALWAYS_BYTES``, and of bigger ones (the
  weight shards) only when they were modified after the report was written — hashing a 6 GB folder
  would cost seconds on every ``--overwrite``, and a shard rewritten in place has a newer mtime.
  `check_replaceable` is that one rule; it runs at the start and again at the end.
* **Exclusive, atomic end.** At the end, under a lock on the parent folder, ``--out`` must still be
  what it was at the start (absent, or the same int8 output, re-checked): a folder created there
  during the run, or a second convert that finished first, makes this run fail (exit 2) and leaves
  the other's folder untouched. The new folder goes in with ``renameat2(RENAME_NOREPLACE)``, or
  swaps with the old one with ``RENAME_EXCHANGE``, so ``--out`` is never missing and never
  silently replaced; where the kernel or filesystem lacks them, the lock plus a re-check stand in.
* **Staging.** Each run holds an ``flock`` on its staging folder for as long as it runs. Staging
  folders of this ``--out`` whose lock nobody holds were left by a killed run: they are removed at
  the start of the next run (a live concurrent run's are left alone). Folders are created with
  mode 0777 less the umask, as ``mkdir`` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import OutputError, OutputExists
from ..files import OWN_FILES, REPORT_NAME, sha256_file

"""Files int8 writes outside its manifest (they change after a conversion: card, report, verify record)."""
REPORT_SCHEMA_PREFIX = "int8.conversion/"
HASH_ALWAYS_BYTES = 64 << 20
"""Manifest files up to this size are always hashed when deciding whether a folder is int8's."""
PARTIAL = ".int8-partial-"
OLD = ".int8-old-"
SUFFIX_LEN = len(PARTIAL) + 1 + 8  # "." + NAME + ".int8-partial-" + 8 hex digits
_MAX_LISTED = 5


class Lock(Enum):
    ACQUIRED = "acquired"
    BUSY = "busy"
    UNSUPPORTED = "unsupported"  # the filesystem has no flock (some network filesystems)


@dataclass(frozen=True)
class Identity:
    """What sat at ``--out`` when the run started: None for nothing, else the folder's inode."""

    dev: int
    ino: int


# ------------------------------------------------------------------------------------------ ownership


def _identity(path: Path) -> Identity | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return Identity(st.st_dev, st.st_ino)


def check_replaceable(out: Path, overwrite: bool) -> Identity | None:
    """Refuse (`OutputExists`) unless ``out`` is absent or, with ``overwrite``, a folder int8 provably wrote.

    Returns the identity of what is there (None when nothing is), for `finish` to compare with."""
    try:
        st = out.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputError(f"cannot look at --out {out}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputExists(f"{out} is a symbolic link; int8 will not replace it", "Give the real folder, or another --out.")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputExists(f"{out} exists and is not a folder; int8 will not replace it", "Choose another --out.")
    if not overwrite:
        raise OutputExists(f"{out} already exists", "Pass --overwrite to replace it, or choose another --out.")
    try:
        in_the_way = foreign_entries(out)
    except OSError as e:  # it changed while being looked at
        raise OutputError(f"cannot look inside --out {out}: {e.strerror or e}") from None
    if in_the_way:
        more = len(in_the_way) - _MAX_LISTED
        shown = ", ".join(in_the_way[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")
        raise OutputExists(
            f"{out} is not an int8 output as int8 wrote it ({shown}); int8 will not replace it, even with --overwrite",
            "Move those out of the folder, choose another --out, or remove the folder yourself.",
        )
    return Identity(st.st_dev, st.st_ino)


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` is not provably int8's output, each with why; empty when int8 may replace it all."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        return [f"an unreadable folder ({e.strerror})"]
    if not names:
        return []
    manifest, problem = _read_manifest(folder / REPORT_NAME)
    if manifest is None:
        head = f"{REPORT_NAME}: {problem}" if REPORT_NAME in names else f"no {REPORT_NAME}"
        return [head, *(n for n in names if n != REPORT_NAME)]
    report_mtime = (folder / REPORT_NAME).lstat().st_mtime_ns
    foreign = []
    for name in names:
        path = folder / name
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a file")
            foreign.append(f"{name} ({kind})")
        elif name in OWN_FILES:
            continue
        elif name not in manifest:
            foreign.append(f"{name} (not in the manifest)")
        else:
            size, digest = manifest[name]
            if st.st_size != size:
                foreign.append(f"{name} (changed since the conversion: {st.st_size} bytes, the manifest says {size})")
            elif (size <= HASH_ALWAYS_BYTES or st.st_mtime_ns > report_mtime) and sha256_file(path) != digest:
                foreign.append(f"{name} (changed since the conversion: its SHA-256 differs from the manifest)")
    return foreign


def _read_manifest(path: Path) -> tuple[dict[str, tuple[int, str]] | None, str]:
    """The report's manifest {name: (bytes, sha256)}, or (None, why it is not int8's report).

    The report must be a plain file that `int8.report.ConversionReport` validates, of int8's schema, and
    every manifest entry a plain file name (no folder part) other than int8's own files, listed once."""
    from ..report import ConversionReport, InvalidReport

    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            return None, "not a plain file"
        if st.st_size > 512 << 20:
            return None, "far too big for a report"
        raw = json.loads(path.read_bytes())
        report = ConversionReport.from_dict(raw)
    except FileNotFoundError:
        return None, "missing"
    except InvalidReport:
        return None, "not a valid int8 conversion report"
    except (OSError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if not str(raw.get("schema", "")).startswith(REPORT_SCHEMA_PREFIX):
        return None, "not an int8 conversion report"
    manifest: dict[str, tuple[int, str]] = {}
    for f in report.files:
        plain_name = f.name not in ("", ".", "..") and not any(c in f.name for c in ("/", "\\", "\0"))
        if not plain_name or f.bytes < 0 or len(f.sha256) != 64 or f.name in manifest or f.name in OWN_FILES:
            return None, "a malformed manifest"
        manifest[f.name] = (f.bytes, f.sha256.lower())
    return manifest, ""


# ------------------------------------------------------------------------------------------ locks


def _flock(fd: int, blocking: bool) -> Lock:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return Lock.ACQUIRED
    except BlockingIOError:
        return Lock.BUSY
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
            return Lock.UNSUPPORTED
        raise


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[Lock]:
    """An exclusive flock on ``folder`` (waits for it); UNSUPPORTED where the filesystem has none."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield _flock(fd, blocking=True)
    finally:
        os.close(fd)  # closing releases the lock


# ------------------------------------------------------------------------------------------ rename


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2_fn():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or a libc without renameat2
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _renameat2_fn()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when the system cannot (then fall back); raises OSError."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, failing with FileExistsError when anything is at ``dst``."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):  # fallback: callers hold the parent lock, so other int8 runs cannot race this
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


# ------------------------------------------------------------------------------------------ staging


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(_nearest_existing(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _partials(out: Path) -> list[Path]:
    prefix = f".{out.name}"
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    return [out.parent / n for n in sorted(names) if n.startswith(prefix + PARTIAL) or n.startswith(prefix + OLD)]


def clean_stale(out: Path) -> list[Path]:
    """Remove the staging folders of ``out`` that no running int8 holds (left by a killed run).

    The caller holds the parent lock, so no run is between creating its staging and locking it,
    nor in the middle of its final swap. A ``.NAME.int8-old-*`` folder (the previous output moved
    aside by a killed fallback swap) goes back to ``out`` when ``out`` is missing."""
    removed = []
    for p in _partials(out):
        try:
            if OLD in p.name:
                if p.is_symlink() or not p.is_dir():
                    continue
                if not os.path.lexists(out):
                    os.rename(p, out)
                    continue
                shutil.rmtree(p)
                removed.append(p)
                continue
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _flock(fd, blocking=False) is Lock.ACQUIRED:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        finally:
            os.close(fd)
    return removed


@dataclass
class Staging:
    """A staging folder beside ``out``, locked for as long as the run lasts."""

    out: Path
    folder: Path
    fd: int
    start: Identity | None
    overwrite: bool

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.close()

    def finish(self) -> None:
        """Move the staging folder to ``out``: exclusively, atomically, after re-checking ``out``."""
        try:
            with _folder_lock(self.out.parent):
                now = _identity(self.out)
                if now != self.start:
                    what = "appeared at" if self.start is None else "replaced the one at"
                    raise OutputExists(
                        f"a folder {what} {self.out} while int8 was converting (another convert to the same --out?); "
                        "it was left as it is and this run's output was discarded",
                        "Run again with another --out, or with --overwrite once the other run has finished.",
                    )
                if now is not None:
                    check_replaceable(self.out, overwrite=True)  # nothing was added to it or changed in it meanwhile
                if now is None:
                    try:
                        rename_noreplace(self.folder, self.out)
                    except FileExistsError:
                        raise OutputExists(
                            f"a folder appeared at {self.out} while int8 was converting; it was left as it is",
                            "Run again with another --out.",
                        ) from None
                else:
                    self._swap(now)
        except BaseException:
            self.discard()
            raise
        self.close()

    def _swap(self, expected: Identity) -> None:
        if _rename2(self.folder, self.out, _RENAME_EXCHANGE):
            st = self.folder.lstat()  # the old output now sits at the staging path
            if Identity(st.st_dev, st.st_ino) != expected:  # swapped in between the check and the exchange
                _rename2(self.folder, self.out, _RENAME_EXCHANGE)
                raise OutputExists(f"{self.out} changed while int8 was replacing it; it was left as it is")
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        old = self.out.parent / f".{self.out.name}{OLD}{uuid.uuid4().hex[:8]}"
        os.rename(self.out, old)
        try:
            rename_noreplace(self.folder, self.out)
        except BaseException:
            os.rename(old, self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)


def start(out: Path, overwrite: bool) -> Staging:
    """Check ``out``, clean stale staging folders, and create and lock this run's staging folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder {out.parent} for --out: {e.strerror}") from None
    with _folder_lock(out.parent) as lock:
        if lock is Lock.ACQUIRED:
            clean_stale(out)
        identity = check_replaceable(out, overwrite)
        for _ in range(100):
            folder = out.parent / f".{out.name}{PARTIAL}{uuid.uuid4().hex[:8]}"
            try:
                os.mkdir(folder, 0o777)  # the umask applies, as for any folder the user makes
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 collisions of 32 random bits
            raise OutputError(f"cannot create a staging folder beside {out}")
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        _flock(fd, blocking=False)
    return Staging(out, folder, fd, identity, overwrite)
