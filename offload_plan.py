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
           column j of every block is its j-th page): a part holds the union of the pages its columns name, all
           columns in one part when the union fits beside the own pages, else as many per part as fit. `slots`
           maps every block's selected pages of those columns (then the own pages) to the buffer's slots: the
           kernels' 4-D page table. Parts may share pages (`shares_next`): a backward then loads the next part's
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
    """One part of a sparse call: selection columns [c0, c1), each batch row's pages (sorted union, then the own
    ones in the last part), the own page count, slots [B, Hkv, n_blocks, n_cols (+ own)] and whether a page of it
    is also in the next part."""
    columns: tuple
    rows: list
    own: int
    slots: np.ndarray
    shares_next: bool


def sparse_split(selection, first_own, own, cap) -> list[SparsePart]:
    """The column split of a selection [B, Hkv, n_blocks, n] (logical history pages, each block's sorted) of a
    chunk whose own pages are first_own..first_own + own - 1, into buffers of `cap` pages per batch row (slot
    b * cap + i: row b's i-th page). Raises ValueError if one column of every (kv head, block) and the own pages
    cannot share a buffer."""
    B, Hkv, nb, n = selection.shape
    room = cap - own  # history pages per part, so that the last part has room for the own pages
    if Hkv * nb > room:
        raise ValueError(f"sparse attention needs one page per kv head and query block in a cache buffer beside the "
                         f"chunk's {own} pages ({Hkv} x {nb} = {Hkv * nb} pages) but a buffer holds {cap}: raise "
                         f"cache_tokens")
    sel = np.asarray(selection).reshape(B, Hkv * nb, n)

    def union(c0, c1):  # per batch row, the sorted pages that columns [c0, c1) name
        return [np.unique(sel[b, :, c0:c1]) for b in range(B)]

    parts, c0 = [], 0
    while c0 < n:
        c1, rows = n, union(c0, n)  # usually all the remaining columns fit
        if max(map(len, rows)) > room:  # else the most that do (one always does, checked above)
            lo, hi = c0 + 1, n - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if max(map(len, union(c0, mid))) <= room else (lo, mid - 1)
            c1, rows = lo, union(c0, lo)
        slots = np.stack([np.searchsorted(rows[b], sel[b, :, c0:c1]) + b * cap
                          for b in range(B)]).reshape(B, Hkv, nb, c1 - c0)
        n_own = own if c1 == n else 0
        if n_own:  # the chunk's pages follow the union in each row's slots, and every block's table
            own_slots = np.stack([b * cap + len(rows[b]) + np.arange(own) for b in range(B)])
            slots = np.concatenate([slots, np.broadcast_to(own_slots[:, None, None], (B, Hkv, nb, own))], 3)
            rows = [np.concatenate([r, np.arange(first_own, first_own + own)]) for r in rows]
        parts.append(SparsePart((c0, c1), rows, n_own, slots.astype(np.int32), False))
        c0 = c1
    return [p._replace(shares_next=j + 1 < len(parts) and any(
        np.intersect1d(a, b).size for a, b in zip(p.rows, parts[j + 1].rows))) for j, p in enumerate(parts)]
