"""The quantization math, checked against an independent numpy reference."""

import numpy as np
import pytest
import torch

from int8.formats.compressed_tensors import pack_codes, unpack_codes
from int8.quantize import NonFiniteWeights, dequantize, quantize, quantize_into


def _round_f32_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to bf16/fp16/fp32 precision (nearest, ties to even), back in float32."""
    x = x.astype(np.float32)
    if dtype == "fp32":
        return x
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32)


def reference(w: np.ndarray, block: int, scale_dtype: str):
    """The documented scheme, written independently of int8.quantize."""
    rows, cols = w.shape
    nb = -(-cols // block)
    padded = np.zeros((rows, nb * block), np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, nb, block)
    amax = np.abs(blocks).max(axis=-1)
    scale = _round_f32_to(np.float32(amax) / np.float32(127), scale_dtype)
    div = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(np.round(blocks / div[..., None]), -127, 127).astype(np.int8)  # np.round: half to even
    return q.reshape(rows, -1)[:, :cols], scale


SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

from int8 import kernels  # noqa: E402

BACKENDS = ["torch", "numpy"] + (["numba"] if kernels.available() else [])
"""Both implementations (the fused numba kernel, torch ops) must give the same bytes."""


def weights_with_outliers(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    idx = torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)
    w.view(-1)[idx] *= 300
    w[3, :] = 0  # all-zero row: every block of it is all zeros
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,block", [((64, 256), 128), ((33, 96), 32), ((8, 100), 32), ((5, 7), 4)])
def test_codes_and_scales_match_reference(scale_dtype, shape, block, backend):
    w = weights_with_outliers(*shape)
    qw = quantize(w, block, SCALE_DTYPES[scale_dtype], backend=backend)
    q_ref, s_ref = reference(w.numpy(), block, scale_dtype)
    assert qw.codes.dtype == torch.int8 and qw.codes.shape == shape
    np.testing.assert_array_equal(qw.codes.numpy(), q_ref)
    np.testing.assert_array_equal(qw.scales.float().numpy(), s_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16", "bf16"])
def test_reconstruction_within_half_a_scale(scale_dtype, backend):
    w = weights_with_outliers(128, 512, seed=3)
    qw = quantize(w, 64, SCALE_DTYPES[scale_dtype], backend=backend)
    err = (qw.dequantize() - w).abs()
    half = qw.scales.float().repeat_interleave(64, dim=1) / 2
    assert bool((err <= half * (1 + 1e-6) + 1e-12).all())
    assert int(qw.codes.min()) >= -127 and int(qw.codes.max()) <= 127


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_round_half_to_even(backend):
    # absmax 127 -> scale exactly 1, so w / scale lands on .5 ties
    w = torch.tensor([[127.0, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5]])
    qw = quantize(w, 8, backend=backend)
    assert float(qw.scales[0, 0]) == 1.0
    assert qw.codes.tolist() == [[127, 2, 4, -2, -4, 0, 2, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_blocks_give_zero_codes_and_scales(backend):
    w = torch.zeros(4, 256)
    w[1, 130] = 1.0
    qw = quantize(w, 128, backend=backend)
    assert torch.equal(qw.scales[0], torch.zeros(2)) and float(qw.scales[1, 0]) == 0.0
    assert int(qw.codes[1, 130]) == 127 and int(qw.codes.abs().sum()) == 127
    assert torch.isfinite(qw.dequantize()).all()


def test_ragged_last_block_has_its_own_scale():
    w = torch.ones(2, 10)
    w[:, 8:] = 4.0  # the ragged block (2 values) has a larger absmax
    qw = quantize(w, 4)
    assert qw.scales.shape == (2, 3)
    assert torch.allclose(qw.scales[0], torch.tensor([1 / 127, 1 / 127, 4 / 127]))
    assert torch.equal(qw.codes, torch.full((2, 10), 127, dtype=torch.int8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad, backend):
    w = torch.randn(4, 64)
    w[2, 7] = bad
    with pytest.raises(NonFiniteWeights):
        quantize(w, 32, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_overflowing_fp16_is_refused(backend):
    w = torch.full((1, 32), 1e7)
    with pytest.raises(NonFiniteWeights, match="too large"):
        quantize(w, 32, torch.float16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sources_are_widened_exactly(src_dtype, backend):
    w = weights_with_outliers(16, 128).to(src_dtype)
    qw = quantize(w, 32, torch.bfloat16, backend=backend)
    q_ref, s_ref = reference(w.float().numpy(), 32, "bf16")
    np.testing.assert_array_equal(qw.codes.numpy(), q_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_stats_are_in_units_of_scale(backend):
    w = weights_with_outliers(64, 256, seed=7)
    codes = torch.empty(64, 256, dtype=torch.int8)
    scales = torch.empty(64, 2, dtype=torch.float32)
    st = quantize_into(w, 128, codes, scales, backend=backend)
    rel = (w / scales.repeat_interleave(128, 1).clamp_min(1e-30) - codes.float()).abs()
    rel[3] = 0  # the all-zero row: error 0
    assert st.max_abs == pytest.approx(float(rel.max()), abs=1e-6) and st.max_abs <= 0.5
    assert st.mean_abs == pytest.approx(float(rel.mean()), rel=1e-4)
    assert st.zero_blocks == 2 and st.count == w.numel()


def test_packed_layout_is_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    for cols in (128, 130, 7):
        codes = torch.randint(-127, 128, (6, cols), dtype=torch.int8)
        packed = pack_codes(codes)
        assert packed.dtype == torch.int32 and packed.shape == (6, -(-cols // 4))
        assert torch.equal(packed, pack_to_int32(codes, 8))
        assert torch.equal(unpack_codes(packed, cols), codes)
        assert torch.equal(unpack_from_int32(packed, 8, torch.Size([6, cols])), codes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_codes_are_the_packed_bytes(backend):
    w = weights_with_outliers(8, 64)
    codes = torch.empty(8, 64, dtype=torch.int8)
    packed = torch.empty(8, 64, dtype=torch.int8)
    scales = torch.empty(8, 2)
    quantize_into(w, 32, codes, scales, backend=backend)
    quantize_into(w, 32, packed, scales, offset_codes=True, backend=backend)
    assert torch.equal(packed.view(torch.int32), pack_codes(codes))


def test_dequantize_matches_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    w = weights_with_outliers(16, 256)
    qw = quantize(w, 64, torch.bfloat16)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=64)
    ours = dequantize(qw.codes, qw.scales, 64, torch.bfloat16)
    theirs = ct_dequantize(qw.codes, qw.scales, None, args)
    assert torch.equal(ours, theirs.to(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none in CI)")
def test_cuda_is_byte_identical_to_cpu():
    w = weights_with_outliers(512, 4096)
    for dt in SCALE_DTYPES.values():
        cpu = quantize(w, 128, dt)
        gpu = quantize(w.cuda(), 128, dt)
        assert torch.equal(cpu.codes, gpu.codes.cpu()) and torch.equal(cpu.scales, gpu.scales.cpu())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_rounds_scales_exactly_like_torch(scale_dtype, backend):
    """The kernel's own float32 -> bf16/fp16 rounding, over 12 orders of magnitude, subnormals,
    the largest finite values and the overflow boundary, against torch's cast."""
    g = torch.Generator().manual_seed(5)
    mags = 10.0 ** torch.randint(-12, 6, (200_000,), generator=g).float()
    amax = torch.cat([torch.rand(200_000, generator=g) * mags, torch.tensor([0.0, 65504.0, 65519.0, 6.1e-5, 5.96e-8, 1e-40])])
    amax = (amax * 127).float()
    w = torch.zeros(amax.numel(), 4)
    w[:, 0] = amax
    finite = torch.isfinite((amax / 127).to(scale_dtype))
    ours = quantize(w[finite], 4, scale_dtype, backend=backend)
    theirs = quantize(w[finite], 4, scale_dtype, backend="torch")
    assert torch.equal(ours.scales, theirs.scales) and torch.equal(ours.codes, theirs.codes)
    if not bool(finite.all()):
        with pytest.raises(NonFiniteWeights, match="too large"):
            quantize(w[~finite][:1], 4, scale_dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_tensor_with_padding_columns(backend):
    """in % 4 != 0: the packed rows carry zero padding, the codes are unaffected."""
    w = weights_with_outliers(6, 20)
    packed = torch.zeros(6, 24, dtype=torch.int8)
    scales = torch.empty(6, 5)
    quantize_into(w, 4, packed, scales, offset_codes=True, backend=backend)
    q_ref, _ = reference(w.numpy(), 4, "fp32")
    assert torch.equal(unpack_codes(packed.view(torch.int32), 20), torch.from_numpy(q_ref))
    assert int(packed[:, 20:].abs().sum()) == 0
