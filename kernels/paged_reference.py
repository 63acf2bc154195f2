"""Plain-PyTorch fp32 paged attention: the meaning of the Triton kernels (kernels/paged_attention.py), forward and
backward, over the same pages and page tables, and the kernel the chunked step runs on CPU tensors without Triton's
interpreter (attention.ReferenceKernel).

Layouts as in kernels/paged_attention.py: q [B, C, H, D] at positions q_start..; pages [num_pages, page_size,
Hkv, D]; page_table [B, n] (one table per batch row) or [B, Hkv, cdiv(C, q_block), n] (one per kv head and block
of q_block queries, sparse attention); lse [B, H, C] natural log. Everything is gathered into dense fp32 tensors,
so memory grows as C x kv_len: a reference, and a CPU fallback, not a long-sequence kernel.

A 2-D table (the chunked step's common case) takes a dense path (_dense_forward, _dense_backward): K/V gathered
once as [B, Hkv, L, D], the G = H // Hkv query heads of a kv head stacked as [B, Hkv, G*C, D] rows, so scores are
one batched matmul [B, Hkv, G*C, L] without permute copies, one exp in each direction and in-place elementwise
work. A 4-D table takes the generic einsum path over [B, Hkv, group, blocks, q_block, L].
"""
import math

import torch


