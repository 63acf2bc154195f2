"""bench.py step: one chunk-recurrent training step (pages on the GPU or offloaded, dense or sparse) against model.py's
full-sequence step with activation checkpointing, at growing lengths: time, tokens/s, memory split into parts, bytes
moved. See bench.py for commands."""

import statistics

import torch

from attention import kernel_name, named_kernel
from bench_lib import (GiB, build_model, free_memory, full_sequence_step, peak_gib, profile_once, r,
                       random_tokens, run_point, over_budget, timed)
from chunk_train import backward_chunk, chunked_step
from offload import OffloadedKVStore
from paged_kv import PagedKVStore
from precision import allocate_main_grads, drop_main_grads, fp32_gradients
from sparse_attn import SparseConfig

# ------------------------------------------------------------------------------------------------ 1. step


def fill_random_history(model, idx, chunk, store, compute_dtype):
    """The setup of a partial step (--last-chunks), a probe for lengths whose whole step takes longer than a benchmark
    can wait (a dense 7B step at 1M tokens is ~45 min): stage 1's result, every layer's K/V of all but the last
    chunk, written as random values - the memory of a real step, not its compute."""
    B, T = idx.shape
    cfg = model.config
    store.reset()
    g = torch.Generator(device=idx.device).manual_seed(0)
    for _ in list(range(0, T, chunk))[:-1]:  # every chunk but the last (those are whole chunks)
        for layer in range(cfg.num_hidden_layers):
            kv = torch.randn(B, chunk, cfg.num_key_value_heads, cfg.head_dim, device=idx.device, dtype=compute_dtype,
                             generator=g)
            store.append(layer, kv, kv)


def partial_step(model, idx, tgt, chunk, store, last_chunks, compute_dtype, checkpoint):
    """The last `last_chunks` chunks of stage 2, run for real over the history fill_random_history wrote (the
    caller's setup, outside the timing). Peak memory (GPU and host) is the whole step's; the time is that of its
    most expensive chunks."""
    T = idx.shape[1]
    chunks = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
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
        if low_precision:
            allocate_main_grads(model)
        else:
            for p in params:
                p.grad = torch.zeros_like(p)

    def drop_grads():  # the baseline with bf16 params keeps plain bf16 grads, as HF training would
        drop_main_grads(model)
        for p in params:
            p.grad = None

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

    # the chunked path's attention kernel: Triton, or sdpa with Triton for the parts it does not take (document masks,
    # the history of sparse tables of several query blocks); recorded by its concrete name (auto: sdpa on CUDA for
    # chunks of batch x tokens x hidden >= 2^22)
    size = args.batch * args.chunk * model.config.hidden_size
    kernel = named_kernel(args.attn_kernel, device, size)
    base = dict(mode="step", model=args.model, attn_kernel=kernel_name(args.attn_kernel, device, size),
                batch=args.batch, chunk=args.chunk, checkpoint=args.checkpoint, output_cache_gib=args.output_cache,
                mlp_cache_gib=args.mlp_cache,
                keep_activations=args.keep_activations, params_dtype=args.params_dtype,
                params_gib=r(param_bytes / GiB), grads_gib=r(grad_bytes / GiB))
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
                sparse = SparseConfig(budget=args.budget, q_block=args.q_block) if sparse_attn else None
                if not offloaded:
                    store = PagedKVStore.for_sequence(model, args.batch, length, page_size, bf16, device, grad_dtype,
                                                      sparse=sparse, output_cache_bytes=int(args.output_cache * 2**30),
                                                      kernel=kernel)
                else:
                    store = OffloadedKVStore.for_sequence(model, args.batch, length, page_size, bf16, device,
                                                          args.cache_tokens, grad_dtype, sparse=sparse, kernel=kernel)

                def step():
                    if args.last_chunks:
                        return partial_step(model, idx, tgt, args.chunk, store, args.last_chunks, bf16,
                                            args.checkpoint)
                    return chunked_step(model, idx, tgt, args.chunk, page_size, bf16, store=store,
                                        checkpoint=args.checkpoint, progress=args.progress,
                                        keep_activations=args.keep_activations,
                                        mlp_cache_bytes=int(args.mlp_cache * 2**30))
            else:
                def step():
                    return full_sequence_step(model, idx, tgt, bf16, checkpoint=True)

            def setup():  # outside the timing; a partial step's history is written afresh each time
                zero_grads()
                if args.last_chunks and store is not None:
                    fill_random_history(model, idx, args.chunk, store, bf16)

            times, loss = timed(step, device, args.warmup, args.repeats, setup=setup, budget_s=args.point_budget)
            if args.profile and device.type == "cuda":
                setup()
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


