"""Several processes on the CPU (gloo): tensor, data and context parallelism give one process's loss and gradients.

One spawned job of two processes runs every check (each process pays torch's import once) and writes its results;
the tests below read them. In fp32 the only differences from one process are summation orders (partial products
summed across ranks): relative error <= 1e-5 per parameter, every parameter compared (embedding, norms and the
lowest layer included: a tensor-parallel backward that forgets to all-reduce the input gradient of the column-split
projections gets those wrong, and only those). The train.py runs launch as torchrun would (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment) and call train.main in each process.
"""

import json
import math
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
TOL = 1e-5
TRAIN = ["--model", "tiny", "--device", "cpu", "--seq", "64", "--chunk", "32", "--page-size", "16",
         "--steps", "3", "--eval-interval", "2", "--eval-iters", "1", "--attn", "dense"]


def train_args(out_dir, *extra):
    """TRAIN on a small byte file (opening the embedded corpus would take seconds per run), into out_dir/out."""
    return TRAIN + ["--data", os.path.join(out_dir, "data.txt"), *extra]


def write_data(out_dir):
    """out_dir/data.txt: 20,000 printable bytes, what train_args trains on."""
    with open(os.path.join(out_dir, "data.txt"), "wb") as f:
        f.write(torch.randint(32, 127, (20000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy()
                .tobytes())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# train.py runs at --tp 2 beyond fp32 AdamW: bf16 weights (fp32 masters and moments), Adafactor, LoRA
NEW_TP_RUNS = {"tp_bf16": ["--params-dtype", "bfloat16", "--dtype", "bfloat16"],
               "tp_adafactor": ["--optimizer", "adafactor"],
               "tp_lora": ["--lora-rank", "4", "--lr", "1e-2"]}
BF16_TOL = 2e-2  # bf16 compute: the row-parallel partial products are rounded to bf16 before their sum
BF16_STATE_TOL = 5e-2  # its AdamW moments (relative L2; seen 2.1e-2 on a 32-element bias)


# ------------------------------------------------------------------------------------------------ in each process


def tiny_model(tie):
    from model import Model, ModelConfig
    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))
    with torch.no_grad():  # random biases and norm weights, so that every gradient is exercised
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def step(model, idx, targets, sparse):
    """One chunked step (chunk 32, page 16) on the paged store with the plain-PyTorch kernel; returns the loss."""
    from attention import ReferenceKernel
    from chunk_train import chunked_step
    from paged_kv import PagedKVStore
    model.zero_grad(set_to_none=True)
    store = PagedKVStore.for_sequence(model, idx.shape[0], idx.shape[1], 16, torch.float32, "cpu", sparse=sparse,
                                      kernel=ReferenceKernel())
    return chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store)


def errors(loss, ref_loss, grads, ref_model):
    """Relative errors of the loss and of every parameter's gradient against the one-process model's."""
    out = {"loss": abs(loss - ref_loss) / abs(ref_loss)}
    for name, p in ref_model.named_parameters():
        out[name] = ((grads[name] - p.grad).norm() / p.grad.norm()).item()
    return out


def check_tensor_parallel(tie, sparse):
    """Tensor parallelism over both processes against one process on the same batch (2 sequences of 96 tokens)."""
    import tensor_parallel
    g = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, 128, (2, 96), generator=g) for _ in range(2))
    ref = tiny_model(tie)
    ref_loss = step(ref, idx, targets, sparse)
    model = tiny_model(tie)
    tp = tensor_parallel.shard_model(model)
    assert model.layers[0].self_attn.q_proj.weight.shape[0] == 32  # 2 of the 4 heads
    loss = step(model, idx, targets, sparse)
    grads = {name: tp.gather(name, p.grad) for name, p in model.named_parameters()}
    return errors(loss, ref_loss, grads, ref)


def relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else (a - b).norm().item()


