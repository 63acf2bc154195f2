"""Cross-entropy of logits against targets, fused (Triton): one pass forward, one backward, no fp32 copy.

The formula model.py's loss used, F.cross_entropy(logits.float(), targets, ignore_index=-100), runs over a
[tokens, vocab] tensor four times in fp32: the cast, log_softmax, its backward, the gradient's cast back. For
Qwen2.5's 152K vocabulary that is 0.6 MB per token and pass; over a 128K-token step the sparse 7B spent ~0.25 s
there (bench/RESULTS.md, eighteenth session). Here:

    forward    lse = log(sum_j exp(x_j)) per row, in fp32 with a running max (online softmax), and
               loss = lse - x[target] (0 where target == ignore_index, NaN where it lies outside [0, vocab))
    backward   dx = (exp(x - lse) - onehot(target)) * dloss, formed in fp32 and rounded once to the logits' dtype
               (0 on ignored rows)

which reads the logits twice and writes their gradient once, in their own dtype (bf16: 2 bytes per element and
pass). The backward's rounding is the formula's (an fp32 gradient cast to bf16); only the order of the sums
differs. Row-major logits [rows, vocab] only; the launchers check contiguity rather than copy.
"""
import torch
import triton
import triton.language as tl

from kernels import layer_ops
from kernels.paged_attention import _interpreting

__all__ = ["cross_entropy_reference", "CrossEntropyFunction", "token_cross_entropy"]


def cross_entropy_reference(logits, targets, ignore_index=-100):
    """The per-row losses [rows] fp32 of logits [rows, vocab] against targets [rows]: the formula this fuses."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none", ignore_index=ignore_index)


@triton.jit
def _ce_fwd_kernel(X, T, LOSS, LSE, n_rows, n_cols, ignore_index, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (cdiv(n_rows, BLOCK_R),); a program streams BLOCK_R whole rows of X [n_rows, n_cols], BLOCK_C columns at
    # a time, keeping a running max m and sum s = sum exp(x - m) per (row, lane): one exp per element more than a
    # max-first pass, but a single read of the row
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = rows.to(tl.int64)[:, None] * n_cols
    m = tl.full([BLOCK_R, BLOCK_C], -1e30, tl.float32)  # finite: exp(m - m_new) stays defined for empty lanes
    s = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(X + base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, 1)  # [BLOCK_R]
    lse = m_row + tl.log(tl.where(row_ok, tl.sum(s * tl.exp(m - m_row[:, None]), 1), 1.0))
    t = tl.load(T + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    in_range = (t >= 0) & (t < n_cols)
    x_t = tl.load(X + rows.to(tl.int64) * n_cols + t, mask=row_ok & in_range, other=0.0).to(tl.float32)
    loss = tl.where(t == ignore_index, 0.0, tl.where(in_range, lse - x_t, float("nan")))
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _ce_bwd_kernel(X, T, LSE, DLOSS, DX, n_rows, n_cols, ignore_index, stride_dloss,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid as the forward: dX = (softmax(x) - onehot(t)) * dloss per row, from the forward's lse
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = rows.to(tl.int64)[:, None] * n_cols
    t = tl.load(T + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    dloss = tl.load(DLOSS + rows.to(tl.int64) * stride_dloss, mask=row_ok, other=0.0).to(tl.float32)
    dloss = tl.where(t == ignore_index, 0.0, dloss)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(X + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        g = (p - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)) * dloss[:, None]
        tl.store(DX + base + cols[None, :], g.to(DX.dtype.element_ty), mask=ok)


def _blocks(n_rows, n_cols):
    """(BLOCK_R, BLOCK_C): on the GPU one row per program, 4096 columns at a time (16 fp32 values per thread and
    live tensor at 8 warps); under the interpreter, whose cost is per program and op, ~64K elements of up to 1024
    columns (so that the tests' larger vocabularies take several column tiles, as every row does on the GPU)."""
    if not _interpreting():
        return 1, 4096
    block_c = min(triton.next_power_of_2(n_cols), 1024)
    return max(1, min(triton.next_power_of_2(n_rows), (1 << 16) // block_c)), block_c


class CrossEntropyFunction(torch.autograd.Function):
    """Per-row losses [rows] fp32 of logits [rows, vocab] (contiguous; fp32, bf16 or fp16) against int targets
    [rows]; saves the logits and the rows' lse [rows] fp32."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100):
        layer_ops._check("logits", logits)
        if logits.dim() != 2:
            raise ValueError(f"logits must be [rows, vocab], got {tuple(logits.shape)}")
        rows, vocab = logits.shape
        if targets.shape != (rows,) or targets.is_floating_point() or targets.device != logits.device:
            raise ValueError(f"targets must be an integer tensor [{rows}] on {logits.device}, got "
                             f"{targets.dtype} {tuple(targets.shape)} on {targets.device}")
        targets = targets.contiguous()
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        block_r, block_c = _blocks(rows, vocab)
        _ce_fwd_kernel[(triton.cdiv(rows, block_r),)](logits, targets, loss, lse, rows, vocab, int(ignore_index),
                                                     BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = int(ignore_index)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        dloss = dloss.float()  # often an expanded scalar (a sum's gradient): read through its stride
        dx = torch.empty_like(logits)
        block_r, block_c = _blocks(rows, vocab)
        _ce_bwd_kernel[(triton.cdiv(rows, block_r),)](logits, targets, lse, dloss, dx, rows, vocab, ctx.ignore_index,
                                                     dloss.stride(0), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
        return dx, None, None


def token_cross_entropy(logits, targets, ignore_index=-100):
    """Per-row cross-entropies [rows] fp32 of logits [rows, vocab] against targets [rows], differentiable: the fused
    kernels where the fused layer ops run (layer_ops.available: CUDA; CPU under TRITON_INTERPRET=1) on contiguous
    logits, the formula otherwise."""
    if layer_ops.available(logits) and logits.is_contiguous():
        return CrossEntropyFunction.apply(logits, targets, ignore_index)
    return cross_entropy_reference(logits, targets, ignore_index)
