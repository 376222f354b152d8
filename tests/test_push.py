"""`int8 push` and `int8 convert --push`, against the test Hub (tests/hubserver.py) with the real client.

Verify's quick checks gate every upload; the repo is created when needed; the
weights go through LFS; an interrupted upload finishes on a re-run without
sending finished files again; the token is never printed, logged or written;
every refusal is a clear message with exit code 2.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from models import make_tiny
from test_card import ORIGINAL_CARD, python_blocks, verify_result
from test_convert import stock_load
from test_hub_download import INT8, folder_files, run_main

import int8
from int8.errors import HubError, VerificationFailed
from int8.hub.upload import PushResult, push


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_tree(root: Path) -> dict[str, bytes]:
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny GPT-J converted from a local folder into several shards (several LFS files)."""
    root = tmp_path_factory.mktemp("converted")
    src = make_tiny("gptj", root / "tiny")
    int8.convert(src, root / "tiny-int8", block_size=64, device="cpu", max_shard_size="150KB")
    return root / "tiny-int8"


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    """A private copy (push rewrites README.md; some tests damage files)."""
    return Path(shutil.copytree(converted, tmp_path / "tiny-int8"))


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


# --------------------------------------------------------------------------- the library call


def test_push_uploads_the_verified_folder(hub, folder, caplog):
    caplog.set_level(logging.DEBUG)
    token = hub.tokens.alice
    steps: list[str] = []
    result = push(folder, "alice/tiny-int8", token=token, quiet=True, progress=steps.append)

    repo = hub.repo("alice/tiny-int8")
    assert isinstance(result, PushResult) and result.repo_id == "alice/tiny-int8"
    assert result.commit == repo.branches["main"]
    assert result.commit_url == f"{hub.endpoint}/alice/tiny-int8/commit/{result.commit}"
    assert result.repo_url == f"{hub.endpoint}/alice/tiny-int8" and result.pr_url is None
    assert not repo.private
    assert [s.split(" ")[0] for s in steps] == ["Running", "Rendering", "Uploading"]  # verified before any change

    # Byte for byte what the folder holds (README.md rendered for the repo), weights through LFS.
    files = hub.files("alice/tiny-int8")
    assert files.pop(".gitattributes").startswith(b"*.7z")
    assert files == folder_files(folder)
    for shard in shards(folder):
        assert hub.blob("alice/tiny-int8", shard.name).lfs
        (put,) = hub.log.lfs_uploads(oid=sha256(shard.read_bytes()), completed=True)
        assert not put.auth_sent
    assert len(shards(folder)) >= 3
    assert hub.log.count(kind="validate-yaml", status=200) >= 1
    _, text = ModelCard.load(folder / "README.md").data, ModelCard.load(folder / "README.md").text
    assert 'from_pretrained("alice/tiny-int8"' in text and "vllm serve alice/tiny-int8" in text
    assert "tiny-int8\"" not in text.replace("alice/tiny-int8\"", "")
    assert repo.commits[result.commit].title == "Upload int8 checkpoint of tiny (block size 64)"

    # The token reached the server and nothing else.
    assert all(r.auth_sent for r in hub.log.filter(kind="commit"))
    assert token not in caplog.text
    assert all(token.encode() not in data for data in hub.files("alice/tiny-int8").values())

    # Pushing again is a no-op commit that sends no weights.
    hub.log.clear()
    push(folder, "alice/tiny-int8", token=token, quiet=True)
    assert hub.log.lfs_uploads() == []


def test_push_refuses_what_fails_the_quick_checks(hub, folder, capsys):
    shard = shards(folder)[1]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="failed int8 verify's quick checks, so nothing was published") as e:
        push(folder, "alice/tiny-int8", token=hub.tokens.alice)
    assert shard.name in str(e.value)
    assert hub.log.count(kind="create-repo") == 0 and hub.log.lfs_uploads() == [] and hub.log.count(kind="commit") == 0
    assert ("model", "alice/tiny-int8") not in hub.repos

    hub.login("alice")
    code, _, err = run_main(capsys, "push", str(folder), "--repo", "alice/tiny-int8")
    assert code == 2 and "nothing was published" in err and "Traceback" not in err
    (folder / "int8_report.json").unlink()  # its card still says int8 wrote it: a removed report, not another tool's
    code, _, err = run_main(capsys, "push", str(folder), "--repo", "alice/tiny-int8")
    assert code == 2 and "but its int8_report.json is missing" in err and "Traceback" not in err
    (folder / "README.md").unlink()  # no mark of int8 left: another tool's checkpoint, which push does not publish
    code, _, err = run_main(capsys, "push", str(folder), "--repo", "alice/tiny-int8")
    assert code == 2 and "was not written by `int8 convert`" in err and "int8's own conversions only" in err
    assert ("model", "alice/tiny-int8") not in hub.repos


# --------------------------------------------------------------------------- the command line


