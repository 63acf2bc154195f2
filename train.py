"""
Train a Qwen2-style model on long sequences.

    python train.py                                   # default byte-level model on the embedded corpus
    python train.py --model qwen2.5-0.5b --init-from /path/to/Qwen2.5-0.5B --data tokens.bin --seq 32768

Every step's batch is drawn from (seed, step) alone and the LR schedule is a function of the step, so --resume
continues with exactly the losses an uninterrupted run would have printed. Ctrl-C finishes the current step, saves
a checkpoint and exits; a second Ctrl-C aborts at once.
"""

import argparse
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from chunk_train import chunked_loss, chunked_step
from data import TokenData
from offload import OffloadedKVStore
from paged_kv import PagedKVStore
from sparse_attn import RULES, PageSelector, SparseConfig
from model import LOSS_SLICE_LOGITS, PRESETS, Model, ModelConfig, preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class UserError(Exception):
    """Bad input: reported as one line and a non-zero exit, never a traceback."""


# ------------------------------------------------------------------------------------------------ arguments


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block first
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 1024 on GPU, 256 on CPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per step (default: 16K tokens per step on GPU, 1K on CPU, at least 1 sequence)")
    p.add_argument("--chunk", type=int, default=4096,
                   help="a --seq longer than this trains chunk-recurrently (chunk_train.py) in chunks of this size")
    p.add_argument("--page-size", type=int, default=64, help="tokens per KV page of the chunked path")
    p.add_argument("--offload", default="auto", choices=["auto", "on", "off"],
                   help="keep the chunked path's KV/dKV pages in pinned host memory (offload.py); auto: only when "
                        "they do not fit on the GPU")
    p.add_argument("--cache-tokens", type=int, default=65536,
                   help="with offload: tokens per GPU cache buffer (three buffers; history streams through them)")
    p.add_argument("--grad-pages", default="float32", choices=list(DTYPES),
                   help="dtype of the dK/dV pages (bfloat16 halves them; each chunk's sum is still formed in fp32)")
    p.add_argument("--attn", default="auto", choices=["auto", "dense", "sparse"],
                   help="attention of the chunked path: dense (exact) or page-level sparse (sparse_attn.py: each "
                        "--q-block of queries reads --budget history tokens + its chunk); auto: sparse when --seq > 16 x "
                        "--budget")
    p.add_argument("--q-block", type=int, default=None,
                   help="sparse attention: queries that share one selection of pages (per kv head). Default 128, "
                        "or with offload the chunk (a power of two), which moves ~5x fewer pages at about the same "
                        "gradient fidelity (bench/RESULTS.md)")
    p.add_argument("--budget", type=int, default=4096,
                   help="sparse attention: history tokens per query block (sink, recent and top-scoring pages)")
    p.add_argument("--select", default="meankey", choices=list(RULES),
                   help="sparse attention: how pages are scored (sparse_attn.py: mean key, or Quest's key bound)")
    p.add_argument("--host-memory", type=float, default=None,
                   help="GiB of host memory the run may pin (default: MemAvailable)")
    p.add_argument("--model", default=None, choices=list(PRESETS),
                   help="model preset (default: 'small' on GPU, 'tiny' on CPU); ignored with --init-from/--resume")
    p.add_argument("--init-from", default=None, help="Hugging Face checkpoint directory to start from")
    p.add_argument("--data", default=None, help="FILE.txt (bytes) or FILE.bin (+FILE.bin.json); default: embedded")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: 1000 on GPU, 150 on CPU, fewer for long sequences: ~16M tokens "
                        "on GPU, at least 10 steps)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: steps / 20)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"],
                   help="adamw, or adafactor: factored second moments, no first moment (memory-lean)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="compute dtype (default bfloat16 on GPU); weights and gradients stay fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="out", help="directory for ckpt.pt and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--plan", action="store_true", help="print the memory plan of the run and exit")
    p.add_argument("--eval-interval", type=int, default=None, help="evaluate/save every N steps (default steps/10)")
    p.add_argument("--eval-iters", type=int, default=None,
                   help="validation batches per evaluation (default: 10, fewer for very long sequences)")
    return p.parse_args(argv)


