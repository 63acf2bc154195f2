"""
The command line of train.py: its arguments and defaults, and every check that needs neither torch nor a model.

Nothing here imports torch, triton or numpy (data.py, opened last, brings numpy only), so `--help` and every bad
argument, data file or --out answer in a fraction of a second, before train.py's heavy imports; only `--device auto`
imports torch here, to ask whether there is a GPU. Every bad input raises UserError: one line, exit status 2.

    prepare(argv) -> Prepared(args, data)
        parse_args      argparse, defaults in --help
        check_values    each given number finite and in range; flags that exclude each other
        resolve         device-dependent defaults (GPU or CPU), then consistency with the path they select
        prepare_out     --out created and writable; an existing run is continued (--resume) or replaced (--overwrite)
        open_data       data.TokenData: file, sidecar and token ids checked
"""

import argparse
import math
import os
import sys
import tempfile
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # for the annotation only: data.py imports numpy
    from data import TokenData

# model.PRESETS' names, listed here so that parsing needs no torch (tests/test_cli.py checks that they agree)
MODEL_PRESETS = ("tiny", "small", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b")
SELECTION_RULES = ("meankey", "quest")  # sparse_attn.RULES, named here so that parsing needs no torch
DTYPE_NAMES = ("float32", "bfloat16")
RUN_FILES = ("ckpt.pt", "log.jsonl")  # what makes a directory hold a run
SAVE_CHOICES = ("eval", "end", "never")
# --attn auto picks sparse attention when --seq exceeds this many times --budget: shorter, the history a query block
# skips is too small a share of its chunk's attention for the selection's overhead to pay off
SPARSE_AUTO_RATIO = 16
# lora.LORA_TARGETS, named here so that parsing needs no torch (tests/test_cli.py checks that they agree)
DOCUMENT_MODES = ("pack", "single")  # data.DOCUMENT_MODES, named here so that parsing needs no numpy
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_PAGE_SIZE = 16  # the paged-attention kernels' smallest tile side (kernels/paged_attention.py)


class UserError(Exception):
    """Bad input: reported as one line starting `error:` and exit status 2, never a traceback."""


class Prepared(NamedTuple):
    args: argparse.Namespace  # every default filled in
    data: "TokenData"  # opened and checked


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block first
        raise UserError(f"{message} (see --help)")


def _count_or_auto(text: str):
    """--keep-activations: "auto" (the plan chooses) or a whole number (checked >= 0 by check_values)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def parse_args(argv=None, description=None) -> argparse.Namespace:
    """The arguments as given: a default that depends on the device (or on other arguments) stays None until
    `resolve` fills it, so that the checks can tell a value the user chose from one chosen for them."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--model", default=None, choices=MODEL_PRESETS,
                     help="model preset (default: 'small' on GPU, 'tiny' on CPU; with --resume the checkpoint's, "
                          "which a given --model must match)")
    run.add_argument("--init-from", default=None,
                     help="Hugging Face checkpoint directory to start from (default: a seeded random init); "
                          "--resume takes the checkpoint's weights instead")
    run.add_argument("--data", default=None,
                     help="FILE.bin (+FILE.bin.json), or a text file, a directory of text files or a .jsonl file "
                          "({'text'} or {'prompt', 'completion'} records): tokenized with the --init-from "
                          "checkpoint's tokenizer.json (cached as DATA.tokens.bin), or without one read as bytes "
                          "(a directory: one document per file) (default: the embedded corpus, this Python's "
                          "standard-library sources, bytes)")
    run.add_argument("--documents", default="pack", choices=DOCUMENT_MODES,
                     help="data with document boundaries: pack = windows of --seq over the concatenated documents, "
                          "attention and RoPE positions restarting at each document; single = the leading --seq "
                          "tokens of one document per sequence, shorter documents skipped (data.py) "
                          "(default: %(default)s)")
    run.add_argument("--eval-data", default=None,
                     help="held-out data (any --data format) evaluated at --seq, with the loss by position; "
                          "--data then trains whole (default: the last 10%% of --data)")
    run.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 1024 on GPU, 256 on CPU)")
    run.add_argument("--batch", type=int, default=None,
                     help="sequences per step (default: 16K tokens per step on GPU, 1K on CPU, at least 1)")
    run.add_argument("--steps", type=int, default=None,
                     help="optimizer steps (default: 1000 on GPU, 150 on CPU, fewer for long sequences: ~16M tokens "
                          "on GPU, ~256K on CPU, at least 10 steps)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    run.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                     help="compute dtype; weights and gradients stay fp32 (default: bfloat16 on GPU, float32 on CPU)")
    run.add_argument("--params-dtype", default="auto", choices=("auto",) + DTYPE_NAMES,
                     help="dtype of the weights: bfloat16 keeps fp32 gradients (main_grad) and fp32 master weights "
                          "in the optimizer (optim.MixedPrecisionAdamW; 7B at long context wants it) and needs "
                          "--dtype bfloat16 and AdamW; auto: float32 when the memory plan fits, else bfloat16 "
                          "(printed with the reason; resumed: the checkpoint's) (default: %(default)s)")
    run.add_argument("--seed", type=int, default=1337, help="seeds the init and every batch (default: %(default)s)")
    run.add_argument("--out", default="out", help="directory for ckpt.pt and log.jsonl (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in an --out that holds a run, deleting its ckpt.pt and log.jsonl")
    run.add_argument("--plan", action="store_true", help="print the memory plan (FITS or REFUSED) and exit")
    run.add_argument("--export", nargs="?", const=True, default=None, metavar="DIR",
                     help="write a Hugging Face checkpoint to OUT/hf/ at the end of the run (config, safetensors, "
                          "the --init-from tokenizer files; LoRA runs: the merged model); `--export DIR` trains "
                          "nothing and exports DIR/ckpt.pt to DIR/hf/ (default: no export)")
    run.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel degree under torchrun (parallel.py): attention heads and MLP split over "
                          "this many ranks, data parallel over the rest; `torchrun --nproc-per-node N train.py --tp "
                          "T` (default: %(default)s)")
    run.add_argument("--cp", type=int, default=1,
                     help="context-parallel degree under torchrun (context_parallel.py): each sequence's KV/dKV "
                          "pages sharded over this many ranks (chunks round-robin), attention merged across them; "
                          "ranks = tp x cp x data parallel (default: %(default)s)")
    run.add_argument("--eval-interval", type=int, default=None,
                     help="evaluate and save a checkpoint every N steps (default: steps / 10)")
    run.add_argument("--eval-iters", type=int, default=None,
                     help="validation batches per evaluation; 0: no evaluation (default: 10, fewer above 1M tokens "
                          "per step)")
    run.add_argument("--save", default="eval", choices=SAVE_CHOICES,
                     help="when to write OUT/ckpt.pt: at each evaluation point (--eval-interval) and the end, only "
                          "at the end (and on Ctrl-C), or never (benchmarks: a 7B checkpoint is ~60 GB) "
                          "(default: %(default)s)")

    opt = p.add_argument_group("optimizer")
    opt.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"],
                     help="adamw, or adafactor: factored second moments, no first moment (memory-lean) "
                          "(default: %(default)s)")
    opt.add_argument("--moments", default=None, choices=("fp32", "bf16", "int8"),
                     help="--params-dtype bfloat16: how AdamW stores its two moments (optim.py) (default: fp32 "
                          "when the plan fits, else the most precise that fits; resumed: the checkpoint's)")
    opt.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: 1e-3 for the tiny and small presets from scratch, 3e-4 for "
                          "larger models from scratch, 2e-5 to fine-tune an --init-from checkpoint, 2e-4 for LoRA "
                          "adapters; a resumed run keeps its checkpoint's)")
    opt.add_argument("--min-lr", type=float, default=None,
                     help="final learning rate of the cosine decay (default: lr / 10)")
    opt.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: steps / 20, at least 1)")
    opt.add_argument("--weight-decay", type=float, default=0.1,
                     help="AdamW-style decoupled decay of matrices, not of biases and norms (default: %(default)s)")
    opt.add_argument("--grad-clip", type=float, default=1.0,
                     help="clip the gradient norm; 0: off (default: %(default)s)")

    lora = p.add_argument_group("LoRA (lora.py): base weights frozen, low-rank fp32 adapters trained")
    lora.add_argument("--lora-rank", type=int, default=None,
                      help="train LoRA adapters of this rank instead of every weight; checkpoints hold them, and "
                           "OUT/lora/ (PEFT format) is written with each checkpoint (default: off, full fine-tuning)")
    lora.add_argument("--lora-alpha", type=float, default=None,
                      help="LoRA scale numerator: adapters add alpha / rank * B A (default: 2 x --lora-rank)")
    lora.add_argument("--lora-targets", default=None,
                      help=f"comma-separated projections to adapt (default: all seven, {','.join(LORA_TARGETS)})")

    chunk = p.add_argument_group("chunked path (a --seq longer than --chunk)")
    chunk.add_argument("--chunk", type=int, default=4096,
                       help="a --seq longer than this trains chunk-recurrently (chunk_train.py) in chunks of this "
                            "size (default: %(default)s)")
    chunk.add_argument("--page-size", type=int, default=None,
                       help="tokens per KV page, a power of two >= 16 (default: 64)")
    chunk.add_argument("--grad-pages", default=None, choices=("auto",) + DTYPE_NAMES,
                       help="dtype of the dK/dV pages; bfloat16 halves them, each chunk's sum is still formed in fp32; "
                            "auto: float32 when the memory plan fits, else bfloat16 (default: auto)")
    chunk.add_argument("--offload", default="auto", choices=["auto", "on", "off"],
                       help="keep the KV/dKV pages in pinned host memory (offload.py); auto: only when they do not "
                            "fit on the GPU (default: %(default)s)")
    chunk.add_argument("--cache-tokens", type=int, default=None,
                       help="with offload: tokens per GPU cache buffer; three buffers, history streams through them "
                            "(default: 65536)")
    chunk.add_argument("--attn", default="auto", choices=["auto", "dense", "sparse"],
                       help="dense (exact) or page-level sparse attention (sparse_attn.py: each --q-block of queries "
                            f"reads --budget history tokens + its chunk); auto: sparse when --seq > "
                            f"{SPARSE_AUTO_RATIO} x --budget (default: %(default)s)")
    chunk.add_argument("--attn-kernel", default="auto", choices=["auto", "triton", "sdpa"],  # attention.ATTN_KERNELS
                       help="the chunked path's attention kernel: triton (kernels/paged_attention.py), or sdpa: each "
                            "dense part's pages gathered, then PyTorch's fused op (cuDNN on CUDA; kernels/"
                            "gather_sdpa.py), Triton for document-masked parts and the history of sparse blocks; "
                            "the 7B 128K step in 35 s on an H200 with every stage-1 attention output kept, Triton's "
                            "52-63 s (bench/RESULTS.md); auto: the plan's choice, sdpa for bf16 attention on a GPU in "
                            "chunks of batch x tokens x hidden >= 2^22 (smaller ones are host-bound, where Triton is "
                            "faster), else triton (default: %(default)s)")
    chunk.add_argument("--keep-activations", type=_count_or_auto, default=None, metavar="N",
                       help="the N chunks before the last run stage 1 with grad and keep their activations, so stage 2 "
                            "runs only their backward: N chunk forwards fewer per step for N chunks' activations of "
                            "memory, which the plan counts (chunk_train.py); auto: with dense attention and the pages "
                            "on the device, as many as half of the memory the plan leaves spare holds (default: auto)")
    chunk.add_argument("--budget", type=int, default=None,
                       help="sparse attention: history tokens per query block (sink, recent and top-scoring pages), "
                            "a multiple of --page-size (default: 4096)")
    chunk.add_argument("--select", default=None, choices=SELECTION_RULES,
                       help="sparse attention: how pages are scored (sparse_attn.py): the mean key, or Quest's "
                            "per-channel key bound (default: meankey)")
    chunk.add_argument("--q-block", type=int, default=None,
                       help="sparse attention: queries sharing one selection of pages, a power of two >= 16 (default: "
                            "128, or with offload the largest power of two <= --chunk, which moves ~5x fewer pages at "
                            "about the same gradient fidelity: bench/RESULTS.md)")
    chunk.add_argument("--host-memory", type=float, default=None,
                       help="GiB of host memory the run may pin; on a CPU, the RAM it may use (default: "
                            "MemAvailable less max(6 GiB, 4%%) headroom, plan.py; on a CPU all of it)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ checks


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_lr(args) -> tuple[float, str]:
    """The peak learning rate for what is trained, and why: a random 7B model diverges at the small presets' 1e-3
    (bench/RESULTS.md: its loss doubled at step 2), and a pretrained checkpoint wants a fine-tuning rate."""
    if args.lora_rank:
        return 2e-4, "LoRA adapters"
    if args.init_from:
        return 2e-5, "fine-tuning a pretrained checkpoint"
    if args.model in (None, "tiny", "small"):
        return 1e-3, "a small model from scratch"
    return 3e-4, "a large model from scratch"


def check_values(args):
    """Each number the user gave, on its own: finite and in range. (Defaults are in range by construction.)"""
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "host_memory", "lora_alpha"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"{_flag(name)} must be a finite number, got {value}")
    positive = ("seq", "batch", "steps", "chunk", "page_size", "cache_tokens", "budget", "q_block", "eval_interval",
                "lr", "host_memory", "lora_rank", "lora_alpha", "tp", "cp")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"{_flag(name)} must be > 0, got {value}")
    for name in ("min_lr", "weight_decay", "grad_clip", "warmup", "eval_iters", "keep_activations"):
        value = getattr(args, name)
        if value is not None and value != "auto" and value < 0:
            raise UserError(f"{_flag(name)} must be >= 0, got {value}")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out, --overwrite deletes it: give one of them")
    if args.init_from and not os.path.isdir(args.init_from):
        raise UserError(f"--init-from {args.init_from} is not a directory (expected a Hugging Face checkpoint)")
    if args.init_from and args.model:
        raise UserError("--model and --init-from both choose the model: give one of them")
    check_lora(args)


