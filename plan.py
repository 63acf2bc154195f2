"""
The memory plan of a training run: every part it will hold, in which memory tier, and the verdict (FITS or REFUSED),
computed from the model's shape before anything is allocated.

Two tiers: the training device (a GPU's memory; on a CPU-only machine the host's RAM) and host memory, which holds
the chunked path's KV/dKV pages when they are offloaded (pinned on a GPU machine). On a CPU both tiers are the same
RAM, so their sum is what must fit.

    on the device                      bytes
    weights, gradients                 4 per parameter each (fp32 master weights, fp32 gradients)
    optimizer state                    AdamW: two fp32 moments per parameter; Adafactor: fp32 row + column factors
                                       per matrix, a full fp32 variance per vector; a step counter per tensor
    activations                        saved for backward (ACTIVATION_* below) x tokens: all --seq tokens on the
                                       full-sequence path, one chunk on the chunked path
    loss slice                         one slice of Model.loss's logits and their gradients
    chunked path: the KV/dKV page pool (grows with --seq), or offloaded a fixed page cache with the pool on the host;
    sparse attention's page summaries and selections (grow with --seq); --keep-activations' chunks, one chunk's
    activations each; stage-1 attention outputs kept for stage 2 in part of what is left (OUTPUT_CACHE_SHARE), then
    stage-1 MLP outputs in part of the rest (MLP_CACHE_SHARE).

    weights, gradients and optimizer state by --params-dtype (state_parts):
      float32               4 + 4 + AdamW 8 (or Adafactor's factors) per parameter
      bfloat16              2 + 4 (fp32 main_grad) + 12 / 8 / 6.06 (fp32 master + fp32 / bf16 / int8 moments)
      LoRA (--lora-rank)    the frozen base in its dtype, no gradient or state; the fp32 adapters with fp32
                            gradients and AdamW state; activations plus each adapter's rank-sized intermediate

plan_run also sizes what the plan itself chooses from spare memory: the output cache and, for --keep-activations
auto, the kept chunks (_keep_auto). The other settings left to the plan (--params-dtype, --moments, --grad-pages,
--attn-kernel auto) are plan_auto.py's, which plans each option with plan_run; what would make a refused plan fit
is plan_suggest.py's.
"""

import functools
import math
from dataclasses import asdict, dataclass, field

import torch

from cli import chunked
from model import LOSS_SLICE_LOGITS, Model, ModelConfig
from offload import NUM_BUFFERS, OffloadedKVStore
from paged_kv import PagedKVStore
from sparse_attn import RULES, PageSelector, SparseConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FP32 = 4  # bytes

# The plan uses only this share of the free device memory (GPU; on a CPU-only machine the RAM): the CUDA context,
# cuBLAS/Triton workspaces and the caching allocator's fragmentation are real but are not parts of the plan.
USABLE_SHARE = 0.9
# Pinned host memory (the offloaded pages) may take MemAvailable less this headroom: what the process itself holds in
# host memory beside its pinned pages - Python, torch and the CUDA context's host side (2-3 GiB), the token data,
# and torch.save's host copy of one tensor at a time (the 7B's largest, the fp32 master embedding: 2.2 GB) - with
# room to spare for the rest of the machine. A share (90%) would waste 12 GiB of a 120 GiB host, which at 115 KB per
# token is 100K tokens: a 7B run at 1M tokens pins 112 GiB out of ~120 GiB available. log.jsonl records the
# process's peak resident set per step (peak_host_rss_gib) to check this against.
HOST_HEADROOM_MIN, HOST_HEADROOM_SHARE = 6 * 2**30, 0.04

