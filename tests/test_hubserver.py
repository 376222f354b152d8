"""The test Hub (tests/hubserver.py) against the real huggingface_hub client.

Every test drives the real client (in-process or in a subprocess) and checks what it got
back and what the server saw, so a server that answers wrongly makes the test fail.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hubserver import HubServer, git_blob_sha, validate_card_metadata

pytest.importorskip("huggingface_hub")

import httpx2  # noqa: E402  (huggingface_hub's HTTP client)
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(n: int, seed: int) -> bytes:
    """Deterministic bytes that look binary (so the Hub would store them with LFS)."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:n])


def read_tree(root) -> dict:
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


@pytest.fixture
def model_dir(tmp_path):
    """A small checkpoint folder: JSON config, a 'large' LFS weight file, a nested text file."""
    d = tmp_path / "model"
    (d / "extra").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (d / "model.safetensors").write_bytes(blob(48_000, 1))
    (d / "extra" / "notes.txt").write_text("quantized with int8\n")
    return d


@pytest.fixture
def seeded(hub):
    """alice/history: main has two commits, tag v1 on the first, branch dev with its own file."""
    repo = hub.create_repo("alice/history", {"config.json": '{"v": 1}', "model.safetensors": blob(3000, 1)})
    first = repo.branches["main"]
    hub.create_tag("alice/history", "v1", first)
    hub.create_branch("alice/history", "dev", first)
    hub.commit("alice/history", {"dev.txt": "only on dev"}, branch="dev", message="dev work")
    second = hub.commit("alice/history", {"config.json": '{"v": 2}', "model.safetensors": blob(3000, 2)})
    return SimpleRepo(repo_id="alice/history", first=first, second=second)


class SimpleRepo:
    def __init__(self, **kw):
        self.__dict__.update(kw)


# --------------------------------------------------------------------------- upload + download


def test_upload_folder_then_snapshot_download_round_trip(hub, model_dir, tmp_path):
    api = HfApi(token=hub.tokens.alice)
    url = api.create_repo("alice/tiny-int8")
    assert url == f"{hub.endpoint}/alice/tiny-int8"

    info = api.upload_folder(repo_id="alice/tiny-int8", folder_path=model_dir, commit_message="add weights")

    # The weights went through the LFS path: preupload said "lfs", the bytes were PUT to
    # the upload URL without credentials, and the commit referenced them by sha256.
    weights = (model_dir / "model.safetensors").read_bytes()
    puts = hub.log.lfs_uploads(oid=sha256(weights), completed=True)
    assert len(puts) == 1 and puts[0].request_bytes == len(weights)
    assert not puts[0].auth_sent
    assert hub.log.count(kind="lfs-batch", auth_sent=True) == 1
    stored = hub.blob("alice/tiny-int8", "model.safetensors")
    assert stored.lfs and stored.sha256 == sha256(weights)
    assert not hub.blob("alice/tiny-int8", "config.json").lfs
    assert hub.repo("alice/tiny-int8").branches["main"] == info.oid
    assert hub.repo("alice/tiny-int8").commits[info.oid].title == "add weights"

    # Download into a fresh cache and compare every byte.
    cache = tmp_path / "fresh-cache"
    path = snapshot_download("alice/tiny-int8", cache_dir=cache)
    assert Path(path).parent.parent.parent == cache
    assert Path(path).name == info.oid
    got = read_tree(path)
    assert got.pop(".gitattributes").startswith(b"*.7z filter=lfs")  # written by create_repo, like the Hub
    assert got == read_tree(model_dir)
    # The LFS file was served with the LFS headers and keyed by its sha256 in the cache.
    assert (cache / "models--alice--tiny-int8" / "blobs" / sha256(weights)).exists()


