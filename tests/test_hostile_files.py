"""Hostile checkpoint files: int8 reads nothing outside a checkpoint's folder, quotes no file bytes,
and turns every malformed, duplicated, oversized or vanishing file into a clear refusal.

The CLI is run as users run it. To keep the many variants affordable, most go through one
subprocess that calls `int8.cli.main` once per variant (`cli_batch`: separate stdout/stderr and
exit code for each); a few are also run as separate `python -m int8.cli` processes. Each refusal
must exit 2 (convert) or 1 (verify, a failed check), without a traceback, without the secret in
any form on stdout/stderr or in any file written, and without leaving a staging folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from models import make_tiny

import int8
from int8 import checkpoint, errors
from int8.formats import safetensors as st
from int8.report import REPORT_NAME
from int8.runtime import loader

PY = sys.executable
BLOCK = "64"
SECRET = b"SECRETv1hf_k3yZq9TopSecretTokenValue0123456789\n"


# --------------------------------------------------------------------------- helpers


def leak_forms(secret: bytes = SECRET) -> list[str]:
    """Every way the secret (or its first 8 bytes, read as a header length) could show up in text."""
    head = secret[:8]
    forms = [secret.decode().strip(), head.decode(), secret[8:24].decode()]
    for order in ("little", "big"):
        n = int.from_bytes(head, order)
        forms += [str(n), f"{n:,}", hex(n), f"{n:x}"]
    forms.append(head.hex())
    return forms


def assert_no_leak(*texts: str) -> None:
    for text in texts:
        for form in leak_forms():
            assert form not in text, f"the secret shows up as {form!r}"


def assert_no_leak_in_tree(root: Path) -> None:
    if not root.exists():
        return
    needles = [SECRET.strip(), SECRET[8:24]]
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            assert not any(n in data for n in needles), f"{p} holds the secret"


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "int8-partial" in p.name or "int8-old" in p.name)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


_BATCH = textwrap.dedent(
    """
    import json, os, sys, traceback
    from int8.cli import main
    runs, where = json.load(open(sys.argv[1])), sys.argv[2]
    codes = []
    for i, argv in enumerate(runs):
        out, err = (os.open(f"{where}/{i}.{kind}", os.O_WRONLY | os.O_CREAT, 0o644) for kind in ("out", "err"))
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out, 1); os.dup2(err, 2)
        sys.argv = ["int8", *argv]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = -1
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        codes.append(code)
        os.close(out); os.close(err); os.close(saved[0]); os.close(saved[1])
    json.dump(codes, open(f"{where}/codes.json", "w"))
    """
)


def cli_batch(runs: list[list[str]], tmp: Path) -> list[Run]:
    """Run `int8 ARGS...` once per entry of ``runs`` through `int8.cli.main`, in one process."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "runs.json").write_text(json.dumps(runs))
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="400")
    proc = subprocess.run([PY, "-c", _BATCH, str(tmp / "runs.json"), str(tmp)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads((tmp / "codes.json").read_text())
    return [Run(c, (tmp / f"{i}.out").read_text(), (tmp / f"{i}.err").read_text()) for i, c in enumerate(codes)]


def run_cli(*args: str) -> Run:
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="400")
    p = subprocess.run([PY, "-m", "int8.cli", *args], capture_output=True, text=True, env=env, timeout=600)
    return Run(p.returncode, p.stdout, p.stderr)


def assert_refused(r: Run, code: int, *names: str) -> None:
    assert r.code == code, (r.code, r.err[-2000:], r.out[-2000:])
    assert "Traceback" not in r.err and "Traceback" not in r.out
    assert_no_leak(r.out, r.err)
    text = r.err + r.out
    for name in names:
        assert name in text, (name, text[-2000:])


def convert_args(src: Path, out: Path) -> list[str]:
    return ["convert", str(src), "--out", str(out), "--block-size", BLOCK, "--device", "cpu", "--quiet"]


def header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, head, data: bytes = b"") -> None:
    """A safetensors file with any header (dict, list or raw bytes) followed by ``data``."""
    raw = head if isinstance(head, bytes) else json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: Path, change) -> None:
    h, data = header(path)
    write_st(path, change(h), data)


