"""
Context parallelism: one sequence's history (its KV/dKV pages) sharded across the ranks of a group, for degrees
beyond what tensor parallelism can split (it cuts by KV heads: 4 for Qwen2.5-7B).

Every rank of the group runs the same chunks through the same (or the same tensor-parallel share of the) model: the
activations of a chunk are replicated, only the stored history is divided. Chunks are owned round-robin: the i-th
chunk a layer stores (positions [i C, (i + 1) C)) goes into the page pool of rank i % size, which keeps its K/V and
the dK/dV later chunks send back to it; the other ranks only count it. Why by chunk, round-robin:
  - memory: a rank's pool holds ceil(chunks / size) chunks of every layer, and stage 2 (right to left) frees them
    evenly across ranks; contiguous blocks of chunks would free rank size - 1's pages first.
  - attention work: chunk c attends to chunks 0..c, which round-robin spreads over all ranks to within one chunk
    (contiguous blocks would leave the early chunks' attention to rank 0 alone).
  - a chunk's own causal block stays whole on one rank, and a chunk's pages are appended and released together,
    as the store's LIFO page bookkeeping (paged_kv.py) wants; a page-level split would cut both.

Each rank's attention over its share is one Part (attention.py) through its pool's table, whose positions are the
rank's held chunks in order: the virtual positions keep causality right, since every held history position comes
before the chunk (visible to all its queries) and the owner's table ends with the chunk itself (q_start = the
positions before it). The ranks' partial (o_r, lse_r) are merged exactly by `LseMerge`:

    m = max_r lse_r,  w_r = exp(lse_r - m),  o = sum_r w_r o_r / sum_r w_r,  lse = m + log(sum_r w_r)

(one all-reduce for the max, one for the sums). The backward uses the merged lse and delta = rowsum(dO * O) (both
global, from the merged o), so each rank's kernel backward over its pages gives its exact share: dK/dV into the
owner's pages, a partial dq. One all-reduce sums dq and the chunk's own dk/dv (held by its owner; zeros
elsewhere), so that every rank continues the backward with identical gradients: every replicated computation (and
every parameter) then gets the same gradient on every rank, that of one process, and no parameter gradient needs a
reduction over the group (summing them would count each `size` times).

Packed documents: a query's document start becomes the count of this rank's held positions before it (its first
visible position in the rank's table).

Sparse attention (sparse_attn.py): the selection must be one process's, and it needs every history page's
summary, but a rank holds only its chunks' pages. Every rank computes every chunk's K anyway (stage 1, stage 2's
recompute), so every rank keeps the summaries of ALL pages - in a PageSelector of its own, indexed by the
sequence's logical pages (layer, row, page), not by the pool's physical ones - and selects from them: the same
summaries and queries on every rank, so the same selection, that of one process. Each rank then attends over the
selected pages it holds (plus the chunk itself on its owner) through a 4-D table of its own: per (row, kv head,
block) its share is ragged, so the table is as wide as the widest share (one host sync per layer and chunk, when
the table is built; stage 2 reuses it) and shorter rows are padded at the front with -1 columns, which read the
rank's first page and are hidden from every query through the kernels' document mask (sparse_attn.doc_positions
counts them before every query's first visible position). The partial outputs then merge by log-sum-exp as the
dense ones do, and the gradient is one process's sparse gradient. Memory: the summaries (1/page_size of K, per kv
head) and the selections are whole on every rank; the pages and the tables' history columns are 1/C.

Not here: offloaded pages (the sharded store reads its pool's pages directly; a streamed inner store would need its
parts yielded per rank, and its host-side selection plans built from the rank's share), and kept stage-1 outputs
(the output cache); `check` refuses the first with --cp > 1, the second is not used.
"""

import dataclasses
import math

import torch
import torch.distributed as dist

from attention import Part, attend
from paged_kv import PagedKVStore
from sparse_attn import PageSelector, SparseConfig, doc_positions


