"""`Int8Linear` on its own: the just-in-time de-quantizing matmul, its backward, its state dict."""

from __future__ import annotations

import pytest
import torch

from int8.formats.compressed_tensors import pack_codes
from int8.quantize import quantize
from int8.runtime import layer as layer_mod
from int8.runtime.layer import Int8Linear, int8_linear, int8_linear_grad_input


def make_layer(out_f: int, in_f: int, block: int, bias: bool = True, scale_dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin, Int8Linear.from_linear(lin, block_size=block, scale_dtype=scale_dtype)


def dense(layer: Int8Linear) -> torch.Tensor:
    """The de-quantized weight computed independently: codes * scale in float64."""
    codes = layer.codes.double()
    s = layer.scales.double().repeat_interleave(layer.block_size, dim=1)[:, : layer.in_features]
    return codes * s


@pytest.fixture(params=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    """Exercise the chunked CPU path with chunks of a few rows, and the one-chunk path."""
    if request.param == "many-chunks":
        monkeypatch.setattr(layer_mod, "CHUNK_ELEMENTS", 64)
        monkeypatch.setattr(layer_mod, "MIN_CHUNK_ROWS", 3)
    return request.param


@pytest.mark.parametrize("shape", [(40, 64, 16), (33, 96, 32), (7, 48, 48), (24, 80, 32)])  # last: ragged block
@pytest.mark.parametrize("tokens", [(1,), (5,), (2, 3), (0,)])
def test_forward_matches_dense(shape, tokens, chunking):
    out_f, in_f, block = shape
    _, q = make_layer(out_f, in_f, block)
    x = torch.randn(*tokens, in_f)
    y = q(x)
    ref = (x.double() @ dense(q).T + q.bias.double()).float()
    assert y.shape == (*tokens, out_f) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_codes_are_the_quantizer_codes():
    lin, q = make_layer(16, 64, 32, scale_dtype=torch.float16)
    ref = quantize(lin.weight.detach(), 32, torch.float16)
    assert torch.equal(q.codes, ref.codes)
    assert torch.equal(q.scales, ref.scales) and q.scales.dtype == torch.float16
    assert q.codes.dtype == torch.int8 and q.codes.element_size() == 1


def test_backward_matches_dense_and_saves_no_float_weight(chunking):
    _, q = make_layer(48, 64, 16)
    q.bias.requires_grad_(True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = dense(q)
    torch.testing.assert_close(x.grad, (g.double() @ w).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)
    # Only the int8 codes and the scales are kept for backward: no float (out, in) weight, no input.
    assert saved, "the autograd function saved nothing at all?"
    assert all(dt != torch.float32 or shape != (48, 64) for shape, dt in saved), saved
    assert (tuple(q.codes.shape), torch.int8) in saved
    assert all(dt in (torch.int8, torch.bfloat16) for _, dt in saved), saved


def test_no_gradient_ever_reaches_codes_or_scales():
    _, q = make_layer(8, 32, 16)
    x = torch.randn(2, 32, requires_grad=True)
    q(x).sum().backward()
    assert not q.codes.requires_grad and q.codes.grad is None
    assert [n for n, p in q.named_parameters() if p.requires_grad] == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_compute(dtype):
    _, q = make_layer(32, 64, 32, bias=False)
    x = torch.randn(4, 64)
    y = q(x.to(dtype))
    assert y.dtype == dtype
    ref = x.double() @ dense(q).T
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


def test_grad_input_function_matches_dense(chunking):
    _, q = make_layer(20, 32, 8)
    g = torch.randn(6, 20)
    gx = int8_linear_grad_input(g, q.codes, q.scales, q.block_size)
    torch.testing.assert_close(gx, (g.double() @ dense(q)).float(), rtol=1e-5, atol=1e-5)
    y = int8_linear(torch.randn(6, 32), q.codes, q.scales, q.block_size)
    assert y.shape == (6, 20)


def test_state_dict_is_the_checkpoint_layout():
    _, q = make_layer(16, 64, 32)
    sd = q.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_shape", "bias"}
    assert sd["weight_packed"].dtype == torch.int32 and tuple(sd["weight_packed"].shape) == (16, 16)
    assert torch.equal(sd["weight_packed"], pack_codes(q.codes))
    assert sd["weight_shape"].tolist() == [16, 64]
    fresh = Int8Linear(64, 16, True, block_size=32, scale_dtype=torch.bfloat16)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.codes, q.codes) and torch.equal(fresh.scale_bits, q.scale_bits)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))


def test_casting_the_model_never_rounds_the_scales():
    _, q = make_layer(16, 64, 32, scale_dtype=torch.float32)
    before = q.scales.clone()
    q.half()
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, before)
    assert q.bias.dtype == torch.float16
    q.to(torch.bfloat16)
    assert torch.equal(q.scales, before) and q.codes.dtype == torch.int8


def test_inference_mode_then_training_reuses_the_workspace():
    """The CPU workspace is first allocated under inference_mode (generate), then used by a training step."""
    layer_mod._workspaces.__dict__.clear()
    _, q = make_layer(16, 64, 32)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        y0 = q(x)
    xr = x.clone().requires_grad_(True)
    y1 = q(xr)
    y1.sum().backward()
    torch.testing.assert_close(y1.detach(), y0)
    assert xr.grad is not None
