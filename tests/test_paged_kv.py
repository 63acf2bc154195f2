"""The page pool: allocator bookkeeping, storage round trips, zeroed gradient pages, release on truncate."""

import pytest
import torch

from kernels.paged_reference import gather_pages
from paged_kv import OutOfPages, PageAllocator, PagedKVStore


def test_allocator_lifo_and_clear_error():
    alloc = PageAllocator(6)
    a = alloc.alloc(2)
    b = alloc.alloc(3)
    assert a == [0, 1] and b == [2, 3, 4] and alloc.num_free == 1
    alloc.release(b)
    assert alloc.alloc(3) == b  # released last, reused first, in the same order
    with pytest.raises(OutOfPages, match="4 pages needed, 1 of 6 free"):
        alloc.alloc(4)


def make_store(num_pages=40, batch=2, page_size=16, layers=2):
    return PagedKVStore(layers, batch, n_kv_heads=2, head_dim=16, page_size=page_size, num_pages=num_pages,
                        dtype=torch.float32, device="cpu")


def test_append_in_uneven_pieces_round_trips():
    torch.manual_seed(0)
    store = make_store()
    ks, vs = [], []
    for T in (5, 16, 27, 1):  # crosses page boundaries mid-append
        k, v = torch.randn(2, T, 2, 16), torch.randn(2, T, 2, 16)
        store.append(1, k, v)
        ks.append(k)
        vs.append(v)
    assert store.length(1) == 49 and store.length(0) == 0
    table = store.page_table(1)
    assert table.dtype == torch.int32 and table.shape == (2, 4)  # ceil(49 / 16) pages per sequence
    assert len(set(table.flatten().tolist())) == 8  # no page shared between sequences
    torch.testing.assert_close(gather_pages(store.k, table, 0, 49), torch.cat(ks, 1), rtol=0, atol=0)
    torch.testing.assert_close(gather_pages(store.v, table, 0, 49), torch.cat(vs, 1), rtol=0, atol=0)


def test_gradient_pages_are_zero_when_allocated_and_truncate_frees():
    store = make_store()
    store.dk.fill_(7.0)  # stale values from "a previous step"
    store.dv.fill_(7.0)
    store.append(0, torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16))
    table = store.page_table(0)
    assert (gather_pages(store.dk, table, 0, 40) == 0).all() and (gather_pages(store.dv, table, 0, 40) == 0).all()
    assert store.allocator.num_free == 40 - 6
    store.truncate(0, 16)  # keeps exactly the first page of each sequence
    assert store.length(0) == 16 and store.allocator.num_free == 40 - 2
    assert store.page_table(0).tolist() == store.tables[0]  # the device table follows the bookkeeping
    store.dk.fill_(7.0)
    store.append(0, torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16))
    assert store.page_table(0).tolist() == store.tables[0]
    new_pages = store.page_table(0)[:, 1:].flatten().long()
    assert (store.dk[new_pages] == 0).all()
    store.reset()
    assert store.allocator.num_free == 40 and store.length(0) == 0


def test_out_of_pages_names_the_numbers():
    store = make_store(num_pages=3)
    with pytest.raises(OutOfPages, match="4 pages needed, 3 of 3 free"):
        store.append(0, torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16))


def test_bad_page_size():
    with pytest.raises(ValueError, match="power of two"):
        make_store(page_size=24)
