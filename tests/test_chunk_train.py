"""Chunk-recurrent training equals full-sequence backprop: loss and every parameter gradient.

The reference store (contiguous buffers, PyTorch attention) checks the algorithm over many configurations; the paged
store with the Triton kernel (CPU interpreter here, real kernels on a GPU) checks the real path on fewer, as the
interpreter is slow, and with the plain-PyTorch reference kernel (attention.ReferenceKernel: what a CPU without the
interpreter runs) the same store's bookkeeping. All in fp32, where the only differences are summation order: rel.
err <= 1e-5 per parameter.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from attention import ReferenceKernel
from chunk_train import chunked_loss, chunked_step, fill_kv
from model import Model, ModelConfig, preset
from offload import OffloadedKVStore
from paged_kv import OutOfPages, PagedKVStore, ReferenceKVStore
from sparse_attn import SparseConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**preset("tiny").__dict__, **overrides})
    model = Model(cfg).to(DEVICE)
    with torch.no_grad():  # random biases and norm weights, so that every parameter's gradient is exercised
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def full_sequence_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def assert_grads_match(model, ref, tol=1e-5):
    for name, p in model.named_parameters():
        err = ((p.grad - ref[name]).norm() / ref[name].norm()).item()
        assert err <= tol, f"{name}: relative error {err:.2e}"


def check_exact(store_cls, batch, seq, chunk, page, seed, checkpoint=False, **overrides):
    model = tiny_model(seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)
    targets = torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)
    ref_loss, ref_grads = full_sequence_grads(model, idx, targets)
    store = store_cls.for_sequence(model, batch, seq, page, torch.float32, idx.device)
    loss = chunked_step(model, idx, targets, chunk_size=chunk, page_size=page, store=store, checkpoint=checkpoint)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_grads_match(model, ref_grads)
    return model, store, idx, targets


@pytest.mark.parametrize("batch,seq,chunk,page,checkpoint", [
    (1, 300, 64, 16, False),   # partial last chunk and page
    (2, 300, 64, 16, False),   # batch > 1
    (2, 256, 128, 32, False),  # chunks divide the sequence
    (1, 300, 300, 16, False),  # a single chunk
    (2, 200, 32, 16, True),    # many chunks, layers recomputed inside each chunk
])
def test_reference_store_is_exact(batch, seq, chunk, page, checkpoint):
    check_exact(ReferenceKVStore, batch, seq, chunk, page, seed=seq + chunk, checkpoint=checkpoint)


@pytest.mark.parametrize("batch,seq,chunk,page,heads,kv_heads,hidden", [
    # batch 2, GQA 2:1, head_dim 16: 4 chunks of 2 pages (history crosses chunk and page boundaries), the last
    # chunk (4 tokens) and page partial. (The seq 300 / chunk 64 case adds only more of the same chunks and
    # pages, at 4x the interpreter time; test_reference_store_is_exact runs it.)
    (2, 100, 32, 16, 4, 2, 64),
    (1, 160, 96, 32, 4, 1, 128),  # head_dim 32, GQA 4:1, chunk not a multiple of the page count
])
def test_paged_triton_path_is_exact(batch, seq, chunk, page, heads, kv_heads, hidden):
    model, store, idx, targets = check_exact(
        PagedKVStore, batch, seq, chunk, page, seed=seq, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads)
    assert store.allocator.num_free == store.allocator.num_pages  # every page back in the pool
    # a second step on the same pool gives the same gradients: no stale gradient page leaks in
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    chunked_step(model, idx, targets, chunk_size=chunk, page_size=page, store=store)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, first[n], rtol=1e-6, atol=1e-9)


class CountingKernel(ReferenceKernel):
    """The reference kernel, counting its forward calls (one per part: what a forward kernel launch is)."""

    def __init__(self):
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("budget_chunks", [1, 9])
def test_kept_attention_outputs_skip_stage_two_forwards(budget_chunks):
    """With room for budget_chunks chunks' attention outputs (all layers), stage 1 keeps them and stage 2 skips
    those forward kernels: gradients stay exact, and the forward kernel runs exactly as often as predicted.
    seq 200, chunk 64: 4 chunks (the last partial); stage 1 runs chunks 0-2 through every layer but the last
    one's attention. Room for 1 chunk keeps chunk 2's outputs (evicting 0's and 1's), room for 9 keeps all 3."""
    model = tiny_model(8)
    L, B, T, C = model.config.num_hidden_layers, 1, 200, 64
    g = torch.Generator().manual_seed(8)
    idx, targets = (torch.randint(0, 256, (B, T), generator=g).to(DEVICE) for _ in range(2))
    ref_loss, ref_grads = full_sequence_grads(model, idx, targets)
    per_chunk = (L - 1) * PagedKVStore.output_bytes_per_token(model.config, torch.float32) // L * B * C
    kernel = CountingKernel()
    store = PagedKVStore.for_sequence(model, B, T, 16, torch.float32, idx.device,
                                      output_cache_bytes=budget_chunks * per_chunk, kernel=kernel)
    loss = chunked_step(model, idx, targets, chunk_size=C, page_size=16, store=store)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_grads_match(model, ref_grads)
    kept = min(budget_chunks, 3)  # stage 1 runs 3 chunks; the cache keeps the last `kept` of them
    assert kernel.forwards == 3 * (L - 1) + 4 * L - kept * (L - 1)
    assert not len(store.kept_outputs) and store.kept_outputs.bytes == 0  # nothing outlives the step


def _keep_store(kind, model, B, T, kernel):
    if kind == "reference":
        return ReferenceKVStore.for_sequence(model, B, T, 16, torch.float32, DEVICE)
    if kind == "offloaded":  # a GPU cache of 5 pages per row: the history (up to 13 pages) streams in parts
        return OffloadedKVStore.for_sequence(model, B, T, 16, torch.float32, DEVICE, cache_tokens=80, kernel=kernel)
    return PagedKVStore.for_sequence(model, B, T, 16, torch.float32, DEVICE, kernel=kernel)


@pytest.mark.parametrize("store_kind,keep,checkpoint", [
    ("reference", 1, True),   # chunk 2 kept; layers recomputed inside every chunk, the kept one's in its backward
    ("paged", 2, False),      # chunks 1 and 2 kept: their pages, tables and the pool's LIFO release
    ("paged", 9, False),      # more than there are: chunks 0-2 kept, no no-grad pass at all
    ("offloaded", 2, False),  # the kept chunks' backward streams the history again, after the last chunk's
])
def test_kept_activations_are_exact(store_kind, keep, checkpoint):
    """chunked_step(keep_activations=N): the N chunks before the last run with grad in stage 1 and stage 2 runs
    only their backward. Loss and gradients are still the full sequence's (fp32, 1e-5), every page goes back, and
    each kept chunk's layers run forward once, not twice: seq 200, chunk 64 is 4 chunks; stage 1 attends in L - 1
    layers per no-grad chunk (the last layer stops at its K/V) and L per kept chunk, stage 2 in L per other chunk."""
    model = tiny_model(11)
    L, B, T, C = model.config.num_hidden_layers, 2, 200, 64
    g = torch.Generator().manual_seed(11)
    idx, targets = (torch.randint(0, 256, (B, T), generator=g).to(DEVICE) for _ in range(2))
    ref_loss, ref_grads = full_sequence_grads(model, idx, targets)
    kernel = CountingKernel()
    store = _keep_store(store_kind, model, B, T, kernel)
    loss = chunked_step(model, idx, targets, chunk_size=C, page_size=16, store=store, checkpoint=checkpoint,
                        keep_activations=keep)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_grads_match(model, ref_grads)
    if store_kind == "paged":
        kept = min(keep, 3)
        assert kernel.forwards == (3 - kept) * (L - 1) + kept * L + (4 - kept) * L
        assert store.allocator.num_free == store.allocator.num_pages


@pytest.mark.parametrize("case", ["sparse", "offloaded-sparse", "documents", "detached", "bf16-params"])
def test_kept_activations_change_only_the_order(case):
    """Where the full-sequence reference is not the plain one (sparse selections, on the GPU or over offloaded
    pages, packed documents, a detached history) or the rounding differs (bf16 weights, fp32 main_grad):
    keep_activations=2 gives the loss and gradients of keep_activations=0, the same computations in another order
    (fp32: 1e-5; bf16 weights: main_grad to 1e-4, where the kept chunks' head gradients are summed earlier)."""
    B, T, C = 2, 160, 32  # 5 chunks: 2 run with no grad in stage 1, 2 kept
    dtype = torch.bfloat16 if case == "bf16-params" else torch.float32
    g = torch.Generator().manual_seed(13)
    idx, targets = (torch.randint(0, 256, (B, T), generator=g).to(DEVICE) for _ in range(2))
    kwargs = {"detach_history": True} if case == "detached" else {}
    if case == "documents":
        starts = torch.zeros(B, T, dtype=torch.long)
        for b, first in [(0, 40), (0, 90), (1, 64), (1, 65)]:  # one document of one token, one at a chunk start
            starts[b, first:] = first
        kwargs["doc_start"] = starts.to(DEVICE)
    sparse = SparseConfig(budget=32, q_block=16) if case.endswith("sparse") else None
    results = []
    for keep in (0, 2):
        model = tiny_model(13).to(dtype)
        if case == "offloaded-sparse":  # a cache buffer holds the chunk's pages and each block's selection
            store = OffloadedKVStore.for_sequence(model, B, T, 16, dtype, DEVICE, cache_tokens=160,
                                                  kernel=ReferenceKernel(), sparse=sparse)
        else:
            store = PagedKVStore.for_sequence(model, B, T, 16, dtype, DEVICE, kernel=ReferenceKernel(), sparse=sparse)
        loss = chunked_step(model, idx, targets, chunk_size=C, page_size=16, compute_dtype=dtype, store=store,
                            keep_activations=keep, **kwargs)
        grads = {n: (p.main_grad if dtype == torch.bfloat16 else p.grad).clone() for n, p in model.named_parameters()}
        results.append((loss, grads))
    (loss0, grads0), (loss2, grads2) = results
    tol = 1e-4 if dtype == torch.bfloat16 else 1e-5
    assert abs(loss2 - loss0) <= tol * abs(loss0)
    for n, g0 in grads0.items():
        err = ((grads2[n] - g0).norm() / g0.norm()).item()
        assert err <= tol, f"{n}: relative error {err:.2e}"


@pytest.mark.parametrize("batch,seq,chunk,page,checkpoint", [
    (2, 200, 64, 16, False),  # partial last chunk and page, batch 2
    (1, 160, 32, 16, True),   # layers recomputed inside the chunk
])
def test_paged_store_with_the_reference_kernel_is_exact(batch, seq, chunk, page, checkpoint):
    """The whole chunked step with the plain-PyTorch reference in place of the Triton kernels (swapped through
    the store's kernel= alone) gives the full-sequence loss and gradients, per parameter."""
    class ReferencePaged(PagedKVStore):
        @classmethod
        def for_sequence(cls, *args, **kwargs):
            return PagedKVStore.for_sequence(*args, kernel=ReferenceKernel(), **kwargs)
    _, store, _, _ = check_exact(ReferencePaged, batch, seq, chunk, page, seed=seq + 1, checkpoint=checkpoint)
    assert isinstance(store.kernel, ReferenceKernel)


CPU_STEP = """
import sys, torch, torch.nn.functional as F
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from attention import ReferenceKernel
from chunk_train import chunked_step
from kernels.paged_attention import _interpreting
from paged_kv import PagedKVStore
from test_chunk_train import assert_grads_match, full_sequence_grads, tiny_model
assert not _interpreting()
model = tiny_model(9)
idx, targets = torch.randint(0, 256, (2, 256)), torch.randint(0, 256, (2, 256))
ref_loss, ref = full_sequence_grads(model, idx, targets)
store = PagedKVStore.for_sequence(model, 2, 256, 16, torch.float32, "cpu")
assert isinstance(store.kernel, ReferenceKernel), store.kernel
loss = chunked_step(model, idx, targets, chunk_size=64, page_size=16, store=store)
assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
assert_grads_match(model, ref)
print("exact")
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU path without Triton's interpreter")
def test_chunked_step_on_cpu_without_the_interpreter():
    """A fresh process without TRITON_INTERPRET (a laptop): the store picks the reference kernel for CPU tensors
    and the chunked step gives the full-sequence gradients (it used to raise "need Triton's interpreter")."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", CPU_STEP, root], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "exact", run.stderr[-3000:]


