"""Hostile checkpoints against convert, verify, card and push (issue 9, items 2-5 and 12).

* model code never runs: a config or tokenizer that needs code from the folder
  (auto_map, unknown model_type) is refused, even with "y" on stdin, and the
  folder's .py files are never imported (they would leave a marker file);
* verify passes only what it checked: no reachable original fails a full
  verify; files push would upload but the manifest does not list fail; a
  tokenizer, config or generation config that differs from the original's fails;
* push and the card: a failed full verify refuses the push; a stale or forged
  record is never shown as passed; a refused or failed push leaves README.md as it was;
* nothing local is published (no absolute paths) and URL credentials are never printed;
* malformed JSON files give a failed check in verify and exit 2 elsewhere, never a traceback.

Every hostile input is made here, at run time, from a clean tiny conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import make_tiny, refresh_manifest
from test_hub_download import run_main

import int8
from int8.errors import Int8Error, UnsupportedModel
from int8.report import ConversionReport
from int8.verify import VERIFY_NAME, verify_checkpoint
from int8.verify.result import manifest_digest

INT8 = [sys.executable, "-m", "int8.cli"]
BLOCK = 64
SHARD = "model-00001-of-00001.safetensors"
SECRET = "s3cr3t-pw"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path]:
    """(FP32 source, its conversion), side by side as `int8 convert ./gptj` leaves them."""
    root = tmp_path_factory.mktemp("hostile")
    src = make_tiny("gptj", root / "gptj")
    out = root / "gptj-int8"
    int8.convert(src, out, block_size=BLOCK, device="cpu")
    return src, out


@pytest.fixture
def folder(clean, tmp_path) -> Path:
    """A private copy of the conversion, with its original beside it (where verify looks for it)."""
    src, out = clean
    copy = tmp_path / out.name
    shutil.copytree(out, copy)
    (tmp_path / src.name).symlink_to(src, target_is_directory=True)
    return copy


@pytest.fixture
def source(clean, tmp_path) -> Path:
    """A private copy of the FP32 source, to make hostile."""
    return Path(shutil.copytree(clean[0], tmp_path / "src"))


def cli(*args: str, stdin: str = "y\ny\ny\n", env: dict | None = None, cwd: Path | None = None):
    full = {**os.environ, **(env or {})}
    return subprocess.run([*INT8, *args], input=stdin, capture_output=True, text=True, timeout=300, env=full, cwd=cwd)


NULL = object()
"""What a change returns to write a JSON null (a change returning None edited the data in place)."""


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text()) if path.exists() else None
    new = change(data)
    path.write_text("null" if new is NULL else json.dumps(data if new is None else new))


class Ran:
    """An in-process run of the command line (an exception escaping main() fails the test by itself)."""

    def __init__(self, capsys, *args: str):
        self.returncode, self.stdout, self.stderr = run_main(capsys, *args)


def no_traceback(r) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]


def failed_checks(path: Path) -> dict[str, str]:
    data = json.loads(path.read_text())
    return {c["name"]: c["detail"] for c in data["checks"] if c["status"] == "fail"}


# --------------------------------------------------------------------------- 2. model code never runs

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("model code ran")  # absolute: transformers imports a copy from its module cache
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def plant_code(folder: Path, *, config: dict | None = None, tokenizer: dict | None = None) -> Path:
    """Put a .py file that leaves a marker when imported, and point config/tokenizer_config at it."""
    marker = folder / "RAN"
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker.resolve())))
    if config is not None:
        edit_json(folder / "config.json", lambda d: d.update(config))
    if tokenizer is not None:
        edit_json(folder / "tokenizer_config.json", lambda d: d.update(tokenizer))
    return marker


REMOTE_CONFIGS = {
    "unknown type with auto_map": dict(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                                      "AutoModelForCausalLM": "evil.EvilModel"}),
    "known type with auto_map": dict(auto_map={"AutoConfig": "evil.EvilConfig"}),
    "unknown type alone": dict(model_type="evil"),
    "auto_map naming another repo": dict(model_type="evil", auto_map={"AutoConfig": "mallory/code--evil.EvilConfig"}),
}


def test_the_marker_shows_when_code_runs(source):
    """The control: transformers itself, asked to trust the folder's code, imports it and leaves the marker."""
    marker = plant_code(source, config=REMOTE_CONFIGS["unknown type with auto_map"])
    code = "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code, str(source)], capture_output=True, timeout=300)
    assert marker.exists()