# Saved for backward per token and layer; tests/test_model.py (test_layer_saves_only_what_backward_needs) pins the
# first three for the fused layer ops:
ACTIVATION_FP32_HIDDEN = 2  # the two norms' inputs: the residual stream, fp32 because the weights are fp32
ACTIVATION_COMPUTE_HIDDEN = 4  # the two normalised inputs, q and the attention output, in the compute dtype
ACTIVATION_COMPUTE_INTERMEDIATE = 2  # the MLP's gate and up, in the compute dtype
ACTIVATION_NORM_STATS = 2 * FP32  # each norm's fp32 inverse RMS
SDPA_SAVED_KV = 2  # full-sequence path only: PyTorch's SDPA also saves k and v (the chunked path pages them)
# Temporaries of one layer's backward at its peak: about six intermediate-sized values per token in the compute
# dtype (the MLP's widest tensors and their gradients). An estimate, not pinned by a test; USABLE_SHARE covers slack.
BACKWARD_INTERMEDIATES = 6
# Per logit of Model.loss's slice: logits and their gradient in the compute dtype, an fp32 copy, the log-softmax and
# the fp32 gradient.
LOSS_COMPUTE_COPIES, LOSS_FP32_COPIES = 2, 3
# Stage 1's attention outputs, kept so that stage 2 skips those forward kernels, take at most this share of what the
# plan leaves free on the GPU: the rest stays headroom.
OUTPUT_CACHE_SHARE = 0.5
# Without --q-block, sparse attention selects pages once per 128 queries; offloaded, every selected page crosses
# PCIe, so once per chunk (the largest power of two <= --chunk) moves ~5x fewer pages (bench/RESULTS.md).
DEFAULT_Q_BLOCK = 128
# --keep-activations auto: chunks kept from stage 1 take at most this share of what is left after the output cache.
# The cache comes first: at 128K it saves the 7B 9 s for 21 GiB (every layer's stage-2 attention forward), where a
# kept 8192-token chunk saves one chunk's forward (~1/16 of the recomputation) for 30 GiB; at 16K/32K, where the
# cache is small, kept chunks gave 1.061x -> 1.118x and 1.022x -> 1.061x (bench/RESULTS.md).
KEPT_SHARE = 0.5
OUTPUT_CACHE = "attention outputs kept for stage 2"
# Stage 1's MLP down-projection outputs, kept so that stage 2 skips those GEMMs (kept_outputs.KeptMLPOutputs), take
# at most this share of what is left after the output cache and the kept chunks. Per byte they save less than the
# output cache at long histories (the 7B: 19K FLOPs a byte against ~130K for dense attention outputs at 64K of
# history), so they come last.
MLP_CACHE_SHARE = 0.5
MLP_CACHE = "MLP outputs kept for stage 2"
KEPT_ACTIVATIONS = "activations of the chunks kept from stage 1 (--keep-activations)"
# --attn-kernel sdpa (kernels/gather_sdpa.py) at its largest call: per history token of the part, K and V gathered
# into contiguous tensors and, in the backward, their gradients, in the compute dtype, plus one fp32 copy at a time
# for the pages' index_add; per query of the chunk, the calls' fp32 outputs and their merge (or dq and its terms).
SDPA_KV_COMPUTE_COPIES, SDPA_KV_FP32_COPIES, SDPA_Q_FP32_COPIES = 4, 1, 4
SDPA_TEMPORARIES = "attention kernel temporaries (--attn-kernel sdpa)"  # K/V gathered, per history token
SDPA_QUERY_TEMPORARIES = "attention kernel outputs (--attn-kernel sdpa)"  # per query of the chunk: not growing


@dataclass
class Memory:
    """Bytes the run may use."""
    device: int  # free on the training device: GPU memory, or MemAvailable on a CPU
    host: int  # host memory the run may pin: --host-memory, or MemAvailable less host_headroom
    on_gpu: bool  # False: device and host are one RAM, whose parts are counted together
    host_available: int | None = None  # MemAvailable when `host` was derived from it (for the printout)

    @property
    def tiers(self) -> tuple[str, str]:
        """Labels of (device, host) parts: where they really live."""
        return ("gpu", "pinned host") if self.on_gpu else ("cpu", "host")


@dataclass
class Plan:
    device: dict[str, int]  # part -> bytes on the training device
    host: dict[str, int]  # part -> bytes in host memory (offloaded pages)
    device_per_token: int  # bytes each extra token of --seq adds on the device
    host_per_token: int  # ... and in host memory
    growing: set[str] = field(default_factory=set)  # the parts proportional to --seq
    offload: bool = False  # the chunked path's pages live in host memory
    q_block: int | None = None  # sparse attention: queries per selection
    keep_activations: int = 0  # chunks kept from stage 1 that the plan counts (--keep-activations auto: its choice)
    refusal: str | None = None  # why the run does not fit; None: FITS

    @property
    def fits(self) -> bool:
        return self.refusal is None


