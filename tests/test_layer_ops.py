"""kernels/layer_ops.py (fused RMSNorm, SwiGLU, RoPE) against model.py's plain-PyTorch formulas, forward and backward,
on fresh random inputs. Compiled on a GPU, through the Triton interpreter on a CPU.

Tolerances, relative to the largest reference value: fp32 results agree to fp32 rounding (the kernels sum in
another order). bf16: 2e-2, two bf16 steps (2^-7 each at the top of a binade). On the GPU the kernels round to
nearest like PyTorch and differ by a step only where a sum's order tips a rounding; the interpreter rounds fp32 to
bf16 toward zero, which shifts results by up to a step per rounding. Sums over rows (the norm's weight gradient)
are formed in fp32 by the kernel and rounded once, by autograd from bf16 products: a wider bound there."""

import pytest
import torch
import torch.nn.functional as F

from kernels import layer_ops
from model import _rotate, rms_norm, rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads_of(fn, inputs, dy):
    """fn(*inputs) and the gradients of sum(fn * dy) w.r.t. the inputs, through fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dy)


def close(a, b, tol):
    """|a - b| <= tol * max|b| elementwise (a relative bound on the tensor's scale, robust to tiny entries)."""
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol * b.float().abs().max().item())


# (x dtype, weight dtype, tolerance). The last case is autocast with fp32 parameters: a bf16 x is not what
# chunk_train produces (the residual stream is fp32 then), but the promotion rules must still hold.
@pytest.mark.parametrize("x_dtype,w_dtype,tol", [(torch.float32, torch.float32, 1e-5),
                                                 (torch.bfloat16, torch.bfloat16, 2e-2),
                                                 (torch.bfloat16, torch.float32, 2e-2)])
@pytest.mark.parametrize("rows,cols", [(37, 48), (5, 200)])
def test_rms_norm_matches_formula(x_dtype, w_dtype, tol, rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    weight = (1 + 0.3 * torch.randn(cols, generator=g)).to(w_dtype).to(DEVICE)
    x = (3 * torch.randn(2, rows, cols, generator=g)).to(x_dtype).to(DEVICE)
    dy = torch.randn(2, rows, cols, generator=g).to(torch.promote_types(x_dtype, w_dtype)).to(DEVICE)
    out, (dx, dw) = grads_of(lambda x, w: layer_ops.RMSNormFunction.apply(x, w, 1e-6), (x, weight), dy)
    ref, (rdx, rdw) = grads_of(lambda x, w: rms_norm(x, w, 1e-6), (x, weight), dy)
    assert (out.dtype, dx.dtype, dw.dtype) == (ref.dtype, x_dtype, w_dtype)
    close(out, ref, tol)
    close(dx, rdx, tol)
    close(dw, rdw, 3 * tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,head_dim", [(3, 32), (2, 16)])
def test_rope_matches_formula_and_its_gradient(dtype, tol, heads, head_dim):
    """Forward vs the formula; backward (the kernel with negated angles) vs autograd through the formula."""
    g = torch.Generator().manual_seed(heads * head_dim)
    cos, sin = (t.to(DEVICE) for t in rope_cos_sin(torch.arange(100, 117), head_dim, 1e4))
    x = torch.randn(2, 17, heads, head_dim, generator=g).to(dtype).to(DEVICE)
    dy = torch.randn(2, 17, heads, head_dim, generator=g).to(dtype).to(DEVICE)
    out, (dx,) = grads_of(lambda x: layer_ops.RopeFunction.apply(x, cos, sin), (x,), dy)
    ref, (rdx,) = grads_of(lambda x: _rotate(x, cos, sin), (x,), dy)
    close(out, ref, tol)
    close(dx, rdx, tol)
    back = layer_ops.rope_rotate(out.detach().float().contiguous(), cos, sin, inverse=True)
    close(back, x.float(), tol)  # the inverse rotation undoes the rotation


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_swiglu_matches_formula(dtype, tol):
    """h = silu(gate) * up, and the backward kernel's dgate, dup and recomputed h, vs autograd on the formula."""
    g = torch.Generator().manual_seed(7)
    gate, up, dh = ((3 * torch.randn(3, 29, 40, generator=g)).to(dtype).to(DEVICE) for _ in range(3))
    ref, (rdg, rdu) = grads_of(lambda a, b: F.silu(a) * b, (gate, up), dh)
    close(layer_ops.swiglu_forward(gate, up), ref, tol)
    dgate, dup, h = layer_ops.swiglu_backward(gate, up, dh)
    close(h, ref, tol)
    close(dgate, rdg, tol)
    close(dup, rdu, tol)
    dgate2, dup2, none = layer_ops.swiglu_backward(gate, up, dh, want_h=False)  # the same, without writing h
    assert none is None and torch.equal(dgate2, dgate) and torch.equal(dup2, dup)


def test_swiglu_into_recomputes_what_consumers_saved(monkeypatch):
    """swiglu_into(consumer, gate, up) with a consumer that saves h three ways (a Linear's input, a transposed view,
    a strided slice): output and gradients (gate, up, the consumer's weights) as autograd on the formula in fp32,
    and backward recomputes h exactly once (two SwiGLU forward calls in all)."""
    calls = []
    real = layer_ops.swiglu_forward
    monkeypatch.setattr(layer_ops, "swiglu_forward", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(8)
    gate, up = (torch.randn(2, 5, 12, generator=g).to(DEVICE) for _ in range(2))
    linear = torch.nn.Linear(12, 7).to(DEVICE)
    w = torch.randn(5, 3, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(2, 5, 7, generator=g).to(DEVICE)

    def consumer(h):  # [2, 5, 12] -> [2, 5, 7]
        return linear(h) + (h.transpose(1, 2) @ w).sum() + (h[:, ::2, 1:4] ** 2).sum()

    params = [w, *linear.parameters()]

    def run(fn):
        leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
        out = fn(*leaves)
        return out, torch.autograd.grad(out, [*leaves, *params], dy)

    fused, fused_grads = run(lambda a, b: layer_ops.swiglu_into(consumer, a, b))
    assert len(calls) == 2
    ref, ref_grads = run(lambda a, b: consumer(F.silu(a) * b))
    close(fused, ref, 1e-5)
    for a, b in zip(fused_grads, ref_grads):
        close(a, b, 1e-5)


def test_launchers_reject_bad_input():
    x = torch.randn(2, 5, 3, 16, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(5), 16, 1e4)
    with pytest.raises(ValueError, match="contiguous"):
        layer_ops.rope_rotate(x.transpose(1, 2), cos.to(DEVICE), sin.to(DEVICE))
    with pytest.raises(ValueError, match="shape"):
        layer_ops.rope_rotate(x, cos[:4].to(DEVICE), sin[:4].to(DEVICE))
    with pytest.raises(ValueError, match="shape"):
        layer_ops.swiglu_forward(x, x[:1])
    with pytest.raises(ValueError, match="shape"):
        layer_ops.RMSNormFunction.apply(x, torch.ones(15, device=DEVICE), 1e-6)