def resolve_defaults(args):
    """Fill device-dependent defaults and validate, raising UserError with one clear line."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} asked for, but CUDA is not available on this machine")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    gpu = args.device.startswith("cuda")
    args.model = args.model or ("small" if gpu else "tiny")
    args.seq = args.seq if args.seq is not None else (1024 if gpu else 256)
    if args.seq <= 0:  # before the batch default divides by it
        raise UserError(f"--seq must be > 0, got {args.seq}")
    args.batch = args.batch if args.batch is not None else max(1, (16384 if gpu else 1024) // args.seq)
    # long sequences: about as many tokens as the short default run, so that it finishes in minutes
    default_steps = max(10, min(1000 if gpu else 150, (2**24 if gpu else 2**18) // (args.seq * args.batch)))
    args.steps = args.steps if args.steps is not None else default_steps
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    for name in ("batch", "steps", "chunk", "page_size", "cache_tokens", "budget"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.seq > args.chunk and args.chunk % args.page_size:
        raise UserError(f"--chunk {args.chunk} must be a multiple of --page-size {args.page_size}")
    if args.seq > args.chunk and args.offload != "off" and args.cache_tokens < args.chunk:
        raise UserError(f"--cache-tokens {args.cache_tokens} must be >= --chunk {args.chunk} (the backward loads a "
                        f"chunk's gradient pages into one cache buffer)")
    args.sparse = chunked(args) and (args.attn == "sparse" or (args.attn == "auto" and args.seq > 16 * args.budget))
    if args.attn == "sparse" and not chunked(args):
        raise UserError(f"--attn sparse works on the chunked path: --seq ({args.seq}) must exceed --chunk "
                        f"({args.chunk})")
    if args.sparse and (args.budget % args.page_size or args.budget < 2 * args.page_size):
        raise UserError(f"--budget {args.budget} must be a multiple of --page-size {args.page_size}, at least two "
                        f"pages (the sink and the most recent page)")
    args.q_block_given = args.q_block is not None  # else chosen with the offload decision (plan_run)
    args.q_block = args.q_block if args.q_block_given else 128
    if args.sparse and (args.q_block & (args.q_block - 1) or args.q_block < 16):
        raise UserError(f"--q-block must be a power of two >= 16, got {args.q_block}")
    if args.host_memory is not None and args.host_memory <= 0:
        raise UserError(f"--host-memory must be > 0 GiB, got {args.host_memory}")
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    args.min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    args.eval_interval = args.eval_interval or max(1, args.steps // 10)
    # an evaluation costs about a quarter of a training step per batch: keep it to ~1M tokens at long lengths
    args.eval_iters = args.eval_iters or max(1, min(10, 2**20 // (args.seq * args.batch)))
    return args


# ------------------------------------------------------------------------------------------------ memory


def available_memory(device) -> int:
    """Bytes the run may use: free GPU memory, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def host_memory(args) -> int:
    """Bytes of host memory the run may pin: --host-memory, or MemAvailable. (On machines whose memory grows as it
    is used, MemAvailable starts low: pass --host-memory there.)"""
    if args.host_memory is not None:
        return int(args.host_memory * 2**30)
    return available_memory(torch.device("cpu"))


def param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return Model(cfg).num_params()


