"""Gather + fused SDPA: attention over a part's pages by copying them into contiguous K/V and computing through
PyTorch's fused attention ops (cuDNN or FlashAttention on CUDA, the CPU flash kernel on CPUs). Issue #18: measured
against the Triton paged kernels (bench.py kernel --kernels triton,sdpa), it runs at cuDNN's pace after a long
history, and train.py / bench.py step take it for large enough chunks on CUDA (attention.kernel_name).

The kernel interface is attention.py's (forward(q, part, scale, out, merge) -> (o, lse); backward(do, q, lse,
delta, part, scale, dq) -> dq, dK/dV added into part.dk_pages/dv_pages). The queries at positions q_start..
q_start+C-1 see the table's positions p < kv_len with p <= q_start + i (bottom-right causal). That splits into two
fused calls, merged by log-sum-exp (kernels/lse_merge.py, one fused kernel on CUDA):

    history   keys 0..Nh-1, Nh = min(q_start, kv_len), visible to every query: no mask.
    diagonal  the chunk's own keys q_start..q_start+C-1 (present when kv_len = q_start + C): a square C x C call
              with top-left causal masking (square: top-left = bottom-right).

Dense parts (a 2-D table [B, n]) gather each call's keys once for all kv heads. Sparse parts (sparse_attn.py: a
table per (batch row, kv head, block of q_block queries) [B, Hkv, nb, n], the block's selected history pages, then
the chunk's own, the same in every block) run the history call with every block of queries as its own batch entry,
q [B * nb, H, q_block, D] over that block's gathered history [B * nb, Hkv, Nh, D] (each kv head its own pages),
and the diagonal as in the dense case (the own pages are every block's last columns). Blocks may select the same
page: their dK/dV then add up through index_put_(accumulate=True), which on CUDA sorts the rows and sums each
row's contributions in a fixed order (deterministic, unlike index_add_'s atomics), into fp32 gradient pages; with
bf16 gradient pages and several blocks the part goes to the fallback (the sum would round once per block).

GQA (H = Hkv * G query heads): the ops take K/V with their Hkv heads as they are and return dK/dV per kv head,
summed over the group (cuDNN, flash and the CPU op alike). An earlier form folded the G query heads into the query
length and repeated the diagonal's K/V: slower on the H200 at every point (bench/RESULTS.md, fifteenth session).

K/V are gathered by one index_select of the flat page rows into [B', n, Hkv, D] (q.dtype) viewed as [B', Hkv, n,
D] (the [B, S, H, D] memory layout the fused ops take).

Backward: each call's gradients with the ops' own backward functions, given the FINAL (merged) lse and the merged
output (attend passes it as o; without it, one rebuilt from delta, see _out_for_delta): then P = exp(S - lse_final)
is exactly this call's share of the whole softmax and dS = P * (dP - delta_final), so the partial dq, dK, dV add up
to the exact gradients, the same identity the Triton kernels and the reference use for several parts. dK/dV are
added into the pages through the rows they were gathered from (in fp32; bf16 pages: the fp32 sum rounded once, as
the reference does).

Ops (torch >= 2.5; checked on 2.13 CPU, the GPU machines run 2.11):
    CPU    aten::_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, *, attn_mask, scale)
               -> (out, logsumexp [B, H, L] fp32, natural log)
           aten::_scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, logsumexp,
               dropout_p, is_causal, *, attn_mask, scale) -> (dq, dk, dv)
    cudnn  aten::_scaled_dot_product_cudnn_attention(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal,
               return_debug_mask, *, scale) -> (out, logsumexp [B, H, L, 1] fp32 natural log, cum_seq_q, cum_seq_k,
               max_q, max_k, philox_seed, philox_offset, debug_attn_mask)
           aten::_scaled_dot_product_cudnn_attention_backward(grad_out, q, k, v, out, logsumexp, philox_seed,
               philox_offset, attn_bias, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale)
    flash  aten::_scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale)
               -> (out, logsumexp [B, H, L] fp32 natural log, cum_seq_q, cum_seq_k, max_q, max_k, rng_state,
               unused, debug_attn_mask)
           aten::_scaled_dot_product_flash_attention_backward(grad_out, q, k, v, out, logsumexp, cum_seq_q,
               cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *, scale)
All take q/k/v as [B, H, L, D] (any strides with the last one 1) and dropout 0; without dropout the backward
functions do not read the philox tensors, and cum_seq_* are None (undefined) for dense batches, as the forward
ops return them. The CUDA ops take bf16/fp16 only.

Not supported (NotImplementedError, or handed to `fallback` if one is given, e.g. TritonKernel()): packed-document
masks (doc_start), sparse tables whose blocks do not tile the chunk (C not a multiple of q_block, with several
blocks) or with bf16 gradient pages and several blocks, and parts whose table ends partway into the chunk's own
positions (q_start < kv_len < q_start + C; no store makes them). Offloaded parts (history-only parts with kv_len
<= q_start, then the part holding the chunk) are ordinary parts and supported.
"""
import math
from typing import NamedTuple

