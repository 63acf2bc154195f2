"""offload.py: the offloaded store gives the gradients the in-GPU store and full-sequence backprop give.

On a CPU-only machine both the "host" pools and the "GPU" cache are CPU tensors and there are no streams: these
tests check the bookkeeping (parts, dirty gradient pages, buffer reuse, prefetch keys), mostly with the
plain-PyTorch reference kernel (attention.ReferenceKernel: the kernels are tested elsewhere, and the interpreter is
slow); one test runs the Triton kernels (interpreted). The part planner (offload_plan.py) is tested directly. The GPU
run (bench/gpu_run.sh offload) checks the same on real streams. Small caches (2-3 pages per buffer) make every call
stream its history in several parts.
"""

import numpy as np
import pytest
import torch

from attention import ReferenceKernel
from chunk_train import chunked_step, fill_kv
from offload import OffloadedKVStore
from offload_plan import dense_ranges, runs, sparse_split
from paged_kv import OutOfPages, PagedKVStore
from sparse_attn import SparseConfig
from test_chunk_train import DEVICE, assert_grads_match, full_sequence_grads, tiny_model

REF = ReferenceKernel()


def batch_of(seed, batch, seq):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)
    return idx, torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)


def poison(store):
    """NaN in every host page and cache slot: nothing may be read before it is written (or zero-filled)."""
    for t in (store.pool.k, store.pool.v, store.pool.dk, store.pool.dv):
        t.fill_(float("nan"))
    for buf in store.buffers:
        for t in (buf.k, buf.v, buf.dk, buf.dv):
            t.fill_(float("nan"))


# ------------------------------------------------------------------------------------ the planner, pure functions


def test_runs_split_on_gaps_and_flags():
    assert runs([]) == []
    assert runs([5, 6, 7, 9, 3, 4]) == [(0, 5, 3, False), (3, 9, 1, False), (4, 3, 2, False)]
    assert runs([1, 2, 3, 4], np.array([True, True, False, False])) == [(0, 1, 2, True), (2, 3, 2, False)]


def test_dense_ranges_fill_buffers_and_end_with_the_chunk():
    assert dense_ranges(0, 2, 3) == [(0, 2)]  # no history: the chunk alone
    assert dense_ranges(1, 2, 3) == [(0, 3)]  # history and chunk share the one buffer
    assert dense_ranges(7, 2, 3) == [(0, 3), (3, 6), (6, 9)]
    assert dense_ranges(8, 2, 3) == [(0, 3), (3, 6), (6, 7), (7, 10)]  # a partial part before the last
    for history, own, cap in ((13, 1, 4), (5, 3, 3), (40, 2, 7)):
        ranges = dense_ranges(history, own, cap)
        assert [a for a, _ in ranges[1:]] == [b for _, b in ranges[:-1]] and ranges[0][0] == 0  # tile [0, end)
        assert ranges[-1][1] == history + own and all(0 < b - a <= cap for a, b in ranges)


def check_split(sel, first_own, own, cap):
    """sparse_split's contract on a selection [B, Hkv, nb, n]; returns the parts."""
    B, Hkv, nb, n = sel.shape
    parts = sparse_split(sel, first_own, own, cap)
    assert parts[0].columns[0] == 0 and parts[-1].columns[1] == n
    assert all(a.columns[1] == b.columns[0] for a, b in zip(parts, parts[1:]))  # consecutive column ranges
    loaded = [[set() for _ in range(Hkv)] for _ in range(B)]
    for j, p in enumerate(parts):
        c0, c1 = p.columns
        assert p.own == (own if j == len(parts) - 1 else 0)
        assert p.slots.dtype == np.int32 and p.slots.shape == (B, Hkv, nb, c1 - c0 + p.own)
        for b in range(B):
            assert p.rows[b].shape[0] == Hkv and p.rows[b].shape[1] <= cap
            for h in range(Hkv):  # what each block's table reads through the slots: kv head h's rows of them
                pages = p.rows[b][h][p.slots[b, h] - b * cap]
                assert np.array_equal(pages[..., :c1 - c0], sel[b, h, :, c0:c1])
                assert (pages[..., c1 - c0:] == np.arange(first_own, first_own + p.own)).all()
                history = p.rows[b][h][:p.rows[b].shape[1] - p.own]
                named = np.unique(sel[b, h, :, c0:c1])  # exactly the pages named for the head, sorted, then empty
                assert np.array_equal(history[:len(named)], named) and (history[len(named):] == -1).all()
                loaded[b][h].update(named.tolist())
            assert max(len(np.unique(sel[b, h, :, c0:c1])) for h in range(Hkv)) == p.rows[b].shape[1] - p.own
        nxt = parts[j + 1] if j + 1 < len(parts) else None
        assert p.shares_next == (nxt is not None and any(
            set(p.rows[b][h][p.rows[b][h] >= 0]) & set(nxt.rows[b][h]) for b in range(B) for h in range(Hkv)))
    assert loaded == [[set(sel[b, h].flatten().tolist()) for h in range(Hkv)] for b in range(B)]  # all, no other
    return parts