def check_params_dtype(args):
    """--params-dtype bfloat16: AdamW (MixedPrecisionAdamW), bf16 compute, full fine-tuning; --moments only then.
    auto stays auto for the plan (train.py) unless only fp32 weights can work (Adafactor, fp32 compute), or
    --moments asks for bf16 weights. Run after resolve filled --dtype."""
    args.moments_why = None
    if args.params_dtype == "auto" and (args.optimizer != "adamw" or args.dtype != "bfloat16"):
        args.params_dtype = "float32"  # bf16 weights need both
    elif args.params_dtype == "auto" and args.moments is not None and args.lora_rank is None:
        args.params_dtype = "bfloat16"  # moments mean bf16 weights
    if args.params_dtype == "auto":
        if args.lora_rank is not None:
            _unused(args, "moments", "LoRA adapters are fp32 and train with torch's AdamW")
        return
    if args.params_dtype != "bfloat16":
        _unused(args, "moments", "--params-dtype float32 trains with torch's AdamW (fp32 moments)")
        return
    if args.optimizer != "adamw":
        raise UserError(f"--params-dtype bfloat16 trains with AdamW (fp32 masters), not --optimizer {args.optimizer}")
    if args.dtype != "bfloat16":
        raise UserError(f"--params-dtype bfloat16 needs --dtype bfloat16 (compute), got --dtype {args.dtype}")
    if args.lora_rank is not None:
        _unused(args, "moments", "LoRA adapters are fp32 and train with torch's AdamW")
        return
    args.moments_why = "given" if args.moments else None  # None: train.py picks them with the plan