def test_chunked_loss_equals_full_sequence_loss():
    model = tiny_model(3)
    idx = torch.randint(0, 256, (2, 150), device=DEVICE)
    targets = torch.randint(0, 256, (2, 150), device=DEVICE)
    with torch.no_grad():
        ref = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).item()
    store = ReferenceKVStore.for_sequence(model, 2, 150, 16, torch.float32, idx.device)
    assert abs(chunked_loss(model, idx, targets, chunk_size=64, store=store) - ref) <= 1e-5 * ref


def test_stage_one_stops_at_the_last_layers_kv(monkeypatch):
    model = tiny_model(4, num_hidden_layers=3)
    store = ReferenceKVStore.for_sequence(model, 1, 100, 16, torch.float32, DEVICE)
    attended = []
    real_attend = store.attend
    monkeypatch.setattr(store, "attend", lambda layer, *a, **kw: attended.append(layer) or real_attend(layer, *a, **kw))
    monkeypatch.setattr(model, "head", lambda x: pytest.fail("stage 1 must not run the LM head"))
    fill_kv(model, torch.randint(0, 256, (1, 100), device=DEVICE), store, chunk_size=32)
    assert [store.length(layer) for layer in range(3)] == [100, 100, 100]
    assert sorted(set(attended)) == [0, 1] and len(attended) == 2 * 4  # 4 chunks, last layer never attends