def available_memory(device: torch.device) -> int:
    """Bytes free now: on the GPU, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def host_headroom(available: int) -> int:
    """Host memory kept back from the pinned pages: max(HOST_HEADROOM_MIN, HOST_HEADROOM_SHARE x MemAvailable)."""
    return max(HOST_HEADROOM_MIN, int(HOST_HEADROOM_SHARE * available))


def measure(device: torch.device, host_memory_gib: float | None) -> Memory:
    """What the run may use: --host-memory GiB of host memory to pin (default: MemAvailable less host_headroom; on
    machines whose memory grows as it is used, MemAvailable starts low: pass --host-memory there), and on a CPU the
    RAM is all (--host-memory, or MemAvailable, of which the device share USABLE_SHARE applies)."""
    if host_memory_gib is not None:
        host, available = int(host_memory_gib * 2**30), None
    else:
        available = available_memory(torch.device("cpu"))
        host = available - host_headroom(available)
    if device.type != "cuda":
        ram = host if available is None else available
        return Memory(ram, ram, on_gpu=False)
    return Memory(available_memory(device), max(0, host), on_gpu=True, host_available=available)


def param_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
    """The shapes of Model(cfg)'s parameters, a tied weight once: from a meta model (no memory), built once per
    config (a 7B model takes most of a second)."""
    return _param_shapes(tuple(asdict(cfg).items()))


@functools.lru_cache(maxsize=8)
def _param_shapes(cfg_items: tuple) -> tuple[tuple[int, ...], ...]:
    with torch.device("meta"):
        return tuple(tuple(p.shape) for p in Model(ModelConfig(**dict(cfg_items))).parameters())


def optimizer_state_bytes(cfg: ModelConfig, optimizer: str) -> int:
    """Exact bytes of torch.optim.AdamW's or Adafactor's state for a model of shape cfg."""
    shapes = param_shapes(cfg)
    if optimizer == "adamw":  # exp_avg and exp_avg_sq, and an fp32 step counter per tensor
        return FP32 * sum(2 * math.prod(s) + 1 for s in shapes)
    # Adafactor: row_var [r, 1] + col_var [1, c] per matrix, a full variance per vector, and a step counter each
    return FP32 * sum((s[0] + s[1] if len(s) >= 2 else math.prod(s)) + 1 for s in shapes)


def lora_shapes(cfg: ModelConfig, rank: int, targets) -> list[tuple[int, int]]:
    """(in, out) of every projection LoRA wraps (lora.apply_lora's targets), all layers."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
             "up_proj": (h, i), "down_proj": (i, h)}
    return [sizes[t] for t in targets] * cfg.num_hidden_layers


def state_parts(cfg: ModelConfig, args) -> dict[str, int]:
    """Bytes of the weights, their gradients and the optimizer state (see the module docstring), by part."""
    n = sum(math.prod(s) for s in param_shapes(cfg))
    bf16 = getattr(args, "params_dtype", "float32") == "bfloat16"
    if getattr(args, "lora_rank", None):  # frozen base; fp32 adapters, fp32 grads, torch AdamW (+ a step per tensor)
        adapters = lora_shapes(cfg, args.lora_rank, args.lora_targets)
        a = sum(args.lora_rank * (fan_in + fan_out) for fan_in, fan_out in adapters)
        return {f"base weights ({'bf16' if bf16 else 'fp32'}, frozen)": (2 if bf16 else FP32) * n,
                f"LoRA adapters (rank {args.lora_rank}, fp32)": FP32 * a, "LoRA gradients (fp32)": FP32 * a,
                "optimizer (adamw, LoRA adapters)": FP32 * (2 * a + 2 * len(adapters))}
    if bf16:  # bf16 weights, fp32 main_grad, MixedPrecisionAdamW
        from optim import state_bytes_per_param
        return {"weights (bf16)": 2 * n, "gradients (fp32 main_grad)": FP32 * n,
                f"optimizer (adamw, {args.moments} moments, fp32 master)":
                    math.ceil(n * state_bytes_per_param(args.moments, master=True))}
    return {"weights (fp32)": FP32 * n, "gradients (fp32)": FP32 * n,
            f"optimizer ({args.optimizer})": optimizer_state_bytes(cfg, args.optimizer)}


