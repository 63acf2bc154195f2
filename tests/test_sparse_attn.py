"""Page-level sparse attention (sparse_attn.py and the kernels' per-block page tables) against references.

- kernel: random selections as 4-D page tables vs the plain-PyTorch reference, forward and backward, and vs the
  masked-dense meaning of the selection (sparse_attention_reference);
- a selection covering all history equals dense attention (kernel and whole chunked step);
- a whole chunked sparse step equals full-sequence backprop through masked-dense attention with the same selections
  (fp32, rel. err <= 1e-5): the gradient is exact for the sparse model;
- for each selection rule (MeanKey, Quest): stage 2's recomputed queries choose the pages stage 1 stored, and the
  selection keeps sink, recent and the top pages by the rule's score (recomputed by brute force);
- Quest's page score bounds the block-mean logit of every key in the page, and is tight for a one-key page.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from attention import Part, ReferenceKernel
from chunk_train import chunked_step
from kernels.paged_attention import paged_attention_forward, softmax_delta
from kernels.paged_attention_backward import paged_attention_backward
from kernels.paged_reference import paged_attention_reference
from paged_kv import PagedKVStore
from sparse_attn import MeanKey, PageSelector, Quest, SparseConfig, sparse_attention_reference
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


RULES = [pytest.param(MeanKey(), id="meankey"), pytest.param(Quest(), id="quest")]
T, CHUNK, PAGE, Q_BLOCK, BUDGET = 160, 32, 16, 16, 48  # the sparse step: 3-page budget (sink, recent, 1 chosen)


def _step(model, idx, targets, chunk, page, sparse, log=None, output_cache_bytes=0):
    store = PagedKVStore.for_sequence(model, idx.shape[0], idx.shape[1], page, torch.float32, idx.device,
                                      sparse=sparse, output_cache_bytes=output_cache_bytes)
    store.selector.log = log
    model.zero_grad(set_to_none=True)
    loss = chunked_step(model, idx, targets, chunk_size=chunk, page_size=page, store=store)
    return loss, store


@pytest.mark.parametrize("rule", RULES)
def test_budget_covering_history_equals_dense(rule):
    model = tiny_model(11)
    g = torch.Generator().manual_seed(11)
    idx, targets = (torch.randint(0, 256, (1, 88), generator=g).to(DEVICE) for _ in range(2))  # partial last page
    ref_loss, ref = full_sequence_grads(model, idx, targets)
    loss, store = _step(model, idx, targets, 32, 16, SparseConfig(budget=96, q_block=16, rule=rule))
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert_grads_match(model, ref)
    assert store.allocator.num_free == store.allocator.num_pages and not any(store.selector.selections.values())


@pytest.fixture(scope="module", params=RULES)
def sparse_run(request):
    """One chunked sparse step per rule (stage 1's attention outputs kept for stage 2, which then reuses them with
    the stored selections), with the log of every attention call's selections."""
    model = tiny_model(12)
    g = torch.Generator().manual_seed(12)
    idx, targets = (torch.randint(0, 256, (2, T), generator=g).to(DEVICE) for _ in range(2))
    log = []
    loss, store = _step(model, idx, targets, CHUNK, PAGE, SparseConfig(BUDGET, Q_BLOCK, rule=request.param), log,
                        output_cache_bytes=2**30)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return dict(model=model, idx=idx, targets=targets, loss=loss, grads=grads, log=log)


