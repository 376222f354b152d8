"""The CPU converter's numpy arithmetic (`int8.conversion.arrays`) gives torch's bytes: casts of kept
tensors, finiteness, widening, and quantization from every float source dtype and layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from int8 import kernels
from int8.conversion import arrays
from int8.formats.safetensors import NUMPY_DTYPES, to_numpy, to_torch
from int8.quantize import quantize_into
from int8.scheme import NonFiniteWeights

NUMBA_CASES = [True, False] if kernels.available() else [False]


@pytest.fixture(params=NUMBA_CASES, ids=lambda v: "numba" if v else "numpy")
def one_pass(request, monkeypatch):
    """The casts and checks with numba's one-pass kernels loaded, and as numpy ufuncs alone (a small conversion)."""
    if not request.param:
        monkeypatch.setattr(kernels, "loaded", lambda: False)
    return request.param


TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FLOATS = list(TORCH)


def _hard_values(n: int = 50_000, seed: int = 0) -> torch.Tensor:
    """float32 values where rounding is hard: ties of bf16 and fp16, subnormals of both, values near each
    dtype's largest finite (fp16 overflows), signed zeros, and random magnitudes over 80 decades."""
    g = torch.Generator().manual_seed(seed)
    mags = 10.0 ** (torch.rand(n, generator=g) * 80 - 40)
    x = (torch.rand(n, generator=g) - 0.5) * mags
    bits = torch.randint(0, 1 << 16, (n // 4,), generator=g, dtype=torch.int64)
    ties = ((bits << 16) | 0x8000).to(torch.int64)  # exactly halfway between two bf16 values
    ties = ties.to(torch.int32).view(torch.float32)
    ties = ties[torch.isfinite(ties)]
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, -65520.0, 6.1e-5, 5.96e-8, 2.98e-8, 1e-45, 3.3e38, -3.39e38,
                            1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11])
    return torch.cat([x.float(), ties, special])


@pytest.mark.parametrize("src, dst", [(a, b) for a in FLOATS for b in FLOATS if a != b])  # equal: written as is
def test_cast_into_rounds_as_torch(src, dst, one_pass):
    x = _hard_values().to(TORCH[src])
    x = x[torch.isfinite(x)]
    expected = x.to(TORCH[dst])
    out = np.empty(x.numel() * 8, np.uint8)
    got = arrays.cast_into(to_numpy(x), src, dst, out)
    assert got.dtype == NUMPY_DTYPES[dst] and got.shape == tuple(x.shape)
    assert torch.equal(to_torch(got, dst).view(torch.uint8) if dst != "BF16" else to_torch(got, dst).view(torch.int16),
                       expected.view(torch.uint8) if dst != "BF16" else expected.view(torch.int16))


