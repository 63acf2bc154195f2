"""
Train a Qwen2-style model on long sequences.

    python train.py                                   # default byte-level model on the embedded corpus
    python train.py --model qwen2.5-0.5b --init-from /path/to/Qwen2.5-0.5B --data tokens.bin --seq 32768

Every step's batch is drawn from (seed, step) alone and the LR schedule is a function of the step, so --resume
continues with exactly the losses an uninterrupted run would have printed. Ctrl-C finishes the current step, saves
a checkpoint and exits; a second Ctrl-C aborts at once. Every bad input (arguments, --data, --out, a checkpoint) ends
in one line starting `error:` and exit status 2 before any work starts, leaving an existing run in --out untouched.
"""

import sys

import cli

if __name__ == "__main__":
    # The command line, --out and --data are checked before the imports below, which take seconds (torch, triton):
    # --help and every bad argument answer at once. main() continues with what was checked.
    PREPARED = cli.prepare_or_exit(description=__doc__)

import copy
import json
import math
import os
import resource
import signal
import time

import numpy as np
import torch
from tqdm import tqdm

import finetune
import optim
import parallel
import plan as planner
import plan_auto
import plan_suggest
import plots
from attention import named_kernel
from checkpoint import load_checkpoint, open_log, resume_settings, save_checkpoint
from chunk_train import chunked_step
from context_parallel import ShardedKVStore
from cli import UserError, chunked
from evaluation import evaluate
from model import Model, ModelConfig, preset, trained_tokens
from offload import OffloadedKVStore
from paged_kv import PagedKVStore
from optim import MixedPrecisionAdamW
from plan import DTYPES
from precision import fp32_gradients, low_precision_params