def test_sparse_step_is_exact_for_the_masked_model(sparse_run):
    """The chunked sparse step's loss and gradients equal full-sequence backprop through masked-dense attention
    (sparse_attention_reference) under the selections it used, for each rule."""
    model, log = sparse_run["model"], sparse_run["log"]
    selections = {}
    for call in log:
        selections.setdefault(call.layer, {})[call.start] = call.selection
    assert any(call.selection.shape[3] < call.start // PAGE for call in log)  # some chunks are really sparse

    def masked(q, k, v, layer):
        return sparse_attention_reference(q, k, v, selections[layer], PAGE, Q_BLOCK)
    model.zero_grad(set_to_none=True)
    ref_loss = F.cross_entropy(model(sparse_run["idx"], attn=masked).flatten(0, 1), sparse_run["targets"].flatten())
    ref_loss.backward()
    assert abs(sparse_run["loss"] - ref_loss.item()) <= 1e-5 * ref_loss.item()
    for n, p in model.named_parameters():
        err = ((sparse_run["grads"][n] - p.grad).norm() / p.grad.norm()).item()
        assert err <= 1e-5, f"{n}: relative error {err:.2e}"
    model.zero_grad(set_to_none=True)


def test_stages_select_the_same_pages(sparse_run):
    """Stage 2 reuses stage 1's stored selection; the selection stage 2's own recomputed queries would make (the
    log's `fresh`, computed from them and the page summaries) is the same: storing the choice changes nothing but
    cost, and the gradient belongs to the function stage 1 evaluated."""
    by_call = {}
    for call in sparse_run["log"]:
        by_call.setdefault((call.layer, call.start), []).append(call)
    # every chunk but the last is attended in stage 1 (all layers but the last) and stage 2
    layers = sparse_run["model"].config.num_hidden_layers
    assert sum(len(calls) == 2 for calls in by_call.values()) == (T // CHUNK - 1) * (layers - 1)
    sparse = compared = 0
    for key, calls in by_call.items():
        stage1, stage2 = calls[0], calls[-1]
        assert torch.equal(stage2.selection, stage1.selection), f"stage 2 did not reuse stage 1's selection at {key}"
        assert torch.equal(stage2.fresh, stage1.selection), f"stage 2's queries choose other pages at {key}"
        chosen = stage2.fresh.shape[3] < key[1] // PAGE  # by score, not everything (dense)
        sparse, compared = sparse + chosen, compared + (chosen and len(calls) == 2)
    assert sparse == layers * 3  # chunks 3-5 of every layer: 4, 6 and 8 history pages, budget 3
    assert compared == 2  # chosen in both stages: layer 0's chunks 3 and 4 (stage 1 skips the last layer and chunk)


def _mean_key_scores(q_mean, k_page):
    """q_mean [G, D] block-mean queries, k_page [n, D] a page's keys -> max over heads of q_mean . mean key."""
    return (q_mean @ k_page.mean(0)).amax()


def _quest_scores(q_mean, k_page):
    """max over heads of sum_c max(q_c min_c, q_c max_c) over the page's keys' per-channel min and max."""
    low, high = k_page.amin(0), k_page.amax(0)
    return torch.maximum(q_mean * low, q_mean * high).sum(-1).amax()


@pytest.mark.parametrize("rule,brute_force", [(MeanKey(), _mean_key_scores), (Quest(), _quest_scores)],
                         ids=["meankey", "quest"])
def test_selection_rule(rule, brute_force):
    """Sink and recent pages always; the rest the top scores of the rule, recomputed here by brute force from the
    keys and the block-mean queries of each group's heads."""
    B, C, H, Hkv, D, ps, q_block, n_pages = 2, 40, 4, 2, 16, 16, 16, 13
    sel = PageSelector(64, Hkv, D, ps, SparseConfig(budget=5 * ps, q_block=q_block, rule=rule), torch.float32,
                       DEVICE)
    assert sel.summaries.shape == (64, Hkv, *rule.summary_shape(D))
    g = torch.Generator().manual_seed(5)
    table = torch.randperm(64, generator=g)[: B * n_pages].view(B, n_pages).to(torch.int32).to(DEVICE)
    k = torch.randn(B, n_pages * ps, Hkv, D, generator=g).to(DEVICE)
    sel.write(table, k)
    q = torch.randn(B, C, H, D, generator=g).to(DEVICE)
    start = 10 * ps  # ten history pages, budget five
    chosen = sel.select(q, table, start)
    assert chosen.shape == (B, Hkv, math.ceil(C / q_block), 5)
    pages = k.view(B, n_pages, ps, Hkv, D)
    for b in range(B):
        for kvh in range(Hkv):
            for blk in range(chosen.shape[2]):
                q_mean = q[b, blk * q_block:(blk + 1) * q_block, kvh * 2:(kvh + 1) * 2].mean(0)  # [G, D]
                scores = [brute_force(q_mean, pages[b, p, :, kvh]).item() for p in range(10)]
                got = set(chosen[b, kvh, blk].tolist())
                assert {0, 9} <= got and len(got) == 5  # sink, recent
                top = sorted(range(1, 9), key=lambda p: -scores[p])[:3]
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
        PageSelector(8, Hkv, D, ps, SparseConfig(budget=40, rule=rule), torch.float32, DEVICE)


def test_quest_bounds_every_key_of_a_page():
    """Quest's score of a page is >= the block-mean query's logit with every key the page holds (partial pages:
    only the keys they hold), for every head of the group; it equals that logit for a page of one key (min = max:
    nothing held past the key leaks into the summary); and, the mean key being a mix of the keys, it is >=
    MeanKey's score."""
    g = torch.Generator().manual_seed(21)
    B, n, ps, Hkv, G, D, nb, q_block = 2, 5, 16, 2, 3, 16, 3, 8
    k = torch.randn(B, n, ps, Hkv, D, generator=g) * torch.rand(1, n, 1, 1, D, generator=g) * 3
    counts = torch.tensor([16, 9, 1, 16, 4])
    k[:, torch.arange(ps) >= counts[:, None]] = 0.0  # zero past what a page holds, as PageSelector passes it
    q = torch.randn(B, nb, q_block, Hkv, G, D, generator=g) + torch.randn(1, nb, 1, Hkv, G, D, generator=g)
    q_counts = torch.tensor([8, 8, 5])
    q[:, torch.arange(q_block)[None] >= q_counts[:, None]] = 0.0  # a partial last block
    quest = Quest().score(q, q_counts, Quest().summarize(k, counts))  # [B, Hkv, nb, n]
    mean_key = MeanKey().score(q, q_counts, MeanKey().summarize(k, counts))
    q_mean = q.sum(2) / q_counts.view(1, nb, 1, 1, 1)  # [B, nb, Hkv, G, D]
    logits = torch.einsum("bnkgd,bptkd->bkgnpt", q_mean, k)  # [B, Hkv, G, nb, n, ps]
    held = (torch.arange(ps) < counts[:, None]).expand_as(logits)
    best = logits.masked_fill(~held, float("-inf")).amax(-1).amax(2)  # [B, Hkv, nb, n]: best key, best head
    assert (quest >= best - 1e-5).all()
    torch.testing.assert_close(quest[..., 2], best[..., 2], rtol=1e-6, atol=1e-5)  # one key: the bound is tight
    assert (quest >= mean_key - 1e-5).all()
    assert (quest > best + 1e-3).any()  # a bound, not the max itself (which costs a pass over every key)


@pytest.mark.parametrize("rule", RULES)
def test_index_bytes_follow_the_rule(rule):
    """The memory plan's summary bytes (PageSelector.index_bytes) are what a store allocates, for each rule: Quest
    keeps (min, max), twice MeanKey's."""
    model = tiny_model(0)
    cfg, sparse = model.config, SparseConfig(budget=64, q_block=16, rule=rule)
    store = PagedKVStore.for_sequence(model, 2, 200, 16, torch.bfloat16, DEVICE, sparse=sparse)
    summaries, selections, _ = PageSelector.index_bytes(cfg, 2, 200, 64, 16, torch.bfloat16, sparse)
    assert summaries == store.selector.summaries.numel() * store.selector.summaries.element_size()
    assert summaries == (2 if isinstance(rule, Quest) else 1) * 2 * 13 * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    assert selections == 2 * 4 * 2 * cfg.num_key_value_heads * 4 * 4 * 4  # layers, chunks, rows, kv heads, blocks


def test_selection_index_orders_owners_by_their_loops():
    """paged_attention_backward.selection_index: the inverse of a selection the sparse dK/dV kernel loops over.
    Every (block, page) entry appears once, grouped by (kv head, page) in key order with its block and column;
    the programs take each group's first entry (its owner) first, longest group first, then the others."""
    from kernels.paged_attention_backward import selection_index
    g = torch.Generator().manual_seed(4)
    B, Hkv, nb, n, pool = 2, 2, 5, 3, 9
    table = torch.stack([torch.randperm(pool, generator=g)[:n] for _ in range(B * Hkv * nb)]).view(B, Hkv, nb, n)
    table[0, 1, :, 0] = 7  # page 7 of (row 0, kv head 1) chosen by every block: the longest loop
    keys, blocks, run_end, cols, order = selection_index(table.int().to(DEVICE), pool)
    keys, blocks, run_end, cols, order = (t.cpu() for t in (keys, blocks, run_end, cols, order))
    expect = sorted((((b * Hkv + h) * pool + int(table[b, h, k, c])), k, c)
                    for b in range(B) for h in range(Hkv) for k in range(nb) for c in range(n))
    assert [(int(x), int(k), int(c)) for x, k, c in zip(keys, blocks, cols)] == expect
    first = torch.searchsorted(keys, keys)
    assert torch.equal(run_end, torch.searchsorted(keys, keys, right=True))
    assert sorted(order.tolist()) == list(range(keys.numel()))  # a permutation of the entries
    owners = int((first == torch.arange(keys.numel())).sum())
    lengths = (run_end - first)[order.long()]
    assert (first[order.long()[:owners]] == order[:owners]).all()  # owners first...
    assert (lengths[:owners].diff() <= 0).all() and lengths[0] == nb  # ...longest loop first
    assert (first[order.long()[owners:]] != order[owners:]).all()  # then every other entry


def test_selection_indices_of_several_tables_are_each_ones_own():
    """selection_indices (one sort for a chunk's layers) gives every table the index selection_index gives it."""
    from kernels.paged_attention_backward import selection_index, selection_indices
    g = torch.Generator().manual_seed(5)
    B, Hkv, nb, n, pool = 2, 2, 4, 3, 11
    tables = [torch.stack([torch.randperm(pool, generator=g)[:n] for _ in range(B * Hkv * nb)]).view(
        B, Hkv, nb, n).int().to(DEVICE) for _ in range(3)]
    tables[1][1, 0, :, 2] = 4  # a page every block chose, in one table only
    for table, got in zip(tables, selection_indices(tables, pool)):
        want = selection_index(table, pool)  # one table alone: no other segment to keep apart
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


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
