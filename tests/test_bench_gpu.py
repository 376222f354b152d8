"""`bench/gpu` without a GPU: it says so, writes a JSON saying so, exits 0, and keeps real GPU figures;
its claim table copes with a complete GPU result (whose fields no CPU run produces)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: bench/gpu would really run")


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, INT8_WHEELS=str(ROOT / "bench" / "no-wheels-in-tests"))
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    proc = run_bench("--out", str(tmp_path), "--quick")
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device present" in proc.stdout
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["status"] == "no-cuda" and "no CUDA device" in r["reason"]
    assert r["sections"] == {} and r["env"]["torch"] == torch.__version__


def test_without_cuda_real_gpu_figures_are_kept(tmp_path):
    real = {"benchmark": "gpu", "status": "ok", "claims": [{"claim": "x", "met": True}]}
    (tmp_path / "gpu.json").write_text(json.dumps(real))
    proc = run_bench("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "gpu.json").read_text()) == real
    assert json.loads((tmp_path / "gpu-no-cuda.json").read_text())["status"] == "no-cuda"


@pytest.mark.parametrize("args, message", [(["--sections", "kernel,bogus"], "unknown section"), (["--budget-s", "soon"], "invalid")])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    proc = run_bench("--out", str(tmp_path), *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_the_executable_is_a_bash_wrapper():
    assert os.access(SCRIPT, os.X_OK) and SCRIPT.read_text().startswith("#!/usr/bin/env bash")
    proc = run_bench("--help")
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--simulate" in proc.stdout


def _module():
    spec = importlib.util.spec_from_file_location("int8_bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gpu_like_result() -> dict:
    times = {"int8-fused": {"median_s": 0.02}, "int8-dequantize": {"median_s": 0.05}, "fp16": {"median_s": 0.025}}
    decode = {"batch": 1, "times": times, "tokens_per_s": {"int8-fused": 50.0, "int8-dequantize": 20.0, "fp16": 40.0},
              "int8-auto_time_ratio": 0.8, "int8-fused_time_ratio": 0.8, "int8-dequantize_time_ratio": 2.0}
    graph = {"batch": 1, "ms_per_step": {"int8-auto": 2.1, "int8-dequantize": 9.0, "fp16": 3.0},
             "int8-auto_time_ratio": 0.7, "int8-dequantize_time_ratio": 3.0}
    shape = {"layer": "fc_in 16384x4096", "gemv_int8_us": 20.0, "gemv_int8_gb_s": 3400.0, "gemv_fp16_us": 38.0,
             "gemv_fp16_gb_s": 3500.0, "gemv_dequantize_us": 110.0, "gemv_time_ratio_vs_fp16": 0.53, "t8_int8_us": 25.0,
             "t8_fp16_us": 40.0, "t512_int8_us": 300.0, "t512_fp16_us": 280.0, "grad_int8_us": 310.0, "grad_fp16_us": 290.0,
             "prefill_tokens": 512}
    step = {"step_s": 0.9, "peak_bytes": 9.4e9}
    return {
        "status": "ok", "wall_s": 300.0, "env": {"device_name": "NVIDIA H200"},
        "sections": {
            "kernel": {"check": {"usable": True, "all_ok": False, "passed": 40, "total": 41},
                       "bench": {"shapes": [shape], "call_overhead": {"layer": "4096x4096, 1 token", "int8_layer_call_us": 30.0,
                                                                       "fp16_linear_call_us": 12.0, "int8_kernel_direct_call_us": 22.0}}},
            "convert": {"read_gb_s": 5.0, "quantizer": {"all_identical": True, "cases": [{"identical": True}]},
                        "cli": {"weights_identical": True, "identical_files": ["a", "b"], "different_files": []},
                        "rate": {"convert_gb_s": 2.5, "vs_read": 0.5}},
            "model": {"decode_b1": decode, "decode_b8": dict(decode, batch=8), "decode_graph_b1": graph,
                      "prefill": {"tokens": 512, "times": times, "int8-fused_time_ratio": 1.2, "int8-dequantize_time_ratio": 1.3}},
            "lora": {"fp16": {"fp16": {"step_s": 0.8}},
                     "int8": {"triton": step, "dequantize": dict(step, peak_bytes=12e9),
                              "optimizer_state": {"class": "bitsandbytes.optim.adamw.AdamW8bit", "moment_dtypes": {"state1:uint8": 56},
                                                  "eight_bit": True}}},
        },
        "errors": ["model: decode batch 8: RuntimeError: example"],
    }


def test_claims_of_a_complete_gpu_result(capsys):
    gpu = _module()
    r = _gpu_like_result()
    r["claims"] = gpu.claims(r)
    met = {c["claim"]: c["met"] for c in r["claims"]}
    assert met["fused kernels correct on this GPU"] is False          # 40/41
    assert met["decode batch 1 (eager generate): int8 (auto) time / fp16"] is True    # 0.8 <= 1.0
    assert met["decode batch 1 (CUDA graph): int8 (auto) time / fp16"] is True        # 0.7
    assert met["prefill 512 tokens: int8 (fused) time / fp16"] is False  # 1.2 > 1.10 (no auto figure: the fused one)
    assert met["GPT-J-6B LoRA step peak GPU memory (int8, fused)"] is True           # 9.4 GB
    assert met["GPT-J-6B LoRA step peak GPU memory (int8, de-quantize path)"] is False  # 12 GB
    assert met["8-bit Adam used (optimizer state dtypes)"] is True
    assert met["int8 convert --device cuda byte-identical to --device cpu"] is True
    assert met["GEMV GB/s, fc_in 16384x4096"] is True
    gpu.print_table(r)
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "fc_in 16384x4096" in out and "RuntimeError: example" in out
    assert "9.40 GB" in out and "ms per step int8 2.10" in out


def test_simulated_lora_section_runs_every_kernel(tmp_path):
    """The LoRA section end to end on CPU at toy size (Triton's interpreter for the fused kernel): every step
    runs, with bitsandbytes' 8-bit AdamW, and the int8 codes stay frozen (a broken import once failed both steps)."""
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    proc = run_bench("--simulate", "--quick", "--sections", "lora", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["errors"] == [], r["errors"]
    lora = r["sections"]["lora"]
    assert lora["fp16"]["fp16"]["step_s"] > 0
    for kernel in ("auto", "triton", "dequantize"):
        assert lora["int8"][kernel]["step_s"] > 0, lora["int8"][kernel]
    assert lora["int8"]["optimizer_state"]["eight_bit"] and lora["int8"]["int8_codes_unchanged"] is True