def test_model_info_tree_and_file_metadata(hub, model_dir):
    api = HfApi(token=hub.tokens.alice)
    api.create_repo("alice/meta")
    api.upload_folder(repo_id="alice/meta", folder_path=model_dir)
    weights = (model_dir / "model.safetensors").read_bytes()

    info = api.model_info("alice/meta", files_metadata=True)
    assert info.id == "alice/meta" and info.private is False and len(info.sha) == 40
    sib = {s.rfilename: s for s in info.siblings}
    assert set(sib) == {".gitattributes", "config.json", "model.safetensors", "extra/notes.txt"}
    assert sib["model.safetensors"].lfs.sha256 == sha256(weights)
    assert sib["config.json"].blob_id == git_blob_sha((model_dir / "config.json").read_bytes())

    tree = {e.path: e for e in api.list_repo_tree("alice/meta", recursive=True)}
    assert "extra" in tree and not hasattr(tree["extra"], "size")  # a RepoFolder
    assert tree["model.safetensors"].lfs.size == len(weights)
    top = {e.path for e in api.list_repo_tree("alice/meta")}
    assert top == {".gitattributes", "config.json", "model.safetensors", "extra"}
    assert [e.path for e in api.list_repo_tree("alice/meta", path_in_repo="extra")] == ["extra/notes.txt"]
    assert sorted(api.list_repo_files("alice/meta")) == sorted(sib)

    assert api.file_exists("alice/meta", "extra/notes.txt")
    assert not api.file_exists("alice/meta", "nope.bin")
    assert api.repo_exists("alice/meta") and not api.repo_exists("alice/nope")
    assert api.revision_exists("alice/meta", "main") and not api.revision_exists("alice/meta", "nope")

    paths = api.get_paths_info("alice/meta", ["config.json", "extra", "missing"])
    assert [p.path for p in paths] == ["config.json", "extra"]

    # Raw HEAD on /resolve: the headers the client builds its metadata from.
    req = urllib.request.Request(f"{hub.endpoint}/alice/meta/resolve/main/model.safetensors", method="HEAD")
    with urllib.request.urlopen(req) as r:
        assert r.headers["X-Repo-Commit"] == info.sha
        assert r.headers["X-Linked-Etag"] == f'"{sha256(weights)}"'
        assert r.headers["X-Linked-Size"] == str(len(weights))
        assert r.headers["Content-Length"] == str(len(weights))
    req = urllib.request.Request(f"{hub.endpoint}/alice/meta/resolve/main/config.json", method="HEAD")
    with urllib.request.urlopen(req) as r:
        assert r.headers["ETag"] == f'"{sib["config.json"].blob_id}"'
        assert "X-Linked-Etag" not in r.headers


def test_tree_listing_is_paginated(hub):
    hub.create_repo("alice/many", {f"f{i:02d}.txt": f"file {i}" for i in range(7)})
    hub.tree_page_size = 3
    files = HfApi().list_repo_files("alice/many")
    assert sorted(files) == [f"f{i:02d}.txt" for i in range(7)]
    assert hub.log.count(kind="tree") == 3  # 3 + 3 + 1, following the Link headers


def test_revisions_by_branch_tag_and_commit_sha(hub, seeded, tmp_path):
    r = seeded
    by_tag = read_tree(snapshot_download(r.repo_id, revision="v1", cache_dir=tmp_path / "c1"))
    by_sha = read_tree(snapshot_download(r.repo_id, revision=r.first, cache_dir=tmp_path / "c2"))
    by_branch = read_tree(snapshot_download(r.repo_id, revision="dev", cache_dir=tmp_path / "c3"))
    main = read_tree(snapshot_download(r.repo_id, cache_dir=tmp_path / "c4"))

    assert by_tag == by_sha == {"config.json": b'{"v": 1}', "model.safetensors": blob(3000, 1)}
    assert by_branch == {**by_tag, "dev.txt": b"only on dev"}
    assert main == {"config.json": b'{"v": 2}', "model.safetensors": blob(3000, 2)}

    # hf_hub_download resolves the same way and the cache records the ref.
    p = hf_hub_download(r.repo_id, "config.json", revision="v1", cache_dir=tmp_path / "c5")
    assert Path(p).read_bytes() == b'{"v": 1}'
    assert (tmp_path / "c5" / "models--alice--history" / "refs" / "v1").read_text() == r.first

    refs = HfApi().list_repo_refs(r.repo_id)
    assert {b.name: b.target_commit for b in refs.branches}["main"] == r.second
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": r.first}
    commits = HfApi().list_repo_commits(r.repo_id)
    assert [c.commit_id for c in commits] == [r.second, r.first]


