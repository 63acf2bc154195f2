"""K/V rows between the page pool and contiguous tensors, through a page table (Triton): what SDPAKernel
(kernels/gather_sdpa.py) does around each fused attention call.

    gather_rows  pages [num_pages, page_size, Hkv, D] at positions first..first+n-1 of a table -> a contiguous
                 [B, n, Hkv, D] copy (in the dtype asked for), returned as its [B, Hkv, n, D] transposed view: the
                 [B, S, H, D] memory layout the fused ops read without another copy
    add_rows     pages at those positions += grad [B, Hkv, n, D] (any strides: what the fused backward returns),
                 summed in fp32 and rounded once into the pages' dtype (fp32 or bf16)

    copy_page_heads  kv head h's rows of page src_pages[j, h] of one pool -> its rows of page dst_pages[j, h] of
                 another: the offloaded store's per-head moves between pinned host pages and its GPU buffers
                 (offload.py), where each kv head of a sparse call has its own selected pages

The table is [B, n_pages] (dense: every kv head reads the same pages) or [B, Hkv, n_pages] (sparse, one block of
queries per chunk: each kv head its own selected pages). add_rows assumes no position's page repeats within the
call (true of both: a table lists distinct pages).

In PyTorch ops each is an index computation (~7 small kernels: arange, the table lookup, page * size + slot) and an
index_select, or index_add_ after an fp32 copy of the gradient (bf16 pages: index_select, add, index_copy_); fused,
each is one launch that reads the table itself, and add_rows moves the gradient once. gather_rows_reference and
add_rows_reference are those PyTorch forms: the meaning, and the path on CPUs without Triton's interpreter.
"""
import torch
import triton
import triton.language as tl

from kernels.paged_attention import _interpreting


def _table_strides(table):
    """(batch, kv head, column) strides of a [B, n] or [B, Hkv, n] table (kv head stride 0: shared pages)."""
    if table.dim() == 2:
        return table.stride(0), 0, table.stride(1)
    return table.stride(0), table.stride(1), table.stride(2)


