"""
The Triton kernels on a sparse part's history alone, as the 7B's sparse 128K step calls them (CUDA only): 8192
queries in 128-query blocks (28 / 4 heads, head_dim 128), each block and kv head reading 64 of 1920 history pages
of 64 tokens (4096 of 122880 tokens). The selections range from independent per block (shared 0) to all alike
(shared 64): the dK/dV kernel gives each selected page to one program, which loops over the blocks that chose it,
so the spread of those loops is what varies. With --configs, the dK/dV launch configs (BLOCK_M, BLOCK_N, warps,
stages) of the sweep in bench/RESULTS.md (sixteenth session) as well, set through the launcher's tile table. With
--order, the dK/dV programs also take their entries in key order (as before the seventeenth session) beside the
default, the owners of the longest runs first. With --sweep, the forward's and dQ's launch configs on independent
selections (SWEEP). Last, each compiled kernel's registers per thread and spills.

    PYTHONPATH=. python bench/sparse_dkdv.py [--configs] [--order] [--sweep]

Median of 5 after a warm-up; TF/s count two matmuls in the forward and 2.5x that in the backward.
"""
import sys

import torch

import kernels.paged_attention as pa
import kernels.paged_attention_backward as bw
from kernels.paged_attention import _fwd_kernel as fwd_kernel, paged_attention_forward
from kernels.paged_attention_backward import paged_attention_backward

B, C, H, HKV, D, PAGE, Q_BLOCK, N_HIST, N_SEL = 1, 8192, 28, 4, 128, 64, 128, 1920, 64
CONFIGS = [(64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)]  # beside the default
SWEEP = {"fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
         "dq": [(128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 2), (64, 128, 4, 2), (64, 64, 4, 3)]}


def selection_table(shared):
    """[B, HKV, blocks, N_SEL] int32 history pages, ascending: `shared` pages common to every block, the rest
    each block's own random choice."""
    g = torch.Generator().manual_seed(0)
    common = torch.randperm(N_HIST, generator=g)[:shared]
    rows = []
    for _ in range(HKV * (C // Q_BLOCK)):
        own = torch.randperm(N_HIST, generator=g)
        own = own[~torch.isin(own, common)][:N_SEL - shared]
        rows.append(torch.cat([common, own]).sort().values)
    return torch.stack(rows).view(B, HKV, C // Q_BLOCK, N_SEL).int().cuda()


def key_order(history_table, n_pool):
    """selection_index with the programs taking the entries in key order (each run's owner where it sorts)."""
    keys, blocks, run_end, cols, _ = default_index(history_table, n_pool)
    return keys, blocks, run_end, cols, torch.arange(keys.numel(), device=keys.device, dtype=torch.int32)


default_index = bw.selection_index


def compiled_kernels(fn):
    """(name, registers, spills, shared bytes) of each compiled variant of a Triton kernel, where this Triton's
    cache shows them (the attribute names differ between versions: missing ones are skipped)."""
    for cache in getattr(fn, "device_caches", {}).values():
        for kernel in (cache[0] if isinstance(cache, tuple) else cache).values():
            yield (fn.__name__, getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None),
                   getattr(getattr(kernel, "metadata", None), "shared", None))


def median_ms(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[repeats // 2]


def sweep(q, do, o, lse, k_pages, v_pages, dk_pages, dv_pages, table, history, flops):
    """The forward's and dQ's launch configs (SWEEP), each through its launcher's tile table: the forward timed
    alone, dQ inside the backward (dK/dV's config unchanged)."""
    for kind, module in (("fwd", pa), ("dq", bw)):
        default_tiles = module._tiles
        for config in SWEEP[kind]:
            module._tiles = lambda k, *args, config=config: config if k == kind else default_tiles(k, *args)
            if kind == "fwd":
                ms = median_ms(lambda: paged_attention_forward(q, k_pages, v_pages, table, history, kv_len=history,
                                                               q_block=Q_BLOCK))
                tf = flops / ms / 1e9
            else:
                ms = median_ms(lambda: paged_attention_backward(do, q, o, lse, k_pages, v_pages, table, history,
                                                                dk_pages, dv_pages, kv_len=history, q_block=Q_BLOCK))
                tf = 2.5 * flops / ms / 1e9
            print(f"shared  0 {kind} config {config}: {'fwd' if kind == 'fwd' else 'bwd (dq + dK/dV)'} "
                  f"{ms:.2f} ms {tf:.0f} TF/s", flush=True)
        module._tiles = default_tiles


def main():
    k_pages, v_pages = (torch.randn(N_HIST, PAGE, HKV, D, device="cuda").bfloat16() for _ in range(2))
    dk_pages, dv_pages = (torch.zeros(N_HIST, PAGE, HKV, D, device="cuda").bfloat16() for _ in range(2))
    q, do = (torch.randn(B, C, H, D, device="cuda").bfloat16() for _ in range(2))
    history = N_SEL * PAGE  # the queries sit after it; the part holds the history alone (kv_len = q_start)
    flops = 4 * B * C * H * history * D  # forward: two matmuls
    default_tiles = bw._tiles
    for shared in (0, 32, 62, 64):
        table = selection_table(shared)
        o, lse = paged_attention_forward(q, k_pages, v_pages, table, history, kv_len=history, q_block=Q_BLOCK)
        fwd = median_ms(lambda: paged_attention_forward(q, k_pages, v_pages, table, history, kv_len=history,
                                                        q_block=Q_BLOCK))
        orders = [("longest first", default_index)] + ([("key order", key_order)] if "--order" in sys.argv else [])
        for config in [None] + (CONFIGS if "--configs" in sys.argv else []):
            bw._tiles = default_tiles if config is None else (
                lambda kind, *args, config=config: config if kind == "dkdv" else default_tiles(kind, *args))
            for order, index in orders if config is None else orders[:1]:
                bw.selection_index = index
                bwd = median_ms(lambda: paged_attention_backward(do, q, o, lse, k_pages, v_pages, table, history,
                                                                 dk_pages, dv_pages, kv_len=history, q_block=Q_BLOCK))
                print(f"shared {shared:2d} dkdv config {config or 'default'}, {order}: fwd {fwd:.2f} ms "
                      f"{flops / fwd / 1e9:.0f} TF/s, bwd (dq + dK/dV) {bwd:.2f} ms "
                      f"{2.5 * flops / bwd / 1e9:.0f} TF/s", flush=True)
        bw._tiles, bw.selection_index = default_tiles, default_index
        if shared == 0 and "--sweep" in sys.argv:
            sweep(q, do, o, lse, k_pages, v_pages, dk_pages, dv_pages, table, history, flops)
    for fn in (fwd_kernel, bw._dq_kernel, bw._dkdv_kernel):
        for name, regs, spills, shared_bytes in compiled_kernels(fn):
            print(f"{name}: {regs} registers per thread, {spills} spilled, {shared_bytes} bytes of shared memory")


if __name__ == "__main__":
    main()
