"""kernels/cross_entropy.py (fused cross-entropy) against F.cross_entropy on fp32 copies of the logits, forward and
backward, on fresh random inputs. Compiled on a GPU, through the Triton interpreter on a CPU.

Tolerances: losses are fp32 either way and agree to fp32 rounding of a log-sum-exp (1e-5 relative to their size).
Gradients in the logits' dtype, relative to the largest reference value: fp32 1e-5; bf16 one bf16 step at the
top of a binade (2^-7) and one of rounding (the interpreter rounds fp32 to bf16 toward zero, the GPU to nearest)."""

import pytest
import torch

from kernels.cross_entropy import CrossEntropyFunction, cross_entropy_reference, token_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol * b.float().abs().max().item())


def loss_and_grad(fn, logits, targets, weights):
    """fn's per-row losses and the gradient of sum(losses * weights) w.r.t. a fresh leaf copy of logits."""
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, targets)
    (grad,) = torch.autograd.grad(loss, leaf, weights)
    return loss, grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows,vocab", [(37, 1000), (3, 5000)])  # vocab past one tile of columns, and not a power of 2
def test_matches_formula_forward_and_backward(dtype, tol, rows, vocab):
    g = torch.Generator().manual_seed(rows + vocab)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(dtype).to(DEVICE)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1] = -100  # ignored rows: loss 0, gradient 0
    targets = targets.to(DEVICE)
    weights = torch.rand(rows, generator=g).to(DEVICE) + 0.5
    loss, grad = loss_and_grad(CrossEntropyFunction.apply, logits, targets, weights)
    want_loss, want_grad = loss_and_grad(cross_entropy_reference, logits, targets, weights)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    close(loss, want_loss, 1e-5)
    close(grad, want_grad, tol)
    assert loss[1] == 0 and (grad[1] == 0).all()
    # a sum's gradient arrives as an expanded scalar, as in model.loss
    leaf = logits.detach().clone().requires_grad_()
    (CrossEntropyFunction.apply(leaf, targets).sum() * 0.25).backward()
    close(leaf.grad, want_grad / weights[:, None] * 0.25, tol)


def test_target_outside_vocab_is_nan_not_a_wrong_number():
    logits = torch.randn(4, 50, device=DEVICE)
    loss = CrossEntropyFunction.apply(logits, torch.tensor([0, 50, -1, -100], device=DEVICE))
    assert torch.isfinite(loss[0]) and loss[1].isnan() and loss[2].isnan() and loss[3] == 0


def test_token_cross_entropy_takes_what_the_kernel_cannot():
    """Non-contiguous logits go through the formula; the result is the same."""
    logits = torch.randn(30, 8, device=DEVICE).t()  # [8, 30], strided
    targets = torch.randint(0, 30, (8,), device=DEVICE)
    close(token_cross_entropy(logits, targets), cross_entropy_reference(logits, targets), 1e-5)


def test_rejects_bad_input():
    logits = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        CrossEntropyFunction.apply(logits.t(), torch.zeros(10, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="integer tensor"):
        CrossEntropyFunction.apply(logits, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="integer tensor"):
        CrossEntropyFunction.apply(logits, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[rows, vocab\]"):
        CrossEntropyFunction.apply(logits[None], torch.zeros(4, dtype=torch.long, device=DEVICE))
