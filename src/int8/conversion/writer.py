"""Write a safetensors shard front to back while its data streams in.

A safetensors file is 8 bytes of little-endian header length, a JSON header
giving each tensor's dtype, shape and byte range, then the raw data. Because
the conversion plan knows every output tensor's dtype and shape before any
data moves, the header is written first and the data appended as it is
produced: no shard is ever held in memory (the ``safetensors`` library's
``save_file`` needs every tensor in memory at once). The SHA-256 of the file
is computed on the way, so integrity costs no second read.

With ``INT8_DIRECT_IO=1``, a shard is written with direct I/O where the filesystem allows it
(`OutputFile`): whole aligned blocks from reused buffers straight to the disk, past the page cache.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..formats.safetensors import OutputTensor, safetensors_header


class BackgroundHasher:
    """SHA-256 on a thread of its own, in submission order, beside the writes.

    Hashing a shard is inherently sequential; doing it on its own thread takes it off
    the writer's critical path. Each piece of data stays alive until it is hashed, and
    its ``after`` callback (giving a buffer back to its pool) runs then. ``depth`` bounds
    the pieces waiting (each pins a buffer), so memory stays bounded when hashing lags.
    """

    def __init__(self, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="int8-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                sha, data, after = item
                sha.update(data)
                if after is not None:
                    after()
            finally:
                self._queue.task_done()

    def submit(self, sha, data, after: Callable[[], None] | None = None) -> None:
        self._queue.put((sha, data, after))

    def flush(self) -> None:
        """Wait until everything submitted so far is hashed."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


DIRECT_BLOCK = 1 << 12
"""Direct I/O writes whole, aligned blocks of this many bytes: a multiple of every disk's logical block."""

STAGING_BYTES = 4 << 20
"""Each of the two aligned buffers that direct writes go out of (one write system call per this many bytes)."""

DIRECT_MIN_BYTES = 256 << 20
"""Files from this size may be written with direct I/O; below it, buffered writes were as fast or faster on
README's bench/convert machine even where direct ones paid off (0.3 GB checkpoints: 0.01-0.03 s faster)."""