def check_lora(args):
    """--lora-alpha and --lora-targets only with --lora-rank; the targets a comma list of distinct projections.
    Fills the defaults: alpha 2 x rank, all seven targets (a tuple)."""
    if args.lora_rank is None:
        for name in ("lora_alpha", "lora_targets"):
            _unused(args, name, "LoRA is off (no --lora-rank)")
        return
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    if args.lora_targets is None:
        args.lora_targets = LORA_TARGETS
        return
    targets = [t.strip() for t in args.lora_targets.split(",")]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise UserError(f"--lora-targets {args.lora_targets!r} must be distinct names among "
                        f"{','.join(LORA_TARGETS)} (comma-separated)")
    args.lora_targets = tuple(t for t in LORA_TARGETS if t in targets)


def device_is_gpu(device: str) -> bool:
    """Whether --device names a GPU; for `auto` whether there is one (this imports torch)."""
    if device == "auto":
        import torch  # the one question parsing cannot answer without torch
        return torch.cuda.is_available()
    if device == "cpu":
        return False
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return True
    raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def chunked(args) -> bool:
    """Whether the run trains chunk-recurrently (chunk_train.py) rather than on whole sequences."""
    return args.seq > args.chunk


def _unused(args, name, why):
    if getattr(args, name) is not None:
        raise UserError(f"{_flag(name)} {getattr(args, name)} is not used: {why}")