@pytest.mark.parametrize("src", ["F32", "F64", "F16"])
def test_cast_to_bf16_of_a_large_tensor_rounds_as_torch(src, one_pass):
    """More values than the numpy path's cache-sized piece (`arrays._round_to_bf16`), ending in a partial one."""
    x = torch.cat([_hard_values(100_000, seed=s) for s in range(5)] + [_hard_values(7_777, seed=9)]).to(TORCH[src])
    x = x[torch.isfinite(x)]
    assert x.numel() > arrays.CAST_PIECE_VALUES
    out = np.empty(x.numel() * 2, np.uint8)
    got = arrays.cast_into(to_numpy(x), src, "BF16", out)
    assert torch.equal(to_torch(got, "BF16").view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("src, dst", [(a, b) for a in FLOATS for b in FLOATS if a != b])
def test_cast_finite_casts_as_cast_into_and_refuses_nan_and_inf(src, dst, one_pass):
    """What the converter runs on a kept tensor: float32 to bfloat16 in one pass once numba is loaded (the cast
    finds the largest magnitude on its way), the other casts after a check. Either way: cast_into's bytes, or None
    for a NaN or an Inf anywhere, whatever its payload (0x7FFFFFFF and 0xFFFFFFFF wrap round in the rounding)."""
    x = _hard_values(20_000).to(TORCH[src])
    x = x[torch.isfinite(x)]
    out = np.empty(x.numel() * 8, np.uint8)
    got = arrays.cast_finite(to_numpy(x), src, dst, out)
    assert got is not None
    assert np.array_equal(got.view(np.uint8), arrays.cast_into(to_numpy(x), src, dst, np.empty_like(out)).view(np.uint8))
    bad = [torch.tensor(v, dtype=TORCH[src]) for v in (float("nan"), float("inf"), -float("inf"))]
    if src == "F32":  # NaNs by their bits (a Python float would be the canonical NaN)
        bad += [torch.tensor(b - (1 << 32) * (b >> 31), dtype=torch.int32).view(torch.float32)
                for b in (0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFFC00000)]
    for value in bad:
        for where in (0, x.numel() // 2, x.numel() - 1):
            y = x.clone()
            y[where] = value
            assert y[where : where + 1].view(torch.uint8).equal(value.reshape(1).view(torch.uint8))
            assert arrays.cast_finite(to_numpy(y), src, dst, out) is None, (value, where)


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_finite_finds_one_bad_value_anywhere(dtype, one_pass):
    x = torch.randn(3, 1001).to(TORCH[dtype])
    assert arrays.all_finite(to_numpy(x), dtype)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 1500, 3002):
            y = x.clone()
            y.view(-1)[where] = bad
            assert not arrays.all_finite(to_numpy(y), dtype), (bad, where)
    assert arrays.all_finite(np.empty((0, 4), NUMPY_DTYPES[dtype]), dtype)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_widen_into_is_torchs_float(dtype, one_pass):
    x = _hard_values(20_000)[:24_000].to(TORCH[dtype]).view(100, -1)
    out = np.empty(x.numel(), np.float32)
    got = arrays.widen_into(to_numpy(x), dtype, out)
    assert torch.equal(torch.from_numpy(got).view(torch.int32), x.float().view(torch.int32))


def _torch_codes(w: torch.Tensor, block: int, scale_dtype: str):
    rows, cols = w.shape
    codes = torch.zeros(rows, cols + (-cols) % 4, dtype=torch.int8)
    scales = torch.empty(rows, cols // block, dtype=TORCH[scale_dtype])
    st = quantize_into(w.contiguous(), block, codes, scales, offset_codes=True, backend="torch")
    return codes.view(torch.uint8).numpy(), to_numpy(scales), st


CPU_KERNELS = [arrays.Kernel.NUMPY] + ([arrays.Kernel.NUMBA] if kernels.available() else [])


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("block", [1, 2, 16, 17, 48, 64, 128, 256, 384])
def test_every_block_size_gives_torchs_bytes(block, kernel):
    """Every block size: the numpy kernel halves power-of-two runs before its transposed reduction
    (`kernels._block_absmax`), down to 16 values, and reduces odd ones as they are."""
    g = torch.Generator().manual_seed(block)
    rows, cols = 300, 3 * block
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3] = 0
    w[4, block - 1] = 7.0  # a block's max in its last value
    w[5, 0] = -9.0  # and in its first, negative
    codes = np.zeros((rows, cols + (-cols) % 4), np.uint8)
    scales = np.empty((rows, 3), np.float32)
    st = arrays.quantize_blocks(to_numpy(w), "F32", block, codes, scales, "F32", kernel=kernel)
    ref_codes, ref_scales, ref_st = _torch_codes(w, block, "F32")
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales.view(np.uint8), ref_scales.view(np.uint8))
    assert st.zero_blocks == ref_st.zero_blocks == 3


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("scale_dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_blocks_gives_torchs_bytes(src, scale_dtype, transposed, kernel):
    g = torch.Generator().manual_seed(1)
    rows, cols, block = 37, 96, 32
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(TORCH[src])
    w[5] = 0
    w[7, :32] = 1e-6  # a subnormal fp16 scale: the clamp branch
    stored = w.t().contiguous() if transposed else w  # Conv1D stores (in, out)
    codes = np.zeros((rows, cols + (-cols) % 4), np.uint8)
    scales = np.empty((rows, cols // block), NUMPY_DTYPES[scale_dtype])
    src_array = to_numpy(stored)
    src_array.flags.writeable = False  # as the page cache is mapped
    st = arrays.quantize_blocks(src_array, src, block, codes, scales, scale_dtype, transposed=transposed, kernel=kernel)
    ref_codes, ref_scales, ref_st = _torch_codes(w, block, scale_dtype)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales.view(np.uint8), ref_scales.view(np.uint8))  # bytes: +0 and -0 differ
    assert st.count == ref_st.count and st.zero_blocks == ref_st.zero_blocks >= 3  # row 5; fp16 scales of 1e-6 underflow too
    assert st.max_abs == pytest.approx(ref_st.max_abs, abs=1e-6)
    assert st.sum_abs == pytest.approx(ref_st.sum_abs, rel=1e-5)


@pytest.mark.parametrize("src", FLOATS)
def test_numpy_kernel_over_many_pieces_gives_torchs_bytes(src, monkeypatch):
    """The numpy kernel works a piece of `arrays.NUMPY_SUBCHUNK_VALUES` at a time (a whole number of rows, at
    least one): a tensor of many pieces, the last one partial, gives the bytes of one pass over it."""
    monkeypatch.setattr(arrays, "NUMPY_SUBCHUNK_VALUES", 3 * 96 + 5)  # 3 rows a piece
    g = torch.Generator().manual_seed(2)
    rows, cols, block = 37, 96, 32
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(TORCH[src])
    w[36] = 0  # the last, partial piece has a zero block
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.empty((rows, cols // block), np.float32)
    st = arrays.quantize_blocks(to_numpy(w), src, block, codes, scales, "F32", kernel=arrays.Kernel.NUMPY)
    ref_codes, ref_scales, ref_st = _torch_codes(w, block, "F32")
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales.view(np.uint8), ref_scales.view(np.uint8))
    assert st.count == rows * cols and st.zero_blocks == ref_st.zero_blocks == 3
    assert st.sum_abs == pytest.approx(ref_st.sum_abs, rel=1e-5)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("src", ["F32", "BF16"])
def test_quantize_blocks_refuses_non_finite_and_overflowing_weights(src, kernel):
    w = torch.randn(4, 64).to(TORCH[src])
    w[2, 10] = float("nan")
    codes, scales = np.zeros((4, 64), np.uint8), np.empty((4, 2), np.float32)
    with pytest.raises(NonFiniteWeights, match="NaN or Inf"):
        arrays.quantize_blocks(to_numpy(w), src, 32, codes, scales, "F32", kernel=kernel)
    big = torch.full((2, 32), 70000.0 * 127).to(TORCH[src])  # its scale exceeds fp16's 65504
    with pytest.raises(NonFiniteWeights, match="too large for f16 scales"):
        arrays.quantize_blocks(to_numpy(big), src, 32, np.zeros((2, 32), np.uint8), np.empty((2, 1), np.float16), "F16",
                               kernel=kernel)


@pytest.mark.parametrize("arch, dtype, out_dtype, scale_dtype", [
    ("gptj", torch.float32, "bf16", "fp32"),
    ("gpt2", torch.bfloat16, "fp16", "bf16"),  # Conv1D layout, bf16 source
    ("t5", torch.float16, "fp32", "fp16"),
])
def test_every_cpu_kernel_writes_the_same_bytes(tmp_path, monkeypatch, arch, dtype, out_dtype, scale_dtype):
    """numpy (a small conversion), numba (a large one) and torch (what a GPU runs) write the same files, byte for
    byte; the one-pass casts are numba's once it is loaded, numpy's before."""
    from models import make_tiny

    import int8

    src = make_tiny(arch, tmp_path / "src", dtype=dtype, tokenizer=False)
    kw = dict(device="cpu", dtype=out_dtype, scale_dtype=scale_dtype)
    files = {}
    for kernel in [arrays.Kernel.NUMPY, arrays.Kernel.TORCH] + ([arrays.Kernel.NUMBA] if kernels.available() else []):
        monkeypatch.setattr(arrays, "choose_kernel", lambda nbytes, k=kernel: k)
        if kernel == arrays.Kernel.NUMPY:
            monkeypatch.setattr(kernels, "loaded", lambda: False)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(arrays, "choose_kernel", lambda nbytes, k=kernel: k)
        int8.convert(src, tmp_path / kernel.value, **kw)
        files[kernel] = {p.name: p.read_bytes() for p in sorted((tmp_path / kernel.value).glob("*.safetensors"))}
    assert files[arrays.Kernel.NUMPY]
    for kernel, shards in files.items():
        assert shards == files[arrays.Kernel.NUMPY], kernel


def test_small_conversions_use_numpy_and_large_ones_numba():
    assert arrays.choose_kernel(7 << 20) == arrays.Kernel.NUMPY
    expected = arrays.Kernel.NUMBA if kernels.available() else arrays.Kernel.NUMPY
    assert arrays.choose_kernel(arrays.NUMBA_FROM_BYTES) == expected


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 5 * 1024, 262_144 + 7])
def test_sum_columns_is_the_sum(n):
    """The numpy kernel's error sum and the finiteness check of kept tensors: every value counted once, the
    remainder past the last full row included; a NaN or an Inf anywhere shows in the total."""
    a = np.random.default_rng(n).random(n, dtype=np.float32)
    assert float(kernels.sum_columns(a)) == pytest.approx(float(a.astype(np.float64).sum()), rel=1e-5, abs=1e-6)
    for where in {0, n // 2, n - 1} if n else ():
        for bad in (np.nan, np.inf):
            b = a.copy()
            b[where] = bad
            assert not np.isfinite(kernels.sum_columns(b)), (where, bad)