def test_missing_revision_and_file_raise_the_client_errors(hub, seeded):
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(seeded.repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(seeded.repo_id, revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(seeded.repo_id, "no-such-file.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/no-such-repo", "config.json")


def test_allow_patterns_fetches_only_matching_files(hub, model_dir):
    hub.create_repo("alice/patterns", {p: (model_dir / p).read_bytes()
                                       for p in ("config.json", "model.safetensors", "extra/notes.txt")})
    path = snapshot_download("alice/patterns", allow_patterns=["*.json"])
    assert read_tree(path) == {"config.json": (model_dir / "config.json").read_bytes()}
    assert hub.log.downloaded_files() == {"config.json"}
    assert hub.log.count(kind="resolve", filename="model.safetensors") == 0


def test_second_download_is_served_from_the_cache(hub, seeded):
    first = snapshot_download(seeded.repo_id)
    hub.log.clear()

    assert snapshot_download(seeded.repo_id, local_files_only=True) == first
    assert hf_hub_download(seeded.repo_id, "config.json", local_files_only=True) == os.path.join(first, "config.json")
    hub.offline()
    assert snapshot_download(seeded.repo_id) == first
    assert len(hub.log) == 0, hub.log.summary()

    # Something never downloaded is not made up from the cache.
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("alice/never-downloaded")


def test_subprocess_download_then_offline(hub, seeded, tmp_path):
    script = textwrap.dedent("""
        import sys
        from huggingface_hub import snapshot_download
        print(snapshot_download(sys.argv[1]))
    """)
    env = hub.env(user="alice", hf_home=tmp_path / "proc-home")
    out = subprocess.run([sys.executable, "-c", script, seeded.repo_id], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path / "proc-home"))
    assert read_tree(path)["config.json"] == b'{"v": 2}'
    assert hub.log.count(kind="repo-info", auth_sent=True, user="alice") == 1

    hub.log.clear()
    offline = hub.env(hf_home=tmp_path / "proc-home", offline=True)
    out = subprocess.run([sys.executable, "-c", script, seeded.repo_id], env=offline, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == path
    assert len(hub.log) == 0, hub.log.summary()


# --------------------------------------------------------------------------- auth


def test_private_repo_needs_a_token_with_access(hub, tmp_path):
    hub.create_repo("alice/secret", {"config.json": "{}"}, private=True)

    for token in (None, hub.tokens.bob):
        with pytest.raises(RepositoryNotFoundError) as e:
            snapshot_download("alice/secret", token=token, cache_dir=tmp_path / "c0")
        assert not isinstance(e.value, GatedRepoError)
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token or False).model_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret", "config.json", token=token, cache_dir=tmp_path / "c0")
    assert {r.status for r in hub.log.filter(kind="repo-info", auth_sent=False)} == {401}
    assert {r.status for r in hub.log.filter(kind="repo-info", auth_sent=True)} == {404}

    for token in (hub.tokens.alice, hub.tokens.alice_read):
        path = snapshot_download("alice/secret", token=token, cache_dir=tmp_path / token)
        assert read_tree(path) == {"config.json": b"{}"}
    assert HfApi(token=hub.tokens.alice).model_info("alice/secret").private is True

    hub.login("alice")  # HF_TOKEN, the way the CLI gets it
    assert HfApi().model_info("alice/secret").private is True


def test_org_private_repo_visible_to_members(hub):
    hub.create_repo("int8-org/internal", {"a.txt": "x"}, private=True)
    assert HfApi(token=hub.tokens.alice).model_info("int8-org/internal").id == "int8-org/internal"
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=hub.tokens.bob).model_info("int8-org/internal")


