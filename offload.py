"""
The KV / KV-gradient store with its pages in host memory: the GPU keeps a fixed-size page cache, whatever the length.

Chunked training (chunk_train.py) needs every layer's K/V of the whole sequence and, in stage 2, their fp32
gradients: 172 KB per token for Qwen2.5-7B, far more than a GPU holds at a million tokens. `OffloadedKVStore` has
PagedKVStore's interface (reset / append / length / attend / truncate, see paged_kv.py) but keeps the pages in
pinned host memory and streams them through three GPU buffers of `cache_tokens` tokens each:

    host (pinned)   k, v [num_pages, page_size, Hkv, D] model dtype; dk, dv the same shape in grad_dtype (fp32)
    GPU cache       3 buffers, each room for cache_tokens / page_size pages of every batch row

attend(layer, q, k, v) computes attention over the history [0, start) plus the chunk itself in parts of at most
one buffer, merged by log-sum-exp in the kernel (kernels/paged_attention.py); the last part ends with the chunk's
own pages, whose K/V are copied in from the GPU (they are there already). Its backward walks the same parts: dq
accumulates over them, each part's dK/dV is added into the buffer (loaded from the host first) and the history's
written back. The chunk's own dK/dV - what later chunks accumulated for it plus its own part - goes to autograd,
as in PagedKVStore.

Asynchrony. Copies run on two CUDA streams, host-to-device (h2d) and device-to-host (d2h), ordered by events only:
  - compute waits on a buffer's "loaded" event before reading it;
  - h2d waits until the compute that read a buffer, and the write-back from it, are done before overwriting it;
  - h2d waits on the layer's last K/V append (d2h) before reading its K/V pages, and on the layer's last gradient
    write-back before reading its gradient pages;
  - d2h waits on compute before copying out a freshly appended chunk or a buffer's updated gradients; the appended
    tensor is tied to the d2h stream (record_stream) so its memory is not reused before the copy is done.
While one part computes, the next loads into another buffer and the previous one's gradients go back from the
third; during a layer's last part, the first part of the call expected next (learned from the order of previous
calls: layer l+1 in a forward, l-1 in a backward) is prefetched. A wrong guess costs a wasted copy, never a wrong
result: a buffer is used only if it holds exactly the pages asked for.

Only what is needed moves: K/V go to the host once (append) and come back read-only; a gradient page goes back
only after a kernel wrote it ("dirty"), and a page that was never written back this step is zero-filled on the
GPU instead of copied (so gradients start at zero every step, whatever the pinned memory held before).

Sparse attention (sparse=SparseConfig(...), sparse_attn.py). Only the selected pages move. The page summaries stay
on the GPU (they are what selection reads); each (layer, chunk) selection is copied to host memory when it is made
- the one host sync per call, in stage 1 - and stage 2 reuses it. A part is then the union of the pages that a
range of selection columns names (each block's selected pages are sorted, so column j of every block is its j-th
page): all columns in one part when their union fits a buffer, else as many columns per part as fit. Each part
comes with a 4-D page table mapping every block's selected pages in those columns to the buffer's slots, which
the kernels read like PagedKVStore's (q_start = the part's columns x page_size: all of them visible). Parts of
one call may share pages; in a backward the next part's gradient pages then load only after this part's
write-back, so a page's gradient adds up across parts exactly as it would in one. Selected pages lie scattered over
the pool: they move by a gather (scatter) kernel that reads (writes) the pinned pool in place (_copy_in). With one
selection per chunk (q_block = chunk) a call needs at most n_kv_heads x budget pages; with small blocks the union
of their choices can cover most of the history, and PCIe sets the pace (bench/RESULTS.md).

On a CPU-only machine the same code runs with every tensor on the CPU and no streams: the bookkeeping is tested
there, the asynchrony on the GPU (bench/gpu_run.sh).
"""

import contextlib
import math
import weakref

import numpy as np
import torch

from kernels.paged_attention import paged_attention_backward, paged_attention_forward, softmax_delta
from paged_kv import OutOfPages, PageAllocator, to_device
from sparse_attn import PageSelector

NUM_BUFFERS = 3  # GPU cache buffers: one computing, one loading, one writing back


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


