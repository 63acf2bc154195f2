"""
The host side of the offloaded store (offload.py): page pools in page-locked host memory, their free lists, and how
pages move between them and GPU buffers.

    k, v    [num_pages, page_size, Hkv, D] model dtype   pinned host memory (plain CPU tensors on a CPU-only machine)
    dk, dv  the same shape in grad_dtype (fp32 or bf16)

The pool is split into one contiguous range per (layer, batch row), each with its own free list: a row's pages of a
layer come out consecutive, so a part of the history moves in one copy per tensor, not one per chunk.

Pages move by one copy per run of consecutive host pages (copy engines, no GPU cores) when there are few runs, as
in dense parts; scattered pages by one gather (scatter) kernel that reads (writes) the pinned pool in place through
its device view: per-page copies cost 10-20 us of host time each and reach 0.8-1.5 GB/s at 16 KB pages, the kernel
~45 GB/s (bench/RESULTS.md). Sparse parts name pages per kv head ([Hkv, n] arrays, offload_plan.py): those move
only the named kv head's rows of each page (kernels/page_copy.copy_page_heads). A gradient page is "dirty" per kv
head, once that head's rows were written back. Copies are issued on the caller's current stream.
"""
import weakref

import numpy as np
import torch

from kernels.page_copy import copy_page_heads, copy_page_heads_reference
from offload_plan import runs
from paged_kv import OutOfPages, PageAllocator, to_device


def pinned_empty(shape, dtype):
    """A host tensor page-locked in place (cudaHostRegister): exactly its size, unlike pin_memory(), whose caching
    allocator rounds every block up to a power of two (+60% for a 40 GB pool in the worst case)."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(t.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({err}): not enough lockable "
                               f"host memory")
        weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


def device_view(t, device):
    """The GPU's view of a page-locked host tensor: a CUDA tensor at the same address (unified virtual addressing
    maps registered host memory into the GPU's address space), which kernels read and write in place over PCIe."""
    class Interface:
        __cuda_array_interface__ = dict(shape=(t.numel() * t.element_size(),), typestr="|u1",
                                        data=(t.data_ptr(), False), version=2)
    return torch.as_tensor(Interface(), device=device).view(t.dtype).view(t.shape)