class LseMerge:
    """The cross-rank merge the attention seam calls (attention.attend's `merge`): outputs by log-sum-exp,
    gradients by sum, over `group`."""

    def __init__(self, group=None):
        self.group = group

    def forward(self, o, lse):
        """o [B, C, H, D] (this rank's parts), lse [B, H, C] fp32 (-inf: nothing visible) -> the merged (o fp32,
        lse), the same on every rank."""
        m = lse.clone(memory_format=torch.contiguous_format)  # all_reduce pairs elements in memory order
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        shift = m.masked_fill(m == float("-inf"), 0.0)  # rows no rank sees anything of: weights exp(-inf) = 0
        w = torch.exp(lse - shift)  # [B, H, C]
        w_rows = w.transpose(1, 2)[..., None]  # [B, C, H, 1]
        packed = torch.cat([(o.float() * w_rows).flatten(), w.flatten()])
        dist.all_reduce(packed, group=self.group)
        num, den = packed[:o.numel()].view(o.shape), packed[o.numel():].view(w.shape)
        den_rows = den.transpose(1, 2)[..., None]
        o = torch.where(den_rows > 0, num / den_rows.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        return o, shift + torch.log(den)

    def backward(self, dq, dk, dv):
        """Sums over the group (one all-reduce, in fp32) of the partial dq and of the chunk's dk, dv."""
        grads = (dq, dk, dv)
        packed = torch.cat([g.float().flatten() for g in grads])
        dist.all_reduce(packed, group=self.group)
        out, offset = [], 0
        for g in grads:
            out.append(packed[offset:offset + g.numel()].view(g.shape).to(g.dtype))
            offset += g.numel()
        return tuple(out)


class _Parts:
    """A History (attention.py) of this rank's parts: none, or one over its pool."""
    chunk_kv_in_pages = True  # on the chunk's owner its pages hold it; elsewhere no part needs it

    def __init__(self, parts):
        self._parts = parts

    def parts(self, q, k, v, backward):
        return self._parts


class ShardedKVStore:
    """PagedKVStore's interface (chunk_train.py) over the history of a context-parallel group: this rank's pool
    (`inner`, a PagedKVStore) stores the chunks it owns, round-robin by the order a layer appends them; lengths,
    truncation and attention are in the sequence's positions. Every rank of the group makes the same calls in the
    same order (they are collective in attend)."""

    def __init__(self, inner: PagedKVStore, group=None, sparse: SparseConfig | None = None, max_len: int = 0):
        """sparse: page-level sparse attention over the group's history, selected here over every page's summary
        (the inner pool must not select); max_len: the longest sequence it will hold (sizes the summaries)."""
        if inner.selector is not None:
            raise ValueError("the inner pool must be dense: ShardedKVStore(sparse=...) selects over all the pages")
        self.inner, self.group = inner, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.page_size = inner.page_size
        self.segments = [[] for _ in range(inner.num_layers)]  # per layer: (start, end) of every chunk appended
        self.merge = LseMerge(group)
        self.selector = None
        if sparse is not None:  # summaries of every logical page (layer, row, page) of the sequence, on every rank
            pages = math.ceil(max_len / self.page_size)
            L, B, Hkv, D = inner.num_layers, inner.batch, inner.k.shape[2], inner.k.shape[3]
            self.selector = PageSelector(L * B * pages, Hkv, D, self.page_size, sparse, inner.k.dtype, inner.k.device)
            # the selector's "physical" page ids: each layer's table [B, pages] over its logical pages
            self.logical = torch.arange(L * B * pages, dtype=torch.int32, device=inner.k.device).view(L, B, pages)
            self.tables = {}  # (layer, chunk start) -> this rank's (4-D table or None, its selected global pages)

    @classmethod
    def for_sequence(cls, model, batch, seq_len, chunk, page_size, dtype, device, group=None,
                     grad_dtype=torch.float32, kernel=None, sparse=None):
        """A pool for this rank's chunks of `batch` sequences of seq_len tokens cut into chunks of `chunk`: at most
        ceil(chunks / size) of them per layer. sparse: SparseConfig (sparse_attn.py) or None (dense)."""
        size = dist.get_world_size(group)
        owned = min(seq_len, math.ceil(math.ceil(seq_len / chunk) / size) * chunk)
        inner = PagedKVStore.for_sequence(model, batch, owned, page_size, dtype, device, grad_dtype, kernel=kernel)
        return cls(inner, group, sparse, seq_len)

    def _owned(self, layer):
        return [seg for i, seg in enumerate(self.segments[layer]) if i % self.size == self.rank]

    def _local(self, layer, pos) -> int:
        """How many of the layer's positions < pos this rank holds (its pool's positions are its chunks')."""
        return sum(max(0, min(e, pos) - s) for s, e in self._owned(layer))

    def length(self, layer) -> int:
        return self.segments[layer][-1][1] if self.segments[layer] else 0

    def reset(self):
        for layer in range(len(self.segments)):
            self.truncate(layer, 0)

    def append(self, layer, k, v):
        """k, v [B, T, Hkv, D]: the next chunk, at positions [length, length + T); stored if this rank owns it."""
        start = self.length(layer)
        owner = len(self.segments[layer]) % self.size
        if self.selector is not None:  # every rank summarizes every chunk's pages
            if start % self.page_size:
                raise ValueError(f"sparse attention appends at page boundaries: layer {layer} holds {start} tokens")
            first, last = start // self.page_size, math.ceil((start + k.shape[1]) / self.page_size)
            self.selector.write(self.logical[layer][:, first:last], k)
        self.segments[layer].append((start, start + k.shape[1]))
        if owner == self.rank:
            self.inner.append(layer, k, v)

    def truncate(self, layer, length):
        self.segments[layer] = [(s, min(e, length)) for s, e in self.segments[layer] if s < length]
        self.inner.truncate(layer, self._local(layer, length))
        if self.selector is not None:
            self.selector.truncate(layer, length)
            for key in [key for key in self.tables if key[0] == layer and key[1] >= length]:
                del self.tables[key]

    def clear_grad(self, layer, start, end):
        """Zero the dK/dV of positions [start, end) (start a chunk's first) where this rank holds them."""
        self.inner.clear_grad(layer, self._local(layer, start), self._local(layer, end))

    def _doc_positions(self, layer, doc_start):
        """doc_start [B, C] absolute document starts -> int32 [B, C], each query's first visible position in this
        rank's table: the held positions before its document start (n, all of them: nothing visible)."""
        first = torch.zeros_like(doc_start)
        for s, e in self._owned(layer):
            first += (doc_start - s).clamp(0, e - s)
        return first.to(torch.int32)

    def attend(self, layer, q, k, v, keep_output=False, doc_start=None):
        """The chunk's (the last stored) attention over the whole group's history: this rank's part, merged with
        the others'. keep_output is ignored (no output cache). doc_start [B, C]: the queries' document starts
        (absolute positions), mapped into this rank's table."""
        if self.selector is not None:
            return self._attend_sparse(layer, q, k, v, doc_start)
        inner, C = self.inner, q.shape[1]
        doc = None if doc_start is None else self._doc_positions(layer, doc_start)
        n = inner.length(layer)  # positions this rank holds, the chunk's included if it owns it
        owns_chunk = (len(self.segments[layer]) - 1) % self.size == self.rank
        table = inner.page_table(layer)
        if owns_chunk:  # its held history, then the chunk: causal from q_start on
            parts = [Part(inner.k, inner.v, inner.dk, inner.dv, table, n - C, doc_start=doc)]
        elif n:  # history only, all of it before the chunk: visible to every query
            parts = [Part(inner.k, inner.v, inner.dk, inner.dv, table, n, kv_len=n, holds_chunk=False, doc_start=doc)]
        else:
            parts = []
        return attend(_Parts(parts), q, k, v, inner.kernel, merge=self.merge)

    def _sparse_table(self, layer, sel, start, C, owns_chunk):
        """This rank's share of the chunk's selection sel [B, Hkv, nb, n] (global logical history pages, -1:
        none): (its 4-D page table [B, Hkv, nb, w (+ the chunk's own pages on its owner)] into the pool, or None
        where it has nothing to attend; the global pages of its w history columns, -1 (padding) first)."""
        ps, inner = self.page_size, self.inner
        # local[1 + p]: this rank's logical page of global history page p (-1: another rank's; local[0]: none)
        local = torch.full((start // ps + 1,), -1, dtype=torch.long)
        held = 0  # pages of this rank's earlier chunks (history chunks are whole pages)
        for s, e in self._owned(layer):
            if s < start:
                local[1 + s // ps:1 + e // ps] = torch.arange(held, held + (e - s) // ps)
                held += (e - s) // ps
        local = local.to(sel.device)
        mine = torch.where(local[sel.long() + 1] >= 0, sel.long(), -1).sort(-1).values  # others' and none: first
        w = int((mine >= 0).sum(-1).max()) if mine.numel() else 0  # the widest row's share (a host sync)
        mine = mine[..., mine.shape[-1] - w:]  # [B, Hkv, nb, w]
        pool = inner.page_table(layer)  # [B, pages this rank holds]
        if not owns_chunk and w == 0:
            return None, mine
        rows = pool[:, None, None, :].expand(*mine.shape[:3], pool.shape[1])
        table = torch.gather(rows, 3, local[mine + 1].clamp(min=0))  # padding reads the rank's first page
        if owns_chunk:  # then the chunk's own pages: the pool's last ones
            n = inner.length(layer)
            table = torch.cat([table, rows[..., (n - C) // ps:math.ceil(n / ps)]], dim=3)
        return table, mine

    def _attend_sparse(self, layer, q, k, v, doc_start):
        """Sparse attention: one process's selection (every rank has every page's summary), this rank's share of
        it as one part, merged with the others' by log-sum-exp."""
        inner, C = self.inner, q.shape[1]
        start = self.length(layer) - C
        owns_chunk = (len(self.segments[layer]) - 1) % self.size == self.rank
        sel = self.selector.selection(layer, q, self.logical[layer], start, doc_start)
        if (layer, start) not in self.tables:
            self.tables[layer, start] = self._sparse_table(layer, sel, start, C, owns_chunk)
        table, mine = self.tables[layer, start]
        parts = []
        if table is not None:
            # the padding hidden from every query (and, with documents, what precedes each query's document)
            ds = doc_start if doc_start is not None else torch.zeros(q.shape[:2], dtype=torch.long, device=q.device)
            doc = doc_positions(mine, ds, start, self.page_size, self.selector.q_block, own=owns_chunk)
            q_start = mine.shape[3] * self.page_size
            parts = [Part(inner.k, inner.v, inner.dk, inner.dv, table, q_start, None if owns_chunk else q_start,
                          self.selector.q_block, holds_chunk=owns_chunk, doc_start=doc)]
        return attend(_Parts(parts), q, k, v, inner.kernel, merge=self.merge)


# ------------------------------------------------------------------------------------------------ the plan


def tp_sharded_params(cfg) -> int:
    """Parameters tensor parallelism splits (tensor_parallel.py): every layer's q/k/v (with biases), o, gate, up,
    down; the embedding, norms and head stay whole."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_hidden_layers * (h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * i)


def rank_plan(plan, cfg, total_params: int, tp: int, cp: int):
    """The memory plan (plan.py) of one rank: the KV/dKV pool divided by cp (the sparse index stays whole: every
    rank keeps every page's summary and every selection), weights, gradients and optimizer state by their
    tensor-parallel share (the split projections / tp, the rest whole); activations and the loss slice as they are
    (every rank runs whole chunks). A new Plan, no verdict."""
    state_share = (total_params - tp_sharded_params(cfg) * (1 - 1 / tp)) / total_params

    def scale(name, size):
        if "KV/dKV page" in name and "cache" not in name:  # (the sparse index is whole on every rank)
            return math.ceil(size / cp)
        if name.startswith(("weights", "gradients", "optimizer")):
            return math.ceil(size * state_share)
        return size

    device = {name: scale(name, size) for name, size in plan.device.items()}
    host = {name: scale(name, size) for name, size in plan.host.items()}
    return dataclasses.replace(plan, device=device, host=host, device_per_token=math.ceil(plan.device_per_token / cp),
                               host_per_token=math.ceil(plan.host_per_token / cp), refusal=None)


def check(args):
    """What context parallelism cannot do with this run (cli.resolve's args), as a UserError."""
    from cli import UserError, chunked
    why = ("--cp needs the chunked path (--seq > --chunk)" if not chunked(args) else
           "offloaded pages are not sharded across ranks (--offload off)" if args.offload == "on" else None)
    if why:
        raise UserError(f"--cp {args.cp}: {why}")
