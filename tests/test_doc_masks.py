"""Document masks (packed sequences, doc_start): the chunked step equals full-sequence autograd under the
block-diagonal causal mask with positions restarting at each document; the kernels let a query see its own
document only; sparse selection stays inside the document.

fp32, tiny shapes (chunk 32, page 16). The reference kernel (plain PyTorch) runs the store variants; the Triton
kernels (the interpreter here, compiled on a GPU) run the paged store once and the kernel-level test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from attention import ReferenceKernel, TritonKernel
from chunk_train import chunked_loss, chunked_step, chunked_token_losses
from kernels.paged_attention import paged_attention_forward
from kernels.paged_attention_backward import paged_attention_backward
from model import IGNORE_INDEX, check_doc_start
from offload import OffloadedKVStore
from paged_kv import PagedKVStore
from sparse_attn import MeanKey, PageSelector, SparseConfig
from test_chunk_train import DEVICE, assert_grads_match, tiny_model


def doc_starts(T, boundaries):
    """[B, T] document starts from each row's list of document first positions (0 first)."""
    ds = torch.zeros(len(boundaries), T, dtype=torch.long)
    for b, firsts in enumerate(boundaries):
        for first in firsts:
            ds[b, first:] = first
    return ds.to(DEVICE)


# row 0: a document across the chunk boundary at 32, three 1-token documents (32, 33, 34: one exactly at a chunk
# start), one across the boundary at 64; row 1: other boundaries, one exactly at the chunk start 64
BOUNDARIES = [[0, 20, 32, 33, 34, 70], [0, 7, 50, 64, 65]]
STORES = {
    "paged-reference": lambda m, B, T: PagedKVStore.for_sequence(m, B, T, 16, torch.float32, DEVICE,
                                                                 kernel=ReferenceKernel()),
    "paged-triton": lambda m, B, T: PagedKVStore.for_sequence(m, B, T, 16, torch.float32, DEVICE,
                                                              kernel=TritonKernel()),
    # budget 2 pages (sink + recent) >= every block's document history here: exact
    "sparse": lambda m, B, T: PagedKVStore.for_sequence(m, B, T, 16, torch.float32, DEVICE, kernel=ReferenceKernel(),
                                                        sparse=SparseConfig(budget=32, q_block=16)),
    "offloaded": lambda m, B, T: OffloadedKVStore.for_sequence(m, B, T, 16, torch.float32, DEVICE, cache_tokens=48,
                                                               kernel=ReferenceKernel()),
    "offloaded-sparse": lambda m, B, T: OffloadedKVStore.for_sequence(
        m, B, T, 16, torch.float32, DEVICE, cache_tokens=160, kernel=ReferenceKernel(),
        sparse=SparseConfig(budget=32, q_block=16)),
}


@pytest.mark.parametrize("store_kind,T", [("paged-reference", 96), ("paged-triton", 64), ("sparse", 96),
                                          ("offloaded", 96), ("offloaded-sparse", 96)])