def test_cli_push_options(hub, folder, capsys):
    hub.login("alice")
    code, out, err = run_main(capsys, "push", str(folder), "--repo", "tiny-int8", "--private", "-m", "First cut")
    assert code == 0, err
    repo = hub.repo("alice/tiny-int8")  # no owner: the token's own namespace
    assert repo.private and repo.commits[repo.branches["main"]].title == "First cut"
    assert f"Published to {hub.endpoint}/alice/tiny-int8" in out
    assert f"commit: {hub.endpoint}/alice/tiny-int8/commit/{repo.branches['main']}" in out

    # --revision: a branch, created from main; main stays as it was. A full verify result is now in the
    # folder: push records it in the card.
    main = repo.branches["main"]
    verify_result(folder)
    code, out, err = run_main(capsys, "push", str(folder), "--repo", "alice/tiny-int8", "--revision", "v2", "--quiet")
    assert code == 0, err
    assert out == f"{hub.endpoint}/alice/tiny-int8/commit/{repo.branches['v2']}"  # --quiet: the URL alone
    assert repo.branches["main"] == main and repo.branches["v2"] != main
    assert err == ""
    card = hub.file_bytes("alice/tiny-int8", "README.md", "v2").decode()
    assert "| top-1 next-token agreement with the original | 0.9838 |" in card
    assert "Not measured yet" in hub.file_bytes("alice/tiny-int8", "README.md", "main").decode()
    assert "int8_verify.json" in hub.files("alice/tiny-int8", "v2")

    # --create-pr: bob cannot write to alice's namespace but may open a pull request on her public repo.
    hub.create_repo("alice/pr-target", {"config.json": "{}"})
    before = hub.repo("alice/pr-target").branches["main"]
    hub.login("bob")
    code, out, err = run_main(capsys, "push", str(folder), "--repo", "alice/pr-target", "--create-pr")
    assert code == 0, err
    target = hub.repo("alice/pr-target")
    assert f"pull request: {hub.endpoint}/alice/pr-target/discussions/1" in out
    assert target.branches["main"] == before
    pr_files = hub.files("alice/pr-target", "refs/pr/1")
    assert pr_files["model.safetensors.index.json"] == (folder / "model.safetensors.index.json").read_bytes()
    code, _, err = run_main(capsys, "push", str(folder), "--repo", "alice/not-there", "--create-pr")
    assert code == 2 and "a pull request needs an existing repo" in err
    code, _, err = run_main(capsys, "push", str(folder), "--repo", "alice/pr-target")
    assert code == 2 and "no write access to 'alice' (403)" in err


@pytest.mark.parametrize(
    "user,repo_id,message",
    [
        (None, "alice/x", "no Hugging Face token"),
        ("invalid", "alice/x", "the Hub rejected the token (401)"),
        ("alice", "bob/x", "no write access to 'bob' (403)"),
        ("alice_read", "alice/x", "no write access to 'alice' (403)"),
        ("alice", "alice/bad--name", "is not a valid Hub repo id"),
        ("alice", "a/b/c", "is not a valid Hub repo id"),
        ("alice", "alice/x.git", "is not a valid Hub repo id"),
    ],
)
def test_cli_push_errors_exit_2(hub, folder, capsys, user, repo_id, message):
    hub.login(user)
    code, out, err = run_main(capsys, "push", str(folder), "--repo", repo_id)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert hub.repos == {} and hub.log.lfs_uploads() == []
    for name in ("alice", "alice_read", "bob", "invalid"):
        assert hub.tokens[name] not in out + err


def test_network_failures_are_bounded_and_clear(hub, folder, capsys, monkeypatch, fast_retries):
    from huggingface_hub import constants

    hub.login("alice")
    monkeypatch.setattr(constants, "ENDPOINT", hub.unresponsive_endpoint)
    monkeypatch.setenv("INT8_HUB_TIMEOUT", "0.3")
    t0 = time.monotonic()
    with pytest.raises(HubError, match="did not answer in time"):
        push(folder, "alice/x", quiet=True)
    assert time.monotonic() - t0 < 10
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)

    # The server stops answering halfway: while the weights go up, then at the commit.
    for kind in ("lfs-upload", "commit"):
        hub.faults.hang(kind=kind)
        t0 = time.monotonic()
        with pytest.raises(HubError, match="did not answer in time|interrupted") as e:
            push(folder, "alice/x", quiet=True)
        assert time.monotonic() - t0 < 10, kind
        assert "Run the same command again" in e.value.hint
        hub.faults.clear()
    from huggingface_hub.utils import close_session

    hub.stop()
    close_session()  # a kept-alive connection would outlive the server's listening socket
    code, _, err = run_main(capsys, "push", str(folder), "--repo", "alice/x")
    assert code == 2 and "cannot reach the Hub" in err and "Traceback" not in err


