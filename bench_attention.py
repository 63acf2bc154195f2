"""bench.py kernel / exact / fidelity: the paged attention kernels against SDPA (TFLOP/s and errors), chunked bf16
gradients against an fp32 full-sequence reference, and sparse attention's gradient fidelity on a trained model. See
bench.py for commands."""

import math
import statistics

import torch
import torch.nn.functional as F

from attention import Part, SDPAKernel, TritonKernel, delta_for, named_kernel
from bench_lib import (build_model, free_memory, full_sequence_step, over_budget, profile_once, r, random_tokens,
                       run_point, timed)
from chunk_train import chunked_step
from data import TokenData
from kernels.paged_reference import gather_pages
from model import Model, ModelConfig
from offload import OffloadedKVStore
from paged_kv import PagedKVStore
from sparse_attn import RULES, SparseConfig

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

# Each kernel point is timed two ways (bench_lib.timed), both reported, ratios each against SDPA timed the same way:
# "queued" (keys without suffix): the GPU's own time, the host's launches enqueued ahead of it, as in a training step
# where the host runs ahead; "isolated" (suffix _isolated): the call alone on an idle GPU, the host's launch latency
# counted wherever the GPU waits for it (the first measurements, and RESULTS up to the fourteenth session).
TIMINGS = (("queued", ""), ("isolated", "_isolated"))

# --kernels: the paged kernels measured against SDPA, each through the kernel interface attend uses, and their rows'
# impl. triton: kernels/paged_attention.py; sdpa*: kernels/gather_sdpa.py's SDPAKernel (issue #18: pages gathered
# into contiguous K/V, then PyTorch's fused ops). sdpa: the op for the device (cuDNN on CUDA, the CPU flash op on a
# CPU); sdpa-cudnn / sdpa-flash: that CUDA op.
KERNEL_IMPL = {"triton": "paged", "sdpa": "gather-sdpa", "sdpa-cudnn": "gather-cudnn", "sdpa-flash": "gather-flash"}


