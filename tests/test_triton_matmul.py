"""The fused Triton kernels (`int8.runtime.triton_matmul`), checked on CPU in Triton's interpreter,
and the kernel choice of `Int8Linear` / `int8.load` (dispatch, fallback, the ``kernel`` argument).

Triton decides once, when ``triton.language`` is first imported, whether it runs kernels in its
interpreter (``TRITON_INTERPRET=1``). Other tests may import triton in this process first (through
transformers or torch), so the kernel checks run in one subprocess started with the variable set:
this file run as a script (``--worker``) computes every case and writes, per case, the largest
error against the reference and the error bound it must stay within; the tests below assert on
those figures, one test per case.

The reference is computed independently: the weight de-quantized in the compute dtype exactly as
the de-quantize path rounds it (``code * scale``, the scale first rounded to the compute dtype),
then multiplied in float64. The bound per output value is
``eps * |ref| + (eps + K * 2^-24) * (|x| @ |W|.T)``: rounding of the output, of the de-quantized
weight (the GEMV scales per block instead) and float32 accumulation. A wrong scale, block index,
mask or stride gives errors of the order of ``|x| @ |W|.T`` itself, far above it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# (out, in, block): ragged input widths (not a multiple of any tile), odd output widths, a ragged
# last scale block (200 = 6 * 32 + 8), block sizes 32/64/128, 48 (power-of-two factor 16), 10 (no
# power-of-two factor >= 16: scales gathered per value), and one scale per row (block = in).
SHAPES = [(37, 200, 32), (33, 96, 48), (64, 256, 128), (20, 50, 10), (24, 192, 64), (9, 96, 96)]
TOKENS = [1, 3, 17]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cases() -> list[dict]:
    cases = []
    # Every scale dtype x compute dtype, on the ragged shape, decode and prefill shapes, both tile sets.
    for sd in DTYPES:
        for cd in DTYPES:
            for tokens in (1, 17):
                cases.append(dict(shape=SHAPES[0], tokens=tokens, scale=sd, compute=cd, bias=tokens == 1, tiles="small"))
    # Every shape x token count (fp16 compute, bf16 scales), with and without bias, both tile sets.
    for shape in SHAPES:
        for tokens in TOKENS:
            for bias in (False, True):
                tiles = "small" if bias else "default"
                cases.append(dict(shape=shape, tokens=tokens, scale="bf16", compute="fp16", bias=bias, tiles=tiles))
    for c in cases:
        o, i, b = c["shape"]
        c["id"] = f"{o}x{i}-b{b}-t{c['tokens']}-s{c['scale']}-c{c['compute']}-{'bias' if c['bias'] else 'nobias'}-{c['tiles']}"
    return cases


CASES = _cases()


# --------------------------------------------------------------------------------------------
# The worker (runs under TRITON_INTERPRET=1)


def _weights(out_f: int, in_f: int, block: int, scale_dtype: torch.dtype, seed: int):
    from int8.quantize import quantize

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[0, : min(in_f, 5)] = 0.4  # an outlier row segment: one block's scale much larger than the rest
    q = quantize(w, block, scale_dtype)
    return q.codes, q.scales


def _dense(codes, scales, block, dtype) -> torch.Tensor:
    s = scales.to(dtype).float().repeat_interleave(block, dim=1)[:, : codes.shape[1]]
    return (codes.float() * s).to(dtype).double()


def _bound(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, k: int) -> torch.Tensor:
    """The error bound of ``ref = a @ b`` computed in ``dtype`` with float32 accumulation over ``k`` terms."""
    eps = torch.finfo(dtype).eps
    return eps * ref.abs() + (eps + k * 2.0**-24) * (a.double().abs() @ b.abs()) + 1e-30


def _measure(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> dict:
    err = (got.double() - ref).abs()
    return {"max_err": err.max().item(), "worst_ratio": (err / bound).max().item(),
            "scale": ref.abs().max().item(), "finite": bool(torch.isfinite(got).all()), "shape": list(got.shape)}


def _run_case(c: dict, tm) -> dict:
    out_f, in_f, block = c["shape"]
    sdt, cdt = DTYPES[c["scale"]], DTYPES[c["compute"]]
    codes, scales = _weights(out_f, in_f, block, sdt, seed=out_f * 7 + in_f)
    g = torch.Generator().manual_seed(c["tokens"])
    x = torch.randn(c["tokens"], in_f, generator=g).to(cdt)
    bias = torch.randn(out_f, generator=g).to(cdt) if c["bias"] else None
    dy = torch.randn(c["tokens"], out_f, generator=g).to(cdt)
    small = c["tiles"] == "small"
    gemv = tm.GemvConfig(block_n=16, block_k=64) if small else None           # several K steps, ragged tail
    tiles = tm.TileConfig(block_m=16, block_j=32, block_r=32, num_warps=4, num_stages=1) if small else None
    w = _dense(codes, scales, block, cdt)
    res = {}
    y = tm.linear(x, codes, scales, block, bias, gemv=gemv, tiles=tiles)
    ref = x.double() @ w.T + (bias.double() if bias is not None else 0)
    res["forward"] = _measure(y, ref, _bound(x, w.T, ref, cdt, in_f)) | {"dtype": str(y.dtype)}
    gx = tm.linear_grad_input(dy, codes, scales, block, tiles=tiles)
    ref_g = dy.double() @ w
    res["grad_input"] = _measure(gx, ref_g, _bound(dy, w, ref_g, cdt, out_f)) | {"dtype": str(gx.dtype)}
    if c["tokens"] > 1:  # the same tokens through the tiled kernel at one token each too (GEMV off)
        y1 = torch.cat([tm.linear(x[i : i + 1], codes, scales, block, bias, max_gemv_tokens=0, tiles=tiles)
                        for i in range(min(2, c["tokens"]))])
        res["tiled_one_token"] = _measure(y1, ref[: y1.shape[0]], _bound(x[: y1.shape[0]], w.T, ref[: y1.shape[0]], cdt, in_f))
    return res


def _run_layer(tm) -> dict:
    """`Int8Linear` forward + backward through autograd with the dispatch sending CPU tensors to Triton."""
    from int8.runtime import layer as layer_mod
    from int8.runtime.layer import Int8Linear

    layer_mod.TRITON_DEVICE_TYPES = frozenset({"cuda", "cpu"})
    calls = {"linear": 0, "linear_grad_input": 0}
    for name in calls:
        fn = getattr(tm, name)

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        setattr(tm, name, counted)
    out = {}
    for sd, cd, shape, lead in (("bf16", "fp32", (37, 200, 32), (2, 3)), ("fp16", "bf16", (33, 96, 48), (17,)),
                                ("fp32", "fp16", (20, 50, 10), (1,))):
        out_f, in_f, block = shape
        sdt, cdt = DTYPES[sd], DTYPES[cd]
        lin = torch.nn.Linear(in_f, out_f)
        codes, scales = _weights(out_f, in_f, block, sdt, seed=3)
        q = Int8Linear(in_f, out_f, True, block_size=block, scale_dtype=sdt, dtype=cdt)
        q.codes.copy_(codes)
        q.scale_bits.copy_(scales.view(q.scale_bits.dtype))
        with torch.no_grad():
            q.bias.copy_(lin.bias.to(cdt))
        q.bias.requires_grad_(True)
        q.kernel = "triton"
        g = torch.Generator().manual_seed(11)
        x = torch.randn(*lead, in_f, generator=g).to(cdt).requires_grad_(True)
        dy = torch.randn(*lead, out_f, generator=g).to(cdt)
        before = dict(calls)
        y = q(x)
        y.backward(dy)
        ran = {k: calls[k] - before[k] for k in calls}
        w = _dense(codes, scales, block, cdt)
        x64 = x.detach().double().requires_grad_(True)
        b64 = q.bias.detach().double().requires_grad_(True)
        ref = x64 @ w.T + b64
        ref.backward(dy.double())
        x2 = x.detach().reshape(-1, in_f)
        out[f"layer-{sd}-{cd}-{out_f}x{in_f}"] = {
            "path": q.kernel_path,
            "ran": ran,
            "y": _measure(y.detach(), ref.detach(), _bound(x2, w.T, ref.detach().reshape(-1, out_f), cdt, in_f).reshape(ref.shape)),
            "grad_x": _measure(x.grad, x64.grad, _bound(dy.reshape(-1, out_f), w, x64.grad.reshape(-1, in_f), cdt,
                                                         out_f).reshape(x64.grad.shape)),
            "grad_bias_err": (q.bias.grad.double() - b64.grad).abs().max().item(),
            "grad_bias_scale": b64.grad.abs().max().item(),
            "codes_grad_none": q.codes.grad is None,
        }
    return out


def _truncated_bf16(codes, scales, block) -> torch.Tensor:
    def trunc(t: torch.Tensor) -> torch.Tensor:  # float32 -> bf16 by dropping the low 16 bits
        return (t.float().contiguous().view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)

    s = trunc(scales).float().repeat_interleave(block, dim=1)[:, : codes.shape[1]]
    return trunc(codes.float() * s)


def _run_dequantize(tm) -> dict:
    """`tm.dequantize` against the de-quantize path's `dequantize_weight`, bit for bit, every shape and dtype pair;
    and into a workspace larger than the weight (the result is a view of its start)."""
    from int8.runtime.layer import dequantize_weight

    out = {}
    for shape in SHAPES:
        out_f, in_f, block = shape
        for sd in DTYPES:
            for cd in DTYPES:
                codes, scales = _weights(out_f, in_f, block, DTYPES[sd], seed=5)
                got = tm.dequantize(codes, scales, block, DTYPES[cd])
                want = dequantize_weight(codes, scales, block, DTYPES[cd])
                if cd == "bf16":  # the interpreter truncates float32 -> bf16 (a GPU rounds to nearest even, as torch):
                    want = _truncated_bf16(codes, scales, block)  # the same products, truncated
                out[f"dequant-{out_f}x{in_f}-b{block}-s{sd}-c{cd}"] = {
                    "equal": bool(torch.equal(got, want)), "dtype": str(got.dtype), "shape": list(got.shape)}
    codes, scales = _weights(37, 200, 32, torch.bfloat16, seed=6)
    work = torch.full((37 * 200 + 50,), 7.0, dtype=torch.float16)
    got = tm.dequantize(codes, scales, 32, torch.float16, out=work)
    out["dequant-workspace"] = {"equal": bool(torch.equal(got, dequantize_weight(codes, scales, 32, torch.float16))),
                                "view_of_workspace": got.data_ptr() == work.data_ptr(),
                                "tail_untouched": bool((work[37 * 200:] == 7.0).all())}
    return out


def _run_auto_routing(tm) -> dict:
    """`Kernel.AUTO` on a Triton device: the fused kernel up to FUSED_MAX_TOKENS tokens, above it
    `tm.dequantize` then torch's matmul, forward and backward (the limit lowered to 4 to keep it quick)."""
    from int8.runtime import layer as layer_mod
    from int8.runtime.layer import Int8Linear, dequantize_weight

    layer_mod.TRITON_DEVICE_TYPES = frozenset({"cuda", "cpu"})
    layer_mod.FUSED_MAX_TOKENS = 4
    calls = {"linear": 0, "linear_grad_input": 0, "dequantize": 0}
    originals = {name: getattr(tm, name) for name in calls}
    for name, fn in originals.items():
        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        setattr(tm, name, counted)
    out = {}
    try:
        codes, scales = _weights(33, 96, 32, torch.bfloat16, seed=8)
        q = Int8Linear(96, 33, True, block_size=32, scale_dtype=torch.bfloat16, dtype=torch.float16)
        q.codes.copy_(codes)
        q.scale_bits.copy_(scales.view(q.scale_bits.dtype))
        with torch.no_grad():
            q.bias.copy_(torch.randn(33).to(torch.float16))
        w = dequantize_weight(codes, scales, 32, torch.float16)
        for tokens in (4, 6):
            g = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, 96, generator=g).to(torch.float16).requires_grad_(True)
            dy = torch.randn(tokens, 33, generator=g).to(torch.float16)
            before = dict(calls)
            y = q(x)
            y.backward(dy)
            ran = {k: calls[k] - before[k] for k in calls}
            row = {"ran": ran}
            if tokens > 4:  # cuBLAS's (here: torch CPU's) matmul on the very weight the de-quantize path builds
                row["y_equal"] = bool(torch.equal(y.detach(), torch.nn.functional.linear(x.detach(), w, q.bias.detach())))
                row["grad_equal"] = bool(torch.equal(x.grad, dy @ w))
            out[f"auto-t{tokens}"] = row
    finally:
        for name, fn in originals.items():
            setattr(tm, name, fn)
    return out