@pytest.mark.parametrize("variant", sorted(REMOTE_CONFIGS))
def test_convert_never_runs_model_code(source, tmp_path, variant):
    marker = plant_code(source, config=REMOTE_CONFIGS[variant])
    r = cli("convert", str(source), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 2, r.stderr
    no_traceback(r)
    assert "transformers" in r.stderr and ("custom code" in r.stderr or "not an architecture" in r.stderr)
    assert "never runs code" in r.stderr  # the hint
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_refuses_a_tokenizer_with_code(source, tmp_path):
    """A tokenizer_config.json auto_map is refused before transformers can prompt (the library call, too)."""
    from int8.hf import load_tokenizer

    marker = plant_code(source, tokenizer={"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}})
    with pytest.raises(UnsupportedModel, match="auto_map"):
        load_tokenizer(source)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_verify_never_runs_model_code(folder, where):
    kw = {"config": REMOTE_CONFIGS["known type with auto_map"]} if where == "config" else {
        "tokenizer": {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}}
    marker = plant_code(folder, **kw)
    out = folder.parent / "v.json"
    r = cli("verify", str(folder), "--device", "cpu", "--json", str(out))
    assert r.returncode == 1, r.stderr
    no_traceback(r)
    problems = failed_checks(out)
    assert ("config" if where == "config" else "tokenizer") in problems, problems
    assert "auto_map" in problems["config" if where == "config" else "tokenizer"]
    assert not marker.exists()


def test_load_never_runs_model_code(folder):
    marker = plant_code(folder, config=REMOTE_CONFIGS["known type with auto_map"])
    with pytest.raises(UnsupportedModel, match="auto_map"):
        int8.load(folder, device="cpu")
    r = cli("generate", str(folder), "hello", "--max-new-tokens", "2", "--device", "cpu")
    assert r.returncode == 2 and "auto_map" in r.stderr
    no_traceback(r)
    assert not marker.exists()


def test_every_from_pretrained_call_refuses_remote_code():
    """A static guard: no transformers loading call in int8's sources bypasses int8.hf."""
    src = Path(int8.__file__).parent
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "hf.py" or path.as_posix().endswith("hub/card.py"):  # card.py: the card's snippets, text
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            receiver = code.split(".from_pretrained(")[0][-40:]
            # PEFT's adapter loading (runtime/lora.py) reads adapter weights and a JSON config, never model code
            if ".from_pretrained(" in code and '"' not in receiver and not receiver.rstrip().endswith(("PeftModel", "PeftConfig")):
                offenders.append(f"{path.relative_to(src)}:{n}: {line.strip()}")
            if "AutoConfig" in code or "AutoTokenizer.from" in code:
                offenders.append(f"{path.relative_to(src)}:{n}: {line.strip()}")
    assert offenders == []


def test_models_load_without_hub_kernels(tmp_path):
    """transformers 5.25 fetches compiled kernels from the Hub by default (`use_kernels`): foreign code, which
    int8 never runs. Every model int8 loads goes through int8.hf.load_model, which turns them off."""
    from int8.hf import load_model

    seen = {}

    class Model:
        @classmethod
        def from_pretrained(cls, folder, **kwargs):
            seen.update(kwargs)
            return cls()

    (tmp_path / "config.json").write_text('{"model_type": "gptj"}')
    load_model(Model, tmp_path, dtype="float32")
    assert seen["use_kernels"] is False and seen["trust_remote_code"] is False and seen["dtype"] == "float32"


# --------------------------------------------------------------------------- 3. verify passes only what it checked


def quadruple_scales(folder: Path) -> None:
    """Every scale x4, the manifest refreshed: structurally perfect, numerically wrong."""
    from safetensors.torch import load_file, save_file

    shard = folder / SHARD
    tensors = load_file(shard)
    for name in list(tensors):
        if name.endswith(".weight_scale"):
            tensors[name] = (tensors[name].float() * 4).to(tensors[name].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    refresh_manifest(folder)


UNREACHABLE = {
    "local name that is not there": {"kind": "local", "id": "moved-away"},
    "absolute path that is gone": {"kind": "local", "id": "/nonexistent/int8/original"},
    "path climbing out": {"kind": "local", "id": "../../etc"},
    "hub repo the offline cache lacks": {"kind": "hub", "id": "nobody/nothing", "commit": "0" * 40},
}


@pytest.mark.parametrize("variant", sorted(UNREACHABLE))
def test_full_verify_without_the_original_fails(folder, variant, capsys):
    quadruple_scales(folder)  # what the issue found passing: scales x4, manifest refreshed, original unreachable
    edit_json(folder / "int8_report.json", lambda d: d["source"].update(UNREACHABLE[variant]))
    out = folder.parent / "v.json"
    r = Ran(capsys, "verify", str(folder), "--device", "cpu", "--json", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    problems = failed_checks(out)
    assert "original" in problems and "--against" in problems["original"] and "--quick" in problems["original"]
    assert "FAILED" in r.stderr and "--against" in r.stderr


def test_subprocess_full_verify_without_the_original_exits_1(folder):
    quadruple_scales(folder)
    edit_json(folder / "int8_report.json", lambda d: d["source"].update(id="moved-away"))
    r = cli("verify", str(folder), "--device", "cpu")
    assert r.returncode == 1 and "--against" in r.stderr and "moved-away" in r.stderr
    no_traceback(r)


def test_no_recorded_original_at_all_fails(folder):
    edit_json(folder / "int8_report.json", lambda d: d.pop("source"))
    (folder / "README.md").write_text("# no metadata\n")
    result = verify_checkpoint(folder, device="cpu", max_tokens=64, save=False)
    assert not result.passed and "original" in {c.name for c in result.failures}
    assert "no original is recorded" in result.check("original").detail


@pytest.mark.parametrize(
    "extra",
    ["chat_template.jinja", "notes.txt", "sub/payload.bin", "sub/deeper/x.json", "LICENSE.md", "tokenizer.extra"],
)
def test_files_push_would_upload_are_checked(folder, extra, capsys):
    path = folder / extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("added after conversion\n")
    (folder / ".hidden-editor-swap").write_text("push ignores hidden files")
    out = folder.parent / "v.json"
    r = Ran(capsys, "verify", str(folder), "--quick", "--json", str(out))
    assert r.returncode == 1, r.stderr
    problems = failed_checks(out)
    assert "files" in problems and extra in problems["files"], problems
    assert ".hidden-editor-swap" not in problems["files"]


def test_a_symlinked_folder_is_not_in_the_manifest(folder, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    result = verify_checkpoint(folder, quick=True)
    assert not result.passed and "linked" in result.check("contained").detail
    assert result.check("files").skipped  # nothing is read once a link leads out of the folder


def rotate_vocabulary(folder: Path) -> None:
    def change(tok):
        vocab = tok["model"]["vocab"]
        plain = sorted((i, t) for t, i in vocab.items() if i >= 3)
        ids = [i for i, _ in plain]
        for (_, t), new in zip(plain, ids[1:] + ids[:1], strict=True):
            vocab[t] = new

    edit_json(folder / "tokenizer.json", change)


FIDELITY_DAMAGE = {
    "rotated vocabulary": ("same_tokenizer", rotate_vocabulary),
    "eos changed in generation_config": (
        "same_config", lambda f: edit_json(f / "generation_config.json", lambda d: d.update(eos_token_id=5))),
    "generation settings added": (
        "same_config", lambda f: edit_json(f / "generation_config.json", lambda d: d.update(do_sample=True, top_k=3))),
    "config field changed": (
        "same_config", lambda f: edit_json(f / "config.json", lambda d: d.update(layer_norm_epsilon=0.1))),
    "generation_config removed": ("same_config", lambda f: (f / "generation_config.json").unlink()),
}


@pytest.mark.parametrize("variant", sorted(FIDELITY_DAMAGE))
def test_tokenizer_and_config_must_be_the_originals(folder, variant):
    check, damage = FIDELITY_DAMAGE[variant]
    damage(folder)
    report = ConversionReport.load(folder)
    report.files = [e for e in report.files if (folder / e.name).exists()]
    report.save(folder)
    refresh_manifest(folder)
    assert verify_checkpoint(folder, quick=True).passed  # structure cannot see it
    result = verify_checkpoint(folder, device="cpu", max_tokens=128, save=False)
    assert not result.passed
    assert check in {c.name for c in result.failures}, {c.name: c.detail for c in result.failures}
    assert result.check("original").status == "pass" and result.check("reconstruction").status == "pass"


def test_clean_checkpoint_passes_the_new_checks(folder):
    result = verify_checkpoint(folder, device="cpu", max_tokens=128)
    assert result.passed, {c.name: c.detail for c in result.failures}
    for name in ("original", "same_tokenizer", "same_config", "files"):
        assert result.check(name).status == "pass"


# --------------------------------------------------------------------------- 4. push honesty


def push_cli(hub, capsys, folder: Path, *extra: str):
    hub.login("alice")
    return Ran(capsys, "push", str(folder), "--repo", "alice/tiny-int8", *extra)


def test_push_refuses_a_failed_full_verify(hub, folder, capsys):
    edit_json(folder / "generation_config.json", lambda d: d.update(eos_token_id=5))
    refresh_manifest(folder)
    assert not verify_checkpoint(folder, device="cpu", max_tokens=64).passed  # recorded in int8_verify.json
    card = (folder / "README.md").read_bytes()
    r = push_cli(hub, capsys, folder)
    assert r.returncode == 2, r.stderr
    no_traceback(r)
    assert "latest full int8 verify" in r.stderr and "same_config" in r.stderr and "nothing was published" in r.stderr
    assert ("model", "alice/tiny-int8") not in hub.repos and hub.log.lfs_uploads() == []
    assert (folder / "README.md").read_bytes() == card  # a refused push changes nothing


def forge(folder: Path, **changes) -> None:
    """A record saying every check passed, as a hand-edited or copied int8_verify.json would."""
    record = {
        "schema": "int8.verify/1", "int8_version": "0.1.0", "created": "2030-01-01T00:00:00+00:00",
        "target": folder.name, "against": "EleutherAI/gpt-j-6b", "quick": False, "passed": True,
        "metrics": {"top1_agreement": 1.0, "mean_kl": 0.0},
        "checks": [{"name": "kl", "group": "fidelity", "status": "pass", "passed": True, "figure": "0", "threshold": ""}],
    }
    record.update(changes)
    (folder / VERIFY_NAME).write_text(json.dumps(record))


FORGED = {
    "no binding": {},
    "binding of other files": {"manifest_sha256": "0" * 64},
    "passed but a check failed": {"checks": [{"name": "kl", "status": "fail", "passed": False}], "manifest_sha256": None},
    "passed as a string": {"passed": "true"},
    "a list": None,
}


@pytest.mark.parametrize("variant", sorted(FORGED))
def test_forged_or_stale_records_are_never_shown_as_passed(hub, folder, variant, capsys):
    if FORGED[variant] is None:
        (folder / VERIFY_NAME).write_text("[1, 2]")
    else:
        changes = dict(FORGED[variant])
        if changes.get("manifest_sha256", "") is None:  # bound right, but lying about its checks
            changes["manifest_sha256"] = manifest_digest(ConversionReport.load(folder).files)
        forge(folder, **changes)
    r = Ran(capsys, "card", str(folder))
    assert r.returncode == 0, r.stderr
    text = (folder / "README.md").read_text()
    assert "All checks passed" not in text and "EleutherAI/gpt-j-6b" not in text.split("## Fidelity")[1]

    r = push_cli(hub, capsys, folder)
    assert r.returncode == 0, r.stderr
    no_traceback(r)
    assert "Warning" in r.stdout + r.stderr and VERIFY_NAME in r.stdout + r.stderr
    files = hub.files("alice/tiny-int8")
    assert VERIFY_NAME not in files  # a record that does not describe these files is not published
    assert b"All checks passed" not in files["README.md"]


def test_a_record_of_the_same_files_is_shown_and_a_changed_file_makes_it_stale(folder, capsys):
    result = verify_checkpoint(folder, device="cpu", max_tokens=64)
    assert result.passed
    r = Ran(capsys, "card", str(folder))
    assert r.returncode == 0 and "All checks passed" in (folder / "README.md").read_text()
    edit_json(folder / "generation_config.json", lambda d: d.update(top_k=7))
    refresh_manifest(folder)  # the files changed since verify ran
    r = Ran(capsys, "card", str(folder))
    assert r.returncode == 0 and "All checks passed" not in (folder / "README.md").read_text()
    assert "Not measured for these files" in (folder / "README.md").read_text()


def test_refused_or_failed_push_leaves_the_card(hub, folder, capsys):
    card = (folder / "README.md").read_bytes()
    (folder / "stray.txt").write_text("not converted by int8")
    r = push_cli(hub, capsys, folder)
    assert r.returncode == 2 and "stray.txt" in r.stderr
    no_traceback(r)
    assert (folder / "README.md").read_bytes() == card
    (folder / "stray.txt").unlink()
    r = cli("push", str(folder), "--repo", "alice/tiny-int8",
            env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x", "INT8_HUB_TIMEOUT": "2"})
    assert r.returncode == 2
    no_traceback(r)
    assert (folder / "README.md").read_bytes() == card


# --------------------------------------------------------------------------- 5. nothing local published, no credentials printed


def test_no_absolute_local_paths_are_published(clean, folder, tmp_path, capsys):
    src, _ = clean
    out = folder.parent / "verify.json"
    r = Ran(capsys, "verify", str(folder), "--device", "cpu", "--json", str(out), "--update-card")
    assert r.returncode == 0, r.stderr
    report = json.loads((folder / "int8_report.json").read_text())
    assert report["source"]["id"] == src.name and all("/" not in f for f in report["source"]["files"])
    published = {p.name: p.read_text() for p in folder.iterdir() if p.suffix in (".json", ".md")}
    published["verify.json"] = out.read_text()
    for name, text in published.items():
        for root in {str(tmp_path), str(src.parent), str(Path.home()), str(tmp_path.resolve())}:
            assert root not in text, f"{name} carries the local path {root}"
    saved = json.loads((folder / VERIFY_NAME).read_text())
    assert saved["target"] == folder.name and saved["against"] == src.name


CREDENTIAL_ENDPOINTS = [
    f"http://alice:{SECRET}@127.0.0.1:9",
    f"https://{SECRET}@localhost:9/prefix",
]


@pytest.mark.parametrize("endpoint", CREDENTIAL_ENDPOINTS)
def test_endpoint_credentials_are_never_printed(folder, tmp_path, endpoint):
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_dummy", "INT8_HUB_TIMEOUT": "2"}
    runs = [
        cli("convert", "alice/tiny", "--out", str(tmp_path / "o"), env=env),
        cli("verify", "alice/tiny-int8", "--quick", env=env),
        cli("push", str(folder), "--repo", "alice/tiny-int8", env=env),
    ]
    for r in runs:
        assert r.returncode == 2, r.stderr
        no_traceback(r)
        assert SECRET not in r.stdout + r.stderr
        assert "127.0.0.1" in r.stderr or "localhost" in r.stderr  # the endpoint is named, without its userinfo


def test_redact_helper():
    from int8.hub.redact import redact

    assert redact(f"GET https://u:{SECRET}@h.example/api and http://{SECRET}@x:1/y") == (
        "GET https://h.example/api and http://x:1/y")
    assert redact("https://huggingface.co/alice/x") == "https://huggingface.co/alice/x"


# --------------------------------------------------------------------------- 12. malformed files: failed checks, exit 2, no traceback

CONFIG_DAMAGE = {
    "null": lambda d: NULL,
    "a list": lambda d: [d],
    "a string": lambda d: "config",
    "quantization_config null": lambda d: {**d, "quantization_config": None},
    "quantization_config a string": lambda d: {**d, "quantization_config": "compressed-tensors"},
    "config_groups a list": lambda d: {**d, "quantization_config": {**d["quantization_config"], "config_groups": [1]}},
    "group_size a string": lambda d: {**d, "quantization_config": {**d["quantization_config"], "config_groups": {
        "group_0": {**d["quantization_config"]["config_groups"]["group_0"], "weights": {
            **d["quantization_config"]["config_groups"]["group_0"]["weights"], "group_size": "64"}}}}},
    "invalid ignore regex": lambda d: {**d, "quantization_config": {**d["quantization_config"], "ignore": ["re:("]}},
    "ignore entry not a string": lambda d: {**d, "quantization_config": {**d["quantization_config"], "ignore": [7]}},
    "numeric field a string": lambda d: {**d, "n_embd": "128"},
    "vocab_size a float string": lambda d: {**d, "vocab_size": "320.5"},
}


@pytest.mark.parametrize("variant", sorted(CONFIG_DAMAGE))
def test_malformed_config_fails_a_check(folder, variant, capsys):
    edit_json(folder / "config.json", CONFIG_DAMAGE[variant])
    out = folder.parent / "v.json"
    for args in (["--quick"], ["--device", "cpu"]):
        r = Ran(capsys, "verify", str(folder), *args, "--json", str(out))
        assert r.returncode == 1, r.stderr
        assert "config" in failed_checks(out), failed_checks(out)


SOURCE_CONFIG_DAMAGE = {
    "null": lambda d: NULL,
    "a list": lambda d: [d],
    "a string": lambda d: "config",
    "quantization_config null": lambda d: {**d, "quantization_config": None},
    "quantization_config a string": lambda d: {**d, "quantization_config": "bitsandbytes"},
    "numeric field a string": lambda d: {**d, "n_embd": "128"},
    "n_layer a string": lambda d: {**d, "n_layer": "two"},
}


@pytest.mark.parametrize("variant", sorted(SOURCE_CONFIG_DAMAGE))
def test_malformed_source_config_exits_2(source, tmp_path, variant, capsys):
    edit_json(source / "config.json", SOURCE_CONFIG_DAMAGE[variant])
    r = Ran(capsys, "convert", str(source), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 2, r.stderr
    no_traceback(r)
    assert "config.json" in r.stderr


REPORT_DAMAGE = {
    "a list": lambda d: [d],
    "null": lambda d: NULL,
    "manifest entry without a name": lambda d: {**d, "files": [{k: v for k, v in f.items() if k != "name"} for f in d["files"]]},
    "manifest entry with an empty name": lambda d: {**d, "files": [{**d["files"][0], "name": ""}, *d["files"][1:]]},
    "files a string": lambda d: {**d, "files": "model.safetensors"},
    "source a list": lambda d: {**d, "source": ["local"]},
    "bytes a string": lambda d: {**d, "files": [{**f, "bytes": "many"} for f in d["files"]]},
}


@pytest.mark.parametrize("variant", sorted(REPORT_DAMAGE))
def test_malformed_report(hub, folder, variant, capsys):
    edit_json(folder / "int8_report.json", REPORT_DAMAGE[variant])
    out = folder.parent / "v.json"
    r = Ran(capsys, "verify", str(folder), "--quick", "--json", str(out))
    assert r.returncode == 1, r.stderr
    assert "report" in failed_checks(out)
    hub.login("alice")
    for args in (["card", str(folder)], ["push", str(folder), "--repo", "alice/tiny-int8"]):
        r = Ran(capsys, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "int8_report.json" in r.stderr
    assert ("model", "alice/tiny-int8") not in hub.repos


@pytest.mark.parametrize("record", ["[]", "null", '"passed"', '{"schema": "int8.verify/1", "checks": 5}', "{not json"])
def test_malformed_verify_record(folder, record, capsys):
    (folder / VERIFY_NAME).write_text(record)
    r = Ran(capsys, "card", str(folder))
    assert r.returncode == 0, r.stderr
    assert "unreadable" in (folder / "README.md").read_text().split("## Fidelity")[1]
    r = Ran(capsys, "verify", str(folder), "--quick")
    assert r.returncode == 0, r.stderr  # the record is outside the manifest, and replaced by the next full verify


def test_library_errors_are_int8_errors(folder):
    edit_json(folder / "int8_report.json", lambda d: [d])
    from int8.hub.card import rewrite_card

    with pytest.raises(Int8Error, match="int8_report.json"):
        rewrite_card(folder)
