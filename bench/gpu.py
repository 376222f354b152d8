#!/usr/bin/env python3
"""Every GPU claim of int8, measured in one run: `bench/gpu` (this script behind a bash wrapper).

On a machine with a CUDA GPU it measures, in this order (each measurement on
its own: one that fails records its error and the run goes on):

1. kernel   The fused Triton kernels on this GPU: correctness against the
            de-quantize-then-matmul reference (every scale and compute dtype,
            ragged shapes, 1 / 8 / 512 tokens, forward and grad of input; run
            in a child process first, so that a crashing kernel cannot take
            the rest of the run with it), then a micro-benchmark on GPT-J's
            linear shapes (4096x4096, 16384x4096, 4096x16384): achieved GB/s of
            the one-token GEMV against fp16 ``F.linear``, 8 and 512 tokens, the
            backward, the Python cost of one layer call, and (not with
            --quick) a sweep of tile configurations.
2. convert  ``int8 convert --device cuda`` against ``--device cpu`` on a
            synthetic GPT-J-shaped checkpoint (GPT-J-6B's tensor shapes,
            vocabulary 8192): the output files byte for byte, the quantizer on
            outlier-laden tensors in every scale dtype, and the CUDA
            conversion rate against the rate of reading the source file.
3. model    A GPT-J-6B-shaped model (the real config, 28 layers, random fp16
            weights built on the GPU) and its int8 twin (quantized in memory
            with int8's own quantizer into `Int8Linear` layers, block 128, fp16
            scales): prefill latency at 512 tokens and decode tokens/s at batch
            1 and 8, for int8 with the fused kernel, int8 de-quantizing, and
            the fp16 original, interleaved in the same run, as ratios; and the
            logits of the two int8 paths against each other.
4. lora     One LoRA training step (r=8 on q_proj/v_proj, sequence 512, batch
            1, gradient checkpointing, `int8.runtime.adapter_optimizer`, i.e.
            bitsandbytes' 8-bit AdamW on CUDA): peak GPU memory
            (``max_memory_allocated``, the int8 model alone on the GPU), step
            time against the same step on the fp16 model, and the optimizer
            state dtypes (8-bit Adam really used).

It prints a table and writes ``bench/results/gpu.json`` (``--out`` to change
the folder). Without a CUDA device it says so, writes a JSON saying so, and
exits 0. Sized for <= 8 minutes on an H100/H200 (``--quick``: about half);
``--budget-s`` skips what would run past it.

    bench/gpu                      # everything
    bench/gpu --quick              # fewer repeats and tokens, no tile sweep
    bench/gpu --sections kernel,model --out /tmp/r
    bench/gpu --simulate --quick   # a dry run of this script on CPU at toy sizes (Triton's
                                   # interpreter for the kernels; the figures mean nothing)

A GPU machine without network can get missing packages (bitsandbytes, compressed-tensors and its
pydantic/loguru) as wheels in ``.whl/`` (or ``$INT8_WHEELS``): the wrapper installs them first.
``bench/gpu-wheels`` downloads them (on a machine with network) for that machine's Python.
"""

from __future__ import annotations

import os
import sys

SIMULATE = "--simulate" in sys.argv
if SIMULATE:  # Triton reads this when triton.language is first imported: before torch is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

try:
    import torch
except Exception as _e:  # pragma: no cover - the project needs torch; say so instead of a traceback
    torch = None
    TORCH_ERROR = f"{type(_e).__name__}: {_e}"
else:
    TORCH_ERROR = None

SECTIONS = ("kernel", "convert", "model", "lora")
GB = 1e9
GIB = 2**30

# EleutherAI/gpt-j-6b's config.json
GPTJ_6B = dict(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_inner=None,
               activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
               initializer_range=0.02, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False)
TOY = dict(GPTJ_6B, vocab_size=512, n_positions=256, n_embd=256, n_layer=2, n_head=4, rotary_dim=16)
GPTJ_LINEARS = [(4096, 4096, "q/k/v/out_proj 4096x4096"), (16384, 4096, "fc_in 16384x4096"), (4096, 16384, "fc_out 4096x16384")]
TOY_LINEARS = [(256, 256, "toy 256x256"), (1024, 256, "toy 1024x256"), (256, 1024, "toy 256x1024")]

TARGETS = {
    "decode_time_ratio": 1.0,           # int8 (fused) time per token / fp16's
    "decode_time_ratio_moonshot": 0.6,
    "prefill_time_ratio": 1.10,
    "lora_peak_gb": 11.0,               # decimal GB, max_memory_allocated of one step
}


# ------------------------------------------------------------------------------------------------
# small helpers


def _err(e: BaseException) -> dict:
    tb = traceback.format_exc().strip().splitlines()
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": tb[-12:]}


def _free() -> None:
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Budget:
    """A wall-clock budget: measurements that would start past it are skipped (and say so)."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s


class Run:
    """Device helpers, results, and the try/except around every measurement."""

    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.budget = Budget(args.budget_s)
        self.errors: list[str] = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, name: str, fn, *, need_s: float = 0.0, **kwargs):
        """Run ``fn(**kwargs)``; a failure or a spent budget becomes a dict saying so."""
        if not self.budget.allows(need_s):
            print(f"  {name}: skipped (time budget: {self.budget.left():.0f}s left, about {need_s:.0f}s needed)", flush=True)
            return {"skipped": f"time budget ({self.budget.left():.0f}s left of {self.budget.seconds:.0f}s)"}
        t0 = time.perf_counter()
        try:
            out = fn(**kwargs)
        except Exception as e:  # recorded; the run goes on
            out = _err(e)
            self.errors.append(f"{name}: {out['error']}")
            print(f"  {name}: FAILED {out['error'][:300]}", flush=True)
            _free()
        else:
            print(f"  {name}: done in {time.perf_counter() - t0:.1f}s", flush=True)
        if isinstance(out, dict):
            out.setdefault("seconds", round(time.perf_counter() - t0, 2))
        return out

    # -- timing ---------------------------------------------------------------------------------

    def wall(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def kernel_time(self, fn, reps: int, warmup: int = 2) -> float:
        """Median GPU time of ``fn`` in seconds, the L2 cache flushed before each call (cold weights).

        CUDA events around each call; a 256 MB memset before each keeps the GPU busy while the CPU
        queues the call, so launch overhead is not counted. On CPU (--simulate): wall time.
        """
        for _ in range(warmup if self.cuda else 1):
            fn()
        if not self.cuda:
            return statistics.median(self.wall(fn) for _ in range(reps))
        flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        del flush
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True))

    def call_time(self, fn, calls: int) -> float:
        """Wall seconds per call of a loop of ``calls`` (what a Python caller pays, launch overhead included)."""
        fn()
        self.sync()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - t) / calls

    def peak_reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def int8_layers(model):
    from int8.runtime.layer import Int8Linear

    return [m for m in model.modules() if isinstance(m, Int8Linear)]


def set_kernel(model, kernel: str) -> None:
    for m in int8_layers(model):
        m.kernel = kernel


def reference_dequantized(codes, scales, block: int, dtype) -> torch.Tensor:
    """The de-quantize path's weight: the scale rounded to ``dtype``, times the code, rounded to ``dtype``."""
    s = scales.to(dtype).float().repeat_interleave(block, dim=1)[:, : codes.shape[1]]
    return (codes.float() * s).to(dtype)