def weight_cast_bytes(cfg: ModelConfig, args) -> int:
    """fp32 weights under bf16 autocast: every matmul casts its weight to bf16 and saves that copy for the input
    gradient, so a chunk's forward holds a bf16 copy of every weight until its backward (2 bytes per parameter;
    measured on the H200: a 7B LoRA run over an fp32 base peaked 14 GiB above a plan without it)."""
    if getattr(args, "params_dtype", "float32") != "float32" or DTYPES[args.dtype] == torch.float32:
        return 0
    return 2 * sum(math.prod(s) for s in param_shapes(cfg))


def activation_bytes_per_token(cfg: ModelConfig, compute_bytes: int, full_sequence: bool) -> int:
    """Bytes saved for backward per token of one sequence, all layers, plus one layer's backward temporaries."""
    layer = (FP32 * ACTIVATION_FP32_HIDDEN * cfg.hidden_size + ACTIVATION_NORM_STATS
             + compute_bytes * (ACTIVATION_COMPUTE_HIDDEN * cfg.hidden_size
                                + ACTIVATION_COMPUTE_INTERMEDIATE * cfg.intermediate_size))
    if full_sequence:
        layer += compute_bytes * SDPA_SAVED_KV * cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * layer + compute_bytes * BACKWARD_INTERMEDIATES * cfg.intermediate_size


def run_activation_bytes_per_token(cfg: ModelConfig, args) -> int:
    """activation_bytes_per_token for the run's path and dtype, every batch row, with LoRA's intermediates."""
    compute_bytes = DTYPES[args.dtype].itemsize
    activations = activation_bytes_per_token(cfg, compute_bytes, not chunked(args)) * args.batch
    if getattr(args, "lora_rank", None):  # each adapter saves its [rank] intermediate x A^T per token
        activations += compute_bytes * args.lora_rank * len(lora_shapes(cfg, 1, args.lora_targets)) * args.batch
    return activations


def kept_chunk_bytes(cfg: ModelConfig, args) -> int:
    """What a chunk kept from stage 1 holds until its backward: its activations, the bf16 copies of fp32 weights
    that its matmuls saved (autocast casts each chunk's own: chunk_train._autocast has no weight cache), and its
    last hidden state with the head's gradient (ChunkForward's x and dx, fp32 [B, C, hidden]). Measured on the H200
    (small model, 15 kept 4096-token chunks): 0.545 GiB each, as planned here."""
    x_dx = 2 * FP32 * cfg.hidden_size * args.batch * args.chunk
    return run_activation_bytes_per_token(cfg, args) * args.chunk + weight_cast_bytes(cfg, args) + x_dx


def kept_chunks(args) -> int:
    """How many chunks keep their stage-1 forward: --keep-activations, at most every chunk but the last (auto: 0
    until plan_run chooses)."""
    n = getattr(args, "keep_activations", 0)
    return min(0 if n in (None, "auto") else n, math.ceil(args.seq / args.chunk) - 1)


def sparse_config(args, q_block) -> SparseConfig:
    """The sparse-attention settings of a run (--budget, the planned q-block, --select) as the stores take them."""
    return SparseConfig(budget=args.budget, q_block=q_block, rule=RULES[args.select]())