def test_sparse_split_covers_the_selection_in_buffer_sized_parts():
    rng = np.random.default_rng(0)
    B, Hkv, nb, n, history = 2, 2, 3, 4, 20
    sel = np.sort(np.stack([rng.choice(history, n, replace=False) for _ in range(B * Hkv * nb)]), -1)
    sel = sel.reshape(B, Hkv, nb, n)
    assert len(check_split(sel, history, 2, 64)) == 1  # a roomy buffer: one part with every column
    parts = check_split(sel, history, 2, 6)  # 4 history slots for up to 12 distinct pages per head: several parts
    assert len(parts) > 1
    # block 1 is one page ahead of block 0: its column j is block 0's column j + 1
    ahead = np.broadcast_to(np.array([[0, 1, 2, 3], [1, 2, 3, 4]]), (B, 1, 2, n))
    parts = check_split(ahead, 5, 1, 3)  # room for 2 history pages: one column per part, neighbours share a page
    assert len(parts) == n and all(p.shares_next for p in parts[:-1])
    # the kv heads choose apart: head 1 reads pages 8.. where head 0 reads 0..; each slot serves both heads
    apart = np.stack([np.broadcast_to(np.arange(4), (2, 4)), np.broadcast_to(np.arange(8, 12), (2, 4))])[None]
    parts = check_split(apart, 12, 1, 5)  # room for 4 history slots: both heads' 4 pages in one part
    assert len(parts) == 1 and parts[0].rows[0].shape == (2, 5) and not parts[0].shares_next
    with pytest.raises(ValueError, match="raise cache_tokens"):
        sparse_split(sel, history, 6, 8)  # 3 blocks do not fit 8 - 6 slots


# ------------------------------------------------------------------------------------ the store


@pytest.mark.parametrize("batch, lengths, checkpoint, max_copies", [
    (2, (104, 72), False, 8),   # two steps of different lengths, partial last chunks and parts, batch 2
    (1, (72,), True, 0),        # layers recomputed inside the chunk: attend runs twice per layer; every
])                              # page moved by gather/scatter instead of copies
def test_offload_is_exact_over_steps(batch, lengths, checkpoint, max_copies):
    """Consecutive steps of different lengths on one store (same buffers, pages reused, poisoned first): loss and
    every parameter gradient equal full-sequence autograd, and the pool is whole after each step. Chunk 32 and
    buffers of 48 tokens: every call streams its history in several parts, the last one partial."""
    model = tiny_model(3)
    page, chunk = 16, 32
    store = OffloadedKVStore.for_sequence(model, batch, max(lengths), page, torch.float32, DEVICE,
                                          cache_tokens=3 * page, kernel=REF)
    store.pool.max_copies = max_copies
    poison(store)
    for step, seq in enumerate(lengths):
        idx, targets = batch_of(step, batch, seq)
        ref_loss, ref_grads = full_sequence_grads(model, idx, targets)
        loss = chunked_step(model, idx, targets, chunk_size=chunk, page_size=page, store=store, checkpoint=checkpoint)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"step {step}"
        assert_grads_match(model, ref_grads)
        model.zero_grad(set_to_none=True)
        assert store.num_free_pages() == store.num_pages
    assert store.bytes_moved["h2d"] > 0 and store.bytes_moved["d2h"] > 0


def test_offload_equals_paged_store_and_prefetches():
    """Through the Triton kernels (interpreted on a CPU): same gradients as PagedKVStore; after the first chunks,
    the guessed next part is what the next call wants."""
    model = tiny_model(4)
    idx, targets = batch_of(9, 1, 96)
    grads = []
    for store in (PagedKVStore.for_sequence(model, 1, 96, 16, torch.float32, DEVICE),
                  OffloadedKVStore.for_sequence(model, 1, 96, 16, torch.float32, DEVICE, cache_tokens=32)):
        loss = chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store)
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    assert type(store.kernel).__name__ == "TritonKernel"
    (loss_a, ref), (loss_b, _) = grads
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)
    for name, p in model.named_parameters():
        p.grad = grads[1][1][name]
    assert_grads_match(model, ref)  # the same sums, split into parts: only the order differs
    model.zero_grad(set_to_none=True)
    # stage 1 goes layer 0 -> 1 -> next chunk's layer 0; stage 2 forward 0 -> 1, then backward 1 -> 0
    assert store.next_call[(0, False)] == (1, False)
    assert store.next_call[(1, True)] == (0, True)


def test_gradient_pages_dirty_only_after_write_back():
    model = tiny_model(5)
    store = OffloadedKVStore.for_sequence(model, 1, 128, 16, torch.float32, DEVICE, cache_tokens=32, kernel=REF)
    idx, targets = batch_of(1, 1, 128)
    fill_kv(model, idx, store, 32)
    assert not store.pool.dirty.any()  # appends alone write no gradient
    store.reset()
    chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store)
    # every page but the last chunk's was history to a later chunk, so was written back (then released)
    assert store.pool.dirty.all(1).sum() == model.config.num_hidden_layers * (128 - 32) // 16  # in every kv head
    assert store.pool.dirty.any(1).sum() == store.pool.dirty.all(1).sum()