def test_stored_login_token_is_used(hub, folder):
    from huggingface_hub import constants

    Path(constants.HF_TOKEN_PATH).write_text(hub.tokens.bob)  # what `hf auth login` leaves
    result = push(folder, "bob/tiny-int8", quiet=True)
    assert result.repo_id == "bob/tiny-int8" and "bob/tiny-int8" in result.commit_url


def test_interrupted_push_then_rerun_sends_only_what_is_missing(hub, folder, capsys, fast_retries):
    hub.login("alice")
    parts = {sha256(p.read_bytes()): p.name for p in shards(folder)}
    broken = sha256(shards(folder)[2].read_bytes())
    hub.faults.drop_lfs_upload(times=None, oid=broken)  # every try loses the connection halfway
    code, _, err = run_main(capsys, "push", str(folder), "--repo", "alice/tiny-int8")
    assert code == 2, err
    assert "the upload to alice/tiny-int8 was interrupted" in err and "Run the same command again" in err
    size = (folder / parts[broken]).stat().st_size
    attempts = hub.log.lfs_uploads(oid=broken)
    assert attempts and all(a.dropped and 0 < a.request_bytes < size for a in attempts)
    done = {r.oid for r in hub.log.lfs_uploads(completed=True)}
    assert done and broken not in done and hub.log.count(kind="commit") == 0

    hub.faults.clear()
    hub.log.clear()
    code, out, err = run_main(capsys, "push", str(folder), "--repo", "alice/tiny-int8")
    assert code == 0, err
    resent = {r.oid for r in hub.log.lfs_uploads()}
    assert resent == set(parts) - done and broken in resent  # finished files are not sent again
    files = hub.files("alice/tiny-int8")
    files.pop(".gitattributes")
    assert files == folder_files(folder)


# --------------------------------------------------------------------------- the proof


def test_convert_and_push_round_trip(hub, tmp_path, monkeypatch):
    """FP32 tiny model on the Hub -> `int8 convert USER/tiny --push USER/tiny-int8` -> a fresh download is
    byte-identical, its card reads back, transformers loads it from the Hub and the card's snippet runs."""
    src = make_tiny("gptj", tmp_path / "fp32")
    hub.create_repo("alice/tiny", {**folder_files(src), "README.md": ORIGINAL_CARD})
    token = hub.tokens.alice
    work = tmp_path / "work"
    work.mkdir()
    env = hub.env(user="alice", PYTHONWARNINGS="ignore")
    r = subprocess.run([*INT8, "convert", "alice/tiny", "--push", "alice/tiny-int8"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    out = work / "tiny-int8"
    commit = hub.repo("alice/tiny-int8").branches["main"]
    assert f"commit: {hub.endpoint}/alice/tiny-int8/commit/{commit}" in r.stdout

    # The token: sent to the server, and found nowhere else.
    for text in (r.stdout, r.stderr):
        assert token not in text
    assert all(token.encode() not in data for data in read_tree(out).values())
    assert all(token.encode() not in data for data in hub.files("alice/tiny-int8").values())

    # A fresh cache gets exactly the local output.
    fresh = snapshot_download("alice/tiny-int8", cache_dir=tmp_path / "fresh-cache")
    got = read_tree(Path(fresh))
    got.pop(".gitattributes")
    assert got == read_tree(out)
    assert Path(fresh).name == commit

    data = ModelCard.load(Path(fresh) / "README.md").data.to_dict()
    assert data["base_model"] == "alice/tiny" and data["base_model_relation"] == "quantized"
    assert data["license"] == "mit" and data["language"] == ["en", "fr"] and data["datasets"] == ["wikitext"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert set(data["tags"]) == {"8-bit", "int8", "compressed-tensors", "gptj"}

    # transformers loads it from the (local) Hub and computes what the local folder computes.
    import transformers as tf

    from_hub = tf.AutoModelForCausalLM.from_pretrained("alice/tiny-int8").eval()
    local, info = stock_load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[5, 17, 99, 200, 3]])
    with torch.no_grad():
        assert torch.equal(from_hub(ids).logits, local(ids).logits)

    # The card's transformers snippet, copied as is, runs against the Hub.
    snippet = python_blocks(ModelCard.load(out / "README.md").text)[0]
    assert '"alice/tiny-int8"' in snippet
    scope: dict = {}
    exec(compile(snippet.replace("max_new_tokens=32", "max_new_tokens=4"), "card-snippet", "exec"), scope)
    assert isinstance(scope["model"], tf.GPTJForCausalLM)


@pytest.mark.parametrize(
    "user,repo_id,message", [(None, "alice/x", "no Hugging Face token"), ("alice", "a/b/c", "not a valid Hub repo id")]
)
def test_convert_push_checks_the_token_before_converting(hub, capsys, tmp_path, user, repo_id, message):
    """`int8 convert SRC --push ID` with no token (or a bad id) fails at once: nothing is converted."""
    src = make_tiny("gptj", tmp_path / "src")
    hub.login(user)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "convert", str(src), "--out", str(out), "--push", repo_id)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()