def _runs(pages, flags=None):
    """Maximal runs of consecutive page ids (and equal flags): [(first index, first page, count, flag)]."""
    p = np.asarray(pages, dtype=np.int64)
    if len(p) == 0:
        return []
    brk = np.diff(p) != 1
    if flags is not None:
        brk |= flags[1:] != flags[:-1]
    starts = np.concatenate([[0], np.flatnonzero(brk) + 1])
    counts = np.diff(np.append(starts, len(p)))
    f = flags[starts] if flags is not None else np.zeros(len(starts), bool)
    return list(zip(starts.tolist(), p[starts].tolist(), counts.tolist(), f.tolist()))


class _Part:
    """Pages of one layer that go through one buffer together: rows[b] = batch row b's logical page indices in slot
    order (its i-th page in slot b * cap + i). what: "kv" (K/V, forward) or "kvgrad" (K/V and dK/dV, backward).
    The last part of a call ends with the chunk's `own` pages: their K/V come from the compute stream (the chunk's
    k, v), not the host, and in a backward their gradient (what later chunks accumulated) loads like the history's
    but goes to autograd instead of back to the host. Dense parts are ranges of pages; a sparse part also has
    `table` [B, Hkv, n_blocks, n_cols] int32 on the device, the buffer slots of each block's selected pages in its
    columns (then of the own pages, in the last part). `key` names the content: a buffer whose key equals a part's
    holds exactly its pages, loaded under the layer's current version."""

    def __init__(self, layer, what, version, rows, name, own=0, table=None, shares_next=False):
        self.layer, self.what, self.rows, self.own, self.table = layer, what, rows, own, table
        self.shares_next = shares_next  # a page of it is in the call's next part (sparse)
        self.key = (layer, what, version, name, own)

    def history_rows(self, b):
        """Batch row b's rows that are history pages (all but the own ones)."""
        return self.rows[b][:len(self.rows[b]) - self.own]


class _Buffer:
    """One GPU cache buffer: K, V, dK, dV slots for `pages` pages of each of `batch` rows; row b's i-th page sits in
    slot b * pages + i, so one constant table [batch, pages] serves every part."""

    def __init__(self, batch, pages, page_shape, dtype, grad_dtype, device):
        shape = (batch * pages, *page_shape)
        self.k, self.v = (torch.empty(shape, dtype=dtype, device=device) for _ in range(2))
        self.dk, self.dv = (torch.empty(shape, dtype=grad_dtype, device=device) for _ in range(2))
        self.table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
        self.part = None  # the _Part it holds, while loaded and not yet used
        self.loaded = None  # event: the copies into it are done
        self.busy = []  # events: its readers (compute, write-back) are done
        self.used = 0  # when it was last handed out (for least-recently-used reuse)


