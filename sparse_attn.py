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

Scores come from a summary per page and kv head, the mean of its (post-RoPE) keys, written when the page is
written: score(block, page) = max over the group's query heads of mean_q(block) . mean_k(page). Mean-query times
mean-key is the mean of the block x page logits, so the top pages are where the block's attention mass is likely.
With a budget covering the whole history every page is selected and attention is dense (and exact).

Selection is not differentiable and must be the same in the no-grad stage 1 pass and the stage 2 recomputation, or
the gradient would belong to a different function: stage 1 stores each (layer, chunk) selection and stage 2 reuses
it (the chunk stage 1 skips, the last, is selected once in stage 2). The selected pages become a page table per
(batch row, kv head, query block) - history pages, then the chunk's own - which the paged-attention kernels read
like the dense one (kernels/paged_attention.py: the dense case is the "one table for all" case).

`sparse_attention_reference` is the plain-PyTorch meaning of it all: full-sequence attention under the equivalent
mask, for tests.
"""

import math

import torch


class PageSelector:
    """Page summaries and the selection of history pages for a KV store (PagedKVStore or OffloadedKVStore with
    sparse=dict(budget=..., q_block=...)).

    summaries [num_pages, n_kv_heads, head_dim] (K's dtype), indexed by physical page like the store's pools.
    selections[layer] {chunk start: selection}: the chunk's selected logical history pages
    [B, n_kv_heads, n_blocks, n] int32, ascending (on the GPU, or in host memory with host=True);
    kernel_tables[layer] {chunk start: the kernels' page table built from it} (page_table, the in-GPU store)."""

    def __init__(self, num_pages, n_kv_heads, head_dim, page_size, budget, dtype, device, q_block=128, sink=1,
                 recent=1, host=False):
        if budget % page_size or budget < page_size * (sink + recent):
            raise ValueError(f"the sparse budget ({budget} tokens) must be a multiple of the page size ({page_size}) "
                             f"and cover the {sink} sink and {recent} recent pages")
        if q_block < 16 or q_block & (q_block - 1):
            raise ValueError(f"q_block must be a power of two >= 16, got {q_block}")
        self.page_size, self.budget, self.q_block, self.sink, self.recent = page_size, budget, q_block, sink, recent
        self.n_select = budget // page_size  # history pages per query block
        self.summaries = torch.zeros(num_pages, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.host = host  # keep selections in host memory (offload.py) rather than on the GPU
        self.selections = {}  # layer -> {start: selection}
        self.kernel_tables = {}  # layer -> {start: page table} (page_table)
        self.log = None  # set to a list to record (layer, start, selection) of every attention call (tests)

    @staticmethod
    def index_bytes(cfg, batch, seq_len, chunk, page_size, budget, dtype, q_block=128) -> tuple[int, int, int]:
        """Bytes of a step's (page summaries, stored selections, kernel page tables): summaries and tables live on
        the GPU, selections too unless host=True (then the GPU keeps only the summaries)."""
        pages = cfg.num_hidden_layers * batch * math.ceil(seq_len / page_size)
        summaries = pages * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
        blocks = cfg.num_hidden_layers * math.ceil(seq_len / chunk) * batch * cfg.num_key_value_heads * math.ceil(
            chunk / q_block)  # (layer, chunk, batch row, kv head, query block) tuples of a step
        selections = blocks * 4 * (budget // page_size)  # int32 logical pages
        tables = blocks * 4 * (budget // page_size + math.ceil(chunk / page_size))  # + the chunk's own pages
        return summaries, selections, tables

    def write(self, pages, k):
        """Summaries of freshly written pages: pages [B, n] physical ids holding k [B, T, Hkv, D], T <= n * ps,
        starting at a page boundary (the last page may be partial: mean over what it holds)."""
        B, T = k.shape[:2]
        n, ps = pages.shape[1], self.page_size
        k = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, n * ps - T)).view(B, n, ps, *k.shape[2:])
        counts = (T - torch.arange(n, device=k.device) * ps).clamp(max=ps).view(1, n, 1, 1)
        self.summaries[pages.flatten().long()] = (k.sum(2) / counts).flatten(0, 1).to(self.summaries.dtype)

    def selection(self, layer, q, table, start):
        """The history pages chunk [start, start + C) of `layer` attends to, [B, Hkv, n_blocks, n] int32 logical
        page indices (see select): chosen by the first call for a (layer, chunk) - stage 1, or stage 2 for the
        last chunk - and stored; later calls return the stored choice, whatever q they pass. On the GPU, or with
        host=True in host memory (offload.py reads it there to know which pages to fetch)."""
        stored = self.selections.setdefault(layer, {})
        if start not in stored:
            sel = self.select(q, table, start).to(torch.int32)
            stored[start] = sel.cpu() if self.host else sel
        if self.log is not None:
            self.log.append((layer, start, stored[start]))
        return stored[start]

    def page_table(self, layer, q, table, start):
        """(4-D int32 page table [B, Hkv, n_blocks, n_selected + own pages], virtual q_start) for the kernels:
        each block's selected history pages, then the chunk's own pages, which therefore start at virtual
        position n_selected * page_size. q [B, C, H, D]: the chunk's queries (post-RoPE); table [B, >= its
        pages] int32: the layer's page table. Built once per (layer, chunk), like the selection."""
        sel = self.selection(layer, q, table, start)
        tables = self.kernel_tables.setdefault(layer, {})
        if start not in tables:
            first, last = start // self.page_size, math.ceil((start + q.shape[1]) / self.page_size)
            rows = table[:, None, None, :].expand(*sel.shape[:3], table.shape[1])
            tables[start] = torch.cat([torch.gather(rows, 3, sel.long()), rows[..., first:last]], dim=3)
        return tables[start], sel.shape[3] * self.page_size

    def select(self, q, table, start):
        """The history pages chunk [start, start + C) attends to, per (batch row, kv head, block of q_block
        queries): [B, Hkv, cdiv(C, q_block), min(n_select, start // page_size)] int64 logical page indices,
        ascending."""
        B, C, H, _ = q.shape
        Hkv = self.summaries.shape[1]
        history, nb = start // self.page_size, math.ceil(C / self.q_block)
        if history <= self.n_select:  # everything fits the budget: dense
            return torch.arange(history, device=q.device).expand(B, Hkv, nb, history)
        pad = nb * self.q_block - C
        rows = torch.nn.functional.pad(q.detach().float(), (0, 0, 0, 0, 0, pad)).view(B, nb, self.q_block, H, -1)
        counts = (C - torch.arange(nb, device=q.device) * self.q_block).clamp(max=self.q_block)
        q_mean = (rows.sum(2) / counts.view(1, nb, 1, 1)).view(B, nb, Hkv, H // Hkv, -1)  # [B, nb, Hkv, G, D]
        summaries = self.summaries[table[:, :history].long()].float()  # [B, P, Hkv, D]
        scores = torch.einsum("bnkgd,bpkd->bkgnp", q_mean, summaries).amax(2)  # [B, Hkv, nb, P]
        scores[..., :self.sink] = float("inf")  # always kept
        scores[..., history - self.recent:] = float("inf")
        return scores.topk(self.n_select, dim=-1, sorted=False).indices.sort(-1).values

    def truncate(self, layer, length):
        """Forget the selections of chunks starting at or after `length` (they were retired)."""
        for stored in (self.selections.get(layer, {}), self.kernel_tables.get(layer, {})):
            for start in [start for start in stored if start >= length]:
                del stored[start]


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