def peak_memory_gib(device) -> float:
    """Peak GPU memory allocated by tensors since the last reset, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def chunked(args) -> bool:
    return args.seq > args.chunk


def sparse_config(args) -> SparseConfig:
    return SparseConfig(budget=args.budget, q_block=args.q_block, rule=RULES[args.select]())


def memory_plan(cfg: ModelConfig, args, offload=False):
    """-> (plan, per_token): plan = {"gpu": {part: bytes}, "host": {part: bytes}}, an estimate made before anything is
    allocated; per_token = {"gpu": bytes, "host": bytes} each extra token of --seq adds there.
    Activations saved for backward, per token and layer (test_layer_saves_only_what_backward_needs pins these): the
    two norm inputs in the residual stream's dtype (fp32: the weights are fp32), the two normalised inputs, q and the
    attention output, gate and up in the compute dtype (+ k and v on the full-sequence path, whose SDPA saves them);
    plus one layer's backward temporaries (about 6 x intermediate) and one slice of logits of Model.loss.
    Full-sequence path: activations grow with --seq. Chunked path: one chunk's activations, and the KV/dKV pages
    grow with --seq: on the GPU, or with offload in pinned host memory behind a fixed GPU page cache. check_fits
    keeps a 10% margin."""
    n, compute_bytes = param_count(cfg), DTYPES[args.dtype].itemsize
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    layer = 2 * 4 * cfg.hidden_size + compute_bytes * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) + 8
    if not chunked(args):
        layer += compute_bytes * 2 * kv_dim
    backward_temporaries = 6 * compute_bytes * cfg.intermediate_size
    activations_per_token = (cfg.num_hidden_layers * layer + backward_temporaries) * args.batch
    tokens = args.batch * (args.chunk if chunked(args) else args.seq)
    # logits, their fp32 copy, log-softmax, fp32 and compute-dtype gradients
    loss_slice = min(LOSS_SLICE_LOGITS, tokens * cfg.vocab_size) * (2 * compute_bytes + 12)
    gpu = {"weights (fp32)": 4 * n, "gradients (fp32)": 4 * n,
           # adafactor keeps row/column factors only: tiny next to AdamW's two fp32 moments
           f"optimizer ({args.optimizer})": {"adamw": 8 * n, "adafactor": 4 * n // 64}[args.optimizer]}
    host = {}
    if not chunked(args):
        gpu[f"activations ({args.seq} tokens)"] = activations_per_token * args.seq
        gpu["loss slice"] = loss_slice
        return {"gpu": gpu, "host": host}, {"gpu": activations_per_token, "host": 0}
    kv_dtype, grad_dtype = DTYPES[args.dtype], DTYPES[args.grad_pages]
    pool_per_token = PagedKVStore.bytes_per_token(cfg, kv_dtype, grad_dtype) * args.batch
    gpu[f"activations (one {args.chunk}-token chunk)"] = activations_per_token * args.chunk
    gpu["loss slice"] = loss_slice
    index_gpu = index_host = 0
    if args.sparse:  # page summaries and stored selections, proportional to the length
        summaries, selections, tables = PageSelector.index_bytes(cfg, args.batch, args.seq, args.chunk,
                                                                 args.page_size, kv_dtype, sparse_config(args))
        index_gpu, index_host = (summaries, selections) if offload else (summaries + selections + tables, 0)
        gpu["sparse index (page summaries" + (")" if offload else ", selections)")] = index_gpu
        if offload:
            host["sparse index (selections)"] = index_host
    index_gpu, index_host = math.ceil(index_gpu / args.seq), math.ceil(index_host / args.seq)  # per token
    if not offload:
        gpu["KV/dKV page pool"] = pool_per_token * args.seq
        return {"gpu": gpu, "host": host}, {"gpu": pool_per_token + index_gpu, "host": 0}
    gpu[f"KV/dKV page cache (3 x {args.cache_tokens} tokens)"] = OffloadedKVStore.cache_bytes(
        cfg, args.batch, args.page_size, args.cache_tokens, kv_dtype, grad_dtype)
    host["KV/dKV pages (pinned)"] = pool_per_token * args.seq
    return {"gpu": gpu, "host": host}, {"gpu": index_gpu, "host": pool_per_token + index_host}


def shortfall(plan, per_token, args, device):
    """None if the plan fits in 90% of what the GPU (device) and the host have, else a one-line reason naming the
    longest --seq that would fit."""
    for where, have in (("gpu", available_memory(device)), ("host", host_memory(args))):
        need, have = sum(plan[where].values()), int(0.9 * have)
        if need > have:
            grows = per_token[where]
            longest = max(0, (have - (need - grows * args.seq)) // grows) if grows else 0
            name = str(device) if where == "gpu" else "the host"
            return (f"--seq {args.seq} x --batch {args.batch} needs ~{need / 2**30:.1f} GiB on {name}, "
                    f"{have / 2**30:.1f} GiB is available: the longest --seq that fits is ~{longest}")
    return None


OUTPUT_CACHE = "attention outputs kept for stage 2"


def plan_run(cfg, args, device):
    """-> (plan, per_token, offload). --offload auto offloads the chunked path's pages only when the in-GPU pool
    does not fit."""
    offload = chunked(args) and args.offload == "on"
    if chunked(args) and args.offload == "auto":
        offload = shortfall(*memory_plan(cfg, args, False), args, device) is not None
    if args.sparse and not args.q_block_given:  # offloaded, every selected page crosses PCIe: one choice a chunk
        args.q_block = 1 << (args.chunk.bit_length() - 1) if offload else 128
    plan, per_token = memory_plan(cfg, args, offload)
    if chunked(args) and not offload:
        # stage 1's attention outputs, kept for stage 2 (which then skips those forward kernels), in half of what
        # the plan leaves free: the last chunks first, whose attention over the longest history costs the most
        need = PagedKVStore.output_bytes_per_token(cfg, DTYPES[args.dtype]) * args.batch * (args.seq - args.chunk)
        spare = int(0.9 * available_memory(device)) - sum(plan["gpu"].values())
        plan["gpu"][OUTPUT_CACHE] = min(need, max(0, spare) // 2)
    return plan, per_token, offload


def check_fits(plan, per_token, args, device):
    """Refuse a run whose planned memory exceeds 90% of what the GPU or the host has."""
    reason = shortfall(plan, per_token, args, device)
    if reason:
        path = f"chunked path (chunk {args.chunk})" if chunked(args) else "full-sequence path"
        raise UserError(f"{reason} ({path})")


def print_plan(plan, args, device, offload):
    rows = [(f"{part} [{where}]", size) for where in ("gpu", "host") for part, size in plan[where].items()]
    width = max(len(name) for name, _ in rows)
    for name, size in rows:
        print(f"  {name:<{width}}  {size / 2**30:8.2f} GiB")
    print(f"  {'total on ' + str(device):<{width}}  {sum(plan['gpu'].values()) / 2**30:8.2f} GiB of "
          f"{available_memory(device) / 2**30:.1f} GiB available")
    if plan["host"]:
        print(f"  {'total pinned on the host':<{width}}  {sum(plan['host'].values()) / 2**30:8.2f} GiB of "
              f"{host_memory(args) / 2**30:.1f} GiB available")
    if chunked(args):
        print(f"  KV/dKV pages: {'offloaded to host memory' if offload else 'on the GPU'} (--offload {args.offload}); "
              f"attention: {'sparse' if args.sparse else 'dense'} (--attn {args.attn})")


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path, model, optimizer, step, args):
    """Atomic: write a temp file in the same directory, then rename over the old checkpoint."""
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": asdict(model.config), "args": vars(args)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def model_config(args, ckpt) -> ModelConfig:
    """The run's model shape: the checkpoint's, the HF directory's, or the preset's."""
    if ckpt is not None:
        return ModelConfig(**ckpt["config"])
    if args.init_from:
        try:
            return ModelConfig.from_pretrained(args.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--init-from: {e}") from None
    return preset(args.model)


def build_model(args, cfg, ckpt, device) -> Model:
    """The model of shape `cfg` (from model_config) with its weights: the checkpoint's, the HF directory's, or a
    seeded random init."""
    if args.init_from and ckpt is None:
        try:
            return Model.from_pretrained(args.init_from).to(device)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--init-from: {e}") from None
    torch.manual_seed(args.seed)
    model = Model(cfg)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint does not match its own config: {str(e).splitlines()[1].strip()}") from None
    return model.to(device)


def build_optimizer(args, model, device):
    # no weight decay on biases and norm weights
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    return torch.optim.Adafactor(groups, lr=args.lr)


def lr_at(step, args):
    """Linear warm-up, then cosine decay from lr to min_lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------ steps