def test_chunked_step_with_documents_equals_block_diagonal_full_sequence(store_kind, T):
    model = tiny_model(5, num_hidden_layers=1)  # one layer: the masks are per layer, and the interpreter is slow
    B = 2
    g = torch.Generator().manual_seed(T)
    idx = torch.randint(0, 256, (B, T), generator=g).to(DEVICE)
    targets = torch.randint(0, 256, (B, T), generator=g).to(DEVICE)
    targets[1, 40:52] = IGNORE_INDEX
    ds = doc_starts(T, [[f for f in firsts if f < T] for firsts in BOUNDARIES])
    # the reference: full-sequence autograd through an explicit block-diagonal causal mask and per-document
    # positions, written here rather than taken from Model.hidden(doc_start=...)
    t = torch.arange(T, device=DEVICE)
    mask = (t[None, None, :] <= t[None, :, None]) & (t[None, None, :] >= ds[:, :, None])  # [B, T, T]

    def masked_attention(q, k, v, layer_idx):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask[:, None], enable_gqa=True)
        return o.transpose(1, 2)

    class Positions(torch.nn.Module):  # the model with RoPE at t - doc_start
        def rope(self, start_pos, length, device, doc_start=None):
            return model.rope(0, length, device, doc_start=ds)

    model.zero_grad(set_to_none=True)
    x = model.embed(idx)
    cos, sin = Positions().rope(0, T, idx.device)
    for block in model.layers:
        x = block(x, cos, sin, masked_attention)
    logits = model.head(x)
    ref_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # Model.forward's own doc_start path agrees
        assert torch.allclose(model(idx, doc_start=ds), logits, atol=1e-5, rtol=1e-5)

    store = STORES[store_kind](model, B, T)
    loss = chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store, doc_start=ds)
    assert abs(loss - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert_grads_match(model, ref)
    model.zero_grad(set_to_none=True)
    if store_kind == "paged-reference":  # evaluation through the same masks
        assert abs(chunked_loss(model, idx, targets, 32, 16, store=store, doc_start=ds) - ref_loss.item()) <= 1e-5
        per_token = chunked_token_losses(model, idx, targets, 32, 16, store=store, doc_start=ds)
        want = F.cross_entropy(logits.detach().transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
        assert torch.allclose(per_token, want, atol=1e-5, rtol=1e-5)


def masked_reference(q, k, v, q_pos, doc_lo):
    """Plain fp32 attention of q [B, C, H, D] over k, v [B, L, Hkv, D] with key j visible to query i iff
    doc_lo[b, i] <= j <= q_pos[i]; rows that see nothing give 0."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    j = torch.arange(k.shape[1], device=q.device)
    visible = (j[None, None, :] <= q_pos[None, :, None]) & (j[None, None, :] >= doc_lo[:, :, None])  # [B, C, L]
    s = s.masked_fill(~visible[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v)


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_kernel_rows_see_only_their_document(kernel):
    """A chunk of 40 queries at positions 24.. over a paged history, kv_len cut short as in an offloaded
    history part (some rows see nothing of it), document starts of every kind: before the part, inside it, after
    it, at a tile boundary, one per row. Forward and dq/dk/dv against the plain masked reference."""
    torch.manual_seed(0)
    B, C, H, Hkv, D, ps, q_start = 2, 40, 4, 2, 16, 16, 24
    n_pages = math.ceil((q_start + C) / ps)
    k_pages = torch.randn(B * n_pages + 2, ps, Hkv, D, device=DEVICE)
    v_pages = torch.randn_like(k_pages)
    table = torch.randperm(B * n_pages + 2, device=DEVICE)[:B * n_pages].view(B, n_pages).int()
    q = torch.randn(B, C, H, D, device=DEVICE)
    q_pos = q_start + torch.arange(C, device=DEVICE)
    doc = torch.stack([torch.where(q_pos >= 40, 40, 5), torch.where(q_pos >= 33, q_pos, 16)])  # [B, C]
    for kv_len in (q_start + C, 28):  # the whole table; a history part ending at 28 (rows from 40 see nothing)
        rows = (table.long()[:, torch.arange(kv_len, device=DEVICE) // ps] * ps + torch.arange(kv_len, device=DEVICE)
                % ps)  # [B, L] flat rows of the pool
        k = k_pages.view(-1, Hkv, D)[rows].requires_grad_()
        v = v_pages.view(-1, Hkv, D)[rows].requires_grad_()
        qr = q.clone().requires_grad_()
        want = masked_reference(qr, k, v, q_pos, doc)
        do = torch.randn_like(want)
        want.backward(do)
        dk_pages, dv_pages = torch.zeros_like(k_pages), torch.zeros_like(v_pages)
        if kernel == "triton":
            o, lse = paged_attention_forward(q, k_pages, v_pages, table, q_start, kv_len=kv_len, doc_start=doc)
            dq = paged_attention_backward(do, q, o, lse, k_pages, v_pages, table, q_start, dk_pages, dv_pages,
                                          kv_len=kv_len, doc_start=doc)
        else:
            from attention import Part
            part = Part(k_pages, v_pages, dk_pages, dv_pages, table, q_start, kv_len, doc_start=doc)
            o, lse = ReferenceKernel().forward(q, part)
            from kernels.paged_attention import softmax_delta
            dq = ReferenceKernel().backward(do, q, lse, softmax_delta(do, o), part)
        assert torch.allclose(o, want, atol=1e-5), f"kv_len {kv_len}"
        assert torch.allclose(dq, qr.grad, atol=1e-5)
        for pages, grad in ((dk_pages, k.grad), (dv_pages, v.grad)):
            assert torch.allclose(pages.view(-1, Hkv, D)[rows], grad, atol=1e-5)
        seen = torch.zeros(k_pages.shape[0] * ps, dtype=torch.bool, device=DEVICE)
        seen[rows.flatten()] = True
        assert (dk_pages.view(-1, Hkv, D)[~seen] == 0).all()  # nothing outside the table touched
        if kv_len == 28:
            assert (lse[0, :, 16:] == float("-inf")).all() and (o[0, 16:] == 0).all()


def test_sparse_selection_stays_inside_the_document():
    """PageSelector.select with documents: no page wholly before a block's (first query's) document, the
    document's first page always (the sink), the budget filled from the document's pages, -1 for the rest."""
    torch.manual_seed(1)
    ps, q_block, Hkv, H, D = 16, 16, 2, 4, 16
    sel = PageSelector(64, Hkv, D, ps, SparseConfig(budget=64, q_block=q_block, rule=MeanKey()), torch.float32,
                       DEVICE)
    B, start, C = 2, 160, 64  # 10 history pages, 4 blocks, 4 pages per block
    table = torch.arange(B * 14, device=DEVICE, dtype=torch.int32).view(B, 14)
    sel.summaries.normal_()
    q = torch.randn(B, C, H, D, device=DEVICE)
    ds = torch.tensor([[0] * 16 + [70] * 16 + [150] * 16 + [170] * 16,
                       [100] * 20 + [160] * 44], device=DEVICE)
    chosen = sel.select(q, table, start, ds)  # [B, Hkv, 4, 4]
    assert chosen.shape == (B, Hkv, 4, 4)
    for b in range(B):
        for blk in range(4):
            first = int(ds[b, blk * q_block]) // ps  # the block's first query's document's first page
            eligible = max(0, 10 - first)
            for h in range(Hkv):
                pages = chosen[b, h, blk]
                real = pages[pages >= 0]
                assert (real >= first).all() and (real < 10).all() and len(set(real.tolist())) == len(real)
                assert len(real) == min(4, eligible)  # the budget spent on eligible pages only
                if eligible:
                    assert first in real.tolist() and 9 in real.tolist()  # the sink and recent pages
    without = sel.select(q, table, start)
    assert (without >= 0).all() and (without[..., 0] == 0).all()  # the plain rule: page 0 is the sink


def test_bad_doc_start():
    idx = torch.zeros(2, 8, dtype=torch.long)
    check_doc_start(None, idx)
    check_doc_start(torch.tensor([[0, 0, 2, 2, 2, 5, 6, 6]] * 2), idx)
    for bad in (torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 8), torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0]] * 2),
                torch.tensor([[0, 0, 3, 3, 3, 3, 3, 3]] * 2), torch.tensor([[-1] * 8] * 2)):
        with pytest.raises(ValueError, match="doc_start"):
            check_doc_start(bad, idx)
    model = tiny_model(0)
    with pytest.raises(ValueError, match="doc_start"):
        chunked_step(model, idx, idx, 16, 16, doc_start=torch.ones(2, 8, dtype=torch.long))


def random_doc_starts(B, C, first, generator):
    """int32 [B, C] nondecreasing document starts (absolute positions first..), each <= its query's position."""
    pos = first + torch.arange(C)
    cuts = (torch.rand(B, C, generator=generator) < 0.1) * pos  # a document starts where a cut falls
    return torch.cummax(cuts, dim=1).values.int().to(DEVICE)


def test_reference_doc_mask_on_leading_columns_equals_full_mask():
    """The reference kernel masks document starts only in the columns before the latest one: the same scores as
    masking every column, for starts before, inside and past the part (and none at all)."""
    from kernels.paged_reference import _dense_scores
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, C, D, q_start = 2, 2, 2, 24, 8, 40
    for L, shift in ((q_start + C, 0), (30, 0), (q_start + C, -q_start)):  # whole table; a short part; starts 0
        qs = torch.randn(B, Hkv, G * C, D, generator=g).to(DEVICE)
        k = torch.randn(B, Hkv, L, D, generator=g).to(DEVICE)
        doc = (random_doc_starts(B, C, q_start, g) + shift).clamp(min=0)
        want = _dense_scores(qs, k, C, q_start)
        hidden = torch.arange(L, device=DEVICE) < doc.long()[:, None, None, :, None]
        want.view(B, Hkv, G, C, L).masked_fill_(hidden, float("-inf"))
        assert torch.equal(_dense_scores(qs, k, C, q_start, doc), want), (L, shift)
