"""
The KV / KV-gradient store with its pages in host memory: the GPU keeps a fixed-size page cache, whatever the length.

Chunked training (chunk_train.py) needs every layer's K/V of the whole sequence and, in stage 2, their fp32
gradients: 172 KB per token for Qwen2.5-7B, far more than a GPU holds at a million tokens. `OffloadedKVStore` has
PagedKVStore's interface (reset / append / length / attend / truncate, see paged_kv.py) but keeps the pages in
pinned host memory and streams them through three GPU buffers of `cache_tokens` tokens each:

    host (pinned)   k, v [num_pages, page_size, Hkv, D] model dtype; dk, dv the same shape in grad_dtype (fp32)
    GPU cache       3 buffers, each room for cache_tokens / page_size pages of every batch row

attend(layer, q, k, v) is attention over the history [0, start) plus the chunk itself in parts of at most one
buffer (planned by offload_plan.py), which this store yields to the attention seam (attention.py) as they are
loaded; the seam merges their outputs by log-sum-exp. The last part ends with the chunk's own pages, whose K/V are
copied in from the GPU (they are there already). The backward walks the same parts: dq accumulates over them, each
part's dK/dV is added into the buffer (loaded from the host first) and the history's written back when the seam
asks for the next part. The chunk's own dK/dV - what later chunks accumulated for it plus its own part - goes to
autograd, as in PagedKVStore. The host pools, their allocators and the copy strategy are pinned_pool.py's.

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
- the one host sync per call, in stage 1 - and stage 2 reuses it. Each kv head selects its own pages, and only
those rows move: a part holds, per kv head, the union of the pages that a range of selection columns names for it
(each block's selected pages are sorted, so column j of every block is its j-th page), slot i holding in head h's
rows head h's i-th page; all columns in one part when the largest union fits a buffer, else as many columns per
part as fit. Each part comes with a 4-D page table mapping every block's selected pages in those columns to the
buffer's slots, which the kernels read like PagedKVStore's (q_start = the part's columns x page_size: all of them
visible). Parts of one call may share pages; in a backward the next part's gradient pages then load only after
this part's write-back, so a page's gradient adds up across parts exactly as it would in one. Selected pages lie
scattered over the pool: a kernel reads (writes) each (page, kv head)'s rows in the pinned pool in place, and a
gradient page is dirty per kv head. With one selection per chunk (q_block = chunk) a call moves budget pages' rows
per kv head; with small blocks the union of their choices can cover most of the history, and PCIe sets the pace
(bench/RESULTS.md).

On a CPU-only machine the same code runs with every tensor on the CPU and no streams: the bookkeeping is tested
there (with the plain-PyTorch reference kernel where the kernel is not the point), the asynchrony on the GPU
(bench/gpu_run.sh).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from attention import Part, attend, default_kernel
from offload_plan import dense_ranges, sparse_split
from paged_kv import kv_heads, to_device
from pinned_pool import PinnedPagePool
from sparse_attn import PageSelector, doc_positions

NUM_BUFFERS = 3  # GPU cache buffers: one computing, one loading, one writing back


@dataclass(frozen=True, eq=False)
class BufferLoad:
    """Pages of one layer that go through one buffer together (offload_plan.py plans them). rows[b]: batch row b's
    logical page indices in slot order (its i-th page in slot b * cap + i) - [n] whole pages, or for a sparse part
    [Hkv, n], each kv head's own pages (-1: an empty slot) - the last `own` of them the chunk's own pages: their
    K/V come from the compute stream, not the host, and in a backward their gradient (what later chunks
    accumulated) loads like the history's but goes to autograd instead of back to the host. A sparse load
    has `table` [B, Hkv, n_blocks, n_cols] int32 on the device, the buffer slots of each block's selected pages
    in its columns (then of the own pages, in the last part)."""
    layer: int
    backward: bool  # K/V and dK/dV (a backward), else K/V only
    version: int  # the layer's version when planned (see _plan)
    rows: list
    name: tuple  # a page range (a, b), or (start, (first column, end column)) of a selection
    own: int = 0
    table: Optional[torch.Tensor] = None
    shares_next: bool = False  # a page of it is in the call's next part (sparse)
    last: bool = True

    @property
    def key(self):
        """Names the content: a buffer whose key equals a load's holds exactly its pages, loaded at its version."""
        return self.layer, self.backward, self.version, self.name, self.own

    def history_rows(self, b):
        """Batch row b's rows that are history pages (all but the own ones)."""
        return self.rows[b][..., :self.n_history(b)]

    def n_history(self, b):
        """How many of batch row b's slots hold history pages (the own pages follow them)."""
        return self.rows[b].shape[-1] - self.own