def error_ratio(got, ref, a, b, dtype, k: int) -> tuple[float, float]:
    """(max |got - ref|, max of |got - ref| / bound), bound as in tests/test_triton_matmul.py (float32 refs)."""
    eps = torch.finfo(dtype).eps
    bound = eps * ref.abs() + (eps + 2 * k * 2.0**-24) * (a.float().abs() @ b.float().abs()) + 1e-30
    err = (got.float() - ref).abs()
    return err.max().item(), (err / bound).max().item()


# ------------------------------------------------------------------------------------------------
# 1. kernels: correctness (child process) and micro-benchmark


def kernel_cases(simulate: bool) -> list[dict]:
    """(out, in, block, tokens, scale dtype, compute dtype, bias) cases of the correctness check."""
    cases = []
    ragged = (45, 100, 32) if simulate else (1000, 1000, 32)   # in not a multiple of any tile, last block ragged
    combos = [("fp16", "fp16"), ("bf16", "fp16"), ("fp32", "fp16"), ("fp16", "bf16"), ("bf16", "bf16"), ("fp32", "bf16"),
              ("bf16", "fp32"), ("fp32", "fp32")]
    for sd, cd in combos:
        for tokens in (1, 17):
            cases.append(dict(shape=ragged, tokens=tokens, scale=sd, compute=cd, bias=tokens == 1))
    for out_f, in_f, _ in (TOY_LINEARS if simulate else GPTJ_LINEARS):
        for tokens in ((1, 8, 20) if simulate else (1, 8, 512)):
            cases.append(dict(shape=(out_f, in_f, 128), tokens=tokens, scale="fp16", compute="fp16", bias=out_f > in_f))
    for block in (10, 48, 64):  # scales gathered per value (10), a 16-aligned odd block (48), block 64
        cases.append(dict(shape=(33, 480, block), tokens=1, scale="bf16", compute="fp16", bias=True))
        cases.append(dict(shape=(33, 480, block), tokens=5, scale="bf16", compute="fp16", bias=False))
    for c in cases:
        o, i, b = c["shape"]
        c["id"] = f"{o}x{i}/b{b} t{c['tokens']} scale {c['scale']} compute {c['compute']}{' +bias' if c['bias'] else ''}"
    return cases


def check_kernels(device, simulate: bool) -> dict:
    """Every case: the kernel's output and grad of input against the reference, error / bound."""
    from int8.quantize import quantize
    from int8.runtime import triton_matmul as tm

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for c in kernel_cases(simulate):
        out_f, in_f, block = c["shape"]
        sdt, cdt = dtypes[c["scale"]], dtypes[c["compute"]]
        row = {"case": c["id"]}
        try:
            w = torch.randn(out_f, in_f, generator=g) * 0.02
            w[:, :7] *= 40  # outliers: the first block of every row gets a much larger scale
            q = quantize(w.to(device), block, sdt)
            x = torch.randn(c["tokens"], in_f, generator=g).to(device, cdt)
            bias = torch.randn(out_f, generator=g).to(device, cdt) if c["bias"] else None
            dy = torch.randn(c["tokens"], out_f, generator=g).to(device, cdt)
            wref = reference_dequantized(q.codes, q.scales, block, cdt).float()
            y = tm.linear(x, q.codes, q.scales, block, bias)
            ref = x.float() @ wref.T + (bias.float() if bias is not None else 0)
            row["forward_max_err"], row["forward_ratio"] = error_ratio(y, ref, x, wref.T, cdt, in_f)
            gx = tm.linear_grad_input(dy, q.codes, q.scales, block)
            ref_g = dy.float() @ wref
            row["grad_max_err"], row["grad_ratio"] = error_ratio(gx, ref_g, dy, wref, cdt, out_f)
            # the second launch of a specialization goes straight to the compiled kernel (tm._launch): same bytes
            row["repeat_identical"] = bool(torch.equal(tm.linear(x, q.codes, q.scales, block, bias), y)
                                           and torch.equal(tm.linear_grad_input(dy, q.codes, q.scales, block), gx))
            wq = reference_dequantized(q.codes, q.scales, block, cdt)
            row["dequantize_identical"] = bool(torch.equal(tm.dequantize(q.codes, q.scales, block, cdt), wq)
                                               and torch.equal(tm.dequantize(q.codes, q.scales, block, cdt), wq))
            row["ok"] = (row["forward_ratio"] <= 1.0 and row["grad_ratio"] <= 1.0 and y.dtype == cdt and gx.dtype == cdt
                         and bool(torch.isfinite(y).all()) and bool(torch.isfinite(gx).all())
                         and row["repeat_identical"] and (simulate and cdt == torch.bfloat16 or row["dequantize_identical"]))
        except Exception as e:
            row.update(_err(e), ok=False)
        rows.append(row)
        print(f"    {'ok ' if row['ok'] else 'BAD'} {c['id']}: fwd x{row.get('forward_ratio', float('nan')):.3f} "
              f"bwd x{row.get('grad_ratio', float('nan')):.3f} repeat {row.get('repeat_identical')} "
              f"dequant {row.get('dequantize_identical')} {row.get('error', '')[:200]}", flush=True)
    return {"cases": rows, "passed": sum(r["ok"] for r in rows), "total": len(rows), "all_ok": all(r["ok"] for r in rows),
            "launch": tm.fast_launch_status()}


def kernel_check_child(run: Run) -> dict:
    """Run `check_kernels` in a child process: a kernel that crashes the CUDA context takes only the child."""
    with tempfile.TemporaryDirectory(prefix="int8-gpu-check-") as tmp:
        path = Path(tmp) / "check.json"
        cmd = [sys.executable, __file__, "--check-kernels", str(path)] + (["--simulate"] if run.args.simulate else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60, min(300, run.budget.left())))
        except subprocess.TimeoutExpired as e:
            return {"usable": False, "error": f"the kernel check timed out after {e.timeout:.0f}s"}
        out = {"child_seconds": round(time.perf_counter() - t, 1), "returncode": proc.returncode}
        if proc.returncode != 0 or not path.is_file():
            return out | {"usable": False, "error": "the kernel check process failed", "stderr_tail": proc.stderr[-3000:],
                          "stdout_tail": proc.stdout[-2000:]}
        return out | json.loads(path.read_text()) | {"usable": True}