def test_bad_token_is_rejected_with_401(hub, seeded):
    api = HfApi(token=hub.tokens.invalid)
    with pytest.raises(HfHubHTTPError) as e:
        api.whoami()
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        api.model_info(seeded.repo_id)  # even for a public repo
    assert e.value.response.status_code == 401 and not isinstance(e.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as e:
        snapshot_download(seeded.repo_id, token=hub.tokens.invalid)
    assert e.value.response.status_code == 401
    assert HfApi(token=hub.tokens.alice).whoami()["name"] == "alice"
    assert [o["name"] for o in HfApi(token=hub.tokens.alice).whoami()["orgs"]] == ["int8-org"]
    assert HfApi(token=hub.tokens.alice_read).whoami()["auth"]["accessToken"]["role"] == "read"


def test_writing_to_someone_elses_namespace_is_forbidden(hub, tmp_path):
    alice = HfApi(token=hub.tokens.alice)
    with pytest.raises(HfHubHTTPError) as e:
        alice.create_repo("bob/stolen")
    assert e.value.response.status_code == 403
    assert ("model", "bob/stolen") not in hub.repos

    hub.create_repo("bob/weights", {"a.txt": "bob's"})
    with pytest.raises(HfHubHTTPError) as e:
        alice.upload_file(path_or_fileobj=b"alice was here", path_in_repo="a.txt", repo_id="bob/weights")
    assert e.value.response.status_code == 403
    assert hub.file_bytes("bob/weights", "a.txt") == b"bob's"

    # A read-only token cannot write even to its own namespace.
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(token=hub.tokens.alice_read).create_repo("alice/readonly")
    assert e.value.response.status_code == 403
    # No token at all: 401.
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(token=False).create_repo("alice/anon")
    assert e.value.response.status_code == 401
    # But the org namespace is alice's to write.
    assert alice.create_repo("int8-org/shared") == f"{hub.endpoint}/int8-org/shared"


def test_create_repo_twice(hub):
    api = HfApi(token=hub.tokens.alice)
    first = api.create_repo("alice/twice", private=True)
    head = hub.repo("alice/twice").branches["main"]
    assert api.create_repo("alice/twice", exist_ok=True) == first
    assert hub.repo("alice/twice").branches["main"] == head and hub.repo("alice/twice").private
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("alice/twice")
    assert e.value.response.status_code == 409
    assert e.value.response.json()["url"] == first


# --------------------------------------------------------------------------- commits, branches, PRs


def test_create_pr_gives_a_pr_ref_and_leaves_main_alone(hub, seeded, tmp_path):
    main_before = hub.repo(seeded.repo_id).branches["main"]
    # bob may open a PR on alice's public repo, but not push to main
    info = HfApi(token=hub.tokens.bob).upload_file(
        path_or_fileobj=b'{"v": 3}', path_in_repo="config.json", repo_id=seeded.repo_id, create_pr=True,
        commit_message="bump config")
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert info.pr_url == f"{hub.endpoint}/{seeded.repo_id}/discussions/1"
    assert hub.repo(seeded.repo_id).branches["main"] == main_before
    assert hub.repo(seeded.repo_id).pr_heads["refs/pr/1"] == info.oid

    p = hf_hub_download(seeded.repo_id, "config.json", revision=info.pr_revision, cache_dir=tmp_path / "c")
    assert Path(p).read_bytes() == b'{"v": 3}'
    refs = HfApi().list_repo_refs(seeded.repo_id, include_pull_requests=True)
    assert [(p.ref, p.target_commit) for p in refs.pull_requests] == [("refs/pr/1", info.oid)]

    with pytest.raises(HfHubHTTPError) as e:
        HfApi(token=hub.tokens.bob).upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=seeded.repo_id)
    assert e.value.response.status_code == 403

    # A second PR with an LFS file gets the next number; the author can push to its ref.
    api = HfApi(token=hub.tokens.alice)
    info2 = api.upload_file(path_or_fileobj=blob(2000, 9), path_in_repo="model.safetensors",
                            repo_id=seeded.repo_id, create_pr=True)
    assert info2.pr_revision == "refs/pr/2"
    info3 = api.upload_file(path_or_fileobj=b"more", path_in_repo="more.txt", repo_id=seeded.repo_id,
                            revision="refs/pr/2")
    assert hub.files(seeded.repo_id, "refs/pr/2")["model.safetensors"] == blob(2000, 9)
    assert hub.repo(seeded.repo_id).commits[info3.oid].parents == [info2.oid]


