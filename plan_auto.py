"""
The settings a run leaves to its memory plan, chosen before anything is allocated, each with its reason:

    --params-dtype auto   fp32 weights when their plan fits, else bf16 weights with the most precise --moments that
                          fits (with LoRA: the frozen base in bf16 first)
    --grad-pages auto     fp32 dK/dV pages when they fit, else bf16 (tried before the weights give up precision:
                          they carry the gradient of the whole history)
    --attn-kernel auto    sdpa for bf16 attention on a GPU in chunks large enough not to be host-bound
                          (attn_kernel_auto: attention.kernel_name's rule, with its reasons)
    --keep-activations auto   plan.plan_run's own choice from the memory it leaves (plan._keep_auto), reported here

Each option is planned by plan.plan_run; the first that fits is taken. What would make a refused plan fit is
plan_suggest.py's.
"""
import copy

from attention import SDPA_AUTO_MIN_TOKENS_X_HIDDEN, kernel_name
from cli import chunked
from model import ModelConfig
from plan import Memory, plan_run

MOMENTS = ("fp32", "bf16", "int8")  # optim.MOMENTS, most precise first
# under --tp > 1, bf16 weights take fp32 moments only: a shard's stochastic rounding draws and int8 blocks are not
# the whole tensor's (parallel.check refuses the others when given)
TP_MOMENTS = ("fp32",)


def _precision_options(args) -> list[tuple[str, str | None]]:
    """(params_dtype, moments) to try, most precise first. bf16 weights need AdamW and bf16 compute; LoRA's
    adapters train with torch's AdamW, so no --moments there."""
    bf16_ok = args.optimizer == "adamw" and args.dtype == "bfloat16"
    moments = [args.moments] if args.moments else list(MOMENTS if getattr(args, "tp", 1) == 1 else TP_MOMENTS)
    bf16 = [("bfloat16", None)] if args.lora_rank else [("bfloat16", m) for m in moments]
    if args.params_dtype == "auto" and args.lora_rank and bf16_ok:
        # LoRA's base is frozen: bf16 (a Qwen checkpoint's own precision) loses no update, halves the base and
        # spares the bf16 copies autocast would make of fp32 weights for every chunk (plan.weight_cast_bytes)
        return bf16 + [("float32", None)]
    if args.params_dtype == "auto":
        return [("float32", None)] + (bf16 if bf16_ok else [])
    return bf16 if args.params_dtype == "bfloat16" else [("float32", None)]


def attn_kernel_auto(cfg: ModelConfig, args) -> tuple[str, str | None]:
    """(kernel, why) for --attn-kernel auto (attention.kernel_name's rule, with the reason where it takes triton);
    a given kernel as it is, why None."""
    name = getattr(args, "attn_kernel", "triton")
    if name != "auto":
        return name, None
    # where SDPAKernel would hand every part to Triton anyway (or run the CPU op), triton with the reason. Sparse
    # attention goes to sdpa too: the chunk's own keys through cuDNN (the 7B's sparse 128K step: 17.3 s against
    # 18.3 s), and the offloaded plan's one-block parts whole (bench/RESULTS.md, sixteenth session)
    why = ("not a GPU" if not str(args.device).startswith("cuda") else
           "fp32 compute: the fused ops take bf16" if args.dtype == "float32" else None)
    if why:
        return "triton", why
    size = args.batch * args.chunk * cfg.hidden_size
    if kernel_name(name, "cuda", size) == "triton":
        return "triton", (f"batch x chunk x hidden {size:,} < {SDPA_AUTO_MIN_TOKENS_X_HIDDEN:,}: host-bound, Triton is "
                          f"faster")
    return "sdpa", "gather + cuDNN for bf16 chunks on a GPU"


def plan_auto(cfg: ModelConfig, args, memory: Memory):
    """plan_run, with the settings left to the plan chosen first: --params-dtype auto, --moments (bf16 weights, not
    given) and --grad-pages auto, each the most precise whose plan fits, with --attn-kernel auto's kernel
    (attn_kernel_auto); then --keep-activations auto from what that plan leaves. dK/dV pages are tried in fp32 with
    every weight choice before bf16 ones: they carry the gradient of the whole history, the optimizer's moments only its
    step. Returns (plan, chosen): `chosen` a copy of args with concrete values, and moments_why / precision_why
    (phrases saying why; None and [] where nothing was left to choose). args is left alone."""
    pages = ["float32", "bfloat16"] if chunked(args) and args.grad_pages == "auto" else [args.grad_pages]
    options = [(g, p, m) for g in pages for p, m in _precision_options(args)]
    kernel, kernel_why = attn_kernel_auto(cfg, args)
    for grad_pages, params_dtype, moments in options:
        chosen = copy.copy(args)
        chosen.grad_pages, chosen.params_dtype, chosen.moments = grad_pages, params_dtype, moments
        chosen.attn_kernel = kernel
        plan = plan_run(cfg, chosen, memory)
        if plan.fits:
            break
    why, fits = [], plan.fits
    if args.params_dtype == "auto":
        reason = ("bf16 weights need AdamW and --dtype bfloat16" if len(_precision_options(args)) == 1 else
                  "none fits" if not fits else
                  "LoRA: the frozen base in bf16" if args.lora_rank and chosen.params_dtype == "bfloat16" else
                  "the plan fits" if chosen.params_dtype == "float32" else "fp32 weights do not fit")
        why.append(f"--params-dtype {chosen.params_dtype} (auto: {reason})")
    chosen.moments_why = None
    if chosen.params_dtype == "bfloat16" and not args.lora_rank:
        chosen.moments_why = ("given" if args.moments else "none fits" if not fits else
                              "the plan fits" if chosen.moments == "fp32" else "the most precise whose plan fits")
        why.append(f"--moments {chosen.moments} ({chosen.moments_why})")
    if len(pages) > 1:
        reason = ("none fits" if not fits else "the plan fits" if chosen.grad_pages == "float32" else
                  "fp32 dK/dV pages do not fit")
        why.append(f"--grad-pages {chosen.grad_pages} (auto: {reason})")
    if chunked(args) and kernel_why:
        why.append(f"--attn-kernel {kernel} (auto: {kernel_why})")
    if getattr(args, "keep_activations", None) == "auto":
        chosen.keep_activations = plan.keep_activations
        reason = ("the output cache first, then half of what is left" if plan.keep_activations else
                  "pages offloaded" if plan.offload else "sparse attention" if args.sparse else
                  "no memory to spare" if fits else "none fits")
        why.append(f"--keep-activations {plan.keep_activations} (auto: {reason})")
    chosen.precision_why = why
    return plan, chosen