def check_tensor_parallel_lora():
    """LoRA (rank 4, all seven projections, B random so that every factor gets a gradient) under --tp 2: the loss
    and every adapter's gradient equal one process's (after the whole factors' partial gradients are summed), and
    the adapters-only state gathers whole."""
    import lora
    import parallel
    import tensor_parallel
    g = torch.Generator().manual_seed(5)
    idx, targets = (torch.randint(0, 128, (2, 96), generator=g) for _ in range(2))

    def lora_model():
        model = lora.apply_lora(tiny_model(False), 4, 8.0)
        with torch.no_grad():
            for m in lora.lora_modules(model).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
        return model
    g.manual_seed(6)
    ref = lora_model()
    ref_loss = step(ref, idx, targets, None)
    g.manual_seed(6)
    model = lora_model()
    tp = tensor_parallel.shard_model(model)
    assert len(tp.partial) == 14 and model.layers[0].self_attn.q_proj.lora_B.shape == (32, 4)
    loss = step(model, idx, targets, None)
    tp.reduce_partial_gradients(model)
    out = {"loss": abs(loss - ref_loss) / abs(ref_loss)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = relative(tp.gather(name, p.grad), dict(ref.named_parameters())[name].grad)
    layout = parallel.Layout(0, WORLD, WORLD, 1, None, None, torch.device("cpu"), False, tensor=tp)
    state, _ = layout.full_state(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                                 only_trainable=True)
    whole = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    out["adapters-only state not whole"] = float(state.keys() != whole.keys() or any(
        not torch.equal(state[n], p) for n, p in whole.items()))
    return out


def check_optimizer_state(rank):
    """Two optimizer steps under --tp 2 against one process, then the state gathered whole (parallel.Layout.
    full_state) and cut back (load_optimizer_state): Adafactor (tensor_parallel.Adafactor against torch's: factors
    reduced over the split dim, norms over the whole tensor) on fp32 weights, and MixedPrecisionAdamW (fp32 masters
    and moments) on bf16 weights with fp32 gradients. Relative errors of the weights and of every state tensor;
    the round trip must be exact."""
    import parallel
    import tensor_parallel
    from optim import MixedPrecisionAdamW
    out = {}
    for kind in ("adafactor", "bf16 adamw"):
        def build(model, tp=None):
            groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                      {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
            if kind == "bf16 adamw":
                return MixedPrecisionAdamW(groups, lr=1e-2, moments="fp32")
            if tp is None:
                return torch.optim.Adafactor(groups, lr=1e-2)
            return tensor_parallel.Adafactor(groups, tp=tp, names={p: n for n, p in model.named_parameters()},
                                             lr=1e-2)

        def train(model, opt, tp=None):
            for i in range(2):  # gradients: a function of the parameter's full index (the same on every rank)
                for name, p in model.named_parameters():
                    full = (tp.gather(name, p.detach()) if tp else p.detach()).float()
                    grad = torch.sin(torch.arange(full.numel()).view(full.shape) * 0.37 + i) * (1 + full.abs())
                    if kind == "bf16 adamw":
                        p.main_grad = tp.shard(name, grad) if tp else grad
                    else:
                        p.grad = tp.shard(name, grad) if tp else grad
                opt.step()

        dtype = torch.bfloat16 if kind == "bf16 adamw" else torch.float32
        ref = tiny_model(False).to(dtype)
        ref_opt = build(ref)
        train(ref, ref_opt)
        model = tiny_model(False).to(dtype)
        tp = tensor_parallel.shard_model(model)
        opt = build(model, tp)
        train(model, opt, tp)
        for name, p in ref.named_parameters():
            out[f"{kind} {name}"] = relative(tp.gather(name, dict(model.named_parameters())[name].detach()).float(),
                                             p.detach().float())
        layout = parallel.Layout(rank, WORLD, WORLD, 1, None, None, torch.device("cpu"), False, tensor=tp)
        _, full = layout.full_state(model, opt)
        ref_state = ref_opt.state_dict()["state"]
        for i, state in ref_state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim():
                    out[f"{kind} state {i} {key}"] = relative(full["state"][i][key], value)
        again = build(model, tp)
        layout.load_optimizer_state(again, model, full)
        out[f"{kind} round trip not exact"] = float(any(
            not torch.equal(again.state[p][k], v) for p, s in opt.state.items() for k, v in s.items()
            if torch.is_tensor(v)))
    return out


def check_data_parallel(rank):
    """Each process trains on its own sequence; the averaged gradients equal one process's on both sequences."""
    import torch.distributed as dist
    from data_parallel import average_gradients
    g = torch.Generator().manual_seed(2)
    idx, targets = (torch.randint(0, 128, (2, 96), generator=g) for _ in range(2))
    ref = tiny_model(True)
    ref_loss = step(ref, idx, targets, None)
    model = tiny_model(True)
    loss = step(model, idx[rank:rank + 1], targets[rank:rank + 1], None)
    average_gradients(list(model.parameters()))
    loss_t = torch.tensor(loss)
    dist.all_reduce(loss_t)
    return errors(loss_t.item() / WORLD, ref_loss, {n: p.grad for n, p in model.named_parameters()}, ref)


def check_context_parallel():
    """The history sharded over both processes (chunks round-robin: 4 chunks of 32 tokens, 3 of them history), one
    process's loss and gradients; also with packed documents, clear_grad (detach_history) where only the owner
    holds the pages, through --attn-kernel sdpa's kernel (each rank's parts, then the merge across ranks), and with
    two chunks' forwards kept from stage 1 (keep_activations: their backward runs after the last chunk's)."""
    from attention import ReferenceKernel, SDPAKernel
    from chunk_train import chunked_step
    from context_parallel import ShardedKVStore
    from paged_kv import PagedKVStore
    g = torch.Generator().manual_seed(3)
    idx, targets = (torch.randint(0, 128, (2, 112), generator=g) for _ in range(2))  # a partial last chunk
    # packed documents: row 0 starts documents at 20 (in chunk 0) and 70 (chunk 2), row 1 at 40 (chunk 1)
    pos = torch.arange(112)
    docs = torch.stack([torch.where(pos >= 70, 70, torch.where(pos >= 20, 20, 0)), torch.where(pos >= 40, 40, 0)])
    out = {}
    for variant, doc_start, detach, kernel, keep in (("", None, False, ReferenceKernel(), 0),
                                                     ("detached ", None, True, ReferenceKernel(), 0),
                                                     ("documents ", docs, False, ReferenceKernel(), 0),
                                                     ("sdpa ", None, False, SDPAKernel(fallback=ReferenceKernel()), 0),
                                                     ("kept ", None, False, ReferenceKernel(), 2)):
        ref = tiny_model(False)
        ref_loss = chunked_step(ref, idx, targets, chunk_size=32, page_size=16, detach_history=detach,
                                doc_start=doc_start, store=PagedKVStore.for_sequence(ref, 2, 112, 16, torch.float32,
                                                                                     "cpu", kernel=ReferenceKernel()))
        model = tiny_model(False)
        store = ShardedKVStore.for_sequence(model, 2, 112, 32, 16, torch.float32, "cpu", kernel=kernel)
        assert store.inner.allocator.num_pages == 2 * 2 * 4  # 2 layers x 2 rows x 2 chunks of 2 pages: half
        loss = chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store, detach_history=detach,
                            doc_start=doc_start, keep_activations=keep)
        errs = errors(loss, ref_loss, {n: p.grad for n, p in model.named_parameters()}, ref)
        out.update({variant + name: err for name, err in errs.items()})
    # LseMerge on an lse laid out [B, C, H] in memory on one rank only (what the CPU SDPA op returned before its
    # lse was made contiguous): all_reduce pairs elements in memory order, so it must see the same layout
    import torch.distributed as dist
    from context_parallel import LseMerge
    g = torch.Generator().manual_seed(10 + dist.get_rank())
    o, lse = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 4, 5, generator=g)
    want = LseMerge().forward(o, lse)
    strided = lse.transpose(1, 2).contiguous().transpose(1, 2) if dist.get_rank() == 0 else lse
    got = LseMerge().forward(o, strided)
    out["lse merge of a strided lse"] = max(relative(got[0], want[0]), relative(got[1], want[1]))
    return out