def model_config(args, ckpt) -> ModelConfig:
    """The run's model shape: the checkpoint's, the HF directory's, or the preset's."""
    if ckpt is not None:
        return ckpt["config"]
    if args.init_from:
        try:
            return ModelConfig.from_pretrained(args.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--init-from: {e}") from None
    return preset(args.model)


def build_model(args, cfg, ckpt, device) -> Model:
    """The model of shape `cfg` (from model_config) with its weights: the checkpoint's, the HF directory's (a LoRA
    checkpoint's adapters over it), or a seeded random init. Built on `device` in --params-dtype: no fp32 copy of
    the model in host memory (30 GB for 7B)."""
    dtype = DTYPES[args.params_dtype]
    if args.init_from and (ckpt is None or ckpt.get("adapters_only")):
        try:
            model = Model.from_pretrained(args.init_from, dtype=dtype, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--init-from: {e}") from None
        model = finetune.attach_lora(model, vars(args), args.seed)
        if ckpt is not None:
            finetune.load_adapters(model, ckpt["model"], "checkpoint")
        return model
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it trains (seeded: the same weights on every run)
        model = Model(cfg)
    model = finetune.attach_lora(model.to(dtype), vars(args), args.seed)
    if ckpt is not None:
        finetune.load_weights(model, ckpt["model"], "checkpoint")
    return model


def build_optimizer(args, model, device, layout=None):
    # only what trains (LoRA: the adapters); no weight decay on biases and norm weights. Under --tp, Adafactor's
    # statistics span the shards (layout.build_adafactor); AdamW's are elementwise
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if low_precision_params(model):  # bf16 weights: fp32 masters, moments as --moments
        return MixedPrecisionAdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, moments=args.moments,
                                   seed=args.seed)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    if layout and layout.tp > 1:
        return layout.build_adafactor(groups, model, args.lr)
    return torch.optim.Adafactor(groups, lr=args.lr)


def build_store(args, model, plan, device, layout=None):
    """The chunked path's KV/dKV pages (None on the full-sequence path), allocated once and reused by every step:
    in device memory, or offloaded to (pinned) host memory behind a page cache, as the plan decided; with context
    parallelism (layout.cp > 1) this rank's share of the chunks."""
    if not chunked(args):
        return None
    kv_dtype, grad_dtype = DTYPES[args.dtype], DTYPES[args.grad_pages]
    sparse = planner.sparse_config(args, plan.q_block) if args.sparse else None
    kernel = named_kernel(args.attn_kernel, device)
    if layout and layout.cp > 1:
        return ShardedKVStore.for_sequence(model, args.batch, args.seq, args.chunk, args.page_size, kv_dtype, device,
                                           layout.cp_group, grad_dtype, kernel=kernel, sparse=sparse)
    if plan.offload:
        return OffloadedKVStore.for_sequence(model, args.batch, args.seq, args.page_size, kv_dtype, device,
                                             args.cache_tokens, grad_dtype, sparse=sparse, kernel=kernel)
    return PagedKVStore.for_sequence(model, args.batch, args.seq, args.page_size, kv_dtype, device, grad_dtype,
                                     sparse=sparse, output_cache_bytes=plan.device.get(planner.OUTPUT_CACHE, 0),
                                     kernel=kernel)


def lr_at(step, args):
    """Linear warm-up, then cosine decay from lr to min_lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------ steps


def autocast(args, device):
    enabled = DTYPES[args.dtype] != DTYPES[args.params_dtype]
    return torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=enabled)


def train_step(model, x, y, args, device, store, doc_start=None, mlp_cache_bytes=0) -> float:
    """Forward + backward of one batch (doc_start: packed documents, data.Batch); leaves the gradient of the mean
    loss over the trained tokens in param.grad (bf16 weights: in fp32 param.main_grad, precision.fp32_gradients).
    mlp_cache_bytes: the chunked path's stage-1 MLP outputs kept for stage 2 (the plan's MLP_CACHE)."""
    with fp32_gradients(model):
        if chunked(args):
            return chunked_step(model, x, y, args.chunk, args.page_size, DTYPES[args.dtype], store=store,
                                progress=args.seq >= 8 * args.chunk, doc_start=doc_start,
                                keep_activations=args.keep_activations, mlp_cache_bytes=mlp_cache_bytes)
        with autocast(args, device):
            hidden = model.hidden(x, doc_start=doc_start)
            scale = 1.0 / max(trained_tokens(y), 1)
            loss, dx = model.loss(hidden, y, scale=scale, backward=True)  # the head's backward, sliced
        hidden.backward(dx)
        return loss.item()


def peak_memory_gib(device) -> float:
    """Peak GPU memory allocated by tensors since the last reset, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def peak_rss_gib() -> float:
    """The process's peak resident set so far (host memory; pinned pages count once touched)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------------------------------------ main


class StopRequest:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one aborts immediately."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self.previous)
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort without saving)")

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


def start_lines(args, cfg, model, data, plan, memory, device, start) -> list[str]:
    """What the run is about to do, every setting that shapes it named (defaults included)."""
    name = f"{args.out}/ckpt.pt" if args.resume else (args.init_from or args.model)
    device_tier, host_tier = memory.tiers
    weights = (f"bf16 (fp32 main_grad and masters; --moments {args.moments}: {args.moments_why})"
               if low_precision_params(model) else args.params_dtype.replace("float32", "fp32").replace(
                   "bfloat16", "bf16"))
    if chunked(args):
        where = f"in {host_tier} memory (offloaded)" if plan.offload else f"on the {device_tier}"
        attention = (f"sparse attention, {args.budget} history tokens per {plan.q_block}-query block"
                     if args.sparse else "dense exact attention")
        path = (f"chunked: {args.chunk}-token chunks, {args.page_size}-token KV pages {where} (--offload "
                f"{args.offload}), dK/dV pages {args.grad_pages}, {attention} (--attn {args.attn}, --attn-kernel "
                f"{args.attn_kernel})")
    else:
        path = f"full-sequence (--seq <= --chunk {args.chunk})"
    return [
        f"model: {name}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {model.num_params() / 1e6:.1f}M "
        f"params | data: {data_line(args, data)}",
        f"run: seq {args.seq} x batch {args.batch} | {path} | {args.dtype} compute, {weights} weights on {device} | "
        f"memory: {planner.summary(plan, memory)} (--plan for the parts)"
        + (f" | chosen by the plan: {'; '.join(args.precision_why)}" if args.precision_why else ""),
        f"optimizer: {args.optimizer}, lr {args.lr:g}{f' ({args.lr_why})' if getattr(args, 'lr_why', None) else ''}"
        f" -> {args.min_lr:g} (warm-up {args.warmup}, cosine to step "
        f"{args.steps}), weight decay {args.weight_decay:g}, grad clip {args.grad_clip:g} | seed {args.seed} | "
        f"out: {args.out} | "
        + (f"eval every {args.eval_interval} steps x {args.eval_iters} batches" if args.eval_iters else "no eval")
        + f" | checkpoints: --save {args.save}"
        + (f" | resuming at step {start}" if start else "")
        + (f" | LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}, {','.join(args.lora_targets)} "
           f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable, base frozen)"
           if args.lora_rank else ""),
    ]


def data_line(args, data) -> str:
    """--data, its documents and how sequences are made of them, and what is evaluated."""
    train, val = data.splits["train"], data.splits["val"]
    line = f"{data.path}, {len(train):,} train tokens, vocab {data.vocab_size}"
    if train.n_docs > 1 and args.documents == "single":
        line += (f", {train.n_docs:,} documents (--documents single: {data.usable_docs('train', args.seq):,} hold "
                 f"--seq {args.seq} + 1 tokens, shorter ones skipped)")
    elif train.n_docs > 1:
        line += f", {train.n_docs:,} documents (--documents pack: attention and positions restart at each)"
    if train.loss_mask is not None:
        line += f", loss on {int(train.loss_mask.sum()):,} tokens (prompts masked)"
    seq = min(args.seq, data.max_window("val"))
    held = f"--eval-data {val.path}" if args.eval_data else "the last 10%"
    return line + f" | eval: {held}, {len(val):,} tokens, at seq {seq}, loss by position (log2 buckets)"


def check_device(device):
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def plan_and_choose(cfg, args, memory):
    """plan_auto.plan_auto, its choices (--params-dtype, --moments, --grad-pages, --attn-kernel, --keep-activations)
    written into args (so that the checkpoint records them and --resume keeps them); for a refused plan also the
    suggestions, re-planned from the settings as given. Returns (plan, suggestions)."""
    given = copy.copy(args)
    plan, chosen = plan_auto.plan_auto(cfg, args, memory)
    for name in ("params_dtype", "moments", "grad_pages", "attn_kernel", "keep_activations", "moments_why",
                 "precision_why"):
        setattr(args, name, getattr(chosen, name))
    return plan, ([] if plan.fits else plan_suggest.suggest(cfg, given, memory, plan))


def run(args, data):
    """Everything after cli.prepare: the checks that need the model's shape, the plan, then training."""
    if args.export_only is not None:
        print(f"exported {finetune.export_checkpoint(args.export_only, load_checkpoint)}")
        return 0
    device = torch.device(args.device)
    check_device(device)
    layout = parallel.from_env(args.tp, device, args.cp)  # None: one process, no torchrun
    try:
        status = run_rank(args, data, layout.device if layout else device, layout)
        if layout:
            layout.barrier()  # every rank done (rank 0's checkpoint written) before any leaves
        return status
    finally:
        if layout:
            layout.close()


