"""
The one seam between the KV stores and the attention kernels: attention of a chunk's queries over stored history.

A store (PagedKVStore in paged_kv.py, OffloadedKVStore in offload.py) answers one question per (layer, chunk):
which parts of the history does this chunk read, and where do their gradients go. Its answer is a history: an
object whose parts(q, k, v, backward) yields `Part` records, each a set of K/V pages, the gradient pages its
dK/dV are added into, and the page table through which the kernels see them (and whose chunk_kv_in_pages says
whether the pages hold the chunk's own K/V already; if not, the backward keeps k, v to pass them to parts again):

    in-GPU pages (PagedKVStore)    one part: the pool, the layer's table [B, n] (positions 0..start + C)
    sparse (sparse=...)            one part with a table per (batch row, kv head, query block) [B, Hkv, nb, n]
    offloaded (OffloadedKVStore)   buffer-sized parts streamed through GPU buffers, yielded as each one is loaded;
                                   the store writes a part's gradients back when the next one is asked for

`attend` runs a kernel's forward over the parts, merging their outputs by log-sum-exp; its backward walks the parts
again with the merged lse and delta = rowsum(dO * O), accumulating dq and adding every part's dK/dV into its
gradient pages, and returns the chunk's own dk/dv: what later chunks accumulated for its pages plus its own share,
read from the part that holds the chunk (the last one). One autograd Function for every store, and the kernel is a
value: swapping it (a new kernel, the reference for tests or CPUs) touches this file only.

A kernel is an object with
    forward(q, part, scale, out=None, merge=False) -> (o, lse)
        o [B, C, H, D], lse [B, H, C] fp32 (natural log); out=(o fp32, lse): write there, and with merge=True
        combine with what they hold (the earlier parts) by log-sum-exp
    backward(do, q, lse, delta, part, scale, dq=None, o=None) -> dq
        adds this part's dK/dV into part.dk_pages/dv_pages; dq: an fp32 tensor to accumulate into (+=) or None;
        o: the whole (merged) output delta = rowsum(dO * o) came from, for kernels that form delta themselves
        (those with needs_delta = False get delta=None from attend)
`TritonKernel` (kernels/paged_attention.py) and `ReferenceKernel` (plain fp32 PyTorch over the same pages,
kernels/paged_reference.py); default_kernel picks Triton for CUDA tensors or under TRITON_INTERPRET=1, the
reference for CPU tensors otherwise (the chunked step on a laptop). `SDPAKernel` (kernels/gather_sdpa.py, issue
#18): each dense part's pages gathered into contiguous K/V and computed by PyTorch's fused attention ops (cuDNN /
FlashAttention on CUDA, the CPU flash op on CPUs), measured against Triton with bench.py kernel --kernels
triton,sdpa: the default for large enough chunks on CUDA, where it won (kernel_name's "auto", train.py and bench.py
step --attn-kernel), with Triton for the parts it does not take (document masks, the history of sparse tables of
several query blocks).
"""
from typing import Callable, NamedTuple, Optional

import torch

from kernels.gather_sdpa import SDPAKernel
from kernels.lse_merge import merge_reference
from kernels.paged_attention import _interpreting, paged_attention_forward, softmax_delta
from kernels.paged_attention_backward import paged_attention_backward
from kernels.page_copy import gather_rows
from kernels.paged_reference import paged_attention_reference, paged_attention_reference_backward

# SDPAKernel: re-exported from kernels/gather_sdpa.py, next to the other kernels
__all__ = ["Part", "OnePart", "TritonKernel", "ReferenceKernel", "SDPAKernel", "default_kernel", "kernel_name",
           "named_kernel", "delta_for", "attention_forward", "attend"]


class Part(NamedTuple):
    """A part of a chunk's history as the kernels see it. Pages [num_pages, page_size, Hkv, D]; table [B, n] int32
    or [B, Hkv, cdiv(C, q_block), n] with q_block; the queries sit at (virtual) positions q_start.. of the table,
    which holds kv_len positions (None: q_start + C, the chunk's own K/V last). holds_chunk: the part ends with the
    chunk's own pages (positions q_start..q_start + C - 1, in every block's table alike); last: no part follows.
    doc_start (packed documents): int32 [B, C], or [B, Hkv, C] where kv heads' tables differ (sparse), each
    query's first visible position of this part's table (keys before it belong to earlier documents; a value
    past the part hides all of it from that query); None: no document mask (the kernels' plain path).
    history_index (sparse tables with history columns, for a backward): a function returning the dK/dV kernel's
    SelectionIndex of them (kernels/paged_attention_backward.py), which a store may build for several layers at
    once; None: the kernel builds it."""
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    dk_pages: Optional[torch.Tensor]  # None is fine without grad (stage 1)
    dv_pages: Optional[torch.Tensor]
    table: torch.Tensor
    q_start: int
    kv_len: Optional[int] = None
    q_block: Optional[int] = None
    holds_chunk: bool = True
    last: bool = True
    doc_start: Optional[torch.Tensor] = None
    history_index: Optional[Callable] = None  # sparse: () -> the SelectionIndex of the table's history columns