def parts(cfg: ModelConfig, args, offload=False, q_block=DEFAULT_Q_BLOCK) -> Plan:
    """The parts of a run with settings `args` (cli.resolve's), pages offloaded or not; no verdict yet."""
    compute_bytes = DTYPES[args.dtype].itemsize
    is_chunked = chunked(args)
    activations = run_activation_bytes_per_token(cfg, args)
    tokens = args.batch * (args.chunk if is_chunked else args.seq)  # whose activations and logits exist at once
    loss_slice = min(LOSS_SLICE_LOGITS, tokens * cfg.vocab_size) * (LOSS_COMPUTE_COPIES * compute_bytes
                                                                     + LOSS_FP32_COPIES * FP32)
    device = state_parts(cfg, args)
    if weight_cast_bytes(cfg, args):
        device["bf16 copies of the fp32 weights (autocast)"] = weight_cast_bytes(cfg, args)
    if not is_chunked:
        name = f"activations ({args.seq} tokens)"
        device |= {name: activations * args.seq, "loss slice": loss_slice}
        return Plan(device, {}, activations, 0, growing={name})
    device |= {f"activations (one {args.chunk}-token chunk)": activations * args.chunk, "loss slice": loss_slice}
    if kept_chunks(args):  # each alive from its stage-1 forward to its backward, beside the chunk in flight
        device[KEPT_ACTIVATIONS] = kept_chunk_bytes(cfg, args) * kept_chunks(args)
    kv_dtype, grad_dtype = DTYPES[args.dtype], DTYPES[args.grad_pages]
    pool_per_token = PagedKVStore.bytes_per_token(cfg, kv_dtype, grad_dtype) * args.batch
    plan = Plan(device, {}, 0, 0, offload=offload, q_block=q_block if args.sparse else None,
                keep_activations=kept_chunks(args))
    if args.sparse:  # page summaries and stored selections, proportional to the length
        summaries, selections, tables = PageSelector.index_bytes(cfg, args.batch, args.seq, args.chunk,
                                                                 args.page_size, kv_dtype, sparse_config(args, q_block))
        if offload:  # the GPU keeps the summaries (selection reads them), the host the selections
            _add(plan, "device", "sparse index (page summaries)", summaries, args.seq)
            _add(plan, "host", "sparse index (selections)", selections, args.seq)
        else:
            _add(plan, "device", "sparse index (page summaries, selections)", summaries + selections + tables,
                 args.seq)
    # SDPAKernel: dense parts, and sparse ones (of several query blocks per chunk: the history is Triton's, the
    # chunk's own K/V are gathered for the fused op's diagonal call)
    if getattr(args, "attn_kernel", "triton") == "sdpa":
        kv = args.batch * cfg.num_key_value_heads * cfg.head_dim * (SDPA_KV_COMPUTE_COPIES * compute_bytes
                                                                    + SDPA_KV_FP32_COPIES * FP32)
        q = args.batch * args.chunk * cfg.num_attention_heads * cfg.head_dim * SDPA_Q_FP32_COPIES * FP32
        plan.device[SDPA_QUERY_TEMPORARIES] = q
        if args.sparse:  # the block's selected history (one block per chunk), then the chunk's own K/V
            history = min(args.budget, args.seq) if q_block >= args.chunk else 0
            plan.device[SDPA_TEMPORARIES] = kv * (history + args.chunk)
        elif offload:  # a part is at most what the page cache holds
            plan.device[SDPA_TEMPORARIES] = kv * min(args.seq, args.cache_tokens + args.chunk)
        else:  # the last chunk's part: the whole sequence
            _add(plan, "device", SDPA_TEMPORARIES, kv * args.seq, args.seq)
    if not offload:
        _add(plan, "device", "KV/dKV page pool", pool_per_token * args.seq, args.seq)
        return plan
    plan.device[f"KV/dKV page cache ({NUM_BUFFERS} x {args.cache_tokens} tokens)"] = OffloadedKVStore.cache_bytes(
        cfg, args.batch, args.page_size, args.cache_tokens, kv_dtype, grad_dtype)
    _add(plan, "host", "KV/dKV pages", pool_per_token * args.seq, args.seq)
    return plan


def _add(plan: Plan, tier: str, name: str, size: int, seq: int):
    """A part proportional to the length: its per-token share counts toward the longest --seq that fits."""
    getattr(plan, tier)[name] = size
    plan.growing.add(name)
    if tier == "device":
        plan.device_per_token += math.ceil(size / seq)
    else:
        plan.host_per_token += math.ceil(size / seq)