class OutputFile:
    """A new file, written front to back: buffered, or with direct I/O where asked for and possible.

    Direct I/O (Linux's ``O_DIRECT``) takes the data from two aligned staging buffers, reused for every
    write, straight to the disk: a thread of its own writes one while the caller fills the other. A
    buffered write copies the data into the page cache instead, into memory taken afresh for each page
    of the file. On a VM whose host reclaims the guest's free memory, such memory is slow to touch the
    first time: README's bench/convert machine wrote a fresh 1 GB file buffered in 0.16 to 2.2 s, directly
    in 0.39 to 0.50 s. But a directly written file is not in the page cache, and the `int8 verify` (or
    `int8 push`) that follows a conversion reads it back from disk: converting the 3.49 GB benchmark
    checkpoint and verifying it took 7.6-7.9 s with direct writes against 6.2 s buffered. So buffered is
    the default; direct I/O is for outputs too large to stay cached anyway, or disks the page cache only
    slows down.

    ``direct``: None (the default) takes it from the environment, ``INT8_DIRECT_IO=1`` turning it on; True
    and False decide here. Files under `DIRECT_MIN_BYTES`, filesystems without direct I/O (tmpfs on older
    kernels, some network filesystems) and other systems are written buffered whatever is asked. The file
    is the same either way.
    """

    def __init__(self, path: Path, size: int, direct: bool | None = None):
        self.path = Path(path)
        self.size = size
        self.bytes_written = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        self._fd = os.open(self.path, flags, 0o666)
        try:
            _preallocate(self._fd, size)
            if direct is None:
                direct = os.environ.get("INT8_DIRECT_IO", "0") == "1"
            wanted = direct and size >= DIRECT_MIN_BYTES
            self.direct = wanted and _enable_direct_io(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._offset = 0  # where the next staged write goes
        self._thread: threading.Thread | None = None
        if self.direct:
            self._step = STAGING_BYTES
            self._buffers = [_staging.take(self._step), _staging.take(self._step)]
            self._free: queue.Queue[int] = queue.Queue()
            self._free.put(1)
            self._current, self._fill = 0, 0
            self._jobs: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
            self._error: BaseException | None = None
            self._thread = threading.Thread(target=self._io, name="int8-direct-io", daemon=True)
            self._thread.start()

    def write(self, data) -> None:
        """Append ``data`` (any contiguous buffer). Raises the error of an earlier direct write, if any."""
        view = memoryview(data).cast("B")
        self.bytes_written += len(view)
        if not self.direct:
            while len(view):
                view = view[os.write(self._fd, view):]
            return
        while len(view):
            n = min(len(view), self._step - self._fill)
            self._buffers[self._current][self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self._step:
                self._submit(self._step)

    def _submit(self, nbytes: int) -> None:
        """Hand the current buffer's first ``nbytes`` to the I/O thread; go on in the other buffer."""
        self._jobs.put((self._current, nbytes, self._offset))
        self._offset += nbytes
        self._current, self._fill = self._free.get(), 0  # the I/O thread gives every buffer back, even failing
        if self._error is not None:
            raise self._error

    def _io(self) -> None:
        while (job := self._jobs.get()) is not None:
            index, nbytes, offset = job
            try:
                if self._error is None:
                    self._pwrite_all(memoryview(self._buffers[index])[:nbytes], offset)
            except BaseException as exc:  # raised in the caller's thread, at its next write or close
                self._error = exc
            finally:
                self._free.put(index)

    def _pwrite_all(self, buf: memoryview, offset: int) -> None:
        while len(buf):
            try:
                written = _pwrite(self._fd, buf, offset)
            except OSError as e:
                # A filesystem that took the direct flag but refuses direct writes: the same writes, buffered.
                if e.errno != errno.EINVAL or not _disable_direct_io(self._fd):
                    raise
                continue
            if written <= 0:  # pragma: no cover - a write either fails or writes something
                raise OSError(errno.EIO, f"{self.path.name}: a write wrote nothing")
            offset += written
            buf = buf[written:]

    def close(self) -> None:
        """Write what is left and close; the file is then exactly the bytes written. Raises a write's error."""
        try:
            if self.direct:
                if self._fill:
                    tail = self._fill
                    padded = -(-tail // DIRECT_BLOCK) * DIRECT_BLOCK  # direct I/O writes whole blocks
                    self._buffers[self._current][tail:padded] = bytes(padded - tail)
                    self._submit(padded)
                self._stop_io()
                if self._error is not None:
                    raise self._error
            if self.bytes_written != self.size or self._offset > self.size:
                os.ftruncate(self._fd, self.bytes_written)
        finally:
            self.abort()

    def _stop_io(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def abort(self) -> None:
        """Close without writing what is left (idempotent)."""
        self._stop_io()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.direct:
            for b in self._buffers:
                _staging.give(b)
            self._buffers = []


_pwrite = os.pwrite if hasattr(os, "pwrite") else None


class _StagingBuffers:
    """Page-aligned staging buffers, kept for the next file: fresh memory costs more than the copy into it."""

    def __init__(self, keep: int = 2):
        self._free: list[mmap.mmap] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == nbytes:
                    return buf
                buf.close()
        return mmap.mmap(-1, nbytes)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)
                return
        buf.close()


_staging = _StagingBuffers()


def _enable_direct_io(fd: int) -> bool:
    """Switch ``fd`` to direct I/O; False where the system or the filesystem has none."""
    return _set_direct_io(fd, True)


def _disable_direct_io(fd: int) -> bool:
    return _set_direct_io(fd, False)


def _set_direct_io(fd: int, on: bool) -> bool:
    if not hasattr(os, "O_DIRECT") or _pwrite is None:
        return False
    import fcntl

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True


class ShardWriter:
    """Writes one shard; `write` must be called with exactly the planned bytes, in order.

    With a `BackgroundHasher`, the SHA-256 is computed on its thread; without, inline.
    """

    def __init__(
        self,
        path: Path,
        tensors: Sequence[OutputTensor],
        metadata: dict[str, str] | None = None,
        hasher: BackgroundHasher | None = None,
        direct: bool | None = None,
    ):
        """``direct``: whether to write with direct I/O where the system allows it (`OutputFile`; None: the
        environment decides)."""
        self.path = Path(path)
        self._sizes = [t.nbytes for t in tensors]
        self._names = [t.name for t in tensors]
        self._index = 0
        self._left = self._sizes[0] if self._sizes else 0
        self._sha = hashlib.sha256()
        self._hasher = hasher
        header = safetensors_header(tensors, metadata)
        self._file = OutputFile(self.path, len(header) + sum(self._sizes), direct=direct)
        self.bytes_written = 0
        self._put(header)

    def _put(self, data, after: Callable[[], None] | None = None) -> None:
        self._file.write(data)
        self.bytes_written += len(data)
        if self._hasher is not None:
            self._hasher.submit(self._sha, data, after)
        else:
            self._sha.update(data)
            if after is not None:
                after()

    def write(self, data, after: Callable[[], None] | None = None) -> None:
        """Append the next piece of tensor data (any buffer: bytes, memoryview, numpy).

        ``after`` runs once the data is written and hashed (the data must stay unchanged until then).
        """
        view = memoryview(data).cast("B")
        if not len(view):
            if after is not None:
                after()
            return
        while len(view):
            while self._left == 0:
                self._index += 1
                if self._index >= len(self._sizes):
                    raise RuntimeError(f"{self.path.name}: more data than the header announces")
                self._left = self._sizes[self._index]
            n = min(self._left, len(view))
            self._put(view[:n], after if n == len(view) else None)
            self._left -= n
            view = view[n:]

    def close(self) -> str:
        """Finish the shard; return its SHA-256 (hex). Raises if data is missing."""
        while self._left == 0 and self._index + 1 < len(self._sizes):
            self._index += 1
            self._left = self._sizes[self._index]
        self._file.close()
        if self._left or self._index + 1 < len(self._sizes):
            raise RuntimeError(f"{self.path.name}: tensor {self._names[self._index]!r} is incomplete")
        if self._hasher is not None:
            self._hasher.flush()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._file.abort()


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front: on ext4 and xfs this makes the writes several times
    cheaper, and a full disk is found before any data is written (ENOSPC raises here)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    except AttributeError:  # pragma: no cover - platforms without posix_fallocate
        pass