def test_bf16_gradient_pages_stay_close():
    """grad_dtype=bfloat16 halves host memory for dK/dV; each chunk's sum is formed in fp32 and rounded once."""
    model = tiny_model(6)
    idx, targets = batch_of(2, 1, 128)
    _, ref = full_sequence_grads(model, idx, targets)
    store = OffloadedKVStore.for_sequence(model, 1, 128, 16, torch.float32, DEVICE, cache_tokens=32,
                                          grad_dtype=torch.bfloat16, kernel=REF)
    assert store.pool.dk.dtype == torch.bfloat16
    chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store)
    assert_grads_match(model, ref, tol=2e-2)


def test_out_of_pages_leaks_nothing():
    """An append that one batch row's pool cannot serve raises OutOfPages and leaves every pool as it was."""
    model = tiny_model(0)
    store = OffloadedKVStore.for_sequence(model, 2, 64, 16, torch.float32, DEVICE)
    k = torch.zeros(2, 48, 2, 16, device=DEVICE)
    store.append(0, k, k)
    store.pool.allocators[0][1].alloc(1)  # row 1 now has 0 of its 4 pages free, row 0 still has 1
    free = store.num_free_pages()
    with pytest.raises(OutOfPages, match="1 pages needed, 0 of 4 free"):
        store.append(0, k[:, :16], k[:, :16])
    assert store.num_free_pages() == free and store.length(0) == 48


def test_bad_arguments():
    model = tiny_model(0)
    make = lambda **kw: OffloadedKVStore.for_sequence(model, 1, 64, kw.pop("page", 16), torch.float32,  # noqa: E731
                                                      DEVICE, **kw)
    with pytest.raises(ValueError, match="page_size"):
        make(page=24)
    with pytest.raises(ValueError, match="cache_tokens"):
        make(cache_tokens=8)
    with pytest.raises(ValueError, match="grad_dtype"):
        make(grad_dtype=torch.float16)
    store = make()
    k = torch.zeros(1, 10, 2, 16, device=DEVICE)
    store.append(0, k, k)
    with pytest.raises(ValueError, match="page boundaries"):
        store.append(0, k, k)
    with pytest.raises(ValueError, match="page boundaries"):
        store.truncate(0, 5)
    store = make(cache_tokens=32)  # 32 tokens per buffer < a 48-token chunk
    q = torch.zeros(1, 48, 4, 16, device=DEVICE)
    k = torch.zeros(1, 48, 2, 16, device=DEVICE)
    store.append(0, k, k)
    with pytest.raises(ValueError, match="cache"):
        store.attend(0, q, k, k)


def test_sparse_offload_equals_the_gpu_store():
    """Sparse attention with offloaded pages: two steps of different lengths on one (poisoned) store give the
    loss and gradients of the in-GPU sparse store, with the same selections. Buffers of 4 pages (2 beside the
    chunk's own 2) against selections of 4 pages x 2 query blocks per kv head: calls split into several column
    parts, some sharing (kv head, page)s (gradients added across parts). Scattered pages move per kv head."""
    model = tiny_model(7)
    page, chunk, sparse = 16, 32, SparseConfig(budget=64, q_block=16)
    gpu_store = PagedKVStore.for_sequence(model, 2, 160, page, torch.float32, DEVICE, sparse=sparse, kernel=REF)
    store = OffloadedKVStore.for_sequence(model, 2, 160, page, torch.float32, DEVICE, cache_tokens=4 * page,
                                          sparse=sparse, kernel=REF)
    store.pool.max_copies = 1  # scattered pages by gather/scatter (a GPU reads the pinned pool in place)
    poison(store)
    for step, seq in enumerate((160, 128)):
        idx, targets = batch_of(10 + step, 2, seq)
        results, logs = [], []
        for s in (gpu_store, store):
            s.selector.log = log = []
            loss = chunked_step(model, idx, targets, chunk_size=chunk, page_size=page, store=s)
            results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
            logs.append({(c.layer, c.start): c.selection.cpu() for c in log})
            model.zero_grad(set_to_none=True)
        (ref_loss, ref), (loss, grads) = results
        assert logs[0].keys() == logs[1].keys() and all(torch.equal(logs[0][k], logs[1][k]) for k in logs[0])
        # the selections are the kind the planner splits into several parts, some sharing pages
        splits = [sparse_split(sel.numpy(), start // page, chunk // page, 4) for (_, start), sel in logs[1].items()
                  if start]
        assert any(len(s) > 1 for s in splits) and any(p.shares_next for s in splits for p in s)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"step {step}"
        for name, p in model.named_parameters():
            p.grad = grads[name]
        assert_grads_match(model, ref)
        model.zero_grad(set_to_none=True)
        assert store.num_free_pages() == store.num_pages
