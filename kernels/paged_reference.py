"""Plain-PyTorch fp32 paged attention: the meaning of the Triton kernels (kernels/paged_attention.py), forward and
backward, over the same pages and page tables, and the kernel the chunked step runs on CPU tensors without Triton's
interpreter (attention.ReferenceKernel).

Layouts as in kernels/paged_attention.py: q [B, C, H, D] at positions q_start..; pages [num_pages, page_size,
Hkv, D]; page_table [B, n] (one table per batch row) or [B, Hkv, cdiv(C, q_block), n] (one per kv head and block
of q_block queries, sparse attention); lse [B, H, C] natural log. Everything is gathered into dense fp32 tensors,
so memory grows as C x kv_len: a reference, and a CPU fallback, not a long-sequence kernel.
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


def _scores(q, k, q_start, q_block, scale):
    """Masked scaled scores [B, Hkv, group, nb, q_block, L] fp32 of q [B, C, H, D] against k [B, Hkv, nb, L, D],
    and q as [B, nb, q_block, Hkv, group, D] (rows past C are zero padding)."""
    B, C, H, D = q.shape
    Hkv, nb, L = k.shape[1], k.shape[2], k.shape[3]
    pad = nb * q_block - C
    qb = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(B, nb, q_block, Hkv, H // Hkv, D)
    s = torch.einsum("bnikgd,bknld->bkgnil", qb, k) * scale
    q_pos = q_start + torch.arange(nb * q_block, device=q.device).view(nb, q_block)
    return s.masked_fill(torch.arange(L, device=q.device) > q_pos[..., None], float("-inf")), qb


def _blocked(t, nb, q_block, Hkv, pad_value):
    """[B, H, C] per-query values -> [B, Hkv, group, nb, q_block], padded rows set to pad_value."""
    B, H, C = t.shape
    t = torch.nn.functional.pad(t.float(), (0, nb * q_block - C), value=pad_value)
    return t.view(B, Hkv, H // Hkv, nb, q_block)


def paged_attention_reference(q, k_pages, v_pages, page_table, q_start, scale=None, return_lse=False, kv_len=None,
                              q_block=None):
    """o [B, C, H, D] fp32 (and natural-log lse [B, H, C]), for 2-D page tables and 4-D ones (one per kv head and
    block of q_block queries; see paged_attention_forward). Query i of the chunk (position q_start + i) sees the
    positions p < kv_len of its block's table with p <= q_start + i."""
    B, C, H, D = q.shape
    kv_len = q_start + C if kv_len is None else kv_len
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    page_table, q_block = _per_block(q, page_table, q_block)
    idx = _kv_index(page_table, kv_len, k_pages.shape[1], k_pages.shape[2], q.device)
    k, v = k_pages[idx].float(), v_pages[idx].float()  # [B, Hkv, nb, L, D]
    s, _ = _scores(q, k, q_start, q_block, scale)  # [B, Hkv, group, nb, q_block, L]
    nb = s.shape[3]
    o = torch.einsum("bkgnil,bknld->bnikgd", torch.softmax(s, dim=-1), v).reshape(B, nb * q_block, H, D)[:, :C]
    lse = torch.logsumexp(s, dim=-1).reshape(B, H, nb * q_block)[..., :C]
    return (o, lse) if return_lse else o


def paged_attention_reference_backward(do, q, lse, delta, k_pages, v_pages, page_table, q_start, dk_pages, dv_pages,
                                       scale=None, kv_len=None, q_block=None):
    """The kernels' backward in plain fp32 PyTorch, for attention split into parts: with the merged lse and
    delta = rowsum(do * o) ([B, H, C] fp32) of all parts, P = exp(scale * q.k - lse) is this part's share of the
    softmax and dS = P * (dP - delta). Returns dq [B, C, H, D] fp32 and ADDS dK/dV of the positions 0..kv_len-1
    into dk_pages/dv_pages (fp32 or bf16: every position's sum formed in fp32, rounded once; a page several
    blocks selected gets all their contributions)."""
    B, C, H, D = q.shape
    Hkv = k_pages.shape[2]
    kv_len = q_start + C if kv_len is None else kv_len
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    page_table, q_block = _per_block(q, page_table, q_block)
    idx = _kv_index(page_table, kv_len, k_pages.shape[1], Hkv, q.device)
    k, v = k_pages[idx].float(), v_pages[idx].float()  # [B, Hkv, nb, L, D]
    s, qb = _scores(q, k, q_start, q_block, scale)
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
        flat[rows] = (flat[rows].float() + grad).to(pages.dtype)
    return dq
