"""model.py against naive references and against transformers' Qwen2ForCausalLM (logit parity)."""

import contextlib
import json
import math

import pytest
import torch

import torch.nn as nn

from kernels import layer_ops
from model import DenseAttention, Model, ModelConfig, apply_rope, preset, rope_cos_sin
from precision import FP32GradLinear


def naive_rope(x, positions, theta):
    """Rotate each pair (x[i], x[i + D/2]) by angle position * theta^(-2i/D), one pair at a time, in float64."""
    B, T, H, D = x.shape
    out = x.double().clone()
    for i in range(D // 2):
        angle = positions.double() * theta ** (-2 * i / D)  # [T]
        c, s = torch.cos(angle)[None, :, None], torch.sin(angle)[None, :, None]
        a, b = x[..., i].double(), x[..., i + D // 2].double()
        out[..., i], out[..., i + D // 2] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("start", [0, 1000, 123456])
def test_rope_matches_pairwise_rotation(start):
    torch.manual_seed(start)
    x = torch.randn(2, 11, 3, 32)
    positions = torch.arange(start, start + 11)
    cos, sin = rope_cos_sin(positions, 32, 1e6)
    # fp32 angles (as in HF) carry up to ~position * 2^-24 rad of error; an element moves by that times |pair| (< 6)
    tol = 1e-5 + 6 * 2 * (start + 11) * 2**-24
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), naive_rope(x, positions, 1e6), atol=tol, rtol=0)


def naive_causal_attention(q, k, v):
    """q: [B, T, H, D], k/v: [B, T, Hkv, D] -> [B, T, H, D], float64, explicit mask and softmax, kv heads repeated."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2).double(), v.repeat_interleave(group, dim=2).double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / math.sqrt(q.shape[-1])
    T = q.shape[1]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_dense_attention_gqa_matches_naive(heads, kv_heads):
    torch.manual_seed(heads * 10 + kv_heads)
    q = torch.randn(2, 13, heads, 16, requires_grad=True)
    k = torch.randn(2, 13, kv_heads, 16, requires_grad=True)
    v = torch.randn(2, 13, kv_heads, 16, requires_grad=True)
    out = DenseAttention()(q, k, v, layer_idx=0)
    ref = naive_causal_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def test_checkpointed_forward_gives_same_gradients():
    torch.manual_seed(0)
    model = Model(preset("tiny"))
    idx = torch.randint(0, 256, (2, 40))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model(idx, checkpoint=ckpt).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        ModelConfig(hidden_size=100, num_attention_heads=8)
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        ModelConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="positive integer"):
        ModelConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
        preset("qwen9")


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-14b"])
def test_presets_have_published_parameter_counts(name):
    # published sizes: 0.49B, 7.62B, 14.7B
    expected = {"qwen2.5-0.5b": 0.494e9, "qwen2.5-7b": 7.616e9, "qwen2.5-14b": 14.77e9}[name]
    with torch.device("meta"):
        n = Model(preset(name)).num_params()
    assert abs(n - expected) / expected < 0.01, n


# ------------------------------------------------------------------------------------------------ HF parity


def make_hf_checkpoint(path, tied: bool, shard: bool, seed=0):
    """A small random transformers Qwen2ForCausalLM saved with save_pretrained (safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   tie_word_embeddings=tied, rope_theta=1e6, rms_norm_eps=1e-6)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants: randomise them so parity means something
        for name, p in hf.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path, max_shard_size="60KB" if shard else "1GB")
    return hf


