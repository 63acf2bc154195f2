"""kept_outputs.KeptMLPOutputs: stage 1 keeps the MLP down projections' outputs, stage 2 takes them instead of
running those GEMMs, and the gradients stay exactly what they were."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from attention import ReferenceKernel
from chunk_train import chunked_step
from kept_outputs import KeptMLPOutputs
from kernels import layer_ops
from paged_kv import PagedKVStore, ReferenceKVStore
from precision import allocate_main_grads, fp32_gradients
from sparse_attn import SparseConfig
from test_chunk_train import DEVICE, assert_grads_match, full_sequence_grads, tiny_model


class DownForwards(TorchDispatchMode):
    """Counts the matrix products of the down projections' forwards: those whose second operand is one of their
    weights seen as W^T [intermediate, hidden] (their backward multiplies by W [hidden, intermediate] and by h)."""

    def __init__(self, model):
        super().__init__()
        self.weights = {block.mlp.down_proj.weight.data_ptr() for block in model.layers}
        self.shape, self.count = (model.config.intermediate_size, model.config.hidden_size), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            w = args[-1]
            self.count += tuple(w.shape) == self.shape and w.data_ptr() in self.weights
        return func(*args, **(kwargs or {}))


def test_kept_output_is_returned_and_backpropagates_as_the_linear():
    """Without grad the down projection's output is kept; with grad, for the same layer and chunk, the kept value is
    returned (even for another input: it is not recomputed) and the backward is the Linear's, to fp32 rounding;
    afterwards the module is the model's own again. A budget below one output keeps nothing."""
    model = tiny_model(5)
    mlp, cfg = model.layers[1].mlp, model.config
    weight = mlp.down_proj.weight
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 8, cfg.intermediate_size, generator=g).to(DEVICE)
    cache = KeptMLPOutputs(budget_bytes=h.shape[0] * h.shape[1] * cfg.hidden_size * 4)
    with cache.installed(model):
        cache.chunk = (0, 8)
        with torch.no_grad():
            kept = mlp.down_proj(h)
        assert len(cache) == 1
        h2 = torch.randn(h.shape, generator=g).to(DEVICE).requires_grad_()
        y = mlp.down_proj(h2)
        assert torch.equal(y, kept) and len(cache) == 0 and cache.bytes == 0
        dy = torch.randn(y.shape, generator=g).to(DEVICE)
        y.backward(dy)
    assert type(mlp.down_proj) is torch.nn.Linear
    h_ref = h2.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    F.linear(h_ref, w_ref).backward(dy)
    torch.testing.assert_close(h2.grad, h_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-6, atol=1e-6)

    small = KeptMLPOutputs(budget_bytes=kept.numel() * 4 - 1)
    with small.installed(model):
        small.chunk = (0, 8)
        with torch.no_grad():
            mlp.down_proj(h)
        assert len(small) == 0
        torch.testing.assert_close(mlp.down_proj(h2), F.linear(h2, weight), rtol=0, atol=0)