def refusal(plan: Plan, memory: Memory, args) -> str | None:
    """None if the plan fits in USABLE_SHARE of the device and in the host memory allowed, else one line: the longest
    --seq that would fit, or, if none would, the parts that alone exceed the memory."""
    device_name = str(args.device)
    share = f"{USABLE_SHARE:.0%} of {fmt_bytes(memory.device)} free"
    if memory.on_gpu:
        host_why = (f"MemAvailable {fmt_bytes(memory.host_available)} less "
                    f"{fmt_bytes(memory.host_available - memory.host)} headroom"
                    if memory.host_available is not None else "--host-memory")
        tiers = [(device_name, plan.device, plan.device_per_token, memory.device, USABLE_SHARE, share),
                 ("pinned host memory", plan.host, plan.host_per_token, memory.host, 1.0, host_why)]
    else:  # one RAM
        tiers = [("RAM", plan.device | plan.host, plan.device_per_token + plan.host_per_token, memory.device,
                  USABLE_SHARE, share)]
    for where, tier_parts, per_token, free, usable_share, why in tiers:
        need, usable = sum(tier_parts.values()), int(usable_share * free)
        if need <= usable:
            continue
        fixed = {name: size for name, size in tier_parts.items() if name not in plan.growing}
        shortest = args.chunk + 1 if chunked(args) else 1  # on this path
        longest = (usable - sum(fixed.values())) // per_token if per_token else -1
        head = (f"--seq {args.seq} x --batch {args.batch} needs {fmt_bytes(need)} of {where}, "
                f"{fmt_bytes(usable)} usable ({why})")
        if longest >= shortest:
            return f"{head}: the longest --seq that fits is {longest}"
        if sum(fixed.values()) < usable:  # the per-token parts at the shortest length do not fit
            return (f"{head}: no --seq {'above --chunk ' if chunked(args) else ''}fits at --batch {args.batch} "
                    f"({fmt_bytes(per_token)} per token of --seq); lower --batch")
        largest = sorted(fixed.items(), key=lambda item: -item[1])[:3]
        listed = ", ".join(f"{name} {fmt_bytes(size)}" for name, size in largest)
        fixed_total = fmt_bytes(sum(fixed.values()))
        return f"{head}: no --seq fits, the parts independent of --seq alone need {fixed_total} ({listed})"
    return None


def plan_run(cfg: ModelConfig, args, memory: Memory) -> Plan:
    """The plan with its offload decision and verdict. --offload auto offloads the chunked path's pages only when
    the plan with them on the GPU does not fit."""
    if not chunked(args):
        plan = parts(cfg, args)
        plan.refusal = refusal(plan, memory, args)
        return plan
    offload = args.offload == "on"
    if args.offload == "auto" and memory.on_gpu:  # on a CPU the pages would move to the same RAM: never
        offload = refusal(parts(cfg, args, False, args.q_block or DEFAULT_Q_BLOCK), memory, args) is not None
    q_block = args.q_block or ((1 << (args.chunk.bit_length() - 1)) if offload else DEFAULT_Q_BLOCK)
    plan = parts(cfg, args, offload, q_block)
    plan.refusal = refusal(plan, memory, args)
    if not offload and plan.fits:
        # the last chunks first, whose attention over the longest history costs the most to recompute
        # (not those of kept chunks, whose forward stage 2 does not repeat)
        output_bytes = PagedKVStore.output_bytes_per_token(cfg, DTYPES[args.dtype]) * args.batch
        need = output_bytes * max(0, args.seq - args.chunk * (1 + plan.keep_activations))
        spare = int(USABLE_SHARE * memory.device) - sum(plan.device.values())
        plan.device[OUTPUT_CACHE] = min(need, int(OUTPUT_CACHE_SHARE * max(0, spare)))
        if getattr(args, "keep_activations", None) == "auto" and not args.sparse:
            _keep_auto(plan, cfg, args, memory, output_bytes)
        _mlp_cache(plan, cfg, args, memory)
    return plan


