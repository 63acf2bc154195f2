"""Page-level sparse attention (sparse_attn.py and the kernels' per-block page tables) against references.

- kernel: random selections as 4-D page tables vs the plain-PyTorch reference, forward and backward, and vs the
  masked-dense meaning of the selection (sparse_attention_reference);
- a selection covering all history equals dense attention (kernel and whole chunked step);
- a whole chunked sparse step equals full-sequence backprop through masked-dense attention with the same selections
  (fp32, rel. err <= 1e-5): the gradient is exact for the sparse model;
- stage 1 and stage 2 select the same pages, and the selection rule keeps sink, recent and top-scoring pages.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from attention import Part, ReferenceKernel
from chunk_train import chunked_step
from kernels.paged_attention import paged_attention_backward, paged_attention_forward, softmax_delta
from kernels.paged_reference import paged_attention_reference
from paged_kv import PagedKVStore
from sparse_attn import PageSelector, sparse_attention_reference
from test_chunk_train import assert_grads_match, full_sequence_grads, tiny_model
from test_paged_attention import DEVICE, assert_close, seed_of


def make_sparse_problem(B, C, n_hist, n_sel, H, Hkv, D, page_size, q_block, dtype, seed):
    """Random q/do, shuffled physical pages (unused slots NaN), and a 4-D table: each (b, kv head, block) a random
    subset of n_sel of the n_hist history pages, in random order, then the chunk's own pages."""
    g = torch.Generator().manual_seed(seed)
    n_own = -(-C // page_size)
    num_pages = 2 * B * (n_hist + n_own) + 3
    phys = torch.randperm(num_pages, generator=g)[: B * (n_hist + n_own)].view(B, n_hist + n_own)
    nb = -(-C // q_block)
    sel = torch.stack([torch.randperm(n_hist, generator=g)[:n_sel] for _ in range(B * Hkv * nb)]).view(B, Hkv, nb,
                                                                                                        n_sel)
    hist = torch.gather(phys[:, None, None, :n_hist].expand(B, Hkv, nb, n_hist), 3, sel)
    table = torch.cat([hist, phys[:, None, None, n_hist:].expand(B, Hkv, nb, n_own)], 3).to(torch.int32)
    valid = torch.zeros(num_pages, page_size, dtype=torch.bool)
    valid[phys[:, :n_hist]] = True
    pos = torch.arange(C)
    valid[phys[:, n_hist + pos // page_size], pos % page_size] = True
    pages = []
    for _ in range(2):
        p = torch.full((num_pages, page_size, Hkv, D), float("nan"))
        p[valid] = torch.randn(int(valid.sum()), Hkv, D, generator=g)
        pages.append(p.to(dtype).to(DEVICE))
    q = torch.randn(B, C, H, D, generator=g).to(dtype).to(DEVICE)
    do = torch.randn(B, C, H, D, generator=g).to(dtype).to(DEVICE)
    prefill = [torch.randn(num_pages, page_size, Hkv, D, generator=g).to(DEVICE) for _ in range(2)]
    return dict(q=q, do=do, k_pages=pages[0], v_pages=pages[1], table=table.to(DEVICE), phys=phys, sel=sel,
                q_start=n_sel * page_size, prefill=prefill)


@pytest.mark.parametrize("B,C,n_hist,n_sel,Hkv,D,page_size,q_block,dtype", [
    (2, 40, 6, 3, 2, 16, 16, 16, torch.float32),   # 3 blocks, the last partial; GQA 2:1
    (1, 64, 5, 2, 1, 32, 16, 32, torch.bfloat16),  # GQA 4:1, bf16
    (2, 33, 4, 4, 2, 16, 32, 16, torch.float32),   # every page selected, in a shuffled order
    (1, 24, 0, 0, 2, 16, 16, 16, torch.float32),   # no history: the chunk alone
])
def test_kernel_matches_reference(B, C, n_hist, n_sel, Hkv, D, page_size, q_block, dtype):
    H = 4
    p = make_sparse_problem(B, C, n_hist, n_sel, H, Hkv, D, page_size, q_block, dtype,
                            seed_of("sparse", B, C, n_hist, n_sel, dtype))
    q = p["q"].float().requires_grad_()
    kp, vp = (p[name].float().requires_grad_() for name in ("k_pages", "v_pages"))
    ref_o, ref_lse = paged_attention_reference(q, kp, vp, p["table"], p["q_start"], return_lse=True, q_block=q_block)
    ref_o.backward(p["do"].float())

    o, lse = paged_attention_forward(p["q"], p["k_pages"], p["v_pages"], p["table"], p["q_start"], q_block=q_block)
    assert_close(o, ref_o, dtype, "o")
    assert_close(lse, ref_lse, torch.float32, "lse")
    dk, dv = (t.clone() for t in p["prefill"])
    dq = paged_attention_backward(p["do"], p["q"], o, lse, p["k_pages"], p["v_pages"], p["table"], p["q_start"],
                                  dk, dv, q_block=q_block)
    assert_close(dq, q.grad, dtype, "dq")
    # pages no block selected (and unused slots) get no gradient and are left bit-for-bit alone
    touched = (kp.grad != 0).any(-1).any(-1)
    assert touched.sum() > 0
    for name, got, pre, ref in (("dk", dk, p["prefill"][0], kp.grad), ("dv", dv, p["prefill"][1], vp.grad)):
        assert_close(got[touched], pre[touched] + ref[touched], dtype, f"{name}_pages")
        assert torch.equal(got[~touched], pre[~touched]), f"{name}_pages written outside the selection"

    # the same selection as a mask over the contiguous sequence: the masked-dense meaning
    page_size_ = page_size
    T = n_hist * page_size_ + C
    pos = torch.arange(T)
    logical = torch.cat([p["phys"][:, :n_hist], p["phys"][:, n_hist:]], 1)[:, pos // page_size_]  # [B, T]
    k_seq = p["k_pages"].float()[logical.to(DEVICE), (pos % page_size_).to(DEVICE)]
    v_seq = p["v_pages"].float()[logical.to(DEVICE), (pos % page_size_).to(DEVICE)]
    q_seq = torch.cat([torch.zeros(B, T - C, H, D, device=DEVICE), p["q"].float()], 1)
    masked = sparse_attention_reference(q_seq, k_seq, v_seq, {0: p["sel"][:, :, :0], T - C: p["sel"].to(DEVICE)},
                                        page_size_, q_block)
    assert_close(o, masked[:, T - C:], dtype, "o vs masked dense")


def test_kernel_with_kv_tiles_spanning_pages(wide_kv_tiles):
    """Forward and dQ tiles of two selected pages (dK/dV keeps one program per selected page)."""
    test_kernel_matches_reference(2, 40, 6, 3, 2, 16, 16, 16, torch.float32)


def test_full_selection_equals_dense_kernel():
    """Every block selecting every history page, in order: the 4-D path gives the 2-D (dense) path's results."""
    B, C, H, Hkv, D, ps, n_hist, q_block = 2, 48, 4, 2, 16, 16, 5, 16
    p = make_sparse_problem(B, C, n_hist, n_hist, H, Hkv, D, ps, q_block, torch.float32, seed_of("full"))
    dense_table = p["phys"].to(torch.int32).to(DEVICE)
    nb = -(-C // q_block)
    full = dense_table[:, None, None].expand(B, Hkv, nb, dense_table.shape[1]).contiguous()
    results = []
    for table, qb in ((dense_table, None), (full, q_block)):
        o, lse = paged_attention_forward(p["q"], p["k_pages"], p["v_pages"], table, n_hist * ps, q_block=qb)
        dk, dv = (t.clone() for t in p["prefill"])
        dq = paged_attention_backward(p["do"], p["q"], o, lse, p["k_pages"], p["v_pages"], table, n_hist * ps,
                                      dk, dv, q_block=qb)
        results.append((o, lse, dq, dk, dv))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _step(model, idx, targets, chunk, page, sparse, log=None, output_cache_bytes=0):
    store = PagedKVStore.for_sequence(model, idx.shape[0], idx.shape[1], page, torch.float32, idx.device,
                                      sparse=sparse, output_cache_bytes=output_cache_bytes)
    store.selector.log = log
    model.zero_grad(set_to_none=True)
    loss = chunked_step(model, idx, targets, chunk_size=chunk, page_size=page, store=store)
    return loss, store


def test_budget_covering_history_equals_dense():
    model = tiny_model(11)
    g = torch.Generator().manual_seed(11)
    idx, targets = (torch.randint(0, 256, (2, 200), generator=g).to(DEVICE) for _ in range(2))
    ref_loss, ref = full_sequence_grads(model, idx, targets)
    loss, store = _step(model, idx, targets, 64, 16, dict(budget=256, q_block=32))
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert_grads_match(model, ref)
    assert store.allocator.num_free == store.allocator.num_pages and not any(store.selector.selections.values())


def test_sparse_step_is_exact_for_the_masked_model():
    """Budget 4 pages of 16 (sink, recent, 2 chosen) over up to 15 history pages: the chunked step's loss and
    gradients equal full-sequence backprop through masked-dense attention under the selections it used. (With
    stage 1's attention outputs kept for stage 2, which then reuses them with the stored selections.)"""
    model = tiny_model(12)
    T, chunk, page, q_block = 256, 64, 16, 32
    g = torch.Generator().manual_seed(12)
    idx, targets = (torch.randint(0, 256, (2, T), generator=g).to(DEVICE) for _ in range(2))
    log = []
    loss, _ = _step(model, idx, targets, chunk, page, dict(budget=64, q_block=q_block), log, output_cache_bytes=2**30)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    selections = {}
    for layer, start, sel in log:
        selections.setdefault(layer, {})[start] = sel
    assert any(sel.shape[3] < start // page for layer, start, sel in log)  # some chunks are really sparse

    def masked(q, k, v, layer):
        return sparse_attention_reference(q, k, v, selections[layer], page, q_block)
    model.zero_grad(set_to_none=True)
    ref_loss = F.cross_entropy(model(idx, attn=masked).flatten(0, 1), targets.flatten())
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= 1e-5 * ref_loss.item()
    for n, p in model.named_parameters():
        p.grad, ref = grads[n], p.grad
        assert ((p.grad - ref).norm() / ref.norm()).item() <= 1e-5, n


class _Recomputing(PageSelector):
    """Chooses afresh at every call (forgets stored selections): shows stage 2's recomputed queries would choose
    what stage 1 chose, i.e. storing the choice changes nothing but cost."""

    def page_table(self, layer, q, table, start):
        self.selections.get(layer, {}).pop(start, None)
        self.kernel_tables.get(layer, {}).pop(start, None)
        return super().page_table(layer, q, table, start)


def test_stages_select_the_same_pages():
    model = tiny_model(13)
    T, chunk, page = 192, 32, 16
    idx = torch.randint(0, 256, (1, T), device=DEVICE)
    for selector_cls in (PageSelector, _Recomputing):
        store = PagedKVStore.for_sequence(model, 1, T, page, torch.float32, idx.device,
                                          sparse=dict(budget=48, q_block=16))
        store.selector.__class__ = selector_cls
        store.selector.log = log = []
        chunked_step(model, idx, idx, chunk_size=chunk, page_size=page, store=store)
        by_call = {}
        for layer, start, sel in log:
            by_call.setdefault((layer, start), []).append(sel)
        # every chunk but the last is attended in stage 1 (all layers but the last) and stage 2
        assert sum(len(v) == 2 for v in by_call.values()) == (T // chunk - 1) * (model.config.num_hidden_layers - 1)
        for key, sels in by_call.items():
            assert all(torch.equal(s, sels[0]) for s in sels), f"stage 1 and 2 selections differ at {key}"


def test_selection_rule():
    """Sink and recent pages always; the rest the top scores of block-mean query . page-mean key, max over the
    group's heads; scores recomputed here by brute force."""
    B, C, H, Hkv, D, ps, q_block, n_pages = 2, 40, 4, 2, 16, 16, 16, 13
    sel = PageSelector(64, Hkv, D, ps, budget=5 * ps, dtype=torch.float32, device=DEVICE, q_block=q_block)
    g = torch.Generator().manual_seed(5)
    table = torch.randperm(64, generator=g)[: B * n_pages].view(B, n_pages).to(torch.int32).to(DEVICE)
    k = torch.randn(B, n_pages * ps, Hkv, D, generator=g).to(DEVICE)
    sel.write(table, k)
    q = torch.randn(B, C, H, D, generator=g).to(DEVICE)
    start = 10 * ps  # ten history pages, budget five
    chosen = sel.select(q, table, start)
    assert chosen.shape == (B, Hkv, math.ceil(C / q_block), 5)
    page_means = k.view(B, n_pages, ps, Hkv, D).mean(2)
    for b in range(B):
        for kvh in range(Hkv):
            for blk in range(chosen.shape[2]):
                rows = q[b, blk * q_block:(blk + 1) * q_block, kvh * 2:(kvh + 1) * 2].mean(0)  # [G, D]
                scores = (rows @ page_means[b, :10, kvh].T).amax(0)  # [10]
                got = set(chosen[b, kvh, blk].tolist())
                assert {0, 9} <= got and len(got) == 5  # sink, recent
                rest = [p for p in range(1, 9)]
                top = sorted(rest, key=lambda p: -scores[p].item())[:3]
                assert got == {0, 9, *top}
    pages, q_start = sel.page_table(0, q, table, start)  # selected physical pages, then the chunk's own
    assert q_start == 5 * ps and pages.shape == (B, Hkv, chosen.shape[2], 5 + 3)
    assert torch.equal(pages[..., :5].long(), torch.gather(table.long()[:, None, None].expand(B, Hkv, 3, n_pages), 3,
                                                           chosen))
    assert torch.equal(pages[..., 5:], table[:, None, None, 10:13].expand(B, Hkv, 3, 3))
    assert torch.equal(sel.page_table(0, q * 2, table, start)[0], pages)  # stored: the same however q changes
    sel.truncate(0, start)
    assert not sel.selections[0]
    with pytest.raises(ValueError, match="multiple of the page size"):
        PageSelector(8, Hkv, D, ps, budget=40, dtype=torch.float32, device=DEVICE)


def test_bad_page_tables():
    B, C, H, Hkv, D, ps = 1, 40, 4, 2, 16, 16
    p = make_sparse_problem(B, C, 3, 2, H, Hkv, D, ps, 16, torch.float32, seed_of("bad"))
    args = (p["q"], p["k_pages"], p["v_pages"])
    with pytest.raises(ValueError, match="needs q_block"):
        paged_attention_forward(*args, p["table"], p["q_start"])
    with pytest.raises(ValueError, match=r"cdiv\(C, q_block\)"):
        paged_attention_forward(*args, p["table"], p["q_start"], q_block=32)  # 2 blocks of 32, the table has 3
    with pytest.raises(ValueError, match="multiple of page_size"):
        paged_attention_forward(*args, p["table"], p["q_start"] + 1, q_block=16)
    with pytest.raises(ValueError, match="2-D or 4-D"):
        paged_attention_forward(*args, p["table"][0], p["q_start"], q_block=16)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_reference_kernel_backward_adds_per_block_gradients(grad_dtype):
    """attention.ReferenceKernel's explicit backward over a 4-D table (pages selected by several blocks: their
    contributions summed, in fp32, rounded once) equals autograd through the plain-PyTorch reference."""
    B, C, H, Hkv, D, ps, q_block = 2, 40, 4, 2, 16, 16, 16
    p = make_sparse_problem(B, C, 6, 4, H, Hkv, D, ps, q_block, torch.float32, seed_of("ref-bwd", grad_dtype))
    q = p["q"].float().requires_grad_()
    kp, vp = (p[name].float().requires_grad_() for name in ("k_pages", "v_pages"))
    ref_o, ref_lse = paged_attention_reference(q, kp, vp, p["table"], p["q_start"], return_lse=True, q_block=q_block)
    ref_o.backward(p["do"])
    dk, dv = (t.to(grad_dtype, copy=True) for t in p["prefill"])
    part = Part(p["k_pages"], p["v_pages"], dk, dv, p["table"], p["q_start"], q_block=q_block)
    kernel = ReferenceKernel()
    o, lse = kernel.forward(p["q"], part)
    assert_close(o, ref_o, torch.float32, "o")
    dq = kernel.backward(p["do"], p["q"], lse, softmax_delta(p["do"], o), part)
    assert_close(dq, q.grad, torch.float32, "dq")
    touched = (kp.grad != 0).any(-1).any(-1)
    tol = torch.float32 if grad_dtype == torch.float32 else torch.bfloat16
    for name, got, pre, ref in (("dk", dk, p["prefill"][0], kp.grad), ("dv", dv, p["prefill"][1], vp.grad)):
        assert_close(got[touched].float(), pre.to(grad_dtype)[touched].float() + ref[touched], tol, name)
        assert torch.equal(got[~touched], pre.to(grad_dtype)[~touched]), f"{name} written outside the selection"
