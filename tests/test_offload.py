"""offload.py: the offloaded store gives the gradients the in-GPU store and full-sequence backprop give.

On a CPU-only machine both the "host" pools and the "GPU" cache are CPU tensors and there are no streams: these
tests check the bookkeeping (parts, runs of pages, dirty gradient pages, buffer reuse, prefetch keys); the GPU run
(bench/gpu_run.sh offload) checks the same on real streams. A small cache (2 pages per buffer) makes every call
stream its history in several parts.
"""

import pytest
import torch

from chunk_train import chunked_step, fill_kv
from offload import OffloadedKVStore, _runs
from paged_kv import OutOfPages, PagedKVStore
from sparse_attn import SparseConfig
from test_chunk_train import DEVICE, assert_grads_match, full_sequence_grads, tiny_model


def batch_of(seed, batch, seq):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)
    return idx, torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)


def poison(store):
    """NaN in every host page and cache slot: nothing may be read before it is written (or zero-filled)."""
    for t in (store.k, store.v, store.dk, store.dv):
        t.fill_(float("nan"))
    for buf in store.buffers:
        for t in (buf.k, buf.v, buf.dk, buf.dv):
            t.fill_(float("nan"))


def test_runs_split_on_gaps_and_flags():
    assert _runs([]) == []
    assert _runs([5, 6, 7, 9, 3, 4]) == [(0, 5, 3, False), (3, 9, 1, False), (4, 3, 2, False)]
    flags = torch.tensor([True, True, False, False]).numpy()
    assert _runs([1, 2, 3, 4], flags) == [(0, 1, 2, True), (2, 3, 2, False)]


@pytest.mark.parametrize("batch, lengths, checkpoint, max_copies", [
    (2, (200, 136, 168), False, 8),  # three steps of different lengths, partial last chunks, batch 2
    (1, (168,), True, 0),            # layers recomputed inside the chunk: attend runs twice per layer; every
])                                   # page moved by gather/scatter instead of copies
def test_offload_is_exact_over_steps(batch, lengths, checkpoint, max_copies):
    """Consecutive steps of different lengths on one store (same buffers, pages reused, poisoned first): loss and
    every parameter gradient equal full-sequence autograd, and the pool is whole after each step. Chunk 32 and
    buffers of 48 tokens: every call streams its history in several parts, the last one partial."""
    model = tiny_model(3)
    page, chunk = 16, 32
    store = OffloadedKVStore.for_sequence(model, batch, max(lengths), page, torch.float32, DEVICE,
                                          cache_tokens=3 * page)
    store.max_copies = max_copies
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
    """Same gradients as PagedKVStore; after the first chunks, the guessed next part is what the next call wants."""
    model = tiny_model(4)
    idx, targets = batch_of(9, 1, 256)
    grads = []
    for store in (PagedKVStore.for_sequence(model, 1, 256, 16, torch.float32, DEVICE),
                  OffloadedKVStore.for_sequence(model, 1, 256, 16, torch.float32, DEVICE, cache_tokens=64)):
        loss = chunked_step(model, idx, targets, chunk_size=64, page_size=16, store=store)
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
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
    store = OffloadedKVStore.for_sequence(model, 1, 128, 16, torch.float32, DEVICE, cache_tokens=32)
    idx, targets = batch_of(1, 1, 128)
    fill_kv(model, idx, store, 32)
    assert not store.dirty.any()  # appends alone write no gradient
    store.reset()
    chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store)
    # every page but the last chunk's was history to a later chunk, so was written back (then released)
    assert store.dirty.sum() == model.config.num_hidden_layers * (128 - 32) // 16


def test_bf16_gradient_pages_stay_close():
    """grad_dtype=bfloat16 halves host memory for dK/dV; each chunk's sum is formed in fp32 and rounded once."""
    model = tiny_model(6)
    idx, targets = batch_of(2, 1, 256)
    _, ref = full_sequence_grads(model, idx, targets)
    store = OffloadedKVStore.for_sequence(model, 1, 256, 16, torch.float32, DEVICE, cache_tokens=64,
                                          grad_dtype=torch.bfloat16)
    assert store.dk.dtype == torch.bfloat16
    chunked_step(model, idx, targets, chunk_size=64, page_size=16, store=store)
    assert_grads_match(model, ref, tol=2e-2)


def test_out_of_pages_leaks_nothing():
    """An append that one batch row's pool cannot serve raises OutOfPages and leaves every pool as it was."""
    model = tiny_model(0)
    store = OffloadedKVStore.for_sequence(model, 2, 64, 16, torch.float32, DEVICE)
    k = torch.zeros(2, 48, 2, 16, device=DEVICE)
    store.append(0, k, k)
    store.allocators[0][1].alloc(1)  # row 1 now has 0 of its 4 pages free, row 0 still has 1
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
    store.reset()
    q = torch.zeros(1, 48, 4, 16, device=DEVICE)
    k = torch.zeros(1, 48, 2, 16, device=DEVICE)
    store.cache_pages = 2  # 32 tokens per buffer < the 48-token chunk
    store.append(0, k, k)
    with pytest.raises(ValueError, match="cache"):
        store.attend(0, q, k, k)


def test_sparse_offload_moves_selected_pages_only_and_equals_the_gpu_store():
    """Sparse attention with offloaded pages: two steps of different lengths on one (poisoned) store give the
    loss and gradients of the in-GPU sparse store, with the same selections; the pages loaded for each call are
    exactly those its selection names. Buffers of 6 pages (4 beside the chunk's own 2) against selections of 4
    pages x 4 (kv head, query block) pairs: calls split into several column parts, some sharing pages (gradients
    added across parts)."""
    model = tiny_model(7)
    page, chunk, sparse = 16, 32, SparseConfig(budget=64, q_block=16)
    gpu_store = PagedKVStore.for_sequence(model, 2, 256, page, torch.float32, DEVICE, sparse=sparse)
    store = OffloadedKVStore.for_sequence(model, 2, 256, page, torch.float32, DEVICE, cache_tokens=6 * page,
                                          sparse=sparse)
    store.max_copies = 1  # scattered pages by gather/scatter (a GPU reads the pinned pool in place)
    poison(store)
    loaded, splits = {}, []  # (layer, what, start) -> pages per row; the column splits made
    load, split = store._load, store._split

    def recording_load(buf, part):
        if part.table is not None:  # a sparse history part: key name (start, columns)
            rows = loaded.setdefault((part.layer, part.what, part.key[3][0]), [set(), set()])
            for b in range(2):
                rows[b].update(part.history_rows(b).tolist())
        return load(buf, part)

    def recording_split(layer, start, own):
        result = split(layer, start, own)
        if result is not None and not any(result is s for s in splits):
            splits.append(result)
        return result
    store._load, store._split = recording_load, recording_split

    for step, seq in enumerate((192, 160)):
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
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"step {step}"
        for name, p in model.named_parameters():
            p.grad = grads[name]
        assert_grads_match(model, ref)
        model.zero_grad(set_to_none=True)
        assert store.num_free_pages() == store.num_pages
        for (layer, what, start), rows in loaded.items():
            sel = logs[1][(layer, start)]
            assert rows == [set(sel[b].flatten().tolist()) for b in range(2)], (layer, what, start)
        loaded.clear()
    assert any(len(s) > 1 for s in splits) and any(part[4] for s in splits for part in s)  # split, shared pages