def _mlp_cache(plan: Plan, cfg: ModelConfig, args, memory: Memory):
    """The MLP outputs stage 1 keeps: every layer's but the last one's (it stops at its K/V), for the chunks stage 2
    recomputes, within MLP_CACHE_SHARE of what the plan leaves."""
    per_token = (cfg.num_hidden_layers - 1) * cfg.hidden_size * DTYPES[args.dtype].itemsize * args.batch
    need = per_token * max(0, args.seq - args.chunk * (1 + plan.keep_activations))
    spare = int(USABLE_SHARE * memory.device) - sum(plan.device.values())
    if need and spare > 0:
        plan.device[MLP_CACHE] = min(need, int(MLP_CACHE_SHARE * spare))


def _keep_auto(plan: Plan, cfg: ModelConfig, args, memory: Memory, output_bytes: int):
    """--keep-activations auto: as many chunks as KEPT_SHARE of what the plan leaves after the output cache holds,
    with dense attention and pages on the device only: offloaded runs are long, where a few kept chunks are a sliver
    of the step, and with sparse attention kept chunks made the default 1M run slower on the H200 (18.0 s a step
    with 107 kept against 16.4 s with none; bench/RESULTS.md), where dense runs gained (the small model at 64K
    1.40x, the 7B at 16K 1.05x). Their outputs then need no cache: it shrinks by theirs."""
    per_chunk = kept_chunk_bytes(cfg, args)
    spare = int(USABLE_SHARE * memory.device) - sum(plan.device.values())
    n = min(math.ceil(args.seq / args.chunk) - 1, int(KEPT_SHARE * max(0, spare)) // per_chunk)
    if n > 0:
        plan.keep_activations = n
        plan.device[KEPT_ACTIVATIONS] = per_chunk * n
        need = output_bytes * max(0, args.seq - args.chunk * (1 + n))
        plan.device[OUTPUT_CACHE] = min(plan.device[OUTPUT_CACHE], need)


# ------------------------------------------------------------------------------------------------ printing


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def summary(plan: Plan, memory: Memory) -> str:
    """One phrase for the start line: what is planned in each tier."""
    device_tier, host_tier = memory.tiers
    text = f"{fmt_bytes(sum(plan.device.values()))} planned on the {device_tier}"
    if plan.host:
        text += f" + {fmt_bytes(sum(plan.host.values()))} in {host_tier} memory"
    return text


def describe(plan: Plan, memory: Memory, args) -> list[str]:
    """The plan as printed by --plan: one row per part, tagged with its tier, the totals, and FITS or REFUSED."""
    device_tier, host_tier = memory.tiers
    rows = [(f"{name} [{device_tier}]", size) for name, size in plan.device.items()]
    rows += [(f"{name} [{host_tier}]", size) for name, size in plan.host.items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {fmt_bytes(size):>11}" for name, size in rows]
    lines.append(f"  {'total on the ' + device_tier:<{width}}  {fmt_bytes(sum(plan.device.values())):>11} of "
                 f"{fmt_bytes(memory.device)} free")
    if plan.host:
        lines.append(f"  {'total in ' + host_tier + ' memory':<{width}}  {fmt_bytes(sum(plan.host.values())):>11} "
                     f"of {fmt_bytes(memory.host)} " + ("allowed" if memory.on_gpu else "free (the same RAM)"))
    if chunked(args):
        where = f"in {host_tier} memory" if plan.offload else f"on the {device_tier}"
        attention = f"sparse, {args.budget} tokens per {plan.q_block}-query block" if args.sparse else "dense"
        lines.append(f"  KV/dKV pages {where} (--offload {args.offload}); attention: {attention} (--attn {args.attn})")
        kernel = getattr(args, "attn_kernel", "triton")
        if kernel == "sdpa":  # say which parts SDPAKernel hands to the default kernel
            parts = ("sparse parts of one query block per chunk and the chunk's own keys of the others, the default "
                     "for their history" if args.sparse else "dense parts, the default for packed documents' masked "
                     "ones")
            lines.append(f"  attention kernel: sdpa (gather + fused SDPA) for {parts} (--attn-kernel sdpa)")
    lines.append("FITS" if plan.fits else f"REFUSED: {plan.refusal}")
    return lines
