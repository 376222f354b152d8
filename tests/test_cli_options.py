"""Every option is checked while the command line is parsed: exit 2, one message, no traceback, nothing written.

Also: warnings that come before the long work (a --skip that matches nothing, a source without a
tokenizer), --revision on a local folder, `int8 convert .`, --json written whole or not at all,
and help texts that show the examples exactly as they are typed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import make_tiny

import int8
from int8 import options
from int8.errors import Int8Error

INT8 = [sys.executable, "-m", "int8.cli"]


@pytest.fixture(scope="module")
def gptj(tmp_path_factory) -> Path:
    return make_tiny("gptj", tmp_path_factory.mktemp("src") / "gptj")


@pytest.fixture(scope="module")
def converted(gptj, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "gptj-int8"
    int8.convert(gptj, out, block_size=64, device="cpu")
    return out


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*INT8, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def flat(text: str) -> str:
    return " ".join(text.split())


def mount_point() -> str | None:
    return next((p for p in ("/proc", "/sys", "/dev", "/dev/shm", "/run") if os.path.ismount(p)), None)


# -- parse-time checks ------------------------------------------------------------------------------


BAD = [
    (["convert", "{src}", "--max-shard-size", "0"], "must be positive"),
    (["convert", "{src}", "--max-shard-size", "lots"], "cannot read size"),
    (["convert", "{src}", "--max-shard-size", "9" * 400], "too large"),
    (["convert", "{src}", "--max-shard-size", "99999999999TB"], "too large"),
    (["convert", "{src}", "--max-shard-size", "-5GB"], "cannot read size"),
    (["convert", "{src}", "--skip", "re:("], "not a valid regular expression"),
    (["convert", "{src}", "--skip", "re:[a-"], "not a valid regular expression"),
    (["convert", "{src}", "--skip", ""], "empty skip pattern"),
    (["convert", "{src}", "--out", "{tmp}/" + "n" * 300], "too long"),
    (["convert", "{src}", "--out", "{tmp}/" + "n" * 240], "too long"),  # fits NAME_MAX, not with the staging suffix
    (["convert", "{src}", "--out", "{tmp}/" + "d" * 300 + "/x"], "longer than"),
    (["convert", "{src}", "--revision", "main"], "local folder"),
    (["convert", "{src}", "--block-size", "0"], "--block-size"),
    (["convert", "{src}", "--no-such-option"], "No such option"),
    (["verify", "{conv}", "--kl-factor", "inf"], "finite"),
    (["verify", "{conv}", "--kl-factor", "nan"], "finite"),
    (["verify", "{conv}", "--kl-factor", "-1"], "above 0"),
    (["verify", "{conv}", "--kl-factor", "0"], "above 0"),
    (["verify", "{conv}", "--max-kl", "-0.1"], "at least 0"),
    (["verify", "{conv}", "--max-kl", "inf"], "finite"),
    (["verify", "{conv}", "--min-top1", "1.5"], "at most 1"),
    (["verify", "{conv}", "--min-top1", "nan"], "finite"),
    (["verify", "{conv}", "--max-ppl-ratio", "0.5"], "at least 1"),
    (["verify", "{conv}", "--max-ppl-ratio", "-inf"], "finite"),
    (["verify", "{conv}", "--revision", "main"], "local folder"),
    (["verify", "{conv}", "--json", "{tmp}/no/such/folder/v.json"], "does not exist"),
    (["verify", "{conv}", "--json", "{tmp}"], "is a folder"),
    (["verify", "{conv}", "--max-memory", "100TB"], "more than this machine's memory"),
    (["verify", "{conv}", "--max-memory", "0"], "must be positive"),
    (["verify", "{conv}", "--max-memory", "lots"], "cannot read size"),
    (["verify", "{conv}", "--max-gpu-memory", "1.5 gigs"], "cannot read size"),
    (["generate", "{conv}", "hi", "--top-p", "5"], "--top-p must be at most 1"),
    (["generate", "{conv}", "hi", "--top-p", "0"], "--top-p must be above 0"),
    (["generate", "{conv}", "hi", "--top-p", "-0.5"], "--top-p must be above 0"),
    (["generate", "{conv}", "hi", "--top-p", "nan"], "finite"),
    (["generate", "{conv}", "hi", "--temperature", "-1"], "--temperature must be at least 0"),
    (["generate", "{conv}", "hi", "--temperature", "inf"], "finite"),
    (["generate", "{conv}", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "{conv}", "hi", "--revision", "v1"], "local folder"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[2:])[:40] or a[0] for a, _ in BAD])
def test_bad_options_exit_2_at_parse_time(args, message, gptj, converted, tmp_path):
    before = sorted(os.listdir(tmp_path))
    args = [a.format(src=gptj, conv=converted, tmp=tmp_path) for a in args]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in flat(r.stderr) and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("Error:") == 1 and "Usage:" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even a staging folder


def test_out_dot_inside_an_earlier_output_is_refused(gptj, converted, tmp_path):
    out = Path(shutil.copytree(converted, tmp_path / "out"))
    before = sorted(os.listdir(out))
    for args in (["--out", "."], ["--out", ".", "--overwrite"], ["--out", "..", "--overwrite"], ["--out", str(out), "--overwrite"]):
        r = run_cli("convert", str(gptj), "--block-size", "64", *args, cwd=out)
        assert r.returncode == 2 and "current folder" in flat(r.stderr) and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == before and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.skipif(mount_point() is None, reason="no mount point to try")
def test_out_that_is_a_mount_point_is_refused(gptj, tmp_path):
    r = run_cli("convert", str(gptj), "--out", mount_point(), "--overwrite", cwd=tmp_path)
    assert r.returncode == 2 and "mount point" in flat(r.stderr) and "Traceback" not in r.stderr, r.stderr


def test_library_runs_the_same_checks(gptj, tmp_path):
    for kwargs, message in [
        (dict(max_shard_size="9" * 100), "too large"),
        (dict(skip=["re:("]), "regular expression"),
        (dict(revision="main"), "local folder"),
        (dict(out=tmp_path / ("x" * 300)), "too long"),
    ]:
        kwargs.setdefault("out", tmp_path / "o")
        with pytest.raises(Int8Error, match=message):
            int8.convert(gptj, device="cpu", **kwargs)
    assert os.listdir(tmp_path) == []


# -- warnings before the long work ------------------------------------------------------------------


class Recorder:
    def __init__(self, events: list):
        self.events = events

    def start(self, total_bytes, total_tensors):
        self.events.append("start")

    def advance(self, nbytes, tensors=0):
        pass

    def finish(self):
        pass


def test_skip_patterns_that_match_nothing_are_warned_about_before_streaming(gptj, tmp_path):
    events: list = []
    report = int8.convert(
        gptj, tmp_path / "o", block_size=64, device="cpu", skip=["fc_in", "no_such_module", "re:decoder\\..*", "*.attn.q_proj"],
        progress=Recorder(events), on_warning=events.append,
    )
    warning = next(e for e in events if "--skip" in e)
    assert "'no_such_module'" in warning and "'re:decoder\\\\..*'" in warning
    assert "'fc_in'" not in warning and "q_proj" not in warning  # those matched
    assert events.index(warning) < events.index("start") and warning in report.warnings


def test_a_source_without_a_tokenizer_is_warned_about_at_the_start(tmp_path):
    src = make_tiny("gptj", tmp_path / "notok", tokenizer=False)
    assert not (src / "tokenizer.json").exists()
    r = run_cli("convert", str(src), "--block-size", "64", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = flat(r.stderr)
    assert "no tokenizer" in text and "tokenizer.save_pretrained(folder)" in text and "int8 push" in text
    assert text.index("no tokenizer") < text.index("int8 convert")  # before the summary table
    events: list = []
    int8.convert(src, tmp_path / "o2", block_size=64, device="cpu", progress=Recorder(events), on_warning=events.append)
    assert any("no tokenizer" in str(e) for e in events[: events.index("start")])


def test_a_source_with_a_tokenizer_gets_no_such_warning(gptj, tmp_path):
    events: list = []
    int8.convert(gptj, tmp_path / "o", block_size=64, device="cpu", on_warning=events.append)
    assert not any("tokenizer" in e for e in events)


# -- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", [".", "./", "../{name}", "{abs}"])
def test_convert_dot_names_the_output_after_the_folder(gptj, tmp_path, spelling):
    src = Path(shutil.copytree(gptj, tmp_path / "my-model"))
    r = run_cli("convert", spelling.format(name=src.name, abs=src), "--block-size", "64", "-q", cwd=src)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "my-model-int8" / "int8_report.json").is_file()  # beside the folder, not inside it
    assert not (tmp_path / "-int8").exists() and not list(src.glob("*int8*"))


def test_default_output_names():
    from int8.conversion.api import default_output

    assert default_output("gpt-j-6b").name == "gpt-j-6b-int8"
    assert default_output("bigscience/bloomz-560m").name == "bloomz-560m-int8"


# -- --json is written whole or not at all ---------------------------------------------------------


def test_json_to_a_full_device_fails_cleanly(converted, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    target = Path(shutil.copytree(converted, tmp_path / "t"))
    r = run_cli("verify", str(target), "--quick", "--json", "/dev/full", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "No space left on device" in flat(r.stderr) and "Traceback" not in r.stderr


def test_json_written_to_a_pipe_or_stdout(converted, tmp_path):
    target = Path(shutil.copytree(converted, tmp_path / "t"))
    r = run_cli("verify", str(target), "--quick", "--json", "/dev/stdout", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"schema"' in r.stdout


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_a_failed_json_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "verify.json"
    path.write_text('{"old": true}')

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", enospc)
    elif fail_at == "replace":
        monkeypatch.setattr(os, "replace", enospc)
    else:  # the disk fills up half-way through the text
        real_open = open

        class HalfWritten:
            def __init__(self, *a, **k):
                self.f = real_open(*a, **k)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                self.f.write(text[: len(text) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(options, "open", HalfWritten, raising=False)
    with pytest.raises(OSError, match="No space left"):
        options.write_text_atomically(path, '{"new": "' + "x" * 1000 + '"}')
    assert json.loads(path.read_text()) == {"old": True} and sorted(os.listdir(tmp_path)) == ["verify.json"]


def test_json_written_atomically(tmp_path):
    path = tmp_path / "v.json"
    options.write_text_atomically(path, '{"a": 1}')
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["v.json"]


# -- help shows what users type ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,expected",
    [
        ("convert", ['int8 convert ./my-model --block-size 64 --skip "re:.*\\.attn\\..*"',
                     'int8 convert ./my-model --skip lm_head --skip "*.mlp.fc_out"', "(*.attn.*)", "re:REGEX"]),
        ("verify", ["int8 verify gpt-j-6b-int8 --quick --json verify.json", "[default: 0.05]"]),
        ("push", ['int8 push gpt-j-6b-int8 --repo org/gpt-j-6b-int8 --create-pr -m "New card"']),
        ("generate", ['int8 generate flan-t5-small-int8 "Translate to German: Hello" -n 20']),
    ],
)
def test_help_examples_read_as_typed(command, expected):
    r = run_cli(command, "--help")
    assert r.returncode == 0
    for text in expected:
        assert text in r.stdout, (text, r.stdout)


# -- the command line stays a thin, fast layer ------------------------------------------------------


HEAVY = ("torch", "transformers", "huggingface_hub", "peft", "compressed_tensors", "numpy")


def test_help_imports_no_heavy_library():
    """`int8 --help` and every command's --help answer at once: none of them imports torch or transformers."""
    code = (
        "import sys\n"
        "from int8.cli import main\n"
        "for args in ([], ['--help'], ['--version'], ['convert', '--help'], ['verify', '--help'], ['push', '--help'],\n"
        "             ['card', '--help'], ['generate', '--help'], ['presets', '--help'], ['convert']):\n"
        "    sys.argv = ['int8', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "int8 0." in r.stdout  # the help texts and the version were printed
    assert r.stdout.splitlines()[-1] == "HEAVY []", r.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    "given,expected",
    [
        ([], {}),
        (["--min-top1", "0.8"], {"top1_min": 0.8, "top1_slack": 0.0}),  # a floor of its own: no slack below it
        (["--max-kl", "0.1", "--kl-factor", "5"], {"kl_max": 0.1, "kl_factor": 5.0}),
        (["--max-ppl-ratio", "1.2", "--min-top1", "0.95"], {"ppl_ratio_max": 1.2, "top1_min": 0.95, "top1_slack": 0.0}),
    ],
)
def test_verify_thresholds_reach_the_result(converted, tmp_path, given, expected):
    from int8.verify import Thresholds

    r = run_cli("verify", str(converted), "--quick", "--quiet", "--json", str(tmp_path / "v.json"), *given)
    assert r.returncode == 0, r.stderr
    recorded = json.loads((tmp_path / "v.json").read_text())["thresholds"]
    assert recorded == {**Thresholds().to_dict(), **expected}


def test_python_dash_m_int8_is_the_int8_command():
    """`python -m int8 ...` runs the same command as the `int8` script (for environments without the script on PATH)."""
    proc = subprocess.run([sys.executable, "-m", "int8", "convert", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--block-size" in proc.stdout and "Usage" in proc.stdout


@pytest.mark.parametrize("args, blas", [(["convert", "x"], "1"), (["verify", "x"], None), (["generate", "x"], None), ([], None)])
def test_convert_runs_numpy_without_blas_threads(args, blas):
    """`int8 convert` never calls BLAS: numpy's OpenBLAS gets one thread (its idle threads spin on import);
    other commands, whose torch may use OpenBLAS, keep the default; a user's own setting always wins."""
    from int8.cli import _set_environment

    env: dict[str, str] = {}
    _set_environment(args, env)
    assert env.get("OPENBLAS_NUM_THREADS") == blas and env["TOKENIZERS_PARALLELISM"] == "false"
    mine = {"OPENBLAS_NUM_THREADS": "4"}
    _set_environment(args, mine)
    assert mine["OPENBLAS_NUM_THREADS"] == "4"
