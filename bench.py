"""
Benchmarks of nano-oomb: chunk-recurrent training steps, the paged attention kernel, and gradient exactness.

    # 1. step: one chunked training step (batch 1, bf16 autocast, fp32 params) at growing lengths, and the
    #    full-sequence baseline (activation checkpointing, same model) until it runs out of memory
    python bench.py step --model qwen2.5-0.5b --lengths 16384,32768,65536,131072 --chunk 4096
    python bench.py step --model qwen2.5-7b --lengths 16384,32768 --chunk 2048 --checkpoint

    # 2. kernel: paged attention (Triton) vs torch SDPA, causal, Qwen2.5-7B heads, one chunk = the whole sequence,
    #    and one --chunk of queries at the end of the sequence (what training runs); plus a correctness check
    python bench.py kernel --lengths 16384,32768,65536 --page-size 64,128
    #    issue #18: the Triton paged kernels vs the gather + cuDNN / FlashAttention candidate (kernels/gather_sdpa.py),
    #    each against SDPA, at training's call (a chunk of 4096 queries over its history)
    python bench.py kernel --lengths 16384,65536 --page-size 64 --chunk 4096 --heads 28 --kv-heads 4 --head-dim 128 \
        --kernels triton,sdpa,sdpa-flash

    # 3. exact: gradients of chunked bf16 / fp32 and full-sequence bf16 vs a full-sequence fp32 reference
    python bench.py exact --model small,small-d128 --seq 4096 --chunk 1024 --page-size 64

    # print the tables of everything in OUT/bench.jsonl
    python bench.py summary

Every mode appends one JSON object per measured point to OUT/bench.jsonl (OUT: --out, default $OUT if set, else
bench_out) and prints a row as soon as the point is done. A point that fails (out of memory, a kernel error) is
recorded with its status and the others go on. --time-budget SECONDS makes a mode skip the points it predicts would
end after the budget, so an outer `timeout` rarely has to kill it.

CPU smoke tests (Triton's interpreter is used automatically without a GPU; it is slow, keep sizes tiny):

    python bench.py step --device cpu --model tiny --lengths 128,256 --chunk 64 --page-size 16 --repeats 1
    python bench.py kernel --device cpu --heads 4 --kv-heads 2 --head-dim 16 --lengths 64 --chunk 32 --page-size 16
    python bench.py kernel --device cpu --heads 4 --kv-heads 2 --head-dim 16 --lengths 64 --chunk 32 --page-size 16 \
        --kernels triton,sdpa
    python bench.py exact --device cpu --model tiny --seq 256 --chunk 64 --page-size 16
"""
import argparse
import os
import sys
import time

import json

# bench_lib first: it sets TRITON_INTERPRET on a CPU before triton is imported
from bench_lib import BENCH_PRESETS, T0, Recorder, env_info, format_row, model_config
import torch

from attention import ATTN_KERNELS
from bench_attention import KERNEL_IMPL, bench_kernel, check_exact, sparse_fidelity
from bench_step import bench_step
from sparse_attn import RULES

# ------------------------------------------------------------------------------------------------ output


def summary(path):
    """Print every record of a bench.jsonl, grouped by mode."""
    if not os.path.isfile(path):
        print(f"summary: no {path}")
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for mode in ("kernel", "exact", "step"):
        mine = [d for d in rows if d.get("mode") == mode]
        if mine:
            print(f"== {mode} ({mine[0].get('device')}, torch {mine[0].get('torch')}, triton {mine[0].get('triton')})")
            for d in mine:
                try:
                    print(format_row(d))
                except Exception:  # a record from another version of this script: print it raw
                    print(json.dumps(d))


# ------------------------------------------------------------------------------------------------ main