def gather_pages(pages, page_table, start, length):
    """Rows of positions start..start+length-1 of every batch row -> [B, length, Hkv, D].
    Differentiable w.r.t. pages (plain advanced indexing)."""
    page_size = pages.shape[1]
    pos = torch.arange(start, start + length, device=pages.device)
    phys = page_table.to(device=pages.device, dtype=torch.long)[:, pos // page_size]  # [B, length]
    return pages[phys, pos % page_size]


def _per_block(q, page_table, q_block):
    """A 2-D table as the 4-D one every kv head and block shares: ([B, Hkv, nb, n] table, q_block)."""
    if page_table.dim() == 4:
        return page_table, q_block
    return page_table[:, None, None].expand(q.shape[0], 1, 1, page_table.shape[1]), q.shape[1]


def _kv_index(page_table, kv_len, page_size, n_kv_heads, device):
    """Index tuple (phys [B, Hkv|1, nb, L], slot [L], kv head [1, Hkv, 1, 1]) of kv positions 0..kv_len-1 as each
    (batch row, kv head, block) reads them through its table."""
    kv_pos = torch.arange(kv_len, device=device)
    phys = page_table.to(device=device, dtype=torch.long)[..., kv_pos // page_size]
    return phys, kv_pos % page_size, torch.arange(n_kv_heads, device=device)[None, :, None, None]


def _doc_rows(doc_start, B, C):
    """A part's per-query first visible (virtual) kv position, [B, C] or [B, Hkv, C] -> long [B, Hkv|1, C]."""
    return doc_start.long().view(B, -1, C)


def _scores(q, k, q_start, q_block, scale, doc_start=None):
    """Masked scaled scores [B, Hkv, group, nb, q_block, L] fp32 of q [B, C, H, D] against k [B, Hkv, nb, L, D],
    and q as [B, nb, q_block, Hkv, group, D] (rows past C are zero padding). doc_start [B, (Hkv,) C]: also hide
    the positions before each query's document start."""
    B, C, H, D = q.shape
    Hkv, nb, L = k.shape[1], k.shape[2], k.shape[3]
    pad = nb * q_block - C
    qb = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(B, nb, q_block, Hkv, H // Hkv, D)
    s = torch.einsum("bnikgd,bknld->bkgnil", qb, k) * scale
    q_pos = q_start + torch.arange(nb * q_block, device=q.device).view(nb, q_block)
    cols = torch.arange(L, device=q.device)
    s = s.masked_fill(cols > q_pos[..., None], float("-inf"))
    if doc_start is not None:
        lo = torch.nn.functional.pad(_doc_rows(doc_start, B, C), (0, pad))  # [B, Hkv|1, nb * q_block]
        s = s.masked_fill(cols < lo.view(B, -1, 1, nb, q_block, 1), float("-inf"))
    return s, qb


def _dense_kv(pages, page_table, kv_len):
    """Positions 0..kv_len-1 of every batch row through a 2-D table: fp32 [B, Hkv, L, D] contiguous, and the flat
    (page, slot) row [B * L] of each position in pages.view(-1, Hkv, D)."""
    page_size = pages.shape[1]
    pos = torch.arange(kv_len, device=pages.device)
    rows = page_table.to(device=pages.device, dtype=torch.long)[:, pos // page_size] * page_size + pos % page_size
    rows = rows.flatten()  # [B * L]
    kv = pages.view(-1, *pages.shape[2:]).index_select(0, rows)  # [B * L, Hkv, D] of [num_pages * page_size, ...]
    return kv.view(page_table.shape[0], kv_len, *pages.shape[2:]).transpose(1, 2).float().contiguous(), rows


def _heads_as_rows(t, Hkv):
    """[B, C, H, D] -> fp32 [B, Hkv, G*C, D]: row g*C + i is query i of head kv*G + g (may be a view of t)."""
    B, C, H, D = t.shape
    return t.float().view(B, C, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, H // Hkv * C, D)


def _rows_as_heads(t, C):
    """[B, Hkv, G*C, D] -> [B, C, H, D] (the inverse of _heads_as_rows)."""
    B, Hkv, GC, D = t.shape
    return t.view(B, Hkv, GC // C, C, D).permute(0, 3, 1, 2, 4).reshape(B, C, Hkv * (GC // C), D)


def _dense_scores(qs, k, C, q_start, doc_start=None):
    """Masked scores [B, Hkv, G*C, L] of pre-scaled rows qs [B, Hkv, G*C, D] against k [B, Hkv, L, D]: key position
    j is hidden from query i (position q_start + i) where j > q_start + i (one in-place masked_fill_), and with
    doc_start [B, (Hkv,) C] where j < doc_start[.., i] (packed documents)."""
    s = qs @ k.transpose(-1, -2)
    B, Hkv, GC, L = s.shape
    if L > q_start + 1:  # positions 0..q_start are visible to every query: mask only the columns after them
        cols = torch.arange(q_start + 1, L, device=k.device)
        hidden = cols > (q_start + torch.arange(C, device=k.device))[:, None]  # [C, L - q_start - 1]
        s.view(B, Hkv, GC // C, C, L)[..., q_start + 1:].masked_fill_(hidden, float("-inf"))
    if doc_start is not None:  # only the columns before the latest document start can be hidden (one host sync)
        hi = min(L, int(doc_start.max()))
        if hi > 0:
            before = torch.arange(hi, device=k.device) < _doc_rows(doc_start, B, C)[:, :, None, :, None]
            s.view(B, Hkv, GC // C, C, L)[..., :hi].masked_fill_(before, float("-inf"))  # [B,Hkv|1,1,C,hi]
    return s


def _dense_forward(q, k_pages, v_pages, page_table, q_start, scale, kv_len, doc_start=None):
    """o [B, C, H, D] fp32 and lse [B, H, C] for a 2-D table: lse = logsumexp(s) and p = exp(s - lse) from one
    exp (s - max, exponentiated in place), o = p @ v. A row with no visible position gets o = 0, lse = -inf."""
    B, C, H, D = q.shape
    Hkv = k_pages.shape[2]
    k, _ = _dense_kv(k_pages, page_table, kv_len)  # [B, Hkv, L, D]
    v, _ = _dense_kv(v_pages, page_table, kv_len)
    s = _dense_scores(_heads_as_rows(q, Hkv) * scale, k, C, q_start, doc_start)  # [B, Hkv, G*C, L]
    # Under autograd (the tests differentiate through this function) the same steps out of place; the shift m is
    # a constant either way (lse = m + log(sum(exp(s - m))) does not depend on it).
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_pages, v_pages))
    m = s.detach().amax(dim=-1, keepdim=True)  # [B, Hkv, G*C, 1]
    m.masked_fill_(m == float("-inf"), 0.0)  # rows with nothing visible: exp(-inf - 0) = 0
    p = torch.exp(s - m) if grad else s.sub_(m).exp_()
    l = p.sum(dim=-1, keepdim=True)
    lse = (m + l.log()).view(B, H, C)  # head kv*G + g, query i: row g*C + i of kv head kv
    l = l.masked_fill(l == 0, 1.0)
    p = p / l if grad else p.div_(l)
    return _rows_as_heads(p @ v, C), lse


def _dense_backward(do, q, lse, delta, k_pages, v_pages, page_table, q_start, dk_pages, dv_pages, scale, kv_len,
                    doc_start=None):
    """paged_attention_reference_backward for a 2-D table: s recomputed, p = exp(s - lse), dS = p * (dP - delta)
    in place; dq = dS @ k * scale, dk = dS^T @ (q * scale), dv = p^T @ do; each kv position read once, so the
    page add is one indexed read-add-write per page tensor (sum in fp32, rounded once)."""
    B, C, H, D = q.shape
    Hkv = k_pages.shape[2]
    k, rows = _dense_kv(k_pages, page_table, kv_len)  # [B, Hkv, L, D], [B * L]
    v, _ = _dense_kv(v_pages, page_table, kv_len)
    qs = _heads_as_rows(q, Hkv) * scale  # [B, Hkv, G*C, D] (a new tensor: the rows may be a view of q)
    dog = _heads_as_rows(do, Hkv)
    lse = lse.float().reshape(B, Hkv, -1, 1)  # [B, Hkv, G*C, 1]
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # rows with nothing visible: p = 0
    p = _dense_scores(qs, k, C, q_start, doc_start).sub_(lse).exp_()  # [B, Hkv, G*C, L], 0 where masked
    ds = (dog @ v.transpose(-1, -2)).sub_(delta.float().reshape(B, Hkv, -1, 1)).mul_(p)  # dP -> dS in place
    dq = _rows_as_heads((ds @ k).mul_(scale), C)
    dk = ds.transpose(-1, -2) @ qs  # [B, Hkv, L, D]
    dv = p.transpose(-1, -2) @ dog
    for pages, grad in ((dk_pages, dk), (dv_pages, dv)):
        flat = pages.view(-1, Hkv, D)  # [num_pages * page_size, Hkv, D]
        grad = grad.transpose(1, 2).reshape(-1, Hkv, D)  # [B * L, Hkv, D], the order of rows
        if pages.dtype == torch.float32:
            flat.index_add_(0, rows, grad)
        else:  # the sum in fp32, rounded once
            flat.index_copy_(0, rows, flat.index_select(0, rows).float().add_(grad).to(pages.dtype))
    return dq


def _blocked(t, nb, q_block, Hkv, pad_value):
    """[B, H, C] per-query values -> [B, Hkv, group, nb, q_block], padded rows set to pad_value."""
    B, H, C = t.shape
    t = torch.nn.functional.pad(t.float(), (0, nb * q_block - C), value=pad_value)
    return t.view(B, Hkv, H // Hkv, nb, q_block)


def paged_attention_reference(q, k_pages, v_pages, page_table, q_start, scale=None, return_lse=False, kv_len=None,
                              q_block=None, doc_start=None):
    """o [B, C, H, D] fp32 (and natural-log lse [B, H, C]), for 2-D page tables and 4-D ones (one per kv head and
    block of q_block queries; see paged_attention_forward). Query i of the chunk (position q_start + i) sees the
    positions p < kv_len of its block's table with p <= q_start + i, and with doc_start ([B, C] or [B, Hkv, C]
    int, positions of the table) p >= doc_start[b, (kv head,) i]. A row that sees nothing gets o = 0,
    lse = -inf."""
    B, C, H, D = q.shape
    kv_len = q_start + C if kv_len is None else kv_len
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if page_table.dim() == 2:
        o, lse = _dense_forward(q, k_pages, v_pages, page_table, q_start, scale, kv_len, doc_start)
        return (o, lse) if return_lse else o
    page_table, q_block = _per_block(q, page_table, q_block)
    idx = _kv_index(page_table, kv_len, k_pages.shape[1], k_pages.shape[2], q.device)
    k, v = k_pages[idx].float(), v_pages[idx].float()  # [B, Hkv, nb, L, D]
    s, _ = _scores(q, k, q_start, q_block, scale, doc_start)  # [B, Hkv, group, nb, q_block, L]
    nb = s.shape[3]
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf")))  # a row seeing nothing: p = 0
    o = torch.einsum("bkgnil,bknld->bnikgd", p, v).reshape(B, nb * q_block, H, D)[:, :C]
    lse = lse.reshape(B, H, nb * q_block)[..., :C]
    return (o, lse) if return_lse else o


def paged_attention_reference_backward(do, q, lse, delta, k_pages, v_pages, page_table, q_start, dk_pages, dv_pages,
                                       scale=None, kv_len=None, q_block=None, doc_start=None):
    """The kernels' backward in plain fp32 PyTorch, for attention split into parts: with the merged lse and
    delta = rowsum(do * o) ([B, H, C] fp32) of all parts, P = exp(scale * q.k - lse) is this part's share of the
    softmax and dS = P * (dP - delta). Returns dq [B, C, H, D] fp32 and ADDS dK/dV of the positions 0..kv_len-1
    into dk_pages/dv_pages (fp32 or bf16: every position's sum formed in fp32, rounded once; a page several
    blocks selected gets all their contributions)."""
    B, C, H, D = q.shape
    Hkv = k_pages.shape[2]
    kv_len = q_start + C if kv_len is None else kv_len
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if page_table.dim() == 2:
        return _dense_backward(do, q, lse, delta, k_pages, v_pages, page_table, q_start, dk_pages, dv_pages, scale,
                               kv_len, doc_start)
    page_table, q_block = _per_block(q, page_table, q_block)
    idx = _kv_index(page_table, kv_len, k_pages.shape[1], Hkv, q.device)
    k, v = k_pages[idx].float(), v_pages[idx].float()  # [B, Hkv, nb, L, D]
    s, qb = _scores(q, k, q_start, q_block, scale, doc_start)
    nb = s.shape[3]
    p = torch.exp(s - _blocked(lse, nb, q_block, Hkv, float("inf"))[..., None])  # 0 where masked or padded
    dob = torch.nn.functional.pad(do.float(), (0, 0, 0, 0, 0, nb * q_block - C)).view(qb.shape)
    dp = torch.einsum("bnikgd,bknld->bkgnil", dob, v)
    ds = p * (dp - _blocked(delta, nb, q_block, Hkv, 0.0)[..., None])
    dq = torch.einsum("bkgnil,bknld->bnikgd", ds, k).reshape(B, nb * q_block, H, D)[:, :C] * scale
    dk = torch.einsum("bkgnil,bnikgd->bknld", ds, qb) * scale  # [B, Hkv, nb, L, D]
    dv = torch.einsum("bkgnil,bnikgd->bknld", p, dob)
    phys, slot, head = idx
    rows = ((phys * k_pages.shape[1] + slot) * Hkv + head).flatten()  # flat [num_pages * page_size * Hkv] rows
    dk, dv = dk.flatten(0, -2), dv.flatten(0, -2)
    if nb > 1:  # blocks may share pages: sum each row's contributions first
        rows, inverse = torch.unique(rows, return_inverse=True)
        dk, dv = (torch.zeros(len(rows), D, device=q.device).index_add_(0, inverse, g) for g in (dk, dv))
    for pages, grad in ((dk_pages, dk), (dv_pages, dv)):
        flat = pages.view(-1, D)
        if pages.dtype == torch.float32:
            flat.index_add_(0, rows, grad)
        else:  # the sum in fp32, rounded once
            flat.index_copy_(0, rows, flat.index_select(0, rows).float().add_(grad).to(pages.dtype))
    return dq