class OnePart:
    """A History of a single part whose pages already hold the chunk's own K/V (PagedKVStore)."""
    chunk_kv_in_pages = True  # the backward need not keep the chunk's k, v: they are in the pages

    def __init__(self, part: Part):
        self.part = part

    def parts(self, q, k, v, backward):
        return (self.part,)


class TritonKernel:
    """The Triton kernels (kernels/paged_attention.py), one launch (forward; dq + dK/dV backward) per part."""

    def forward(self, q, part, scale=None, out=None, merge=False):
        return paged_attention_forward(q, part.k_pages, part.v_pages, part.table, part.q_start, scale,
                                       kv_len=part.kv_len, out=out, merge=merge, q_block=part.q_block,
                                       doc_start=part.doc_start)

    def backward(self, do, q, lse, delta, part, scale=None, dq=None, o=None):  # o: not needed, delta is given
        return paged_attention_backward(do, q, None, lse, part.k_pages, part.v_pages, part.table, part.q_start,
                                        part.dk_pages, part.dv_pages, scale, kv_len=part.kv_len, delta=delta, dq=dq,
                                        q_block=part.q_block, doc_start=part.doc_start,
                                        selection=part.history_index() if part.history_index else None)


class ReferenceKernel:
    """Plain-PyTorch fp32 attention over the same pages (kernels/paged_reference.py): the kernels' meaning, and
    the kernel for CPU tensors without Triton's interpreter."""

    def forward(self, q, part, scale=None, out=None, merge=False):
        o, lse = paged_attention_reference(q, part.k_pages, part.v_pages, part.table, part.q_start, scale,
                                           return_lse=True, kv_len=part.kv_len, q_block=part.q_block,
                                           doc_start=part.doc_start)
        if out is None:
            return o.to(q.dtype), lse
        if merge:  # o = (o_old e^lse_old + o e^lse) / (e^lse_old + e^lse), in a numerically safe form
            return merge_reference(out[0], out[1], o, lse, out=out)
        out[0].copy_(o)
        out[1].copy_(lse)
        return out

    def backward(self, do, q, lse, delta, part, scale=None, dq=None, o=None):  # o: not needed, delta is given
        grad = paged_attention_reference_backward(do, q, lse, delta, part.k_pages, part.v_pages, part.table,
                                                  part.q_start, part.dk_pages, part.dv_pages, scale,
                                                  kv_len=part.kv_len, q_block=part.q_block,
                                                  doc_start=part.doc_start)
        return grad.to(q.dtype) if dq is None else dq.add_(grad)


def default_kernel(device):
    """Triton for CUDA tensors, and for CPU tensors when its interpreter is on (the tests of the kernels); else the
    plain-PyTorch reference (a CPU without the interpreter, which would raise)."""
    return TritonKernel() if torch.device(device).type == "cuda" or _interpreting() else ReferenceKernel()


ATTN_KERNELS = ("auto", "triton", "sdpa")  # train.py / bench.py step --attn-kernel


# --attn-kernel auto: sdpa when a chunk's batch x tokens x hidden size reaches this. Below it the step is host-bound
# and sdpa's extra host ops per call (gather, fold, merge) cost more than its faster GPU kernels save (H200, train.py:
# the small model, 4096-token chunks x hidden 512 = 2^21, ran 1.06 s a step through Triton, 1.21 s through sdpa);
# above it sdpa wins (the 0.5B, 16384 x 896 = 14.7M: 0.764 s against 0.842 s; the 7B, 8192 x 3584: 35 s against
# 52 s at 128K). bench/RESULTS.md, fourteenth session.
SDPA_AUTO_MIN_TOKENS_X_HIDDEN = 2**22


def kernel_name(name, device, tokens_x_hidden):
    """The concrete kernel `name` stands for: "auto" is sdpa on CUDA for chunks of batch x tokens x hidden >=
    SDPA_AUTO_MIN_TOKENS_X_HIDDEN, triton otherwise (and on CPUs: the reference or the interpreter, as the tests run
    them); "triton" and "sdpa" stand for themselves."""
    if name not in ATTN_KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(ATTN_KERNELS)}, got {name!r}")
    if name != "auto":
        return name
    big = tokens_x_hidden >= SDPA_AUTO_MIN_TOKENS_X_HIDDEN
    return "sdpa" if torch.device(device).type == "cuda" and big else "triton"


def named_kernel(name, device, tokens_x_hidden=0):
    """--attn-kernel's kernel: "triton", the default above; "sdpa", SDPAKernel (pages gathered, then cuDNN on
    CUDA) with the default kernel for the parts it does not take (document masks, the history of sparse tables of
    several query blocks, fp32 on CUDA); "auto", kernel_name's choice for the device and the chunk's batch x tokens
    x hidden size."""
    if kernel_name(name, device, tokens_x_hidden) == "triton":
        return default_kernel(device)
    return SDPAKernel(fallback=default_kernel(device))