def autocast(args, device):
    enabled = DTYPES[args.dtype] != torch.float32
    return torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=enabled)


def train_step(model, x, y, args, device, store) -> float:
    """Forward + backward of one batch; leaves the gradient of the mean token loss in param.grad."""
    if chunked(args):
        return chunked_step(model, x, y, args.chunk, args.page_size, DTYPES[args.dtype], store=store,
                            progress=args.seq >= 8 * args.chunk)
    with autocast(args, device):
        hidden = model.hidden(x)
        loss, dx = model.loss(hidden, y, scale=1.0 / y.numel(), backward=True)  # the head's backward, sliced
    hidden.backward(dx)
    return loss.item()


@torch.no_grad()
def evaluate(model, data, args, device, store) -> float:
    seq = min(args.seq, data.max_window("val"))
    losses = []
    for i in range(args.eval_iters):
        x, y = data.batch("val", args.batch, seq, seed=[args.seed, 1, i])
        x, y = x.to(device), y.to(device)
        if seq > args.chunk:
            losses.append(chunked_loss(model, x, y, args.chunk, args.page_size, DTYPES[args.dtype], store=store))
            continue
        with autocast(args, device):
            losses.append(model.loss(model.hidden(x), y, scale=1.0 / y.numel())[0].item())
    return float(np.mean(losses))


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