def test_create_branch_tag_and_commit_operations(hub, tmp_path):
    api = HfApi(token=hub.tokens.alice)
    api.create_repo("alice/ops")
    c1 = api.create_commit("alice/ops", [
        CommitOperationAdd("a/one.txt", b"1"),
        CommitOperationAdd("a/two.txt", b"2"),
        CommitOperationAdd("w.bin", blob(500, 3)),
    ], commit_message="three files")
    api.create_branch("alice/ops", branch="release", revision=c1.oid)
    api.create_tag("alice/ops", tag="v0.1", revision="release")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_tag("alice/ops", tag="v0.1")
    assert e.value.response.status_code == 409
    api.create_branch("alice/ops", branch="release", exist_ok=True)

    c2 = api.create_commit("alice/ops", [CommitOperationDelete("a/"), CommitOperationAdd("b.txt", b"b")],
                           commit_message="replace folder", parent_commit=c1.oid)
    assert set(hub.files("alice/ops")) == {".gitattributes", "w.bin", "b.txt"}
    assert hub.files("alice/ops", "v0.1")["a/two.txt"] == b"2"
    assert hub.files("alice/ops", "release") == hub.files("alice/ops", c1.oid)

    with pytest.raises(HfHubHTTPError) as e:  # main moved on since c1
        api.create_commit("alice/ops", [CommitOperationAdd("c.txt", b"c")], commit_message="stale",
                          parent_commit=c1.oid)
    assert e.value.response.status_code == 412
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("alice/ops", [CommitOperationDelete("nope.txt")], commit_message="rm")

    # Re-uploading identical files makes no new commit (preupload reports the remote oids).
    before = hub.log.count(kind="commit")
    again = api.upload_file(path_or_fileobj=blob(500, 3), path_in_repo="w.bin", repo_id="alice/ops")
    assert again.oid == c2.oid and hub.log.count(kind="commit") == before
    assert hub.log.lfs_uploads(oid=sha256(blob(500, 3)), completed=True).__len__() == 1

    api.delete_tag("alice/ops", tag="v0.1")
    api.delete_branch("alice/ops", branch="release")
    refs = api.list_repo_refs("alice/ops")
    assert [b.name for b in refs.branches] == ["main"] and refs.tags == []

    api.update_repo_settings("alice/ops", private=True)
    assert hub.repo("alice/ops").private
    api.delete_repo("alice/ops")
    assert ("model", "alice/ops") not in hub.repos


def test_dataset_repo_and_gitignore(hub, tmp_path):
    api = HfApi(token=hub.tokens.alice)
    url = api.create_repo("alice/calib", repo_type="dataset")
    assert url == f"{hub.endpoint}/datasets/alice/calib"
    d = tmp_path / "ds"
    d.mkdir()
    (d / ".gitignore").write_text("*.log\n")
    (d / "train.parquet").write_bytes(blob(4000, 7))
    (d / "run.log").write_text("noise")
    api.upload_folder(repo_id="alice/calib", repo_type="dataset", folder_path=d)
    assert set(hub.files("alice/calib", repo_type="dataset")) == {".gitattributes", ".gitignore", "train.parquet"}
    assert hub.blob("alice/calib", "train.parquet", repo_type="dataset").lfs
    path = snapshot_download("alice/calib", repo_type="dataset", allow_patterns="*.parquet")
    assert read_tree(path) == {"train.parquet": blob(4000, 7)}
    head = hub.repo("alice/calib", "dataset").branches["main"]
    assert hub.log.downloads()[0].path == f"/datasets/alice/calib/resolve/{head}/train.parquet"
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("alice/calib")  # it is a dataset, not a model


def test_multipart_lfs_upload(hub):
    hub.lfs_multipart_chunk_size = 1000
    data = blob(2500, 5)
    api = HfApi(token=hub.tokens.alice)
    api.create_repo("alice/multi")
    api.upload_file(path_or_fileobj=data, path_in_repo="big.safetensors", repo_id="alice/multi")
    assert hub.file_bytes("alice/multi", "big.safetensors") == data
    parts = hub.log.filter(kind="lfs-upload-part", ok=True)
    assert [p.request_bytes for p in parts] == [1000, 1000, 500]
    assert not any(p.auth_sent for p in parts)
    assert hub.log.count(kind="lfs-complete", ok=True) == 1


# --------------------------------------------------------------------------- model card metadata


