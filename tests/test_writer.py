"""`int8.conversion.writer.OutputFile`: the same file whether it is written with direct I/O or buffered,
in any piece sizes; a filesystem that refuses direct writes gets buffered ones; a write's error reaches the
caller, and a full disk during a direct write leaves nothing behind."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from int8.conversion import writer
from int8.conversion.writer import STAGING_BYTES, OutputFile

SIZES = [0, 1, 4095, 4096, 4097, STAGING_BYTES - 1, STAGING_BYTES, STAGING_BYTES + 1, 2 * STAGING_BYTES + 12345]


@pytest.fixture
def direct_everywhere(monkeypatch):
    """Direct I/O asked for (INT8_DIRECT_IO=1), for files of every size."""
    monkeypatch.setattr(writer, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setenv("INT8_DIRECT_IO", "1")


def _pieces(data: bytes, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(data):
        n = int(rng.choice([1, 7, 4096, 65537, STAGING_BYTES + 3]))
        out.append(data[i : i + n])
        i += n
    return out


def _is_direct(path) -> bool:
    fd = os.open(path, os.O_WRONLY)
    try:
        return bool(writer._enable_direct_io(fd))
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direct", [True, False])
def test_the_file_is_exactly_the_bytes_written(size, direct, tmp_path, direct_everywhere):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    f = OutputFile(tmp_path / "x", size, direct=direct)
    for piece in _pieces(data, size):
        f.write(np.frombuffer(piece, np.uint8))
    f.close()
    assert (tmp_path / "x").read_bytes() == data
    assert f.bytes_written == size


def test_direct_io_is_used_where_the_filesystem_has_it(tmp_path, direct_everywhere):
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if not hasattr(os, "O_DIRECT") or not _is_direct(probe):
        pytest.skip("no direct I/O on this system or filesystem")
    f = OutputFile(tmp_path / "x", STAGING_BYTES)
    assert f.direct
    f.write(b"a" * STAGING_BYTES)
    f.close()
    assert (tmp_path / "x").read_bytes() == b"a" * STAGING_BYTES


def test_small_files_are_written_buffered(tmp_path):
    f = OutputFile(tmp_path / "x", writer.DIRECT_MIN_BYTES - 1, direct=True)
    assert not f.direct
    f.abort()


@pytest.mark.parametrize("env, expected", [(None, False), ("0", False), ("1", True)])
def test_buffered_unless_the_environment_asks_for_direct_io(env, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "DIRECT_MIN_BYTES", 0)
    if env is None:
        monkeypatch.delenv("INT8_DIRECT_IO", raising=False)
    else:
        monkeypatch.setenv("INT8_DIRECT_IO", env)
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if expected and not _is_direct(probe):
        pytest.skip("no direct I/O on this system or filesystem")
    f = OutputFile(tmp_path / "x", STAGING_BYTES)
    assert f.direct == expected
    f.abort()
    g = OutputFile(tmp_path / "y", STAGING_BYTES, direct=False)
    assert not g.direct
    g.abort()


def test_a_filesystem_that_refuses_direct_writes_gets_buffered_ones(tmp_path, direct_everywhere, monkeypatch):
    refused = []
    real = writer._pwrite

    def pwrite(fd, buf, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buf, offset)

    monkeypatch.setattr(writer, "_pwrite", pwrite)
    size = 2 * STAGING_BYTES + 5
    data = os.urandom(size)
    f = OutputFile(tmp_path / "x", size)
    if not f.direct:
        f.abort()
        pytest.skip("no direct I/O on this system or filesystem")
    for piece in _pieces(data, 1):
        f.write(piece)
    f.close()
    assert (tmp_path / "x").read_bytes() == data
    assert refused == [0]  # refused once, then buffered


def test_a_direct_write_error_reaches_the_caller(tmp_path, direct_everywhere, monkeypatch):
    def pwrite(fd, buf, offset):
        if offset >= STAGING_BYTES:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, buf, offset)

    monkeypatch.setattr(writer, "_pwrite", pwrite)
    f = OutputFile(tmp_path / "x", 4 * STAGING_BYTES)
    if not f.direct:
        f.abort()
        pytest.skip("no direct I/O on this system or filesystem")
    with pytest.raises(OSError) as info:
        for _ in range(4):
            f.write(b"z" * STAGING_BYTES)
        f.close()
    assert info.value.errno == errno.ENOSPC
    f.abort()  # what the engine does after a failure: closes, and may be called again
    f.abort()
    assert f._thread is None and f._fd == -1


def test_disk_full_during_a_direct_write_leaves_nothing(tmp_path, direct_everywhere, monkeypatch):
    from models import make_tiny

    import int8
    from int8 import errors

    src = make_tiny("gptj", tmp_path / "src")
    written = []

    def pwrite(fd, buf, offset):
        if offset > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(buf))
        return os.pwrite(fd, buf, offset)

    monkeypatch.setattr(writer, "_pwrite", pwrite)
    monkeypatch.setattr(writer, "STAGING_BYTES", 64 << 10)  # the tiny model's shard spans several staged writes
    out = tmp_path / "out"
    with pytest.raises(errors.OutputError, match="disk filled up"):
        int8.convert(src, out, device="cpu")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if _is_direct(probe):
        assert written  # the direct path was taken
