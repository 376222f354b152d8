"""Write a safetensors shard front to back while its data streams in.

A safetensors file is 8 bytes of little-endian header length, a JSON header
giving each tensor's dtype, shape and byte range, then the raw data. Because
the conversion plan knows every output tensor's dtype and shape before any
data moves, the header is written first and the data appended as it is
produced: no shard is ever held in memory (the ``safetensors`` library's
``save_file`` needs every tensor in memory at once). The SHA-256 of the file
is computed on the way, so integrity costs no second read.
"""

from __future__ import annotations

import errno
import hashlib
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
    ):
        self.path = Path(path)
        self._sizes = [t.nbytes for t in tensors]
        self._names = [t.name for t in tensors]
        self._index = 0
        self._left = self._sizes[0] if self._sizes else 0
        self._sha = hashlib.sha256()
        self._hasher = hasher
        header = safetensors_header(tensors, metadata)
        self._file = open(self.path, "xb")
        self.bytes_written = 0
        _preallocate(self._file, len(header) + sum(self._sizes))
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
        self._file.close()


def _preallocate(file, size: int) -> None:
    """Reserve the file's blocks up front: on ext4 and xfs this makes the writes several times
    cheaper, and a full disk is found before any data is written (ENOSPC raises here)."""
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            file.close()
            raise
    except AttributeError:  # pragma: no cover - platforms without posix_fallocate
        pass