GOOD_CARD = """---
license: apache-2.0
language:
- en
- fil
base_model: meta-llama/Llama-3.2-1B
base_model_relation: quantized
pipeline_tag: text-generation
library_name: transformers
tags:
- int8
datasets:
- wikitext
---

# Tiny int8
"""


def test_validate_yaml_accepts_a_good_card_and_rejects_a_bad_license(hub):
    api = HfApi(token=hub.tokens.alice)
    api.create_repo("alice/card")

    bad = GOOD_CARD.replace("apache-2.0", "my-own-license")
    with pytest.raises(ValueError, match="license"):
        ModelCard(bad).push_to_hub("alice/card", token=hub.tokens.alice)  # text/plain path
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=bad.encode(), path_in_repo="README.md", repo_id="alice/card")  # JSON path
    assert "README.md" not in hub.files("alice/card")
    assert hub.log.count(kind="validate-yaml", status=400) == 2

    ModelCard(GOOD_CARD).push_to_hub("alice/card", token=hub.tokens.alice)
    assert hub.file_bytes("alice/card", "README.md").decode() == GOOD_CARD
    info = api.model_info("alice/card")
    assert info.card_data.license == "apache-2.0" and info.pipeline_tag == "text-generation"
    assert info.card_data.base_model == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize(
    "change, message",
    [
        (("apache-2.0", "apache"), "license"),
        (("- fil", "- English"), "language"),
        (("text-generation", "text-generator"), "pipeline_tag"),
        (("quantized", "quantised"), "base_model_relation"),
        (("- wikitext", "  wikitext: 3"), "datasets"),
        (("- int8", "  int8: 1"), "tags"),
        (("library_name: transformers", "library_name: [transformers]"), "library_name"),
        (("base_model: meta-llama/Llama-3.2-1B", "base_model: 7"), "base_model"),
    ],
)
def test_card_metadata_rules(change, message):
    assert validate_card_metadata(GOOD_CARD) == ([], [])
    errors, _ = validate_card_metadata(GOOD_CARD.replace(*change))
    assert errors and message in errors[0]


def test_card_metadata_edge_cases():
    assert validate_card_metadata("# no metadata\n")[1] == ["empty or missing yaml metadata in repo card"]
    assert validate_card_metadata("---\n- a\n- b\n---\n")[0]  # not a mapping
    assert validate_card_metadata("---\nlicense: [unclosed\n---\n")[0]  # not YAML
    for lic in ("mit", "bigscience-bloom-rail-1.0", "bigscience-openrail-m", "openrail", "cc-by-4.0",
                "cc-by-nc-4.0", "llama2", "other"):
        assert validate_card_metadata(f"---\nlicense: {lic}\nlicense_name: x\n---\n")[0] == []
    assert validate_card_metadata("---\nlanguage: zh\nbase_model: [a/b, c/d]\n---\n")[0] == []


# --------------------------------------------------------------------------- faults


def test_interrupted_lfs_upload_then_rerun_sends_only_the_unfinished_file(hub, tmp_path, fast_retries):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    first, second = blob(40_000, 11), blob(40_000, 12)
    (folder / "config.json").write_text("{}")
    (folder / "model-00001-of-00002.safetensors").write_bytes(first)
    (folder / "model-00002-of-00002.safetensors").write_bytes(second)
    api = HfApi(token=hub.tokens.alice)
    api.create_repo("alice/resume")

    # Every attempt at the second shard loses its connection halfway through the body.
    hub.faults.drop_lfs_upload(times=None, oid=sha256(second))
    with pytest.raises(Exception) as e:
        api.upload_folder(repo_id="alice/resume", folder_path=folder)
    assert "model-00002-of-00002.safetensors" in str(e.value)
    attempts = hub.log.lfs_uploads(oid=sha256(second))
    assert len(attempts) == 6 and all(a.dropped for a in attempts)  # 1 try + 5 client retries
    assert all(0 < a.request_bytes < len(second) for a in attempts)
    assert len(hub.log.lfs_uploads(oid=sha256(first), completed=True)) == 1
    assert hub.log.count(kind="commit") == 0
    assert set(hub.files("alice/resume")) == {".gitattributes"}

    # Re-run: the batch API has the first shard already, so only the second is sent.
    hub.faults.clear()
    hub.log.clear()
    api.upload_folder(repo_id="alice/resume", folder_path=folder)
    assert hub.log.lfs_uploads(oid=sha256(first)) == []
    assert len(hub.log.lfs_uploads(oid=sha256(second), completed=True)) == 1
    assert len(hub.log.lfs_uploads()) == 1
    files = hub.files("alice/resume")
    assert files["model-00001-of-00002.safetensors"] == first
    assert files["model-00002-of-00002.safetensors"] == second