def kernel_bench(run: Run) -> dict:
    """GB/s of the fused kernels on GPT-J's linear shapes against fp16 F.linear (and de-quantizing)."""
    import torch.nn.functional as F

    from int8.quantize import quantize
    from int8.runtime import triton_matmul as tm
    from int8.runtime.layer import Int8Linear, int8_linear, int8_linear_grad_input

    quick, dev = run.args.quick, run.device
    reps = 1 if run.args.simulate else (30 if quick else 100)
    prefill = 64 if run.args.simulate else 512
    rows = []
    for out_f, in_f, name in (TOY_LINEARS if run.args.simulate else GPTJ_LINEARS):
        w16 = (torch.randn(out_f, in_f, device=dev) * 0.02).half()
        q = quantize(w16.float(), 128, torch.float16)
        codes, scales = q.codes, q.scales
        int8_bytes = codes.numel() + scales.numel() * 2
        fp16_bytes = w16.numel() * 2
        row = {"layer": name, "out": out_f, "in": in_f, "int8_weight_bytes": int8_bytes, "fp16_weight_bytes": fp16_bytes}
        x1 = torch.randn(1, in_f, device=dev, dtype=torch.float16)
        io = (in_f + out_f) * 2
        t = run.kernel_time(lambda: tm.linear(x1, codes, scales, 128), reps)  # noqa: B023
        row["gemv_int8_us"], row["gemv_int8_gb_s"] = t * 1e6, (int8_bytes + io) / t / GB
        t = run.kernel_time(lambda: F.linear(x1, w16), reps)  # noqa: B023
        row["gemv_fp16_us"], row["gemv_fp16_gb_s"] = t * 1e6, (fp16_bytes + io) / t / GB
        t = run.kernel_time(lambda: int8_linear(x1, codes, scales, 128, kernel="dequantize"), reps)  # noqa: B023
        row["gemv_dequantize_us"] = t * 1e6
        row["gemv_time_ratio_vs_fp16"] = row["gemv_int8_us"] / row["gemv_fp16_us"]
        work = torch.empty(codes.numel(), dtype=torch.float16, device=dev)  # the de-quantize kernel's workspace
        for tokens in (8, 64 if run.args.simulate else 128, prefill):
            x = torch.randn(tokens, in_f, device=dev, dtype=torch.float16)
            t8 = run.kernel_time(lambda: tm.linear(x, codes, scales, 128), reps)  # noqa: B023
            t16 = run.kernel_time(lambda: F.linear(x, w16), reps)  # noqa: B023
            row[f"t{tokens}_int8_us"], row[f"t{tokens}_fp16_us"], row[f"t{tokens}_time_ratio"] = t8 * 1e6, t16 * 1e6, t8 / t16
            row[f"t{tokens}_int8_tflops"] = 2 * tokens * out_f * in_f / t8 / 1e12
            # Triton's one-pass de-quantization + cuBLAS (what Kernel.AUTO runs above FUSED_MAX_TOKENS), at any size
            ta = run.kernel_time(lambda: F.linear(x, tm.dequantize(codes, scales, 128, torch.float16, out=work)), reps)  # noqa: B023
            row[f"t{tokens}_dequant_cublas_us"] = ta * 1e6
        row["dequantize_kernel_us"] = run.kernel_time(lambda: tm.dequantize(codes, scales, 128, torch.float16, out=work), reps) * 1e6  # noqa: B023
        row["dequantize_kernel_gb_s"] = (codes.numel() * 3 + scales.numel() * 2) / (row["dequantize_kernel_us"] / 1e6) / GB
        gy = torch.randn(prefill, out_f, device=dev, dtype=torch.float16)
        tb = run.kernel_time(lambda: tm.linear_grad_input(gy, codes, scales, 128), reps)  # noqa: B023
        tb16 = run.kernel_time(lambda: gy @ w16, reps)  # noqa: B023
        tbd = run.kernel_time(lambda: int8_linear_grad_input(gy, codes, scales, 128, kernel="dequantize"), reps)  # noqa: B023
        tba = run.kernel_time(lambda: int8_linear_grad_input(gy, codes, scales, 128, kernel="auto"), reps)  # noqa: B023
        row.update(grad_int8_us=tb * 1e6, grad_fp16_us=tb16 * 1e6, grad_dequantize_us=tbd * 1e6, grad_time_ratio=tb / tb16,
                   grad_auto_us=tba * 1e6)
        row["prefill_tokens"] = prefill
        rows.append(row)
        del w16, q, codes, scales
        _free()
    # What one layer call costs a Python caller at one token (dispatch + launch), against nn.Linear.
    out_f, in_f, _ = (TOY_LINEARS if run.args.simulate else GPTJ_LINEARS)[0]
    lin = torch.nn.Linear(in_f, out_f, bias=False, device=dev, dtype=torch.float16)
    layer = Int8Linear.from_linear(lin, 128, torch.float16)
    layer.kernel = "triton"
    x1 = torch.randn(1, in_f, device=dev, dtype=torch.float16)
    calls = 1 if run.args.simulate else 300
    with torch.inference_mode():
        overhead = {"layer": f"{out_f}x{in_f}, 1 token", "int8_layer_call_us": run.call_time(lambda: layer(x1), calls) * 1e6,
                    "fp16_linear_call_us": run.call_time(lambda: lin(x1), calls) * 1e6,
                    "int8_kernel_direct_call_us": run.call_time(lambda: tm.linear(x1, layer.codes, layer.scales, 128), calls) * 1e6,
                    "launch": tm.fast_launch_status()}
        fast = tm.FAST_LAUNCH
        tm.FAST_LAUNCH = False  # every launch through Triton's JIT, as before the compiled-launch cache
        try:
            overhead["int8_kernel_jit_launch_call_us"] = run.call_time(
                lambda: tm.linear(x1, layer.codes, layer.scales, 128), calls) * 1e6
        finally:
            tm.FAST_LAUNCH = fast
    return {"shapes": rows, "call_overhead": overhead, "timing": "median GPU time per call, L2 flushed before each call"}