def _physical(table, rows):
    """Physical pages of logical ones (rows: any shape, -1 = none, kept)."""
    return np.where(rows >= 0, table[np.maximum(rows, 0)], -1)


class _Buffer:
    """One GPU cache buffer: K, V, dK, dV slots for `pages` pages of each of `batch` rows; row b's i-th page sits in
    slot b * pages + i, so one constant table [batch, pages] serves every dense part."""

    def __init__(self, batch, pages, page_shape, dtype, grad_dtype, device):
        shape = (batch * pages, *page_shape)
        self.k, self.v = (torch.empty(shape, dtype=dtype, device=device) for _ in range(2))
        self.dk, self.dv = (torch.empty(shape, dtype=grad_dtype, device=device) for _ in range(2))
        self.table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
        self.load = None  # the BufferLoad it holds, while loaded and not yet used
        self.loaded = None  # event: the copies into it are done
        self.busy = []  # events: its readers (compute, write-back) are done
        self.used = 0  # when it was last handed out (for least-recently-used reuse)


class _Streams:
    """The copy streams and event helpers; every method is a no-op on the CPU (no streams there)."""

    def __init__(self, device):
        self.device, self.cuda = device, device.type == "cuda"
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None

    def on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def record(self, stream):
        """An event at the current end of `stream` (None: the compute stream); None on the CPU."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def wait(self, stream, *events):
        """Make `stream` (None: the compute stream) wait for the events."""
        if not self.cuda:
            return
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        for event in events:
            if event is not None:
                stream.wait_event(event)


class _BufferCache:
    """The GPU buffers and what moves through them: loads of host pages (h2d) and write-backs of gradient pages
    (d2h), ordered by events (see the module docstring). tables: the store's tables[layer][b] (physical pages)."""

    def __init__(self, pool, streams, tables, batch, cache_pages, page_shape, dtype, grad_dtype, device):
        self.pool, self.streams, self.tables, self.batch, self.cache_pages = pool, streams, tables, batch, cache_pages
        self.buffers = [_Buffer(batch, cache_pages, page_shape, dtype, grad_dtype, device) for _ in range(NUM_BUFFERS)]
        self.clock = 0
        self.kv_written = [None] * len(tables)  # event: the layer's last K/V append reached the host
        self.grad_written = [None] * len(tables)  # event: the layer's last gradient write-back reached the host

    def fetch(self, load, avoid=None):
        """A buffer holding `load`'s pages: the one prefetched for it, or another one, loaded now. Of the others,
        the least recently used: with three buffers, loading part j + 1 waits neither for part j (computing)
        nor for part j - 1's write-back (in flight), only for part j - 2's, long done."""
        self.clock += 1
        for buf in self.buffers:
            if buf.load is not None and buf.load.key == load.key:
                buf.used = self.clock
                return buf
        free = [b for b in self.buffers if b is not avoid]
        buf = min(free, key=lambda b: (b.load is not None, b.used))  # rather not overwrite a prefetched one
        buf.used = self.clock
        self._load(buf, load)
        return buf

    def _load(self, buf, load):
        cap, pool, streams = self.cache_pages, self.pool, self.streams
        streams.wait(streams.h2d, *buf.busy)
        if load.n_history(0):
            streams.wait(streams.h2d, self.kv_written[load.layer])
        if load.backward:
            streams.wait(streams.h2d, self.grad_written[load.layer])
        with streams.on(streams.h2d):
            for b in range(self.batch):
                # the own pages' K/V come from the compute stream (and in a forward may not be appended yet)
                table = self.tables[load.layer][b]
                history = _physical(table, load.history_rows(b))
                pool.copy_in("k", buf.k[b * cap:b * cap + load.n_history(b)], history)
                pool.copy_in("v", buf.v[b * cap:b * cap + load.n_history(b)], history)
                if load.backward:  # gradient pages never written back this step are zero: no copy
                    pages = _physical(table, load.rows[b])
                    slots, dirty = slice(b * cap, b * cap + pages.shape[-1]), pool.dirty_of(pages)
                    pool.copy_in("dk", buf.dk[slots], pages, dirty)
                    pool.copy_in("dv", buf.dv[slots], pages, dirty)
        buf.load, buf.loaded, buf.busy = load, streams.record(streams.h2d), []

    def write_back(self, buf):
        """Copy the buffer's history gradient pages (updated by the compute stream) back to their host pages."""
        load, cap, streams = buf.load, self.cache_pages, self.streams
        streams.wait(streams.d2h, streams.record(None))
        with streams.on(streams.d2h):
            for b in range(self.batch):
                pages = _physical(self.tables[load.layer][b], load.history_rows(b))
                self.pool.mark_dirty(pages)
                slots = slice(b * cap, b * cap + pages.shape[-1])
                self.pool.copy_out("dk", buf.dk[slots], pages)
                self.pool.copy_out("dv", buf.dv[slots], pages)
        self.grad_written[load.layer] = streams.record(streams.d2h)
        buf.busy.append(self.grad_written[load.layer])


