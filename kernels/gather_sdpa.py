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

Dense parts (a 2-D table [B, n]) gather each call's keys for all kv heads alike. Sparse parts of one block of
queries per chunk (sparse_attn.py with q_block >= the chunk, as the offloaded plan chooses: a table per (batch row,
kv head) [B, Hkv, 1, n], the selected history pages, then the chunk's own) gather each kv head's history from its
own pages; the own pages are every kv head's last columns. Sparse parts of several blocks (the in-GPU store's
default, 128-query blocks) split the same way, but their history call goes to the fallback kernel (Triton reads
each block's pages in place) and only the diagonal to the fused op: run with every block as its own batch entry
of a fused history call, the 7B's sparse 128K step was slower than Triton's (19.15 s against 18.81 s,
bench/RESULTS.md, fifteenth session): each block gathers its own 4096 tokens, twice the sequence per chunk, 1.6 s
of gathers a step. The diagonal is half of that step's attention FLOPs and needs no gather per block.

GQA (H = Hkv * G query heads): the ops take K/V with their Hkv heads as they are and return dK/dV per kv head,
summed over the group (cuDNN, flash and the CPU op alike). An earlier form folded the G query heads into the query
length and repeated the diagonal's K/V: slower on the H200 at every point (bench/RESULTS.md, fifteenth session).
cuDNN's own group sum costs some accuracy: its dK/dV lie 1.23x as far from fp32 as the fold's (dq and o alike),
and the chunked step's bf16 error ratio averages 1.014 over three seeds against 1.000 with the history's backward
folded (the diagonal's K/V repeated). A folded backward after short histories was slow (2 kv heads' key tiles do
not fill the GPU), and repeated K/V there were no more exact than cuDNN's sum (bench/RESULTS.md, sixteenth
session), so the backward stays native.

K/V are gathered into [B, n, Hkv, D] (q.dtype) viewed as [B, Hkv, n, D] (the [B, S, H, D] memory layout the fused
ops take), and their gradients added back into the pages, by kernels/page_copy.py (one Triton launch each).