def check_context_parallel_sparse():
    """Sparse attention with the history sharded (4 chunks of 32 tokens, pages of 16, 3 history pages per 16-query
    block out of up to 6: sink, recent and one top page): one process's selections (every rank scores every
    page), loss and gradients, for MeanKey and Quest, and with packed documents (-1 selections)."""
    from attention import ReferenceKernel
    from chunk_train import chunked_step
    from context_parallel import ShardedKVStore
    from paged_kv import PagedKVStore
    from sparse_attn import MeanKey, Quest, SparseConfig
    g = torch.Generator().manual_seed(4)
    idx, targets = (torch.randint(0, 128, (2, 112), generator=g) for _ in range(2))
    pos = torch.arange(112)
    docs = torch.stack([torch.where(pos >= 70, 70, torch.where(pos >= 20, 20, 0)), torch.where(pos >= 40, 40, 0)])
    out = {}
    for variant, rule, doc_start in (("meankey ", MeanKey(), None), ("quest ", Quest(), None),
                                     ("documents ", MeanKey(), docs)):
        sparse = SparseConfig(budget=48, q_block=16, rule=rule)
        ref = tiny_model(False)
        ref_store = PagedKVStore.for_sequence(ref, 2, 112, 16, torch.float32, "cpu", sparse=sparse,
                                              kernel=ReferenceKernel())
        ref_store.selector.log = []
        ref_loss = chunked_step(ref, idx, targets, chunk_size=32, page_size=16, doc_start=doc_start, store=ref_store)
        model = tiny_model(False)
        store = ShardedKVStore.for_sequence(model, 2, 112, 32, 16, torch.float32, "cpu", kernel=ReferenceKernel(),
                                            sparse=sparse)
        store.selector.log = []
        loss = chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store, doc_start=doc_start)
        errs = errors(loss, ref_loss, {n: p.grad for n, p in model.named_parameters()}, ref)
        calls = list(zip(store.selector.log, ref_store.selector.log))
        assert len(calls) == len(ref_store.selector.log) > 0 and max(c.selection.shape[3] for c in
                                                                       ref_store.selector.log) == 3
        errs["selections differ"] = float(sum(not torch.equal(a.selection, b.selection) for a, b in calls))
        out.update({variant + name: err for name, err in errs.items()})
    return out