def int_list(text):
    """'16384,32k' -> [16384, 32768]"""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        out.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
    return out


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=os.environ.get("OUT") or "bench_out",
                        help="directory for bench.jsonl (default: $OUT if set, else bench_out)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--time-budget", type=float, default=0,
                        help="seconds: skip (and record) points predicted to end later than this (0: no limit)")
    common.add_argument("--warmup", type=int, default=1,
                        help="untimed calls before timing (0 for very long points whose kernels are compiled)")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)

    s = sub.add_parser("step", parents=[common], help="chunked training step vs full-sequence baseline")
    s.add_argument("--model", default="qwen2.5-0.5b")
    s.add_argument("--lengths", type=int_list, default=int_list("16384,32768,65536,131072"))
    s.add_argument("--chunk", type=int, default=4096)
    s.add_argument("--page-size", type=int_list, default=[64], help="one or more, comma-separated")
    s.add_argument("--checkpoint", action="store_true", help="recompute layers inside a chunk (chunked_step)")
    s.add_argument("--params-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: bf16 weights, fp32 gradient accumulation in p.main_grad (large models)")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--repeats", type=int, default=3, help="timed steps per point (median reported)")
    s.add_argument("--point-budget", type=float, default=60,
                   help="seconds: stop timing a point's repeats once they add up to this (after at least one)")
    s.add_argument("--no-baseline", action="store_true", help="skip the full-sequence baseline")
    s.add_argument("--output-cache", type=float, default=0.0,
                   help="GiB of stage-1 attention outputs a GPU store keeps for stage 2 (train.py sizes this itself)")
    s.add_argument("--mlp-cache", type=float, default=0.0,
                   help="GiB of stage-1 MLP down-projection outputs kept for stage 2, which then skips those GEMMs "
                        "(chunked_step's mlp_cache_bytes)")
    s.add_argument("--keep-activations", type=int, default=0, metavar="N",
                   help="the N chunks before the last keep their stage-1 forward for stage 2, which then runs only "
                        "their backward (chunked_step; N chunks' activations more memory, N forwards fewer)")
    s.add_argument("--budget", type=int, default=4096, help="sparse store: history tokens per query block")
    s.add_argument("--q-block", type=int, default=128, help="sparse store: queries per selection block")
    s.add_argument("--stores", type=lambda t: t.split(","), default=["paged"],
                   help="chunked-path stores to run, comma-separated: paged (pages on the GPU), offload (host), "
                        "sparse (sparse attention, pages on the GPU), sparse-offload (sparse, pages on the host)")
    s.add_argument("--cache-tokens", type=int, default=65536, help="offload: tokens per GPU cache buffer")
    s.add_argument("--attn-kernel", default="auto", choices=ATTN_KERNELS,
                   help="the chunked path's attention kernel: triton (kernels/paged_attention.py) or sdpa "
                        "(kernels/gather_sdpa.py; Triton for document masks and the history of sparse blocks; issue "
                        "#18); auto: sdpa on CUDA for chunks of batch x tokens x hidden >= 2^22, triton otherwise "
                        "(attention.kernel_name) (default: %(default)s)")
    s.add_argument("--grad-pages", default="float32", choices=["float32", "bfloat16"], help="dK/dV page dtype")
    s.add_argument("--last-chunks", type=int, default=0, metavar="N",
                   help="probe: random history instead of stage 1, then only the last N chunks of stage 2 "
                        "(peak memory of the whole step; for lengths whose whole step takes too long)")
    s.add_argument("--progress", action="store_true",
                   help="progress bars over each step's chunks (long single steps)")
    s.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing each point, profile one more step and print the top ROWS GPU ops")

    k = sub.add_parser("kernel", parents=[common], help="paged attention kernel vs SDPA")
    k.add_argument("--lengths", type=int_list, default=int_list("16384,32768,65536"))
    k.add_argument("--heads", type=int, default=28)
    k.add_argument("--kv-heads", type=int, default=4)
    k.add_argument("--head-dim", type=int, default=128)
    k.add_argument("--page-size", type=int_list, default=[64, 128], help="one or more, comma-separated")
    k.add_argument("--chunk", type=int, default=4096, help="queries of the chunk-at-the-end configuration")
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--repeats", type=int, default=5)
    k.add_argument("--no-sdpa", action="store_true", help="skip SDPA (and the correctness check)")
    k.add_argument("--chunk-only", action="store_true",
                   help="time the kernels on the chunk-at-the-end call only, not also on the whole sequence (SDPA's "
                        "whole-sequence call, the baseline, still runs)")
    k.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing each kernel's point, profile one more forward+backward and print the top ROWS ops")
    k.add_argument("--kernels", type=lambda t: t.split(","), default=["triton"],
                   help="paged kernels to measure, comma-separated: triton (kernels/paged_attention.py), sdpa "
                        "(kernels/gather_sdpa.py: pages gathered, then PyTorch's fused op for the device: cuDNN on "
                        "CUDA), sdpa-cudnn, sdpa-flash (that CUDA op; issue #18)")

    e = sub.add_parser("exact", parents=[common], help="gradient exactness vs an fp32 full-sequence reference")
    e.add_argument("--model", type=lambda t: t.split(","), default=["small", "small-d128"],
                   help="comma-separated presets (also: " + ", ".join(BENCH_PRESETS) + ")")
    e.add_argument("--seq", type=int, default=4096)
    e.add_argument("--chunk", type=int, default=1024)
    e.add_argument("--page-size", type=int_list, default=[64])
    e.add_argument("--batch", type=int, default=2)

    f = sub.add_parser("fidelity", parents=[common],
                       help="sparse vs dense chunked gradients of a model trained by train.py (cosine, rel. error)")
    f.add_argument("--ckpt", required=True, help="a train.py checkpoint (OUT/ckpt.pt)")
    f.add_argument("--data", default=None, help="as train.py --data (default: the embedded corpus)")
    f.add_argument("--seq", type=int, default=16384)
    f.add_argument("--chunk", type=int, default=1024)
    f.add_argument("--page-size", type=int, default=64)
    f.add_argument("--budgets", type=int_list, default=int_list("256,512,1024,2048,4096"))
    f.add_argument("--q-blocks", type=int_list, default=[128], help="queries per selection block, each tried")
    f.add_argument("--rule", type=lambda t: t.split(","), default=["meankey"],
                   help=f"selection rules, comma-separated, each tried: {', '.join(RULES)} (sparse_attn.py)")
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--batches", type=int, default=2, help="validation batches averaged over")

    sub.add_parser("summary", parents=[common], help="print the tables of OUT/bench.jsonl")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.what == "summary":
        summary(os.path.join(args.out, "bench.jsonl"))
        return 0
    if args.what == "fidelity" and not set(args.rule) <= set(RULES):
        print(f"error: --rule must name rules among {', '.join(RULES)}, got {','.join(args.rule)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but CUDA is not available")
    if args.what == "kernel":
        bad = [name for name in args.kernels if name not in KERNEL_IMPL]
        if bad:
            raise SystemExit(f"error: --kernels must name kernels among {', '.join(KERNEL_IMPL)}, got {bad}")
    if args.what == "step":
        model_config(args.model)  # fail fast on a bad name
        bad = [ps for ps in args.page_size if args.chunk % ps]
        if bad:
            raise SystemExit(f"error: --chunk {args.chunk} must be a multiple of every --page-size ({bad})")
    rec = Recorder(args.out, env_info(device))
    print(f"bench {args.what}: {rec.env['device']}, torch {rec.env['torch']}, triton {rec.env['triton']} "
          f"-> {rec.path}", flush=True)
    {"step": bench_step, "kernel": bench_kernel, "exact": check_exact, "fidelity": sparse_fidelity}[args.what](
        args, device, rec)
    print(f"\n== {args.what}: {len(rec.rows)} points ({time.perf_counter() - T0:.0f} s)")
    for d in rec.rows:
        print(format_row(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())

