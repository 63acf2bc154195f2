"""
Which pages of an offloaded chunk's history go through a GPU buffer together: pure functions, numpy in, typed
records out, no tensors and no streams (offload.py streams what they plan).

A call of attention (one layer, one chunk at [start, start + C)) reads the history's pages and the chunk's own `own`
pages; a GPU buffer holds `cap` pages of each batch row. The plan is a list of parts, the last one ending with the
chunk's own pages, so the chunk's causal attention to itself runs in the same kernel launch as the last
history part (as a launch of its own it is short of parallelism: its query tiles see 1..C/BLOCK_N kv tiles;
joining it cut an offloaded 0.5B step at 32K by 16%, bench/RESULTS.md).

  dense    consecutive ranges of logical pages, the last holding the last cap - own history pages and the own pages
  sparse   column ranges of the chunk's selection [B, Hkv, n_blocks, n] (each block's selected pages sorted, so
           column j of every block is its j-th page): a part holds, per kv head, the union of the pages its
           columns name for that head, all columns in one part when the largest union fits beside the own pages,
           else as many per part as fit. Slot i of a buffer holds in kv head h's rows head h's i-th page: each kv
           head selects its own pages, and moving only the rows it reads moves up to Hkv x fewer bytes than whole
           pages (the 7B at 1M: 4 kv heads, nearly disjoint choices). `slots` maps every block's selected pages of
           those columns (then the own pages, whole in every head) to the buffer's slots: the kernels' 4-D page
           table. Parts may share pages (`shares_next`, per kv head): a backward then loads the next part's
           gradient pages only after this one's write-back, so a page's gradient adds up across parts.
"""
from typing import NamedTuple

import numpy as np


class Run(NamedTuple):
    """count consecutive pages first_page.. at index `index` of a page list, all with the same flag."""
    index: int
    first_page: int
    count: int
    flag: bool


def runs(pages, flags=None) -> list[Run]:
    """Maximal runs of consecutive page ids (and equal flags, a bool array like pages)."""
    p = np.asarray(pages, dtype=np.int64)
    if len(p) == 0:
        return []
    brk = np.diff(p) != 1
    if flags is not None:
        brk |= flags[1:] != flags[:-1]
    starts = np.concatenate([[0], np.flatnonzero(brk) + 1])
    counts = np.diff(np.append(starts, len(p)))
    f = flags[starts] if flags is not None else np.zeros(len(starts), bool)
    return [Run(*r) for r in zip(starts.tolist(), p[starts].tolist(), counts.tolist(), f.tolist())]


def dense_ranges(history, own, cap, first=0) -> list[tuple[int, int]]:
    """Logical page ranges [a, b) of a dense call over history pages first..history-1 (pages before `first` are
    not read: packed documents that start later) then `own` pages, in buffers of `cap` pages: buffer-sized
    ranges, the last one the last cap - own history pages and the own pages."""
    first = min(first, history)
    last = max(first, history - (cap - own))
    return [(a, min(a + cap, last)) for a in range(first, last, cap)] + [(last, history + own)]


class SparsePart(NamedTuple):
    """One part of a sparse call: selection columns [c0, c1); per batch row an int64 [Hkv, n_slots] array, each kv
    head's pages in slot order (its sorted union, -1 in the slots it leaves empty, then the own pages in the last
    part); the own page count; slots [B, Hkv, n_blocks, n_cols (+ own)]; and whether a (kv head, page) of it is
    also in the next part."""
    columns: tuple
    rows: list
    own: int
    slots: np.ndarray
    shares_next: bool


def sparse_split(selection, first_own, own, cap) -> list[SparsePart]:
    """The column split of a selection [B, Hkv, n_blocks, n] (logical history pages, each block's sorted) of a
    chunk whose own pages are first_own..first_own + own - 1, into buffers of `cap` pages per batch row (slot
    b * cap + i: row b's i-th slot, holding in kv head h's rows head h's i-th page). Raises ValueError if one
    column of every block and the own pages cannot share a buffer."""
    B, Hkv, nb, n = selection.shape
    room = cap - own  # history slots per part, so that the last part has room for the own pages
    if nb > room:
        raise ValueError(f"sparse attention needs one page per query block in a cache buffer beside the chunk's "
                         f"{own} pages ({nb} blocks) but a buffer holds {cap}: raise cache_tokens")
    sel = np.asarray(selection)

    def union(c0, c1):  # per (batch row, kv head), the sorted pages that columns [c0, c1) name
        return [[np.unique(sel[b, h, :, c0:c1]) for h in range(Hkv)] for b in range(B)]

    def widest(rows):
        return max(len(pages) for row in rows for pages in row)

    parts, c0 = [], 0
    while c0 < n:
        c1, heads = n, union(c0, n)  # usually all the remaining columns fit
        if widest(heads) > room:  # else the most that do (one always does, checked above)
            lo, hi = c0 + 1, n - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if widest(union(c0, mid)) <= room else (lo, mid - 1)
            c1, heads = lo, union(c0, lo)
        slots = np.stack([np.stack([np.searchsorted(heads[b][h], sel[b, h, :, c0:c1]) for h in range(Hkv)])
                          + b * cap for b in range(B)])  # [B, Hkv, nb, c1 - c0]
        rows = []
        for b in range(B):
            row = np.full((Hkv, max(map(len, heads[b]))), -1, dtype=np.int64)
            for h, pages in enumerate(heads[b]):
                row[h, :len(pages)] = pages
            rows.append(row)
        n_own = own if c1 == n else 0
        if n_own:  # the chunk's pages follow the history slots in each row, and every block's table
            own_slots = np.stack([b * cap + rows[b].shape[1] + np.arange(own) for b in range(B)])
            slots = np.concatenate([slots, np.broadcast_to(own_slots[:, None, None], (B, Hkv, nb, own))], 3)
            rows = [np.concatenate([r, np.broadcast_to(np.arange(first_own, first_own + own), (Hkv, own))], 1)
                    for r in rows]
        parts.append(SparsePart((c0, c1), rows, n_own, slots.astype(np.int32), False))
        c0 = c1

    def shared(a, b):  # a (batch row, kv head) page in both parts
        return any(np.intersect1d(x[x >= 0], y[y >= 0]).size for ra, rb in zip(a.rows, b.rows)
                   for x, y in zip(ra, rb))
    return [p._replace(shares_next=j + 1 < len(parts) and shared(p, parts[j + 1])) for j, p in enumerate(parts)]
