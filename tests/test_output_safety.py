"""What `int8 convert` may replace, and how: ownership, exclusive atomic swap, staging, signals.

Hostile variants are built at run time: user files, sub-folders, links and tampered files in an
earlier output; folders created at --out while a run is under way (through the library's progress
callback, and by a second real convert); staging left by a killed run; SIGINT and SIGTERM sent to
real processes in the middle of a conversion and of a verify.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from models import make_tiny

import int8
from int8 import errors
from int8.conversion import output

INT8 = [sys.executable, "-m", "int8.cli"]

# A wrapper around the real `int8` entry point that makes one step slow, so that a signal or a
# second process lands in the middle of the run: a test-side patch, nothing in int8 itself.
HOOKED = '''
import os, sys, time, pathlib
ready = pathlib.Path(os.environ["HOOK_READY"])
pause = float(os.environ.get("HOOK_SLEEP", "60"))
where = os.environ["HOOK_AT"]

def wait():
    if not ready.exists():
        ready.write_text(str(os.getpid()))
        time.sleep(pause)

if where == "index":  # all shards written, in staging, before the report
    import int8.conversion.api as conv
    real_index = conv._write_index
    def slow_index(folder, plan):
        real_index(folder, plan)
        wait()
    conv._write_index = slow_index
elif where == "stream":  # tensors streaming, worker threads running
    from int8.cli.display import RichProgress
    real_advance = RichProgress.advance
    def slow_advance(self, nbytes, tensors=0):
        real_advance(self, nbytes, tensors)
        wait()
    RichProgress.advance = slow_advance
elif where == "verify":  # verify under way (its first progress message)
    import int8.verify as v
    real_verify = v.verify_checkpoint
    def slow_verify(*args, progress=None, **kwargs):
        def said(msg):
            wait()
            if progress:
                progress(msg)
        return real_verify(*args, progress=said, **kwargs)
    v.verify_checkpoint = slow_verify
from int8.cli import main
sys.argv = ["int8", *sys.argv[1:]]
main()
'''


@pytest.fixture(scope="module")
def gptj(tmp_path_factory) -> Path:
    return make_tiny("gptj", tmp_path_factory.mktemp("src") / "gptj")


@pytest.fixture(scope="module")
def earlier(gptj, tmp_path_factory) -> Path:
    """A pristine earlier output, copied by the tests that damage one."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    int8.convert(gptj, out, block_size=64, device="cpu")
    return out


@pytest.fixture
def old_out(earlier, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(earlier, out, copy_function=shutil.copy2)  # keep mtimes, as the earlier run left them
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "int8-partial" in p.name or "int8-old" in p.name)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(folder.rglob("*"))}


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*INT8, *args], capture_output=True, text=True, cwd=cwd, env=env(), timeout=300)


def start_hooked(tmp_path: Path, where: str, *args: str, sleep: float = 60, tag: str = "") -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "hooked_int8.py"
    script.write_text(HOOKED)
    ready = tmp_path / f"ready{tag}"
    e = dict(env(), HOOK_READY=str(ready), HOOK_SLEEP=str(sleep), HOOK_AT=where)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e, cwd=tmp_path)
    return proc, ready