def test_bad_arguments():
    model = tiny_model()
    idx = torch.randint(0, 256, (1, 64), device=DEVICE)
    with pytest.raises(ValueError, match="must have idx's shape"):
        chunked_step(model, idx, idx[:, :10], chunk_size=32, page_size=16)
    with pytest.raises(ValueError, match="multiple of page_size"):
        chunked_step(model, idx, idx, chunk_size=24, page_size=16)
    small_pool = PagedKVStore(2, 1, 2, 16, page_size=16, num_pages=3, dtype=torch.float32, device=DEVICE)
    with pytest.raises(OutOfPages, match="pages needed"):
        chunked_step(model, idx, idx, chunk_size=32, page_size=16, store=small_pool)
    with pytest.raises(ValueError, match="keep_activations must be >= 0"):
        chunked_step(model, idx, idx, chunk_size=32, page_size=16, keep_activations=-1)
    model.lm_head.weight.data = model.lm_head.weight.data.double()
    with pytest.raises(ValueError, match="share one dtype"):
        chunked_step(model, idx, idx, chunk_size=32, page_size=16)


def test_bf16_parameters_accumulate_fp32_main_grad():
    """bf16 weights: every chunk's gradient accumulates in an fp32 main_grad (precision.fp32_gradients: the Linear
    GEMMs directly, the rest by the fold hook) and param.grad stays None; a second step adds the same gradient again
    (up to fp32 rounding of the running sums); and, parameter by parameter, main_grad is the fp32 full-sequence
    gradient of the same (bf16-valued) weights within bf16 compute error: relative error <= 6e-2 each (the largest
    here, q/k projections, ~3.6e-2 under the interpreter, which rounds to bf16 toward zero). A parameter whose
    gradient (or a large share of it, such as one of the 4 chunks') went missing is far outside that."""
    model = tiny_model(5).to(torch.bfloat16)
    ref_model = tiny_model(5)
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(5)
    idx, targets = (torch.randint(0, 256, (1, 128), generator=g).to(DEVICE) for _ in range(2))
    _, ref = full_sequence_grads(ref_model, idx, targets)
    store = ReferenceKVStore.for_sequence(model, 1, 128, 16, torch.bfloat16, idx.device)
    chunked_step(model, idx, targets, chunk_size=32, page_size=16, compute_dtype=torch.bfloat16, store=store)
    assert all(p.grad is None and p.main_grad.dtype == torch.float32 for p in model.parameters())
    for name, p in model.named_parameters():
        err = ((p.main_grad - ref[name]).norm() / ref[name].norm()).item()
        assert err <= 6e-2, f"{name}: relative error {err:.2e}"
    first = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    chunked_step(model, idx, targets, chunk_size=32, page_size=16, compute_dtype=torch.bfloat16, store=store)
    for n, p in model.named_parameters():  # a second step adds the same gradient again
        torch.testing.assert_close(p.main_grad, 2 * first[n], rtol=2e-5, atol=2e-8)