def delta_for(kernel, do, o):
    """delta = rowsum(dO * O) [B, H, C] as the kernel's backward takes it: None for a kernel that forms it itself
    from the o it is given (needs_delta = False: SDPAKernel)."""
    return softmax_delta(do, o) if getattr(kernel, "needs_delta", True) else None


def attention_forward(history, q, k, v, kernel, scale=None, merge=None):
    """(o [B, C, H, D] q.dtype, lse [B, H, C] fp32) of q over every part of `history`, merged by log-sum-exp. A
    single part writes o directly; several merge in an fp32 o. Every part is consumed (a streaming store finishes
    its bookkeeping when asked for the next part). A history of no parts gives o = 0, lse = -inf (a rank that holds
    none of it). merge: the cross-rank merge (see attend), applied to the result."""
    o = lse = None
    for j, part in enumerate(history.parts(q, k, v, backward=False)):
        if j == 0 and part.last:
            o, lse = kernel.forward(q, part, scale)
            continue
        if j == 0:
            o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        kernel.forward(q, part, scale, out=(o, lse), merge=j > 0)
    if o is None:
        o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    if merge is not None:
        o, lse = merge.forward(o, lse)
    return o.to(q.dtype), lse


def _chunk_rows(pages, part, C, dtype):
    """The chunk's own rows [B, C, Hkv, D] of a part's pages in `dtype`: positions q_start.. of its table (every
    block's table ends with the same own pages): one gather launch (kernels/page_copy.py), then PyTorch's cast
    (Triton's interpreter would round toward zero)."""
    table = part.table if part.table.dim() == 2 else part.table[:, 0, 0]
    return gather_rows(pages, table, part.q_start, C, pages.dtype).transpose(1, 2).to(dtype)


class _Attention(torch.autograd.Function):
    """o = attention of q over the history's parts. k, v (the chunk's own K/V, [B, C, Hkv, D]) are inputs so that
    autograd routes their gradient; the pages are held by the history, by reference: the store must keep the K/V
    of every part unchanged until the backward has run."""

    @staticmethod
    def forward(ctx, q, k, v, history, kernel, scale, kept, merge):
        o, lse = kept if kept is not None else attention_forward(history, q, k, v, kernel, scale, merge)
        chunk_kv = () if history.chunk_kv_in_pages else (k, v)
        ctx.save_for_backward(q, o, lse, *chunk_kv)
        ctx.history, ctx.kernel, ctx.scale, ctx.merge = history, kernel, scale, merge
        ctx.kv_dtypes, ctx.kv_shape = (k.dtype, v.dtype), k.shape
        return o

    @staticmethod
    def backward(ctx, do):
        q, o, lse, *chunk_kv = ctx.saved_tensors
        k, v = chunk_kv or (None, None)
        do = do.to(q.dtype)
        delta = delta_for(ctx.kernel, do, o)  # [B, H, C], shared by every part
        dq = dk = dv = None
        for j, part in enumerate(ctx.history.parts(q, k, v, backward=True)):
            if j == 0 and not part.last:  # parts accumulate into an fp32 dq
                dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            dq = ctx.kernel.backward(do, q, lse, delta, part, ctx.scale, dq=dq, o=o)
            if part.holds_chunk:  # now holding what later chunks added for the chunk's pages + its own share
                dk = _chunk_rows(part.dk_pages, part, q.shape[1], ctx.kv_dtypes[0])
                dv = _chunk_rows(part.dv_pages, part, q.shape[1], ctx.kv_dtypes[1])
        if ctx.merge is not None:  # a rank without the chunk's pages (or any part) adds zeros to the others' sums
            zeros = lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=q.device)  # noqa: E731
            dq, dk, dv = ctx.merge.backward(dq if dq is not None else zeros(q.shape, q.dtype),
                                            dk if dk is not None else zeros(ctx.kv_shape, ctx.kv_dtypes[0]),
                                            dv if dv is not None else zeros(ctx.kv_shape, ctx.kv_dtypes[1]))
        return dq.to(q.dtype), dk, dv, None, None, None, None, None


def attend(history, q, k, v, kernel, scale=None, kept=None, merge=None):
    """Causal attention of the chunk's q [B, C, H, D] over `history` (its stored K/V, then the chunk's own k, v
    [B, C, Hkv, D], already stored). Returns o [B, C, H, D] in q.dtype. Without grad (stage 1) only the forward
    runs and nothing is kept. kept=(o, lse): this very forward's result, kept from an earlier call over the same
    positions (kept_outputs.py): the forward kernels are skipped.
    merge (history sharded across processes, context_parallel.py; None: this process holds all of it): an object
    with forward(o fp32, lse) -> the (o, lse) of every rank's history merged, and backward(dq, dk, dv) -> their
    sums over the ranks (dq is a sum over parts; dk/dv of the chunk come from the rank holding its pages)."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return kept[0] if kept is not None else attention_forward(history, q, k, v, kernel, scale, merge)[0]
    return _Attention.apply(q, k, v, history, kernel, scale, kept, merge)