def _worker(path: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from int8.runtime import triton_matmul as tm

    assert tm.interpreted(), "TRITON_INTERPRET=1 must be set before triton is imported"
    results: dict = {"available_cpu": tm.available("cpu")}
    try:  # the interpreter of some triton releases (3.6) cannot run a loop with numpy 2 ("only 0-dimensional arrays ...")
        tm.linear(torch.randn(1, 64), torch.ones(3, 64, dtype=torch.int8), torch.ones(3, 2), 32)
    except Exception as e:
        if "0-dimensional arrays" in str(e):
            import numpy
            import triton

            results["interpreter_broken"] = f"triton {triton.__version__} with numpy {numpy.__version__}: {e}"
            path.write_text(json.dumps(results))
            return
    for c in CASES:
        try:
            results[c["id"]] = _run_case(c, tm)
        except Exception as e:  # recorded, so that the test of this case fails with the message
            results[c["id"]] = {"error": f"{type(e).__name__}: {e}"}
    for name, run in (("layer", _run_layer), ("dequant", _run_dequantize), ("auto", _run_auto_routing)):
        try:
            results.update(run(tm))
        except Exception as e:
            results[f"{name}-error"] = f"{type(e).__name__}: {e}"
    path.write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("triton") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(path.read_text())
    if "interpreter_broken" in results:
        pytest.skip(f"Triton's interpreter does not work here (use triton >= 3.9): {results['interpreter_broken'][:300]}")
    return results


def _within(r: dict, what: str) -> None:
    assert r["finite"], f"{what}: non-finite values"
    assert r["worst_ratio"] <= 1.0, f"{what}: error {r['max_err']:.3g} exceeds the bound (x{r['worst_ratio']:.2f}); |ref| {r['scale']:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernels_match_the_dequantized_matmul(interpreted, case):
    r = interpreted[case["id"]]
    assert "error" not in r, r.get("error")
    out_f, in_f, _ = case["shape"]
    assert r["forward"]["shape"] == [case["tokens"], out_f] and r["forward"]["dtype"] == str(DTYPES[case["compute"]])
    assert r["grad_input"]["shape"] == [case["tokens"], in_f] and r["grad_input"]["dtype"] == str(DTYPES[case["compute"]])
    _within(r["forward"], "y = x @ W.T + b")
    _within(r["grad_input"], "dx = dy @ W")
    if "tiled_one_token" in r:
        _within(r["tiled_one_token"], "tiled kernel, one token")


def test_interpreter_is_what_ran(interpreted):
    assert interpreted["available_cpu"] is True


@pytest.mark.parametrize("key", ["layer-bf16-fp32-37x200", "layer-fp16-bf16-33x96", "layer-fp32-fp16-20x50"])
def test_layer_forward_and_backward_run_the_kernels(interpreted, key):
    """Int8Linear with kernel="triton": y, dx and the bias gradient against autograd of the reference."""
    assert "layer-error" not in interpreted, interpreted.get("layer-error")
    r = interpreted[key]
    assert r["path"] == "triton"
    assert r["ran"] == {"linear": 1, "linear_grad_input": 1}, r["ran"]
    _within(r["y"], "layer output")
    _within(r["grad_x"], "layer grad of input")
    assert r["grad_bias_err"] <= 1e-2 * max(1.0, r["grad_bias_scale"]) and r["codes_grad_none"]


DEQUANT_KEYS = [f"dequant-{o}x{i}-b{b}-s{sd}-c{cd}" for o, i, b in SHAPES for sd in DTYPES for cd in DTYPES]


@pytest.mark.parametrize("key", DEQUANT_KEYS)
def test_dequantize_kernel_is_bit_identical_to_the_dequantize_path(interpreted, key):
    assert "dequant-error" not in interpreted, interpreted.get("dequant-error")
    r = interpreted[key]
    assert r["equal"] and r["dtype"] == str(DTYPES[key.rsplit("-c", 1)[1]])


def test_dequantize_kernel_writes_into_the_workspace_only(interpreted):
    r = interpreted["dequant-workspace"]
    assert r == {"equal": True, "view_of_workspace": True, "tail_untouched": True}


def test_auto_runs_the_fused_kernel_for_few_tokens_and_dequantize_plus_matmul_for_many(interpreted):
    assert "auto-error" not in interpreted, interpreted.get("auto-error")
    assert interpreted["auto-t4"]["ran"] == {"linear": 1, "linear_grad_input": 1, "dequantize": 0}
    many = interpreted["auto-t6"]
    assert many["ran"] == {"linear": 0, "linear_grad_input": 0, "dequantize": 2}
    assert many["y_equal"] and many["grad_equal"]


def test_bound_catches_a_wrong_scale_block():
    """The error bound is tight enough to fail a kernel that reads the neighbouring scale block."""
    codes, scales = _weights(37, 200, 32, torch.bfloat16, seed=1)
    x = torch.randn(3, 200, dtype=torch.float16)
    w = _dense(codes, scales, 32, torch.float16)
    ref = x.double() @ w.T
    shifted = torch.cat([scales[:, 1:], scales[:, -1:]], dim=1)
    wrong = (x.double() @ _dense(codes, shifted, 32, torch.float16).T).to(torch.float16)
    assert _measure(wrong, ref, _bound(x, w.T, ref, torch.float16, 200))["worst_ratio"] > 1.0
    right = ref.to(torch.float16)
    assert _measure(right, ref, _bound(x, w.T, ref, torch.float16, 200))["worst_ratio"] <= 1.0


# -- compiled for real GPUs, ahead of time (no GPU needed) ----------------------------------------

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _aot(kind: str, dtype, scale_dtype, block: int, capability: int, tokens: int, n: int = 4096, k: int = 4096):
    """Compile one kernel variant as a launch on a GPU of ``capability`` would (arguments divisible by 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from int8.runtime import triton_matmul as tm

    ptrs = {"c_ptr": "*i8", "s_ptr": f"*{_TY[scale_dtype]}", "b_ptr": f"*{_TY[dtype]}", "y_ptr": f"*{_TY[dtype]}"}
    if kind == "dequant":
        sig = {"c_ptr": "*i8", "s_ptr": f"*{_TY[scale_dtype]}", "w_ptr": f"*{_TY[dtype]}",
               **dict.fromkeys(["N", "K", "stride_cn", "stride_sn", "stride_wn"], "i32")}
        block_n, block_k = tm.DEQUANT_TILE
        const = dict(BLOCK=block, BLOCK_N=block_n, BLOCK_K=block_k, DT=tm._tl_dtype(dtype))
        sig.update(dict.fromkeys(const, "constexpr"))
        names = list(sig)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if sig[a] != "constexpr"}
        src = ASTSource(tm._dequant_kernel, sig, constexprs=const, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4, "num_stages": 1})
    if kind == "gemv":
        cfg = tm.gemv_config(n, k)
        sub = min(tm._pow2_factor(block), cfg.block_k)
        grouped = sub >= 16
        sig = {"x_ptr": f"*{_TY[dtype]}", **ptrs, **dict.fromkeys(["N", "K", "stride_xm", "stride_cn", "stride_sn", "stride_ym"], "i32")}
        const = dict(BLOCK=block, GROUPED=grouped, SUB=sub if grouped else 1, GROUPS=cfg.block_k // sub if grouped else 1,
                     BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, HAS_BIAS=True, DT=tm._tl_dtype(dtype))
        fn = tm._gemv_kernel
    else:
        transposed = kind == "grad"
        cfg = tm.tile_config(tokens, k if transposed else n, dtype)
        if transposed:
            (bj, tile), br = tm._k_tile(cfg.block_j, block), cfg.block_r
        else:
            (br, tile), bj = tm._k_tile(cfg.block_r, block), cfg.block_j
        sig = {"a_ptr": f"*{_TY[dtype]}", **ptrs,
               **dict.fromkeys(["M", "N", "K", "stride_am", "stride_ar", "stride_cn", "stride_sn", "stride_ym", "stride_yj"], "i32")}
        const = dict(stride_ar=1, stride_yj=1, BLOCK=block, TRANSPOSED=transposed, SCALE_TILE=tile, HAS_BIAS=not transposed,
                     BLOCK_M=cfg.block_m, BLOCK_J=bj, BLOCK_R=br, DT=tm._tl_dtype(dtype), UPCAST=False,
                     PRECISION="ieee" if dtype == torch.float32 else None)
        fn = tm._tiled_kernel
    sig.update(dict.fromkeys(const, "constexpr"))
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if sig[a] != "constexpr"}
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


@pytest.mark.parametrize("kind, dtype, scale_dtype, block, capability, tokens", [
    ("gemv", torch.float16, torch.float16, 128, 90, 1),      # decoding on Hopper: the codes stream in 16-byte loads
    ("gemv", torch.bfloat16, torch.float32, 10, 80, 1),      # scales gathered per value, Ampere
    ("forward", torch.bfloat16, torch.bfloat16, 128, 90, 512),
    ("forward", torch.float16, torch.float16, 64, 80, 8),
    ("grad", torch.float16, torch.float16, 128, 90, 512),
    ("grad", torch.float32, torch.bfloat16, 32, 80, 3),
    ("dequant", torch.float16, torch.float16, 128, 90, 0),   # prefill's one-pass de-quantization
    ("dequant", torch.bfloat16, torch.float32, 10, 80, 0),
])
def test_kernels_compile_for_gpus(kind, dtype, scale_dtype, block, capability, tokens):
    """The kernels go through Triton's whole compiler (to PTX and ptxas's cubin) for sm_80 and sm_90: the
    interpreter does not type-check dot shapes, constexpr branches or layouts as the compiler does."""
    pytest.importorskip("triton")
    from int8.runtime import triton_matmul as tm

    if tm.interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels are interpreted functions in this process")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    compiled = _aot(kind, dtype, scale_dtype, block, capability, tokens)
    ptx = compiled.asm["ptx"]
    assert f".target sm_{capability}" in ptx and compiled.asm.get("cubin")
    if kind in ("gemv", "dequant") and block == 128:
        assert "ld.global.v4" in ptx  # the int8 codes are read 16 bytes at a time, not byte by byte
    if kind == "dequant":
        return
    if kind != "gemv" and dtype != torch.float32:  # (float32 runs IEEE FMAs, as torch's fp32 matmul does)
        assert "mma" in ptx  # tensor cores (mma.sync on sm_80, wgmma on sm_90)


# -- dispatch and fallback, in this process (no interpreter) ------------------------------------


def _layer(kernel: str = "auto"):
    from int8.runtime.layer import Int8Linear

    lin = torch.nn.Linear(64, 24)
    q = Int8Linear.from_linear(lin, block_size=32, scale_dtype=torch.float16)
    q.kernel = kernel
    return q


def test_cpu_never_dispatches_to_triton():
    from int8.runtime.layer import TRITON_DEVICE_TYPES, triton_ready, triton_unavailable_reason

    assert "cpu" not in TRITON_DEVICE_TYPES
    assert not triton_ready("cpu", "auto") and not triton_ready("cpu", "triton")
    assert "CUDA" in triton_unavailable_reason("cpu")
    for kernel in ("auto", "triton", "dequantize"):
        assert _layer(kernel).kernel_path == "dequantize"


def test_dequantize_choice_never_touches_triton(monkeypatch):
    from int8.runtime import layer as layer_mod

    monkeypatch.setattr(layer_mod, "TRITON_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(layer_mod, "_triton", lambda: pytest.fail("triton_matmul consulted for kernel='dequantize'"))
    q = _layer("dequantize")
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), q.bias))
    assert q.kernel_path == "dequantize"


class _FakeTriton:
    """Stands in for `triton_matmul`: available, and its kernels raise (a GPU triton cannot compile for)."""

    class OperandError(ValueError):
        pass

    DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

    def __init__(self, error: Exception | None = None):
        self.disabled = None
        self.calls = 0
        self.error = error or RuntimeError("PTX compile failed (simulated)")

    def available(self, device_type):
        return self.disabled is None

    def unavailable_reason(self, device_type):
        return self.disabled

    def supports(self, *args):
        return True

    def disable(self, reason):
        self.disabled = reason

    def linear(self, *args, **kwargs):
        self.calls += 1
        raise self.error

    linear_grad_input = linear


def test_auto_falls_back_once_and_logs_when_the_kernel_fails(monkeypatch, caplog):
    from int8.runtime import layer as layer_mod

    fake = _FakeTriton()
    monkeypatch.setattr(layer_mod, "TRITON_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(layer_mod, "_triton", lambda: fake)
    q = _layer("auto")
    assert q.kernel_path == "triton"
    x = torch.randn(2, 5, 64, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="int8.runtime"):
        y = q(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, q.dequantize(), q.bias))
    assert fake.calls == 1 and "PTX compile failed" in fake.disabled
    assert any("de-quantizing from now on" in r.getMessage() for r in caplog.records)
    assert q.kernel_path == "dequantize"
    y.sum().backward()  # the backward no longer tries the kernel
    assert fake.calls == 1
    torch.testing.assert_close(x.grad, torch.ones(2, 5, 24) @ q.dequantize())


def test_explicit_triton_raises_the_kernel_failure(monkeypatch):
    from int8.runtime import layer as layer_mod

    fake = _FakeTriton()
    monkeypatch.setattr(layer_mod, "TRITON_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(layer_mod, "_triton", lambda: fake)
    with pytest.raises(RuntimeError, match="simulated"):
        _layer("triton")(torch.randn(1, 64))
    assert fake.disabled is None


def test_an_operand_error_is_raised_and_keeps_the_kernel(monkeypatch):
    """Wrong operands (a device mismatch, say) are the caller's mistake: raised, and the kernel stays on."""
    from int8.runtime import layer as layer_mod

    fake = _FakeTriton()
    fake.error = fake.OperandError("operands on different devices: cuda:0, cpu, cpu")
    monkeypatch.setattr(layer_mod, "TRITON_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(layer_mod, "_triton", lambda: fake)
    with pytest.raises(ValueError, match="different devices"):
        _layer("auto")(torch.randn(1, 64))
    assert fake.disabled is None and fake.calls == 1


def test_without_triton_installed_everything_falls_back(tmp_path):
    """A Python where `import triton` fails: the module still imports, says why, and the layer computes."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from int8.runtime import triton_matmul as tm, layer\n"
        "assert not tm.available('cuda') and not tm.available('cpu'), tm.unavailable_reason()\n"
        "assert 'not importable' in tm.unavailable_reason('cuda')\n"
        "layer.TRITON_DEVICE_TYPES = frozenset({'cpu', 'cuda'})\n"
        "q = layer.Int8Linear.from_linear(torch.nn.Linear(64, 8), 32)\n"
        "q.kernel = 'auto'; x = torch.randn(2, 64)\n"
        "assert q.kernel_path == 'dequantize'\n"
        "torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), q.bias))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# -- int8.load(kernel=...) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory) -> Path:
    from models import make_tiny

    import int8

    root = tmp_path_factory.mktemp("kernel-load")
    make_tiny("gptj", root / "src")
    int8.convert(root / "src", root / "out", block_size=32, dtype="fp16", device="cpu")
    return root / "out"


def test_load_kernel_auto_on_cpu_dequantizes_and_says_so(tiny_int8, caplog):
    from int8.runtime import Int8Linear, load

    with caplog.at_level(logging.INFO, logger="int8.runtime"):
        model = load(tiny_int8, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.kernel == "auto" and m.kernel_path == "dequantize" for m in layers)
    assert model.int8_kernel == "dequantize"
    lines = [r.getMessage() for r in caplog.records if r.name == "int8.runtime"]
    assert any(f"{len(layers)} int8 layers on cpu de-quantize" in m and "CUDA" in m for m in lines), lines


def test_load_kernel_dequantize_is_set_on_every_layer(tiny_int8):
    from int8.runtime import Int8Linear, load

    model = load(tiny_int8, device="cpu", kernel="dequantize")
    assert {m.kernel for m in model.modules() if isinstance(m, Int8Linear)} == {"dequantize"}
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("kernel, match", [("bogus", "unknown kernel"), ("Triton ", "unknown kernel"),
                                           ("triton", "CUDA")])
def test_load_rejects_a_kernel_that_cannot_run(tiny_int8, kernel, match):
    from int8.errors import Int8Error
    from int8.runtime import load

    with pytest.raises(Int8Error, match=match) as info:
        load(tiny_int8, device="cpu", kernel=kernel)
    assert info.value.hint


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))


# -- compiled launches (tm._launch), with a stand-in for Triton's JIT function ------------------


class _FakeCompiled:
    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def __getitem__(self, grid):
        def run(*args):
            if self.fail:
                raise TypeError("launcher signature changed")
            self.log.append(("compiled", grid, args))
        return run


class _FakeJit:
    """What `tm._launch` needs of a JITFunction: ``fn[grid](*args, **constexprs, num_warps=, num_stages=)``
    returning the compiled kernel, and ``arg_names`` in signature order (constexprs last)."""

    arg_names = ["x_ptr", "N", "BLOCK", "DT"]

    def __init__(self, fail=False):
        self.log, self.fail = [], fail

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _FakeCompiled(self.log, self.fail)
        return run


@pytest.fixture
def launches(monkeypatch):
    tm = pytest.importorskip("int8.runtime.triton_matmul")
    monkeypatch.setattr(tm, "interpreted", lambda: False)
    monkeypatch.setattr(tm, "FAST_LAUNCH", True)
    monkeypatch.setattr(tm, "_fast_launch_error", None)
    monkeypatch.setattr(tm, "_LAUNCHES", {})
    return tm


def test_a_second_launch_goes_straight_to_the_compiled_kernel(launches):
    tm, fn = launches, _FakeJit()
    const = {"DT": "fp16", "BLOCK": 128}  # any order: the compiled kernel gets them in signature order
    tm._launch(fn, (4, 1), ("k", 1), ("p0", 4096), const, 4, 2)
    tm._launch(fn, (8, 1), ("k", 1), ("p1", 4096), const, 4, 2)
    assert fn.log == [("jit", (4, 1), ("p0", 4096), {"DT": "fp16", "BLOCK": 128, "num_warps": 4, "num_stages": 2}),
                      ("compiled", (8, 1), ("p1", 4096, 128, "fp16"))]
    assert tm.fast_launch_status() == "compiled"


def test_another_specialization_or_no_key_goes_through_the_jit(launches):
    tm, fn = launches, _FakeJit()
    const = {"BLOCK": 128, "DT": "fp16"}
    tm._launch(fn, (1,), ("k", 1), ("p", 16), const, 4, 2)
    tm._launch(fn, (1,), ("k", 2), ("p", 17), const, 4, 2)   # a new key (another alignment or value): JIT
    tm._launch(fn, (1,), None, ("p", 16), const, 4, 2)       # no key: never cached
    tm._launch(fn, (1,), None, ("p", 16), const, 4, 2)
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit", "jit"]


def test_a_signature_this_module_does_not_know_is_never_cached(launches):
    tm, fn = launches, _FakeJit()
    fn.arg_names = ["x_ptr", "N", "BLOCK", "DT", "EXTRA"]
    for _ in range(2):
        tm._launch(fn, (1,), ("k",), ("p", 16), {"BLOCK": 128, "DT": "fp16"}, 4, 2)
    assert [e[0] for e in fn.log] == ["jit", "jit"]


def test_a_failing_compiled_launch_falls_back_to_the_jit_for_good(launches):
    tm, fn = launches, _FakeJit(fail=True)
    const = {"BLOCK": 128, "DT": "fp16"}
    for _ in range(3):
        tm._launch(fn, (1,), ("k",), ("p", 16), const, 4, 2)
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit"]  # the second relaunched through the JIT, the third never tried
    assert tm.FAST_LAUNCH is False and "launcher signature changed" in tm.fast_launch_status()


def test_the_interpreter_never_caches(launches, monkeypatch):
    tm, fn = launches, _FakeJit()
    monkeypatch.setattr(tm, "interpreted", lambda: True)
    for _ in range(2):
        tm._launch(fn, (1,), ("k",), ("p", 16), {"BLOCK": 128, "DT": "fp16"}, 4, 2)
    assert [e[0] for e in fn.log] == ["jit", "jit"]


@pytest.mark.parametrize("n, k, block_n, block_k", [(4096, 4096, 4, 1024), (16384, 4096, 16, 1024), (4096, 16384, 4, 1024),
                                                    (8192, 2048, 8, 512), (768, 3072, 4, 512), (50, 40, 4, 64)])
def test_gemv_tiles_aim_at_about_1024_programs(n, k, block_n, block_k):
    tm = pytest.importorskip("int8.runtime.triton_matmul")
    cfg = tm.gemv_config(n, k)
    assert (cfg.block_n, cfg.block_k) == (block_n, block_k)


@pytest.mark.parametrize("which", ["gemv", "tiled", "grad", "dequant"])
def test_every_kernel_launch_is_cached_with_its_real_signature(launches, monkeypatch, which):
    """`linear`, `linear_grad_input` and `dequantize` pass their kernel's whole signature (runtime arguments,
    then every constexpr): the second identical call goes to the compiled kernel with the same arguments the
    JIT got, constexprs in signature order; and another weight (a different key) compiles again."""
    tm = launches
    name = {"gemv": "_gemv_kernel", "tiled": "_tiled_kernel", "grad": "_tiled_kernel", "dequant": "_dequant_kernel"}[which]
    real = getattr(tm, name)
    fake = _FakeJit()
    fake.arg_names = list(real.arg_names)
    monkeypatch.setattr(tm, name, fake)
    monkeypatch.setattr(tm, "_check", lambda *a: None)  # CPU tensors stand in for CUDA ones: nothing runs
    codes, scales = _weights(48, 256, 32, torch.float16, seed=2)
    x = torch.randn(1 if which == "gemv" else 5, 256).half()

    def call(c=codes, s=scales):
        if which == "grad":
            return tm.linear_grad_input(torch.randn(5, 48).half(), c, s, 32)
        if which == "dequant":
            return tm.dequantize(c, s, 32, torch.float16)
        return tm.linear(x, c, s, 32)

    call()
    call()
    jit, compiled = fake.log
    assert jit[0] == "jit" and compiled[0] == "compiled"
    args, kwargs = jit[2], dict(jit[3])
    kwargs.pop("num_warps"), kwargs.pop("num_stages")
    assert set(kwargs) == set(fake.arg_names[len(args):]) and len(args) + len(kwargs) == len(fake.arg_names)
    tail = tuple(kwargs[n] for n in fake.arg_names[len(args):])
    assert len(compiled[2]) == len(fake.arg_names) and compiled[2][len(args):] == tail
    assert [type(a) for a in compiled[2][: len(args)]] == [type(a) for a in args]
    call(*_weights(48, 256, 32, torch.bfloat16, seed=2))  # bf16 scales: another specialization
    assert fake.log[-1][0] == "jit"
