"""precision.py: fp32 gradient accumulation for bf16 parameters, installed from outside the model, against plain
autograd. (Its use by the chunked step, against an fp32 reference, is tests/test_chunk_train.py's.)"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Model, preset
from precision import FP32GradEmbedding, FP32GradLinear, fp32_gradients


@pytest.mark.parametrize("bias", [True, False])
def test_fp32_grad_linear_accumulates_main_grad(bias):
    """bf16 FP32GradLinear with fp32 main_grad tensors: two backwards add dL/dW, dL/db into them (fp32 sums of the
    bf16 products; tolerance: fp32 rounding of 48-term sums), weight.grad stays None, and dL/dx is plain autograd's."""
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias).to(torch.bfloat16)
    layer = FP32GradLinear.from_linear(plain)
    assert layer.weight is plain.weight and layer.bias is plain.bias  # the same Parameters
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    for p in params:
        p.main_grad = torch.randn_like(p, dtype=torch.float32)  # existing gradient: backward must add to it
    start = [p.main_grad.clone() for p in params]
    xs = [torch.randn(2, 12, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    gs = [torch.randn(2, 12, 40, dtype=torch.bfloat16) for _ in range(2)]
    for x, g in zip(xs, gs):
        layer(x).backward(g)
    assert all(p.grad is None for p in params)
    x_all = torch.cat([x.detach() for x in xs]).flatten(0, 1).double()  # [48, 24]
    g_all = torch.cat(gs).flatten(0, 1).double()  # [48, 40]
    torch.testing.assert_close(layer.weight.main_grad.double(), start[0].double() + g_all.t() @ x_all,
                               rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.main_grad.double(), start[1].double() + g_all.sum(0),
                                   rtol=1e-5, atol=1e-5)
    for p in params:
        p.main_grad = None
    x = xs[0].detach().requires_grad_()
    plain(x).backward(gs[0])
    torch.testing.assert_close(xs[0].grad, x.grad, rtol=0, atol=0)
    with torch.no_grad():  # without grad (or without main_grad) it is nn.Linear
        torch.testing.assert_close(layer(xs[0]), plain(xs[0]), rtol=0, atol=0)


def test_fp32_grad_embedding_adds_looked_up_rows_into_main_grad():
    """bf16 FP32GradEmbedding with an fp32 main_grad: two backwards over tokens that repeat add each row's summed
    gradient into main_grad (fp32 sums of bf16 values; tolerance: fp32 rounding), weight.grad stays None; without
    grad, or with padding_idx (a gradient rule of nn.Embedding's own), it is nn.Embedding."""
    torch.manual_seed(2)
    plain = nn.Embedding(30, 16).to(torch.bfloat16)
    emb = FP32GradEmbedding.from_embedding(plain)
    assert emb.weight is plain.weight
    start = torch.randn(30, 16)
    emb.weight.main_grad = start.clone()
    idxs = [torch.tensor([[3, 7, 3, 29], [0, 3, 7, 7]]), torch.tensor([[7, 1, 1, 3], [3, 3, 3, 3]])]
    gs = [torch.randn(2, 4, 16, dtype=torch.bfloat16) for _ in idxs]
    for idx, g in zip(idxs, gs):
        out = emb(idx)
        torch.testing.assert_close(out, plain.weight[idx], rtol=0, atol=0)
        out.backward(g)
    assert emb.weight.grad is None
    want = start.double().index_add(0, torch.cat(idxs).flatten(), torch.cat(gs).flatten(0, 1).double())
    torch.testing.assert_close(emb.weight.main_grad.double(), want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(emb(idxs[0]), plain(idxs[0]), rtol=0, atol=0)
    padded = FP32GradEmbedding.from_embedding(nn.Embedding(30, 16, padding_idx=0).to(torch.bfloat16))
    padded.weight.main_grad = torch.zeros(30, 16)
    padded(idxs[0]).backward(gs[0])
    assert padded.weight.grad is not None and (padded.weight.main_grad == 0).all()


def test_fp32_gradients_reach_wrapped_linears(wrap_linears):
    """A bf16 model whose every nn.Linear sits inside a LoRA-like wrapper (trainable A, B) and carries a forward hook:
    under fp32_gradients the wrapped Linears are FP32GradLinear (hooks kept), every parameter's gradient - base
    weights and biases, A and B, embedding, norms - is added to its main_grad and grad stays None, and on exit
    the original modules are back. main_grad - start must be plain bf16 autograd's gradient of the same model: the
    same sum of the same bf16 products, left unrounded (tolerance: two bf16 steps of the largest entry, 2^-7)."""
    torch.manual_seed(1)
    cfg = preset("tiny")
    model = wrap_linears(Model(cfg), rank=2, seed=1).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    idx, targets = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    assert len(linears) == 7 * cfg.num_hidden_layers + 1 and all(name.endswith(".base") for name in linears)
    fired = []
    for name, m in linears.items():
        m.register_forward_hook(lambda mod, args, out, name=name: fired.append(name))

    def loss():
        return F.cross_entropy(model(idx).float().flatten(0, 1), targets.flatten())

    loss().backward()
    ref = {n: p.grad.float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    start = {n: torch.randn_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.main_grad = start[n].clone()  # backward must add to it
    fired.clear()
    with fp32_gradients(model):
        assert all(type(model.get_submodule(name)) is FP32GradLinear for name in linears)
        assert type(model.model.embed_tokens) is FP32GradEmbedding
        loss().backward()
    assert type(model.model.embed_tokens) is nn.Embedding
    assert sorted(fired) == sorted(linears)  # the hooks moved with the modules
    assert all(model.get_submodule(name) is m for name, m in linears.items())  # and the originals are back
    for n, p in model.named_parameters():
        assert p.grad is None, n
        got = p.main_grad - start[n]
        torch.testing.assert_close(got, ref[n], rtol=0, atol=2**-7 * ref[n].abs().max().item(), msg=n)
