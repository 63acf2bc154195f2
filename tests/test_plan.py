"""plan.py: the exactly known parts of the memory plan, the offload decision, the verdict and its tier labels."""

import math

import torch

import cli
import plan as planner
import plan_auto
from model import Model, preset

GIB = 2**30


def settings(*argv, gpu=True, auto=False):
    """cli's resolved arguments, as train.py hands them to plan_auto.plan_auto; unless `auto`, with what plan_auto
    leaves to the plan fixed at fp32 (weights, dK/dV pages), as plan_run and parts take them."""
    args = cli.parse_args([*argv, "--device", "cuda" if gpu else "cpu"])
    cli.check_values(args)
    cli.check_params_dtype(cli.resolve(args, gpu))
    if not auto:
        args.params_dtype = "float32" if args.params_dtype == "auto" else args.params_dtype
        args.grad_pages = "float32" if args.grad_pages == "auto" else args.grad_pages
    return args


def test_plan_matches_the_pool_and_parameter_sizes():
    """Parameter bytes and the KV/dKV pool (bf16 K/V + fp32 dK/dV) of Qwen2.5-7B at 1M tokens."""
    args = settings("--model", "qwen2.5-7b", "--seq", "1000000", "--dtype", "bfloat16", "--optimizer", "adafactor")
    cfg = preset("qwen2.5-7b")
    # sparse attention (the default at 1M tokens) adds page summaries (bf16, per page and kv head) and, per layer,
    # chunk, kv head and 128-query block, the stored selection (64 int32 pages) and page table (64 + 64 int32)
    assert args.sparse
    plan = planner.parts(cfg, args)
    summaries = 28 * math.ceil(1_000_000 / 64) * 4 * 128 * 2
    blocks = 28 * math.ceil(1_000_000 / 4096) * 4 * (4096 // 128)
    selections, tables = blocks * 4 * 64, blocks * 4 * (64 + 4096 // 64)
    assert plan.device["sparse index (page summaries, selections)"] == summaries + selections + tables
    # offloaded, the GPU keeps the summaries (selection reads them), the host the selections (only indices move)
    plan = planner.parts(cfg, args, offload=True)
    assert plan.device["sparse index (page summaries)"] == summaries
    assert plan.host["sparse index (selections)"] == selections
    args.select = "quest"  # --select quest: per-channel key (min, max) summaries, twice the mean key's
    assert planner.parts(cfg, args, offload=True).device["sparse index (page summaries)"] == 2 * summaries
    args.sparse = False
    plan = planner.parts(cfg, args)
    assert not any("sparse" in part for part in plan.device)
    assert plan.device["weights (fp32)"] == plan.device["gradients (fp32)"] == 4 * 7_615_616_512
    assert (plan.device_per_token, plan.host_per_token) == (28 * 4 * 128 * 2 * (2 + 4), 0) == (172_032, 0)
    assert plan.device["KV/dKV page pool"] == 172_032 * 1_000_000
    # offloaded: the pages move to host memory, the GPU keeps three 64K-token buffers whatever the length
    plan = planner.parts(cfg, args, offload=True)
    assert plan.host == {"KV/dKV pages": 172_032 * 1_000_000} and plan.host_per_token == 172_032
    assert plan.device["KV/dKV page cache (3 x 65536 tokens)"] == 3 * 65536 * 4 * 128 * 2 * (2 + 4)
    args.grad_pages = "bfloat16"  # bf16 dK/dV pages: 115 KB per token
    assert planner.parts(cfg, args, offload=True).host_per_token == 28 * 4 * 128 * 2 * (2 + 2) == 114_688


def test_sdpa_kernel_temporaries_are_planned():
    """--attn-kernel sdpa gathers a dense part's K/V (the whole history on the GPU pool; at most the page cache and
    the chunk offloaded) and keeps fp32 outputs per query; with sparse attention every block of queries gathers
    its selected history (budget tokens), then the chunk's own K/V, where a chunk is one query block (several:
    the history goes to Triton, the chunk's own K/V are gathered): not growing with --seq.
    The 7B at 128K, chunk 8192, bf16: 1.18 GiB planned (measured on the H200: 1.53 GiB above the Triton step)."""
    argv = ("--model", "qwen2.5-7b", "--seq", "131072", "--chunk", "8192", "--dtype", "bfloat16", "--attn", "dense")
    cfg = preset("qwen2.5-7b")
    triton = planner.parts(cfg, settings(*argv, "--attn-kernel", "triton"))
    args = settings(*argv, "--attn-kernel", "sdpa")
    plan = planner.parts(cfg, args)
    per_token = 4 * 128 * (4 * 2 + 4)  # kv heads x head dim x (4 bf16 copies + 1 fp32)
    per_query = 28 * 128 * 4 * 4
    assert plan.device[planner.SDPA_TEMPORARIES] == per_token * 131072
    assert plan.device[planner.SDPA_QUERY_TEMPORARIES] == per_query * 8192  # the chunk's: not growing with --seq
    assert plan.device_per_token == triton.device_per_token + per_token
    assert planner.SDPA_TEMPORARIES not in triton.device and planner.SDPA_QUERY_TEMPORARIES not in triton.device
    offloaded = planner.parts(cfg, args, offload=True)  # not growing: a part is at most cache + chunk
    assert offloaded.device[planner.SDPA_TEMPORARIES] == per_token * (65536 + 8192)
    assert offloaded.device[planner.SDPA_QUERY_TEMPORARIES] == per_query * 8192
    assert planner.SDPA_TEMPORARIES not in offloaded.growing
    gpu = planner.Memory(device=140 * GIB, host=120 * GIB, on_gpu=True)
    text = "\n".join(planner.describe(planner.plan_run(cfg, args, gpu), gpu, args))
    assert "attention kernel: sdpa (gather + fused SDPA) for dense parts" in text, text
    args.sparse = True  # one 8192-query block: 4096 tokens of selected history gathered, then the chunk's 8192
    sparse = planner.parts(cfg, args, q_block=8192)
    assert sparse.device[planner.SDPA_TEMPORARIES] == per_token * (4096 + 8192)
    assert planner.SDPA_TEMPORARIES not in sparse.growing
    blocks = planner.parts(cfg, args, q_block=128).device  # 64 blocks: Triton's history, the chunk's own gathered
    assert blocks[planner.SDPA_TEMPORARIES] == per_token * 8192
    assert blocks[planner.SDPA_QUERY_TEMPORARIES] == per_query * 8192
    text = "\n".join(planner.describe(planner.plan_run(cfg, args, gpu), gpu, args))
    assert "attention kernel: sdpa (gather + fused SDPA) for sparse parts of one query block" in text, text


def test_attn_kernel_auto_is_sdpa_for_large_dense_bf16_chunks_on_a_gpu():
    """--attn-kernel auto (the default) is the plan's choice, recorded with its reason: sdpa for bf16 attention (dense
    or sparse) on a GPU in chunks of batch x tokens x hidden >= 2^22 (the plan then counts its temporaries), triton
    for smaller chunks (host-bound), fp32 compute (the CUDA ops refuse it) and CPUs. A given kernel stays."""
    gpu = planner.Memory(device=140 * GIB, host=120 * GIB, on_gpu=True)

    def choose(*argv, gpu_run=True):
        args = settings("--dtype", "bfloat16", "--attn", "dense", *argv, gpu=gpu_run, auto=True)
        plan, chosen = plan_auto.plan_auto(preset(args.model), args, gpu)
        return chosen.attn_kernel, [w for w in chosen.precision_why if w.startswith("--attn-kernel")], plan

    seven_b = ("--model", "qwen2.5-7b", "--seq", "131072", "--chunk", "8192")
    kernel, why, plan = choose(*seven_b)
    assert (kernel, why) == ("sdpa", ["--attn-kernel sdpa (auto: gather + cuDNN for bf16 chunks on a GPU)"])
    assert planner.SDPA_TEMPORARIES in plan.device
    kernel, why, plan = choose("--model", "small", "--seq", "65536", "--chunk", "4096")  # 4096 x 512 = 2^21
    assert kernel == "triton" and "2,097,152 < 4,194,304: host-bound" in why[0], why
    assert planner.SDPA_TEMPORARIES not in plan.device
    assert choose("--model", "small", "--seq", "65536", "--chunk", "8192")[0] == "sdpa"  # 2^22
    kernel, why, plan = choose(*seven_b, "--attn", "sparse")  # 128-query blocks: the chunk's own K/V gathered
    assert kernel == "sdpa" and plan.device[planner.SDPA_TEMPORARIES] > 0
    assert choose(*seven_b, "--dtype", "float32")[0] == "triton"
    assert choose(*seven_b, gpu_run=False)[:2] == ("triton", ["--attn-kernel triton (auto: not a GPU)"])
    assert choose(*seven_b, "--attn-kernel", "triton")[:2] == ("triton", [])  # given: kept, nothing to say


def test_kept_activations_are_planned():
    """--keep-activations N: N chunks' activations more on the device, at most every chunk but the last (7B at
    32K, chunk 8192: 4 chunks, so 9 keeps 3), and the attention outputs of kept chunks are not asked of the output
    cache (stage 2 does not repeat their forward)."""
    argv = ("--model", "qwen2.5-7b", "--seq", "32768", "--chunk", "8192", "--dtype", "bfloat16", "--attn", "dense")
    cfg = preset("qwen2.5-7b")
    base = planner.parts(cfg, settings(*argv))
    chunk = base.device["activations (one 8192-token chunk)"]
    assert planner.KEPT_ACTIVATIONS not in base.device
    # each kept chunk also holds the bf16 copies its matmuls made of the fp32 weights, and its last hidden state and
    # the head's gradient (fp32): the H200's small model peaked at 0.545 GiB per kept 4096-token chunk, as here
    per_kept = chunk + 2 * 7_615_616_512 + 2 * 4 * 3584 * 8192
    for keep, kept in ((1, 1), (9, 3)):
        plan = planner.parts(cfg, settings(*argv, "--keep-activations", str(keep)))
        assert plan.device[planner.KEPT_ACTIVATIONS] == kept * per_kept
        assert plan.device_per_token == base.device_per_token  # not growing with --seq
    gpu = planner.Memory(device=1000 * GIB, host=120 * GIB, on_gpu=True)  # room for every output
    per_token = planner.PagedKVStore.output_bytes_per_token(cfg, torch.bfloat16)
    for keep, recomputed in ((0, 32768 - 8192), (1, 32768 - 2 * 8192), (3, 0)):
        plan = planner.plan_run(cfg, settings(*argv, "--keep-activations", str(keep)), gpu)
        assert plan.device[planner.OUTPUT_CACHE] == per_token * recomputed


def test_keep_activations_auto_takes_half_of_what_the_output_cache_leaves():
    """--keep-activations auto (the default): after the output cache (OUTPUT_CACHE_SHARE of the spare memory), as many
    chunks as KEPT_SHARE of what is left holds, at most every chunk but the last; the cache then drops the kept
    chunks' outputs. Offloaded pages or no spare memory: none. plan_auto records the choice and its reason."""
    argv = ("--model", "qwen2.5-0.5b", "--seq", "65536", "--chunk", "8192", "--dtype", "bfloat16", "--attn", "dense")
    cfg = preset("qwen2.5-0.5b")
    args = settings(*argv)
    assert args.keep_activations == "auto"
    fixed = planner.parts(cfg, args)  # auto counts nothing until plan_run chooses
    assert planner.KEPT_ACTIVATIONS not in fixed.device and fixed.keep_activations == 0
    chunk = planner.kept_chunk_bytes(cfg, args)
    cache = planner.PagedKVStore.output_bytes_per_token(cfg, torch.bfloat16) * (65536 - 8192)
    for kept in (0, 1, 3):  # free memory such that the spare after the whole cache holds 2 * kept + 1/2 chunks
        spare = 2 * cache + (2 * kept + 0.5) * chunk
        free = (sum(fixed.device.values()) + spare) / planner.USABLE_SHARE + 1024
        plan = planner.plan_run(cfg, args, planner.Memory(device=int(free), host=100 * GIB, on_gpu=True))
        assert plan.keep_activations == kept
        assert plan.device.get(planner.KEPT_ACTIVATIONS, 0) == kept * chunk
        assert plan.device[planner.OUTPUT_CACHE] == cache * (7 - kept) // 7  # the kept chunks' outputs dropped
    roomy = planner.Memory(device=1000 * GIB, host=100 * GIB, on_gpu=True)
    plan, chosen = plan_auto.plan_auto(cfg, settings(*argv, auto=True), roomy)
    assert plan.keep_activations == chosen.keep_activations == 7  # 8 chunks: every one but the last
    assert plan.device[planner.OUTPUT_CACHE] == 0
    assert "--keep-activations 7 (auto: the output cache first, then half of what is left)" in chosen.precision_why
    plan, chosen = plan_auto.plan_auto(cfg, settings(*argv, "--offload", "on", auto=True), roomy)
    assert chosen.keep_activations == 0 and planner.KEPT_ACTIVATIONS not in plan.device
    assert "--keep-activations 0 (auto: pages offloaded)" in chosen.precision_why
    # sparse attention: none (slower at 1M on the H200 with them); a given number is kept
    plan, chosen = plan_auto.plan_auto(cfg, settings(*argv[:-1], "sparse", auto=True), roomy)
    assert chosen.keep_activations == 0 and "--keep-activations 0 (auto: sparse attention)" in chosen.precision_why
    given = settings(*argv[:-1], "sparse", "--keep-activations", "2", auto=True)
    plan, chosen = plan_auto.plan_auto(cfg, given, roomy)
    assert chosen.keep_activations == 2 and plan.device[planner.KEPT_ACTIVATIONS] == 2 * chunk


def test_optimizer_state_is_what_torch_keeps():
    """The plan's optimizer bytes against AdamW's and Adafactor's real state after one step."""
    cfg = preset("tiny")
    model = Model(cfg)
    for name, make in (("adamw", torch.optim.AdamW), ("adafactor", torch.optim.Adafactor)):
        optimizer = make(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        real = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values())
        assert planner.optimizer_state_bytes(cfg, name) == real, name


def test_offload_only_when_the_pool_does_not_fit():
    args = settings("--model", "qwen2.5-0.5b", "--seq", "262144", "--dtype", "bfloat16", "--attn", "dense")
    cfg = preset("qwen2.5-0.5b")
    gpu = planner.Memory(device=40 * GIB, host=64 * GIB, on_gpu=True)
    plan = planner.plan_run(cfg, args, gpu)
    assert not plan.offload and plan.fits  # 9 GiB of pages fit next to the model
    assert plan.device[planner.OUTPUT_CACHE] > 0  # and some of the rest keeps stage-1 outputs
    args.seq = 2**21  # 72 GiB of pages: offloaded, and 64 GiB of host memory is not enough either
    plan = planner.plan_run(cfg, args, gpu)
    assert plan.offload and sum(plan.host.values()) == 36_864 * 2**21
    assert not plan.fits and "pinned host memory" in plan.refusal and "longest --seq that fits is" in plan.refusal
    args.offload = "off"
    plan = planner.plan_run(cfg, args, gpu)
    assert not plan.offload and "needs" in plan.refusal and "of cuda" in plan.refusal
    args.offload, args.sparse = "auto", True  # sparse attention offloads alike; its selections go to the host too
    plan = planner.plan_run(cfg, args, gpu)
    assert plan.offload and "sparse index (page summaries)" in plan.device and "sparse index (selections)" in plan.host
    assert plan.q_block == args.chunk == 4096  # offloaded: one selection per chunk (fewer pages cross PCIe)


def test_the_longest_seq_named_by_a_refusal_fits():
    """Dense pages on the GPU grow exactly linearly: the named length fits, one token more does not."""
    args = settings("--model", "qwen2.5-0.5b", "--seq", "1000000", "--attn", "dense", "--offload", "off")
    cfg = preset("qwen2.5-0.5b")
    gpu = planner.Memory(device=24 * GIB, host=64 * GIB, on_gpu=True)
    refusal = planner.plan_run(cfg, args, gpu).refusal
    longest = int(refusal.rsplit(" ", 1)[-1])
    args.seq = longest
    assert planner.plan_run(cfg, args, gpu).fits
    args.seq = longest + 1
    assert not planner.plan_run(cfg, args, gpu).fits


def test_a_refusal_without_any_fitting_length_names_the_fixed_parts():
    args = settings("--model", "qwen2.5-7b", "--seq", "8192", "--chunk", "4096")
    plan = planner.plan_run(preset("qwen2.5-7b"), args, planner.Memory(40 * GIB, 64 * GIB, on_gpu=True))
    assert "no --seq fits" in plan.refusal and "optimizer (adamw)" in plan.refusal, plan.refusal


def test_a_cpu_plan_counts_one_ram_and_labels_it():
    """On a CPU the device and host parts share the RAM: no [gpu] tags, no pinned memory, no offload by auto."""
    args = settings("--seq", "4096", "--chunk", "1024", "--batch", "2", gpu=False)
    ram = planner.Memory(device=8 * GIB, host=8 * GIB, on_gpu=False)
    plan = planner.plan_run(preset("tiny"), args, ram)
    text = "\n".join(planner.describe(plan, ram, args))
    assert not plan.offload and text.endswith("FITS")
    assert "[cpu]" in text and "[gpu]" not in text and "pinned" not in text and "GPU" not in text, text
    args.offload = "on"  # forced: the pages are counted against the same RAM as the rest
    plan = planner.plan_run(preset("tiny"), args, planner.Memory(device=GIB // 100, host=8 * GIB, on_gpu=False))
    assert plan.offload and "of RAM" in plan.refusal
    assert "REFUSED" in planner.describe(plan, ram, args)[-1]


def test_mlp_cache_takes_half_of_what_the_output_cache_leaves():
    """After the output cache, stage 1's MLP outputs (every layer's but the last, for the chunks stage 2
    recomputes) take MLP_CACHE_SHARE of what is left, at most what the step keeps; none with offloaded pages."""
    argv = ("--model", "qwen2.5-0.5b", "--seq", "65536", "--chunk", "8192", "--dtype", "bfloat16", "--attn", "sparse")
    cfg = preset("qwen2.5-0.5b")
    args = settings(*argv)
    fixed = planner.parts(cfg, args)
    cache = planner.PagedKVStore.output_bytes_per_token(cfg, torch.bfloat16) * (65536 - 8192)
    need = (cfg.num_hidden_layers - 1) * cfg.hidden_size * 2 * (65536 - 8192)
    for spare, mlp in ((2 * cache, cache // 2), (2 * cache + 3 * need, need)):  # half the rest; all it needs
        free = (sum(fixed.device.values()) + spare) / planner.USABLE_SHARE
        plan = planner.plan_run(cfg, args, planner.Memory(device=int(free), host=100 * GIB, on_gpu=True))
        assert plan.device[planner.OUTPUT_CACHE] == cache
        assert abs(plan.device[planner.MLP_CACHE] - mlp) <= 1024
    plan = planner.plan_run(cfg, settings(*argv, "--offload", "on"),
                            planner.Memory(device=1000 * GIB, host=100 * GIB, on_gpu=True))
    assert planner.MLP_CACHE not in plan.device
