"""How scattered KV pages can move between pinned host memory and the GPU (bench/RESULTS.md, "Sparse attention over
offloaded pages"): 1000 random pages of a 16K-page pool, (a) one cudaMemcpyAsync per page on a copy stream, (b) one
gather (scatter) kernel reading (writing) the pool in place through its device view, (c) for scale, one contiguous
copy of as many bytes. Page shapes of Qwen2.5-0.5B and 7B at 64 tokens, bf16. Prints host and wall time per move.

    python3 bench/copy_probe.py      (on a GPU, from the repo root)
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from pinned_pool import device_view, pinned_empty  # noqa: E402


def timeit(fn, repeats=5):
    """(host ms, wall ms) of fn, medians after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(host) * 1e3, statistics.median(wall) * 1e3


def main():
    n_pool, n_pages = 16384, 1000
    stream = torch.cuda.Stream()
    for page_shape in ((64, 2, 64), (64, 4, 128)):  # [page_size, n_kv_heads, head_dim]
        pool = pinned_empty((n_pool, *page_shape), torch.bfloat16)
        pool.normal_()
        view = device_view(pool, torch.device("cuda"))
        buf = torch.empty((n_pages, *page_shape), dtype=torch.bfloat16, device="cuda")
        pages = torch.randperm(n_pool)[:n_pages].sort().values
        ids, idx = pages.tolist(), pages.cuda()

        def on_stream(fn):
            def run():
                with torch.cuda.stream(stream):
                    fn()
            return run
        moves = {
            "in: a copy per page": lambda: [buf[i].copy_(pool[p], non_blocking=True) for i, p in enumerate(ids)],
            "in: gather kernel": lambda: torch.index_select(view, 0, idx, out=buf),
            "out: a copy per page": lambda: [pool[p].copy_(buf[i], non_blocking=True) for i, p in enumerate(ids)],
            "out: scatter kernel": lambda: view.index_copy_(0, idx, buf),
            "in: one contiguous copy": lambda: buf.copy_(pool[:n_pages], non_blocking=True),
        }
        megabytes = n_pages * pool[0].nbytes / 1e6
        for name, fn in moves.items():
            host_ms, wall_ms = timeit(on_stream(fn))
            print(f"page {pool[0].nbytes // 1024} KB x {n_pages}: {name:24s} host {host_ms:7.2f} ms  wall "
                  f"{wall_ms:7.2f} ms  {megabytes / wall_ms:5.1f} GB/s", flush=True)
            if name.startswith("in: gather"):
                torch.testing.assert_close(buf.cpu(), pool[pages])


if __name__ == "__main__":
    main()