def tile_sweep(run: Run) -> dict:
    """A few tile configurations per kernel, to tune the defaults (GPU time per call)."""
    from int8.quantize import quantize
    from int8.runtime import triton_matmul as tm

    dev, reps = run.device, (3 if run.args.simulate else 40)
    shapes = TOY_LINEARS if run.args.simulate else GPTJ_LINEARS
    weights = []
    for out_f, in_f, name in shapes:
        q = quantize((torch.randn(out_f, in_f, device=dev) * 0.02), 128, torch.float16)
        weights.append((name, in_f, q.codes, q.scales))
    gemv = [tm.GemvConfig(bn, bk, nw, ns) for bn, bk, nw, ns in ((4, 1024, 4, 2), (8, 512, 4, 2), (8, 1024, 4, 2), (8, 1024, 4, 3),
                                                                  (16, 512, 4, 2), (16, 1024, 4, 2), (16, 1024, 8, 2), (32, 512, 4, 2),
                                                                  (32, 1024, 8, 2), (16, 2048, 8, 2))]
    tiled = {8: [tm.TileConfig(16, 16, 128, 4, 4), tm.TileConfig(16, 16, 128, 4, 6), tm.TileConfig(16, 32, 128, 4, 4),
                 tm.TileConfig(16, 32, 64, 4, 4), tm.TileConfig(16, 64, 128, 4, 3), tm.TileConfig(16, 16, 128, 2, 4)],
             512: [tm.TileConfig(128, 128, 64, 8, 3), tm.TileConfig(128, 64, 64, 4, 4), tm.TileConfig(64, 128, 64, 4, 4),
                   tm.TileConfig(128, 128, 128, 8, 3), tm.TileConfig(128, 256, 64, 8, 3)]}
    out = {"gemv": [], "tiled": []}

    def time_or_error(fn):
        try:
            return run.kernel_time(fn, reps) * 1e6
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:200]}"

    for name, in_f, codes, scales in weights:
        x1 = torch.randn(1, in_f, device=dev, dtype=torch.float16)
        default = tm.gemv_config(codes.shape[0], in_f)
        for cfg in gemv:
            us = time_or_error(lambda: tm.linear(x1, codes, scales, 128, gemv=cfg))  # noqa: B023
            out["gemv"].append({"layer": name, "config": cfg.__dict__, "default": cfg == default, "us": us})
        for tokens, cfgs in tiled.items():
            t = tokens if not run.args.simulate else min(tokens, 64)
            x = torch.randn(t, in_f, device=dev, dtype=torch.float16)
            default = tm.tile_config(t, codes.shape[0], torch.float16)
            for cfg in cfgs:
                us = time_or_error(lambda: tm.linear(x, codes, scales, 128, tiles=cfg))  # noqa: B023
                out["tiled"].append({"layer": name, "tokens": t, "config": cfg.__dict__, "default": cfg == default, "us": us})
    return out


# ------------------------------------------------------------------------------------------------
# 2. convert: CUDA against CPU, byte for byte, and the CUDA rate


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _read_rate(path: Path) -> float:
    """GB/s of reading ``path`` sequentially (page cache warm: it was just written and read)."""
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass
    t = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 26):
            n += len(chunk)
    return n / (time.perf_counter() - t) / GB


def _toy_checkpoint(folder: Path) -> Path:
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(**TOY)
    cfg.architectures = ["GPTJForCausalLM"]
    torch.manual_seed(0)
    GPTJForCausalLM(cfg).save_pretrained(folder)
    return folder


def _cli_convert(src: Path, out: Path, device: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "int8.cli", "convert", str(src), "--out", str(out), "--device", device, "--dtype", "fp16", "--quiet"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"int8 convert --device {device} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return {"cli_wall_s": wall}


def _compare_outputs(a: Path, b: Path) -> dict:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    same, differ = [], []
    for n in names:
        if n == "int8_report.json":  # holds the device and the timings: compared below by its manifest
            continue
        pa, pb = a / n, b / n
        (same if pa.is_file() and pb.is_file() and _sha(pa) == _sha(pb) else differ).append(n)
    ra, rb = (json.loads((p / "int8_report.json").read_text()) for p in (a, b))
    manifest_same = ra.get("files") == rb.get("files")
    weights = [n for n in names if n.endswith(".safetensors")]
    return {"identical_files": same, "different_files": differ, "report_manifest_identical": manifest_same,
            "weights_identical": bool(weights) and all(n in same for n in weights) and manifest_same,
            "report_devices": [ra.get("totals", {}).get("device"), rb.get("totals", {}).get("device")]}


def quantizer_identity(run: Run) -> dict:
    """`int8.quantize.quantize` on CUDA against CPU: outliers, zero blocks, tiny values, every scale dtype, blocks 32/128."""
    from int8.quantize import quantize

    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 4096, generator=g) * 0.02
    w[::7, ::97] *= 300.0
    w[3, :256] = 0.0
    w[5, 128:256] *= 1e-30
    rows = []
    for sd in (torch.float32, torch.float16, torch.bfloat16):
        for block in (32, 128):
            cpu = quantize(w, block, sd)
            gpu = quantize(w.to(run.device), block, sd)
            rows.append({"scale_dtype": str(sd).removeprefix("torch."), "block": block,
                         "identical": torch.equal(cpu.codes, gpu.codes.cpu()) and torch.equal(cpu.scales, gpu.scales.cpu())})
    return {"cases": rows, "all_identical": all(r["identical"] for r in rows)}


def convert_section(run: Run, work: Path) -> dict:
    import int8

    dev = "cuda" if run.cuda else "cpu"  # --simulate compares cpu with cpu: it tests this script only
    src = work / "gptj-src"
    if run.args.simulate:
        _toy_checkpoint(src)
        layers = TOY["n_layer"]
    else:
        import synthetic

        layers = run.args.convert_layers or (1 if run.args.quick else 3)
        synthetic.build(src, layers)
    files = sorted(src.glob("*.safetensors"))
    src_bytes = sum(p.stat().st_size for p in files)
    res = {"source": "synthetic GPT-J-6B-shaped (vocabulary 8192)" if not run.args.simulate else "toy GPT-J",
           "layers": layers, "source_bytes": src_bytes}
    res["quantizer"] = run.measure("convert: quantizer CUDA vs CPU", quantizer_identity, run=run, need_s=5)
    res["read_gb_s"] = max(_read_rate(p) for p in files)

    def cli_identity():
        cpu = _cli_convert(src, work / "out-cpu", "cpu")
        gpu = _cli_convert(src, work / "out-cuda", dev)
        return {"cpu": cpu, "cuda": gpu} | _compare_outputs(work / "out-cpu", work / "out-cuda")

    res["cli"] = run.measure("convert: int8 convert --device cuda vs --device cpu", cli_identity, need_s=40)

    def rate():
        times, report = [], None
        for i in range(1 if run.args.quick else 2):
            out = work / f"out-rate-{i}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            report = int8.convert(src, out, dtype="fp16", device=dev, block_size=128)
            times.append(time.perf_counter() - t)
            shutil.rmtree(out, ignore_errors=True)
        best = min(times)
        return {"convert_s": best, "convert_gb_s": src_bytes / best / GB, "stream_gb_s": report.totals.throughput_gb_s,
                "device": report.totals.device, "vs_read": (src_bytes / best / GB) / res["read_gb_s"]}

    res["rate"] = run.measure("convert: CUDA rate", rate, need_s=20)
    shutil.rmtree(src, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------------------
# 3. the GPT-J-6B-shaped model: decode and prefill


def build_fp16(run: Run):
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(**(TOY if run.args.simulate else dict(GPTJ_6B, n_layer=run.args.layers)))
    torch.manual_seed(0)
    with torch.device(run.device):
        model = GPTJForCausalLM._from_config(cfg, dtype=torch.float16)  # transformers' own random init, on the device
    return model.eval()


def build_int8(run: Run, fp16_model):
    """A copy of ``fp16_model`` whose linears (all but lm_head) are `Int8Linear` (block 128, fp16 scales)."""
    from int8.runtime.layer import Int8Linear

    model = copy.deepcopy(fp16_model)
    where = "device"
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.lm_head:
                try:
                    layer = Int8Linear.from_linear(child, 128, torch.float16)
                except Exception:  # the quantizer on this GPU failed: do it on CPU, and say so
                    where = "cpu (the device quantizer failed: see the convert section)"
                    layer = Int8Linear.from_linear(child.cpu(), 128, torch.float16).to(run.device)
                setattr(module, name, layer)
                del child
    _free()
    model.int8_quantized_on = where
    return model.eval()


def _generate(model, ids, new_tokens: int) -> None:
    """Greedy decoding of exactly ``new_tokens`` tokens with transformers' ``generate`` (its KV cache)."""
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)