def check_least_memory(rank):
    """Each rank's plan.Memory differs; least_memory gives every rank the least of each (so that the plan's choices
    agree across ranks)."""
    import parallel
    from plan import Memory
    mine = Memory(device=(100 - rank) * 2**30, host=(50 + rank) * 2**30, on_gpu=True, host_available=7)
    least = parallel.least_memory(mine, torch.device("cpu"))
    return [least.device, least.host, least.on_gpu, least.host_available]


def worker(rank, ports, out_dir):
    import time
    t0 = time.perf_counter()
    # the reference attention and plain layer ops: Triton's interpreter (set by conftest) would be slow here
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import torch.distributed as dist
    import train
    from sparse_attn import MeanKey, SparseConfig
    results = {}
    os.environ["MASTER_PORT"] = str(ports[0])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results["tp_dense_untied"] = check_tensor_parallel(False, None)
    results["tp_sparse_tied"] = check_tensor_parallel(True, SparseConfig(budget=32, q_block=16, rule=MeanKey()))
    t_new = time.perf_counter()
    results["tp_lora"] = check_tensor_parallel_lora()
    results["tp_optimizer_state"] = check_optimizer_state(rank)
    results["time_new_checks"] = time.perf_counter() - t_new
    results["dp"] = check_data_parallel(rank)
    results["cp"] = check_context_parallel()
    t_sparse = time.perf_counter()
    results["cp_sparse"] = check_context_parallel_sparse()
    results["time_cp_sparse"] = time.perf_counter() - t_sparse
    results["least_memory"] = check_least_memory(rank)
    dist.destroy_process_group()
    results["time_checks"] = time.perf_counter() - t0

    from interrupt import stop_after  # imports train: after the environment above is set
    StopAfterTwo = stop_after(2)  # as if Ctrl-C came during step 2

    runs = [("tp_full", ["--tp", "2", "--batch", "2"], train.StopRequest),
            ("tp_part", ["--tp", "2", "--batch", "2"], StopAfterTwo),
            ("tp_part", ["--tp", "2", "--batch", "2", "--resume"], train.StopRequest),
            ("dp", ["--tp", "1", "--batch", "1"], train.StopRequest),
            ("cp_part", ["--cp", "2", "--batch", "2"], StopAfterTwo),  # context parallel: stopped, resumed
            ("cp_part", ["--cp", "2", "--batch", "2", "--resume"], train.StopRequest)]
    for name, flags in NEW_TP_RUNS.items():  # stopped after step 2 and resumed, 2 ranks
        runs += [(name, ["--tp", "2", "--batch", "2", *flags], StopAfterTwo),
                 (name, ["--tp", "2", "--batch", "2", *flags, "--resume"], train.StopRequest)]
    results["status"] = []
    for (out, args, stop), port in zip(runs, ports[1:]):
        os.environ["MASTER_PORT"] = str(port)
        train.StopRequest, StopAfterTwo.reads = stop, 0
        results["status"].append(train.main(train_args(out_dir, *args, "--out", os.path.join(out_dir, out))))
    results["time_runs"] = time.perf_counter() - t0
    if rank == 0:  # one process (no torchrun environment): the reference run, and a resume of the 2-rank run
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            del os.environ[name]
        train.StopRequest = StopAfterTwo.__mro__[1]
        shutil.copytree(os.path.join(out_dir, "tp_full"), os.path.join(out_dir, "tp_resumed_alone"))
        results["status"].append(train.main(train_args(out_dir, "--batch", "2", "--out",
                                                       os.path.join(out_dir, "single"))))
        results["status"].append(train.main(train_args(out_dir, "--batch", "2", "--steps", "4", "--out",
                                                       os.path.join(out_dir, "tp_resumed_alone"), "--resume")))
        for name, flags in NEW_TP_RUNS.items():  # one process: the reference, and a resume of the 2-rank checkpoint
            results["status"].append(train.main(train_args(out_dir, "--batch", "2", *flags, "--out",
                                                           os.path.join(out_dir, name + "_single"))))
            if name != "tp_lora":
                shutil.copytree(os.path.join(out_dir, name), os.path.join(out_dir, name + "_alone"))
                results["status"].append(train.main(train_args(out_dir, "--batch", "2", "--steps", "4", *flags,
                                                               "--out", os.path.join(out_dir, name + "_alone"),
                                                               "--resume")))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def worker4(rank, ports, out_dir):
    """Four ranks: train.py at --tp 2 --cp 2 (one sequence row per step, history split, heads split) and at --tp 2
    over 2 data-parallel ranks (--batch 1 each); rank 0 then runs one process at --batch 2, the same global batch.
    The layouts' groups compose: each run's losses must be one process's."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="4")
    torch.set_num_threads(1)
    import train
    status = []
    for (name, flags), port in zip((("tp2_cp2", ["--tp", "2", "--cp", "2", "--batch", "2"]),
                                    ("tp2_dp2", ["--tp", "2", "--batch", "1"])), ports):
        os.environ["MASTER_PORT"] = str(port)
        status.append(train.main(train_args(out_dir, *flags, "--out", os.path.join(out_dir, name))))
    if rank == 0:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            del os.environ[name]
        status.append(train.main(train_args(out_dir, "--batch", "2", "--out", os.path.join(out_dir, "single"))))
    with open(os.path.join(out_dir, f"status{rank}.json"), "w") as f:
        json.dump(status, f)


# ------------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the spawned job once; its results per rank, and its directory (the train.py runs' --out dirs)."""
    out_dir = str(tmp_path_factory.mktemp("parallel"))
    write_data(out_dir)
    mp.start_processes(worker, args=([free_port() for _ in range(7 + 2 * len(NEW_TP_RUNS))], out_dir), nprocs=WORLD,
                       join=True, start_method="spawn")
    results = []
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results, out_dir


