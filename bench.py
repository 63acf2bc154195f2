"""
Benchmarks of nano-oomb: chunk-recurrent training steps, the paged attention kernel, and gradient exactness.

    # 1. step: one chunked training step (batch 1, bf16 autocast, fp32 params) at growing lengths, and the
    #    full-sequence baseline (activation checkpointing, same model) until it runs out of memory
    python bench.py step --model qwen2.5-0.5b --lengths 16384,32768,65536,131072 --chunk 4096
    python bench.py step --model qwen2.5-7b --lengths 16384,32768 --chunk 2048 --checkpoint

    # 2. kernel: paged attention (Triton) vs torch SDPA, causal, Qwen2.5-7B heads, one chunk = the whole sequence,
    #    and one --chunk of queries at the end of the sequence (what training runs); plus a correctness check
    python bench.py kernel --lengths 16384,32768,65536 --page-size 64,128

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
    python bench.py exact --device cpu --model tiny --seq 256 --chunk 64 --page-size 16
"""

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

# Without a GPU (or with --device cpu) the Triton kernels run in Triton's interpreter, which must be switched on
# before triton is first imported (by chunk_train -> paged_kv -> kernels below).
if not torch.cuda.is_available() or any(a in ("--device=cpu", "cpu") for a in sys.argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from chunk_train import backward_chunk, chunked_step, fp32_gradients  # noqa: E402
from data import TokenData  # noqa: E402
from kernels.paged_attention import paged_attention_backward, paged_attention_forward  # noqa: E402
from kernels.paged_reference import gather_pages  # noqa: E402
from model import PRESETS, Model, ModelConfig, preset  # noqa: E402
from offload import OffloadedKVStore  # noqa: E402
from paged_kv import PagedKVStore  # noqa: E402

GiB = 2**30
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError since torch 2.5

# Extra model shapes for the exactness check: like 'small' but with head_dim 128 (the Qwen2.5 head size).
BENCH_PRESETS = {
    "small-d128": dict(PRESETS["small"], num_attention_heads=4, num_key_value_heads=1),
}
T0 = time.perf_counter()  # for --time-budget


# ------------------------------------------------------------------------------------------------ helpers


def model_config(name) -> ModelConfig:
    if name in BENCH_PRESETS:
        return ModelConfig(**BENCH_PRESETS[name])
    try:
        return preset(name)
    except ValueError:
        raise SystemExit(f"error: unknown model {name!r}; choose one of: {', '.join([*PRESETS, *BENCH_PRESETS])}")


def full_sequence_step(model, idx, tgt, compute_dtype, checkpoint=False) -> float:
    """The baseline: model.py's full-sequence path, forward + backward of the mean token loss (autocast unless
    compute_dtype is fp32; `checkpoint` recomputes each block in backward)."""
    with torch.autocast(idx.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        logits = model(idx, checkpoint=checkpoint)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
    del logits
    loss.backward()
    return loss.item()


def build_model(name, device, seed) -> Model:
    """Random init, fp32, built directly on the device (a 7B model initialised on the CPU takes minutes)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return Model(model_config(name))


def random_tokens(vocab, batch, length, device, seed):
    """idx, targets [batch, length]: random token ids, targets shifted by one."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def timed(fn, device, warmup, repeats, setup=None, budget_s=None, events=False):
    """Call fn `warmup` times untimed, then time up to `repeats` calls (stopping early, after at least one, once the
    timed calls add up to budget_s). setup() runs before every call, outside the timing. Returns (seconds of each
    timed call, fn's last result). Timing: synchronize, perf_counter, fn, synchronize, perf_counter; or CUDA events
    around fn with events=True (GPU time of the kernels, without the host's launch latency)."""
    result = None
    for _ in range(warmup):  # 0 is allowed for very long points: the first timed call then includes compilation
        if setup:
            setup()
        result = fn()
    times = []
    for _ in range(max(1, repeats)):
        if setup:
            setup()
        sync(device)
        if events and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            result = fn()
            sync(device)
            times.append(time.perf_counter() - t)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return times, result


def profile_once(fn, device, rows, title):
    """One more call of fn under torch.profiler: print the kernels taking the most GPU time (what to optimize)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    print(f"--- profile: {title}", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def env_info(device) -> dict:
    """Recorded in every JSON line: what ran where."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:
        commit = ""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": commit,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


class Recorder:
    """Appends one JSON object per point to OUT/bench.jsonl and keeps the rows for the final table."""

    def __init__(self, out_dir, env):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "bench.jsonl")
        self.env, self.rows = env, []

    def emit(self, record: dict):
        record = {**record, **self.env}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.rows.append(record)
        print(format_row(record), flush=True)
        return record


def run_point(record, body, device):
    """record.update(body()) with status 'ok'; an OOM or any other error is recorded instead of raised.
    Whatever body allocated is freed afterwards (its frame dies with the exception)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        record.update(body())
        record.setdefault("status", "ok")
    except OOM as e:
        record.update(status="OOM", error=str(e).splitlines()[0][:300], peak_gib=peak_gib(device))
    except Exception as e:
        traceback.print_exc()
        record.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    free_memory(device)
    return record


def over_budget(args, estimate_s=0.0) -> bool:
    """True if a point expected to take estimate_s would end after --time-budget."""
    return bool(args.time_budget) and time.perf_counter() - T0 + estimate_s > args.time_budget


def r(x, digits=4):
    return None if x is None else round(x, digits)


# ------------------------------------------------------------------------------------------------ 1. step


def partial_step(model, idx, tgt, chunk, store, last_chunks, compute_dtype, checkpoint):
    """A probe for lengths whose whole step takes longer than a benchmark can wait (a dense 7B step at 1M tokens is
    ~45 min): stage 1's result, every layer's K/V of all but the last chunk, is written as random values - the
    memory of a real step, not its compute - and then the last `last_chunks` chunks of stage 2 run for real over
    that history. Peak memory (GPU and host) is the whole step's; the time is that of its most expensive chunks."""
    B, T = idx.shape
    cfg = model.config
    store.reset()
    chunks = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
    g = torch.Generator(device=idx.device).manual_seed(0)
    for s, e in chunks[:-1]:
        for layer in range(cfg.num_hidden_layers):
            kv = torch.randn(B, e - s, cfg.num_key_value_heads, cfg.head_dim, device=idx.device, dtype=compute_dtype,
                             generator=g)
            store.append(layer, kv, kv)
    total = torch.zeros((), device=idx.device)
    with fp32_gradients(model):
        for s, e in chunks[::-1][:last_chunks]:
            total += backward_chunk(model, idx, tgt, s, e, store, compute_dtype, checkpoint)
    return total.item()


def bench_step(args, device, rec):
    """Chunked training step vs the full-sequence baseline, one model, lengths in increasing order."""
    bf16 = torch.bfloat16
    model = build_model(args.model, device, args.seed)
    cfg = model.config
    params = list(model.parameters())  # a tied weight once
    low_precision = args.params_dtype == "bfloat16"
    if low_precision:
        model.to(bf16)  # chunked_step accumulates each chunk's gradient in an fp32 p.main_grad

    # allocate the fp32 gradients once, up front: steady memory, zeroed in place between steps
    def allocate_grads():
        for p in params:
            if low_precision:
                p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            else:
                p.grad = torch.zeros_like(p)

    def drop_grads():  # the baseline with bf16 params keeps plain bf16 grads, as HF training would
        for p in params:
            p.grad, p.main_grad = None, None

    def zero_grads():
        for p in params:
            for g in (p.grad, getattr(p, "main_grad", None)):
                if g is not None:
                    g.zero_()

    allocate_grads()
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * 4 for p in params)
    print(f"step: {args.model} ({model.num_params() / 1e9:.2f}B params; params {param_bytes / GiB:.1f} GiB "
          f"{args.params_dtype} + grads {grad_bytes / GiB:.1f} GiB fp32), batch {args.batch}, chunk {args.chunk}, "
          f"checkpoint {args.checkpoint}, bf16 compute on {device}", flush=True)

    base = dict(mode="step", model=args.model, batch=args.batch, chunk=args.chunk, checkpoint=args.checkpoint,
                output_cache_gib=args.output_cache, params_dtype=args.params_dtype, params_gib=r(param_bytes / GiB),
                grads_gib=r(grad_bytes / GiB))
    last_time = {}  # path -> (length, median step seconds): predicts the next point's time for --time-budget
    baseline_oom_at = None
    losses = {}  # (path, length) -> loss

    # per length: the chunked step at every page size, then the full-sequence baseline (it has no pages)
    # "chunked": pages on the GPU (PagedKVStore); "offload": in pinned host memory (OffloadedKVStore); "sparse": on
    # the GPU, page-level sparse attention with --budget history tokens per query block (sparse_attn.py);
    # "sparse_offload": sparse attention over offloaded pages (only the selected pages move)
    names = {"paged": "chunked", "offload": "offload", "sparse": "sparse", "sparse-offload": "sparse_offload"}
    stores = [names[name] for name in args.stores]
    points = [(length, path, ps) for length in sorted(args.lengths)
              for path, ps in [(store, ps) for ps in args.page_size for store in stores] + [("full", None)]
              if not (path == "full" and (args.no_baseline or args.last_chunks))]
    grad_dtype = {"float32": torch.float32, "bfloat16": bf16}[args.grad_pages]
    for length, path, page_size in points:
        tokens = args.batch * length
        sparse_attn, offloaded = path.startswith("sparse"), path.endswith("offload")
        idx, tgt = random_tokens(cfg.vocab_size, args.batch, length, device, args.seed + length)
        record = dict(base, path=path, length=length, page_size=page_size,
                      checkpoint=args.checkpoint if path != "full" else True)
        if path != "full":
            record.update(grad_pages=args.grad_pages, last_chunks=args.last_chunks or None)
        if sparse_attn:
            record.update(budget=args.budget, q_block=args.q_block)
        # --- skip early: baseline already out of memory, time budget, or a pool larger than the free memory
        if path == "full" and baseline_oom_at is not None:
            rec.emit(dict(record, status="OOM", skipped=True, error=f"OOM at length {baseline_oom_at}"))
            continue
        if path in last_time and not args.last_chunks:
            l0, t0 = last_time[path]  # scale the last step time by model FLOPs (linear + quadratic attention)
            scale = model.flops_per_token(length) * length / (model.flops_per_token(l0) * l0)
            if sparse_attn:  # attention per chunk is bounded: linear in the length
                scale = length / l0
            estimate = t0 * scale * (args.warmup + 1)  # warm-up + at least one timed step
            if over_budget(args, estimate):
                rec.emit(dict(record, status="skipped", error=f"time budget: ~{estimate:.0f} s predicted"))
                continue
        pool_bytes = PagedKVStore.bytes_per_token(cfg, bf16, grad_dtype) * tokens if path != "full" else 0
        if offloaded:  # the pages live on the host; the GPU holds a fixed-size cache
            record.update(host_gib=r(pool_bytes / GiB), cache_tokens=args.cache_tokens)
            pool_bytes = OffloadedKVStore.cache_bytes(cfg, args.batch, page_size, args.cache_tokens, bf16, grad_dtype)
        record.update(pool_gib=r(pool_bytes / GiB))
        if device.type == "cuda" and pool_bytes:
            free_memory(device)
            free = torch.cuda.mem_get_info(device)[0]
            if pool_bytes > free:
                rec.emit(dict(record, status="skipped",
                              error=f"KV/dKV pool needs {pool_bytes / GiB:.1f} GiB, {free / GiB:.1f} GiB free"))
                continue

        def body():
            store = None
            if path == "full" and low_precision:
                drop_grads()
            if path != "full":
                # the pool is allocated once per point, outside the timing, and reused by every step
                sparse = dict(budget=args.budget, q_block=args.q_block) if sparse_attn else None
                if not offloaded:
                    store = PagedKVStore.for_sequence(model, args.batch, length, page_size, bf16, device, grad_dtype,
                                                      sparse=sparse, output_cache_bytes=int(args.output_cache * 2**30))
                else:
                    store = OffloadedKVStore.for_sequence(model, args.batch, length, page_size, bf16, device,
                                                          args.cache_tokens, grad_dtype, sparse=sparse)

                def step():
                    if args.last_chunks:
                        return partial_step(model, idx, tgt, args.chunk, store, args.last_chunks, bf16,
                                            args.checkpoint)
                    return chunked_step(model, idx, tgt, args.chunk, page_size, bf16, store=store,
                                        checkpoint=args.checkpoint, progress=args.progress)
            else:
                def step():
                    return full_sequence_step(model, idx, tgt, bf16, checkpoint=True)

            times, loss = timed(step, device, args.warmup, args.repeats, setup=zero_grads,
                                budget_s=args.point_budget)
            if args.profile and device.type == "cuda":
                profile_once(step, device, args.profile, f"{path} T {length}")
            step_s = statistics.median(times)
            moved = getattr(store, "bytes_moved", None)
            out = {} if moved is None else dict(  # per step, averaged over all calls (warm-up included)
                h2d_gib_per_step=r(moved["h2d"] / GiB / (args.warmup + len(times))),
                d2h_gib_per_step=r(moved["d2h"] / GiB / (args.warmup + len(times))))
            out.update(step_s=r(step_s), step_s_all=[r(t) for t in times], tokens_per_s=r(tokens / step_s, 1),
                       # model FLOPs (6N + causal attention; recomputation not counted) per second
                       tflops=r(model.flops_per_token(length) * tokens / step_s / 1e12, 1), loss=r(loss, 5))
            if args.last_chunks:  # a partial step: tokens/s and TFLOP/s of a whole step do not apply
                out.update(tokens_per_s=None, tflops=None)
            if sparse_attn:  # model FLOPs count dense attention, which a sparse step does not do
                out.update(tflops=None)
            peak = peak_gib(device)
            if peak is not None:
                fixed = param_bytes + (param_bytes if path == "full" and low_precision else grad_bytes)
                out.update(peak_gib=r(peak), activation_gib=r(peak - (fixed + pool_bytes) / GiB))
            return out

        run_point(record, body, device)
        if path == "full" and low_precision:
            drop_grads()
            allocate_grads()
        zero_grads()  # an OOM mid-backward leaves partial gradients behind
        if record["status"] == "ok":
            last_time[path] = (length, record["step_s"])
            losses[path, length] = record["loss"]
            same = "sparse" if path == "sparse_offload" else "chunked"  # the same function on the same tokens:
            if path != same and (same, length) in losses:  # the losses should agree to bf16 precision
                record[f"loss_diff_vs_{same}"] = r(record["loss"] - losses[same, length], 6)
        elif path == "full" and record["status"] == "OOM":
            baseline_oom_at = length
        rec.emit(record)
    del model, params
    free_memory(device)