def model_section(run: Run, fp16, q) -> dict:
    """Prefill and decode, three variants interleaved round by round; ratios against fp16."""
    quick, sim = run.args.quick, run.args.simulate
    variants = {"int8-auto": (q, "auto"), "int8-fused": (q, "triton"), "int8-dequantize": (q, "dequantize"), "fp16": (fp16, None)}
    if not run.fused_usable:
        variants.pop("int8-fused")
        variants.pop("int8-auto")
    res: dict = {"variants": list(variants), "weights_bytes": {"int8": weight_bytes(q), "fp16": weight_bytes(fp16)},
                 "int8_quantized_on": getattr(q, "int8_quantized_on", None)}
    vocab = fp16.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prefill_len = 32 if sim else 512
    repeats = 2 if sim else (3 if quick else 5)

    def timed_rounds(fn_for, rounds: int) -> dict:
        times = {k: [] for k in variants}
        for k, (m, kern) in variants.items():  # warm-up (and compilation) of each variant
            if kern:
                set_kernel(m, kern)
            fn_for(m)()
        for _ in range(rounds):
            for k, (m, kern) in variants.items():
                if kern:
                    set_kernel(m, kern)
                times[k].append(run.wall(fn_for(m)))
        return {k: {"median_s": statistics.median(v), "best_s": min(v)} for k, v in times.items()}

    def timed_pairs(pair_for, rounds: int) -> dict:
        """Like timed_rounds, for a function returning (long, short) wall times: the difference counts."""
        diffs = {k: [] for k in variants}
        for k, (m, kern) in variants.items():
            if kern:
                set_kernel(m, kern)
            pair_for(m)()
        for _ in range(rounds):
            for k, (m, kern) in variants.items():
                if kern:
                    set_kernel(m, kern)
                long, short = pair_for(m)()
                diffs[k].append(max(long - short, 1e-9))
        return {k: {"median_s": statistics.median(v), "best_s": min(v)} for k, v in diffs.items()}

    def prefill():
        ids = torch.randint(0, vocab, (1, prefill_len), generator=g).to(run.device)
        with torch.inference_mode():
            t = timed_rounds(lambda m: (lambda: m(input_ids=ids, use_cache=False)), repeats)
        return {"tokens": prefill_len, "times": t} | _ratios(t, "median_s")

    res["prefill"] = run.measure(f"model: prefill {prefill_len} tokens", prefill, need_s=15)
    steps = 3 if sim else (16 if quick else 48)
    for batch in (1, 8):
        def decode(batch=batch):
            # time per step = (generate(1 + steps) - generate(1)) / steps: the prompt's prefill cancels out
            ids = torch.randint(0, vocab, (batch, 8 if sim else 32), generator=g).to(run.device)

            def pair(m):
                return lambda: (run.wall(lambda: _generate(m, ids, 1 + steps)), run.wall(lambda: _generate(m, ids, 1)))

            with torch.inference_mode():
                t = timed_pairs(pair, 1 if sim else (2 if quick else 3))
            per_step = {k: v["median_s"] / steps for k, v in t.items()}
            return {"batch": batch, "prompt": ids.shape[1], "steps": steps, "times": t,
                    "ms_per_step": {k: v * 1e3 for k, v in per_step.items()},
                    "tokens_per_s": {k: batch / v for k, v in per_step.items()}} | _ratios(t, "median_s")

        res[f"decode_b{batch}"] = run.measure(f"model: decode batch {batch}", decode, need_s=30)

    def agreement():
        ids = torch.randint(0, vocab, (1, prefill_len), generator=g).to(run.device)
        out = {}
        with torch.inference_mode():
            set_kernel(q, "dequantize")
            ref = q(input_ids=ids, use_cache=False).logits.float()
            base = fp16(input_ids=ids, use_cache=False).logits.float()
            out["int8_vs_fp16_rel_max_diff"] = ((ref - base).abs().max() / base.abs().max()).item()
            out["int8_vs_fp16_top1_agreement"] = (ref.argmax(-1) == base.argmax(-1)).float().mean().item()
            if run.fused_usable:
                set_kernel(q, "triton")
                fused = q(input_ids=ids, use_cache=False).logits.float()
                out["fused_vs_dequantize_rel_max_diff"] = ((fused - ref).abs().max() / ref.abs().max()).item()
                out["fused_vs_dequantize_top1_agreement"] = (fused.argmax(-1) == ref.argmax(-1)).float().mean().item()
        return out

    res["logits"] = run.measure("model: logits, fused vs de-quantize vs fp16", agreement, need_s=5)

    def graphed(batch: int) -> dict:
        """GPU time of one decode step replayed from a CUDA graph: no Python, no launch overhead, only the GPU's work.

        The step is captured after a 32-token prompt (transformers' DynamicCache); each replay repeats the
        same step at the same position, which is what a decoder under CUDA graphs (vLLM, torch.compile's
        reduce-overhead) pays per token."""
        if not run.cuda:
            return {"skipped": "CUDA graphs need a CUDA device"}
        ids = torch.randint(0, vocab, (batch, 32), generator=g).to(run.device)
        reps = 10 if quick else 30
        out: dict = {"batch": batch, "prompt": 32, "replays": reps, "times": {}}
        for k, (m, kern) in variants.items():
            if k == "int8-fused":  # the same kernels as int8-auto at <= FUSED_MAX_TOKENS tokens
                continue
            if kern:
                set_kernel(m, kern)
            try:
                with torch.inference_mode():
                    first = m(input_ids=ids, use_cache=True)
                    cache, tok = first.past_key_values, first.logits[:, -1:].argmax(-1)
                    del first
                    side = torch.cuda.Stream(run.device)
                    side.wait_stream(torch.cuda.current_stream(run.device))
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            m(input_ids=tok, past_key_values=cache, use_cache=True)
                    torch.cuda.current_stream(run.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        m(input_ids=tok, past_key_values=cache, use_cache=True)
                    graph.replay()
                    run.sync()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(reps):
                        graph.replay()
                    end.record()
                    run.sync()
                    out["times"][k] = {"median_s": start.elapsed_time(end) / 1e3 / reps}
                    del graph, cache
            except Exception as e:
                out["times"][k] = _err(e)
                run.errors.append(f"model: decode graph batch {batch} {k}: {out['times'][k]['error']}")
            _free()
        ok = {k: v for k, v in out["times"].items() if "median_s" in v}
        out["ms_per_step"] = {k: v["median_s"] * 1e3 for k, v in ok.items()}
        return out | _ratios(ok, "median_s")

    for batch in (1, 8):
        res[f"decode_graph_b{batch}"] = run.measure(f"model: decode batch {batch}, CUDA graph", graphed, need_s=15, batch=batch)
    return res


def _ratios(times: dict, key: str) -> dict:
    ref = times.get("fp16", {}).get(key)
    out = {}
    for k in ("int8-auto", "int8-fused", "int8-dequantize"):
        if k in times and ref:
            out[f"{k}_time_ratio"] = times[k][key] / ref
    return out


# ------------------------------------------------------------------------------------------------
# 4. LoRA


def lora_step(run: Run, model, label: str, kernels: list[str]) -> dict:
    """LoRA r=8 on q/v, gradient checkpointing, adapter_optimizer; peak memory and step time per kernel."""
    from peft import LoraConfig

    from int8.runtime import adapter_optimizer, get_peft_model
    seq = 32 if run.args.simulate else 512
    before_model = run.allocated()
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    pm.gradient_checkpointing_enable()
    pm.train()
    opt = adapter_optimizer(pm, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(2)).to(run.device)
    layers = int8_layers(pm)
    watched = [(m, m.codes.clone()) for m in layers[:2]]
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    res: dict = {"model": label, "seq": seq, "batch": 1, "r": 8, "targets": ["q_proj", "v_proj"], "optimizer": type(opt).__name__,
                 "optimizer_module": type(opt).__module__, "trainable_parameters": trainable,
                 "allocated_before_bytes": before_model}

    def step():
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    timed = 1 if (run.args.quick or run.args.simulate) else 3
    for i, kernel in enumerate(kernels):
        if kernel:
            set_kernel(pm, kernel)
        key = kernel or "fp16"
        try:
            first = first_peak = None
            if i == 0:  # the first step also allocates the optimizer state: its peak counts
                run.peak_reset()
                first = run.wall(step)
                first_peak = run.peak()
            run.peak_reset()
            times = [run.wall(step) for _ in range(timed)]
            steady = run.peak()
            peaks = [v for v in (first_peak, steady) if v is not None]
            res[key] = {"step_s": statistics.median(times), "first_step_s": first, "first_step_peak_bytes": first_peak,
                        "steady_peak_bytes": steady, "peak_bytes": max(peaks) if peaks else None}
        except Exception as e:
            res[key] = _err(e)
            _free()
    res["optimizer_state"] = optimizer_state(opt)
    res["int8_codes_unchanged"] = all(torch.equal(m.codes, c) for m, c in watched) if watched else None
    del opt, pm, watched
    _free()
    return res


def optimizer_state(opt) -> dict:
    dtypes: dict[str, int] = {}
    for state in opt.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k in ("state1", "state2", "exp_avg", "exp_avg_sq"):
                key = f"{k}:{str(v.dtype).removeprefix('torch.')}"
                dtypes[key] = dtypes.get(key, 0) + 1
    moments = [k for k in dtypes if k.startswith(("state1", "state2", "exp_avg"))]
    eight = bool(moments) and all(k.endswith(":uint8") for k in moments)
    try:
        import bitsandbytes as bnb

        version = bnb.__version__
    except Exception as e:
        version = f"not importable ({type(e).__name__}: {e})"
    return {"class": f"{type(opt).__module__}.{type(opt).__name__}", "moment_dtypes": dtypes, "eight_bit": eight,
            "bitsandbytes": version}


# ------------------------------------------------------------------------------------------------
# claims, table, main


def claims(r: dict) -> list[dict]:
    s = r.get("sections", {})
    out = []

    def add(claim, target, measured, met):
        out.append({"claim": claim, "target": target, "measured": measured, "met": met})

    k = s.get("kernel", {})
    chk = k.get("check", {})
    if chk:
        add("fused kernels correct on this GPU", "all cases within the error bound",
            f"{chk.get('passed', 0)}/{chk.get('total', 0)} cases" if chk.get("usable") else chk.get("error", "not run"),
            bool(chk.get("usable") and chk.get("all_ok")))
    for row in (k.get("bench", {}) or {}).get("shapes", []) or []:
        add(f"GEMV GB/s, {row['layer']}", "int8 time < fp16 time (half the bytes)",
            f"int8 {row['gemv_int8_gb_s']:.0f} GB/s ({row['gemv_int8_us']:.1f} us), fp16 {row['gemv_fp16_gb_s']:.0f} GB/s "
            f"({row['gemv_fp16_us']:.1f} us): {row['gemv_time_ratio_vs_fp16']:.2f}x", row["gemv_time_ratio_vs_fp16"] < 1.0)
    c = s.get("convert", {})
    cli = c.get("cli", {})
    if "weights_identical" in cli:
        add("int8 convert --device cuda byte-identical to --device cpu", "identical",
            f"{len(cli['identical_files'])} files identical, different: {cli['different_files'] or 'none'}", cli["weights_identical"])
    qi = c.get("quantizer", {})
    if "all_identical" in qi:
        add("quantizer CUDA == CPU (3 scale dtypes x blocks 32/128)", "identical",
            f"{sum(x['identical'] for x in qi['cases'])}/{len(qi['cases'])}", qi["all_identical"])
    rate = c.get("rate", {})
    if "convert_gb_s" in rate:
        add("convert --device cuda rate", "vs reading the file", f"{rate['convert_gb_s']:.2f} GB/s of fp32 in; file read "
            f"{c.get('read_gb_s', 0):.2f} GB/s ({rate['vs_read']:.2f}x)", None)
    m = s.get("model", {})
    for key, name, target in (("decode_b1", "decode batch 1 (eager generate)", TARGETS["decode_time_ratio"]),
                              ("decode_b8", "decode batch 8 (eager generate)", TARGETS["decode_time_ratio"]),
                              ("decode_graph_b1", "decode batch 1 (CUDA graph)", TARGETS["decode_time_ratio"]),
                              ("decode_graph_b8", "decode batch 8 (CUDA graph)", TARGETS["decode_time_ratio"]),
                              ("prefill", "prefill", TARGETS["prefill_time_ratio"])):
        d = m.get(key, {})
        main = "int8-auto" if d.get("int8-auto_time_ratio") is not None else "int8-fused"
        ratio = d.get(f"{main}_time_ratio")
        if ratio is not None:
            extra = ""
            if "tokens_per_s" in d:
                tps = d["tokens_per_s"]
                extra = " (tok/s int8 {:.1f}, de-quantize {:.1f}, fp16 {:.1f})".format(
                    *(tps.get(v, float("nan")) for v in (main, "int8-dequantize", "fp16")))
            if "ms_per_step" in d and "tokens_per_s" not in d:
                ms = d["ms_per_step"]
                extra = " (ms per step int8 {:.2f}, de-quantize {:.2f}, fp16 {:.2f})".format(
                    *(ms.get(v, float("nan")) for v in (main, "int8-dequantize", "fp16")))
            if "tokens" in d and "times" in d:
                name = f"prefill {d['tokens']} tokens"
                t = d["times"]
                extra = " (ms int8 {:.1f}, fused kernel {:.1f}, de-quantize {:.1f}, fp16 {:.1f})".format(
                    *(t.get(v, {}).get("median_s", float("nan")) * 1e3 for v in (main, "int8-fused", "int8-dequantize", "fp16")))
            dq = d.get("int8-dequantize_time_ratio")
            add(f"{name}: int8 ({main.removeprefix('int8-')}) time / fp16",
                f"<= {target}" + (" (moonshot 0.6)" if key.startswith("decode") else ""),
                f"{ratio:.2f}x; de-quantize path {dq:.2f}x{extra}" if dq else f"{ratio:.2f}x{extra}", ratio <= target)
    lo = s.get("lora", {})
    li = lo.get("int8", {}) if isinstance(lo.get("int8"), dict) else {}
    fp = lo.get("fp16", {}).get("fp16", {}) if isinstance(lo.get("fp16"), dict) else {}
    for kern, label in (("auto", "auto: dequantize kernel + cuBLAS at 512 tokens"), ("triton", "fused"),
                        ("dequantize", "de-quantize path")):
        v = li.get(kern, {})
        if v.get("peak_bytes"):
            add(f"GPT-J-6B LoRA step peak GPU memory (int8, {label})", f"<= {TARGETS['lora_peak_gb']} GB",
                f"{v['peak_bytes'] / GB:.2f} GB ({v['peak_bytes'] / GIB:.2f} GiB)", v["peak_bytes"] <= TARGETS["lora_peak_gb"] * GB)
        if v.get("step_s") and fp.get("step_s"):
            add(f"LoRA step time int8 ({label}) / fp16", "informational",
                f"{v['step_s'] / fp['step_s']:.2f}x ({v['step_s']:.3f}s vs {fp['step_s']:.3f}s)", None)
    st = li.get("optimizer_state", {}) if isinstance(li, dict) else {}
    if st:
        add("8-bit Adam used (optimizer state dtypes)", "bitsandbytes AdamW8bit, uint8 moments",
            f"{st['class']}: {st['moment_dtypes']}", st["eight_bit"] and "bitsandbytes" in st["class"])
    return out


def print_table(r: dict) -> None:
    print()
    print(f"int8 GPU benchmark on {r['env'].get('device_name', '?')} ({r['status']}); {r.get('wall_s', 0):.0f}s"
          + (" [SIMULATED on CPU: figures meaningless]" if r.get("simulate") else ""))
    rows = r.get("claims", [])
    if rows:
        w = max(len(x["claim"]) for x in rows)
        tw = max(len(x["target"]) for x in rows)
        print(f"  {'claim':<{w}}  {'met':<4} {'target':<{tw}}  measured")
        for x in rows:
            met = {True: "yes", False: "NO", None: "-"}[x["met"]]
            print(f"  {x['claim']:<{w}}  {met:<4} {x['target']:<{tw}}  {x['measured']}")
    k = r.get("sections", {}).get("kernel", {}).get("bench", {})
    if k.get("shapes"):
        print("\n  kernel micro-benchmark (median GPU us per call, L2 flushed)")
        print(f"  {'layer':<26}{'1 tok int8':>11}{'fp16':>8}{'dequant':>9}{'8 tok int8':>11}{'fp16':>8}"
              f"{'prefill int8':>13}{'fp16':>8}{'grad int8':>10}{'fp16':>8}")
        for row in k["shapes"]:
            p = f"t{row['prefill_tokens']}"
            print(f"  {row['layer']:<26}{row['gemv_int8_us']:>11.1f}{row['gemv_fp16_us']:>8.1f}{row['gemv_dequantize_us']:>9.1f}"
                  f"{row['t8_int8_us']:>11.1f}{row['t8_fp16_us']:>8.1f}{row[p + '_int8_us']:>13.1f}{row[p + '_fp16_us']:>8.1f}"
                  f"{row['grad_int8_us']:>10.1f}{row['grad_fp16_us']:>8.1f}")
        o = k.get("call_overhead", {})
        if o:
            print(f"  one call from Python ({o['layer']}): Int8Linear {o['int8_layer_call_us']:.1f} us, kernel alone "
                  f"{o['int8_kernel_direct_call_us']:.1f} us ({o.get('launch')}; through Triton's JIT "
                  f"{o.get('int8_kernel_jit_launch_call_us', float('nan')):.1f} us), fp16 nn.Linear {o['fp16_linear_call_us']:.1f} us")
        print(f"\n  {'layer':<26}{'128 tok int8':>13}{'fp16':>8}{'dq+cuBLAS':>10}{'prefill dq+cuBLAS':>18}{'grad auto':>10}"
              f"{'dequant us':>11}{'GB/s':>7}")
        for row in k["shapes"]:
            p = f"t{row['prefill_tokens']}"
            mid = next((t for t in (128, 64) if f"t{t}_int8_us" in row), None)
            if mid is None or "dequantize_kernel_us" not in row:
                continue
            print(f"  {row['layer']:<26}{row[f't{mid}_int8_us']:>13.1f}{row[f't{mid}_fp16_us']:>8.1f}"
                  f"{row[f't{mid}_dequant_cublas_us']:>10.1f}{row[p + '_dequant_cublas_us']:>18.1f}{row['grad_auto_us']:>10.1f}"
                  f"{row['dequantize_kernel_us']:>11.1f}{row['dequantize_kernel_gb_s']:>7.0f}")
    if r.get("errors"):
        print("\n  errors:")
        for e in r["errors"]:
            print(f"    {e[:400]}")


def environment(device) -> dict:
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable}
    for mod in ("torch", "triton", "transformers", "peft", "bitsandbytes", "numba"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:
            env[mod] = f"not importable ({type(e).__name__})"
    if torch is not None:
        env["torch_cuda"] = torch.version.cuda
        if device is not None and device.type == "cuda":
            p = torch.cuda.get_device_properties(device)
            env.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory,
                       multiprocessors=p.multi_processor_count)
        else:
            env["device_name"] = "CPU (simulated)" if SIMULATE else "no CUDA device"
    return env