@pytest.mark.parametrize("tied,shard", [(True, False), (False, False), (True, True), (False, True)])
def test_logits_match_transformers(tmp_path, tied, shard):
    hf = make_hf_checkpoint(tmp_path, tied, shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    model = Model.from_pretrained(str(tmp_path)).eval()
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    idx = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        err = (model(idx) - hf(idx).logits).abs().max().item()
    assert err <= 1e-4, err


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Model.from_pretrained(str(tmp_path))
    make_hf_checkpoint(tmp_path, tied=False, shard=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match="mlp.*has shape"):
        Model.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read safetensors"):
        Model.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------ the fused layer ops inside the model


@pytest.mark.parametrize("main_grad", [False, True])
def test_swiglu_down_matches_plain_formula(main_grad):
    """MLP's fused silu(gate) * up -> down_proj (kernels/layer_ops.py, here under the interpreter on a CPU; down_proj
    saves h as a token, recomputed in backward) vs plain autograd in fp64. With `main_grad`, the Linears are
    precision.FP32GradLinear with fp32 main_grad tensors on the weights: the weight gradients must land there
    (added to what they hold, down_proj's from the recomputed h) and weight.grad stay None."""
    from model import MLP
    torch.manual_seed(3)
    cfg = ModelConfig(hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=1)
    mlp, ref_mlp = MLP(cfg), MLP(cfg).double()
    ref_mlp.load_state_dict(mlp.state_dict())
    x, dy = torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    xr = x.double().requires_grad_()
    ref = ref_mlp.down_proj(torch.nn.functional.silu(ref_mlp.gate_proj(xr)) * ref_mlp.up_proj(xr))
    ref.backward(dy.double())
    start = {}
    if main_grad:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, FP32GradLinear.from_linear(getattr(mlp, name)))
        for name, p in mlp.named_parameters():
            p.main_grad = torch.randn_like(p, dtype=torch.float32)  # backward must add to what it holds
            start[name] = p.main_grad.clone()
    xo = x.clone().requires_grad_()
    out = mlp(xo)
    out.backward(dy)
    tol = 1e-5
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xo.grad.double(), xr.grad, rtol=tol, atol=tol)
    for name, p in mlp.named_parameters():
        want = dict(ref_mlp.named_parameters())[name].grad
        got = p.main_grad.double() - start[name].double() if main_grad else p.grad.double()
        assert not main_grad or p.grad is None
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("fused", [True, False])
def test_forward_hooks_fire_on_every_linear(monkeypatch, fused):
    """Every projection is called as its module on both paths (fused ops: CUDA, or the interpreter on a CPU; plain
    formulas otherwise): a forward hook on each nn.Linear fires once per forward, and what it returns is used -
    here doubling every projection's output, checked against a model whose weights and biases are doubled."""
    if not fused:
        monkeypatch.setattr(layer_ops, "available", lambda t: False)
    torch.manual_seed(6)
    cfg = ModelConfig(**{**preset("tiny").__dict__, "tie_word_embeddings": False})
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the fused ops run (CPU: the interpreter)
    model, doubled = Model(cfg).to(device), Model(cfg).to(device)
    idx = torch.randint(0, 256, (2, 9), device=device)
    assert layer_ops.available(model.embed(idx)) == fused  # the path under test
    doubled.load_state_dict({k: 2 * v if "proj" in k or "lm_head" in k else v for k, v in model.state_dict().items()})
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 7 * cfg.num_hidden_layers + 1
    fired = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, args, out, name=name: fired.append(name) or 2 * out)
    out = model(idx)
    assert sorted(fired) == sorted(linears)
    ref = doubled(idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)  # dL/dW of the doubled model's weight 2W is half of dL/dW through the hook
    for (name, p), q in zip(model.named_parameters(), doubled.parameters()):
        scale = 2 if "proj" in name or "lm_head" in name else 1
        torch.testing.assert_close(p.grad, scale * q.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("wrapped", [False, True])
def test_layer_saves_only_what_backward_needs(monkeypatch, wrap_linears, wrapped):
    """The bytes a bf16 layer saves for backward, per token: its two norm inputs, the two normalised inputs (read by
    the projections' weight gradients), the attention output (o_proj's input), gate and up - 5 * hidden +
    2 * intermediate values - plus two fp32 inverse RMS values. (The attention backend's own saves are not counted:
    this one saves nothing.) The plain formulas saved about twice as much; train.py's memory plan relies on this.
    h = silu(gate) * up is never saved: backward recomputes it exactly once (two SwiGLU forward calls in all), even
    when `wrapped` makes the MLP's Linears LowRankDelta wrappers (two consumers of h in down_proj's) under
    precision.fp32_gradients; the gate and up wrappers' x @ A [tokens, rank] is then saved as well."""
    from model import Block
    from precision import fp32_gradients
    torch.manual_seed(4)
    cfg = preset("tiny")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the fused ops run (CPU: the interpreter)
    block = Block(cfg, 0).to(torch.bfloat16).to(device)
    rank = 3
    if wrapped:
        wrap_linears(block.mlp, rank=rank)
    swiglu_calls = []
    real_swiglu = layer_ops.swiglu_forward
    monkeypatch.setattr(layer_ops, "swiglu_forward", lambda *a: swiglu_calls.append(1) or real_swiglu(*a))
    B, T = 2, 16
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.bfloat16, device=device, requires_grad=True)
    cos, sin = (t.to(device) for t in rope_cos_sin(torch.arange(T), cfg.head_dim, cfg.rope_theta))
    skip = {t.data_ptr() for t in (*block.parameters(), cos, sin)}
    saved = {}

    def pack(t):
        if t.data_ptr() not in skip:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with fp32_gradients(block) if wrapped else contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x, cos, sin, lambda q, k, v, layer: q * 1.0)  # a backend saving nothing
        want = B * T * (2 * (5 * cfg.hidden_size + 2 * cfg.intermediate_size) + 2 * 4)
        if wrapped:
            want += 2 * B * T * rank * 2
        assert sum(saved.values()) == want, (sorted(saved.values()), want)
        out.float().sum().backward()  # and the saved tensors suffice for backward
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    assert len(swiglu_calls) == 2
    if wrapped:  # (k_proj, v_proj get no gradient from this backend)
        assert all(p.grad is None for p in block.parameters())
        assert all(p.main_grad.abs().sum() > 0 for p in block.mlp.parameters())


def test_sliced_loss_matches_cross_entropy(monkeypatch):
    """Model.loss in slices of 7 positions (forced small) vs cross-entropy of the whole logits through autograd:
    the loss, dL/dx and the head's parameter gradients (final norm, LM head) in fp32."""
    import model as model_module
    torch.manual_seed(5)
    net = Model(preset("tiny"))
    B, T = 2, 30
    monkeypatch.setattr(model_module, "LOSS_SLICE_LOGITS", 7 * B * net.config.vocab_size)
    x = torch.randn(B, T, net.config.hidden_size)
    targets = torch.randint(0, net.config.vocab_size, (B, T))
    scale = 1 / 77
    xr = x.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(net.head(xr).flatten(0, 1), targets.flatten(), reduction="sum") * scale
    ref.backward()
    head_params = list(net.model.norm.parameters()) + list(net.lm_head.parameters())
    ref_grads = [p.grad.clone() for p in head_params]
    net.zero_grad()
    loss, dx = net.loss(x, targets, scale=scale, backward=True)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-5, atol=1e-7)
    for p, g in zip(head_params, ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    no_grad_loss, none = net.loss(x, targets, scale=scale)
    assert none is None and abs(no_grad_loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    with pytest.raises(ValueError, match="targets"):
        net.loss(x, targets[:, 1:])