class OffloadedKVStore:
    max_copies = 8  # per tensor and batch row: pages in more runs than this move by a gather/scatter kernel instead
    def __init__(self, num_layers, batch, n_kv_heads, head_dim, page_size, num_pages, dtype, device,
                 cache_tokens=65536, grad_dtype=torch.float32, sparse=None):
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
        if cache_tokens < page_size:
            raise ValueError(f"cache_tokens ({cache_tokens}) must hold at least one page of {page_size} tokens")
        if grad_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"grad_dtype must be float32 or bfloat16, got {grad_dtype}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda:N": else every stream/event call looks up the
            device = torch.device("cuda", torch.cuda.current_device())  # current device (~25 us of host time)
        self.num_layers, self.batch, self.page_size, self.device = num_layers, batch, page_size, device
        self.cuda = device.type == "cuda"
        shape = (num_pages, page_size, n_kv_heads, head_dim)
        host = pinned_empty if self.cuda else (lambda s, d: torch.empty(s, dtype=d))
        self.k, self.v = host(shape, dtype), host(shape, dtype)
        self.dk, self.dv = host(shape, grad_dtype), host(shape, grad_dtype)
        # the same pools as the GPU addresses them (on the CPU: themselves), for gathers of scattered pages
        self.device_views = {name: device_view(getattr(self, name), device) if self.cuda else getattr(self, name)
                             for name in ("k", "v", "dk", "dv")}
        # one free list per (layer, batch row), each over its own contiguous range of the pool: a row's pages of a
        # layer come out consecutive, so a part of the history moves in one copy per tensor, not one per chunk
        per_row = num_pages // (num_layers * batch)
        if per_row < 1:
            raise ValueError(f"num_pages {num_pages} < num_layers x batch = {num_layers * batch}")
        self.num_pages = per_row * num_layers * batch
        self.allocators = [[PageAllocator(per_row, (layer * batch + b) * per_row) for b in range(batch)]
                           for layer in range(num_layers)]
        empty = np.zeros(0, dtype=np.int64)
        self.tables = [[empty] * batch for _ in range(num_layers)]  # tables[layer][b] = physical pages, in order
        self.lengths = [0] * num_layers
        self.versions = [0] * num_layers  # see _parts
        self.dirty = np.zeros(num_pages, dtype=bool)  # gradient page written back since it was allocated

        self.cache_pages = cache_tokens // page_size
        self.buffers = [_Buffer(batch, self.cache_pages, shape[1:], dtype, grad_dtype, device)
                        for _ in range(NUM_BUFFERS)]
        self.clock = 0
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self.kv_written = [None] * num_layers  # event: the layer's last K/V append reached the host
        self.grad_written = [None] * num_layers  # event: the layer's last gradient write-back reached the host
        self.next_call = {}  # (layer, backward) -> the call that followed it last time, for prefetching
        self.last_call = None
        self.bytes_moved = {"h2d": 0, "d2h": 0}  # counters for benchmarks
        # sparse attention: summaries indexed by physical page (on the GPU), selections kept in host memory, and the
        # layers' page tables on the GPU too (selection gathers the history's summaries through them)
        self.selector = PageSelector(num_pages, n_kv_heads, head_dim, page_size, sparse, dtype, device,
                                     host=True) if sparse else None
        self.device_tables = [torch.empty(batch, 0, dtype=torch.int32, device=device)] * num_layers
        self.sparse_parts = {}  # (layer, start) -> the column split of its selection (_split), recent calls only

    @classmethod
    def for_sequence(cls, model, batch, seq_len, page_size, dtype, device, cache_tokens=65536,
                     grad_dtype=torch.float32, sparse=None):
        """A host pool exactly large enough for every layer's K/V of `batch` sequences of `seq_len` tokens."""
        cfg = model.config
        num_pages = cfg.num_hidden_layers * batch * math.ceil(seq_len / page_size)
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, page_size, num_pages,
                   dtype, device, cache_tokens, grad_dtype, sparse)

    @staticmethod
    def cache_bytes(cfg, batch, page_size, cache_tokens, dtype, grad_dtype=torch.float32) -> int:
        """GPU bytes of the page cache (NUM_BUFFERS buffers), independent of the sequence length."""
        per_token = cfg.num_key_value_heads * cfg.head_dim * 2 * (dtype.itemsize + grad_dtype.itemsize)
        return NUM_BUFFERS * batch * (cache_tokens // page_size) * page_size * per_token

    # ------------------------------------------------------------------------------------------ bookkeeping

    def length(self, layer) -> int:
        return self.lengths[layer]

    def reset(self):
        for layer in range(self.num_layers):
            self.truncate(layer, 0)

    def truncate(self, layer, length):
        if length < self.lengths[layer] and length % self.page_size:
            raise ValueError(f"the offloaded store truncates at page boundaries, got {length} "
                             f"(page_size {self.page_size})")
        keep = math.ceil(length / self.page_size)
        for allocator, table in zip(self.allocators[layer], self.tables[layer]):
            allocator.release(table[keep:].tolist())
        self.tables[layer] = [table[:keep] for table in self.tables[layer]]
        self.device_tables[layer] = self.device_tables[layer][:, :keep]
        self.lengths[layer] = min(self.lengths[layer], length)
        self.versions[layer] += 1
        if self.selector is not None:
            self.selector.truncate(layer, length)
            for key in [key for key in self.sparse_parts if key[0] == layer and key[1] >= length]:
                del self.sparse_parts[key]

    def num_free_pages(self) -> int:
        return sum(a.num_free for row in self.allocators for a in row)

    def append(self, layer, k, v):
        """k, v: [B, T, Hkv, D] on the GPU -> new host pages at positions [length, length + T), copied on d2h."""
        B, T = k.shape[:2]
        start = self.lengths[layer]
        if start % self.page_size:
            raise ValueError(f"the offloaded store appends at page boundaries: layer {layer} holds {start} tokens, "
                             f"not a multiple of page_size {self.page_size}")
        n = math.ceil(T / self.page_size)
        new = []
        try:
            for allocator in self.allocators[layer]:  # one pool per batch row
                new.append(allocator.alloc(n))
        except OutOfPages:  # give back the rows already served, so the failed append leaks nothing
            for allocator, pages in zip(self.allocators[layer], new):
                allocator.release(pages)
            raise
        new = np.array(new, dtype=np.int64)  # [B, n]
        self.dirty[new] = False  # its gradient is zero until a kernel writes it back
        self.tables[layer] = [np.concatenate([table, pages]) for table, pages in zip(self.tables[layer], new)]
        if self.selector is not None:
            new_ids = to_device(torch.from_numpy(new).to(torch.int32), self.device)
            self.device_tables[layer] = torch.cat([self.device_tables[layer], new_ids], dim=1)
            self.selector.write(new_ids, k)
        k, v = (t.detach().to(self.k.dtype).contiguous() for t in (k, v))
        self._wait(self.d2h, self._record(None))
        with self._on(self.d2h):
            for b in range(B):
                for i, page, count, _ in _runs(new[b]):
                    t0, t1 = i * self.page_size, min((i + count) * self.page_size, T)
                    for src, dst in ((k, self.k), (v, self.v)):
                        dst.view(-1, *dst.shape[2:])[page * self.page_size:][:t1 - t0].copy_(src[b, t0:t1],
                                                                                          non_blocking=True)
                        self.bytes_moved["d2h"] += src[b, t0:t1].nbytes
        if self.cuda:
            k.record_stream(self.d2h)
            v.record_stream(self.d2h)
        self.kv_written[layer] = self._record(self.d2h)
        self.lengths[layer] = start + T

    # ------------------------------------------------------------------------------------------ streams

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _record(self, stream):
        """An event at the current end of `stream` (None: the compute stream); None on the CPU."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def _wait(self, stream, *events):
        """Make `stream` (None: the compute stream) wait for the events; no-op on the CPU."""
        if not self.cuda:
            return
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        for event in events:
            if event is not None:
                stream.wait_event(event)

    # ------------------------------------------------------------------------------------------ the cache

    def _parts(self, layer, backward, start, end):
        """The parts a call streams: the history [0, start) - in buffer-sized ranges of pages ("kv" forward,
        "kvgrad" backward), or with sparse attention in column ranges of the chunk's selection - the last part
        ending with the chunk's own pages. So the chunk's causal attention to itself runs in the same kernel launch
        as the last history part: as a launch of its own it is short of parallelism (its query tiles see 1..C/BLOCK_N
        kv tiles); joining it cut an offloaded 0.5B step at 32K by 16% (bench/RESULTS.md). None if the call's
        selection is not made yet (a guess of the next call in stage 1: nothing to prefetch). The layer's version
        changes whenever its host pages may have: a truncation (pages released and maybe reused) or a finished
        backward (gradients written back); a buffer loaded under an older version is never used."""
        ps, cap, version = self.page_size, self.cache_pages, self.versions[layer]
        history, own = start // ps, math.ceil(end / ps) - start // ps
        if backward and self.lengths[layer] < end:  # a guess that cannot be the next call: its pages are gone
            return None
        what = "kvgrad" if backward else "kv"
        if self.selector is not None and history:
            split = self._split(layer, start, own)
            if split is None:
                return None
            return [_Part(layer, what, version, rows, (start, cols), n_own, table, shares)
                    for cols, rows, n_own, table, shares in split]
        # dense: the last part holds the last cap - own history pages and the own pages, earlier parts the rest
        last = max(0, history - (cap - own))
        ranges = [(a, min(a + cap, last)) for a in range(0, last, cap)] + [(last, history + own)]
        return [_Part(layer, what, version, [np.arange(a, b)] * self.batch, (a, b), own if b > history else 0)
                for a, b in ranges]

    def _split(self, layer, start, own):
        """The column split of a stored selection, as [(columns, rows, own, table, shares_next)] (see _Part), the
        `own` pages of the chunk appended to the last part; kept for the next few calls (stage 2's forward and
        backward of a chunk split it once)."""
        key = (layer, start)
        if key in self.sparse_parts:
            return self.sparse_parts[key]
        sel = self.selector.selections.get(layer, {}).get(start)
        if sel is None:
            return None
        B, Hkv, nb, n = sel.shape
        cap = self.cache_pages - own  # history pages per part, so that the last part has room for the own pages
        if Hkv * nb > cap:
            raise ValueError(f"sparse attention needs one page per kv head and query block in a cache buffer "
                             f"beside the chunk's {own} pages ({Hkv} x {nb} = {Hkv * nb} pages) but a buffer "
                             f"holds {self.cache_pages}: raise cache_tokens")
        sel = sel.numpy().reshape(B, Hkv * nb, n)

        def union(c0, c1):  # per batch row, the sorted pages that columns [c0, c1) name
            return [np.unique(sel[b, :, c0:c1]) for b in range(B)]

        split, c0 = [], 0
        while c0 < n:
            c1, rows = n, union(c0, n)  # usually all the remaining columns fit
            if max(map(len, rows)) > cap:  # else the most that do (one always does, checked above)
                lo, hi = c0 + 1, n - 1
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if max(map(len, union(c0, mid))) <= cap else (lo, mid - 1)
                c1, rows = lo, union(c0, lo)
            slots = np.stack([np.searchsorted(rows[b], sel[b, :, c0:c1]) + b * self.cache_pages
                              for b in range(B)]).reshape(B, Hkv, nb, c1 - c0)
            n_own = own if c1 == n else 0
            if n_own:  # the chunk's pages follow the union in each row's slots, and every block's table
                own_pages = np.arange(start // self.page_size, start // self.page_size + own)
                own_slots = np.stack([b * self.cache_pages + len(rows[b]) + np.arange(own) for b in range(B)])
                slots = np.concatenate([slots, np.broadcast_to(own_slots[:, None, None], (B, Hkv, nb, own))], 3)
                rows = [np.concatenate([r, own_pages]) for r in rows]
            table = to_device(torch.from_numpy(slots.astype(np.int32)), self.device)
            split.append([(c0, c1), rows, n_own, table, False])
            c0 = c1
        for prev, nxt in zip(split, split[1:]):
            prev[4] = any(np.intersect1d(a, b).size for a, b in zip(prev[1], nxt[1]))
        self.sparse_parts[key] = split
        while len(self.sparse_parts) > 2 * self.num_layers + 2:  # forget the oldest
            del self.sparse_parts[next(iter(self.sparse_parts))]
        return split

    def _fetch(self, part, avoid=None):
        """A buffer holding `part`'s pages: the one prefetched for it, or another one, loaded now. Of the others,
        the least recently used: with three buffers, loading part j + 1 waits neither for part j (computing)
        nor for part j - 1's write-back (in flight), only for part j - 2's, long done."""
        self.clock += 1
        for buf in self.buffers:
            if buf.part is not None and buf.part.key == part.key:
                buf.used = self.clock
                return buf
        free = [b for b in self.buffers if b is not avoid]
        buf = min(free, key=lambda b: (b.part is not None, b.used))  # rather not overwrite a prefetched one
        buf.used = self.clock
        self._load(buf, part)
        return buf

    def _load(self, buf, part):
        cap = self.cache_pages
        self._wait(self.h2d, *buf.busy)
        if len(part.history_rows(0)):
            self._wait(self.h2d, self.kv_written[part.layer])
        if part.what == "kvgrad":
            self._wait(self.h2d, self.grad_written[part.layer])
        with self._on(self.h2d):
            for b in range(self.batch):
                # the own pages' K/V come from the compute stream (and in a forward may not be appended yet)
                history = self.tables[part.layer][b][part.history_rows(b)]
                self._copy_in("k", buf.k[b * cap:b * cap + len(history)], history)
                self._copy_in("v", buf.v[b * cap:b * cap + len(history)], history)
                if part.what == "kvgrad":  # gradient pages never written back this step are zero: no copy
                    pages = self.tables[part.layer][b][part.rows[b]]
                    slots = slice(b * cap, b * cap + len(pages))
                    self._copy_in("dk", buf.dk[slots], pages, self.dirty[pages])
                    self._copy_in("dv", buf.dv[slots], pages, self.dirty[pages])
        buf.part, buf.loaded, buf.busy = part, self._record(self.h2d), []

    def _write_back(self, buf):
        """Copy the buffer's history gradient pages (updated by the compute stream) back to their host pages."""
        part, cap = buf.part, self.cache_pages
        self._wait(self.d2h, self._record(None))
        with self._on(self.d2h):
            for b in range(self.batch):
                pages = self.tables[part.layer][b][part.history_rows(b)]
                self.dirty[pages] = True
                slots = slice(b * cap, b * cap + len(pages))
                self._copy_out("dk", buf.dk[slots], pages)
                self._copy_out("dv", buf.dv[slots], pages)
        self.grad_written[part.layer] = self._record(self.d2h)
        buf.busy.append(self.grad_written[part.layer])

    # Pages move by one copy per run of consecutive host pages (copy engines, no GPU cores) when there are few runs,
    # as in dense parts; scattered pages, as in sparse parts, by one gather (scatter) kernel that reads (writes) the
    # pinned pool in place: per-page copies cost 10-20 us of host time each and reach 0.8-1.5 GB/s at 16 KB pages,
    # the kernel ~45 GB/s (bench/RESULTS.md).

    def _indices(self, ids):
        return to_device(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), self.device)

    def _copy_in(self, name, dst, pages, load=None):
        """dst[i] = pool `name`[pages[i]] (buffer slots <- host pages, on the current stream), or zero where load[i]
        is False."""
        src, load = getattr(self, name), np.ones(len(pages), dtype=bool) if load is None else load
        if len(pages) == 0:
            return
        runs = _runs(pages, load)
        if len(runs) <= self.max_copies:
            for i, page, count, copy in runs:
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

    def _copy_out(self, name, src, pages):
        """pool `name`[pages[i]] = src[i] (host pages <- buffer slots, on the current stream)."""
        dst, runs = getattr(self, name), _runs(pages)
        if len(runs) <= self.max_copies:
            for i, page, count, _ in runs:
                dst[page:page + count].copy_(src[i:i + count], non_blocking=True)
        else:
            self.device_views[name].index_copy_(0, self._indices(pages), src)
        self.bytes_moved["d2h"] += src.nbytes

    def _stream(self, layer, backward, start, end):
        """Yield (part, buffer) for each part of a call, loaded and ready for the compute stream; the next part
        loads while the caller computes on this one - unless, in a backward, it shares gradient pages with this
        one: then it loads after this part's write-back. Gradient parts of the history are written back after
        use."""
        call = (layer, backward)
        if self.last_call is not None:
            self.next_call[self.last_call] = call
        self.last_call = call
        guess = self.next_call.get(call) or (
            ((layer - 1, True) if layer > 0 else None) if backward else
            ((layer + 1, False) if layer + 1 < self.num_layers else (layer, True)))
        following = (self._parts(*guess, start, end) or [])[:1] if guess else []
        parts = self._parts(layer, backward, start, end)
        todo = parts + following  # the guessed part is only loaded, not yielded
        buf = self._fetch(todo[0]) if todo else None
        for j, part in enumerate(parts):
            late = backward and part.shares_next
            nxt = self._fetch(todo[j + 1], avoid=buf) if j + 1 < len(todo) and not late else None
            self._wait(None, buf.loaded)
            yield part, buf
            buf.busy = [self._record(None)]
            if part.what == "kvgrad" and len(part.history_rows(0)):  # the own pages' gradient goes to autograd
                self._write_back(buf)
            buf.part = None
            buf = self._fetch(todo[j + 1], avoid=buf) if late else nxt
        if backward:
            self.versions[layer] += 1

    # ------------------------------------------------------------------------------------------ attention

    def _own_pages(self, part, buf, k, v):
        """Copy the chunk's k, v [B, C, Hkv, D] into the buffer slots of the part's own pages (on the compute stream;
        the kernels ignore positions past the chunk in its last page); returns each batch row's first own slot."""
        B, C = k.shape[:2]
        first = [b * self.cache_pages + len(part.history_rows(b)) for b in range(B)]
        for src, dst in ((k, buf.k), (v, buf.v)):
            for b in range(B):
                dst[first[b]:first[b] + part.own].flatten(0, 1)[:C] = src[b]
        return first

    def _part_args(self, part, buf, start, C):
        """(page table, q_start, kv_len, q_block) for the kernels on a part in `buf`. Dense: a range of positions
        before the chunk's queries, the last one followed by the chunk itself (causal). Sparse: each block's table
        lists its selected pages in the part's columns (buffer slots), all visible - virtual q_start = columns x
        page_size - then, in the last part, the chunk's own pages."""
        ps = self.page_size
        if part.table is None:
            n = len(part.rows[0])
            q_start = start - int(part.rows[0][0]) * ps
            return buf.table[:, :n], q_start, q_start + C if part.own else n * ps, None
        q_start = (part.table.shape[3] - part.own) * ps
        return part.table, q_start, q_start + C if part.own else q_start, self.selector.q_block

    def forward(self, layer, q, k, v):
        """o [B, C, H, D] (q.dtype), lse [B, H, C]: the chunk's queries over history + chunk."""
        B, C = q.shape[:2]
        if math.ceil(C / self.page_size) > self.cache_pages:  # the chunk's pages share a buffer with history
            raise ValueError(f"a chunk of {C} tokens does not fit the page cache's buffers of "
                             f"{self.cache_pages * self.page_size} tokens: raise cache_tokens or lower the chunk")
        start = self.lengths[layer] - C
        if self.selector is not None:  # made (stage 1) or found (stage 2) before the parts are known
            self.selector.selection(layer, q, self.device_tables[layer], start)
        o = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # fp32 while parts are merged
        lse = torch.empty(B, q.shape[2], C, dtype=torch.float32, device=q.device)
        for j, (part, buf) in enumerate(self._stream(layer, False, start, start + C)):
            if part.own:
                self._own_pages(part, buf, k, v)
            table, q_start, kv_len, q_block = self._part_args(part, buf, start, C)
            paged_attention_forward(q, buf.k, buf.v, table, q_start, kv_len=kv_len, out=(o, lse), merge=j > 0,
                                    q_block=q_block)
        return o.to(q.dtype), lse

    def backward(self, layer, start, q, k, v, o, lse, do):
        """dq, dk, dv of the chunk at [start, start + C); history gradients go to the host pages."""
        B, C = q.shape[:2]
        delta = softmax_delta(do, o)  # [B, H, C], one for all parts
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        for part, buf in self._stream(layer, True, start, start + C):
            first = self._own_pages(part, buf, k, v) if part.own else None
            table, q_start, kv_len, q_block = self._part_args(part, buf, start, C)
            paged_attention_backward(do, q, None, lse, buf.k, buf.v, table, q_start, buf.dk, buf.dv,
                                     kv_len=kv_len, delta=delta, dq=dq, q_block=q_block)
            if part.own:  # the chunk's own gradient (later chunks' contributions + its own) goes to autograd
                dk, dv = (torch.stack([g[first[b]:first[b] + part.own].flatten(0, 1)[:C] for b in range(B)])
                          .to(t.dtype) for g, t in ((buf.dk, k), (buf.dv, v)))
        return dq.to(q.dtype), dk, dv

    def attend(self, layer, q, k, v, keep_output=False):
        # keep_output is PagedKVStore's; outputs are not kept here (GPU memory is what offloading saves)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _OffloadedAttention.apply(q, k, v, self, layer)
        return self.forward(layer, q, k, v)[0]


class _OffloadedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, store, layer):
        o, lse = store.forward(layer, q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.store, ctx.layer, ctx.start = store, layer, store.lengths[layer] - q.shape[1]
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.store.backward(ctx.layer, ctx.start, q, k, v, o, lse, do)
        return dq, dk, dv, None, None