def run_rank(args, data, device, layout):
    """run() on `device`, as one rank of `layout` (parallel.py) or alone (None)."""
    main = layout is None or layout.main
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    if ckpt is not None:  # the checkpoint's schedule, unless given now (cli.resolve)
        for name in ("lr", "min_lr"):
            if not getattr(args, f"{name}_given", True) and isinstance(ckpt["args"].get(name), float):
                setattr(args, name, ckpt["args"][name])
        if not getattr(args, "lr_given", True):
            args.lr_why = "the checkpoint's"
        if args.min_lr > args.lr:
            raise UserError(f"--min-lr {args.min_lr:g} must not exceed the checkpoint's lr {args.lr:g}")
    if ckpt is not None and ckpt["args"].get("optimizer", args.optimizer) != args.optimizer:
        raise UserError(f"--optimizer {args.optimizer}, but {ckpt_path} was trained with "
                        f"{ckpt['args']['optimizer']}: resume with the same optimizer")
    if ckpt is not None:
        resume_settings(args, ckpt, ckpt_path)
    cfg = model_config(args, ckpt)
    if ckpt is not None and args.model and preset(args.model) != cfg:
        raise UserError(f"--model {args.model}, but {ckpt_path} holds a different model ({cfg.num_hidden_layers} "
                        f"layers, hidden {cfg.hidden_size}): resume without --model or with its own")
    if data.vocab_size > cfg.vocab_size:
        raise UserError(f"data {data.path} has vocab_size {data.vocab_size}, the model only {cfg.vocab_size}")
    parallel.check(layout, cfg, args)
    memory = planner.measure(device, args.host_memory)
    if layout:  # the same choices on every rank
        memory = layout.least_memory(memory)
    plan, suggestions = plan_and_choose(cfg, args, memory)  # before anything is allocated on the device
    if layout:  # one rank's share: its pages (1 / cp) and its tensor-parallel share of the weights and state
        plan = layout.rank_plan(plan, cfg, args, memory)
    if args.plan:
        moments = [f"AdamW moments: {args.moments} ({args.moments_why})"] if args.moments_why else []
        if main:  # with several processes: one rank's share (parallel.Layout.rank_plan)
            chosen = [f"chosen by the plan: {'; '.join(args.precision_why)}"] if args.precision_why else []
            lines = moments + chosen + planner.describe(plan, memory, args) + ([layout.describe()] if layout else [])
            if suggestions:
                lines += ["what would fit (each re-planned):"] + [f"  {s.line(memory)}" for s in suggestions]
            print("\n".join(lines))
        return 0
    if ckpt is not None and ckpt["step"] >= args.steps:
        print(f"{ckpt_path} is at step {ckpt['step']}, --steps is {args.steps}: the run is finished, nothing to "
              f"train (raise --steps to continue it)")
        return 0
    if not plan.fits:
        path = f"chunked path (chunk {args.chunk})" if chunked(args) else "full-sequence path"
        best = (f"; try {suggestions[0].line(memory)}" if suggestions and suggestions[0].plan.fits else "")
        raise UserError(f"{plan.refusal} ({path}){best} (--plan for the parts and every suggestion)")
    args.q_block = plan.q_block  # chosen with the offload decision; recorded in the checkpoint's args

    model = build_model(args, cfg, ckpt, device)
    if layout:
        layout.shard(model)  # this rank's heads and MLP columns; the optimizer and the pages see only them
    optimizer = build_optimizer(args, model, device, layout)
    store = build_store(args, model, plan, device, layout)
    start = 0
    if ckpt is not None:
        if layout:
            layout.load_optimizer_state(optimizer, model, ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        del ckpt
    elif os.path.exists(ckpt_path) and main:  # only with --overwrite (cli.prepare_out): the old run goes now
        os.remove(ckpt_path)
    for line in start_lines(args, cfg, model, data, plan, memory, device, start) if main else ():
        tqdm.write(line)
    if layout and main:
        tqdm.write(layout.describe())

    stop = StopRequest()
    log = open_log(log_path, start) if main else open(os.devnull, "w")
    dp = layout.dp if layout else 1  # each data-parallel rank trains on --batch sequences of a global batch
    tokens_per_step, step, rates, loss, val_loss = args.seq * args.batch * dp, start, [], float("nan"), None
    mem_label = "mem" if device.type == "cuda" else "rss"  # allocated tensors on a GPU; the whole process on a CPU
    saves = args.save != "never"
    # a single-device model's down projections (tensor parallelism wraps them; context parallelism splits the chunks)
    mlp_cache_bytes = 0 if layout else plan.device.get(planner.MLP_CACHE, 0)
    plotted = time.time()  # OUT/*.png (plots.py): at an evaluation PLOT_EVERY_S after the last, and at the end
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", dynamic_ncols=True,
               disable=not main)
    try:
        for step in bar:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            batch = data.batch("train", args.batch * dp, args.seq, seed=[args.seed, 0, step])
            if layout:
                batch = layout.local_batch(batch)
            batch = batch.to(device)
            loss = train_step(model, batch.x, batch.y, args, device, store, batch.doc_start, mlp_cache_bytes)
            if layout:  # once per step, after every chunk's backward
                layout.reduce_gradients(model)
                loss = layout.mean(loss)
            if args.grad_clip > 0 and layout:
                layout.clip_grad_norm_(model, args.grad_clip)  # the whole model's norm, as one GPU's
            elif args.grad_clip > 0 and isinstance(optimizer, MixedPrecisionAdamW):
                optim.clip_grad_norm_(model.parameters(), args.grad_clip)  # main_grad
            elif args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            rates.append(tokens_per_step / dt)
            peak = peak_memory_gib(device)
            # step_s, peak GPU memory (peak_mem_gib: the process's RSS on a CPU) and peak host RSS, to compare with
            # the plan's totals
            record = {"step": step + 1, "loss": loss, "lr": lr_at(step, args), "tokens_per_s": rates[-1],
                      "step_s": dt, "peak_mem_gib": peak, "peak_host_rss_gib": peak_rss_gib()}
            last = step + 1 == args.steps
            if (step + 1) % args.eval_interval == 0 or last:
                if args.eval_iters:
                    result = evaluate(model, data, args, device, store)
                    val_loss = result.loss
                    record.update(result.record())
                if args.save == "eval" or (args.save == "end" and last):
                    save_checkpoint(ckpt_path, model, optimizer, step + 1, args, layout)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if main and "val_loss" in record and (last or time.time() - plotted >= plots.PLOT_EVERY_S):
                plots.write_plots(args.out)
                plotted = time.time()
            bar.set_postfix({"loss": f"{loss:.4f}", "tok/s": f"{rates[-1]:,.0f}", mem_label: f"{peak:.1f}G",
                             **({"host": f"{record['peak_host_rss_gib']:.1f}G"} if device.type == "cuda" else {})})
            if (layout.any(stop.requested) if layout else stop.requested):
                if saves:
                    save_checkpoint(ckpt_path, model, optimizer, step + 1, args, layout)
                bar.close()
                if main:
                    print(f"stopped after step {step + 1}; " + (f"checkpoint saved to {ckpt_path} (continue with "
                                                               f"--resume)" if saves else "no checkpoint (--save never)"))
                return 130
    finally:
        stop.restore()
        log.close()
    bar.close()
    if not main:
        return 0
    # the loop ran at least once (a finished run returned above) and its last step evaluated
    print(f"done: {args.steps} steps | final loss {loss:.4f} | "
          + (f"val loss {val_loss:.4f} | " if val_loss is not None else "")
          + f"{float(np.median(rates)):,.0f} tok/s (median) | "
          + (f"checkpoint {ckpt_path}" if saves else "no checkpoint (--save never)"))
    if args.export and layout:  # the model here is this rank's share; the checkpoint holds it whole
        print(f"exported {finetune.export_checkpoint(args.out, load_checkpoint)}")
    elif args.export:
        print(f"exported {finetune.export_run(model, args.out, args.init_from)}")
    return 0


def main(argv=None, prepared=None):
    """The front door: `prepared` is cli.prepare's result when the module's entry block already made it."""
    try:
        return run(*(prepared or cli.prepare(argv, description=__doc__)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory ({str(e).splitlines()[0]}); try a shorter --seq or a smaller --batch",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(prepared=PREPARED))