import torch

from kernels.lse_merge import merge_attention

ATEN = torch.ops.aten


class Keys(NamedTuple):
    """Where one fused call's keys sit in the pages: idx, row indices into the pages viewed as [rows, Hkv, D]
    (per_head False: idx [B', n], every kv head the same positions) or as [rows * Hkv, D] (per_head True: idx
    [B', n, Hkv], each kv head its own pages: sparse tables). B' is the call's batch (B, or B * blocks).
    duplicates: a row may occur more than once (blocks selecting the same page)."""
    idx: torch.Tensor
    per_head: bool
    duplicates: bool = False


def _positions(table, first, length, page_size):
    """Flat rows of positions first..first+length-1 of a table [..., n] of pages: [..., length] int64."""
    pos = torch.arange(first, first + length, device=table.device)
    return table.long()[..., pos // page_size] * page_size + pos % page_size


def dense_keys(table, first, length, page_size):
    """Positions first..first+length-1 of a 2-D table [B, n]."""
    return Keys(_positions(table, first, length, page_size), per_head=False)


def sparse_history_keys(table, length, page_size, n_kv_heads):
    """Positions 0..length-1 of every (batch row, kv head, block)'s table [B, Hkv, nb, n] as per-head rows
    [B * nb, length, Hkv] (row * Hkv + kv head in pages viewed as [rows * Hkv, D])."""
    B, Hkv, nb, _ = table.shape
    rows = _positions(table, 0, length, page_size)  # [B, Hkv, nb, length]
    heads = torch.arange(n_kv_heads, device=table.device).view(1, Hkv, 1, 1)
    idx = (rows * n_kv_heads + heads).permute(0, 2, 3, 1).reshape(B * nb, length, Hkv)
    return Keys(idx, per_head=True, duplicates=nb > 1)


def _gather(pages, keys, dtype):
    """pages [num_pages, page_size, Hkv, D] at `keys` -> [B', Hkv, n, D] in dtype (a transposed view of one
    contiguous [B', n, Hkv, D] index_select: the [B, S, H, D] layout the fused ops read without a copy)."""
    Hkv, D = pages.shape[2], pages.shape[3]
    flat = pages.view(-1, D) if keys.per_head else pages.view(-1, Hkv, D)
    kv = flat.index_select(0, keys.idx.flatten())
    return kv.view(keys.idx.shape[0], keys.idx.shape[1], Hkv, D).to(dtype).transpose(1, 2)


def _add_rows(pages, keys, grad):
    """pages[keys] += grad [B', Hkv, n, D] (q.dtype), summed in fp32: fp32 pages by index_add_ (rows distinct: each
    element gets one add) or index_put_(accumulate=True) (duplicates: sorted, each row's adds in a fixed order);
    bf16 pages (rows distinct) read, added in fp32 and rounded once, as the reference does."""
    Hkv, D = pages.shape[2], pages.shape[3]
    flat = pages.view(-1, D) if keys.per_head else pages.view(-1, Hkv, D)
    rows = keys.idx.flatten()
    grad = grad.transpose(1, 2)  # [B', n, Hkv, D]
    if pages.dtype == torch.float32:
        grad32 = torch.empty(grad.shape, dtype=torch.float32, device=grad.device).copy_(grad)  # one copy
        grad32 = grad32.view(-1, *flat.shape[1:])
        if keys.duplicates:
            flat.index_put_((rows,), grad32, accumulate=True)
        else:
            flat.index_add_(0, rows, grad32)
    else:
        assert not keys.duplicates, "bf16 gradient pages with duplicate rows go to the fallback (_plan)"
        summed = flat.index_select(0, rows).float().add_(grad.reshape(-1, *flat.shape[1:]))
        flat.index_copy_(0, rows, summed.to(pages.dtype))


def _out_for_delta(do, delta):
    """An output O' [B, C, H, D] (do.dtype) with rowsum(dO * O') = delta: O' = dO * delta / |dO|^2 per row (0 where
    dO = 0, whose delta is 0). The fused backward ops read `out` only to form delta = rowsum(dO * out) themselves;
    a caller that hands delta without the merged output (the kernel interface's o=None) gets this passed as `out`.
    In fp32 exact to rounding; in bf16 O' is rounded, so the ops' delta differs from the given one by ~2^-9 relative
    (the size of the rounding of the bf16 merged output that delta came from)."""
    d = do.float()
    n2 = d.square().sum(-1)  # [B, C, H]
    c = torch.where(n2 > 0, delta.transpose(1, 2) / n2.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return (d * c[..., None]).to(do.dtype)


# ------------------------------------------------------------------------------------------------ the fused ops


def _sdpa_forward(backend, q, k, v, causal, scale):
    """One fused call: q [B, H, L, D], k, v [B, H or Hkv, S, D] -> (o [B, H, L, D], lse [B, H, L] fp32 natural
    log)."""
    B, H, L, _ = q.shape
    if backend == "cpu":
        o, lse = ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif backend == "cudnn":
        o, lse = ATEN._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    elif backend == "flash":
        o, lse = ATEN._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        raise ValueError(f"unknown backend {backend!r}")
    # cuDNN: [B, H, L, 1]; slicing guards a padded lse; the CPU op's may be laid out [B, L, H]: made contiguous, as
    # the interface's lse is (a cross-rank all_reduce pairs elements in memory order)
    return o, lse.reshape(B, H, -1)[..., :L].contiguous()


def _sdpa_backward(backend, do, q, k, v, o, lse, causal, scale):
    """The fused call's backward: do, q, o [B, H, L, D], k, v [B, H or Hkv, S, D], lse [B, H, L] fp32 (natural
    log) -> (dq, dk, dv) in q.dtype, dk and dv with k's heads."""
    L, S = q.shape[2], k.shape[2]
    lse = lse.float().contiguous()
    if backend == "cpu":
        return ATEN._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, causal,
                                                                         scale=scale)
    seed = torch.empty((), dtype=torch.long, device=q.device)  # philox state: unused without dropout
    offset = torch.empty((), dtype=torch.long, device=q.device)
    if backend == "cudnn":
        return ATEN._scaled_dot_product_cudnn_attention_backward(do, q, k, v, o, lse.unsqueeze(-1), seed, offset,
                                                                 None, None, None, L, S, 0.0, causal, scale=scale)
    if backend == "flash":
        return ATEN._scaled_dot_product_flash_attention_backward(do, q, k, v, o, lse, None, None, L, S, 0.0, causal,
                                                                 seed, offset, scale=scale)
    raise ValueError(f"unknown backend {backend!r}")


OPS = {"cpu": ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"),
       "cudnn": ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
       "flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")}