def test_kept_output_adds_into_main_grad():
    """bf16 weights under fp32_gradients (main_grad): the kept path adds dW into main_grad as FP32GradLinear does."""
    results = []
    for keep in (False, True):
        model = tiny_model(6).to(torch.bfloat16)
        allocate_main_grads(model)
        mlp = model.layers[0].mlp
        g = torch.Generator().manual_seed(6)
        h = torch.randn(1, 16, model.config.intermediate_size, generator=g).to(DEVICE, torch.bfloat16)
        cache = KeptMLPOutputs(budget_bytes=1 << 20 if keep else 0)
        with cache.installed(model):
            cache.chunk = (0, 16)
            with torch.no_grad():
                mlp.down_proj(h)
            with fp32_gradients(model):
                hg = h.clone().requires_grad_()
                mlp.down_proj(hg).float().square().sum().backward()
        assert mlp.down_proj.weight.grad is None
        results.append((hg.grad, mlp.down_proj.weight.main_grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("budget_chunks", [1, 9])
def test_stage_two_skips_the_kept_down_projections(budget_chunks, monkeypatch):
    """seq 200, chunk 64: 4 chunks, stage 1 runs chunks 0-2 through layers 0..L-2 (the last stops at its K/V).
    With room for budget_chunks chunks' outputs, the first of them are kept and stage 2 skips their down GEMMs
    and the SwiGLU forwards feeding them: counted, and the gradients are still the full sequence's."""
    model = tiny_model(8)
    cfg = model.config
    L, B, T, C = cfg.num_hidden_layers, 1, 200, 64
    g = torch.Generator().manual_seed(8)
    idx, targets = (torch.randint(0, 256, (B, T), generator=g).to(DEVICE) for _ in range(2))
    ref_loss, ref_grads = full_sequence_grads(model, idx, targets)
    store = ReferenceKVStore.for_sequence(model, B, T, 16, torch.float32, idx.device)
    per_chunk = (L - 1) * B * C * cfg.hidden_size * 4
    swiglus = []  # SwiGLU forwards: the layer's forward, and its backward's recomputation of h
    swiglu_forward = layer_ops.swiglu_forward
    monkeypatch.setattr(layer_ops, "swiglu_forward", lambda *a: swiglus.append(1) or swiglu_forward(*a))
    with DownForwards(model) as count:
        loss = chunked_step(model, idx, targets, chunk_size=C, page_size=16, store=store,
                            mlp_cache_bytes=budget_chunks * per_chunk)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_grads_match(model, ref_grads)
    kept = min(budget_chunks, 3)
    assert count.count == 3 * (L - 1) + 4 * L - kept * (L - 1)
    assert len(swiglus) == count.count + 4 * L
    assert all(type(block.mlp.down_proj) is torch.nn.Linear for block in model.layers)


@pytest.mark.parametrize("case", ["bf16-params", "sparse-documents", "kept-activations", "wrapped"])
def test_kept_mlp_outputs_change_no_bit(case, wrap_linears):
    """Against the same step keeping none: bf16 weights with fp32 main_grad, sparse attention over packed
    documents, chunks whose whole forward is kept (they take no MLP output: their stage-1 forward ran with grad),
    wrapped down projections (a LoRA-like module: not taken over, computed as always). Same loss and gradients,
    bit for bit: the same products in the same order."""
    B, T, C = 1, 128, 32  # 4 chunks: stage 1 runs 0-1 without grad (and 2 with, when its forward is kept)
    dtype = torch.bfloat16 if case == "bf16-params" else torch.float32
    g = torch.Generator().manual_seed(13)
    idx, targets = (torch.randint(0, 256, (B, T), generator=g).to(DEVICE) for _ in range(2))
    kwargs, sparse = {}, None
    if case == "sparse-documents":
        starts = torch.zeros(B, T, dtype=torch.long)
        for b, first in [(0, 40), (0, 64)]:  # one document starting inside a chunk, one at a chunk start
            starts[b, first:] = first
        kwargs["doc_start"], sparse = starts.to(DEVICE), SparseConfig(budget=32, q_block=16)
    if case == "kept-activations":
        kwargs["keep_activations"] = 1
    results = []
    for cache in (0, 1 << 30):
        model = tiny_model(13).to(dtype)
        if case == "wrapped":
            wrap_linears(model.layers, rank=2, seed=13)
        if dtype == torch.bfloat16:
            allocate_main_grads(model)
        store = PagedKVStore.for_sequence(model, B, T, 16, dtype, DEVICE, kernel=ReferenceKernel(), sparse=sparse)
        loss = chunked_step(model, idx, targets, chunk_size=C, page_size=16, compute_dtype=dtype, store=store,
                            mlp_cache_bytes=cache, **kwargs)
        grads = {n: (p.main_grad if dtype == torch.bfloat16 else p.grad).clone() for n, p in model.named_parameters()
                 if p.requires_grad}
        results.append((loss, grads))
    (loss0, grads0), (loss1, grads1) = results
    assert loss0 == loss1
    for n, g0 in grads0.items():
        assert torch.equal(grads1[n], g0), n
