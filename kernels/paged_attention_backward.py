"""The backward of kernels/paged_attention.py's causal paged attention (Triton): dQ, and dK/dV added into the gradient
pages. Layouts, the lse convention and the sparse 4-D page tables are described there.

It is deterministic and uses no atomics. dQ: a program owns a query tile and streams K/V tiles through the page table.
dK/dV: each program owns one kv tile of one (batch row, kv head), loops over the query heads of its GQA group and over
query tiles, and then does a read-modify-write of its own slice of the gradient pages (fp32, or bf16 with the sum
formed in fp32). This assumes no physical page is referenced twice within 0..kv_len-1 of the page tables (no shared
prefixes). With per-block tables a history page's owner is found through an inverse index (which blocks selected the
page, built on the device by a sort) and loops over those blocks only.
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.paged_attention import (_DTYPES, _LOG2E, LOG2E, _check_inputs, _check_out, _doc_args, _dot_flags,
                                     _load_kv, _mm, _page_rows, _query_tile, _table_strides, _tiles, _visible,
                                     softmax_delta)

# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, q_pos, doc_lo, K, V, pt_row, offs_d, lo, hi, kv_len, qk_scale,
              stride_page, stride_tok, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr):
    """dq += dS @ K over kv tiles lo..hi, with P recomputed from the saved lse (base 2)."""
    for n0 in range(lo, hi, BLOCK_N):
        rows = _page_rows(pt_row, n0, kv_len, stride_page, stride_tok, PAGE_SIZE, BLOCK_N)
        k, v = _load_kv(K, V, rows, n0, kv_len, offs_d, BLOCK_N, MASKED)
        p = tl.exp2(_mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]
        if MASKED:
            p = tl.where(_visible(n0, q_pos, kv_len, doc_lo, BLOCK_N, HAS_DOC), p, 0.0)
        dp = _mm(do, tl.trans(v), DOT_PREC, UPCAST)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])  # softmax backward: dS = P * (dP - rowsum(dO * O))
        dq += _mm(ds.to(k.dtype), k, DOT_PREC, UPCAST)
    return dq


@triton.jit
def _dq_kernel(Q, DO, DQ, LSE, DELTA, K, V, PT, DOC, q_start, C, kv_len, qk_scale, sm_scale,
               stride_qb, stride_qm, stride_qh, stride_page, stride_tok, stride_kvh, stride_ptb, stride_pth, stride_ptq,
               stride_db, stride_dh,
               N_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
               Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_DOC: tl.constexpr):
    # grid: (cdiv(C, BLOCK_M), B * N_HEADS); same tiling and kv loop bounds as _fwd_kernel.
    # ACCUMULATE: DQ (fp32) += this part's dq, for attention split over disjoint kv parts.
    bh, offs_m, offs_d, row_ok, q_offs, q_pos, kv_off, pt_row, n_full, hi, doc_lo, lo, mid = _query_tile(
        q_start, C, kv_len, stride_qb, stride_qm, stride_qh, stride_kvh, PT, stride_ptb, stride_pth, stride_ptq,
        DOC, stride_db, stride_dh, N_HEADS, GROUP, HEAD_DIM, Q_BLOCK, BLOCK_M, BLOCK_N, HAS_DOC)
    q = tl.load(Q + q_offs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    do = tl.load(DO + q_offs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    lse2 = tl.load(LSE + bh * C + offs_m, mask=row_ok, other=0.0) * _LOG2E  # [BLOCK_M]
    delta = tl.load(DELTA + bh * C + offs_m, mask=row_ok, other=0.0)  # [BLOCK_M]

    # ACCUMULATE: start from DQ's (unscaled) value rather than adding it after the loop, where the compiler may
    # hoist the load and keep a second fp32 [BLOCK_M, D] tile live through the loop (a 0.5B offloaded step's dq
    # kernel took 1.6x as long as the non-accumulating one; bench/RESULTS.md)
    if ACCUMULATE:
        dq = tl.load(DQ + q_offs, mask=row_ok[:, None], other=0.0) / sm_scale
    else:
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_DOC:  # tiles [lo, mid) hold some row's document start (see _query_tile)
        dq = _dq_inner(dq, q, do, lse2, delta, q_pos, doc_lo, K + kv_off, V + kv_off, pt_row, offs_d, lo, mid,
                       kv_len, qk_scale, stride_page, stride_tok, PAGE_SIZE, BLOCK_N, True, DOT_PREC, UPCAST, HAS_DOC)
    dq = _dq_inner(dq, q, do, lse2, delta, q_pos, doc_lo, K + kv_off, V + kv_off, pt_row, offs_d, mid, n_full,
                   kv_len, qk_scale, stride_page, stride_tok, PAGE_SIZE, BLOCK_N, False, DOT_PREC, UPCAST, HAS_DOC)
    dq = _dq_inner(dq, q, do, lse2, delta, q_pos, doc_lo, K + kv_off, V + kv_off, pt_row, offs_d,
                   tl.maximum(n_full, lo), hi, kv_len, qk_scale, stride_page, stride_tok, PAGE_SIZE, BLOCK_N, True,
                   DOT_PREC, UPCAST, HAS_DOC)
    dq = dq * sm_scale
    tl.store(DQ + q_offs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, kv_pos, Q, DO, LSE, DELTA, DOC, m0, q_start, C, qk_scale, stride_qm, offs_d,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               HAS_DOC: tl.constexpr):
    """One query head's tile of queries m0..m0+BLOCK_M-1 added into a resident kv tile's dk, dv [BLOCK_N, D].
    Q, DO point at (b, h) of [B, C, H, D]; LSE, DELTA at row (b, h) of [B, H, C]; DOC (HAS_DOC) at the queries'
    first visible positions of (b, kv head), positions kv_pos being in the same coordinates.
    Works on transposed scores sT [BLOCK_N, BLOCK_M] so dk/dv come out as [BLOCK_N, D]."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < C
    q_offs = offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    do = tl.load(DO + q_offs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    # padded rows (>= C) get lse = +inf, so their P, and hence dS, are exactly 0
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    pT = tl.exp2(_mm(k, tl.trans(q), DOT_PREC, UPCAST) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
    if MASKED:
        ok = kv_pos[:, None] <= (q_start + offs_m)[None, :]
        if HAS_DOC:
            ok = ok & (kv_pos[:, None] >= tl.load(DOC + offs_m, mask=row_ok, other=0)[None, :])
        pT = tl.where(ok, pT, 0.0)
    dv += _mm(pT.to(do.dtype), do, DOT_PREC, UPCAST)
    dsT = pT * (_mm(v, tl.trans(do), DOT_PREC, UPCAST) - delta[None, :])
    dk += _mm(dsT.to(q.dtype), q, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_inner(dk, dv, k, v, kv_pos, Q, DO, LSE, DELTA, DOC, lo, hi, q_start, C, qk_scale, stride_qm, offs_d,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                HAS_DOC: tl.constexpr):
    """One query head's contribution to a resident kv tile, over query tiles lo..hi (see _dkdv_tile)."""
    for m0 in range(lo, hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, kv_pos, Q, DO, LSE, DELTA, DOC, m0, q_start, C, qk_scale, stride_qm,
                            offs_d, BLOCK_M, MASKED, DOT_PREC, UPCAST, HAS_DOC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, DO, LSE, DELTA, K, V, DK, DV, PT, KEYS, QBLOCKS, RUN_END, ORDER, DOC, COLS, QEND, q_start, C,
                 kv_len, n_pool, qk_scale, sm_scale, stride_qb, stride_qm, stride_qh, stride_page, stride_tok,
                 stride_kvh, stride_gpage, stride_gtok, stride_gkvh, stride_ptb, stride_db, stride_dh, n_tiles,
                 N_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SPARSE: tl.constexpr, HAS_DOC: tl.constexpr):
    # One program = one kv tile of one (b, kv head). It is the only writer of its rows of dk/dv pages, so no
    # atomics and a fixed summation order.
    # Dense (grid (cdiv(kv_len, BLOCK_N), B * N_KV_HEADS)): the tile at positions n0.. of the batch row's page
    #   table; every query at or after it attends to it (causal).
    # SPARSE (grid (len(KEYS), PAGE_SIZE // BLOCK_N)): history pages chosen per block of Q_BLOCK queries. KEYS
    #   [n] int64 = (b * N_KV_HEADS + kv head) * n_pool + physical page, sorted, one entry per (block, page)
    #   selection; QBLOCKS [n] the selecting block of each entry, RUN_END [n] one past the last entry with the same
    #   key. The first entry of each run owns the page's tile and loops over the run's blocks, whose queries all
    #   see the whole page; programs of the other entries load nothing and write nothing. Program p takes entry
    #   ORDER[p]: the owners of the longest runs first, so that no long loop starts last and runs alone.
    # HAS_DOC (packed documents): DOC [B, (Hkv,) C] each query's first visible position of the table; a sparse
    #   entry's page sits at positions COLS[j] * PAGE_SIZE.. of its block's table, and every tile is masked. Dense:
    #   QEND [B * N_KV_HEADS, n_tiles] counts the queries whose documents start at or before the tile's end
    #   (doc starts are nondecreasing), so the loop over query tiles stops there.
    offs_d = tl.arange(0, HEAD_DIM)
    if SPARSE:
        i = tl.load(ORDER + tl.program_id(0))
        n0 = tl.program_id(1) * BLOCK_N
        key = tl.load(KEYS + i)
        owner = (i == 0) | (tl.load(KEYS + tl.maximum(i - 1, 0)) != key)
        run_end = tl.where(owner, tl.load(RUN_END + i).to(tl.int32), i)  # an empty loop for non-owners
        bk = (key // n_pool).to(tl.int32)
        slot = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        rows = (key % n_pool) * stride_page + slot * stride_tok
        grows = (key % n_pool) * stride_gpage + slot * stride_gtok
        rows_len = tl.where(owner, kv_len, 0)  # history pages are full: all rows for the owner, none for others
    else:
        n0 = tl.program_id(0) * BLOCK_N
        bk = tl.program_id(1)
        pt_row = PT + bk // N_KV_HEADS * stride_ptb
        rows = _page_rows(pt_row, n0, kv_len, stride_page, stride_tok, PAGE_SIZE, BLOCK_N)
        grows = _page_rows(pt_row, n0, kv_len, stride_gpage, stride_gtok, PAGE_SIZE, BLOCK_N)
        rows_len = kv_len
    b, kvh = bk // N_KV_HEADS, bk % N_KV_HEADS
    kv_pos = n0 + tl.arange(0, BLOCK_N)
    ok = kv_pos < rows_len  # the tile's rows this program reads and writes
    k, v = _load_kv(K + kvh * stride_kvh, V + kvh * stride_kvh, rows, n0, rows_len, offs_d, BLOCK_N,
                    True)  # [BLOCK_N, D]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Dense: query tiles ending before position n0 see none of this tile: start at m_lo. Tiles in
    # [m_lo, m_mid) cross the diagonal; from m_mid on, every query sees the whole kv tile.
    m_lo = tl.maximum(n0 - q_start, 0) // BLOCK_M * BLOCK_M
    m_mid = tl.minimum((tl.maximum(n0 + BLOCK_N - 1 - q_start, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, C)
    doc = DOC + b * stride_db + kvh * stride_dh
    if SPARSE:
        # One flat loop over (selecting block, query head, query tile), in that order: a run's blocks hold a
        # query tile or two each, and nested loops that short left the compiler's software pipelining nothing to
        # overlap (the loads of one tile behind the matmuls of the last)
        TILES = GROUP * (Q_BLOCK // BLOCK_M)  # query tiles per selecting block (a constexpr)
        for t in range(0, (run_end - i) * TILES):
            j = i + t // TILES  # the blocks that selected this page, in increasing order
            g = t % TILES // (Q_BLOCK // BLOCK_M)
            m0 = tl.load(QBLOCKS + j) * Q_BLOCK + t % (Q_BLOCK // BLOCK_M) * BLOCK_M
            if HAS_DOC:  # the page's positions in this block's table
                pos = tl.load(COLS + j) * PAGE_SIZE + kv_pos
            else:
                pos = kv_pos
            h = kvh * GROUP + g
            q_base = b.to(tl.int64) * stride_qb + h * stride_qh
            row = (b * (N_KV_HEADS * GROUP) + h) * C
            dk, dv = _dkdv_tile(dk, dv, k, v, pos, Q + q_base, DO + q_base, LSE + row, DELTA + row, doc, m0,
                                q_start, C, qk_scale, stride_qm, offs_d, BLOCK_M, HAS_DOC, DOT_PREC, UPCAST, HAS_DOC)
    else:
        for g in range(GROUP):  # the query heads sharing this kv head, in a fixed order
            h = kvh * GROUP + g
            q_base = b.to(tl.int64) * stride_qb + h * stride_qh
            row = (b * (N_KV_HEADS * GROUP) + h) * C
            if HAS_DOC:
                q_end = tl.load(QEND + bk * n_tiles + tl.program_id(0)).to(tl.int32)
                dk, dv = _dkdv_inner(dk, dv, k, v, kv_pos, Q + q_base, DO + q_base, LSE + row, DELTA + row, doc, m_lo,
                                     q_end, q_start, C, qk_scale, stride_qm, offs_d, BLOCK_M, True, DOT_PREC, UPCAST,
                                     HAS_DOC)
            else:
                dk, dv = _dkdv_inner(dk, dv, k, v, kv_pos, Q + q_base, DO + q_base, LSE + row, DELTA + row, doc, m_lo,
                                     m_mid, q_start, C, qk_scale, stride_qm, offs_d, BLOCK_M, True, DOT_PREC, UPCAST,
                                     HAS_DOC)
                dk, dv = _dkdv_inner(dk, dv, k, v, kv_pos, Q + q_base, DO + q_base, LSE + row, DELTA + row, doc, m_mid,
                                     C, q_start, C, qk_scale, stride_qm, offs_d, BLOCK_M, False, DOT_PREC, UPCAST,
                                     HAS_DOC)
    # read-modify-write (+=) of this tile's rows of the gradient pages, summed in fp32
    offs = grows[:, None] + kvh * stride_gkvh + offs_d[None, :]
    ok = ok[:, None]
    dk = dk * sm_scale + tl.load(DK + offs, mask=ok, other=0.0).to(tl.float32)
    dv += tl.load(DV + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------- launchers


class SelectionIndex(NamedTuple):
    """The inverse of a sparse selection, for the dK/dV kernel: which query blocks read each history page. One
    entry per (batch row, kv head, block, column) of the history table, sorted by key."""
    keys: torch.Tensor  # [N] int64 (b * n_kv_heads + kv head) * n_pool + physical page, ascending
    blocks: torch.Tensor  # [N] int32 the block of each entry (increasing within a page's run)
    run_end: torch.Tensor  # [N] int64 one past the last entry with the same key
    cols: torch.Tensor  # [N] int32 the entry's column (the page's place in its block's table)
    order: torch.Tensor  # [N] int32 the order the kernel's programs take the entries: each run's first entry
    #                      (its owner) by the run's length, longest first, then the rest


def selection_index(history_table, n_pool):
    """The SelectionIndex of history_table [B, n_kv_heads, n_blocks, n] int32 physical pages (no page twice in a
    row) over a pool of n_pool pages. Built on the device without a host sync."""
    return selection_indices([history_table], n_pool)[0]


def selection_indices(history_tables, n_pool):
    """selection_index of several tables of one shape (a chunk's layers) with one sort per step instead of one per
    table: the sorts of a few thousand entries each are latency-bound (~70 us each, two per table: 0.15 s of the 7B's
    sparse 128K step, bench/RESULTS.md), one of all layers costs about as much as one. Entries are keyed by table
    first, so each table's entries form one contiguous segment of the sorted arrays."""
    L = len(history_tables)
    tables = torch.stack(history_tables)  # [L, B, Hkv, nb, n]
    _, B, Hkv, nb, n = tables.shape
    N = B * Hkv * nb * n  # entries per table
    device = tables.device
    bk = torch.arange(L * B * Hkv, device=device).view(L, B, Hkv, 1, 1)
    keys, entry = torch.sort((bk * n_pool + tables.long()).flatten(), stable=True)  # blocks increasing in a run
    table = entry // N  # = the segment: keys are table-major
    base = table * N  # each entry's segment start
    local = entry - base  # the entry within its table
    run_end = torch.searchsorted(keys, keys, right=True)
    first = torch.searchsorted(keys, keys)  # the run's first entry
    index = torch.arange(keys.numel(), device=device)
    owned = torch.where(first == index, run_end - index, 0)  # each owner's loop length, in blocks; 0 for the rest
    order = torch.sort(table * (nb + 1) + nb - owned, stable=True).indices  # per table: longest owner first
    keys = keys - table * (B * Hkv * n_pool)
    blocks, cols, run_end, order = ((local // n % nb).to(torch.int32), (local % n).to(torch.int32), run_end - base,
                                    (order - base).to(torch.int32))
    return [SelectionIndex(*(t[i * N:(i + 1) * N] for t in (keys, blocks, run_end, cols, order))) for i in range(L)]


def _doc_bounds(doc, shift, n_kv_heads, tiles, bn):
    """The dense dK/dV kernel's document arguments: doc [B, (Hkv,) C] int32 as positions of the own pages' table
    (shifted by `shift`, clamped at 0), expanded to [B, Hkv, C], and q_end [B, Hkv, tiles] int32, the number of
    queries whose documents start at or before each kv tile's last position (the loop over query tiles stops
    there; doc starts are nondecreasing)."""
    B, C = doc.shape[0], doc.shape[-1]
    doc_own = (doc - shift).clamp_(min=0).view(B, -1, C).expand(B, n_kv_heads, C).contiguous()
    tile_last = (torch.arange(tiles, device=doc.device, dtype=torch.int32) * bn + bn - 1).expand(
        B, n_kv_heads, tiles).contiguous()
    return doc_own, torch.searchsorted(doc_own, tile_last, right=True).to(torch.int32)


def paged_attention_backward(do, q, o, lse, k_pages, v_pages, page_table, q_start, dk_pages, dv_pages,
                             scale=None, kv_len=None, delta=None, dq=None, q_block=None, doc_start=None,
                             selection=None):
    """Backward of paged_attention_forward. Returns dq (q.dtype, q's shape) and ADDS the
    gradients of kv positions 0..kv_len-1 into dk_pages / dv_pages in place (fp32, or bf16
    pages with the sum formed in fp32). With a 4-D (sparse) page table, each history page gets the
    gradient of the query blocks that selected it, and no other page is touched.

    For attention split into parts (see the forward): lse is the merged one, delta
    ([B, H, C] fp32, rowsum(do * o) of the merged o; computed from o if None) is shared by the
    parts, and a given fp32 dq is accumulated into (+=) and returned. doc_start: as in the forward (each query
    sees no position of the table before its entry). selection: the SelectionIndex of a sparse table's history
    columns, if built already (selection_indices, for a chunk's layers at once); None: built here."""
    q_start, kv_len = _check_inputs(q, k_pages, v_pages, page_table, q_start, kv_len, q_block)
    B, C, H, D = q.shape
    page_size, n_kv_heads = k_pages.shape[1], k_pages.shape[2]
    grad_dtypes = (torch.float32, torch.bfloat16)
    checks = [("do", do, q.shape, _DTYPES), ("lse", lse, (B, H, C), (torch.float32,)),
              ("dk_pages", dk_pages, k_pages.shape, grad_dtypes), ("dv_pages", dv_pages, k_pages.shape, grad_dtypes),
              ("o", o, q.shape, _DTYPES) if delta is None else ("delta", delta, (B, H, C), (torch.float32,))]
    for name, t, shape, dtypes in checks:
        if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype not in dtypes:
            raise ValueError(f"{name} must be a {'/'.join(map(str, dtypes))} tensor of shape {tuple(shape)}, "
                             f"got {getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if dk_pages.stride(-1) != 1 or dk_pages.stride() != dv_pages.stride() or dk_pages.dtype != dv_pages.dtype:
        raise ValueError("dk_pages/dv_pages need one dtype, unit stride in head_dim and identical strides")
    if dq is not None:
        _check_out("dq", dq, q.shape, (torch.float32,), q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, page_table, lse = q.contiguous(), page_table.contiguous(), lse.contiguous()
    do = do.to(q.dtype).contiguous()  # same layout as q, so the kernels share q's strides
    if delta is None:
        delta = softmax_delta(do, o)
    accumulate = dq is not None
    dq = dq if accumulate else torch.empty_like(q)
    sparse = page_table.dim() == 4
    q_block = q_block if sparse else None
    prec, upcast = _dot_flags(q.dtype)
    common = dict(HEAD_DIM=D, PAGE_SIZE=page_size, DOT_PREC=prec, UPCAST=upcast)

    doc, stride_db, stride_dh = _doc_args(doc_start, q, n_kv_heads)
    has_doc = doc_start is not None
    bm, bn, warps, stages = _tiles("dq", D, page_size, q.dtype, q.device, q_block)
    _dq_kernel[(triton.cdiv(C, bm), B * H)](
        q, do, dq, lse, delta, k_pages, v_pages, page_table, doc, q_start, C, kv_len, scale * LOG2E, scale,
        q.stride(0), q.stride(1), q.stride(2), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        *_table_strides(page_table), stride_db, stride_dh, N_HEADS=H, GROUP=H // n_kv_heads,
        Q_BLOCK=q_block or bm, BLOCK_M=bm, BLOCK_N=bn, **common, ACCUMULATE=accumulate, HAS_DOC=has_doc,
        num_warps=warps, num_stages=stages)

    bm, bn, warps, stages = _tiles("dkdv", D, page_size, q.dtype, q.device, q_block)
    strides = (q.stride(0), q.stride(1), q.stride(2), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
               dk_pages.stride(0), dk_pages.stride(1), dk_pages.stride(2))
    kv_args = (q, do, lse, delta, k_pages, v_pages, dk_pages, dv_pages)
    n_hist = q_start // page_size if sparse else 0
    if n_hist:  # the selected history pages, each by the blocks that chose it
        if selection is None:
            selection = selection_index(page_table[..., :n_hist], k_pages.shape[0])
        keys, blocks, run_end, cols, order = selection
        bn_page = min(bn, page_size)  # a program owns (a part of) one selected page
        _dkdv_kernel[(keys.numel(), page_size // bn_page)](
            *kv_args, page_table, keys, blocks, run_end, order, doc, cols, keys, q_start, C, kv_len, k_pages.shape[0],
            scale * LOG2E, scale, *strides, 0, stride_db, stride_dh, 0, N_KV_HEADS=n_kv_heads,
            GROUP=H // n_kv_heads, Q_BLOCK=q_block, BLOCK_M=bm, BLOCK_N=bn_page, **common, SPARSE=True,
            HAS_DOC=has_doc, num_warps=warps, num_stages=stages)
    if kv_len > n_hist * page_size:  # dense: the whole table, or a sparse table's own chunk pages (causal)
        table = page_table[:, 0, 0, n_hist:] if sparse else page_table
        shift, tiles = n_hist * page_size, triton.cdiv(kv_len - n_hist * page_size, bn)
        doc_own, q_end = (_doc_bounds(doc, shift, n_kv_heads, tiles, bn) if has_doc else (doc, table))
        _dkdv_kernel[(tiles, B * n_kv_heads)](
            *kv_args, table, table, table, table, table, doc_own, table, q_end, q_start - shift, C, kv_len - shift, 1,
            scale * LOG2E, scale, *strides, table.stride(0), *((C * n_kv_heads, C) if has_doc else (0, 0)), tiles,
            N_KV_HEADS=n_kv_heads, GROUP=H // n_kv_heads, Q_BLOCK=bm, BLOCK_M=bm, BLOCK_N=bn, **common,
            SPARSE=False, HAS_DOC=has_doc, num_warps=warps, num_stages=stages)
    return dq