# ------------------------------------------------------------------------------------------------ 2. kernel


def attention_flops(batch, heads, head_dim, q_len, kv_len):
    """Forward FLOPs of causal attention of the last q_len queries over kv_len positions: 2 matmuls (QK^T, PV) of
    2 FLOPs per multiply-add over the visible (query, key) pairs, counted as q_len * (kv_len - q_len) history pairs
    plus q_len^2 / 2 on the diagonal block (for q_len = kv_len = T: the usual 4 * B * H * T^2 * D / 2).
    Convention (FlashAttention's): backward = 2.5 x forward (it recomputes QK^T), so forward+backward = 3.5 x forward.
    The same counts are used for SDPA and the paged kernel, so their TFLOP/s compare directly."""
    pairs = q_len * (kv_len - q_len) + q_len * q_len / 2
    return 4 * batch * heads * head_dim * pairs


FWD_BWD = 3.5  # forward+backward FLOPs / forward FLOPs (see attention_flops)


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_kernel(args, device, rec):
    """Paged attention (forward, forward+backward) vs SDPA, plus the chunk-at-the-end configuration."""
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    dtype = torch.bfloat16
    sdpa_kw = dict(is_causal=True, enable_gqa=H != Hkv)
    print(f"kernel: B {B}, heads {H}/{Hkv}, head_dim {D}, {dtype} on {device}", flush=True)
    for T in sorted(args.lengths):
        if over_budget(args):
            rec.emit(dict(mode="kernel", length=T, status="skipped", error="time budget"))
            continue
        g = torch.Generator(device=device).manual_seed(args.seed + T)
        q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)  # the kernel's layout [B, T, H, D]
        k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, generator=g)
        do = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
        fwd_flops = attention_flops(B, H, D, T, T)
        base = dict(mode="kernel", length=T, batch=B, heads=H, kv_heads=Hkv, head_dim=D, dtype="bfloat16")

        # --- SDPA on contiguous [B, H, T, D] copies; its output is also the reference for the kernel
        ref = {}

        def sdpa_body():
            qs, ks, vs, dos = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
            with torch.no_grad():
                t_fwd, o = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, **sdpa_kw), device,
                                 args.warmup, args.repeats, events=True)
            ref["o"] = o.transpose(1, 2)  # [B, T, H, D]
            qs.requires_grad_(), ks.requires_grad_(), vs.requires_grad_()

            def fwd_bwd():  # autograd.grad: no accumulation into .grad between repeats
                o = F.scaled_dot_product_attention(qs, ks, vs, **sdpa_kw)
                return torch.autograd.grad(o, (qs, ks, vs), dos)

            t_fb, (dq, dk, dv) = timed(fwd_bwd, device, args.warmup, args.repeats, events=True)
            ref.update(dq=dq.transpose(1, 2), dk=dk.transpose(1, 2), dv=dv.transpose(1, 2))
            fwd_ms, fb_ms = statistics.median(t_fwd) * 1e3, statistics.median(t_fb) * 1e3
            return dict(fwd_ms=r(fwd_ms, 3), fwdbwd_ms=r(fb_ms, 3), fwd_tflops=r(fwd_flops / fwd_ms / 1e9, 1),
                        fwdbwd_tflops=r(FWD_BWD * fwd_flops / fb_ms / 1e9, 1))

        if not args.no_sdpa:
            rec.emit(run_point(dict(base, impl="sdpa", config="full", q_len=T, page_size=None), sdpa_body, device))

        for page_size in args.page_size:
            if T % page_size:
                rec.emit(dict(base, impl="paged", page_size=page_size, status="skipped",
                              error=f"length {T} is not a multiple of page size {page_size}"))
                continue

            # --- the pool: every batch row gets its own pages, in a shuffled order, plus one spare page
            n = T // page_size
            num_pages = B * n + 1
            perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(args.seed))[:B * n]
            table = perm.view(B, n).to(device=device, dtype=torch.int32)
            pos = torch.arange(T, device=device)
            phys, slot = table[:, pos // page_size].long(), pos % page_size  # [B, T], [T]
            k_pages = torch.zeros(num_pages, page_size, Hkv, D, device=device, dtype=dtype)
            v_pages = torch.zeros_like(k_pages)
            k_pages[phys, slot], v_pages[phys, slot] = k, v  # the same K/V as SDPA's inputs
            dk_pages = torch.zeros(k_pages.shape, device=device, dtype=torch.float32)
            dv_pages = torch.zeros_like(dk_pages)

            configs = [("full", T)] + ([("chunk", args.chunk)] if args.chunk < T else [])
            for config, C in configs:
                if over_budget(args):
                    rec.emit(dict(base, impl="paged", config=config, page_size=page_size, status="skipped",
                                  error="time budget"))
                    continue
                q_start = T - C  # queries are the last C positions; all T positions are in the pages
                qc, doc = q[:, q_start:].contiguous(), do[:, q_start:].contiguous()
                flops = attention_flops(B, H, D, C, T)

                def paged_body():
                    out = {}
                    # correctness, once: forward vs SDPA's output, and (full config) gradients vs SDPA's
                    if "o" in ref:
                        o, lse = paged_attention_forward(qc, k_pages, v_pages, table, q_start)
                        out["o_rel_err"] = r(rel_err(o, ref["o"][:, q_start:]), 6)
                        if config == "full" and "dq" in ref:
                            dk_pages.zero_(), dv_pages.zero_()
                            dq = paged_attention_backward(doc, qc, o, lse, k_pages, v_pages, table, q_start,
                                                          dk_pages, dv_pages)
                            out["dq_rel_err"] = r(rel_err(dq, ref["dq"]), 6)
                            out["dk_rel_err"] = r(rel_err(gather_pages(dk_pages, table, 0, T), ref["dk"]), 6)
                            out["dv_rel_err"] = r(rel_err(gather_pages(dv_pages, table, 0, T), ref["dv"]), 6)
                        del o, lse

                    def fwd():
                        return paged_attention_forward(qc, k_pages, v_pages, table, q_start)

                    def fwd_bwd():  # the backward adds into dk/dv pages; their values do not matter here
                        o, lse = fwd()
                        return paged_attention_backward(doc, qc, o, lse, k_pages, v_pages, table, q_start,
                                                        dk_pages, dv_pages)

                    t_fwd, _ = timed(fwd, device, args.warmup, args.repeats, events=True)
                    t_fb, _ = timed(fwd_bwd, device, args.warmup, args.repeats, events=True)
                    fwd_ms, fb_ms = statistics.median(t_fwd) * 1e3, statistics.median(t_fb) * 1e3
                    out.update(fwd_ms=r(fwd_ms, 3), fwdbwd_ms=r(fb_ms, 3), fwd_tflops=r(flops / fwd_ms / 1e9, 1),
                               fwdbwd_tflops=r(FWD_BWD * flops / fb_ms / 1e9, 1))
                    return out

                record = dict(base, impl="paged", config=config, q_len=C, page_size=page_size)
                rec.emit(run_point(record, paged_body, device))
            del k_pages, v_pages, dk_pages, dv_pages
        del q, k, v, do, ref
        free_memory(device)


# ------------------------------------------------------------------------------------------------ 3. exact


def check_exact(args, device, rec):
    """Acceptance bar: chunked bf16 gradients vs an fp32 full-sequence reference are no worse than full-sequence
    bf16 gradients vs that reference. Also chunked fp32 vs the reference (should be ~1e-5 or better)."""
    # the reference must be true fp32: no TF32 in matmuls (and so in SDPA's fp32 math)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name in args.model:
            for page_size in args.page_size:
                if over_budget(args):
                    rec.emit(dict(mode="exact", model=name, status="skipped", error="time budget"))
                    continue
                _check_exact_one(args, device, rec, name, page_size)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_exact_one(args, device, rec, name, page_size):
    model = build_model(name, device, args.seed)
    cfg = model.config
    named = list(model.named_parameters())  # a tied weight once
    idx, tgt = random_tokens(cfg.vocab_size, args.batch, args.seq, device, args.seed)

    B, T, bf16 = args.batch, args.seq, torch.bfloat16

    def offloaded(grad_dtype):
        return OffloadedKVStore.for_sequence(model, B, T, page_size, bf16, device, cache_tokens=max(args.chunk, 8192),
                                             grad_dtype=grad_dtype)

    variants = {
        "full_fp32": lambda: full_sequence_step(model, idx, tgt, torch.float32),  # the reference
        "full_bf16": lambda: full_sequence_step(model, idx, tgt, bf16),
        "chunked_bf16": lambda: chunked_step(model, idx, tgt, args.chunk, page_size, bf16),
        "chunked_fp32": lambda: chunked_step(model, idx, tgt, args.chunk, page_size, torch.float32),
        # offloaded pages (host memory, copy streams, history in parts of 8K tokens): dK/dV pages fp32, then bf16
        "offload_bf16": lambda: chunked_step(model, idx, tgt, args.chunk, page_size, bf16,
                                             store=offloaded(torch.float32)),
        "offload_bf16_grad_pages_bf16": lambda: chunked_step(model, idx, tgt, args.chunk, page_size, bf16,
                                                             store=offloaded(bf16)),
    }
    ref_grads, ref_loss, errs = None, None, {}
    base = dict(mode="exact", model=name, head_dim=cfg.head_dim, batch=args.batch, length=args.seq,
                chunk=args.chunk, page_size=page_size)
    for variant, fn in variants.items():
        model.zero_grad(set_to_none=True)

        def body():
            loss = fn()
            grads = [p.grad.detach().clone() for _, p in named]
            out = dict(loss=r(loss, 6))
            if ref_grads is None:
                out["_grads"] = grads
                return out
            cmp = compare_grads(grads, ref_grads, [n for n, _ in named])
            out.update(loss_diff=r(loss - ref_loss, 8), grad_rel_err=cmp["rel_err"], worst_param=cmp["worst_param"],
                       worst_param_rel_err=cmp["worst_param_rel_err"],
                       median_param_rel_err=cmp["median_param_rel_err"])
            return out

        record = run_point(dict(base, variant=variant), body, device)
        if variant == "full_fp32":
            if record["status"] != "ok":
                rec.emit(record)
                break  # nothing to compare against
            ref_grads, ref_loss = record.pop("_grads"), record["loss"]
        else:
            errs[variant] = record.get("grad_rel_err")
        if "_bf16" in variant and variant != "full_bf16" and errs.get("full_bf16") and errs.get(variant) is not None:
            ratio = errs[variant] / errs["full_bf16"]
            record.update(ratio_vs_full_bf16=r(ratio), passes=ratio <= 1.0)
        rec.emit(record)
    del model, named, ref_grads
    free_memory(device)


def compare_grads(grads, ref_grads, names) -> dict:
    """Gradients vs reference gradients (lists of tensors, one per parameter): relative error and cosine similarity
    of all parameters as one vector; the parameter with the largest relative error and the median over parameters
    (those whose reference gradient is not zero). k_proj.bias is usually the worst: softmax ignores a per-query
    constant, so its true gradient is tiny and its relative error mostly noise; hence also the median."""
    dot = sum((g.double() * gr.double()).sum().item() for g, gr in zip(grads, ref_grads))
    norm2 = sum(g.double().pow(2).sum().item() for g in grads)
    ref2 = sum(gr.double().pow(2).sum().item() for gr in ref_grads)
    diff2 = sum((g.double() - gr.double()).pow(2).sum().item() for g, gr in zip(grads, ref_grads))
    per = {n: ((g.double() - gr.double()).norm() / gr.double().norm()).item()
           for n, g, gr in zip(names, grads, ref_grads) if gr.abs().max() > 0}
    worst = max(per, key=per.get)
    return dict(rel_err=math.sqrt(diff2 / ref2), cosine=dot / math.sqrt(norm2 * ref2), worst_param=worst,
                worst_param_rel_err=per[worst], median_param_rel_err=statistics.median(per.values()))


def sparse_fidelity(args, device, rec):
    """Gradient fidelity of sparse attention: on a trained model (random weights attend almost uniformly, which would
    flatter no summary and mislead), the chunked sparse gradient for each budget vs the dense chunked one (exact),
    both with bf16 compute: cosine similarity and relative error of all parameters as one vector, the worst
    parameter, and the loss. Batches come from the validation split."""
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    model = Model(ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device)
    named = list(model.named_parameters())
    data = TokenData(args.data)
    base = dict(mode="fidelity", ckpt=args.ckpt, trained_steps=ckpt["step"], seq=args.seq, chunk=args.chunk,
                page_size=args.page_size, batch=args.batch)
    print(f"fidelity: {model.num_params() / 1e6:.1f}M params trained {ckpt['step']} steps, seq {args.seq}, "
          f"chunk {args.chunk}, budgets {args.budgets}", flush=True)

    def grads_of(budget, q_block=None):
        """[per batch: (loss, flat fp32 gradient)] of the chunked step, dense if budget is None."""
        out = []
        for i in range(args.batches):
            x, y = (t.to(device) for t in data.batch("val", args.batch, args.seq, seed=10_000 + i))
            store = PagedKVStore.for_sequence(model, args.batch, args.seq, args.page_size, torch.bfloat16, device,
                                              sparse=dict(budget=budget, q_block=q_block) if budget else None)
            model.zero_grad(set_to_none=True)
            loss = chunked_step(model, x, y, args.chunk, args.page_size, torch.bfloat16, store=store)
            out.append((loss, [p.grad.detach().clone() for _, p in named]))
            del store
        return out

    dense = grads_of(None)
    for q_block, budget in [(q, b) for q in args.q_blocks for b in args.budgets]:
        def body():
            sparse = grads_of(budget, q_block)
            cmps = [compare_grads(g_s, g_d, [n for n, _ in named]) for (_, g_d), (_, g_s) in zip(dense, sparse)]
            worst = max(cmps, key=lambda c: c["worst_param_rel_err"])
            return dict(grad_cosine=r(statistics.mean(c["cosine"] for c in cmps), 6),
                        grad_rel_err=r(statistics.mean(c["rel_err"] for c in cmps)),
                        loss_dense=r(statistics.mean(l for l, _ in dense), 5),
                        loss_diff=r(statistics.mean(l_s - l_d for (l_d, _), (l_s, _) in zip(dense, sparse)), 6),
                        worst_param=worst["worst_param"], worst_param_rel_err=r(worst["worst_param_rel_err"]))
        rec.emit(run_point(dict(base, budget=budget, q_block=q_block, history_fraction=r(budget / args.seq)), body,
                           device))
    del model, named, dense
    free_memory(device)


# ------------------------------------------------------------------------------------------------ output


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def format_row(d) -> str:
    """One line per point, per mode."""
    status = d.get("status", "?")
    tail = "" if status == "ok" else f"  [{status}{': ' + d['error'] if d.get('error') else ''}]"
    if d.get("mode") == "step":
        return (f"step {d['model']} {d['path']:>7} T {d['length']:>7} c {d['chunk']} p {_f(d.get('page_size'), '>3')} "
                f"ckpt {int(d['checkpoint'])} | {_f(d.get('step_s'), '7.3f')} s {_f(d.get('tokens_per_s'), '7,.0f')} tok/s "
                f"{_f(d.get('tflops'), '5.1f')} TF/s | GiB peak {_f(d.get('peak_gib'), '5.2f')} act "
                f"{_f(d.get('activation_gib'), '5.2f')} pool {_f(d.get('pool_gib'), '5.2f')} | loss "
                f"{_f(d.get('loss'), '.4f')}{tail}")
    if d.get("mode") == "kernel":
        errs = " ".join(f"{k[:-8]} {d[k]:.0e}" for k in ("o_rel_err", "dq_rel_err", "dk_rel_err", "dv_rel_err")
                        if d.get(k) is not None)
        return (f"kernel {d.get('impl', '?'):>5} {d.get('config', '-'):>5} T {d['length']:>6} q {_f(d.get('q_len'), '>6')} "
                f"p {_f(d.get('page_size'), '>3')} | fwd {_f(d.get('fwd_ms'), '8.2f')} ms {_f(d.get('fwd_tflops'), '5.1f')} "
                f"TF/s | f+b {_f(d.get('fwdbwd_ms'), '8.2f')} ms {_f(d.get('fwdbwd_tflops'), '5.1f')} TF/s"
                f"{' | rel err ' + errs if errs else ''}{tail}")
    if d.get("mode") == "exact":
        extra = ""
        if d.get("grad_rel_err") is not None:
            worst = str(d.get("worst_param")).removeprefix("model.").replace("layers.", "L")
            extra = (f" | grad err {d['grad_rel_err']:.2e} median {_f(d.get('median_param_rel_err'), '.1e')} "
                     f"worst {_f(d.get('worst_param_rel_err'), '.1e')} {worst}")
        if "passes" in d:
            extra += f" | /full_bf16 {d['ratio_vs_full_bf16']:.3f} {'PASS' if d['passes'] else 'FAIL'}"
        return (f"exact {d['model']} d{_f(d.get('head_dim'), '')} T {_f(d.get('length'), '')} "
                f"c {_f(d.get('chunk'), '')} p {_f(d.get('page_size'), '')} {d.get('variant', '-'):>12} "
                f"loss {_f(d.get('loss'), '.5f')}{extra}{tail}")
    return json.dumps(d)


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
    s.add_argument("--budget", type=int, default=4096, help="sparse store: history tokens per query block")
    s.add_argument("--q-block", type=int, default=128, help="sparse store: queries per selection block")
    s.add_argument("--stores", type=lambda t: t.split(","), default=["paged"],
                   help="chunked-path stores to run, comma-separated: paged (pages on the GPU), offload (host), "
                        "sparse (sparse attention, pages on the GPU), sparse-offload (sparse, pages on the host)")
    s.add_argument("--cache-tokens", type=int, default=65536, help="offload: tokens per GPU cache buffer")
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
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--batches", type=int, default=2, help="validation batches averaged over")

    sub.add_parser("summary", parents=[common], help="print the tables of OUT/bench.jsonl")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.what == "summary":
        summary(os.path.join(args.out, "bench.jsonl"))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but CUDA is not available")
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
