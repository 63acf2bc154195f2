"""
Sweep the paged attention kernels' tile configurations on one attention shape (GPU only).

    H=28 HKV=4 D=128 python bench/sweep_tiles.py                      # Qwen2.5-7B heads
    H=8 HKV=2 D=64 CASES='[[65536,4096,64],[262144,4096,64]]' python bench/sweep_tiles.py [BUDGET_S]

For each case [history + chunk length T, chunk C, page size] and each kernel (fwd, dq, dkdv), every (BLOCK_M,
BLOCK_N, warps, stages) of a small grid is timed (CUDA events, median of 7) with the others at their defaults: the
forward alone for fwd, the whole backward for dq and dkdv. Prints, per case and kernel, the default's time and the
four best. A measuring tool: for the duration of this process it replaces the kernel module's tile choice function;
winners go into kernels/paged_attention.py:_launch_config by hand, with the numbers in bench/RESULTS.md.
"""

import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels.paged_attention as pa  # noqa: E402
from bench import timed  # noqa: E402

B = 1
H, HKV, D = (int(os.environ.get(k, v)) for k, v in (("H", 28), ("HKV", 4), ("D", 128)))
CASES = json.loads(os.environ.get("CASES", "[[16384, 2048, 64], [32768, 4096, 64], [16384, 16384, 64]]"))
GRIDS = {
    "fwd": list(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])),
    "dq": list(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3])),
    "dkdv": list(itertools.product([32, 64, 128], [32, 64, 128], [4, 8], [2, 3])),
}
default_config = pa._launch_config
override = {}  # kind -> (BLOCK_M, BLOCK_N, warps, stages) being measured


def swept_config(kind, head_dim, page_size, dtype, device):
    if kind in override:
        bm, bn, warps, stages = override[kind]
        return bm, min(bn, page_size), warps, stages
    return default_config(kind, head_dim, page_size, dtype, device)


def median_ms(fn, reps=7):
    """Median GPU time of fn in ms (CUDA events, after one warm-up call)."""
    return statistics.median(timed(fn, torch.device("cuda"), 1, reps, events=True)[0]) * 1e3


def inputs(T, C, page_size, device):
    """A shuffled page table over T positions; q/do for the last C of them."""
    n = T // page_size
    table = torch.randperm(n + 1)[:n].view(1, n).to(device, torch.int32)
    k_pages = torch.randn(n + 1, page_size, HKV, D, device=device, dtype=torch.bfloat16)
    v_pages = torch.randn_like(k_pages)
    dk_pages = torch.zeros(k_pages.shape, device=device)
    dv_pages = torch.zeros_like(dk_pages)
    q = torch.randn(B, C, H, D, device=device, dtype=torch.bfloat16)
    return q, torch.randn_like(q), k_pages, v_pages, dk_pages, dv_pages, table, T - C


def main():
    budget_s = float(sys.argv[1]) if len(sys.argv) > 1 else 400
    device = torch.device("cuda")
    pa._launch_config = swept_config
    t0 = time.time()
    for T, C, page_size in CASES:
        q, do, k_pages, v_pages, dk_pages, dv_pages, table, q_start = inputs(T, C, page_size, device)
        o, lse = pa.paged_attention_forward(q, k_pages, v_pages, table, q_start)
        forward = lambda: pa.paged_attention_forward(q, k_pages, v_pages, table, q_start)  # noqa: E731
        backward = lambda: pa.paged_attention_backward(do, q, o, lse, k_pages, v_pages, table, q_start,  # noqa: E731
                                                       dk_pages, dv_pages)
        for kind, grid in GRIDS.items():
            if time.time() - t0 > budget_s:
                print("time budget reached", flush=True)
                return
            default = default_config(kind, D, page_size, torch.bfloat16, device)
            rows = []
            for config in grid:
                if config[1] > page_size:
                    continue
                override[kind] = config
                try:
                    rows.append((median_ms(forward if kind == "fwd" else backward), config))
                except Exception:  # e.g. out of shared memory for this tile size
                    pass
                del override[kind]
            rows.sort()
            default_ms = next((ms for ms, config in rows if config == default), None)
            print(json.dumps(dict(T=T, C=C, page=page_size, heads=[H, HKV, D], kind=kind, default=default,
                                  default_ms=default_ms, best=[(round(ms, 3), c) for ms, c in rows[:4]])), flush=True)


if __name__ == "__main__":
    main()