def test_interrupted_upload_in_a_subprocess_then_rerun(hub, tmp_path):
    # In a subprocess the retry sleeps cannot be patched: a non-retried status (400) ends the
    # upload at once, which is what a CLI test wants.
    folder = tmp_path / "ckpt"
    folder.mkdir()
    first, second = blob(20_000, 41), blob(20_000, 42)
    (folder / "a.safetensors").write_bytes(first)
    (folder / "b.safetensors").write_bytes(second)
    hub.create_repo("alice/proc-resume", {})
    script = ("import sys; from huggingface_hub import HfApi; "
              "HfApi().upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2])")
    env = hub.env(user="alice", hf_home=tmp_path / "home")
    hub.faults.fail_lfs_upload(status=400, times=None, oid=sha256(second))
    out = subprocess.run([sys.executable, "-c", script, "alice/proc-resume", str(folder)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "b.safetensors" in out.stderr
    assert len(hub.log.lfs_uploads(oid=sha256(first), completed=True)) == 1
    assert hub.files("alice/proc-resume") == {}

    hub.faults.clear()
    hub.log.clear()
    out = subprocess.run([sys.executable, "-c", script, "alice/proc-resume", str(folder)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [r.oid for r in hub.log.lfs_uploads()] == [sha256(second)]
    assert hub.files("alice/proc-resume") == {"a.safetensors": first, "b.safetensors": second}


def test_one_dropped_upload_is_retried_by_the_client(hub, fast_retries):
    data = blob(10_000, 21)
    api = HfApi(token=hub.tokens.alice)
    api.create_repo("alice/retry")
    hub.faults.drop_lfs_upload(times=1)
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/retry")
    attempts = hub.log.lfs_uploads(oid=sha256(data))
    assert [a.dropped for a in attempts] == [True, False]
    assert hub.file_bytes("alice/retry", "w.safetensors") == data
    assert fast_retries.sleeps == [1]


def test_dropped_download_resumes_with_a_range_request(hub, fast_retries, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # The client only counts bytes it got in whole DOWNLOAD_CHUNK_SIZE (10 MB) chunks as
    # resumable; shrink the chunk so a small file shows the resume.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    data = blob(30_000, 31)
    hub.create_repo("alice/flaky", {"model.safetensors": data})
    hub.faults.drop_download(filename="model.safetensors")
    p = hf_hub_download("alice/flaky", "model.safetensors", cache_dir=tmp_path / "c")
    assert Path(p).read_bytes() == data
    first, second = hub.log.downloads("model.safetensors")
    assert first.dropped and first.status == 200 and first.response_bytes == 15_000
    assert second.range == "bytes=12288-" and second.status == 206  # 3 whole chunks were kept
    assert second.response_bytes == 30_000 - 12288
    assert fast_retries.sleeps == [1]


def test_download_reset_is_not_retried_by_the_client(hub, fast_retries, tmp_path):
    hub.create_repo("alice/reset", {"model.safetensors": blob(30_000, 32)})
    hub.faults.drop_download(filename="model.safetensors", reset=True)
    with pytest.raises(httpx2.ReadError):
        hf_hub_download("alice/reset", "model.safetensors", cache_dir=tmp_path / "c")
    blobs = tmp_path / "c" / "models--alice--reset" / "blobs"
    assert not blobs.exists() or not any(blobs.iterdir())  # no partial file left behind


def test_range_requests(hub):
    hub.create_repo("alice/range", {"a.txt": "0123456789"})
    url = f"{hub.endpoint}/alice/range/resolve/main/a.txt"
    for rng, body in (("bytes=2-4", b"234"), ("bytes=7-", b"789"), ("bytes=-3", b"789")):
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": rng})) as r:
            assert r.status == 206 and r.read() == body
            assert r.headers["Content-Range"].endswith("/10")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=20-"}))
    assert e.value.code == 416


def test_server_that_does_not_answer_fails_in_bounded_time(hub, seeded, tmp_path):
    dead = HfApi(endpoint=hub.unresponsive_endpoint)
    t0 = time.monotonic()
    with pytest.raises(httpx2.TimeoutException):
        dead.model_info(seeded.repo_id, timeout=0.5)
    assert time.monotonic() - t0 < 5

    # The real server stops answering: a cached file is still returned after the HEAD timeout.
    cached = hf_hub_download(seeded.repo_id, "config.json", cache_dir=tmp_path / "c")
    hub.faults.hang()
    t0 = time.monotonic()
    assert hf_hub_download(seeded.repo_id, "config.json", cache_dir=tmp_path / "c", etag_timeout=0.5) == cached
    with pytest.raises(httpx2.TimeoutException):
        HfApi().model_info(seeded.repo_id, timeout=0.5)
    assert time.monotonic() - t0 < 5
    hub.faults.release()
    assert HfApi().model_info(seeded.repo_id).sha == seeded.second


def test_subprocess_against_a_server_that_does_not_answer(hub, seeded, tmp_path):
    script = textwrap.dedent("""
        from huggingface_hub import HfApi
        from huggingface_hub import constants
        try:
            HfApi().model_info("alice/history", timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except Exception as e:
            print(type(e).__name__)
    """)
    env = hub.env(HF_ENDPOINT=hub.unresponsive_endpoint, HF_HUB_ETAG_TIMEOUT="1")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ReadTimeout", out.stderr
    assert time.monotonic() - t0 < 30


def test_stopped_server_refuses_connections(hub, seeded, fast_retries):
    hub.stop()
    with pytest.raises(httpx2.ConnectError):
        HfApi().model_info(seeded.repo_id, timeout=2)
    t0 = time.monotonic()
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(seeded.repo_id)  # no retry: fails at once
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(seeded.repo_id, "config.json")  # 5 retries, sleeps skipped by fast_retries
    assert time.monotonic() - t0 < 10
    assert len(fast_retries.sleeps) == 5


def test_injected_status_errors(hub, seeded, tmp_path):
    hub.faults.fail("repo-info", status=500, times=1)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi().model_info(seeded.repo_id)
    assert e.value.response.status_code == 500
    assert HfApi().model_info(seeded.repo_id).sha == seeded.second


def test_gated_repo(hub, tmp_path):
    hub.create_repo("alice/gated", {"README.md": "---\nlicense: mit\n---\n", "w.bin": blob(100, 1)}, gated="manual")
    assert HfApi().model_info("alice/gated").gated == "manual"
    with pytest.raises(GatedRepoError):
        hf_hub_download("alice/gated", "w.bin", cache_dir=tmp_path / "c")
    with pytest.raises(GatedRepoError):
        hf_hub_download("alice/gated", "w.bin", token=hub.tokens.bob, cache_dir=tmp_path / "c")
    hub.repo("alice/gated").granted.add("bob")
    assert Path(hf_hub_download("alice/gated", "w.bin", token=hub.tokens.bob, cache_dir=tmp_path / "c")
                ).read_bytes() == blob(100, 1)


def test_fixture_isolates_hf_home_and_endpoint(hub, tmp_path):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub.endpoint == os.environ["HF_ENDPOINT"]
    assert constants.HF_HUB_CACHE == str(tmp_path / "hf_home" / "hub")
    assert os.environ["HF_HOME"] == str(tmp_path / "hf_home")
    assert "HF_TOKEN" not in os.environ
    env = hub.env(user="bob")
    assert env["HF_TOKEN"] == hub.tokens.bob and env["HF_HUB_DISABLE_XET"] == "1"
    assert env["HF_HOME"] != hub.env()["HF_HOME"]  # a fresh HF_HOME each time


def test_standalone_server_context_manager():
    with HubServer() as server:
        server.create_repo("alice/x", {"a.txt": "a"})
        with urllib.request.urlopen(f"{server.endpoint}/api/models/alice/x") as r:
            assert json.load(r)["siblings"] == [{"rfilename": "a.txt"}]