def make_kernel(name):
    """The kernel object of a --kernels name."""
    if name == "triton":
        return TritonKernel()
    return SDPAKernel({"sdpa": None, "sdpa-cudnn": "cudnn", "sdpa-flash": "flash"}[name])


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

        def time_fwd_bwd(fwd, fwd_bwd, flops, raw=None):
            """Median times and TFLOP/s of fwd, fwd_bwd and their difference (the backward), each timed both ways
            (TIMINGS), with their ratios to SDPA's full causal call at this length (timed the same way) once that has
            run. raw: a dict given the unrounded (fwd, bwd, fwd+bwd) TFLOP/s per timing mode."""
            out = {}
            for mode, sfx in TIMINGS:
                t_fwd, _ = timed(fwd, device, args.warmup, args.repeats, events=mode)
                t_fb, _ = timed(fwd_bwd, device, args.warmup, args.repeats, events=mode)
                fwd_ms, fb_ms = statistics.median(t_fwd) * 1e3, statistics.median(t_fb) * 1e3
                tf = (flops / fwd_ms / 1e9, (FWD_BWD - 1) * flops / max(fb_ms - fwd_ms, 1e-9) / 1e9,
                      FWD_BWD * flops / fb_ms / 1e9)
                if raw is not None:
                    raw[mode] = tf
                out.update({f"fwd_ms{sfx}": r(fwd_ms, 3), f"fwdbwd_ms{sfx}": r(fb_ms, 3)})
                out.update({f"{part}_tflops{sfx}": r(x, 1) for part, x in zip(("fwd", "bwd", "fwdbwd"), tf)})
                if "tflops" in ref:  # TFLOP/s as a fraction of SDPA's at this length (its full causal call)
                    out.update({f"{part}_vs_sdpa{sfx}": r(x / sdpa, 3)
                                for part, x, sdpa in zip(("fwd", "bwd", "fwdbwd"), tf, ref["tflops"][mode])})
            return out

        # --- SDPA on contiguous [B, H, T, D] copies; its output is also the reference for the kernel
        ref = {}

        def sdpa_body():
            qs, ks, vs, dos = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))

            def fwd():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(qs, ks, vs, **sdpa_kw)

            ref["o"] = fwd().transpose(1, 2)  # [B, T, H, D]
            qs.requires_grad_(), ks.requires_grad_(), vs.requires_grad_()

            def fwd_bwd():  # autograd.grad: no accumulation into .grad between repeats
                o = F.scaled_dot_product_attention(qs, ks, vs, **sdpa_kw)
                return torch.autograd.grad(o, (qs, ks, vs), dos)

            dq, dk, dv = fwd_bwd()
            ref.update(dq=dq.transpose(1, 2), dk=dk.transpose(1, 2), dv=dv.transpose(1, 2))
            ref_tflops = {}
            out = time_fwd_bwd(fwd, fwd_bwd, fwd_flops, raw=ref_tflops)
            ref["tflops"] = ref_tflops  # for the kernels' ratios
            return out

        if not args.no_sdpa:
            rec.emit(run_point(dict(base, impl="sdpa", config="full", q_len=T, page_size=None), sdpa_body, device))

        def grad_errs(dq, dk_pages, dv_pages, table):
            """dq [B, T, H, D] and the dk/dv pages of the full config vs SDPA's gradients."""
            return dict(dq_rel_err=r(rel_err(dq, ref["dq"]), 6),
                        dk_rel_err=r(rel_err(gather_pages(dk_pages, table, 0, T), ref["dk"]), 6),
                        dv_rel_err=r(rel_err(gather_pages(dv_pages, table, 0, T), ref["dv"]), 6))

        for page_size in args.page_size:
            if T % page_size:
                for name in args.kernels:
                    rec.emit(dict(base, impl=KERNEL_IMPL[name], page_size=page_size, status="skipped",
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

            configs = ([] if args.chunk_only and args.chunk < T else [("full", T)]) + (
                [("chunk", args.chunk)] if args.chunk < T else [])
            for config, C in configs:
                if over_budget(args):
                    for name in args.kernels:
                        rec.emit(dict(base, impl=KERNEL_IMPL[name], config=config, page_size=page_size,
                                      status="skipped", error="time budget"))
                    continue
                q_start = T - C  # queries are the last C positions; all T positions are in the pages
                qc, doc = q[:, q_start:].contiguous(), do[:, q_start:].contiguous()
                flops = attention_flops(B, H, D, C, T)

                def kernel_body(kernel):
                    """A kernel object of attention.py through its interface, as attend calls it: forward(q, part)
                    -> (o, lse); backward(do, q, lse, delta, part, o=o) with delta = rowsum(dO * O). SDPAKernel
                    gathers the part's pages in each call: the gather is in the times."""
                    part = Part(k_pages, v_pages, dk_pages, dv_pages, table, q_start)
                    out = {}
                    if "o" in ref:
                        o, lse = kernel.forward(qc, part)
                        out["o_rel_err"] = r(rel_err(o, ref["o"][:, q_start:]), 6)
                        if config == "full" and "dq" in ref:
                            dk_pages.zero_(), dv_pages.zero_()
                            dq = kernel.backward(doc, qc, lse, delta_for(kernel, doc, o), part, o=o)
                            out.update(grad_errs(dq, dk_pages, dv_pages, table))
                        del o, lse

                    def fwd():
                        return kernel.forward(qc, part)

                    def fwd_bwd():
                        o, lse = kernel.forward(qc, part)
                        return kernel.backward(doc, qc, lse, delta_for(kernel, doc, o), part, o=o)

                    out.update(time_fwd_bwd(fwd, fwd_bwd, flops))
                    if args.profile and device.type == "cuda":  # where a short history's fixed costs go
                        profile_once(fwd_bwd, device, args.profile, f"{type(kernel).__name__} {config} T {T}")
                    return out

                for name in args.kernels:
                    record = dict(base, impl=KERNEL_IMPL[name], config=config, q_len=C, page_size=page_size)
                    rec.emit(run_point(record, lambda: kernel_body(make_kernel(name)), device))
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

    def offloaded(grad_dtype, kernel=None):
        return OffloadedKVStore.for_sequence(model, B, T, page_size, bf16, device, cache_tokens=max(args.chunk, 8192),
                                             grad_dtype=grad_dtype, kernel=kernel)

    sdpa = named_kernel("sdpa", device)

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
        # --attn-kernel sdpa (kernels/gather_sdpa.py): pages on the device, then offloaded
        "chunked_bf16_sdpa": lambda: chunked_step(model, idx, tgt, args.chunk, page_size, bf16, store=PagedKVStore.
                                                  for_sequence(model, B, T, page_size, bf16, device, kernel=sdpa)),
        "offload_bf16_sdpa": lambda: chunked_step(model, idx, tgt, args.chunk, page_size, bf16,
                                                  store=offloaded(torch.float32, sdpa)),
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
    flatter no summary and mislead), the chunked sparse gradient for each selection rule (--rule), query block and
    budget vs the dense chunked one (exact), both with bf16 compute: cosine similarity and relative error of all
    parameters as one vector, the worst parameter, and the loss. Batches come from the validation split."""
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    model = Model(ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device)
    named = list(model.named_parameters())
    data = TokenData(args.data)
    base = dict(mode="fidelity", ckpt=args.ckpt, trained_steps=ckpt["step"], seq=args.seq, chunk=args.chunk,
                page_size=args.page_size, batch=args.batch)
    print(f"fidelity: {model.num_params() / 1e6:.1f}M params trained {ckpt['step']} steps, seq {args.seq}, "
          f"chunk {args.chunk}, budgets {args.budgets}, rules {args.rule}", flush=True)

    def grads_of(budget, q_block=None, rule=None):
        """[per batch: (loss, flat fp32 gradient)] of the chunked step, dense if budget is None."""
        out = []
        for i in range(args.batches):
            batch = data.batch("val", args.batch, args.seq, seed=10_000 + i).to(device)
            x, y = batch.x, batch.y
            store = PagedKVStore.for_sequence(model, args.batch, args.seq, args.page_size, torch.bfloat16, device,
                                              sparse=SparseConfig(budget, q_block, rule=rule) if budget else None)
            model.zero_grad(set_to_none=True)
            loss = chunked_step(model, x, y, args.chunk, args.page_size, torch.bfloat16, store=store)
            out.append((loss, [p.grad.detach().clone() for _, p in named]))
            del store
        return out

    dense = grads_of(None)
    for name, q_block, budget in [(n, q, b) for n in args.rule for q in args.q_blocks for b in args.budgets]:
        def body():
            sparse = grads_of(budget, q_block, RULES[name]())
            cmps = [compare_grads(g_s, g_d, [n for n, _ in named]) for (_, g_d), (_, g_s) in zip(dense, sparse)]
            worst = max(cmps, key=lambda c: c["worst_param_rel_err"])
            return dict(grad_cosine=r(statistics.mean(c["cosine"] for c in cmps), 6),
                        grad_rel_err=r(statistics.mean(c["rel_err"] for c in cmps)),
                        loss_dense=r(statistics.mean(l for l, _ in dense), 5),
                        loss_diff=r(statistics.mean(l_s - l_d for (l_d, _), (l_s, _) in zip(dense, sparse)), 6),
                        worst_param=worst["worst_param"], worst_param_rel_err=r(worst["worst_param_rel_err"]))
        point = dict(base, rule=name, budget=budget, q_block=q_block, history_fraction=r(budget / args.seq))
        rec.emit(run_point(point, body, device))
    del model, named, dense
    free_memory(device)