def wait_for(ready: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the hook: {proc.returncode}\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the hook was never reached")
        time.sleep(0.05)


def convert(src: Path, out: Path, **kw):
    return int8.convert(src, out, block_size=64, device="cpu", **kw)


# -- item 6: only what int8 provably wrote is replaced -------------------------------------------------


def _user_file(out: Path) -> str:
    (out / "notes.txt").write_text("my notes")
    return "notes.txt"


def _sub_folder(out: Path) -> str:
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("x")
    return "runs"


def _symlink(out: Path) -> str:
    (out / "data.safetensors").symlink_to(out / "config.json")
    return "data.safetensors"


def _edited_config(out: Path) -> str:
    p = out / "config.json"
    text = p.read_text()
    p.write_text(text.replace('"n_head": 4', '"n_head": 8'))  # same size, different content
    assert len(p.read_text()) == len(text)
    return "config.json"


def _flipped_shard_byte(out: Path) -> str:
    p = next(out.glob("model*.safetensors"))
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    return p.name


def _truncated_shard(out: Path) -> str:
    p = next(out.glob("model*.safetensors"))
    p.write_bytes(p.read_bytes()[:-100])
    return p.name


def _tokenizer_replaced_by_folder(out: Path) -> str:
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").mkdir()
    return "tokenizer.json"


@pytest.mark.parametrize(
    "damage", [_user_file, _sub_folder, _symlink, _edited_config, _flipped_shard_byte, _truncated_shard, _tokenizer_replaced_by_folder]
)
def test_overwrite_refuses_a_folder_holding_what_int8_did_not_write(gptj, old_out, tmp_path, damage):
    name = damage(old_out)
    before = snapshot(old_out)
    r = run_cli("convert", str(gptj), "--block-size", "64", "--out", str(old_out), "--overwrite", "-q", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    flat = " ".join(r.stderr.split())
    assert name in flat and "will not replace it" in flat and "Traceback" not in r.stderr
    assert snapshot(old_out) == before and leftovers(tmp_path) == []


def _report_is_a_list(out: Path) -> None:
    (out / "int8_report.json").write_text("[]")


def _report_is_garbage(out: Path) -> None:
    (out / "int8_report.json").write_text("{not json")


def _report_of_another_tool(out: Path) -> None:
    (out / "int8_report.json").write_text(json.dumps({"files": []}))


def _manifest_names_outside(out: Path) -> None:
    report = json.loads((out / "int8_report.json").read_text())
    report["files"].append({"name": "../secret", "bytes": 1, "sha256": "0" * 64})
    (out / "int8_report.json").write_text(json.dumps(report))


def _manifest_entry_without_name(out: Path) -> None:
    report = json.loads((out / "int8_report.json").read_text())
    report["files"][0].pop("name")
    (out / "int8_report.json").write_text(json.dumps(report))


def _manifest_lists_a_user_file(out: Path) -> None:
    (out / "mine.bin").write_bytes(b"user data")  # listed, but with another size and hash
    report = json.loads((out / "int8_report.json").read_text())
    report["files"].append({"name": "mine.bin", "bytes": 5, "sha256": "0" * 64})
    (out / "int8_report.json").write_text(json.dumps(report))


@pytest.mark.parametrize(
    "forge",
    [_report_is_a_list, _report_is_garbage, _report_of_another_tool, _manifest_names_outside, _manifest_entry_without_name,
     _manifest_lists_a_user_file],
)
def test_a_forged_or_foreign_report_does_not_make_a_folder_int8s(gptj, old_out, forge):
    forge(old_out)
    before = snapshot(old_out)
    with pytest.raises(errors.OutputExists, match="will not replace it"):
        convert(gptj, old_out, overwrite=True)
    assert snapshot(old_out) == before


def test_overwrite_replaces_int8s_own_files_and_keeps_nothing_else(gptj, old_out, tmp_path):
    (old_out / "int8_verify.json").write_text("{}")  # int8's verify record and card may have changed since
    (old_out / "README.md").write_text("edited card")
    assert output.foreign_entries(old_out) == []
    convert(gptj, old_out, overwrite=True, dtype="fp32")
    assert json.loads((old_out / "int8_report.json").read_text())["quantization"]["dtype"] == "float32"
    assert not (old_out / "int8_verify.json").exists() and leftovers(tmp_path) == []


def test_big_files_are_hashed_only_when_touched_after_the_report(old_out, monkeypatch):
    shard = next(old_out.glob("model*.safetensors"))
    monkeypatch.setattr(output, "HASH_ALWAYS_BYTES", 0)  # every file counts as big
    hashed = []
    real = output.sha256_file
    monkeypatch.setattr(output, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert output.foreign_entries(old_out) == [] and hashed == []
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))  # same size, newer mtime than the report
    assert [e.split(" ")[0] for e in output.foreign_entries(old_out)] == [shard.name] and hashed == [shard.name]


def test_an_empty_folder_or_a_file_at_out(gptj, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(errors.OutputExists, match="already exists"):
        convert(gptj, empty)
    convert(gptj, empty, overwrite=True)  # nothing in it to lose
    assert (empty / "int8_report.json").is_file()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(errors.OutputExists, match="not a folder"):
        convert(gptj, f, overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(empty)
    with pytest.raises(errors.OutputExists, match="symbolic link"):
        convert(gptj, link, overwrite=True)
    assert f.read_text() == "x" and (empty / "int8_report.json").is_file() and leftovers(tmp_path) == []


# -- item 7: exclusive, atomic end; ownership checked again at the end ---------------------------------


class Hook:
    """A progress callback that runs ``action`` once, in the middle of the stream."""

    def __init__(self, action):
        self.action, self.done = action, False

    def start(self, total_bytes, total_tensors):
        pass

    def advance(self, nbytes, tensors=0):
        if not self.done:
            self.done = True
            self.action()

    def finish(self):
        pass


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request, monkeypatch):
    if request.param == "fallback":  # a kernel, libc or filesystem without renameat2
        monkeypatch.setattr(output, "_renameat2", None)
    elif output._renameat2 is None:
        pytest.skip("no renameat2 here")
    return request.param


def _mkdir_empty(out: Path) -> None:
    out.mkdir()


def _mkdir_with_file(out: Path) -> None:
    out.mkdir()
    (out / "mine.txt").write_text("mine")


def _other_convert(out: Path, src: Path) -> None:
    convert(src, out)  # a second convert to the same --out finishes first


@pytest.mark.parametrize("appear", [_mkdir_empty, _mkdir_with_file, _other_convert])
def test_a_folder_created_at_out_during_the_run_is_kept(gptj, tmp_path, rename_mode, appear):
    out = tmp_path / "out"
    seen = {}

    def action():
        appear(out, gptj) if appear is _other_convert else appear(out)
        seen.update(snapshot(out))

    with pytest.raises(errors.OutputExists, match="while int8 was converting"):
        convert(gptj, out, progress=Hook(action))
    assert snapshot(out) == seen and leftovers(tmp_path) == []


def _add_user_file(out: Path) -> None:
    (out / "added.txt").write_text("added during the run")


def _replace_with_user_folder(out: Path) -> None:
    shutil.rmtree(out)
    out.mkdir()
    (out / "mine.txt").write_text("mine")


def _replace_with_another_int8_output(out: Path) -> None:
    other = out.parent / "other"
    shutil.copytree(out, other)
    shutil.rmtree(out)
    other.rename(out)


@pytest.mark.parametrize("change", [_add_user_file, _replace_with_user_folder, _replace_with_another_int8_output])
def test_overwrite_checks_the_old_output_again_at_the_end(gptj, old_out, tmp_path, rename_mode, change):
    seen = {}

    def action():
        change(old_out)
        seen.update(snapshot(old_out))

    with pytest.raises(errors.OutputExists):
        convert(gptj, old_out, overwrite=True, progress=Hook(action))
    assert snapshot(old_out) == seen and leftovers(tmp_path) == []


def test_overwrite_swaps_in_the_new_output_in_both_modes(gptj, old_out, tmp_path, rename_mode):
    before = json.loads((old_out / "int8_report.json").read_text())["created"]
    ino = old_out.stat().st_ino
    convert(gptj, old_out, overwrite=True)
    assert old_out.stat().st_ino != ino and output.foreign_entries(old_out) == []
    assert json.loads((old_out / "int8_report.json").read_text())["created"] >= before and leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_converts_to_the_same_out_one_wins_the_other_fails(gptj, earlier, tmp_path, overwrite):
    out = tmp_path / "out"
    if overwrite:
        shutil.copytree(earlier, out, copy_function=shutil.copy2)
    args = ["convert", str(gptj), "--block-size", "64", "--out", str(out), "-q"] + (["--overwrite"] if overwrite else [])
    procs = [start_hooked(tmp_path, "index", *args, sleep=3, tag=str(i)) for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p, _ in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "Traceback" not in loser and ("while int8 was converting" in " ".join(loser.split()) or "already exists" in loser)
    assert output.foreign_entries(out) == [] and (out / "int8_report.json").is_file() and leftovers(tmp_path) == []


# -- item 9: staging ------------------------------------------------------------------------------------


def test_staging_left_by_a_killed_run_is_cleaned_by_the_next(gptj, tmp_path):
    out = tmp_path / "out"
    proc, ready = start_hooked(tmp_path, "index", "convert", str(gptj), "--block-size", "64", "--out", str(out), "-q")
    wait_for(ready, proc)
    proc.kill()
    proc.wait()
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and not out.exists()
    convert(gptj, out)
    assert leftovers(tmp_path) == [] and output.foreign_entries(out) == []


def test_a_live_runs_staging_is_left_alone(gptj, tmp_path):
    out = tmp_path / "out"
    live = tmp_path / ".out.int8-partial-12345678"
    live.mkdir()
    (live / "model-00001-of-00001.safetensors").write_bytes(b"being written")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running convert holds it
    try:
        convert(gptj, out)
        assert live.is_dir() and (live / "model-00001-of-00001.safetensors").read_bytes() == b"being written"
    finally:
        os.close(fd)
    shutil.rmtree(out)
    convert(gptj, out)  # now nobody holds it: stale
    assert not live.exists()


def test_an_old_output_moved_aside_by_a_killed_swap_comes_back(gptj, earlier, tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / ".out.int8-old-abcdef01"
    shutil.copytree(earlier, aside, copy_function=shutil.copy2)
    with pytest.raises(errors.OutputExists, match="already exists"):
        convert(gptj, out)  # the earlier output is back in place, so without --overwrite it is kept
    assert output.foreign_entries(out) == [] and leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_follows_the_umask(gptj, tmp_path, umask):
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        convert(gptj, out)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


# -- item 10: honest exit codes after signals --------------------------------------------------------


@pytest.mark.parametrize("where", ["index", "stream"])
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_convert_exits_128_plus_n_and_leaves_nothing(gptj, tmp_path, where, sig, code):
    out = tmp_path / "out"
    proc, ready = start_hooked(tmp_path, where, "convert", str(gptj), "--block-size", "64", "--out", str(out))
    wait_for(ready, proc)
    assert leftovers(tmp_path), "the run should be under way, in its staging folder"
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == code, err
    assert "Interrupted" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_verify_exits_128_plus_n(earlier, tmp_path, sig, code):
    target = tmp_path / "target"
    shutil.copytree(earlier, target, copy_function=shutil.copy2)
    before = snapshot(target)
    report = tmp_path / "verify.json"
    proc, ready = start_hooked(tmp_path, "verify", "verify", str(target), "--quick", "--json", str(report))
    wait_for(ready, proc)
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == code, err
    assert "Interrupted" in err and "Traceback" not in err
    assert not report.exists() and not list(tmp_path.glob(".verify.json*")) and snapshot(target) == before


def test_exit_codes_of_app_are_honoured(tmp_path):
    assert run_cli("--version").returncode == 0
    r = run_cli("no-such-command")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("verify", str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