def test_low_rank_wrappers_change_chunked_and_full_gradients_alike(wrap_linears):
    """Every nn.Linear wrapped in a LoRA-like LowRankDelta (base(x) + x @ A @ B, A and B fp32 random): the chunked
    step's loss and gradients equal the full-sequence ones for every parameter, A and B included (1e-5, as above).
    And the wrappers do take effect (on the fused path here, under the interpreter): the full-sequence loss and
    base-weight gradients are those of an unwrapped model with the deltas merged, W + (A B)^T (1e-4: the merged
    matmul rounds differently)."""
    model = wrap_linears(tiny_model(9, tie_word_embeddings=False), rank=2, seed=9)
    merged = tiny_model(9, tie_word_embeddings=False)
    wrappers = {name: m for name, m in model.named_modules() if hasattr(m, "base")}
    assert len(wrappers) == 7 * model.config.num_hidden_layers + 1
    with torch.no_grad():
        for name, m in wrappers.items():
            merged.get_submodule(name).weight += (m.A @ m.B).t()
    g = torch.Generator().manual_seed(9)
    idx, targets = (torch.randint(0, 256, (2, 96), generator=g).to(DEVICE) for _ in range(2))
    ref_loss, ref = full_sequence_grads(model, idx, targets)
    merged_loss, merged_grads = full_sequence_grads(merged, idx, targets)
    assert abs(ref_loss - merged_loss) <= 1e-5 * abs(merged_loss)
    for name, grad in merged_grads.items():
        prefix, leaf = name.rsplit(".", 1)
        wrapped_name = f"{prefix}.base.{leaf}" if prefix in wrappers else name
        err = ((ref[wrapped_name] - grad).norm() / grad.norm()).item()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"
    store = ReferenceKVStore.for_sequence(model, 2, 96, 16, torch.float32, idx.device)
    loss = chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_grads_match(model, ref)
