"""`int8 verify --max-memory`: a budget too small for the whole model runs it layer by layer, with the same figures.

Which run a budget gets is decided from sizes alone (`int8.verify.budget`), so
these tests force the layer-by-layer run by giving one byte less than the whole
run's own estimate (recorded in every result's metrics), whatever the machine
is doing; every budget given is far below any machine's memory.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
from models import make_tiny, refresh_manifest
from safetensors import safe_open
from safetensors.torch import save_file

import int8
from int8.errors import UsageError
from int8.verify import verify_checkpoint

BLOCK = 64
TOKENS = 256
ROOMY = "4GB"  # holds any tiny model whole
SHARD = "model-00001-of-00001.safetensors"
FIGURES = ("top1_agreement", "top1_reference", "top1_reference_best", "mean_kl", "mean_kl_reference",
           "mean_kl_reference_least", "ppl_original", "ppl_converted", "ppl_ratio", "reference_draws", "tokens")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    built: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in built:
            if arch == "gptj-other":
                src = make_tiny("gptj", root / "gptj-other", seed=7)
                built[arch] = (src, src)
            else:
                src = make_tiny(arch, root / arch)
                out = root / f"{arch}-int8"
                int8.convert(src, out, block_size=BLOCK, device="cpu")
                built[arch] = (src, out)
        return built[arch]

    return get


def run(folder, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("max_tokens", TOKENS)
    kwargs.setdefault("save", False)
    return verify_checkpoint(folder, **kwargs)


def failed(result) -> dict[str, str]:
    return {c.name: c.detail for c in result.checks if c.status == "fail"}


def streaming_budget(folder: Path, against: Path) -> int:
    """One byte less than the whole run's estimate: the layer-by-layer run must take over."""
    whole = run(folder, against=str(against), max_memory=ROOMY)
    assert whole.metrics["layer_by_layer"] == 0
    return int(whole.metrics["memory_whole_bytes"]) - 1


@pytest.mark.parametrize("arch", ["gptj", "t5", "mt5", "bloom", "llama"])
def test_layer_by_layer_gives_the_whole_runs_figures(arch, tiny):
    src, out = tiny(arch)
    whole = run(out, against=str(src), max_memory=ROOMY)
    assert whole.passed and whole.metrics["layer_by_layer"] == 0
    budget = int(whole.metrics["memory_whole_bytes"]) - 1
    assert whole.metrics["memory_layer_by_layer_bytes"] <= budget  # the model splits, and that fits
    streamed = run(out, against=str(src), max_memory=budget)
    assert streamed.metrics["layer_by_layer"] == 1
    assert streamed.metrics["memory_budget_bytes"] == budget
    assert [(c.name, c.status) for c in streamed.checks] == [(c.name, c.status) for c in whole.checks]
    for key in FIGURES:
        a, b = whole.metrics[key], streamed.metrics[key]
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (key, a, b)
    assert "meta device" in streamed.check("load").figure
    assert "layer by layer" in streamed.check("forward").figure


def _double_scales(folder: Path) -> None:
    path = folder / SHARD
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file({k: v * 2 if k.endswith(".weight_scale") else v for k, v in tensors.items()}, path, metadata=meta)
    refresh_manifest(folder)


@pytest.mark.parametrize("arch", ["gptj", "t5", "bloom"])
def test_doubled_scales_are_caught_under_the_budget(arch, tiny, tmp_path):
    src, clean = tiny(arch)
    folder = tmp_path / f"{arch}-int8"
    shutil.copytree(clean, folder)
    _double_scales(folder)
    result = run(folder, against=str(src), max_memory=streaming_budget(folder, src))
    assert result.metrics["layer_by_layer"] == 1
    problems = failed(result)
    assert {"reconstruction", "kl"} <= set(problems), problems
    assert set(problems) <= {"reconstruction", "top1", "kl", "perplexity"}
    assert result.metrics["mean_kl"] > 30 * 3 * result.metrics["mean_kl_reference"]


def test_a_wrong_original_is_caught_under_the_budget(tiny):
    other, _ = tiny("gptj-other")
    src, clean = tiny("gptj")
    result = run(clean, against=str(other), max_memory=streaming_budget(clean, src))
    assert result.metrics["layer_by_layer"] == 1
    assert {"reconstruction", "kl"} <= set(failed(result))
    assert result.metrics["mean_kl"] > 100 * result.metrics["mean_kl_reference"]


def test_without_an_original_the_converted_model_still_runs(tiny, tmp_path):
    src, clean = tiny("gptj")
    budget = streaming_budget(clean, src)
    folder = tmp_path / "alone-int8"
    shutil.copytree(clean, folder)  # the recorded original is not beside it
    result = run(folder, max_memory=budget)
    assert set(failed(result)) == {"original"}
    assert result.check("forward").status == "pass" and "layer by layer" in result.check("forward").figure


def test_a_budget_too_small_for_one_layer_names_the_smallest_that_works(tiny):
    src, out = tiny("gptj")
    whole = run(out, against=str(src), max_memory=ROOMY)
    smallest = int(whole.metrics["memory_layer_by_layer_bytes"])
    with pytest.raises(UsageError) as e:
        run(out, against=str(src), max_memory=smallest - 1)
    m = re.search(r"too small for one layer of this model \(the smallest budget that works is ([\d.]+ [GM]B)\)", e.value.message)
    assert m, e.value.message
    assert run(out, against=str(src), max_memory=m.group(1)).passed  # the size it names works (rounded up)


def test_a_model_that_runs_only_whole_is_refused_when_it_does_not_fit(tiny):
    src, out = tiny("gpt2")  # Conv1D: int8 builds it whole; no layer-by-layer run
    whole = run(out, against=str(src), max_memory=ROOMY)
    assert "memory_layer_by_layer_bytes" not in whole.metrics
    with pytest.raises(UsageError, match="runs only whole"):
        run(out, against=str(src), max_memory=int(whole.metrics["memory_whole_bytes"]) - 1)


def test_a_budget_above_the_machines_memory_is_refused_before_any_work(tiny, monkeypatch):
    import psutil

    from int8.verify import core

    _, out = tiny("gptj")
    monkeypatch.setattr(core, "resolve_target", lambda *a, **k: pytest.fail("the target was resolved"))
    with pytest.raises(UsageError, match="more than this machine's memory"):
        run(out, max_memory=psutil.virtual_memory().total + 1)
