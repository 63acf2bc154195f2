"""
Sweep the paged attention kernels' tile configurations on attention shapes (GPU only).

    H=28 HKV=4 D=128 python bench/sweep_tiles.py                      # Qwen2.5-7B heads
    H=8 HKV=2 D=64 CASES='[[65536,4096,64],[262144,4096,64]]' python bench/sweep_tiles.py [BUDGET_S]
    GRID='{"fwd": [[128,128,8,3]]}' KINDS=fwd python bench/sweep_tiles.py    # chosen configurations only

Each case is [history + chunk length T, chunk C, page size]. For each kernel (fwd, dq, dkdv), every (BLOCK_M,
BLOCK_N, warps, stages) of a small grid is timed on every case (CUDA events, median of 7) with the other kernels
at their defaults: the forward alone for fwd, the whole backward for dq and dkdv. BLOCK_N may exceed the page
size (a tile then spans several pages). Prints, per kernel, the default's summed time over the cases and the best
configurations, each with the compiled kernel's registers, spills, shared memory and matrix instructions (wgmma
= Hopper's warpgroup MMA, mma = the older per-warp one). A measuring tool: for the duration of this process it
replaces the kernel module's tile choice function; winners go into kernels/paged_attention.py:_launch_config by
hand, with the numbers in bench/RESULTS.md.
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
KINDS = os.environ.get("KINDS", "fwd,dq,dkdv").split(",")
GRIDS = {
    "fwd": list(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])),
    "dq": list(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3])),
    "dkdv": list(itertools.product([32, 64, 128], [32, 64, 128], [4, 8], [2, 3])),
}
GRIDS.update({kind: [tuple(c) for c in configs] for kind, configs in json.loads(os.environ.get("GRID", "{}")).items()})
KERNELS = {"fwd": "_fwd_kernel", "dq": "_dq_kernel", "dkdv": "_dkdv_kernel"}
default_config = pa._launch_config
override = {}  # kind -> (BLOCK_M, BLOCK_N, warps, stages) being measured


def swept_config(kind, head_dim, page_size, dtype, device):
    if kind in override:
        return override[kind]
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


class Captured:
    """Stands in for a Triton kernel in the kernel module and keeps the compiled kernel of its last launch."""

    def __init__(self, fn):
        self.fn, self.last = fn, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.last = self.fn[grid](*args, **kwargs)
            return self.last
        return launch


def compiled_facts(kernel):
    """Registers, spills, shared memory and matrix instruction counts of a compiled Triton kernel."""
    try:
        ptx = kernel.asm.get("ptx", "")
        return dict(regs=kernel.n_regs, spills=kernel.n_spills, smem=kernel.metadata.shared,
                    wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync"))
    except Exception as e:  # attribute names differ between Triton versions
        return dict(error=repr(e))


def main():
    budget_s = float(sys.argv[1]) if len(sys.argv) > 1 else 400
    device = torch.device("cuda")
    pa._launch_config = swept_config
    captured = {kind: Captured(getattr(pa, name)) for kind, name in KERNELS.items()}
    for kind, name in KERNELS.items():
        setattr(pa, name, captured[kind])
    cases = []
    for T, C, page_size in CASES:
        q, do, k_pages, v_pages, dk_pages, dv_pages, table, q_start = inputs(T, C, page_size, device)
        o, lse = pa.paged_attention_forward(q, k_pages, v_pages, table, q_start)
        cases.append((
            lambda q=q, k=k_pages, v=v_pages, t=table, s=q_start: pa.paged_attention_forward(q, k, v, t, s),
            lambda q=q, do=do, o=o, lse=lse, k=k_pages, v=v_pages, t=table, s=q_start, dk=dk_pages, dv=dv_pages:
                pa.paged_attention_backward(do, q, o, lse, k, v, t, s, dk, dv)))
    page_size = CASES[0][2]
    t0 = time.time()
    for kind in KINDS:
        default = default_config(kind, D, page_size, torch.bfloat16, device)
        rows = []
        for config in GRIDS[kind]:
            if time.time() - t0 > budget_s:
                print("time budget reached", flush=True)
                break
            override[kind] = config
            try:
                ms = [median_ms(fwd if kind == "fwd" else bwd) for fwd, bwd in cases]
                rows.append((sum(ms), config, [round(x, 3) for x in ms], compiled_facts(captured[kind].last)))
            except Exception as e:  # e.g. out of shared memory for this tile size
                print(json.dumps(dict(kind=kind, config=config, error=repr(e)[:200])), flush=True)
            del override[kind]
        rows.sort(key=lambda r: r[0])
        default_ms = next((r[0] for r in rows if r[1] == default), None)
        print(json.dumps(dict(cases=CASES, heads=[H, HKV, D], kind=kind, default=default,
                              default_ms=default_ms and round(default_ms, 3),
                              best=[(round(t, 3), c, ms, facts) for t, c, ms, facts in rows[:6]])), flush=True)
        for t, c, ms, facts in rows:
            print(json.dumps(dict(kind=kind, config=c, total_ms=round(t, 3), ms=ms, **facts)), flush=True)


if __name__ == "__main__":
    main()