class _Plan(NamedTuple):
    """How SDPAKernel computes a part: `history` keys 0..history-1 of each block's table, visible to all of its
    queries; `own` keys (0 or C) for the chunk itself, causal; the chunk's C queries in `blocks` blocks of
    `q_block` (1 block of C for a dense table)."""
    history: int
    own: int
    blocks: int
    q_block: int


def _blocked(t, plan):
    """[B, C, H, ...] (contiguous) -> [B * nb, H, q_block, ...]: each block of queries its own batch entry (a
    view)."""
    B, C = t.shape[:2]
    return t.view(B * plan.blocks, plan.q_block, *t.shape[2:]).transpose(1, 2)


def _chunk_view(t, plan, B):
    """[B * nb, H, q_block, D] (a call's o or dq) -> the [B, nb, q_block, H, D] view whose elements are those of
    [B, C, H, D]: written through dst.view(B, nb, q_block, H, D)."""
    return t.view(B, plan.blocks, t.shape[1], plan.q_block, t.shape[3]).transpose(2, 3)


class SDPAKernel:
    """Gather + fused SDPA over dense and sparse parts (see the module docstring). backend: "cpu", "cudnn" or
    "flash"; None picks "cpu" for CPU tensors and "cudnn" for CUDA ones (what F.scaled_dot_product_attention uses
    for bf16 on an H100/H200). fallback: a kernel for the parts this one does not take (document masks, sparse
    tables it cannot batch); None raises NotImplementedError on them. fp32 tensors on CUDA go to the fallback, or
    raise NotImplementedError without one (the CUDA ops take bf16/fp16)."""

    def __init__(self, backend=None, fallback=None):
        if backend is not None and backend not in OPS:
            raise ValueError(f"SDPAKernel: backend must be one of {', '.join(OPS)}, got {backend!r}")
        missing = [name for name in OPS.get(backend, ()) if not hasattr(ATEN, name)]  # an older torch
        if missing:
            raise NotImplementedError(f"SDPAKernel({backend!r}): torch {torch.__version__} lacks {missing}")
        self.backend, self.fallback = backend, fallback

    def _backend(self, q):
        backend = self.backend or ("cpu" if q.device.type == "cpu" else "cudnn")
        if (backend == "cpu") != (q.device.type == "cpu"):
            raise NotImplementedError(f"SDPAKernel: backend {backend!r} on {q.device.type} tensors")
        if backend != "cpu" and q.dtype not in (torch.bfloat16, torch.float16):
            raise NotImplementedError(f"SDPAKernel: the {backend} op takes bf16/fp16 only, got {q.dtype}")
        return backend

    def _plan(self, q, part):
        """The part's _Plan, or None if it is not one this kernel takes (with a fallback, fp32 CUDA tensors are not
        taken either: the ops refuse them)."""
        if part.doc_start is not None:
            return None
        if self.fallback is not None and q.device.type != "cpu" and q.dtype not in (torch.bfloat16, torch.float16):
            return None
        C = q.shape[1]
        kv_len = part.q_start + C if part.kv_len is None else min(part.kv_len, part.q_start + C)
        history, own = min(part.q_start, kv_len), max(kv_len - part.q_start, 0)
        if own not in (0, C):
            return None
        if part.table.dim() == 2:
            return _Plan(history, own, 1, C)
        blocks = part.table.shape[2]
        if blocks == 1:
            return _Plan(history, own, 1, C)
        if C % part.q_block or C // part.q_block != blocks:
            return None  # a partial last block: the blocks do not tile the chunk
        if part.dk_pages is not None and part.dk_pages.dtype != torch.float32:
            return None  # blocks may share pages: their bf16 sum would round once per block
        return _Plan(history, own, blocks, part.q_block)

    def _keys(self, part, plan):
        """(history Keys or None, own Keys or None) of a part."""
        page_size, Hkv = part.k_pages.shape[1], part.k_pages.shape[2]
        table = part.table
        if table.dim() == 2:
            hist = dense_keys(table, 0, plan.history, page_size) if plan.history else None
            own = dense_keys(table, plan.history, plan.own, page_size) if plan.own else None
            return hist, own
        hist = sparse_history_keys(table, plan.history, page_size, Hkv) if plan.history else None
        # the own pages: every (kv head, block)'s last columns alike
        own = dense_keys(table[:, 0, 0], plan.history, plan.own, page_size) if plan.own else None
        return hist, own

    def _unsupported(self, part, what):
        if self.fallback is None:
            raise NotImplementedError(
                f"SDPAKernel takes parts without doc_start whose blocks tile the chunk (bf16 gradient pages: one "
                f"block) and kv_len <= q_start or = q_start + C; got q_block={part.q_block}, table "
                f"{tuple(part.table.shape)}, doc_start {'set' if part.doc_start is not None else 'None'}, q_start "
                f"{part.q_start}, kv_len {part.kv_len} ({what}); pass fallback=TritonKernel() to hand such parts over")

    def forward(self, q, part, scale=None, out=None, merge=False):
        plan = self._plan(q, part)
        if plan is None:
            self._unsupported(part, "forward")
            return self.fallback.forward(q, part, scale, out=out, merge=merge)
        backend = self._backend(q)
        B, C, H, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        hist, own = self._keys(part, plan)
        q = q.contiguous()
        oh = lh = od = ld = None  # the calls' o [B', H, L, D] (q.dtype), lse [B', H, L] fp32
        if hist is not None:  # every block's queries see all of its history: one unmasked call
            kh, vh = (_gather(pages, hist, q.dtype) for pages in (part.k_pages, part.v_pages))  # [B*nb, Hkv, Nh, D]
            oh, lh = _sdpa_forward(backend, _blocked(q, plan), kh, vh, False, scale)
        if own is not None:  # the chunk's own C keys: a square top-left causal call
            kd, vd = (_gather(pages, own, q.dtype) for pages in (part.k_pages, part.v_pages))  # [B, Hkv, C, D]
            od, ld = _sdpa_forward(backend, q.transpose(1, 2), kd, vd, True, scale)
        into = out if out is not None and not merge else None  # write straight into out
        dtype = q.dtype if out is None else torch.float32
        if oh is not None and od is not None:
            blocks = (plan.blocks, plan.q_block) if plan.blocks > 1 else None
            o, lse = merge_attention(oh.transpose(1, 2), lh, od.transpose(1, 2), ld, out=into, dtype=dtype,
                                     blocks=blocks)
        else:
            if oh is not None:
                o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
                o.view(B, plan.blocks, plan.q_block, H, D).copy_(_chunk_view(oh, plan, B))
                lse = lh.view(B, plan.blocks, H, plan.q_block).transpose(1, 2).reshape(B, H, C)
            elif od is not None:
                o, lse = od.transpose(1, 2), ld
            else:  # a part of no keys
                o = torch.zeros(q.shape, dtype=dtype, device=q.device)
                lse = torch.full((B, H, C), float("-inf"), dtype=torch.float32, device=q.device)
            if into is not None:
                into[0].copy_(o)
                into[1].copy_(lse)
                o, lse = into
        if out is None:
            return o.to(q.dtype).contiguous(), lse.contiguous()
        if merge:
            merge_attention(out[0], out[1], o, lse, out=out)
        return out

    def backward(self, do, q, lse, delta, part, scale=None, dq=None, o=None):
        plan = self._plan(q, part)
        if plan is None:
            self._unsupported(part, "backward")
            return self.fallback.backward(do, q, lse, delta, part, scale, dq=dq, o=o)
        backend = self._backend(q)
        B, C, H, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        hist, own = self._keys(part, plan)
        q, do = q.contiguous(), do.to(q.dtype).contiguous()
        # `out` for the ops, which form delta = rowsum(dO * out) themselves: the merged output (attend passes it),
        # or one rebuilt from delta (_out_for_delta); with the merged lse, each call's P is its share of the whole
        # softmax and dS = P * (dP - delta) its exact share of dS
        o = _out_for_delta(do, delta) if o is None else o.to(q.dtype).contiguous()
        lse = lse.float().contiguous()
        dq_parts = []  # (this call's dq [B*nb, H, q_block, D], its plan)
        if hist is not None:
            lse_b = lse if plan.blocks == 1 else lse.view(B, H, plan.blocks, plan.q_block).transpose(1, 2).reshape(
                B * plan.blocks, H, plan.q_block)
            kh, vh = (_gather(pages, hist, q.dtype) for pages in (part.k_pages, part.v_pages))
            gq, gk, gv = _sdpa_backward(backend, _blocked(do, plan), _blocked(q, plan), kh, vh, _blocked(o, plan),
                                        lse_b, False, scale)
            dq_parts.append((gq, plan))
            _add_rows(part.dk_pages, hist, gk)  # [B*nb, Hkv, Nh, D]
            _add_rows(part.dv_pages, hist, gv)
        if own is not None:
            kd, vd = (_gather(pages, own, q.dtype) for pages in (part.k_pages, part.v_pages))
            gq, gk, gv = _sdpa_backward(backend, do.transpose(1, 2), q.transpose(1, 2), kd, vd, o.transpose(1, 2),
                                        lse, True, scale)
            dq_parts.append((gq, _Plan(0, C, 1, C)))
            _add_rows(part.dk_pages, own, gk)  # [B, Hkv, C, D]
            _add_rows(part.dv_pages, own, gv)
        # dq: added into the caller's fp32 dq, or the calls' sum in fp32 rounded once (one call: its own dq)
        acc = dq
        if acc is None:
            dtype = q.dtype if len(dq_parts) == 1 else torch.float32
            acc = (torch.empty if dq_parts else torch.zeros)(q.shape, dtype=dtype, device=q.device)
            for j, (g, p) in enumerate(dq_parts):
                dst = acc.view(B, p.blocks, p.q_block, H, D)
                if j == 0:
                    dst.copy_(_chunk_view(g, p, B))
                else:
                    dst.add_(_chunk_view(g, p, B))
            return acc.to(q.dtype)
        for g, p in dq_parts:
            acc.view(B, p.blocks, p.q_block, H, D).add_(_chunk_view(g, p, B))
        return acc