def test_every_rank_plans_with_the_least_memory(job):
    for results in job[0]:
        assert results["least_memory"] == [(100 - (WORLD - 1)) * 2**30, 50 * 2**30, True, 7]


@pytest.mark.parametrize("check", ["tp_dense_untied", "tp_sparse_tied", "tp_lora", "tp_optimizer_state", "dp", "cp",
                                   "cp_sparse"])
def test_loss_and_every_gradient_equal_one_process(job, check):
    for rank, results in enumerate(job[0]):
        errs = results[check]
        assert len(errs) > 20  # the loss and every parameter (2 layers: 15 each, with the embedding, norm, head)
        bad = {name: err for name, err in errs.items() if not err <= TOL}
        assert not bad, f"rank {rank}, {check}: relative errors above {TOL}: {bad}"


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_train_across_ranks_resumes_and_matches_one_process(job):
    """train.py on 2 ranks (--tp 2; --tp 1: data parallel, --batch 1 per rank; --cp 2, stopped after step 2 and
    resumed): exit statuses, the resumed run's losses equal the uninterrupted one's exactly, every loss equals one
    process's (--batch 2), and the checkpoint is one process's: full tensors, which a single process resumes."""
    from model import Model, ModelConfig
    results, out_dir = job
    assert results[0]["status"][:6] + results[0]["status"][12:14] == [0, 130, 0, 0, 130, 0, 0, 0]
    assert results[1]["status"][:6] == [0, 130, 0, 0, 130, 0]
    full, part, dp, cp, single, alone = (os.path.join(out_dir, name) for name in
                                         ("tp_full", "tp_part", "dp", "cp_part", "single", "tp_resumed_alone"))
    assert losses(part) == losses(full) and len(losses(full)) == 3
    for run in (full, dp, cp):
        torch.testing.assert_close(losses(run), losses(single), rtol=TOL, atol=0)
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    model = Model(ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])  # strict: every tensor whole
    ref = torch.load(os.path.join(single, "ckpt.pt"), weights_only=True)
    for name, value in ref["model"].items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=0, atol=1e-5, msg=name)
    for i, state in ref["optimizer"]["state"].items():  # AdamW's moments gathered whole
        torch.testing.assert_close(ckpt["optimizer"]["state"][i]["exp_avg"], state["exp_avg"], rtol=0, atol=1e-6)
    assert losses(alone)[:3] == losses(full) and len(losses(alone)) == 4  # one process continued it