def tensor_names(path: Path) -> list[str]:
    return [k for k in header(path)[0] if k != "__metadata__"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    gptj = make_tiny("gptj", root / "gptj")
    bloom = make_tiny("bloom", root / "bloom", form="safetensors-sharded")
    bins = make_tiny("gptj", root / "gptj-bin", form="bin-sharded")
    out = root / "bloom-int8"
    int8.convert(bloom, out, block_size=int(BLOCK), device="cpu", max_shard_size="300KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return {"gptj": gptj, "bloom": bloom, "bin": bins, "out": out}


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every checkpoint folder, standing for ~/.cache/huggingface/token."""
    d = tmp_path / "home" / ".cache" / "huggingface"
    d.mkdir(parents=True)
    (d / "token").write_bytes(SECRET)
    return d / "token"


@pytest.fixture
def copy(built, tmp_path):
    def make(kind: str, name: str | None = None) -> Path:
        return Path(shutil.copytree(built[kind], tmp_path / (name or kind)))

    return make


# --------------------------------------------------------------------------- 1. containment


def test_the_rule_itself(tmp_path):
    from int8.paths import inside

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "link.json").symlink_to("a.json")
    assert inside(folder, "a.json") == folder / "a.json"
    assert inside(folder, "sub/x.json") == folder / "sub" / "x.json"
    assert inside(folder, "link.json") == folder / "link.json"
    (tmp_path / "outside").write_text("x")
    (folder / "out.json").symlink_to(tmp_path / "outside")
    (folder / "subout").symlink_to(tmp_path)
    for bad in ("../outside", "/etc/passwd", str(tmp_path / "outside"), "sub/../../outside", "out.json",
                "subout/outside", "", "a\x00b", "..", "sub/../a.json"):
        with pytest.raises(errors.UnsafePath):
            inside(folder, bad)
    with pytest.raises(errors.UnsafePath):
        inside(folder, 5)  # a name that is not text (from a hand-made JSON file)


def _side_link(src: Path, secret: Path, variant: str) -> str:
    if variant == "tokenizer-absolute":
        (src / "tokenizer_config.json").unlink()
        (src / "tokenizer_config.json").symlink_to(secret)
        return "tokenizer_config.json"
    if variant == "license-relative":
        (src / "LICENSE").symlink_to(os.path.relpath(secret, src))
        return "LICENSE"
    if variant == "chat-template":
        (src / "chat_template.jinja").symlink_to(secret)
        return "chat_template.jinja"
    if variant == "via-linked-folder":
        (src / "extras").symlink_to(secret.parent)
        (src / "special_tokens_map.json").symlink_to("extras/token")
        return "special_tokens_map.json"
    if variant == "config":
        (src / "config.json").rename(secret.parent / "config.json")
        (src / "config.json").symlink_to(secret.parent / "config.json")
        return "config.json"
    raise ValueError(variant)


SIDE_VARIANTS = ["tokenizer-absolute", "license-relative", "chat-template", "via-linked-folder", "config"]


def test_side_files_linking_outside_are_refused(copy, secret, tmp_path):
    runs, cases = [], []
    for v in SIDE_VARIANTS:
        src = copy("gptj", f"src-{v}")
        name = _side_link(src, secret, v)
        out = tmp_path / "outs" / f"{v}-int8"
        runs.append(convert_args(src, out))
        cases.append((name, out))
    (tmp_path / "outs").mkdir()
    for r, (name, out) in zip(cli_batch(runs, tmp_path / "batch"), cases, strict=True):
        assert_refused(r, 2, name, "outside")
        assert not out.exists()
    assert leftovers(tmp_path / "outs") == []
    assert_no_leak_in_tree(tmp_path / "outs")


def test_side_file_link_refused_by_a_real_cli_process(copy, secret, tmp_path):
    src = copy("gptj", "src")
    _side_link(src, secret, "license-relative")
    r = run_cli(*convert_args(src, tmp_path / "out"))
    assert_refused(r, 2, "LICENSE")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_links_inside_the_folder_and_the_hub_cache_layout_are_fine(built, tmp_path):
    """The Hugging Face cache's snapshot -> blobs symlinks (and links within a folder) are allowed."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in built["gptj"].iterdir():
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    (snap / "LICENSE").symlink_to("tokenizer_config.json")  # a link within the snapshot
    r = run_cli(*convert_args(snap, tmp_path / "out"))
    assert r.code == 0, r.err[-2000:]
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (built["gptj"] / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink() and (out / "LICENSE").is_file()


def _outside_shard(src: Path, variant: str, secret: Path, index_name: str = "model.safetensors.index.json") -> str:
    """Point one shard of the index outside the folder; the file there is a *valid* shard (or the secret)."""
    index_path = src / index_name
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = src.parent / f"outside-{variant}.safetensors"
    shutil.copyfile(src / shard, outside)
    entry = {
        "dotdot": f"../{outside.name}",
        "too-long": "x" * 5000,
        "absolute": str(outside),
        "sub-dotdot": f"sub/../../{outside.name}",
        "secret": os.path.relpath(secret, src),
    }.get(variant)
    if variant == "symlinked-shard":
        (src / shard).unlink()
        (src / shard).symlink_to(outside)
        return shard
    (src / shard).unlink()
    index["weight_map"] = {k: (entry if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return entry if variant != "secret" else "outside"


SHARD_VARIANTS = ["dotdot", "absolute", "sub-dotdot", "symlinked-shard", "secret", "too-long"]


def test_index_naming_shards_outside_is_refused_by_convert(copy, secret, tmp_path):
    runs, outs = [], []
    for v in SHARD_VARIANTS:
        src = copy("bloom", f"src-{v}")
        _outside_shard(src, v, secret)
        outs.append(tmp_path / "outs" / f"{v}-int8")
        runs.append(convert_args(src, outs[-1]))
    (tmp_path / "outs").mkdir()
    for v in ("dotdot", "absolute", "symlinked-shard"):  # the same for a sharded pytorch_model.bin
        src = copy("bin", f"bin-{v}")
        _outside_shard(src, v, secret, "pytorch_model.bin.index.json")
        outs.append(tmp_path / "outs" / f"bin-{v}-int8")
        runs.append(convert_args(src, outs[-1]))
    variants = [*SHARD_VARIANTS, "dotdot", "absolute", "symlinked-shard"]
    for v, r, out in zip(variants, cli_batch(runs, tmp_path / "batch"), outs, strict=True):
        assert_refused(r, 2, "longer" if v == "too-long" else "outside")
        assert not out.exists(), v
    assert leftovers(tmp_path / "outs") == []


def test_single_weight_file_linking_outside_is_refused(built, copy, tmp_path):
    runs = []
    src = copy("gptj", "st")
    (src.parent / "elsewhere.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to(src.parent / "elsewhere.safetensors")
    runs.append(convert_args(src, tmp_path / "o1"))
    binsrc = tmp_path / "bin"
    binsrc.mkdir()
    for p in built["bin"].iterdir():
        if not p.name.startswith("pytorch_model"):
            shutil.copyfile(p, binsrc / p.name)
    import torch

    state = {}
    for p in sorted(built["bin"].glob("pytorch_model-*.bin")):
        state.update(torch.load(p, weights_only=True))
    torch.save(state, tmp_path / "elsewhere.bin")
    (binsrc / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere.bin")
    runs.append(convert_args(binsrc, tmp_path / "o2"))
    for r, name in zip(cli_batch(runs, tmp_path / "batch"), ["model.safetensors", "pytorch_model.bin"], strict=True):
        assert_refused(r, 2, name, "outside")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # the same file copied in (not linked) converts: the refusal is about the link alone
    (binsrc / "pytorch_model.bin").unlink()
    shutil.copyfile(tmp_path / "elsewhere.bin", binsrc / "pytorch_model.bin")
    int8.convert(binsrc, tmp_path / "o3", block_size=int(BLOCK), device="cpu")


def _tamper_output_index(out: Path, variant: str, secret: Path) -> None:
    _outside_shard(out, variant, secret)


def test_verify_and_load_never_open_shards_outside(copy, secret, tmp_path):
    runs, folders = [], []
    for v in SHARD_VARIANTS:
        out = copy("out", f"int8-{v}")
        _tamper_output_index(out, v, secret)
        folders.append(out)
        runs.append(["verify", str(out), "--quick"])
    for v, r, folder in zip(SHARD_VARIANTS, cli_batch(runs, tmp_path / "batch"), folders, strict=True):
        assert_refused(r, 1, "index", "longer" if v == "too-long" else "outside")
        with pytest.raises(errors.UnsafePath):
            loader._headers(folder)
        with pytest.raises(errors.UnsafePath):
            checkpoint.find_checkpoint(folder)


def test_manifest_entries_outside_are_failed_checks_not_reads(copy, secret, tmp_path):
    """Each entry carries the outside file's true size and SHA-256: had verify read it, it would match."""
    digest, size = hashlib.sha256(SECRET).hexdigest(), len(SECRET)
    variants = {
        "dotdot": os.path.relpath(secret, tmp_path / "int8-dotdot"),
        "absolute": str(secret),
        "link": "notes.md",
        "sub-dotdot": "sub/../../" + os.path.relpath(secret, tmp_path),
    }
    runs, folders = [], []
    for v, name in variants.items():
        out = copy("out", f"int8-{v}")
        if v == "link":
            (out / "notes.md").symlink_to(secret)
        assert (out / name).resolve() == secret.resolve()
        data = json.loads((out / REPORT_NAME).read_text())
        data["files"].append({"name": name, "bytes": size, "sha256": digest})
        (out / REPORT_NAME).write_text(json.dumps(data))
        folders.append(out)
        runs.append(["verify", str(out), "--quick"])
    for v, link in (("unlisted-link", "chat_template.jinja"), ("linked-folder", "extra")):  # no manifest entry at all
        out = copy("out", f"int8-{v}")
        (out / link).symlink_to(secret if v == "unlisted-link" else secret.parent)
        runs.append(["verify", str(out), "--quick"])
    for r in cli_batch(runs, tmp_path / "batch"):
        assert_refused(r, 1, "sha256", "outside")


# --------------------------------------------------------------------------- 2. no file bytes in messages


def test_header_bytes_are_never_quoted(copy, secret, tmp_path):
    """A weight file that is really a secret (or starts like one) is refused without echoing it."""
    variants = {}
    src = copy("gptj", "plain-secret")
    (src / "model.safetensors").write_bytes(SECRET)  # the first 8 bytes read as a header length
    variants["secret-as-weights"] = src
    src = copy("gptj", "small-length")  # a length that fits the file, then secret bytes that are not JSON
    write_st(src / "model.safetensors", b"{" + SECRET.strip() + b"}", b"\0" * 64)
    variants["secret-as-header"] = src
    src = copy("gptj", "not-utf8")
    write_st(src / "model.safetensors", b'{"a": "\xff' + SECRET.strip() + b'"}', b"\0" * 64)
    variants["not-utf8"] = src
    src = copy("gptj", "dtype")
    edit_header(src / "model.safetensors", lambda h: {**h, next(iter(tensor_names(src / "model.safetensors"))): {
        **h[next(iter(tensor_names(src / "model.safetensors")))], "dtype": SECRET.strip().decode()}})
    variants["secret-as-dtype"] = src
    src = copy("gptj", "entry")
    first = tensor_names(src / "model.safetensors")[0]
    edit_header(src / "model.safetensors", lambda h: {**h, first: {"secret": SECRET.strip().decode()}})
    variants["secret-in-entry"] = src
    src = copy("gptj", "metadata")
    edit_header(src / "model.safetensors", lambda h: {**h, "__metadata__": {"k": [SECRET.strip().decode()]}})
    variants["secret-in-metadata"] = src
    (tmp_path / "outs").mkdir()
    runs = [convert_args(s, tmp_path / "outs" / f"{v}-int8") for v, s in variants.items()]
    for r in cli_batch(runs, tmp_path / "batch"):
        assert_refused(r, 2, "model.safetensors")
    assert list((tmp_path / "outs").iterdir()) == []


def test_verify_quotes_no_shard_bytes(copy, tmp_path):
    out = copy("out", "int8")
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[:8] = SECRET[:8]
    shard.write_bytes(bytes(data))
    r = cli_batch([["verify", str(out), "--quick"]], tmp_path / "batch")[0]
    assert_refused(r, 1, shard.name, "header length field is invalid")


# --------------------------------------------------------------------------- 3. a source truncated while read


def _truncating_reader(monkeypatch, at_call: int, before: bool, size: int = 0) -> list[int]:
    calls: list[int] = []
    view, read = checkpoint.CheckpointReader.view_array, checkpoint.CheckpointReader.read_rows_array

    def truncate(t) -> None:
        calls.append(1)
        if before and len(calls) == at_call:
            os.truncate(t.file, size)

    def view_array(self, t, r0, r1):  # the engine views large chunks in place
        truncate(t)
        return view(self, t, r0, r1)

    def read_rows_array(self, t, r0, r1, out):  # and copies the others
        truncate(t)
        return read(self, t, r0, r1, out)

    monkeypatch.setattr(checkpoint.CheckpointReader, "view_array", view_array)
    monkeypatch.setattr(checkpoint.CheckpointReader, "read_rows_array", read_rows_array)
    return calls


@pytest.mark.parametrize("kind,size", [("gptj", 0), ("gptj", 4096), ("bloom", 100), ("bin", 0)])
def test_truncated_between_reads_fails_cleanly(kind, size, copy, tmp_path, monkeypatch):
    src = copy(kind, "src")
    calls = _truncating_reader(monkeypatch, 4, before=True, size=size)
    (tmp_path / "outs").mkdir()
    with pytest.raises(errors.SourceChanged, match="while int8 was reading it|truncated"):
        int8.convert(src, tmp_path / "outs" / "out", block_size=int(BLOCK), device="cpu")
    assert len(calls) >= 4
    assert list((tmp_path / "outs").iterdir()) == []


_SIGBUS = textwrap.dedent(
    """
    import os, sys
    from int8 import checkpoint
    from int8.conversion import arrays, engine
    arrays.NUMBA_FROM_BYTES = engine.VIEW_MIN_BYTES = 0  # the path of a large model: compiled kernels on mapped views
    at = int(sys.argv[1])
    original = checkpoint.CheckpointReader.view_array
    calls = []

    def view_array(self, t, r0, r1):
        data, release = original(self, t, r0, r1)
        calls.append(1)
        if len(calls) == at:
            os.truncate(t.file, 0)  # the pages of this view are gone: touching them raises SIGBUS
            arrays.all_finite(data, t.dtype)  # touched here, in the worker thread, as the engine does first (numba, no GIL)
            print("the worker survived the fault", file=sys.stderr)
        return data, release

    checkpoint.CheckpointReader.view_array = view_array
    sys.argv = ["int8", *sys.argv[2:]]
    from int8.cli import main
    main()
    """
)


@pytest.mark.parametrize("kind", ["gptj", "bin"])
def test_truncated_under_the_mapping_sigbus_fails_cleanly(kind, copy, tmp_path):
    """The truncation lands while a worker reads mapped pages: SIGBUS, caught, exit 2, nothing left."""
    src = copy(kind, "src")
    (tmp_path / "outs").mkdir()
    out = tmp_path / "outs" / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="400")
    p = subprocess.run([PY, "-c", _SIGBUS, "3", *convert_args(src, out)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and "while int8 was reading it" in p.stderr
    assert "the worker survived the fault" in p.stderr  # the SIGBUS was handled, not just avoided
    assert list((tmp_path / "outs").iterdir()) == []


# --------------------------------------------------------------------------- 4. a tensor stored twice


def _duplicate(src: Path, variant: str) -> str:
    """Store one tensor of the first shard in a second shard too; return its name."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    a, b = src / shards[0], src / shards[1]
    name = tensor_names(a)[0]
    ha, da = header(a)
    hb, db = header(b)
    entry = ha[name]
    lo, hi = entry["data_offsets"]
    hb[name] = {**entry, "data_offsets": [len(db), len(db) + hi - lo]}
    write_st(b, hb, db + da[lo:hi])
    if variant == "index-says-second":
        index["weight_map"][name] = shards[1]
        index_path.write_text(json.dumps(index))
    return name


def test_tensor_in_two_shards_is_refused_by_convert_and_flagged_by_verify(copy, tmp_path):
    runs, names = [], []
    for v in ("index-says-first", "index-says-second"):
        src = copy("bloom", f"src-{v}")
        names.append(_duplicate(src, v))
        runs.append(convert_args(src, tmp_path / f"{v}-int8"))
        out = copy("out", f"int8-{v}")
        names.append(_duplicate(out, v))
        runs.append(["verify", str(out), "--quick"])
    src = copy("gptj", "in-one-header")  # the same name twice inside one header
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = raw[8 : 8 + n].rstrip()
    first = tensor_names(src / "model.safetensors")[0]
    dup = h[:-1] + b"," + json.dumps(first).encode() + b":" + json.dumps(header(src / "model.safetensors")[0][first]).encode() + b"}"
    write_st(src / "model.safetensors", dup, raw[8 + n :])
    runs.append(convert_args(src, tmp_path / "one-int8"))
    names.append(first)
    results = cli_batch(runs, tmp_path / "batch")
    for i, (r, name) in enumerate(zip(results, names, strict=True)):
        verify = i % 2 == 1 and i < 4
        assert_refused(r, 1 if verify else 2, repr(name)[:40])
        assert "twice" in r.err + r.out or "in both" in r.err + r.out
    assert [p for p in tmp_path.iterdir() if p.name.endswith("-int8") and not p.name.startswith("int8-")] == []


def test_duplicate_across_bin_shards_is_refused(copy, tmp_path):
    import torch

    src = copy("bin", "src")
    shards = sorted(src.glob("pytorch_model-*.bin"))
    a = torch.load(shards[0], weights_only=True)
    b = torch.load(shards[1], weights_only=True)
    name = next(iter(a))
    b[name] = a[name].clone()
    torch.save(b, shards[1])
    with pytest.raises(errors.CorruptCheckpoint, match="in both"):
        int8.convert(src, tmp_path / "out", block_size=int(BLOCK), device="cpu")


# --------------------------------------------------------------------------- 5. resource bounds


def test_absurd_tensor_counts_and_headers_are_refused_early(copy, tmp_path):
    many = copy("gptj", "many")
    n = st.MAX_TENSORS_PER_FILE + 1
    write_st(many / "model.safetensors", {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)})
    huge = copy("gptj", "huge")
    size = st.MAX_HEADER_BYTES + 8
    with open(huge / "model.safetensors", "wb") as f:  # sparse: a header length field just over the cap
        f.write(struct.pack("<Q", size))
        f.truncate(size + 16)
    wide = copy("bloom", "wide")  # an index listing more tensors than any model has
    index = json.loads((wide / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"] = {f"t{i}": shard for i in range(st.MAX_TENSORS + 1)}
    (wide / "model.safetensors.index.json").write_text(json.dumps(index))
    runs = [convert_args(s, tmp_path / f"{s.name}-int8") for s in (many, huge, wide)]
    for r, what in zip(cli_batch(runs, tmp_path / "batch"), ["tensors", "limit", "tensors"], strict=True):
        assert_refused(r, 2, what)


def test_many_tensors_below_the_cap_stay_cheap(copy, tmp_path, monkeypatch):
    """Total count cap over shards (monkeypatched low here) and a large legal header costing little."""
    import time

    src = copy("gptj", "src")
    h, data = header(src / "model.safetensors")
    extra = {f"junk.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [len(data), len(data)]} for i in range(20_000)}
    write_st(src / "model.safetensors", {**h, **extra}, data)
    started = time.perf_counter()
    tensors, _, problems = st.scan_safetensors_header(src / "model.safetensors")
    assert not problems and len(tensors) == len(h) - ("__metadata__" in h) + 20_000
    assert time.perf_counter() - started < 5
    monkeypatch.setattr(checkpoint, "MAX_TENSORS", 1_000)
    with pytest.raises(errors.ResourceLimit, match="more than 1,000 tensors"):
        int8.convert(src, tmp_path / "out", block_size=int(BLOCK), device="cpu")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 6. validation at the edge


INDEX_DAMAGE = {
    "weight-map-list": lambda ix: {**ix, "weight_map": list(ix["weight_map"])},
    "weight-map-string": lambda ix: {**ix, "weight_map": "model-00001-of-00006.safetensors"},
    "weight-map-null": lambda ix: {**ix, "weight_map": None},
    "weight-map-missing": lambda ix: {"metadata": ix["metadata"]},
    "value-int": lambda ix: {**ix, "weight_map": {**ix["weight_map"], next(iter(ix["weight_map"])): 5}},
    "value-null": lambda ix: {**ix, "weight_map": {**ix["weight_map"], next(iter(ix["weight_map"])): None}},
    "value-list": lambda ix: {**ix, "weight_map": {**ix["weight_map"], next(iter(ix["weight_map"])): ["a"]}},
    "metadata-string": lambda ix: {**ix, "metadata": "garbage"},
    "metadata-list": lambda ix: {**ix, "metadata": [1, 2]},
    "top-level-list": lambda ix: [ix],
    "top-level-null": lambda ix: None,
}


def _damage_index(folder: Path, variant: str) -> None:
    path = folder / "model.safetensors.index.json"
    if variant == "not-json":
        path.write_text('{"weight_map": {')
    elif variant == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        path.write_text(json.dumps(INDEX_DAMAGE[variant](json.loads(path.read_text()))))


INDEX_VARIANTS = [*INDEX_DAMAGE, "not-json", "deep"]


def test_malformed_index_convert_and_verify(copy, tmp_path):
    runs = []
    for v in INDEX_VARIANTS:
        src = copy("bloom", f"src-{v}")
        _damage_index(src, v)
        runs.append(convert_args(src, tmp_path / f"{v}-int8"))
        out = copy("out", f"int8-{v}")
        _damage_index(out, v)
        runs.append(["verify", str(out), "--quick"])
    results = cli_batch(runs, tmp_path / "batch")
    for i, v in enumerate(INDEX_VARIANTS):
        assert_refused(results[2 * i], 2, "model.safetensors.index.json")
        assert_refused(results[2 * i + 1], 1, "model.safetensors.index.json")
        assert not (tmp_path / f"{v}-int8").exists()


def _entry(key: str, value):
    def change(h):
        name = next(k for k in h if k != "__metadata__")
        return {**h, name: {**h[name], key: value(h[name][key]) if callable(value) else value}}

    return change


HEADER_DAMAGE = {
    "offsets-strings": _entry("data_offsets", lambda o: [str(x) for x in o]),
    "offsets-floats": _entry("data_offsets", lambda o: [float(x) for x in o]),
    "offsets-bools": _entry("data_offsets", [False, True]),
    "offsets-negative": _entry("data_offsets", lambda o: [-o[1], -o[0]]),
    "offsets-reversed": _entry("data_offsets", lambda o: [o[1], o[0]]),
    "offsets-three": _entry("data_offsets", lambda o: [*o, 0]),
    "offsets-null": _entry("data_offsets", None),
    "shape-negative": _entry("shape", lambda s: [-d for d in s]),
    "shape-floats": _entry("shape", lambda s: [float(d) for d in s]),
    "shape-strings": _entry("shape", lambda s: [str(d) for d in s]),
    "shape-bools": _entry("shape", lambda s: [True for _ in s]),
    "shape-string": _entry("shape", "4x4"),
    "dtype-number": _entry("dtype", 5),
    "dtype-unknown": _entry("dtype", "F8_E4M3"),
    "entry-not-object": lambda h: {**h, next(k for k in h if k != "__metadata__"): [1, 2]},
    "header-list": lambda h: [h],
    "markup-in-name": lambda h: {**h, "[/x] [bold]evil\n": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}},
    "metadata-not-strings": lambda h: {**h, "__metadata__": {"format": 1}},
    "metadata-list": lambda h: {**h, "__metadata__": ["pt"]},
}


def test_malformed_safetensors_headers_convert_and_verify(copy, tmp_path):
    runs = []
    for v, change in HEADER_DAMAGE.items():
        src = copy("gptj", f"src-{v}")
        edit_header(src / "model.safetensors", change)
        runs.append(convert_args(src, tmp_path / f"{v}-int8"))
        out = copy("out", f"int8-{v}")
        edit_header(sorted(out.glob("model-*.safetensors"))[0], change)
        runs.append(["verify", str(out), "--quick"])
    results = cli_batch(runs, tmp_path / "batch")
    for i, v in enumerate(HEADER_DAMAGE):
        assert_refused(results[2 * i], 2, "model.safetensors")
        assert_refused(results[2 * i + 1], 1, "model-00001-of-")
        assert not (tmp_path / f"{v}-int8").exists(), v
    assert "F8_E4M3" in results[2 * list(HEADER_DAMAGE).index("dtype-unknown")].err  # a real dtype name is named


def test_library_errors_are_int8_errors(copy, tmp_path):
    """The same damage through the API: a CorruptCheckpoint each, never a TypeError or KeyError."""
    for v in ("value-int", "metadata-list", "top-level-list"):
        src = copy("bloom", f"api-{v}")
        _damage_index(src, v)
        with pytest.raises(errors.CorruptCheckpoint):
            checkpoint.find_checkpoint(src)
    for v in ("offsets-strings", "shape-bools", "header-list"):
        src = copy("gptj", f"api-{v}")
        edit_header(src / "model.safetensors", HEADER_DAMAGE[v])
        with pytest.raises(errors.CorruptCheckpoint):
            st.read_safetensors_header(src / "model.safetensors")
    out = copy("out", "api-out")
    _damage_index(out, "weight-map-list")
    with pytest.raises(errors.CorruptCheckpoint):
        loader._headers(out)


TOP_LEVEL_LINKS = ("config.json", "tokenizer.json", "generation_config.json", "README.md", "int8_report.json")


def test_top_level_files_linking_outside_are_never_read(copy, secret, tmp_path, monkeypatch):
    """config, tokenizer, card and report of a converted folder, each a link out: verify reads nothing,
    `int8.load` and `generate` refuse before transformers opens anything."""
    runs, folders = [], []
    for name in TOP_LEVEL_LINKS:
        out = copy("out", f"int8-{name}")
        (out / name).unlink()
        (out / name).symlink_to(secret)
        folders.append(out)
        runs += [["verify", str(out), "--quick"], ["verify", str(out), "--json", str(tmp_path / f"{name}.json")],
                 ["generate", str(out), "hello", "--max-new-tokens", "2", "--device", "cpu"]]
    results = cli_batch(runs, tmp_path / "batch")
    opened = []
    real_open = open

    def watching_open(file, *a, **k):
        opened.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *a, **k)

    for i, (name, folder) in enumerate(zip(TOP_LEVEL_LINKS, folders, strict=True)):
        quick, full, gen = results[3 * i : 3 * i + 3]
        assert_refused(quick, 1, "contained")
        assert_refused(full, 1, "contained")
        assert_refused(gen, 2, name)
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert [c["name"] for c in record["checks"] if c["status"] == "fail"] == ["contained"]
        assert_no_leak(json.dumps(record))
        monkeypatch.setattr("builtins.open", watching_open)
        with pytest.raises(errors.UnsafePath):
            int8.load(folder, device="cpu")
        monkeypatch.undo()
        assert str(secret) not in opened
