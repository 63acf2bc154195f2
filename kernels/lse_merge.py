"""Two partial attentions over disjoint keys merged into their union's, by log-sum-exp, in one kernel (Triton).

SDPAKernel (kernels/gather_sdpa.py) computes a chunk's attention as two fused calls, the history (every query
sees all of it) and the chunk's own keys (causal), and merges them:

    lse = log(e^lse1 + e^lse2)
    o   = o1 e^(lse1 - lse) + o2 e^(lse2 - lse)      (rows that see nothing in both: o = 0, lse = -inf)

In PyTorch ops that is ~8 kernels and an fp32 copy of o written and read twice (~320 MB of traffic per 4096-query
call of Qwen2.5-7B); fused, it reads o1, o2 once and writes o once in the dtype asked for (~90 MB), and the host
issues one launch instead of eight (bench/RESULTS.md, fifteenth session).

Layouts (element strides, any, the last one 1; the inputs are transposed views of the fused ops' [B, H, L, D]
outputs):
    o1, o2  [B, C, H, D] (any float dtype), lse1, lse2 [B, H, C] fp32
    out     o [B, C, H, D] (any float dtype), lse [B, H, C] fp32; may be o1 / lse1 themselves (merging into a
            running result in place: each element is read before it is written, by the same program)

`merge_reference` is the plain-PyTorch meaning (and what runs on CPU tensors without Triton's interpreter).
"""
import torch
import triton
import triton.language as tl

from kernels.paged_attention import _interpreting


@triton.jit
def _merge_kernel(O1, L1, O2, L2, O, L, C,
                  s1_b, s1_c, s1_h, t1_b, t1_h, t1_c, s2_b, s2_c, s2_h, t2_b, t2_h, t2_c,
                  so_b, so_c, so_h, to_b, to_h, to_c,
                  N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (cdiv(C, BLOCK_C), B * N_HEADS); one program merges BLOCK_C query rows of one (batch row, head)
    bh = tl.program_id(1)
    b, h = bh // N_HEADS, bh % N_HEADS
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] query rows
    ok = c < C
    d = tl.arange(0, HEAD_DIM)
    l1 = tl.load(L1 + b * t1_b + h * t1_h + c * t1_c, mask=ok, other=float("-inf")).to(tl.float32)
    l2 = tl.load(L2 + b * t2_b + h * t2_h + c * t2_c, mask=ok, other=float("-inf")).to(tl.float32)
    m = tl.maximum(l1, l2)
    seen = m > float("-inf")
    m = tl.where(seen, m, 0.0)  # rows that see nothing: both weights exp(-inf) = 0
    e1, e2 = tl.exp(l1 - m), tl.exp(l2 - m)
    total = tl.where(seen, e1 + e2, 1.0)
    w1, w2 = e1 / total, e2 / total  # [BLOCK_C]
    lse = tl.where(seen, m + tl.log(total), float("-inf"))
    o1 = tl.load(O1 + (b * s1_b + c * s1_c + h * s1_h)[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    o2 = tl.load(O2 + (b * s2_b + c * s2_c + h * s2_h)[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    o = o1.to(tl.float32) * w1[:, None] + o2.to(tl.float32) * w2[:, None]
    tl.store(O + (b * so_b + c * so_c + h * so_h)[:, None] + d[None, :], o.to(O.dtype.element_ty), mask=ok[:, None])
    tl.store(L + b * to_b + h * to_h + c * to_c, lse, mask=ok)


def merge_reference(o1, lse1, o2, lse2, out=None, dtype=torch.float32):
    """The merge in PyTorch ops: o1, o2 [B, C, H, D] (any dtype, strides), lse1, lse2 [B, H, C] fp32 ->
    (o [B, C, H, D] in `dtype` (contiguous), lse [B, H, C]), or written into out = (o, lse)."""
    lse = torch.logaddexp(lse1, lse2)
    shift = lse.masked_fill(lse == float("-inf"), 0.0)
    w1, w2 = (torch.exp(x - shift).transpose(1, 2)[..., None] for x in (lse1, lse2))  # [B, C, H, 1]
    o = torch.mul(o1, w1, out=torch.empty(o1.shape, dtype=torch.float32, device=o1.device)).addcmul_(o2, w2)
    if out is None:
        return o.to(dtype), lse
    out[0].copy_(o)
    out[1].copy_(lse)
    return out


def merge_attention(o1, lse1, o2, lse2, out=None, dtype=torch.float32):
    """(o, lse) of two partial attentions over disjoint keys, merged by log-sum-exp (see the module docstring):
    o1, o2 [B, C, H, D] (any strides, the last one 1), lse1, lse2 [B, H, C] fp32 -> o [B, C, H, D] in `dtype`
    (contiguous) and lse [B, H, C] fp32, or written into out = (o, lse) (which may be o1, lse1). Triton on CUDA
    tensors or under the interpreter, merge_reference otherwise."""
    B, C, H, D = o2.shape
    if o1.shape != o2.shape or lse1.shape != (B, H, C) or lse2.shape != (B, H, C):
        raise ValueError(f"merge_attention: o1 {tuple(o1.shape)}, lse1 {tuple(lse1.shape)}, o2 {tuple(o2.shape)}, "
                         f"lse2 {tuple(lse2.shape)} do not match")
    usable = (o1.stride(-1) == 1 and o2.stride(-1) == 1 and D & (D - 1) == 0 and D >= 16
              and (o2.is_cuda or (_interpreting() and o2.device.type == "cpu")))
    if not usable:
        return merge_reference(o1, lse1, o2, lse2, out=out, dtype=dtype)
    if out is None:
        out = (torch.empty(o2.shape, dtype=dtype, device=o2.device),
               torch.empty(B, H, C, dtype=torch.float32, device=o2.device))
    o, lse = out
    if o.stride(-1) != 1:
        raise ValueError("merge_attention: out's o must have a unit stride in its last dimension")
    BLOCK_C = 64 if D <= 64 else 32
    grid = (triton.cdiv(C, BLOCK_C), B * H)
    _merge_kernel[grid](o1, lse1, o2, lse2, o, lse, C,
                        o1.stride(0), o1.stride(1), o1.stride(2), lse1.stride(0), lse1.stride(1), lse1.stride(2),
                        o2.stride(0), o2.stride(1), o2.stride(2), lse2.stride(0), lse2.stride(1), lse2.stride(2),
                        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                        N_HEADS=H, HEAD_DIM=D, BLOCK_C=BLOCK_C, num_warps=4)
    return out