def write(r: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu.json"
    if r["status"] != "ok" and path.is_file():  # never replace real GPU figures with a "no GPU here" note
        try:
            if json.loads(path.read_text()).get("status") == "ok":
                path = out_dir / f"gpu-{r['status']}.json"
        except (OSError, ValueError):
            pass
    path.write_text(json.dumps(r, indent=2, default=str) + "\n")
    return path


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens, a 1-layer convert, no tile sweep")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder of gpu.json")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the convert checkpoints (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=GPTJ_6B["n_layer"], help="layers of the GPT-J-6B-shaped model (28)")
    ap.add_argument("--convert-layers", type=int, default=None, help="layers of the convert checkpoint (default 3, 1 with --quick)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip measurements that would start later (default 450, 240 quick)")
    ap.add_argument("--simulate", action="store_true", help="run on CPU at toy sizes, to test this script (figures meaningless)")
    ap.add_argument("--check-kernels", type=Path, default=None, help=argparse.SUPPRESS)  # the child process of the kernel check
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 240.0 if args.quick else 450.0
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    args.sections = wanted
    return args


def main(argv=None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    r: dict = {"benchmark": "gpu", "schema": "int8.bench.gpu/1", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "quick": args.quick, "simulate": args.simulate, "targets": TARGETS, "sections": {}}
    if torch is None:
        print(f"torch is not importable ({TORCH_ERROR}): no CUDA device present to measure; nothing measured")
        r.update(status="no-cuda", reason=f"torch not importable: {TORCH_ERROR}", env={"python": sys.version.split()[0]})
        print(f"wrote {write(r, args.out)}")
        return 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if device is None and not args.simulate and args.check_kernels is None:
        print("no CUDA device present: bench/gpu measures the GPU claims and has nothing to measure here "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}).")
        r.update(status="no-cuda", reason="no CUDA device present (torch.cuda.is_available() is False)",
                 env={"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
                      "torch_cuda": torch.version.cuda, "device_name": "no CUDA device"})
        print(f"wrote {write(r, args.out)}")
        return 0
    if args.simulate:
        device = torch.device("cpu")
        from int8.runtime import layer as layer_mod

        layer_mod.TRITON_DEVICE_TYPES = frozenset({"cuda", "cpu"})  # the interpreter stands in for the GPU
    if args.check_kernels is not None:  # the child of the kernel check
        args.check_kernels.write_text(json.dumps(check_kernels(device, args.simulate), default=str))
        return 0
    r["env"] = environment(device)

    run = Run(args, device)
    run.fused_usable = False
    print(f"int8 GPU benchmark on {r['env'].get('device_name')} -- sections {', '.join(args.sections)}; "
          f"budget {args.budget_s:.0f}s{' (quick)' if args.quick else ''}", flush=True)
    from int8.runtime import triton_matmul as tm

    r["fused_kernel_unavailable"] = tm.unavailable_reason(device.type)
    sec = r["sections"]
    try:
        if "kernel" in args.sections or "model" in args.sections or "lora" in args.sections:
            print("kernel: correctness on this device (child process) ...", flush=True)
            chk = run.measure("kernel: correctness", kernel_check_child, run=run, need_s=30)
            sec["kernel"] = {"check": chk}
            run.fused_usable = bool(chk.get("usable")) and tm.available(device.type)
            if "kernel" in args.sections and run.fused_usable:
                sec["kernel"]["bench"] = run.measure("kernel: micro-benchmark", kernel_bench, run=run, need_s=30)
                if not args.quick:
                    sec["kernel"]["sweep"] = run.measure("kernel: tile sweep", tile_sweep, run=run, need_s=60)
        if "convert" in args.sections:
            print("convert ...", flush=True)
            work = args.work or Path(tempfile.mkdtemp(prefix="int8-bench-gpu-"))
            try:
                sec["convert"] = run.measure("convert", convert_section, run=run, work=work, need_s=60)
            finally:
                if args.work is None:
                    shutil.rmtree(work, ignore_errors=True)
        if "model" in args.sections or "lora" in args.sections:
            print("building the GPT-J-6B-shaped fp16 model and its int8 twin ...", flush=True)
            models = run.measure("model: build", lambda: {"fp16": build_fp16(run)}, need_s=60)
            fp16 = models.get("fp16")
            q = run.measure("model: quantize", build_int8, run=run, fp16_model=fp16, need_s=30) if fp16 is not None else None
            if not isinstance(q, torch.nn.Module):
                sec["model"] = {"error": "the models could not be built", "build": models if fp16 is None else q}
            else:
                if "model" in args.sections:
                    sec["model"] = model_section(run, fp16, q)
                if "lora" in args.sections:
                    lo = {}
                    lo["fp16"] = run.measure("lora: fp16 step", lora_step, run=run, model=fp16, label="fp16", kernels=[None],
                                             need_s=40)
                    if isinstance(lo["fp16"], dict) and run.cuda:
                        lo["fp16"]["note"] = "the int8 model was on the GPU too: compare step times, not peaks"
                    del fp16
                    models.clear()
                    _free()
                    kernels = (["auto", "triton"] if run.fused_usable else []) + ["dequantize"]
                    lo["int8"] = run.measure("lora: int8 step (the int8 model alone on the GPU)", lora_step, run=run, model=q,
                                             label="int8", kernels=kernels, need_s=40)
                    sec["lora"] = lo
            fp16 = q = None
            models = None
            _free()
        r["status"] = "ok"
    finally:
        r["fused_kernel_unavailable_at_end"] = tm.unavailable_reason(device.type)  # a silent fallback would show here
        r.setdefault("status", "incomplete")
        r["wall_s"] = time.perf_counter() - started
        r["errors"] = run.errors
        r["claims"] = claims(r)
        path = write(r, args.out)
        print_table(r)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
