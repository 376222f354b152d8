"""Every bad input gets a clear error (exit code 2, no traceback) and leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import make_tiny
from safetensors.torch import save_file

import int8
from int8 import errors

INT8 = [sys.executable, "-m", "int8.cli"]


@pytest.fixture(scope="module")
def gptj(tmp_path_factory) -> Path:
    return make_tiny("gptj", tmp_path_factory.mktemp("src") / "gptj")


@pytest.fixture
def src(gptj, tmp_path) -> Path:
    """A private copy of the tiny GPT-J that a test may damage."""
    return Path(shutil.copytree(gptj, tmp_path / "src"))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "int8-partial" in p.name or "int8-old" in p.name)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*INT8, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def convert(src: Path, out: Path, **kw):
    return int8.convert(src, out, block_size=64, device="cpu", **kw)


# -- the source ---------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(errors.SourceNotFound, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out")


def test_unknown_preset_suggests_near_names(tmp_path):
    with pytest.raises(errors.SourceNotFound) as e:
        int8.convert("flan-t5-smal", tmp_path / "out")
    assert "flan-t5-small" in e.value.hint


def test_folder_without_weights(src, tmp_path):
    (src / "model.safetensors").unlink()
    with pytest.raises(errors.NoWeightsFound, match="no model weights"):
        convert(src, tmp_path / "out")


def test_shards_without_index(src, tmp_path):
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    with pytest.raises(errors.NoWeightsFound, match="no model.safetensors") as e:
        convert(src, tmp_path / "out")
    assert "index" in e.value.hint


def test_no_config(src, tmp_path):
    (src / "config.json").unlink()
    with pytest.raises(errors.CorruptCheckpoint, match="no config.json"):
        convert(src, tmp_path / "out")


def test_unsupported_architecture(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "not-a-real-model"
    cfg["architectures"] = ["NotARealModelForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.UnsupportedModel, match="not-a-real-model"):
        convert(src, tmp_path / "out")


def test_weights_that_do_not_match_the_config(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_embd"] = 256
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.UnsupportedModel, match="expects"):
        convert(src, tmp_path / "out")


def test_missing_tensor(src, tmp_path):
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    del state["transformer.h.1.mlp.fc_in.weight"]
    save_file(state, src / "model.safetensors")
    with pytest.raises(errors.UnsupportedModel, match="fc_in.weight"):
        convert(src, tmp_path / "out")


def test_already_quantized(src, tmp_path):
    out = tmp_path / "once"
    convert(src, out)
    with pytest.raises(errors.UnsupportedModel, match="already quantized"):
        convert(out, tmp_path / "twice")


@pytest.mark.parametrize("damage", ["truncate", "header-length", "header-json"])
def test_corrupt_safetensors(src, tmp_path, damage):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 1000]
    elif damage == "header-length":
        data[0:8] = (10**12).to_bytes(8, "little")
    else:
        data[12] = ord("#")
    path.write_bytes(bytes(data))
    with pytest.raises(errors.CorruptCheckpoint, match="model.safetensors"):
        convert(src, tmp_path / "out")


def test_index_naming_a_missing_shard(tmp_path):
    src = make_tiny("bloom", tmp_path / "src", form="safetensors-sharded")
    next(iter(sorted(src.glob("model-*.safetensors")))).unlink()
    with pytest.raises(errors.CorruptCheckpoint, match="missing"):
        convert(src, tmp_path / "out")


def test_index_disagreeing_with_shards(tmp_path):
    src = make_tiny("bloom", tmp_path / "src", form="safetensors-sharded")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.CorruptCheckpoint, match=name):
        convert(src, tmp_path / "out")


def test_truncated_bin(tmp_path):
    src = make_tiny("gptj", tmp_path / "src", form="bin")
    path = src / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(errors.CorruptCheckpoint, match="pytorch_model.bin"):
        convert(src, tmp_path / "out")


def test_bin_with_pickled_objects_is_refused(tmp_path):
    src = make_tiny("gptj", tmp_path / "src", form="bin")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["transformer.wte.weight"] = _Evil()
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(errors.UnsupportedModel, match="weights_only"):
        convert(src, tmp_path / "out")
    assert not _Evil.ran


class _Evil:
    ran = False

    def __reduce__(self):
        return (_Evil._run, ())

    @staticmethod
    def _run():  # pragma: no cover - must never be called
        _Evil.ran = True


def test_legacy_bin_that_cannot_be_mmapped(tmp_path):
    src = make_tiny("gptj", tmp_path / "src", form="bin")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(errors.UnsupportedModel, match="memory-mapped") as e:
        convert(src, tmp_path / "out")
    assert "safetensors" in e.value.hint


@pytest.mark.parametrize("kernel", ["numpy", "numba"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["transformer.h.1.attn.v_proj.weight", "transformer.h.0.ln_1.weight", "transformer.wte.weight"])
def test_non_finite_source_tensor_stops_the_run(src, tmp_path, bad, tensor, kernel, monkeypatch):
    """Quantized or kept (a norm, the embedding: cast to bf16, in one pass with its check once numba is loaded),
    by either CPU kernel."""
    from safetensors.torch import load_file

    from int8 import kernels
    from int8.conversion import arrays

    if kernel == "numba" and not kernels.available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(arrays, "choose_kernel", lambda nbytes: arrays.Kernel(kernel))
    if kernel == "numpy":
        monkeypatch.setattr(kernels, "loaded", lambda: False)

    state = load_file(src / "model.safetensors")
    state[tensor].view(-1)[3] = bad
    save_file(state, src / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(errors.BadTensor, match=tensor.replace(".", r"\.")):
        convert(src, out)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_beside_the_stream_stops_it_and_leaves_nothing(src, tmp_path, monkeypatch, failure):
    """The side files are copied while the tensors stream (`engine.stream`'s ``meanwhile``): a failure there, or
    Ctrl-C, stops the workers and discards the staging folder, as a failure of the stream itself does."""
    import threading

    from int8.conversion import api

    def fail(src_folder, dst):
        raise failure

    monkeypatch.setattr(api, "_copy_sidecars", fail)
    out = tmp_path / "out"
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(errors.OutputError if isinstance(failure, OSError) else KeyboardInterrupt):
        convert(src, out)
    assert not out.exists() and leftovers(tmp_path) == []
    assert not [t.name for t in threading.enumerate() if t.name.startswith("int8-") and t.name not in before]


def test_the_streaming_time_is_the_streams_own(src, tmp_path, monkeypatch):
    """The report's streaming time (and the throughput it gives) counts the tensors' stream alone, not the work
    done beside it (side files, the card's imports) when that ends later."""
    import time

    from int8.conversion import api

    real = api._copy_sidecars

    def slow(src_folder, dst):
        time.sleep(1.5)
        return real(src_folder, dst)

    monkeypatch.setattr(api, "_copy_sidecars", slow)
    report = convert(src, tmp_path / "out")
    assert report.totals.seconds >= 1.5 > report.totals.stream_seconds > 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_fp16_overflow_names_the_tensor(src, tmp_path):
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    state["transformer.ln_f.bias"][0] = 1e6
    save_file(state, src / "model.safetensors")
    with pytest.raises(errors.BadTensor, match="ln_f.bias") as e:
        convert(src, tmp_path / "out", dtype="fp16")
    assert "bf16" in e.value.hint


# -- the output ---------------------------------------------------------------------------------


def test_existing_output_is_never_replaced_without_overwrite(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(errors.OutputExists, match="already exists"):
        convert(src, out)
    with pytest.raises(errors.OutputExists, match="not an int8 output"):
        convert(src, out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me" and leftovers(tmp_path) == []


def test_overwrite_replaces_an_earlier_output(src, tmp_path):
    out = tmp_path / "out"
    first = convert(src, out, dtype="fp32")
    second = convert(src, out, dtype="bf16", overwrite=True)
    assert first.quantization.dtype == "float32" and second.quantization.dtype == "bfloat16"
    assert json.loads((out / "int8_report.json").read_text())["quantization"]["dtype"] == "bfloat16"
    assert leftovers(tmp_path) == []


def test_output_inside_the_source_is_refused(src):
    with pytest.raises(errors.OutputExists, match="overlaps"):
        convert(src, src / "int8")


def test_disk_full_leaves_nothing(src, tmp_path, monkeypatch):
    from int8.conversion import writer

    real = writer.ShardWriter._put

    def put(self, data, after=None):
        if self.bytes_written > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data, after)

    monkeypatch.setattr(writer.ShardWriter, "_put", put)
    out = tmp_path / "out"
    with pytest.raises(errors.OutputError, match="disk filled up"):
        convert(src, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_not_enough_space_is_refused_before_writing(src, tmp_path, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(errors.OutputError, match="not enough disk space"):
        convert(src, tmp_path / "out")


def test_interrupt_leaves_nothing(src, tmp_path):
    class Interrupting:
        calls = 0

        def start(self, total_bytes, total_tensors):
            pass

        def advance(self, nbytes, tensors=0):
            Interrupting.calls += 1
            if Interrupting.calls == 5:
                raise KeyboardInterrupt

        def finish(self):
            pass

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, progress=Interrupting())
    assert not out.exists() and leftovers(tmp_path) == []


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["convert", "/definitely/not/here"], "does not exist"),
        (["convert", "gpt-j-6"], "Did you mean gpt-j-6b"),
        (["convert", "{src}", "--dtype", "fp8"], "unknown dtype"),
        (["convert", "{src}", "--max-shard-size", "lots"], "cannot read size"),
        (["convert", "{src}", "--device", "tpu" if torch.cuda.is_available() else "cuda"], "--device"),
        (["convert", "{src}", "--block-size", "0"], "block-size"),
        (["convert", "{src}", "--out", "{existing}"], "already exists"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(args, message, src, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("x")
    args = [a.format(src=src, existing=existing) for a in args]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_converts_and_summarises(src, tmp_path):
    r = run_cli("convert", str(src), "--block-size", "64", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the table folds a long output path over lines, never cuts it: read it back without the borders
    flat = "".join(ch for ch in r.stderr if not ch.isspace() and ch != "│")
    assert "ratio" in r.stderr and str(tmp_path / "o") in flat and "…" not in r.stderr
    r = run_cli("convert", str(src), "--block-size", "64", "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.strip() == "" and (tmp_path / "src-int8" / "int8_report.json").exists()


def test_cli_help_teaches():
    r = run_cli("convert", "--help")
    assert r.returncode == 0
    for word in ("--block-size", "--dtype", "--skip", "--overwrite", "gpt-j-6b", "Examples"):
        assert word in r.stdout
    r = run_cli("presets")
    assert r.returncode == 0 and "EleutherAI/gpt-j-6b" in r.stdout and "bigscience/bloomz" in r.stdout
    # every repo id whole, at the 80 columns a pipe gets, so it can be copied from the table
    from int8.presets import all_presets

    missing = [p.repo for p in all_presets().values() if p.repo not in r.stdout]
    assert not missing and "…" not in r.stdout, missing