def run(args):
    args = resolve_defaults(args)
    device = torch.device(args.device)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")

    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    try:
        data = TokenData(args.data)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UserError(f"--data: {e}") from None
    cfg = model_config(args, ckpt)
    if data.vocab_size > cfg.vocab_size:
        raise UserError(f"data {data.path} has vocab_size {data.vocab_size}, the model only {cfg.vocab_size}")
    if args.seq > data.max_window("train"):
        raise UserError(f"--seq {args.seq} is longer than the training split of {data.path} "
                        f"({data.max_window('train')} tokens); use a shorter --seq or a larger --data")
    plan, per_token, offload = plan_run(cfg, args, device)  # before anything is allocated on the device
    if args.plan:
        print_plan(plan, args, device, offload)
        return 0
    check_fits(plan, per_token, args, device)
    model = build_model(args, cfg, ckpt, device)

    os.makedirs(args.out, exist_ok=True)
    optimizer = build_optimizer(args, model, device)
    # the chunked path's KV/dKV pages, allocated once and reused by every step
    store = None
    if chunked(args):
        kv_dtype, grad_dtype = DTYPES[args.dtype], DTYPES[args.grad_pages]
        sparse = sparse_config(args) if args.sparse else None
        if offload:
            store = OffloadedKVStore.for_sequence(model, args.batch, args.seq, args.page_size, kv_dtype, device,
                                                  args.cache_tokens, grad_dtype, sparse=sparse)
        else:
            store = PagedKVStore.for_sequence(model, args.batch, args.seq, args.page_size, kv_dtype, device,
                                              grad_dtype, sparse=sparse, output_cache_bytes=plan["gpu"][OUTPUT_CACHE])
    start = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        del ckpt
    attention = (f"sparse attention, {args.budget} history tokens per {args.q_block}-query block" if args.sparse
                 else "dense exact attention")
    path = (f"chunked: {args.chunk}-token chunks, {args.page_size}-token pages "
            f"{'offloaded to host memory' if offload else 'on the GPU'}, {attention} (--attn {args.attn})"
            if store else "full-sequence")
    tqdm.write(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {model.num_params() / 1e6:.1f}M "
               f"params | data: {data.path}, {len(data.splits['train']):,} train tokens | seq {args.seq} x batch "
               f"{args.batch} | {path} | {args.optimizer}, {args.dtype} on {device} | planned memory "
               f"{sum(plan['gpu'].values()) / 2**30:.1f} GiB"
               + (f" + {sum(plan['host'].values()) / 2**30:.1f} GiB pinned" if plan["host"] else "")
               + " (--plan for the parts)"
               + (f" | resuming at step {start}" if start else ""))

    stop = StopRequest()
    log = open(log_path, "a")
    tokens_per_step, step, rates, loss, val_loss = args.seq * args.batch, start, [], float("nan"), None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", dynamic_ncols=True)
    try:
        for step in bar:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            x, y = data.batch("train", args.batch, args.seq, seed=[args.seed, 0, step])
            loss = train_step(model, x.to(device), y.to(device), args, device, store)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            rates.append(tokens_per_step / dt)
            peak = peak_memory_gib(device)
            record = {"step": step + 1, "loss": loss, "lr": lr_at(step, args), "tokens_per_s": rates[-1],
                      "peak_mem_gib": peak}
            if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
                val_loss = record["val_loss"] = evaluate(model, data, args, device, store)
                save_checkpoint(ckpt_path, model, optimizer, step + 1, args)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rates[-1]:,.0f}", mem=f"{peak:.1f}G")
            if stop.requested:
                save_checkpoint(ckpt_path, model, optimizer, step + 1, args)
                bar.close()
                print(f"stopped after step {step + 1}; checkpoint saved to {ckpt_path} (continue with --resume)")
                return 130
    finally:
        stop.restore()
        log.close()
    bar.close()
    median_rate = float(np.median(rates)) if rates else float("nan")
    print(f"done: {args.steps} steps | final loss {loss:.4f} | val loss {val_loss if val_loss is None else round(val_loss, 4)} "
          f"| {median_rate:,.0f} tok/s (median) | checkpoint {ckpt_path}")
    return 0


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory ({str(e).splitlines()[0]}); try a shorter --seq or a smaller --batch",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