class _Call:
    """The attention seam's view of one (layer, chunk) call (attention.History): its parts, streamed."""
    chunk_kv_in_pages = False  # the parts get the chunk's k, v copied in: the backward keeps them

    def __init__(self, store, layer, start, doc_start=None):
        self.store, self.layer, self.start, self.doc_start = store, layer, start, doc_start

    def parts(self, q, k, v, backward):
        return self.store._attention_parts(self.layer, self.start, q, k, v, backward, self.doc_start)


class OffloadedKVStore:
    def __init__(self, num_layers, batch, n_kv_heads, head_dim, page_size, num_pages, dtype, device,
                 cache_tokens=65536, grad_dtype=torch.float32, sparse=None, kernel=None):
        """kernel: the attention kernel (attention.py); default: Triton for CUDA tensors or under Triton's
        interpreter, else the plain-PyTorch reference."""
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
        page_shape = (page_size, n_kv_heads, head_dim)
        self.pool = PinnedPagePool(num_layers, batch, page_shape, num_pages, dtype, grad_dtype, device)
        self.num_pages = self.pool.num_pages
        empty = np.zeros(0, dtype=np.int64)
        self.tables = [[empty] * batch for _ in range(num_layers)]  # tables[layer][b] = physical pages, in order
        self.lengths = [0] * num_layers
        self.versions = [0] * num_layers  # see _plan

        self.cache_pages = cache_tokens // page_size
        self.streams = _Streams(device)
        self.cache = _BufferCache(self.pool, self.streams, self.tables, batch, self.cache_pages, page_shape, dtype,
                                  grad_dtype, device)
        self.buffers = self.cache.buffers
        self.next_call = {}  # (layer, backward) -> the call that followed it last time, for prefetching
        self.last_call = None
        self.kernel = kernel or default_kernel(device)
        # sparse attention: summaries indexed by physical page (on the GPU), selections kept in host memory, and the
        # layers' page tables on the GPU too (selection gathers the history's summaries through them)
        self.selector = PageSelector(num_pages, n_kv_heads, head_dim, page_size, sparse, dtype, device,
                                     host=True) if sparse else None
        self.device_tables = [torch.empty(batch, 0, dtype=torch.int32, device=device)] * num_layers
        self.sparse_plans = {}  # (layer, start) -> its selection's split, with device tables; recent calls only
        self.doc_first = (None, 0)  # (chunk start, the first page its documents reach): dense calls skip the rest

    @classmethod
    def for_sequence(cls, model, batch, seq_len, page_size, dtype, device, cache_tokens=65536,
                     grad_dtype=torch.float32, sparse=None, kernel=None):
        """A host pool exactly large enough for every layer's K/V of `batch` sequences of `seq_len` tokens."""
        cfg = model.config
        num_pages = cfg.num_hidden_layers * batch * math.ceil(seq_len / page_size)
        return cls(cfg.num_hidden_layers, batch, *kv_heads(model), page_size, num_pages,
                   dtype, device, cache_tokens, grad_dtype, sparse, kernel)

    @staticmethod
    def cache_bytes(cfg, batch, page_size, cache_tokens, dtype, grad_dtype=torch.float32) -> int:
        """GPU bytes of the page cache (NUM_BUFFERS buffers), independent of the sequence length."""
        per_token = cfg.num_key_value_heads * cfg.head_dim * 2 * (dtype.itemsize + grad_dtype.itemsize)
        return NUM_BUFFERS * batch * (cache_tokens // page_size) * page_size * per_token

    @property
    def bytes_moved(self):
        """{"h2d": bytes, "d2h": bytes} copied so far (benchmarks)."""
        return self.pool.bytes_moved

    # ------------------------------------------------------------------------------------------ bookkeeping

    def length(self, layer) -> int:
        return self.lengths[layer]

    def num_free_pages(self) -> int:
        return self.pool.num_free()

    def reset(self):
        for layer in range(self.num_layers):
            self.truncate(layer, 0)

    def truncate(self, layer, length):
        if length < self.lengths[layer] and length % self.page_size:
            raise ValueError(f"the offloaded store truncates at page boundaries, got {length} "
                             f"(page_size {self.page_size})")
        keep = math.ceil(length / self.page_size)
        self.pool.release(layer, [table[keep:] for table in self.tables[layer]])
        self.tables[layer] = [table[:keep] for table in self.tables[layer]]
        self.device_tables[layer] = self.device_tables[layer][:, :keep]
        self.lengths[layer] = min(self.lengths[layer], length)
        self.versions[layer] += 1
        if self.doc_first[0] is not None and self.doc_first[0] >= length:  # that chunk is gone (a new step)
            self.doc_first = (None, 0)
        if self.selector is not None:
            self.selector.truncate(layer, length)
            for key in [key for key in self.sparse_plans if key[0] == layer and key[1] >= length]:
                del self.sparse_plans[key]

    def clear_grad(self, layer, start, end):
        """Zero the dK/dV accumulated for the layer's positions [start, min(end, length)) (whole pages from start,
        a page boundary): they are marked never written back, so the next load zero-fills them on the GPU."""
        first, last = start // self.page_size, math.ceil(min(end, self.lengths[layer]) / self.page_size)
        for table in self.tables[layer]:
            self.pool.dirty[table[first:last]] = False
        self.versions[layer] += 1  # a buffer loaded before holds the old gradients

    def append(self, layer, k, v):
        """k, v: [B, T, Hkv, D] on the GPU -> new host pages at positions [length, length + T), copied on d2h."""
        T = k.shape[1]
        start = self.lengths[layer]
        if start % self.page_size:
            raise ValueError(f"the offloaded store appends at page boundaries: layer {layer} holds {start} tokens, "
                             f"not a multiple of page_size {self.page_size}")
        new = self.pool.alloc(layer, math.ceil(T / self.page_size))  # [B, n]
        self.tables[layer] = [np.concatenate([table, pages]) for table, pages in zip(self.tables[layer], new)]
        if self.selector is not None:
            new_ids = to_device(torch.from_numpy(new).to(torch.int32), self.device)
            self.device_tables[layer] = torch.cat([self.device_tables[layer], new_ids], dim=1)
            self.selector.write(new_ids, k)
        k, v = (t.detach().to(self.pool.k.dtype).contiguous() for t in (k, v))
        streams = self.streams
        streams.wait(streams.d2h, streams.record(None))
        with streams.on(streams.d2h):
            self.pool.write_tokens(new, k, v)
        if streams.cuda:
            k.record_stream(streams.d2h)
            v.record_stream(streams.d2h)
        self.cache.kv_written[layer] = streams.record(streams.d2h)
        self.lengths[layer] = start + T

    # ------------------------------------------------------------------------------------------ the cache

    def _plan(self, layer, backward, start, end):
        """The BufferLoads a call streams (offload_plan.py): the history [0, start) in buffer-sized ranges of pages,
        or with sparse attention in column ranges of the chunk's selection, the last one ending with the chunk's
        own pages. None if the call's selection is not made yet (a guess of the next call in stage 1: nothing to
        prefetch). The layer's version changes whenever its host pages may have: a truncation (pages released and
        maybe reused) or a finished backward (gradients written back); a buffer loaded under an older version is
        never used."""
        ps, version = self.page_size, self.versions[layer]
        history, own = start // ps, math.ceil(end / ps) - start // ps
        if backward and self.lengths[layer] < end:  # a guess that cannot be the next call: its pages are gone
            return None
        if self.selector is not None and history:
            plan = self._sparse_plan(layer, start, own)
            if plan is None:
                return None
            return [BufferLoad(layer, backward, version, p.rows, (start, p.columns), p.own, table, p.shares_next,
                               j + 1 == len(plan)) for j, (p, table) in enumerate(plan)]
        first = self.doc_first[1] if self.doc_first[0] == start else 0
        ranges = dense_ranges(history, own, self.cache_pages, first)
        return [BufferLoad(layer, backward, version, [np.arange(a, b)] * self.batch, (a, b),
                           own if b > history else 0, last=j + 1 == len(ranges)) for j, (a, b) in enumerate(ranges)]

    def _sparse_plan(self, layer, start, own):
        """[(SparsePart, its device table)] of a stored selection, kept for the next few calls (stage 2's forward
        and backward of a chunk split it once)."""
        key = (layer, start)
        if key not in self.sparse_plans:
            sel = self.selector.selections.get(layer, {}).get(start)
            if sel is None:
                return None
            # none-entries (-1, packed documents) read page 0, hidden by the document mask
            parts = sparse_split(np.maximum(sel.numpy(), 0), start // self.page_size, own, self.cache_pages)
            self.sparse_plans[key] = [(p, to_device(torch.from_numpy(p.slots), self.device)) for p in parts]
            while len(self.sparse_plans) > 2 * self.num_layers + 2:  # forget the oldest
                del self.sparse_plans[next(iter(self.sparse_plans))]
        return self.sparse_plans[key]

    def _stream(self, layer, backward, start, end):
        """Yield (load, buffer) for each part of a call, loaded and ready for the compute stream; the next part
        loads while the caller computes on this one - unless, in a backward, it shares gradient pages with this
        one: then it loads after this part's write-back. Gradient parts of the history are written back after
        use. During a layer's last part, the first part of the call expected next (learned from the order of
        previous calls) is prefetched."""
        call = (layer, backward)
        if self.last_call is not None:
            self.next_call[self.last_call] = call
        self.last_call = call
        guess = self.next_call.get(call) or (
            ((layer - 1, True) if layer > 0 else None) if backward else
            ((layer + 1, False) if layer + 1 < self.num_layers else (layer, True)))
        following = (self._plan(*guess, start, end) or [])[:1] if guess else []
        loads = self._plan(layer, backward, start, end)
        todo = loads + following  # the guessed part is only loaded, not yielded
        buf = self.cache.fetch(todo[0]) if todo else None
        for j, load in enumerate(loads):
            late = backward and load.shares_next
            nxt = self.cache.fetch(todo[j + 1], avoid=buf) if j + 1 < len(todo) and not late else None
            self.streams.wait(None, buf.loaded)
            yield load, buf
            buf.busy = [self.streams.record(None)]
            if load.backward and load.n_history(0):  # the own pages' gradient goes to autograd
                self.cache.write_back(buf)
            buf.load = None
            buf = self.cache.fetch(todo[j + 1], avoid=buf) if late else nxt
        if backward:
            self.versions[layer] += 1

    # ------------------------------------------------------------------------------------------ attention

    def _attention_parts(self, layer, start, q, k, v, backward, doc_start=None):
        """The seam's parts (attention.Part) of the call, one per loaded buffer. Dense: a range of positions before
        the chunk's queries, the last one followed by the chunk itself (causal). Sparse: each block's table lists
        its selected pages in the part's columns (buffer slots), all visible - virtual q_start = columns x
        page_size - then, in the last part, the chunk's own pages."""
        ps, C = self.page_size, q.shape[1]
        for load, buf in self._stream(layer, backward, start, start + C):
            if load.own:  # the chunk's k, v [B, C, Hkv, D] into its pages' slots (on the compute stream; the
                for src, dst in ((k, buf.k), (v, buf.v)):  # kernels ignore positions past the chunk)
                    for b in range(q.shape[0]):
                        first = b * self.cache_pages + load.n_history(b)
                        dst[first:first + load.own].flatten(0, 1)[:C] = src[b]
            doc = None
            if load.table is None:
                n = len(load.rows[0])
                q_start, table, q_block = start - int(load.rows[0][0]) * ps, buf.table[:, :n], None
                kv_len = q_start + C if load.own else n * ps
                if doc_start is not None:  # the part's positions start at its first page
                    doc = (doc_start - int(load.rows[0][0]) * ps).clamp(min=0)
            else:
                q_start, table, q_block = (load.table.shape[3] - load.own) * ps, load.table, self.selector.q_block
                kv_len = q_start + C if load.own else q_start
                if doc_start is not None:  # in the positions of each block's table: the part's columns (+ own)
                    c0, c1 = load.name[1]
                    sel = self.selector.selections[layer][start][..., c0:c1].to(self.device)
                    doc = doc_positions(sel, doc_start, start, ps, q_block, own=bool(load.own))
            yield Part(buf.k, buf.v, buf.dk, buf.dv, table, q_start, kv_len, q_block, holds_chunk=bool(load.own),
                       last=load.last, doc_start=doc)

    def attend(self, layer, q, k, v, keep_output=False, doc_start=None):
        """The chunk's attention over the layer's offloaded history (attention.attend over the streamed parts).
        keep_output is PagedKVStore's; outputs are not kept here (GPU memory is what offloading saves).
        doc_start [B, C]: the queries' document starts (absolute positions); pages before the chunk's earliest
        one are not loaded."""
        C = q.shape[1]
        if math.ceil(C / self.page_size) > self.cache_pages:  # the chunk's pages share a buffer with history
            raise ValueError(f"a chunk of {C} tokens does not fit the page cache's buffers of "
                             f"{self.cache_pages * self.page_size} tokens: raise cache_tokens or lower the chunk")
        start = self.lengths[layer] - C
        if self.selector is not None:  # made (stage 1) or found (stage 2) before the parts are known
            self.selector.selection(layer, q, self.device_tables[layer], start, doc_start)
        if doc_start is not None and self.doc_first[0] != start:  # one host sync per chunk, not per layer
            self.doc_first = (start, int(doc_start[:, 0].min()) // self.page_size)
        return attend(_Call(self, layer, start, doc_start), q, k, v, self.kernel)
