"""Causal attention of a query chunk over a paged KV cache (Triton): the forward, and what the backward shares.

Chunk-recurrent training processes a long sequence chunk by chunk. The K/V of every position
seen so far live in a pool of fixed-size pages:

    k_pages, v_pages   [num_pages, page_size, n_kv_heads, head_dim]   model dtype (fp32/bf16/fp16)
    dk_pages, dv_pages [num_pages, page_size, n_kv_heads, head_dim]   fp32, or bf16 (grad accumulators; each
                       call's sum is formed in fp32 and rounded once)
    page_table         [B, n_table] int32: logical page j of batch row b is physical page
                       page_table[b, j]; position t lives at pages[page_table[b, t // ps], t % ps]

The queries q [B, C, n_heads, head_dim] of the current chunk sit at absolute positions
q_start .. q_start + C - 1 and their own K/V are already in the pages, so query position p
attends causally to kv positions 0..p (kv_len = q_start + C). GQA: query head h reads kv head
h // (n_heads // n_kv_heads).

Sparse attention (sparse_attn.py) uses the same kernels with a page table per (batch row, kv head, block of
q_block queries), page_table [B, n_kv_heads, cdiv(C, q_block), n]: the history pages that block selected, then
the chunk's own pages. Seen through it, the block's history is q_start = n_selected * page_size contiguous
positions, all visible, followed by the chunk (causal); the dense case is every block sharing one table.

The backward (kernels/paged_attention_backward.py) adds (+=) dL/dK and dL/dV of every position 0..kv_len-1 into
dk_pages/dv_pages, deterministically (no atomics), and returns dq.

lse convention: the forward returns the NATURAL-log log-sum-exp of the scaled scores,
lse = log(sum_j exp(scale * q.k_j)), fp32 [B, n_heads, C]. Kernels work in base 2 internally
(exp2 is cheaper) and convert at the boundary.

These are launchers of one kernel call over one part of the history; attention.py runs them over the parts a store
provides (its TritonKernel) under one autograd Function, and kernels/paged_reference.py holds their plain-PyTorch
fp32 meaning.
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)
# Kernels may only read globals that are tl.constexpr (the interpreter does not enforce this).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)
_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting():
    """True if the kernels below were built for Triton's interpreter, i.e. TRITON_INTERPRET=1
    was set when this module was imported (later changes of the variable have no effect)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def _launch_config(kind, head_dim, page_size, dtype, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kind in {"fwd", "dq", "dkdv"}.

    BLOCK_M = query rows per tile, BLOCK_N = kv positions per tile, both powers of two. A kv tile
    up to a page long needs one page-table lookup; a longer one spans whole pages (see _page_rows).
    """
    if _interpreting() or device.type != "cuda":
        # Interpreter (CPU tests): small tiles so tests cover several tiles per page and per
        # chunk, and dK/dV tiles spanning two pages at page 16; BLOCK_M != BLOCK_N so mixed-up
        # row/column bookkeeping cannot hide.
        bm, bn, warps, stages = (16, 32, 4, 1) if kind == "dkdv" else (32, 16, 4, 1)
    elif kind == "fwd":
        # A program keeps its [BLOCK_M, D] q tile and fp32 accumulator in registers and streams
        # [BLOCK_N, D] K/V tiles. D=128: 128-position kv tiles (two pages of 64) with 8 warps were 2-12%
        # faster than (64, 32, 4, 2) on the 7B step's calls in four sweeps on H100 (bench/RESULTS.md).
        bm, bn, warps, stages = (128, 64, 8, 3) if head_dim <= 64 else (128, 128, 8, 3)
    elif kind == "dq":
        # q, do and the dq accumulator stay resident while K/V tiles stream. D=128: 128-position kv tiles (two
        # pages of 64) made the backward 1-4% faster than (128, 64, 8, 2) in sweeps of the 7B step's calls and
        # of a 64K history, despite some spilling; D=64: 3 stages were 3-5% faster than 2.
        bm, bn, warps, stages = (128, 64, 8, 3) if head_dim <= 64 else (128, 128, 8, 2)
    else:
        # dkdv: k, v and two fp32 [BLOCK_N, D] accumulators stay resident, q/do tiles stream.
        # 8 warps or BLOCK_N=32 measured 1.4-1.7x slower. D=64 (8/2 heads, 64K-256K history): 128-row
        # q tiles made the backward 10-15% faster; at D=128 64-row tiles stay the best.
        bm, bn, warps, stages = (128, 64, 4, 2) if head_dim <= 64 else (64, 64, 4, 2)
    if dtype == torch.float32 and not _interpreting() and device.type == "cuda":
        bm, bn = max(bm // 2, 16), max(bn // 2, 16)  # fp32 tiles take twice the registers/smem
    return bm, bn, warps, stages


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_PREC is "ieee" for fp32 inputs (no silent tf32).
    UPCAST: the Triton interpreter multiplies bf16 tiles as raw uint16 bits, so under
    TRITON_INTERPRET bf16 operands are widened first (exact: same products, fp32 sums)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _page_rows(pt_row, n0, kv_len, stride_page, stride_tok, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 element offsets [BLOCK_N] of kv positions n0..n0+BLOCK_N-1 in a page pool (n0 % BLOCK_N == 0).
    A tile no larger than a page lies inside one page: one scalar lookup. A larger tile spans BLOCK_N // PAGE_SIZE
    whole pages, looked up per position (positions >= kv_len read no table entry and get page 0)."""
    if BLOCK_N <= PAGE_SIZE:
        page = tl.load(pt_row + n0 // PAGE_SIZE).to(tl.int64)
        slot = (n0 % PAGE_SIZE + tl.arange(0, BLOCK_N)).to(tl.int64)
    else:
        pos = n0 + tl.arange(0, BLOCK_N)
        page = tl.load(pt_row + pos // PAGE_SIZE, mask=pos < kv_len, other=0).to(tl.int64)
        slot = (pos % PAGE_SIZE).to(tl.int64)
    return page * stride_page + slot * stride_tok


@triton.jit
def _load_kv(K, V, rows, n0, kv_len, offs_d, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """K/V tiles [BLOCK_N, D] of positions n0.. at element offsets rows [BLOCK_N] (K, V already offset to the kv
    head). Positions >= kv_len hold garbage (maybe NaN) and are zeroed: a NaN v times p=0 is NaN."""
    offs = rows[:, None] + offs_d[None, :]
    if MASKED:
        ok = (n0 + tl.arange(0, BLOCK_N) < kv_len)[:, None]
        return tl.load(K + offs, mask=ok, other=0.0), tl.load(V + offs, mask=ok, other=0.0)
    return tl.load(K + offs), tl.load(V + offs)


@triton.jit
def _visible(n0, q_pos, kv_len, doc_lo, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask: kv position n0 + j exists (< kv_len) and is causal for query row i, and with
    HAS_DOC is in its document (>= doc_lo[i])."""
    n = (n0 + tl.arange(0, BLOCK_N))[None, :]
    ok = (n <= q_pos[:, None]) & (n < kv_len)
    if HAS_DOC:
        ok = ok & (n >= doc_lo[:, None])
    return ok


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, q_pos, doc_lo, K, V, pt_row, offs_d, lo, hi, kv_len, qk_scale,
               stride_page, stride_tok, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr):
    """Online softmax over kv tiles lo..hi. m_i, l_i: running max / sum in base 2 [BLOCK_M]."""
    for n0 in range(lo, hi, BLOCK_N):
        rows = _page_rows(pt_row, n0, kv_len, stride_page, stride_tok, PAGE_SIZE, BLOCK_N)
        k, v = _load_kv(K, V, rows, n0, kv_len, offs_d, BLOCK_N, MASKED)
        s = _mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:  # only tiles that cross the diagonal, kv_len or a document start pay for the mask
            s = tl.where(_visible(n0, q_pos, kv_len, doc_lo, BLOCK_N, HAS_DOC), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite without documents: kv position 0 is visible to every row
        if HAS_DOC:  # a row may have seen nothing yet (its document starts later): shift by 0, so p = alpha = 0
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_PREC, UPCAST)  # p in bf16 like FA
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_tile(q_start, C, kv_len, stride_qb, stride_qm, stride_qh, stride_kvh, PT, stride_ptb, stride_pth,
                stride_ptq, DOC, stride_db, stride_dh, N_HEADS: tl.constexpr, GROUP: tl.constexpr,
                HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_DOC: tl.constexpr):
    """What a program of the query-tiled kernels (forward, dq) works on: row bh = b * N_HEADS + h
    of [B, H, C]; query rows offs_m, their mask and element offsets in [B, C, H, D]; absolute
    positions; the kv head's offset in the pages; the page table row of (batch row, kv head,
    block of Q_BLOCK queries) - strides 0 for the kv head and block when all share one -; and the kv loop
    bounds. Tiles [0, n_full) lie entirely at or before the tile's first query and below kv_len
    (no mask needed);
    tiles [n_full, hi) cross the diagonal; hi is one past the tile's last visible position.
    With HAS_DOC, DOC (strides stride_db, stride_dh) holds each row's first visible position: the loop starts at
    lo, the tile holding the tile's smallest one (nothing before it is read), and tiles [lo, mid), up to the one
    holding its largest, are masked too. Without, lo = mid = 0."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // N_HEADS, bh % N_HEADS
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < C
    q_offs = b.to(tl.int64) * stride_qb + offs_m[:, None] * stride_qm + h * stride_qh + offs_d[None, :]
    n_full = tl.minimum((q_start + m0 + 1) // BLOCK_N, kv_len // BLOCK_N) * BLOCK_N
    hi = tl.minimum(kv_len, q_start + m0 + BLOCK_M)
    pt_row = PT + b * stride_ptb + (h // GROUP) * stride_pth + (m0 // Q_BLOCK) * stride_ptq
    if HAS_DOC:
        doc_lo = tl.load(DOC + b * stride_db + (h // GROUP) * stride_dh + offs_m, mask=row_ok, other=0)
        lo = tl.min(tl.where(row_ok, doc_lo, kv_len), 0) // BLOCK_N * BLOCK_N
        mid = tl.minimum(tl.maximum((tl.max(doc_lo, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), n_full)
    else:
        doc_lo = offs_m  # unused
        lo = n_full * 0
        mid = n_full * 0
    return (bh, offs_m, offs_d, row_ok, q_offs, q_start + offs_m, (h // GROUP) * stride_kvh, pt_row, n_full, hi,
            doc_lo, lo, mid)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, PT, DOC, q_start, C, kv_len, qk_scale,
                stride_qb, stride_qm, stride_qh, stride_page, stride_tok, stride_kvh, stride_ptb, stride_pth, stride_ptq,
                stride_db, stride_dh,
                N_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, MERGE: tl.constexpr, HAS_DOC: tl.constexpr):
    # grid: (cdiv(C, BLOCK_M), B * N_HEADS); one program = one query tile of one (b, h).
    # MERGE: O/LSE already hold the attention over other kv positions (a disjoint part of the
    # history); combine: o = (o_old * 2^lse_old + o_new * 2^lse_new) / 2^lse, lse = log2-sum.
    bh, offs_m, offs_d, row_ok, q_offs, q_pos, kv_off, pt_row, n_full, hi, doc_lo, lo, mid = _query_tile(
        q_start, C, kv_len, stride_qb, stride_qm, stride_qh, stride_kvh, PT, stride_ptb, stride_pth, stride_ptq,
        DOC, stride_db, stride_dh, N_HEADS, GROUP, HEAD_DIM, Q_BLOCK, BLOCK_M, BLOCK_N, HAS_DOC)
    q = tl.load(Q + q_offs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_DOC:  # tiles [lo, mid) hold some row's document start: masked
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_pos, doc_lo, K + kv_off, V + kv_off, pt_row, offs_d, lo, mid,
                                   kv_len, qk_scale, stride_page, stride_tok, PAGE_SIZE, BLOCK_N, True, DOT_PREC,
                                   UPCAST, HAS_DOC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_pos, doc_lo, K + kv_off, V + kv_off, pt_row, offs_d, mid, n_full,
                               kv_len, qk_scale, stride_page, stride_tok, PAGE_SIZE, BLOCK_N, False, DOT_PREC, UPCAST,
                               HAS_DOC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_pos, doc_lo, K + kv_off, V + kv_off, pt_row, offs_d,
                               tl.maximum(n_full, lo), hi, kv_len, qk_scale, stride_page, stride_tok, PAGE_SIZE,
                               BLOCK_N, True, DOT_PREC, UPCAST, HAS_DOC)
    if HAS_DOC:  # a row that saw nothing of this part: o = 0, lse = -inf
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    else:
        o = acc / l_i[:, None]
    lse2 = m_i + tl.log2(l_i)
    if MERGE:
        lse2_old = tl.load(LSE + bh * C + offs_m, mask=row_ok, other=0.0) * _LOG2E
        o_old = tl.load(O + q_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        m = tl.maximum(lse2, lse2_old)
        if HAS_DOC:  # neither part shows the row anything (both lse -inf): weights 0, o stays 0
            m = tl.where(m == float("-inf"), 0.0, m)
        w_new, w_old = tl.exp2(lse2 - m), tl.exp2(lse2_old - m)
        w_sum = w_new + w_old
        if HAS_DOC:
            o = (o * w_new[:, None] + o_old * w_old[:, None]) / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
        else:
            o = (o * w_new[:, None] + o_old * w_old[:, None]) / w_sum[:, None]
        lse2 = m + tl.log2(w_sum)
    tl.store(O + q_offs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * C + offs_m, lse2 * _LN2, mask=row_ok)  # natural log


# --------------------------------------------------------------------------------- launchers


def _check_inputs(q, k_pages, v_pages, page_table, q_start, kv_len, q_block):
    """Validate the shared arguments; returns (q_start, kv_len) as ints (kv_len defaults to q_start + C)."""
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
    B, C, H, D = q.shape
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {tuple(k_pages.shape)} and v_pages {tuple(v_pages.shape)} differ in shape")
    _, page_size, n_kv_heads, d_kv = k_pages.shape
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype must be one of {_DTYPES}, got {q.dtype}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"q, k_pages, v_pages must share a dtype, got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if d_kv != D:
        raise ValueError(f"head_dim of q ({D}) and of the pages ({d_kv}) differ")
    if D not in _HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {_HEAD_DIMS}, got {D}")
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
    if n_kv_heads < 1 or H % n_kv_heads:
        raise ValueError(f"n_heads ({H}) must be a multiple of n_kv_heads ({n_kv_heads})")
    if C < 1 or B < 1:
        raise ValueError(f"q must have B >= 1 and C >= 1, got shape {tuple(q.shape)}")
    try:
        q_start = int(q_start)
    except (TypeError, ValueError):
        raise ValueError(f"q_start must be an int, got {q_start!r}") from None
    if q_start < 0:
        raise ValueError(f"q_start must be >= 0, got {q_start}")
    if kv_len is None:
        kv_len = q_start + C
    elif not isinstance(kv_len, int) or not 1 <= kv_len <= q_start + C:
        raise ValueError(f"kv_len must be an int in [1, q_start + C = {q_start + C}], got {kv_len!r}")
    if not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32 or page_table.dim() not in (2, 4):
        raise ValueError(f"page_table must be a 2-D or 4-D int32 tensor, got "
                         f"{getattr(page_table, 'dtype', type(page_table))} {tuple(getattr(page_table, 'shape', ()))}")
    if page_table.shape[0] != B:
        raise ValueError(f"page_table has {page_table.shape[0]} rows for batch size {B}")
    if page_table.shape[-1] * page_size < kv_len:
        raise ValueError(f"page_table too short: {page_table.shape[-1]} pages x {page_size} positions "
                         f"< kv_len = {kv_len}")
    if page_table.dim() == 4:
        if not isinstance(q_block, int) or q_block < 16 or q_block & (q_block - 1):
            raise ValueError(f"a 4-D page_table needs q_block, a power of two >= 16, got {q_block!r}")
        want = (B, n_kv_heads, -(-C // q_block))
        if tuple(page_table.shape[:3]) != want:
            raise ValueError(f"a 4-D page_table must be [B, n_kv_heads, cdiv(C, q_block), n] with "
                             f"[B, n_kv_heads, cdiv(C, q_block)] = {list(want)}, got {tuple(page_table.shape)}")
        if q_start % page_size:
            raise ValueError(f"with a 4-D page_table q_start ({q_start}) must be a multiple of page_size "
                             f"({page_size}): the first q_start // page_size columns are the history pages")
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages), ("page_table", page_table)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"tensors on {q.device} need Triton's interpreter: set TRITON_INTERPRET=1 before import")
    if k_pages.stride(-1) != 1 or k_pages.stride() != v_pages.stride():
        raise ValueError("k_pages/v_pages need unit stride in head_dim and identical strides (they are not copied)")
    return q_start, kv_len


def _doc_args(doc_start, q, n_kv_heads):
    """(tensor, batch stride, kv-head stride) of a part's document starts for the kernels: int32 [B, C] (every
    kv head alike: stride 0) or [B, Hkv, C]; without, q as a placeholder the kernels never read."""
    if doc_start is None:
        return q, 0, 0
    B, C = q.shape[:2]
    if not isinstance(doc_start, torch.Tensor) or doc_start.is_floating_point() or doc_start.shape not in (
            (B, C), (B, n_kv_heads, C)):
        raise ValueError(f"doc_start must be an integer tensor [B, C] = {[B, C]} or [B, n_kv_heads, C], got "
                         f"{getattr(doc_start, 'dtype', type(doc_start))} {tuple(getattr(doc_start, 'shape', ()))}")
    if doc_start.device != q.device:
        raise ValueError(f"doc_start is on {doc_start.device} but q is on {q.device}")
    doc = doc_start.to(torch.int32).contiguous()
    return doc, doc.stride(0), (doc.stride(1) if doc.dim() == 3 else 0)


def _table_strides(page_table):
    """(batch, kv head, query block) strides of a page table; a 2-D table is one row per batch element."""
    if page_table.dim() == 2:
        return page_table.stride(0), 0, 0
    return page_table.stride(0), page_table.stride(1), page_table.stride(2)


def _tiles(kind, D, page_size, dtype, device, q_block):
    """_launch_config, with query tiles no larger than a query block (a tile reads one block's page table)."""
    bm, bn, warps, stages = _launch_config(kind, D, page_size, dtype, device)
    return (min(bm, q_block) if q_block else bm), bn, warps, stages


def _dot_flags(dtype):
    """DOT_PREC: exact fp32 products for fp32 inputs (tf32 otherwise; ignored for 16-bit).
    UPCAST: work around the interpreter's bf16 tl.dot (see _mm)."""
    return ("ieee" if dtype == torch.float32 else "tf32"), (_interpreting() and dtype == torch.bfloat16)


def _check_out(name, t, shape, dtypes, device):
    if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype not in dtypes or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {'/'.join(map(str, dtypes))} tensor of shape {tuple(shape)}, "
                         f"got {getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def paged_attention_forward(q, k_pages, v_pages, page_table, q_start, scale=None, kv_len=None, out=None,
                            merge=False, q_block=None, doc_start=None):
    """Causal attention of q [B, C, H, D] (positions q_start..) over kv positions 0..kv_len-1
    of the paged K/V (default kv_len = q_start + C: the chunk's own K/V are the last C).
    Returns o [B, C, H, D] (q.dtype) and lse [B, H, C] fp32 (natural log).

    page_table: [B, n] - one table per batch row, shared by every query head - or, for sparse attention,
    [B, n_kv_heads, cdiv(C, q_block), n]: a table per (batch row, kv head, block of q_block queries), listing
    the history pages that block attends to (positions < q_start, all visible) followed by the chunk's own pages
    (the same in every row of a batch element).

    Attention over a long history can be split into disjoint parts, each a call with its own
    page table: out=(o, lse) writes into given tensors (o in fp32 for a split), and merge=True
    combines this part with what they hold (the previous parts) by their log-sum-exps.

    doc_start (packed documents): int32 [B, C] or [B, n_kv_heads, C], each query's first visible position of the
    table (>= 0); positions before it are neither visible nor, where a whole query tile's documents start later,
    read. A row that sees nothing of this call gets o = 0 and lse = -inf (merged away by a later part)."""
    q_start, kv_len = _check_inputs(q, k_pages, v_pages, page_table, q_start, kv_len, q_block)
    B, C, H, D = q.shape
    page_size, n_kv_heads = k_pages.shape[1], k_pages.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, page_table = q.contiguous(), page_table.contiguous()
    if out is None:
        if merge:
            raise ValueError("merge=True needs out=(o, lse) holding the parts to merge with")
        o, lse = torch.empty_like(q), torch.empty((B, H, C), device=q.device, dtype=torch.float32)
    else:
        o, lse = out
        _check_out("out[0] (o)", o, q.shape, _DTYPES, q.device)
        _check_out("out[1] (lse)", lse, (B, H, C), (torch.float32,), q.device)
    q_block = q_block if page_table.dim() == 4 else None
    doc, stride_db, stride_dh = _doc_args(doc_start, q, n_kv_heads)
    bm, bn, warps, stages = _tiles("fwd", D, page_size, q.dtype, q.device, q_block)
    prec, upcast = _dot_flags(q.dtype)
    _fwd_kernel[(triton.cdiv(C, bm), B * H)](
        q, k_pages, v_pages, o, lse, page_table, doc, q_start, C, kv_len, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        *_table_strides(page_table), stride_db, stride_dh, N_HEADS=H, GROUP=H // n_kv_heads, HEAD_DIM=D,
        PAGE_SIZE=page_size, Q_BLOCK=q_block or bm, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec, UPCAST=upcast,
        MERGE=bool(merge), HAS_DOC=doc_start is not None, num_warps=warps, num_stages=stages)
    return o, lse


@triton.jit
def _delta_kernel(DO, O, DELTA, n_rows, C, H, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr):
    # grid: (cdiv(n_rows, BLOCK_R),) over the rows (b, c, h) of contiguous [B, C, H, D]; DELTA [B, H, C]
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    do = tl.load(DO + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    o = tl.load(O + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    b, c, h = rows // (C * H), rows // H % C, rows % H
    tl.store(DELTA + (b.to(tl.int64) * H + h) * C + c, tl.sum(do * o, 1), mask=ok)


def softmax_delta(do, o):
    """rowsum(dO * O) per query and head, [B, H, C] fp32: the softmax backward's correction term, shared by every
    kv part of a split attention (do, o: [B, C, H, D], o the merged output). One kernel (CUDA, or the interpreter)
    for contiguous inputs; the formula, four kernels with two fp32 copies, otherwise."""
    B, C, H, D = o.shape
    fused = do.is_cuda or (do.device.type == "cpu" and _interpreting())
    if not (fused and do.shape == o.shape and do.is_contiguous() and o.is_contiguous() and D in _HEAD_DIMS):
        return (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    delta = torch.empty(B, H, C, dtype=torch.float32, device=o.device)
    rows = B * C * H
    block_r = min(triton.next_power_of_2(rows), (1 << 16) // D) if _interpreting() else 64
    _delta_kernel[(triton.cdiv(rows, block_r),)](do, o, delta, rows, C, H, BLOCK_R=block_r, HEAD_DIM=D, num_warps=4)
    return delta