def near(a, b) -> bool:
    """Within TOL relative L2, or 1e-8 absolute (a tensor near zero: Adafactor's biases, 2e-6 after 3 steps from 0)."""
    return relative(a, b) <= TOL or (a - b).abs().max().item() <= 1e-8


def test_tp_bf16_adafactor_lora_resume_and_match_one_process(job):
    """train.py at --tp 2 with bf16 weights (fp32 masters and moments), Adafactor, LoRA (rank 4, all seven
    projections): stopped after step 2 and resumed by 2 ranks, its losses are one process's (bf16: within BF16_TOL,
    else TOL); the checkpoint's weights and optimizer state are one process's, whole; one process resumes it (bf16,
    Adafactor); the LoRA run's OUT/lora holds the whole adapters, as one process's does."""
    from safetensors.torch import load_file
    results, out_dir = job
    statuses = [130, 0] * len(NEW_TP_RUNS)  # each stopped after step 2, then resumed
    assert results[1]["status"][6:] == statuses and results[0]["status"][6:12] == statuses
    assert results[0]["status"][14:] == [0, 0, 0, 0, 0]  # one process: bf16 ref + resume, adafactor ref + resume, lora
    for name in NEW_TP_RUNS:
        run, single = os.path.join(out_dir, name), os.path.join(out_dir, name + "_single")
        assert len(losses(run)) == 3
        torch.testing.assert_close(losses(run), losses(single), rtol=BF16_TOL if name == "tp_bf16" else TOL, atol=0,
                                   msg=name)
        ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
        ref = torch.load(os.path.join(single, "ckpt.pt"), weights_only=True)
        assert ckpt["model"].keys() == ref["model"].keys()
        # fp32: relative L2 errors (Adam's g / sqrt(v) magnifies the rounding of near-zero gradients elementwise:
        # LoRA's B, zero at the start, 3e-7 apart at 2.5e-2). bf16: AdamW moves a weight by about lr a step, and
        # under bf16 compute the sign of a near-zero gradient may differ (3 steps: up to 6 lr apart; seen 3.9e-3 at
        # lr 1e-3); its moments within BF16_STATE_TOL
        lr = ckpt["args"]["lr"]
        for key, value in ref["model"].items():
            if name == "tp_bf16":
                assert (ckpt["model"][key].float() - value.float()).abs().max() <= 6 * lr, (name, key)
            else:
                assert near(ckpt["model"][key], value), (name, key)
        for i, state in ref["optimizer"]["state"].items():
            for key, value in state.items():
                if not (torch.is_tensor(value) and value.dim()):
                    continue
                ours = ckpt["optimizer"]["state"][i][key]
                assert ours.shape == value.shape and ours.dtype == value.dtype, f"{name} {i} {key}"
                if name == "tp_bf16" and key == "master":  # fp32 weights: as the weights above
                    assert (ours - value).abs().max() <= 6 * lr, (name, i, key)
                elif name == "tp_bf16":
                    assert relative(ours, value) <= BF16_STATE_TOL, (name, i, key)
                else:
                    assert near(ours, value), (name, i, key)
        if name != "tp_lora":
            assert losses(os.path.join(out_dir, name + "_alone"))[:3] == losses(run)
            assert len(losses(os.path.join(out_dir, name + "_alone"))) == 4
    ours = load_file(os.path.join(out_dir, "tp_lora", "lora", "adapter_model.safetensors"))
    theirs = load_file(os.path.join(out_dir, "tp_lora_single", "lora", "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 2
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and near(ours[key], value), key


def test_tp_without_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    import train
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = str(tmp_path / "run")
    assert train.main(TRAIN + ["--tp", "2", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tp 2 needs") and "torchrun" in err[0]
    assert not os.path.exists(os.path.join(out, "log.jsonl"))


def test_cp_refusals_and_rank_plan(tmp_path, capsys, monkeypatch):
    """--cp without torchrun, or with offloaded pages, is refused in one line (sparse attention is accepted); a
    rank's plan holds 1/cp of the pages and its tensor-parallel share of the weights."""
    import argparse

    import context_parallel
    import plan as planner
    import plan_auto
    import train
    from cli import UserError
    from model import ModelConfig
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train.main(TRAIN + ["--cp", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cp 2 needs 2 processes")
    context_parallel.check(argparse.Namespace(cp=2, seq=64, chunk=32, sparse=True, offload="auto"))  # accepted
    with pytest.raises(UserError, match="offloaded pages are not sharded"):
        context_parallel.check(argparse.Namespace(cp=2, seq=64, chunk=32, sparse=True, offload="on"))
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    args = argparse.Namespace(dtype="float32", grad_pages="float32", params_dtype="float32", optimizer="adamw",
                              seq=4096, chunk=512, batch=1, page_size=16, sparse=False, lora_rank=None)
    # under --tp, auto weights may be bf16 with fp32 moments (the plan picks them where fp32 weights do not fit);
    # bf16 and int8 moments are refused
    import parallel
    tp2 = argparse.Namespace(tp=2, cp=1)
    auto = argparse.Namespace(optimizer="adamw", params_dtype="auto", lora_rank=None, moments=None)
    parallel.check(tp2, cfg, auto)
    assert auto.params_dtype == "auto"
    squeezed = argparse.Namespace(**{**vars(args), "dtype": "bfloat16", "params_dtype": "auto", "moments": None,
                                     "tp": 2})
    assert plan_auto._precision_options(squeezed) == [("float32", None), ("bfloat16", "fp32")]
    for moments in ("bf16", "int8"):
        with pytest.raises(UserError, match=f"--tp 2 with --moments {moments}: not supported"):
            parallel.check(tp2, cfg, argparse.Namespace(optimizer="adamw", params_dtype="bfloat16", lora_rank=None,
                                                        moments=moments))
    whole = planner.parts(cfg, args)
    total = sum(math.prod(s) for s in planner.param_shapes(cfg))
    share = context_parallel.rank_plan(whole, cfg, total, tp=2, cp=4)
    pool = "KV/dKV page pool"
    assert share.device[pool] == whole.device[pool] // 4 and share.device_per_token == whole.device_per_token // 4
    split = context_parallel.tp_sharded_params(cfg)
    assert share.device["weights (fp32)"] == 4 * (total - split // 2)


def test_four_ranks_tp_with_cp_and_with_data_parallel_match_one_process(tmp_path):
    """torchrun-like launches of 4 processes: --tp 2 --cp 2, and --tp 2 x 2 data-parallel ranks; every loss of
    each equals one process's at the same global batch (the groups of parallel.from_env composed, not only each
    kind alone)."""
    out_dir = str(tmp_path)
    write_data(out_dir)
    mp.start_processes(worker4, args=([free_port() for _ in range(2)], out_dir), nprocs=4, join=True,
                       start_method="spawn")
    for rank in range(4):
        with open(os.path.join(out_dir, f"status{rank}.json")) as f:
            assert json.load(f) == [0, 0] + [0] * (rank == 0), rank
    single = losses(os.path.join(out_dir, "single"))
    assert len(single) == 3
    for name in ("tp2_cp2", "tp2_dp2"):
        torch.testing.assert_close(losses(os.path.join(out_dir, name)), single, rtol=TOL, atol=0, msg=name)