DEFAULTS_CHUNKED = dict(page_size=64, grad_pages="auto", cache_tokens=65536, budget=4096, select="meankey",
                        keep_activations="auto")


def resolve(args, gpu: bool):
    """Fill the defaults that depend on the device and on other arguments, then check that the settings agree with
    the path they select: an option the run would not use is an error, not silently ignored. `args.device` becomes
    concrete (cpu, cuda or cuda:N); args.sparse says whether attention is sparse. args.q_block stays None unless
    given: the plan picks it with the offload decision (plan.py)."""
    args.device = ("cuda" if gpu else "cpu") if args.device == "auto" else args.device
    # None: the model comes from --init-from or, resumed, from the checkpoint
    args.model = args.model or (None if args.init_from or args.resume else ("small" if gpu else "tiny"))
    args.seq = args.seq if args.seq is not None else (1024 if gpu else 256)
    args.batch = args.batch if args.batch is not None else max(1, (16384 if gpu else 1024) // args.seq)
    # long sequences: about as many tokens as the short default run, so that it finishes in minutes
    default_steps = max(10, min(1000 if gpu else 150, (2**24 if gpu else 2**18) // (args.seq * args.batch)))
    args.steps = args.steps if args.steps is not None else default_steps
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    # a resumed run keeps its checkpoint's schedule unless these are given (train.py reads them from ckpt.pt)
    args.lr_given, args.min_lr_given = args.lr is not None, args.min_lr is not None
    if args.lr is None:
        args.lr, args.lr_why = default_lr(args)
    if args.min_lr is not None and args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} must not exceed --lr {args.lr:g} (the schedule decays to it)")
    args.min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    if args.warmup > args.steps:
        raise UserError(f"--warmup {args.warmup} exceeds --steps {args.steps}: the run would end before its peak lr")
    args.eval_interval = args.eval_interval if args.eval_interval is not None else max(1, args.steps // 10)
    # an evaluation costs about a quarter of a training step per batch: keep it to ~1M tokens at long lengths
    per_step = args.seq * args.batch
    args.eval_iters = args.eval_iters if args.eval_iters is not None else max(1, min(10, 2**20 // per_step))

    if not chunked(args):
        why = f"--seq {args.seq} <= --chunk {args.chunk} trains whole sequences (chunked needs --seq > --chunk)"
        for name in DEFAULTS_CHUNKED:
            _unused(args, name, why)
        _unused(args, "q_block", why)
        if args.offload == "on" or args.attn == "sparse":
            option = "--offload on" if args.offload == "on" else "--attn sparse"
            raise UserError(f"{option} works on the chunked path only: {why}")
        args.sparse = False
        return _fill(args)

    budget = args.budget if args.budget is not None else DEFAULTS_CHUNKED["budget"]
    args.sparse = args.attn == "sparse" or (args.attn == "auto" and args.seq > SPARSE_AUTO_RATIO * budget)
    if not args.sparse:
        why = ("--attn dense" if args.attn == "dense" else f"--attn auto picks dense attention up to --seq "
               f"{SPARSE_AUTO_RATIO} x --budget ({SPARSE_AUTO_RATIO * budget})")
        _unused(args, "q_block", why)
        _unused(args, "select", why)
        if args.attn == "dense":
            _unused(args, "budget", why)
    if args.offload == "off":
        _unused(args, "cache_tokens", "--offload off keeps every page on the device, with no cache")
    _fill(args)
    if args.page_size < MIN_PAGE_SIZE or args.page_size & (args.page_size - 1):
        raise UserError(f"--page-size must be a power of two >= {MIN_PAGE_SIZE} on the chunked path, got "
                        f"{args.page_size}")
    if args.chunk % args.page_size:
        raise UserError(f"--chunk {args.chunk} must be a multiple of --page-size {args.page_size} (a chunk's pages "
                        f"are its own)")
    if args.offload != "off" and args.cache_tokens < args.chunk:
        raise UserError(f"--cache-tokens {args.cache_tokens} must be >= --chunk {args.chunk} (the backward loads a "
                        f"chunk's gradient pages into one cache buffer)")
    if args.sparse and (args.budget % args.page_size or args.budget < 2 * args.page_size):
        raise UserError(f"--budget {args.budget} must be a multiple of --page-size {args.page_size}, at least two "
                        f"pages (the sink and the most recent page)")
    if args.q_block is not None and (args.q_block < MIN_PAGE_SIZE or args.q_block & (args.q_block - 1)):
        raise UserError(f"--q-block must be a power of two >= {MIN_PAGE_SIZE}, got {args.q_block}")
    return args


def _fill(args):
    for name, default in DEFAULTS_CHUNKED.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


# ------------------------------------------------------------------------------------------------ files


def prepare_out(args):
    """Create --out and prove it writable before any work; refuse to mix a fresh run into an existing one."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {out} cannot be created or written ({e.strerror or e})") from None
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if args.resume and "ckpt.pt" not in held:
        raise UserError(f"--resume: no checkpoint at {os.path.join(out, 'ckpt.pt')}")
    if held and not (args.resume or args.overwrite):
        raise UserError(f"--out {out} already holds a run ({', '.join(held)}): continue it with --resume, or start "
                        f"afresh with --overwrite (deletes them)")


def tokenizer_dir(args) -> str | None:
    """The --init-from checkpoint when it holds a tokenizer.json: text data is then tokenized with it, never read as
    bytes."""
    if args.init_from and os.path.isfile(os.path.join(args.init_from, "tokenizer.json")):
        return args.init_from
    return None


def open_data(args):
    """data.TokenData of --data (and --eval-data), every problem of a file a UserError naming it; the --seq window
    must fit the training split (and the held-out data)."""
    from data import TokenData, open_corpus  # numpy: a few hundred ms, so only once the arguments are good
    corpora = {}
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if flag == "--data" or path is not None:
            try:
                corpora[flag] = open_corpus(path, tokenizer_dir(args))
            except (OSError, ValueError, RuntimeError) as e:
                raise UserError(f"{flag}: {e}") from None
    try:
        data = TokenData(corpora["--data"], documents=args.documents, held_out=corpora.get("--eval-data"))
    except ValueError as e:
        raise UserError(f"--data: {e}") from None
    for split, flag in (("train", "--data"), ("val", "--eval-data")):
        if split == "val" and args.eval_data is None:
            continue  # the held-out tail is evaluated at its longest window when shorter than --seq
        path = data.splits[split].path
        if args.seq > data.max_window(split) and args.documents == "single":
            raise UserError(f"{flag}: no document of {path} has --seq {args.seq} tokens plus a target "
                            f"(--documents single skips shorter ones; the longest has {data.max_window(split) + 1})")
        if args.seq > data.max_window(split):
            what = "the training split of " if split == "train" and args.eval_data is None else ""
            raise UserError(f"--seq {args.seq} is longer than {what}{path} ({data.max_window(split)} tokens); use a "
                            f"shorter --seq or a larger {flag}")
    return data


def prepare_export(args) -> Prepared:
    """`--export DIR`: no training, so no --out and no --data; only DIR's checkpoint must be there."""
    path = os.path.join(args.export_only, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"--export: no checkpoint at {path} (--export DIR exports a run's ckpt.pt)")
    for flag in ("resume", "overwrite", "plan"):
        if getattr(args, flag):
            raise UserError(f"--export {args.export_only} exports a finished checkpoint: {_flag(flag)} does not apply")
    return Prepared(args, None)


def prepare(argv=None, description=None) -> Prepared:
    """Parse and check everything that needs no model: the arguments, --out (created unless --plan) and --data."""
    args = parse_args(argv, description)
    args.export_only = args.export if isinstance(args.export, str) else None
    args.export = args.export is not None
    if args.export_only is not None:
        return prepare_export(args)
    check_values(args)
    resolve(args, device_is_gpu(args.device))
    check_params_dtype(args)
    if not args.plan:
        prepare_out(args)
    return Prepared(args, open_data(args))


def prepare_or_exit(argv=None, description=None) -> Prepared:
    try:
        return prepare(argv, description)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
