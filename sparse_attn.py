"""
Page-level sparse attention: each block of queries attends to a fixed budget of history pages plus its own chunk,
so a chunk's attention cost, and the pages it needs, stop growing with the length of the sequence.

Dense chunked attention (chunk_train.py) costs C x (start + C) per chunk at position `start`: quadratic in the length
overall. Here every block of `q_block` consecutive queries of a chunk (and kv head: the query heads of a GQA group
share one choice, so the kernels still read each K/V tile once per group) attends to

    the sink         the first `sink` pages of the sequence (attention sinks hold much of the softmax mass),
    the recent past  the last `recent` pages before the chunk,
    the top pages    the remaining history pages with the highest scores, up to `budget` history tokens in all,
    its own chunk    causally (the local window).

Scores come from a summary per page and kv head, written when the page is written, and the block's queries; a
`SelectionRule` says what the summary is and how a block scores it (SparseConfig carries the rule to the store):

    MeanKey  the mean of the page's (post-RoPE) keys; score = max over the group's query heads of
             mean_q(block) . mean_k(page): the mean of the block x page logits, so the top pages are where the
             block's attention mass is likely on average.
    Quest    the per-channel min and max of the page's keys (twice MeanKey's memory); score = max over the group's
             heads of sum_c max(qbar_c min_c, qbar_c max_c), qbar = mean_q(block): an upper bound of qbar . k for
             every key k of the page, so a page with one strongly matching key ranks high even if its mean does
             not (Quest, Tang et al. 2024, applied to the block-mean query).

With a budget covering the whole history every page is selected and attention is dense (and exact), whatever the
rule.

Packed documents (doc_start, chunk_train.py): a block never selects a page that lies wholly before its first
query's document start; the budget is spent among the pages from that document's first page on, the sink pages are
that document's first pages, and the recent pages are kept when they are in it. Where fewer pages are eligible than
a block's table has columns, the rest are -1 (none): the kernels' table reads the sequence's first page there,
which the document mask hides (doc_positions gives every query's first visible position in its block's table).

Selection is not differentiable and must be the same in the no-grad stage 1 pass and the stage 2 recomputation, or
the gradient would belong to a different function: stage 1 stores each (layer, chunk) selection and stage 2 reuses
it (the chunk stage 1 skips, the last, is selected once in stage 2). The selected pages become a page table per
(batch row, kv head, query block) - history pages, then the chunk's own - which the paged-attention kernels read
like the dense one (kernels/paged_attention.py: the dense case is the "one table for all" case).

`sparse_attention_reference` is the plain-PyTorch meaning of it all: full-sequence attention under the equivalent
mask, for tests.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from kernels.paged_attention_backward import selection_indices


def block_means(q, counts):
    """q [B, nb, q_block, Hkv, G, D] (the chunk's queries in blocks, zero past the end; any float dtype, summed in
    fp32), counts [nb] queries per block -> the block-mean query [B, nb, Hkv, G, D] fp32."""
    return q.sum(2, dtype=torch.float32) / counts.view(1, -1, 1, 1, 1)


class SelectionRule(Protocol):
    """What a page is summarized by and how a block of queries scores the summaries. Summaries are stored in K's
    dtype, [num_pages, n_kv_heads, *summary_shape(head_dim)]; scores only rank pages (higher: more wanted)."""

    def summary_shape(self, head_dim: int) -> tuple[int, ...]:
        """Shape of one page's summary per kv head."""

    def summarize(self, k: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """k [B, n, page_size, Hkv, D] fp32, pages of keys (zero past counts [n], the keys each page holds)
        -> summaries [B, n, Hkv, *summary_shape]."""

    def score(self, q: torch.Tensor, counts: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """q [B, nb, q_block, Hkv, G, D] fp32, blocks of queries (zero past counts [nb]), summaries [B, P, Hkv,
        *summary_shape] fp32 of the P history pages -> scores [B, Hkv, nb, P]."""


@dataclass(frozen=True)
class MeanKey:
    """Mean key per page; score = block-mean query . mean key, max over the GQA group's heads."""

    def summary_shape(self, head_dim):
        return (head_dim,)

    def summarize(self, k, counts):
        return k.sum(2) / counts.view(1, -1, 1, 1)

    def score(self, q, counts, summaries):
        scores = torch.einsum("bnkgd,bpkd->bkgnp", block_means(q, counts), summaries)  # [B, Hkv, G, nb, P]
        return scores.amax(2)


@dataclass(frozen=True)
class Quest:
    """Per-channel (min, max) of the keys per page; score = the largest block-mean logit any key in the page could
    have, max over the GQA group's heads.

    For one query q, sum_c max(q_c min_c, q_c max_c) = q+ . max + q- . min (q+ = max(q, 0), q- = min(q, 0)) bounds
    q . k for every key k of the page. For a block, the query is the block's mean (mean over the block's queries of
    q . k = qbar . k), so the score is one matmul with inner dimension 2 x head_dim: twice MeanKey's cost, the
    same [B, Hkv, G, n_blocks, P] scores. The alternatives cost too much at 1M tokens (16K pages per layer, 4096-
    token chunks of 128-query blocks): the max over the block's queries of their own bounds scores every query
    against every page, C x H x P x 2D per chunk - several times the selected attention's own logits - into a
    [H, C, P] fp32 tensor (~7 GB per layer and chunk for Qwen2.5-7B) unless fused with the max in a kernel; the
    bound over the block's per-channel query interval [min_c, max_c] is not bilinear (a channel of mixed sign
    scores max(qmax kmax, qmin kmin)), so it needs an elementwise pass over [Hkv, blocks, pages, D] (~1 GB per
    layer and chunk unless fused), and over 128 queries x G heads the intervals widen until the bound ranks pages
    mostly by the size of their keys."""

    def summary_shape(self, head_dim):
        return (2, head_dim)  # (min, max)

    def summarize(self, k, counts):
        held = (torch.arange(k.shape[2], device=k.device) < counts[:, None]).view(1, k.shape[1], k.shape[2], 1, 1)
        low = k.masked_fill(~held, float("inf")).amin(2)  # [B, n, Hkv, D]
        high = k.masked_fill(~held, float("-inf")).amax(2)
        return torch.stack([low, high], dim=3)  # [B, n, Hkv, 2, D]

    def score(self, q, counts, summaries):
        q_mean = block_means(q, counts)
        signed = torch.stack([q_mean.clamp(max=0), q_mean.clamp(min=0)], dim=4)  # [B, nb, Hkv, G, 2, D]: x min, max
        return torch.einsum("bnkgcd,bpkcd->bkgnp", signed, summaries).amax(2)


RULES = {"meankey": MeanKey, "quest": Quest}  # command-line names (train.py --select, bench.py fidelity --rule)


@dataclass(frozen=True)
class SparseConfig:
    """Sparse attention's settings, as a store takes them (PagedKVStore(..., sparse=SparseConfig(budget=4096)))."""
    budget: int  # history tokens per query block: a multiple of the page size covering sink + recent pages
    q_block: int = 128  # queries that share one selection (per kv head): a power of two >= 16
    sink: int = 1  # first pages of the sequence, always selected
    recent: int = 1  # last pages before the chunk, always selected
    rule: SelectionRule = field(default_factory=MeanKey)  # how the other pages are chosen


class SelectionCall(NamedTuple):
    """What PageSelector.log records per attention call: the stored selection the call uses, and the one this
    call's queries would choose now (tests check they agree: stage 2 chooses what stage 1 did)."""
    layer: int
    start: int
    selection: torch.Tensor  # [B, Hkv, n_blocks, n] int32
    fresh: torch.Tensor  # the same shape, int32


class PageSelector:
    """Page summaries and the selection of history pages for a KV store (PagedKVStore or OffloadedKVStore with
    sparse=SparseConfig(...)).

    summaries [num_pages, n_kv_heads, *rule.summary_shape(head_dim)] (K's dtype), indexed by physical page like
    the store's pools.
    selections[layer] {chunk start: selection}: the chunk's selected logical history pages
    [B, n_kv_heads, n_blocks, n] int32, ascending (on the GPU, or in host memory with host=True);
    kernel_tables[layer] {chunk start: the kernels' page table built from it} (page_table, the in-GPU store)."""

    def __init__(self, num_pages, n_kv_heads, head_dim, page_size, sparse: SparseConfig, dtype, device,
                 host=False):
        budget, q_block, sink, recent = sparse.budget, sparse.q_block, sparse.sink, sparse.recent
        if budget % page_size or budget < page_size * (sink + recent):
            raise ValueError(f"the sparse budget ({budget} tokens) must be a multiple of the page size ({page_size}) "
                             f"and cover the {sink} sink and {recent} recent pages")
        if q_block < 16 or q_block & (q_block - 1):
            raise ValueError(f"q_block must be a power of two >= 16, got {q_block}")
        self.page_size, self.budget, self.q_block, self.sink, self.recent = page_size, budget, q_block, sink, recent
        self.rule = sparse.rule
        self.n_select = budget // page_size  # history pages per query block
        shape = (num_pages, n_kv_heads, *self.rule.summary_shape(head_dim))
        self.summaries = torch.zeros(shape, dtype=dtype, device=device)
        self.host = host  # keep selections in host memory (offload.py) rather than on the GPU
        self.selections = {}  # layer -> {start: selection}
        self.kernel_tables = {}  # layer -> {start: page table} (page_table)
        self.history_indices = {}  # start -> {layer: SelectionIndex} built, not yet handed out (history_index)
        self.log = None  # set to a list to record a SelectionCall per attention call (tests)

    @staticmethod
    def index_bytes(cfg, batch, seq_len, chunk, page_size, dtype, sparse: SparseConfig) -> tuple[int, int, int]:
        """Bytes of a step's (page summaries, stored selections, kernel page tables): summaries and tables live on
        the GPU, selections too unless host=True (then the GPU keeps only the summaries)."""
        pages = cfg.num_hidden_layers * batch * math.ceil(seq_len / page_size)
        summaries = (pages * cfg.num_key_value_heads * math.prod(sparse.rule.summary_shape(cfg.head_dim))
                     * dtype.itemsize)
        blocks = cfg.num_hidden_layers * math.ceil(seq_len / chunk) * batch * cfg.num_key_value_heads * math.ceil(
            chunk / sparse.q_block)  # (layer, chunk, batch row, kv head, query block) tuples of a step
        selections = blocks * 4 * (sparse.budget // page_size)  # int32 logical pages
        tables = blocks * 4 * (sparse.budget // page_size + math.ceil(chunk / page_size))  # + the chunk's own pages
        return summaries, selections, tables

    def write(self, pages, k):
        """Summaries of freshly written pages: pages [B, n] physical ids holding k [B, T, Hkv, D], T <= n * ps,
        starting at a page boundary (the last page may be partial: summarized over what it holds)."""
        B, T = k.shape[:2]
        n, ps = pages.shape[1], self.page_size
        k = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, n * ps - T)).view(B, n, ps, *k.shape[2:])
        counts = (T - torch.arange(n, device=k.device) * ps).clamp(max=ps)
        summaries = self.rule.summarize(k, counts)  # [B, n, Hkv, *summary_shape]
        self.summaries[pages.flatten().long()] = summaries.flatten(0, 1).to(self.summaries.dtype)

    def selection(self, layer, q, table, start, doc_start=None):
        """The history pages chunk [start, start + C) of `layer` attends to, [B, Hkv, n_blocks, n] int32 logical
        page indices (see select): chosen by the first call for a (layer, chunk) - stage 1, or stage 2 for the
        last chunk - and stored; later calls return the stored choice, whatever q they pass. On the GPU, or with
        host=True in host memory (offload.py reads it there to know which pages to fetch)."""
        stored = self.selections.setdefault(layer, {})
        if start not in stored:
            sel = self.select(q, table, start, doc_start).to(torch.int32)
            stored[start] = sel.cpu() if self.host else sel
        if self.log is not None:
            fresh = self.select(q, table, start, doc_start).to(torch.int32)
            self.log.append(SelectionCall(layer, start, stored[start], fresh.cpu() if self.host else fresh))
        return stored[start]

    def page_table(self, layer, q, table, start, doc_start=None):
        """(4-D int32 page table [B, Hkv, n_blocks, n_selected + own pages], virtual q_start) for the kernels:
        each block's selected history pages, then the chunk's own pages, which therefore start at virtual
        position n_selected * page_size. q [B, C, H, D]: the chunk's queries (post-RoPE); table [B, >= its
        pages] int32: the layer's page table. Built once per (layer, chunk), like the selection. doc_start [B, C]:
        the queries' document starts (absolute positions); none-entries (-1) read logical page 0."""
        sel = self.selection(layer, q, table, start, doc_start)
        tables = self.kernel_tables.setdefault(layer, {})
        if start not in tables:
            first, last = start // self.page_size, math.ceil((start + q.shape[1]) / self.page_size)
            rows = table[:, None, None, :].expand(*sel.shape[:3], table.shape[1])
            tables[start] = torch.cat([torch.gather(rows, 3, sel.long().clamp(min=0)), rows[..., first:last]], dim=3)
        return tables[start], sel.shape[3] * self.page_size

    def history_index(self, layer, start, n_pool):
        """The dK/dV kernel's SelectionIndex of the history columns of (layer, chunk start)'s kernel table, over a
        pool of n_pool pages, handed out once. Built at a chunk's first request for every layer whose table for
        it exists and has none yet (in a backward, all of the chunk's: its forward ran first), by one sort of
        them all (paged_attention_backward.selection_indices) rather than one per layer."""
        built = self.history_indices.setdefault(start, {})
        if layer not in built:
            n_hist = self.selections[layer][start].shape[3]
            layers = [other for other, tables in self.kernel_tables.items() if start in tables and other not in built
                      and self.selections[other][start].shape == self.selections[layer][start].shape]
            tables = [self.kernel_tables[other][start][..., :n_hist] for other in layers]
            built.update(zip(layers, selection_indices(tables, n_pool)))
        index = built.pop(layer)
        if not built:
            del self.history_indices[start]
        return index

    def select(self, q, table, start, doc_start=None):
        """The history pages chunk [start, start + C) attends to, per (batch row, kv head, block of q_block
        queries): [B, Hkv, cdiv(C, q_block), min(n_select, start // page_size)] int64 logical page indices,
        ascending. doc_start [B, C] (absolute document starts of the chunk's queries): only pages that reach into
        the document of the block's first query are eligible, -1 (first) where fewer are than columns."""
        B, C, H, D = q.shape
        Hkv = self.summaries.shape[1]
        history, nb = start // self.page_size, math.ceil(C / self.q_block)
        pages = torch.arange(history, device=q.device)
        if doc_start is not None:  # the first eligible page of each block: its first query's document's first
            first = (doc_start[:, ::self.q_block] // self.page_size)[:, None, :, None]  # [B, 1, nb, 1]
            eligible = pages >= first  # [B, 1, nb, history]
        if history <= self.n_select:  # everything fits the budget: dense
            sel = pages.expand(B, Hkv, nb, history)
            if doc_start is not None:
                sel = torch.where(eligible, sel, -1).sort(-1).values
            return sel
        pad = nb * self.q_block - C  # no fp32 copy of q: block_means sums in fp32
        blocks = (torch.nn.functional.pad(q.detach(), (0, 0, 0, 0, 0, pad)) if pad else q.detach()).reshape(
            B, nb, self.q_block, Hkv, H // Hkv, D)
        counts = (C - torch.arange(nb, device=q.device) * self.q_block).clamp(max=self.q_block)
        summaries = self.summaries[table[:, :history].long()].float()  # [B, P, Hkv, *summary_shape]
        scores = self.rule.score(blocks, counts, summaries)  # [B, Hkv, nb, P]
        if doc_start is None:
            scores[..., :self.sink] = float("inf")  # always kept
            scores[..., history - self.recent:] = float("inf")
            return scores.topk(self.n_select, dim=-1, sorted=False).indices.sort(-1).values
        keep = (pages < first + self.sink) | (pages >= history - self.recent)  # the document's first pages, recent
        scores = scores.masked_fill(keep, float("inf")).masked_fill(~eligible, float("-inf"))
        top = scores.topk(self.n_select, dim=-1, sorted=False)
        return torch.where(top.values == float("-inf"), -1, top.indices).sort(-1).values

    def truncate(self, layer, length):
        """Forget the selections of chunks starting at or after `length` (they were retired)."""
        for stored in (self.selections.get(layer, {}), self.kernel_tables.get(layer, {})):
            for start in [start for start in stored if start >= length]:
                del stored[start]
        for start in [start for start in self.history_indices if start >= length]:
            self.history_indices[start].pop(layer, None)
            if not self.history_indices[start]:
                del self.history_indices[start]


def doc_positions(selection, doc_start, start, page_size, q_block, own=True):
    """Each query's first visible position in its block's 4-D page table: selection [B, Hkv, nb, n] logical
    history pages (ascending, -1 first), doc_start [B, C] absolute document starts of the chunk
    [start, start + C) -> int32 [B, Hkv, C]: the positions of the table's pages that lie before the document
    start, plus, with own (the chunk's own pages follow the selected ones), those of the chunk before it.
    A -1 (none) column counts as wholly before: hidden from every query. (select puts -1 only where a block's
    document starts past page 0, which then lies before it anyway; context_parallel.py pads a rank's ragged
    share of a selection with -1 columns.)"""
    B, C = doc_start.shape
    blocks = torch.arange(C, device=doc_start.device) // q_block
    pages = selection.long()[:, :, blocks]  # [B, Hkv, C, n]
    ds = doc_start.long()[:, None, :]  # [B, 1, C]
    before = torch.where(pages < 0, page_size, (ds[..., None] - pages * page_size).clamp(0, page_size)).sum(-1)
    if own:
        before = before + (ds - start).clamp(min=0)
    return before.to(torch.int32)


def sparse_attention_reference(q, k, v, selections, page_size, q_block, scale=None):
    """Full-sequence attention under the page mask chunked sparse attention implies, in fp32.
    q [B, T, H, D], k, v [B, T, Hkv, D]; selections {chunk start: [B, Hkv, n_blocks, n] logical history pages}
    (one layer's, as PageSelector.select chose them; chunks run from each start to the next one, or T).
    Query t of the chunk starting at s, in block (t - s) // q_block, sees the positions of its block's selected
    pages and s..t. Returns o [B, T, H, D] fp32."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    visible = torch.zeros(B, Hkv, T, T, dtype=torch.bool, device=q.device)
    starts = sorted(selections)
    for s, e in zip(starts, starts[1:] + [T]):
        visible[:, :, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
        sel = selections[s].long()  # [B, Hkv, nb, n]
        for blk in range(sel.shape[2]):
            r0, r1 = s + blk * q_block, min(s + (blk + 1) * q_block, e)
            pos = (sel[:, :, blk, :, None] * page_size + torch.arange(page_size, device=q.device)).flatten(2)
            rows = torch.zeros(B, Hkv, T, dtype=torch.bool, device=q.device)
            rows.scatter_(2, pos, True)
            visible[:, :, r0:r1] |= rows[:, :, None, :]
    visible = visible.repeat_interleave(group, dim=1)  # [B, H, T, T]
    s = torch.einsum("bthd,blhd->bhtl", q.float(), k.float().repeat_interleave(group, dim=2)) * scale
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhtl,blhd->bthd", p, v.float().repeat_interleave(group, dim=2))
