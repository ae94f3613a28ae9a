"""The compiled deformable-attention path (torch.compile: Triton kernels on CUDA) against the
pure-PyTorch reference, forward and backward, on CUDA. Skipped without CUDA (compiling for CPU
takes a minute; ``bench/gpu_check.sh`` runs this file on a GPU machine)."""

import pytest
import torch

from comformer.modeling.pixel_decoder.ms_deform_attn import (
    MSDeformAttn,
    compiled_ms_deform_attn,
    ms_deform_attn,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(40, 40), (20, 20), (10, 10)]
    s = sum(h * w for h, w in shapes)
    n, m, d, lq, lv, p = 2, 8, 32, 2100, 3, 4
    # locations partly outside [0, 1]: the zero padding is part of the contract
    value = torch.randn(n, s, m, d, generator=g).to(device, dtype)
    loc = (torch.rand(n, lq, m, lv, p, 2, generator=g) * 1.2 - 0.1).to(device)
    w = torch.rand(n, lq, m, lv, p, generator=g).softmax(-1).to(device)
    return [x.requires_grad_() for x in (value, loc, w)], shapes


@cuda
def test_compiled_equals_pytorch_forward_and_backward_on_cuda():
    (value, loc, w), shapes = _inputs("cuda")
    ref = ms_deform_attn(value, shapes, loc, w)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (value, loc, w), grad)
    out = compiled_ms_deform_attn()(value, shapes, loc, w)
    grads = torch.autograd.grad(out, (value, loc, w), grad)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@cuda
def test_module_picks_the_compiled_path_on_cuda_and_agrees():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=4).cuda()
    (value, _, _), shapes = _inputs("cuda")
    s = value.shape[1]
    query = torch.randn(2, 100, 64, device="cuda")
    ref_points = torch.rand(2, 100, 3, 2, device="cuda")
    flat = torch.randn(2, s, 64, device="cuda")
    assert attn._sampler(flat) is compiled_ms_deform_attn()
    out = attn(query, ref_points, flat, shapes)
    attn.impl = "pytorch"
    assert attn._sampler(flat) is ms_deform_attn
    torch.testing.assert_close(out, attn(query, ref_points, flat, shapes), rtol=1e-4, atol=1e-5)


def test_module_uses_the_reference_on_cpu_and_rejects_unknown_impls():
    attn = MSDeformAttn(d_model=32, n_levels=1, n_heads=4, n_points=2)
    flat = torch.zeros(1, 4, 32)
    assert attn._sampler(flat) is ms_deform_attn
    attn.impl = "triton"
    with pytest.raises(ValueError, match="impl='triton' is not valid"):
        attn._sampler(flat)
