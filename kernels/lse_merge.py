"""Two partial attentions over disjoint keys merged into their union's, by log-sum-exp, in one kernel (Triton).

SDPAKernel (kernels/gather_sdpa.py) computes a chunk's attention as two fused calls, the history (every query
sees all of it) and the chunk's own keys (causal), and merges them:

    lse = log(e^lse1 + e^lse2)
    o   = o1 e^(lse1 - lse) + o2 e^(lse2 - lse)      (rows that see nothing in both: o = 0, lse = -inf)

In PyTorch ops that is ~8 kernels and an fp32 copy of o written and read twice (~320 MB of traffic per 4096-query
call of Qwen2.5-7B); fused, it reads o1, o2 once and writes o once in the dtype asked for (~90 MB), and the host
issues one launch instead of eight (bench/RESULTS.md, fifteenth session).

Layouts (element strides, any; the inputs are transposed views of the fused ops' [B, H, L, D] outputs):
    o1   [B, C, H, D] where query c of the chunk sits in block c // q_block at row c % q_block: the history call
         may run every block of q_block queries as its own batch entry (sparse tables), so o1 is addressed by
         (batch, block, row, head) strides; lse1 the same way over (batch, block, row, head)
    o2   [B, C, H, D], lse2 [B, H, C] (the chunk's own keys: one call)
    out  o [B, C, H, D] (any float dtype), lse [B, H, C] fp32; may be o1 / lse1 themselves (merging into a running
         result in place: each element is read before it is written, by the same program)

`merge_reference` is the plain-PyTorch meaning (and what runs on CPU tensors without Triton's interpreter).
"""
import torch
import triton
import triton.language as tl

from kernels.paged_attention import _interpreting


@triton.jit
def _merge_kernel(O1, L1, O2, L2, O, L, C, q_block,
                  s1_b, s1_k, s1_i, s1_h, t1_b, t1_k, t1_i, t1_h,
                  s2_b, s2_c, s2_h, t2_b, t2_h, t2_c,
                  so_b, so_c, so_h, to_b, to_h, to_c,
                  N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (cdiv(C, BLOCK_C), B * N_HEADS); one program merges BLOCK_C query rows of one (batch row, head)
    bh = tl.program_id(1)
    b, h = bh // N_HEADS, bh % N_HEADS
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] query rows
    ok = c < C
    blk, i = c // q_block, c % q_block
    d = tl.arange(0, HEAD_DIM)
    l1 = tl.load(L1 + b * t1_b + blk * t1_k + i * t1_i + h * t1_h, mask=ok, other=float("-inf")).to(tl.float32)
    l2 = tl.load(L2 + b * t2_b + h * t2_h + c * t2_c, mask=ok, other=float("-inf")).to(tl.float32)
    m = tl.maximum(l1, l2)
    seen = m > float("-inf")
    m = tl.where(seen, m, 0.0)  # rows that see nothing: both weights exp(-inf) = 0
    e1, e2 = tl.exp(l1 - m), tl.exp(l2 - m)
    total = e1 + e2
    inv = tl.where(seen, 1.0 / tl.where(seen, total, 1.0), 0.0)
    w1, w2 = e1 * inv, e2 * inv  # [BLOCK_C]
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    o1 = tl.load(O1 + (b * s1_b + blk * s1_k + i * s1_i + h * s1_h)[:, None] + d[None, :], mask=ok[:, None],
                 other=0.0).to(tl.float32)
    o2 = tl.load(O2 + (b * s2_b + c * s2_c + h * s2_h)[:, None] + d[None, :], mask=ok[:, None],
                 other=0.0).to(tl.float32)
    o = o1 * w1[:, None] + o2 * w2[:, None]
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


def merge_attention(o1, lse1, o2, lse2, out=None, dtype=torch.float32, blocks=None):
    """(o, lse) of two partial attentions over disjoint keys, merged by log-sum-exp (see the module docstring).
    o2 [B, C, H, D], lse2 [B, H, C] fp32. o1/lse1: [B, C, H, D] / [B, H, C] like them, or with blocks=(nb,
    q_block): o1 [B * nb, q_block, H, D] and lse1 [B * nb, H, q_block] (one history call per block of queries,
    C = nb * q_block). Returns o [B, C, H, D] in `dtype` (contiguous) and lse [B, H, C] fp32, or writes them into
    out = (o, lse) (which may be o1, lse1). Triton on CUDA tensors or under the interpreter, merge_reference
    otherwise."""
    B, C, H, D = o2.shape
    if blocks is not None:  # [B * nb, q_block, ...] -> the [B, C, H, D] / [B, H, C] views the reference takes
        nb, q_block = blocks
        if o1.shape != (B * nb, q_block, H, D) or lse1.shape != (B * nb, H, q_block) or nb * q_block != C:
            raise ValueError(f"merge_attention: blocks {blocks} do not fit o1 {tuple(o1.shape)}, lse1 "
                             f"{tuple(lse1.shape)}, o2 {tuple(o2.shape)}")
        s1 = (o1.stride(0) * nb, o1.stride(0), o1.stride(1), o1.stride(2))
        t1 = (lse1.stride(0) * nb, lse1.stride(0), lse1.stride(2), lse1.stride(1))
    else:
        q_block = C
        if o1.shape != o2.shape or lse1.shape != (B, H, C) or lse2.shape != (B, H, C):
            raise ValueError(f"merge_attention: o1 {tuple(o1.shape)}, lse1 {tuple(lse1.shape)}, o2 "
                             f"{tuple(o2.shape)}, lse2 {tuple(lse2.shape)} do not match")
        s1 = (o1.stride(0), 0, o1.stride(1), o1.stride(2))
        t1 = (lse1.stride(0), 0, lse1.stride(2), lse1.stride(1))
    usable = (o1.stride(-1) == 1 and o2.stride(-1) == 1 and D & (D - 1) == 0 and D >= 16
              and (o2.is_cuda or (_interpreting() and o2.device.type == "cpu")))
    if not usable:
        if blocks is not None:
            o1 = o1.reshape(B, nb * q_block, H, D)
            lse1 = lse1.reshape(B, nb, H, q_block).transpose(1, 2).reshape(B, H, C)
        return merge_reference(o1, lse1, o2, lse2, out=out, dtype=dtype)
    if out is None:
        out = (torch.empty(o2.shape, dtype=dtype, device=o2.device),
               torch.empty(B, H, C, dtype=torch.float32, device=o2.device))
    o, lse = out
    if o.stride(-1) != 1:
        raise ValueError("merge_attention: out's o must have a unit stride in its last dimension")
    BLOCK_C = 64 if D <= 64 else 32
    grid = (triton.cdiv(C, BLOCK_C), B * H)
    _merge_kernel[grid](o1, lse1, o2, lse2, o, lse, C, q_block, *s1, *t1,
                        o2.stride(0), o2.stride(1), o2.stride(2), lse2.stride(0), lse2.stride(1), lse2.stride(2),
                        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                        N_HEADS=H, HEAD_DIM=D, BLOCK_C=BLOCK_C, num_warps=4)
    return out
