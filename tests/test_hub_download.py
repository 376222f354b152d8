"""Starting from a Hub id: `int8 convert` downloads the original through the test Hub (tests/hubserver.py).

Revisions (branch, tag, commit), one weights format only, the cache and offline
mode, private repos, and every way a download can fail: a clear message and
exit code 2, in bounded time.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from models import make_tiny

import int8
from int8.errors import HubError, Int8Error, NoWeightsFound, SourceNotFound
from int8.hub.download import download_checkpoint
from int8.report import ConversionReport

INT8 = [sys.executable, "-m", "int8.cli"]


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """Run the `int8` command line in this process (the Hub client patched by the `hub` fixture).

    Returns (exit code, stdout, stderr), whitespace-normalised (rich wraps lines)."""
    import signal

    from int8 import cli

    argv, handler = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["int8", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, handler)
    got = capsys.readouterr()
    return code, " ".join(got.out.split()), " ".join(got.err.split())


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_gptj(tmp_path_factory) -> dict[str, bytes]:
    """A tiny FP32 GPT-J as Hub files (safetensors), with an original model card."""
    folder = make_tiny("gptj", tmp_path_factory.mktemp("gptj") / "m")
    files = folder_files(folder)
    files["README.md"] = (
        b"---\nlicense: mit\nlanguage:\n- en\n- fr\ndatasets:\n- wikitext\npipeline_tag: text-generation\n---\n"
        b"# Tiny GPT-J\n\nA tiny model for tests.\n"
    )
    return files


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory) -> dict[str, bytes]:
    """The same kind of model with PyTorch .bin weights."""
    return folder_files(make_tiny("gptj", tmp_path_factory.mktemp("gptj-bin") / "m", form="bin", seed=3))


@pytest.fixture
def history(hub, tiny_gptj):
    """alice/tiny: main has two commits, tag v1 on the first."""
    repo = hub.create_repo("alice/tiny", tiny_gptj)
    first = repo.branches["main"]
    hub.create_tag("alice/tiny", "v1", first)
    second = hub.commit("alice/tiny", {"generation_config.json": tiny_gptj["generation_config.json"] + b"\n"})
    return {"first": first, "second": second}


def convert(source, out, **kw):
    return int8.convert(source, out, block_size=64, device="cpu", **kw)


# --------------------------------------------------------------------------- revisions and files


@pytest.mark.parametrize("rev", ["main", "v1", "first-commit", None])
def test_revision_by_branch_tag_and_commit(hub, history, tmp_path, rev):
    wanted = {"main": history["second"], None: history["second"], "v1": history["first"]}.get(rev, history["first"])
    revision = history["first"] if rev == "first-commit" else rev
    report = convert("alice/tiny", tmp_path / "out", revision=revision)
    assert report.source.kind == "hub" and report.source.id == "alice/tiny"
    assert report.source.revision == revision and report.source.commit == wanted
    # What was downloaded is that commit's files.
    assert all(r.revision in (revision or "main", wanted) for r in hub.log.downloads())
    saved = ConversionReport.load(tmp_path / "out")
    assert saved.source.commit == wanted


def test_only_one_weights_format_is_fetched(hub, tiny_gptj, tiny_bin, tmp_path):
    both = {**tiny_bin, **tiny_gptj}  # model.safetensors and pytorch_model.bin side by side
    both["flax_model.msgpack"] = b"\0" * 1000
    both["onnx/model.onnx"] = b"\0" * 1000
    hub.create_repo("alice/both", both)
    got = download_checkpoint("alice/both", quiet=True)
    assert got.format == "safetensors"
    fetched = hub.log.downloaded_files()
    assert "model.safetensors" in fetched and "README.md" in fetched and "tokenizer.json" in fetched
    assert not fetched & {"pytorch_model.bin", "flax_model.msgpack", "onnx/model.onnx"}
    assert sorted(p.name for p in got.folder.iterdir()) == sorted(
        n for n in both if n not in ("pytorch_model.bin", "flax_model.msgpack", "onnx/model.onnx")
    )

    hub.create_repo("alice/bin-only", tiny_bin)
    got = download_checkpoint("alice/bin-only", quiet=True)
    assert got.format == "pytorch" and (got.folder / "pytorch_model.bin").is_file()


def test_second_run_is_served_from_the_cache_then_offline_without_network(hub, history, tmp_path):
    first = convert("alice/tiny", tmp_path / "a", revision="v1")
    downloads = len(hub.log.downloads())
    assert downloads > 0
    hub.log.clear()
    again = convert("alice/tiny", tmp_path / "b", revision="v1")
    assert hub.log.downloads() == []  # online: one repo-info call, no file fetched again
    assert again.source.commit == first.source.commit

    # Offline, with the server gone: by tag, by branch and by commit, no request at all.
    convert("alice/tiny", tmp_path / "main-online")  # main is cached too
    hub.stop()
    hub.offline()
    for rev, out in (("v1", "c"), (None, "d"), (history["first"], "e")):
        report = convert("alice/tiny", tmp_path / out, revision=rev)
        assert report.source.commit == (history["second"] if rev is None else history["first"])
    assert (tmp_path / "c" / "model.safetensors.index.json").exists()
    a = ConversionReport.load(tmp_path / "a")
    c = ConversionReport.load(tmp_path / "c")
    assert [f.sha256 for f in a.files] == [f.sha256 for f in c.files]  # the same conversion
    with pytest.raises(HubError, match="not in the local cache.*HF_HUB_OFFLINE"):
        convert("alice/other", tmp_path / "f")
    with pytest.raises(HubError, match="not in the local cache"):
        convert("alice/tiny", tmp_path / "g", revision="never-downloaded")


def test_subprocess_second_run_offline_with_the_server_gone(hub, history, tmp_path):
    first = convert("alice/tiny", tmp_path / "a", revision="v1")  # fills hub.hf_home's cache
    hub.stop()
    env = hub.env(hf_home=hub.hf_home, offline=True, PYTHONWARNINGS="ignore")
    args = ["convert", "alice/tiny", "--revision", "v1", "--block-size", "64", "--quiet", "--out", str(tmp_path / "b")]
    r = subprocess.run([*INT8, *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    second = ConversionReport.load(tmp_path / "b")
    assert second.source.commit == history["first"] == first.source.commit
    assert [f.sha256 for f in second.files] == [f.sha256 for f in first.files]


def test_preset_with_revision(hub, tmp_path):
    """A preset names its Hub repo: the test Hub stands in for bigscience/bloomz-560m."""
    folder = make_tiny("bloom", tmp_path / "bloom")
    repo = hub.create_repo("bigscience/bloomz-560m", folder_files(folder))
    hub.create_tag("bigscience/bloomz-560m", "v1.0", repo.branches["main"])
    hub.commit("bigscience/bloomz-560m", {"README.md": "---\nlicense: bigscience-bloom-rail-1.0\n---\n# later\n"})
    report = int8.convert("bloomz-560m", tmp_path / "out", revision="v1.0", device="cpu")
    assert report.source.kind == "preset" and report.source.preset == "bloomz-560m"
    assert report.source.id == "bigscience/bloomz-560m" and report.source.revision == "v1.0"
    assert report.source.commit == repo.tags["v1.0"] != repo.branches["main"]
    assert report.quantization.block_size == 32 and report.quantization.dtype == "bfloat16"  # default block, the preset's dtype


# --------------------------------------------------------------------------- private repos


def test_private_repo_with_and_without_a_token(hub, tiny_gptj, tmp_path):
    hub.create_repo("alice/secret", tiny_gptj, private=True)
    with pytest.raises(SourceNotFound, match="HF_TOKEN") as e:
        convert("alice/secret", tmp_path / "anon")
    assert "alice/secret" in str(e.value)
    hub.login("bob")  # a valid token without access sees nothing either
    with pytest.raises(SourceNotFound):
        convert("alice/secret", tmp_path / "bob")
    hub.login("alice_read")
    report = convert("alice/secret", tmp_path / "alice")
    assert report.source.commit == hub.repo("alice/secret").branches["main"]
    assert all(r.auth_sent for r in hub.log.downloads())
    # an explicit token wins over HF_TOKEN
    hub.login("bob")
    report = convert("alice/secret", tmp_path / "explicit", token=hub.tokens.alice)
    assert report.source.id == "alice/secret"


# --------------------------------------------------------------------------- errors


def test_errors_are_user_errors(hub, history, tiny_gptj, tmp_path):
    with pytest.raises(SourceNotFound, match="'alice/nope' is not a preset, a local folder, or a model repo"):
        convert("alice/nope", tmp_path / "o")
    with pytest.raises(SourceNotFound, match="revision 'v9' does not exist in alice/tiny"):
        convert("alice/tiny", tmp_path / "o", revision="v9")
    hub.create_repo("alice/empty", {"config.json": tiny_gptj["config.json"], "README.md": "# nothing\n"})
    with pytest.raises(NoWeightsFound, match="alice/empty has no model.safetensors or pytorch_model.bin") as e:
        convert("alice/empty", tmp_path / "o")
    assert "config.json" in e.value.hint
    hub.login("invalid")
    with pytest.raises(HubError, match="rejected the token \\(401\\)"):
        convert("alice/tiny", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_errors_exit_2_without_traceback(hub, history, tiny_gptj, tmp_path, capsys):
    hub.create_repo("alice/empty", {"config.json": tiny_gptj["config.json"]})
    hub.create_repo("alice/secret", tiny_gptj, private=True)
    cases = [
        (None, ["alice/nope"], "'alice/nope' is not a preset, a local folder, or a model repo"),
        (None, ["alice/tiny", "--revision", "v9"], "revision 'v9' does not exist in alice/tiny"),
        (None, ["alice/empty"], "alice/empty has no model.safetensors or pytorch_model.bin"),
        (None, ["alice/secret"], "If the repo is private, set HF_TOKEN"),
        ("invalid", ["alice/tiny"], "the Hub rejected the token (401)"),
    ]
    for user, args, message in cases:
        hub.login(user)
        code, out, err = run_main(capsys, "convert", *args, "--out", str(tmp_path / "o"))
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err
        assert hub.tokens.invalid not in out + err
    assert not (tmp_path / "o").exists()


def test_server_that_does_not_answer_fails_in_bounded_time(hub, history, tmp_path, monkeypatch, fast_retries):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.unresponsive_endpoint)
    monkeypatch.setenv("INT8_HUB_TIMEOUT", "0.3")
    t0 = time.monotonic()
    with pytest.raises(HubError, match="did not answer in time") as e:
        convert("alice/tiny", tmp_path / "o")
    assert time.monotonic() - t0 < 10
    assert "INT8_HUB_TIMEOUT" in e.value.hint

    # The real server hangs after answering the repo info: listing and fetching the files are bounded too.
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    for kinds in (["tree"], ["resolve"]):
        hub.faults.hang(kind=kinds)
        t0 = time.monotonic()
        with pytest.raises(HubError, match="cannot be reached|did not answer"):
            convert("alice/tiny", tmp_path / "o")
        assert time.monotonic() - t0 < 10, kinds
        hub.faults.clear()
    assert hub.log.count(kind="repo-info") >= 2

    monkeypatch.setenv("INT8_HUB_TIMEOUT", "soon")
    with pytest.raises(Int8Error, match="INT8_HUB_TIMEOUT='soon' is not a number"):
        convert("alice/tiny", tmp_path / "o")


def test_verify_against_a_server_that_does_not_answer(hub, monkeypatch, fast_retries):
    """`int8 verify OWNER/NAME` downloads through the same bounded path as convert."""
    from huggingface_hub import constants

    from int8.verify import verify_checkpoint

    monkeypatch.setattr(constants, "ENDPOINT", hub.unresponsive_endpoint)
    monkeypatch.setenv("INT8_HUB_TIMEOUT", "0.3")
    t0 = time.monotonic()
    with pytest.raises(HubError, match="did not answer in time"):
        verify_checkpoint("alice/tiny-int8", quick=True)
    assert time.monotonic() - t0 < 10


def test_subprocess_against_a_server_that_does_not_answer(hub, tmp_path):
    env = hub.env(HF_ENDPOINT=hub.unresponsive_endpoint, INT8_HUB_TIMEOUT="1", PYTHONWARNINGS="ignore")
    t0 = time.monotonic()
    r = subprocess.run([*INT8, "convert", "alice/tiny", "--out", str(tmp_path / "o")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "did not answer in time" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 40


def test_refused_connection(hub, tmp_path):
    hub.stop()
    with pytest.raises(HubError, match="cannot reach the Hub"):
        convert("alice/tiny", tmp_path / "o")