@triton.jit
def _tile(T, first, n, stride_tb, stride_th, stride_tn, N_KV_HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """This program's (batch row b, kv head h, positions' indices i [BLOCK_N], valid mask, their page rows: row of
    each position in the pages viewed as [num_pages * page_size, Hkv, D])."""
    bh = tl.program_id(1)
    b, h = bh // N_KV_HEADS, bh % N_KV_HEADS
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = i < n
    pos = first + i
    page = tl.load(T + b * stride_tb + h * stride_th + (pos // PAGE_SIZE) * stride_tn, mask=ok, other=0)
    return b, h, i, ok, page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE


@triton.jit
def _gather_kernel(P, T, O, first, n, stride_tb, stride_th, stride_tn, stride_ob, stride_on, stride_oh,
                   N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(n, BLOCK_N), B * N_KV_HEADS); a program copies BLOCK_N positions of one (batch row, kv head)
    b, h, i, ok, rows = _tile(T, first, n, stride_tb, stride_th, stride_tn, N_KV_HEADS, PAGE_SIZE, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(P + (rows * N_KV_HEADS + h)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None])
    tl.store(O + b * stride_ob + i[:, None] * stride_on + h * stride_oh + d[None, :], x.to(O.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def _add_kernel(P, T, G, first, n, stride_tb, stride_th, stride_tn, stride_gb, stride_gh, stride_gn,
                N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid as _gather_kernel's; each page row is read, added to in fp32 and written by one program only
    b, h, i, ok, rows = _tile(T, first, n, stride_tb, stride_th, stride_tn, N_KV_HEADS, PAGE_SIZE, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    g = tl.load(G + b * stride_gb + h * stride_gh + i[:, None] * stride_gn + d[None, :], mask=ok[:, None])
    ptrs = P + (rows * N_KV_HEADS + h)[:, None] * HEAD_DIM + d[None, :]
    old = tl.load(ptrs, mask=ok[:, None])
    tl.store(ptrs, (old.to(tl.float32) + g.to(tl.float32)).to(P.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _copy_heads_kernel(S, D, SRC, DST, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    # grid: (n, N_KV_HEADS); program (j, h) copies page SRC[j, h]'s rows of kv head h ([PAGE_SIZE, HEAD_DIM], one
    # row every N_KV_HEADS) into page DST[j, h]'s: zeros where SRC is -1, nothing where DST is -1
    j, h = tl.program_id(0), tl.program_id(1)
    src = tl.load(SRC + j * N_KV_HEADS + h).to(tl.int64)
    dst = tl.load(DST + j * N_KV_HEADS + h).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    zero = tl.zeros([BLOCK_R, HEAD_DIM], tl.int64)  # masks from scalars by addition (see _dkdv_kernel)
    for r0 in range(0, PAGE_SIZE, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        x = tl.load(S + ((src * PAGE_SIZE + r) * N_KV_HEADS + h)[:, None] * HEAD_DIM + d[None, :],
                    mask=(zero + src >= 0) & (zero + dst >= 0), other=0.0)
        tl.store(D + ((dst * PAGE_SIZE + r) * N_KV_HEADS + h)[:, None] * HEAD_DIM + d[None, :],
                 x.to(D.dtype.element_ty), mask=zero + dst >= 0)


def _flat_index(pages, table, first, n):
    """Rows of positions first..first+n-1 in pages viewed as [num_pages * page_size * Hkv, D]: [B, n, Hkv]."""
    page_size, Hkv = pages.shape[1], pages.shape[2]
    pos = torch.arange(first, first + n, device=table.device)
    if table.dim() == 2:
        table = table[:, None, :]  # every kv head the same pages
    rows = table.long()[..., pos // page_size] * page_size + pos % page_size  # [B, Hkv or 1, n]
    heads = torch.arange(Hkv, device=table.device).view(1, Hkv, 1)
    return (rows * Hkv + heads).transpose(1, 2)


def gather_rows_reference(pages, table, first, n, dtype):
    idx = _flat_index(pages, table, first, n)  # [B, n, Hkv]
    kv = pages.view(-1, pages.shape[3]).index_select(0, idx.flatten()).view(*idx.shape, pages.shape[3])
    return kv.to(dtype).transpose(1, 2)


def add_rows_reference(pages, table, first, grad):
    flat = pages.view(-1, pages.shape[3])
    idx = _flat_index(pages, table, first, grad.shape[2]).flatten()
    summed = flat.index_select(0, idx).float().add_(grad.transpose(1, 2).reshape(-1, pages.shape[3]))
    flat.index_copy_(0, idx, summed.to(pages.dtype))


def _fused(pages, table):
    D = pages.shape[3]
    return (pages.is_contiguous() and D >= 16 and D & (D - 1) == 0 and table.device == pages.device
            and (pages.is_cuda or (_interpreting() and pages.device.type == "cpu")))


def _launch(kernel, pages, table, first, n, other, other_strides):
    B, Hkv, D, page_size = table.shape[0], pages.shape[2], pages.shape[3], pages.shape[1]
    BLOCK_N = 64
    grid = (triton.cdiv(n, BLOCK_N), B * Hkv)
    kernel[grid](pages, table, other, first, n, *_table_strides(table), *other_strides, N_KV_HEADS=Hkv,
                 HEAD_DIM=D, PAGE_SIZE=page_size, BLOCK_N=BLOCK_N, num_warps=4)


def gather_rows(pages, table, first, n, dtype):
    """Positions first..first+n-1 of `table` ([B, n_pages], or [B, Hkv, n_pages] per kv head) -> [B, Hkv, n, D]
    in `dtype`, a transposed view of a contiguous [B, n, Hkv, D]."""
    if not _fused(pages, table):
        return gather_rows_reference(pages, table, first, n, dtype)
    B, Hkv, D = table.shape[0], pages.shape[2], pages.shape[3]
    out = torch.empty(B, n, Hkv, D, dtype=dtype, device=pages.device)
    if n:
        _launch(_gather_kernel, pages, table, first, n, out, (out.stride(0), out.stride(1), out.stride(2)))
    return out.transpose(1, 2)


def add_rows(pages, table, first, grad):
    """pages at positions first..first+n-1 of `table` += grad [B, Hkv, n, D] (any strides, last one 1), the sum
    in fp32, rounded once into the pages' dtype. The table's pages must not repeat."""
    if not _fused(pages, table) or grad.stride(-1) != 1:
        return add_rows_reference(pages, table, first, grad)
    if grad.shape[2]:
        _launch(_add_kernel, pages, table, first, grad.shape[2], grad, (grad.stride(0), grad.stride(1),
                                                                        grad.stride(2)))


def copy_page_heads_reference(src, src_pages, dst, dst_pages):
    heads = torch.arange(src.shape[2], device=dst_pages.device).expand_as(dst_pages)
    keep = dst_pages >= 0
    pages, into, h = src_pages[keep], dst_pages[keep], heads[keep]
    rows = src[pages.clamp(min=0).to(src.device), :, h.to(src.device)].to(dst.device)  # [m, page_size, D]
    rows[pages < 0] = 0
    dst[into, :, h] = rows.to(dst.dtype)


def copy_page_heads(src, src_pages, dst, dst_pages):
    """For each (j, h): dst[dst_pages[j, h], :, h] = src[src_pages[j, h], :, h] (kv head h's rows of one page),
    zeros where src_pages is -1, nothing where dst_pages is -1. src, dst: [num_pages, page_size, Hkv, D] of one
    dtype (either may be a pinned pool's device view, read or written over PCIe); src_pages, dst_pages: int64
    [n, Hkv] on dst's device. No (page, head) of dst may be named twice."""
    if src_pages.shape != dst_pages.shape or src_pages.shape[1:] != src.shape[2:3]:
        raise ValueError(f"src_pages {tuple(src_pages.shape)} and dst_pages {tuple(dst_pages.shape)} must both be "
                         f"[n, {src.shape[2]}]")
    if not (_fused(src, dst_pages) and _fused(dst, dst_pages) and src.dtype == dst.dtype):
        return copy_page_heads_reference(src, src_pages, dst, dst_pages)
    n, Hkv = src_pages.shape
    if n:
        page_size = src.shape[1]
        _copy_heads_kernel[(n, Hkv)](src, dst, src_pages.contiguous(), dst_pages.contiguous(), N_KV_HEADS=Hkv,
                                     HEAD_DIM=src.shape[3], PAGE_SIZE=page_size, BLOCK_R=min(page_size, 32),
                                     num_warps=4)