class PinnedPagePool:
    max_copies = 8  # per tensor and batch row: pages in more runs than this move by a gather/scatter kernel instead

    def __init__(self, num_layers, batch, page_shape, num_pages, dtype, grad_dtype, device):
        self.device, cuda = device, device.type == "cuda"
        per_row = num_pages // (num_layers * batch)
        if per_row < 1:
            raise ValueError(f"num_pages {num_pages} < num_layers x batch = {num_layers * batch}")
        self.num_pages = per_row * num_layers * batch
        shape = (num_pages, *page_shape)
        host = pinned_empty if cuda else (lambda s, d: torch.empty(s, dtype=d))
        self.k, self.v = host(shape, dtype), host(shape, dtype)
        self.dk, self.dv = host(shape, grad_dtype), host(shape, grad_dtype)
        # the same pools as the GPU addresses them (on the CPU: themselves), for gathers of scattered pages
        self.device_views = {name: device_view(getattr(self, name), device) if cuda else getattr(self, name)
                             for name in ("k", "v", "dk", "dv")}
        self.allocators = [[PageAllocator(per_row, (layer * batch + b) * per_row) for b in range(batch)]
                           for layer in range(num_layers)]
        # per-head moves: the Triton kernel on a GPU; on a CPU plain indexing, its reference (the kernel is tested
        # against it on its own: interpreted per move, it would make every store test crawl)
        self._copy_heads = copy_page_heads if cuda else copy_page_heads_reference
        self.n_kv_heads = page_shape[1]
        # [num_pages, Hkv]: the gradient page's rows of that kv head written back since it was allocated
        self.dirty = np.zeros((num_pages, self.n_kv_heads), dtype=bool)
        self.bytes_moved = {"h2d": 0, "d2h": 0}  # counters for benchmarks

    def num_free(self) -> int:
        return sum(a.num_free for row in self.allocators for a in row)

    def alloc(self, layer, n) -> np.ndarray:
        """n new pages for every batch row of `layer`: [B, n] int64 physical ids, their gradients clean (zero until
        written back). If one row's pool cannot serve, raises OutOfPages and takes nothing."""
        new = []
        try:
            for allocator in self.allocators[layer]:
                new.append(allocator.alloc(n))
        except OutOfPages:  # give back the rows already served, so the failed append leaks nothing
            for allocator, pages in zip(self.allocators[layer], new):
                allocator.release(pages)
            raise
        new = np.array(new, dtype=np.int64).reshape(len(self.allocators[layer]), n)
        self.dirty[new] = False
        return new

    def release(self, layer, tables):
        """Give back [pages of row b] for every batch row b of `layer`."""
        for allocator, pages in zip(self.allocators[layer], tables):
            allocator.release(pages.tolist())

    def _indices(self, ids):
        return to_device(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), self.device)

    def _slots(self, n):
        """[n, Hkv] int64 on the device: slot j for every kv head (made there: no upload)."""
        return torch.arange(n, device=self.device).view(n, 1).expand(n, self.n_kv_heads).contiguous()

    def _heads(self, pages):
        """The kv head of each entry of a per-head [Hkv, n] page array."""
        return np.broadcast_to(np.arange(self.n_kv_heads)[:, None], pages.shape)

    def dirty_of(self, pages):
        """Whether each (page, kv head) was written back: [n, Hkv] for whole pages [n], [Hkv, n] for per-head
        pages [Hkv, n] (-1, no page: False)."""
        if pages.ndim == 1:
            return self.dirty[pages]
        return self.dirty[np.maximum(pages, 0), self._heads(pages)] & (pages >= 0)

    def mark_dirty(self, pages):
        """Record a write-back of whole pages [n], or of per-head pages [Hkv, n] (-1: none)."""
        if pages.ndim == 1:
            self.dirty[pages] = True
        else:
            self.dirty[pages[pages >= 0], self._heads(pages)[pages >= 0]] = True

    def copy_in(self, name, dst, pages, load=None):
        """Buffer slots dst[i] <- host pages: whole pages pages [n] (load: None, or [n, Hkv] whether each kv head's
        rows load; the others are zeroed), or per kv head pages [Hkv, n] (slot i of head h <- head h's rows of page
        pages[h, i]; zero where that is -1 or load [Hkv, n] is False)."""
        if pages.shape[-1] == 0:
            return
        if pages.ndim == 1:
            if load is None or (load.all(1) | ~load.any(1)).all():  # each page loads whole or not at all
                return self._copy_pages_in(name, dst, pages, None if load is None else load[:, 0])
            pages, load = np.broadcast_to(pages, (self.n_kv_heads, len(pages))), load.T
        load = pages >= 0 if load is None else load & (pages >= 0)
        self._copy_heads(self.device_views[name], self._indices(np.where(load, pages, -1).T), dst,
                         self._slots(pages.shape[1]))
        self.bytes_moved["h2d"] += int(load.sum()) * dst[0].nbytes // self.n_kv_heads

    def _copy_pages_in(self, name, dst, pages, load=None):
        """dst[i] = pool `name`[pages[i]], or zero where load[i] is False."""
        src, load = getattr(self, name), np.ones(len(pages), dtype=bool) if load is None else load
        page_runs = runs(pages, load)
        if len(page_runs) <= self.max_copies:
            for i, page, count, copy in page_runs:
                if copy:
                    dst[i:i + count].copy_(src[page:page + count], non_blocking=True)
                else:
                    dst[i:i + count].zero_()
        elif load.all():
            torch.index_select(self.device_views[name], 0, self._indices(pages), out=dst)
        else:
            dst.index_copy_(0, self._indices(np.flatnonzero(load)),
                            self.device_views[name].index_select(0, self._indices(pages[load])))
            dst.index_fill_(0, self._indices(np.flatnonzero(~load)), 0)
        self.bytes_moved["h2d"] += int(load.sum()) * dst[0].nbytes

    def copy_out(self, name, src, pages):
        """Host pages <- buffer slots: pool `name`[pages[i]] = src[i] for whole pages [n]; for per-head pages
        [Hkv, n], head h's rows of page pages[h, i] = those of slot i (nothing where it is -1)."""
        if pages.ndim == 2:
            self._copy_heads(src, self._slots(pages.shape[1]), self.device_views[name], self._indices(pages.T))
            self.bytes_moved["d2h"] += int((pages >= 0).sum()) * src[0].nbytes // self.n_kv_heads
            return
        dst, page_runs = getattr(self, name), runs(pages)
        if len(page_runs) <= self.max_copies:
            for i, page, count, _ in page_runs:
                dst[page:page + count].copy_(src[i:i + count], non_blocking=True)
        else:
            self.device_views[name].index_copy_(0, self._indices(pages), src)
        self.bytes_moved["d2h"] += src.nbytes

    def write_tokens(self, pages, k, v):
        """K/V of freshly appended tokens k, v [B, T, Hkv, D] into new pages [B, n] (from position 0 of the first;
        the last may be partial), one copy per run of consecutive pages."""
        B, T = k.shape[:2]
        page_size = self.k.shape[1]
        for b in range(B):
            for i, page, count, _ in runs(pages[b]):
                t0, t1 = i * page_size, min((i + count) * page_size, T)
                for src, dst in ((k, self.k), (v, self.v)):
                    dst.view(-1, *dst.shape[2:])[page * page_size:][:t1 - t0].copy_(src[b, t0:t1], non_blocking=True)
                    self.bytes_moved["d2h"] += src[b, t0:t1].nbytes