Backward: each call's gradients with the ops' own backward functions, given the FINAL (merged) lse and the merged
output (attend passes it as o; without it, one rebuilt from delta, see _out_for_delta): then P = exp(S - lse_final)
is exactly this call's share of the whole softmax and dS = P * (dP - delta_final), so the partial dq, dK, dV add up
to the exact gradients, the same identity the Triton kernels and the reference use for several parts. dK/dV are
added into the pages where they were gathered from (in fp32; bf16 pages: the fp32 sum rounded once, as the
reference does).

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
masks (doc_start), and parts whose table ends partway into the chunk's own positions (q_start < kv_len < q_start +
C; no store makes them). Sparse parts of several query blocks need a fallback for their history. Offloaded parts
(history-only parts with kv_len <= q_start, then the part holding the chunk) are ordinary parts and supported.
"""
import math
from typing import NamedTuple, Optional

import torch

from kernels.lse_merge import merge_attention
from kernels.page_copy import add_rows, gather_rows
from kernels.paged_attention import softmax_delta

ATEN = torch.ops.aten


class Span(NamedTuple):
    """The keys of one fused call: positions first..first+n-1 of `table`, [B, n_pages] (dense: all kv heads
    alike) or [B, Hkv, n_pages] (sparse: each kv head its own pages)."""
    table: torch.Tensor
    first: int
    n: int


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
    """How SDPAKernel computes a part: `history` keys 0..history-1 of the table, visible to every query (no mask),
    and `own` keys (0 or C), the chunk itself (causal). history_part: the part restricted to its history, for the
    fallback kernel (sparse tables of several query blocks), or None: the history goes to the fused op too."""
    history: int
    own: int
    history_part: Optional[tuple] = None  # an attention.Part


class SDPAKernel:
    """Gather + fused SDPA over dense parts and sparse ones (see the module docstring). backend: "cpu", "cudnn" or
    "flash"; None picks "cpu" for CPU tensors and "cudnn" for CUDA ones (what F.scaled_dot_product_attention uses
    for bf16 on an H100/H200). fallback: a kernel for the parts this one does not take (document masks) and for
    the history of sparse tables of several query blocks; None raises NotImplementedError on them. fp32 tensors on
    CUDA go to the fallback, or raise NotImplementedError without one (the CUDA ops take bf16/fp16).
    needs_delta = False: attend may pass delta=None (the fused backward forms rowsum(dO * O) itself from the o it
    is given); it is computed here for the parts handed to the fallback."""
    needs_delta = False

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
        taken either: the ops refuse them; without one, no sparse table of several query blocks)."""
        blocks = part.table.dim() == 4 and part.table.shape[2] != 1
        if part.doc_start is not None or (blocks and self.fallback is None):
            return None
        if self.fallback is not None and q.device.type != "cpu" and q.dtype not in (torch.bfloat16, torch.float16):
            return None
        C = q.shape[1]
        kv_len = part.q_start + C if part.kv_len is None else min(part.kv_len, part.q_start + C)
        history, own = min(part.q_start, kv_len), max(kv_len - part.q_start, 0)
        if own not in (0, C):
            return None
        if blocks and history:  # each block's selected pages: positions 0..history-1 of its table
            return _Plan(history, own, part._replace(kv_len=history, holds_chunk=False))
        return _Plan(history, own)

    @staticmethod
    def _spans(part, plan):
        """(history Span or None, own Span or None): a sparse table's history is per kv head; its own pages are
        every kv head's last columns alike. No history Span where the fallback computes the history."""
        table = part.table
        dense = table if table.dim() == 2 else table[:, 0, 0]  # [B, n_pages]
        history = table if table.dim() == 2 else table[:, :, 0]  # [B, n_pages] or [B, Hkv, n_pages]
        return (Span(history, 0, plan.history) if plan.history and plan.history_part is None else None,
                Span(dense, plan.history, plan.own) if plan.own else None)

    def _unsupported(self, part, what):
        if self.fallback is None:
            raise NotImplementedError(
                f"SDPAKernel takes parts without doc_start, and kv_len <= q_start or = q_start + C, sparse ones of "
                f"several query blocks only with a fallback for their history; got q_block={part.q_block}, table "
                f"{tuple(part.table.shape)}, doc_start {'set' if part.doc_start is not None else 'None'}, q_start "
                f"{part.q_start}, kv_len {part.kv_len} ({what}); pass fallback=TritonKernel() to hand such parts "
                f"over")

    def forward(self, q, part, scale=None, out=None, merge=False):
        plan = self._plan(q, part)
        if plan is None:
            self._unsupported(part, "forward")
            return self.fallback.forward(q, part, scale, out=out, merge=merge)
        backend = self._backend(q)
        B, C, H, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        calls = []  # (o [B, C, H, D] view, lse [B, H, C]) of the history call, then the diagonal's
        if plan.history_part is not None:  # several query blocks: each block's history pages read in place
            calls.append(self.fallback.forward(q, plan.history_part, scale))
        for span, causal in zip(self._spans(part, plan), (False, True)):
            if span is not None:  # the history: all visible, no mask; the chunk's own C keys: square, causal
                k, v = (gather_rows(pages, *span, q.dtype) for pages in (part.k_pages, part.v_pages))  # [B,Hkv,n,D]
                o, lse = _sdpa_forward(backend, q.transpose(1, 2), k, v, causal, scale)
                calls.append((o.transpose(1, 2), lse))
        into = out if out is not None and not merge else None  # write straight into out
        if len(calls) == 2:
            o, lse = merge_attention(*calls[0], *calls[1], out=into, dtype=q.dtype if out is None else torch.float32)
        else:
            if calls:
                o, lse = calls[0]
            else:  # a part of no keys
                o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
                lse = torch.full((B, H, C), float("-inf"), dtype=torch.float32, device=q.device)
            if into is not None:
                into[0].copy_(o)
                into[1].copy_(lse)
                o, lse = into
        if out is None:
            return o.contiguous(), lse
        if merge:
            merge_attention(out[0], out[1], o, lse, out=out)
        return out

    def backward(self, do, q, lse, delta, part, scale=None, dq=None, o=None):
        plan = self._plan(q, part)
        if plan is None:
            self._unsupported(part, "backward")
            if delta is None:  # attend skipped it (needs_delta): the fallback's kernels read it
                delta = softmax_delta(do.to(q.dtype), o.to(q.dtype))
            return self.fallback.backward(do, q, lse, delta, part, scale, dq=dq, o=o)
        backend = self._backend(q)
        B, C, H, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        q, do = q.contiguous(), do.to(q.dtype).contiguous()
        # `out` for the ops, which form delta = rowsum(dO * out) themselves: the merged output (attend passes it),
        # or one rebuilt from delta (_out_for_delta); with the merged lse, each call's P is its share of the whole
        # softmax and dS = P * (dP - delta) its exact share of dS
        o = _out_for_delta(do, delta) if o is None else o.to(q.dtype).contiguous()
        lse = lse.float().contiguous()
        qt, dot, ot = q.transpose(1, 2), do.transpose(1, 2), o.transpose(1, 2)  # [B, H, C, D] views
        grads = []  # each call's dq [B, C, H, D] (a view, q.dtype)
        if plan.history_part is not None:  # the fallback reads delta; dq: into the caller's fp32 sum, or its own
            delta = softmax_delta(do, o) if delta is None else delta
            g = self.fallback.backward(do, q, lse, delta, plan.history_part, scale, dq=dq, o=o)
            if dq is None:
                grads.append(g)
        for span, causal in zip(self._spans(part, plan), (False, True)):
            if span is not None:
                k, v = (gather_rows(pages, *span, q.dtype) for pages in (part.k_pages, part.v_pages))
                gq, gk, gv = _sdpa_backward(backend, dot, qt, k, v, ot, lse, causal, scale)
                grads.append(gq.transpose(1, 2))
                add_rows(part.dk_pages, *span[:2], gk)  # [B, Hkv, n, D] into the pages, summed in fp32
                add_rows(part.dv_pages, *span[:2], gv)
        if dq is not None:  # the caller's fp32 sum over parts
            for g in grads:
                dq.add_(g)
            return dq
        if not grads:
            return torch.zeros_like(q)
        # one call: its dq; two: their sum (an elementwise op on bf16 inputs computes in fp32 and rounds once)
        return grads[0].contiguous() if len(grads) == 1 else torch.add(*grads, out=torch.empty_like(q))
