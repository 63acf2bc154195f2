"""
A Qwen2 / Qwen2.5 decoder in one file, nanoGPT style.

    embed -> N x [ x + Attn(RMSNorm(x)) ; x + MLP(RMSNorm(x)) ] -> RMSNorm -> lm_head

Attention is GQA with q/k/v biases and rotary position embeddings (RoPE). The attention *computation* is a seam:
each layer computes q, k, v (after RoPE) and hands them to an attention backend passed in explicitly,

    backend(q, k, v, layer_idx) -> out        q, out: [B, T, n_heads, D]    k, v: [B, T, n_kv_heads, D]

so chunked, paged, offloaded or sparse attention (chunk_train.py and friends) plug in without touching the math here.
The default backend, `DenseAttention`, is causal full-sequence attention through PyTorch's SDPA.

Activations are what long-context training runs out of, so the per-token ops save only what their backward needs:
on the GPU, RMSNorm, RoPE and SwiGLU are fused Triton kernels (kernels/layer_ops.py; the plain formulas here are the
CPU path and the tests' reference), and `Model.loss` runs the LM head and cross-entropy a slice of tokens at a time,
backpropagating each slice at once, so a chunk's logits never exist whole, and its cross-entropy is fused too
(kernels/cross_entropy.py: no fp32 copy of the logits). A bf16 layer keeps 5 x hidden + 2 x intermediate values
per token (tests/test_model.py pins this), half of what autograd on the formulas keeps.

Every projection is a plain nn.Linear, called as a module on every path, so hooks, wrappers (LoRA) and module swaps
from outside (precision.py's fp32 gradient accumulation) see every call. The MLP's down_proj gets h = silu(gate) * up
through layer_ops.swiglu_into, which keeps h saved only as gate and up whatever down_proj (or its wrapper) saves.

`Model.from_pretrained(dir)` reads a Hugging Face checkpoint directory (config.json + model.safetensors, or a sharded
model.safetensors.index.json) without needing transformers; parameter names match HF's so state dicts map 1:1.
"""

import json
import os
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from kernels import layer_ops
from kernels.cross_entropy import token_cross_entropy


# ------------------------------------------------------------------------------------------------ config


@dataclass
class ModelConfig:
    # Field names follow HF's Qwen2 config.json so a checkpoint's config maps field-for-field.
    vocab_size: int = 256
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768  # informational: RoPE itself works at any position
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads} (GQA needs whole groups)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a parsed HF config.json. Unknown keys are ignored; unsupported features are refused."""
        if d.get("model_type", "qwen2") != "qwen2":
            raise ValueError(f"model_type {d.get('model_type')!r} is not supported (only 'qwen2')")
        if d.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported (Qwen2.5 checkpoints have it false)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {rope} is not supported (only plain RoPE)")
        if "rope_theta" not in d and "rope_theta" in rope:  # transformers >= 5 nests it
            d["rope_theta"] = rope["rope_theta"]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        """The config.json of a HF checkpoint directory."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            with open(config_path) as f:
                return cls.from_hf_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None

    def to_hf_dict(self) -> dict:
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", **asdict(self)}


# Real Qwen2.5 shapes (from their config.json files) plus small byte-level models for the embedded corpus.
PRESETS = {
    # byte-level (vocab 256) models for the embedded corpus
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),  # CPU tests; head_dim 16
    "small": dict(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2),  # the default: ~22M params, head_dim 64
    # Qwen2.5 family
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-14b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False,
                        rms_norm_eps=1e-5),
}
for _name, _cfg in PRESETS.items():
    if _name.startswith("qwen2.5"):
        _cfg.setdefault("max_position_embeddings", 32768 if _name == "qwen2.5-0.5b" else 131072)


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


# ------------------------------------------------------------------------------------------------ layers


def rms_norm(x, weight, eps):
    """HF's RMSNorm as plain PyTorch ops: normalise in fp32 whatever the compute dtype, scale in the input dtype.
    The CPU path and the reference of kernels/layer_ops.py's fused version."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if layer_ops.available(x) and x.is_contiguous():  # one kernel each way; saves x and 1/rms only
            return layer_ops.RMSNormFunction.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """positions: [T] (or [B, T]) int -> cos, sin: [T, head_dim] (or [B, T, head_dim]) fp32 (the half-split layout
    HF's Qwen2 uses)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # [..., T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [..., T, D]
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):
    """x: [B, T, heads, D]; cos/sin: [T, D] or [B, T, D]. Rotates pairs (i, i + D/2): the plain-PyTorch RoPE (the
    CPU path and the reference of kernels/layer_ops.py's)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_rope(x, cos, sin):
    """x: [B, T, heads, D]; cos/sin: [T, D] or, per batch row, [B, T, D] fp32 (rope_cos_sin). Rotates pairs
    (i, i + D/2). The fused kernel saves nothing for backward (the gradient is the inverse rotation); autograd through
    _rotate saves x and its rotated half."""
    half = x.shape[-1] // 2
    if layer_ops.available(x) and x.is_contiguous() and half & (half - 1) == 0:
        return layer_ops.RopeFunction.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def check_doc_start(doc_start, idx):
    """Raise ValueError unless doc_start is None or a valid [B, T] integer tensor of document starts for idx
    [B, T]: nondecreasing along T, 0 <= doc_start[b, t] <= t (positions relative to idx's first token)."""
    if doc_start is None:
        return
    if not isinstance(doc_start, torch.Tensor) or doc_start.shape != idx.shape or doc_start.is_floating_point():
        raise ValueError(f"doc_start must be an integer tensor of idx's shape {tuple(idx.shape)}, got "
                         f"{getattr(doc_start, 'dtype', type(doc_start))} {tuple(getattr(doc_start, 'shape', ()))}")
    t = torch.arange(idx.shape[1], device=doc_start.device)
    ok = (doc_start >= 0).all() & (doc_start <= t).all() & (doc_start[:, 1:] >= doc_start[:, :-1]).all()
    if not ok:
        raise ValueError("doc_start must be nondecreasing along the sequence with 0 <= doc_start[b, t] <= t")


def doc_mask(doc_start, start_pos: int = 0):
    """The block-diagonal causal mask [B, 1, T, T] bool of document starts doc_start [B, T] (absolute positions of
    tokens start_pos..): query i sees key j iff doc_start[b, i] <= start_pos + j <= start_pos + i."""
    T = doc_start.shape[1]
    pos = start_pos + torch.arange(T, device=doc_start.device)
    return ((pos[None, None, :] >= doc_start[:, :, None]) & (pos[None, None, :] <= pos[None, :, None]))[:, None]


class DenseAttention:
    """The default attention backend: causal attention over the q/k/v given, via SDPA (GQA handled natively).
    doc_start [B, T] (absolute positions of tokens start_pos..): block-diagonal causal, each token seeing only its
    own document (packed sequences)."""

    def __init__(self, doc_start=None, start_pos: int = 0):
        self.mask = None if doc_start is None else doc_mask(doc_start, start_pos)

    def __call__(self, q, k, v, layer_idx):
        # SDPA wants [B, heads, T, D]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=self.mask, is_causal=self.mask is None,
                                           enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def qkv(self, x, cos, sin):
        """x: [B, T, hidden] -> q [B, T, H, D], k, v [B, T, Hkv, D]; q and k rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, backend, layer_idx):
        q, k, v = self.qkv(x, cos, sin)
        o = backend(q, k, v, layer_idx)  # [B, T, H, D]
        return self.o_proj(o.reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)  # [B, T, intermediate]
        if layer_ops.available(gate) and gate.is_contiguous() and up.is_contiguous():
            # h = silu(gate) * up fused, and kept for backward as gate and up only (h is recomputed there)
            return layer_ops.swiglu_into(self.down_proj, gate, up)
        return self.down_proj(F.silu(gate) * up)  # the plain formula (CPU path, reference)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def qkv(self, x, cos, sin):
        """The layer's q, k, v for residual stream x: what a KV-cache fill needs, without the rest of the layer."""
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def forward(self, x, cos, sin, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, self.layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


# ------------------------------------------------------------------------------------------------ model


# targets equal to IGNORE_INDEX carry no loss (prompt tokens, padding): Model.loss skips them (cross_entropy's own
# ignore_index), and every training path divides by the number of trained tokens (trained_tokens) instead of B * T.
IGNORE_INDEX = -100


def trained_tokens(targets) -> int:
    """How many positions of targets [B, T] carry a loss (targets != IGNORE_INDEX): the denominator of the mean
    token loss. One host sync."""
    return int((targets != IGNORE_INDEX).sum())


# Model.loss works on slices of this many logits (1 GiB in fp32, about 4 GiB with the slice's other temporaries).
# Each slice's LM-head weight gradient is one more pass over that gradient (2.2 GB in fp32 for 7B): halving the
# slice made a 7B 16K step 1% slower (bench/RESULTS.md).
LOSS_SLICE_LOGITS = 1 << 28


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # HF's parameter names ("model.*", "lm_head.*") so that checkpoints load without renaming
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def layers(self):
        return self.model.layers

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def rope(self, start_pos: int, length: int, device, doc_start=None):
        """cos, sin [length, D] for absolute positions [start_pos, start_pos + length), or with document starts
        doc_start [B, length] (absolute positions), [B, length, D] for positions counted from each token's
        document start."""
        positions = torch.arange(start_pos, start_pos + length, device=device)
        if doc_start is not None:
            positions = positions - doc_start
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

    def embed(self, idx):
        return self.model.embed_tokens(idx)

    def head(self, x):
        """Final norm + LM head: hidden states [B, T, hidden] -> logits [B, T, vocab]."""
        return self.lm_head(self.model.norm(x))

    def hidden(self, idx, attn=None, start_pos: int = 0, checkpoint: bool = False, doc_start=None):
        """idx: [B, T] token ids at positions [start_pos, start_pos + T) -> the last layer's output [B, T, hidden].

        attn: the attention backend (default: DenseAttention, causal over this call's tokens alone).
        checkpoint: recompute each block in backward instead of storing its activations (full-sequence baseline).
        doc_start [B, T] int (packed documents): the absolute position of each token's document start; RoPE
        positions restart at each document, and the default backend masks block-diagonally (a given backend
        must mask by itself: chunk_train.ChunkAttention takes the same doc_start)."""
        attn = attn if attn is not None else DenseAttention(doc_start, start_pos)
        x = self.embed(idx)
        cos, sin = self.rope(start_pos, idx.shape[1], idx.device, doc_start)
        for block in self.layers:
            if checkpoint and torch.is_grad_enabled():
                x = activation_checkpoint(block, x, cos, sin, attn, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn)
        return x

    def forward(self, idx, attn=None, start_pos: int = 0, checkpoint: bool = False, doc_start=None):
        """idx: [B, T] -> logits [B, T, vocab]; see hidden() for the arguments."""
        return self.head(self.hidden(idx, attn, start_pos, checkpoint, doc_start))

    def loss(self, x, targets, scale: float = 1.0, backward: bool = False):
        """scale * (sum of the token cross-entropies) of hidden states x [B, T, hidden] (hidden()'s output) against
        targets [B, T] - positions whose target is IGNORE_INDEX add nothing -, so scale = 1 / trained_tokens(targets)
        of the whole sequence gives its mean token loss (chunk_train passes each chunk that scale). A slice of
        positions at a time, so that only one slice's logits exist: [slice, vocab] instead of [B * T, vocab] in bf16,
        in fp32 and their fp32 gradient (1.8 MB per token for a 152K vocabulary).

        backward=True also backpropagates each slice through the final norm and the LM head right away: their
        parameters' gradients accumulate as in any backward, and the gradient w.r.t. x [B, T, hidden] is returned
        for the caller's x.backward(dx). Returns (loss, dx or None), the loss a detached 0-dim fp32 tensor.
        Call it inside the caller's autocast, like the forward: the slices' forwards run under it, their backwards
        outside it, as autograd would run them."""
        if targets.shape != x.shape[:2]:
            raise ValueError(f"targets {tuple(targets.shape)} must be x's [B, T] = {tuple(x.shape[:2])}")
        B, T = targets.shape
        step = max(1, LOSS_SLICE_LOGITS // (B * self.config.vocab_size))  # positions per slice
        total = torch.zeros((), device=x.device)
        dx = torch.empty_like(x) if backward else None
        for a in range(0, T, step):
            xs = x[:, a:a + step].detach().requires_grad_(backward)
            with torch.set_grad_enabled(backward):
                logits = self.head(xs).flatten(0, 1)  # [slice, vocab], losses in fp32 from any dtype
                loss = token_cross_entropy(logits, targets[:, a:a + step].flatten(), IGNORE_INDEX).sum() * scale
            del logits
            if backward:
                with torch.autocast(x.device.type, enabled=False):
                    loss.backward()
                dx[:, a:a + step] = xs.grad
            total += loss.detach()
        return total, dx

    @torch.no_grad()
    def token_losses(self, x, targets):
        """The cross-entropy of each position, fp32 [B, T], of hidden states x [B, T, hidden] against targets
        [B, T] (0 where the target is IGNORE_INDEX), a slice of positions at a time like loss(). Evaluation."""
        if targets.shape != x.shape[:2]:
            raise ValueError(f"targets {tuple(targets.shape)} must be x's [B, T] = {tuple(x.shape[:2])}")
        B, T = targets.shape
        step = max(1, LOSS_SLICE_LOGITS // (B * self.config.vocab_size))
        out = torch.empty(B, T, dtype=torch.float32, device=x.device)
        for a in range(0, T, step):
            logits = self.head(x[:, a:a + step]).flatten(0, 1)  # [B * slice, vocab]
            out[:, a:a + step] = token_cross_entropy(logits, targets[:, a:a + step].flatten(),
                                                     IGNORE_INDEX).view(B, -1)
        return out

    # -------------------------------------------------------------------------------------------- HF checkpoints

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device="cpu") -> "Model":
        """Load a HF Qwen2 checkpoint directory: config.json + model.safetensors or model.safetensors.index.json."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        cfg = ModelConfig.from_pretrained(path)
        index_path = os.path.join(path, "model.safetensors.index.json")
        single_path = os.path.join(path, "model.safetensors")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
        elif os.path.isfile(single_path):
            files = [single_path]
        else:
            raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")

        shapes = {}  # key -> shape, from the files' headers: nothing is loaded before the checks
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise ValueError(f"{file}: cannot read safetensors ({e})") from None

        with torch.device("meta"):
            model = cls(cfg)
        if cfg.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)  # saved by some exporters; it is the embedding anyway
        expected = {k: v for k, v in model.state_dict(keep_vars=True).items()
                    if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match its config: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        for k, p in expected.items():
            if shapes[k] != tuple(p.shape):
                raise ValueError(f"{path}: {k} has shape {shapes[k]}, config implies {tuple(p.shape)}")
        # allocated in `dtype` on `device` at once, filled a shard at a time: never a whole copy in another dtype
        model = model.to(dtype).to_empty(device=device)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # to_empty breaks the tie; restore it
        params = dict(model.named_parameters())
        with torch.no_grad():
            for file in files:
                try:
                    shard = load_file(file, device=str(device))
                except Exception as e:
                    raise ValueError(f"{file}: cannot read safetensors ({e})") from None
                for k, v in shard.items():
                    if k in expected:
                        params[k].copy_(v)
                del shard
        return model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (fwd + bwd = 3x fwd): 6 * matmul params + causal attention (12 * L * d * T / 2)."""
        cfg = self.config
        n_matmul = sum(p.numel() for n, p in self.layers.named_parameters() if "norm" not in n)
        n_matmul += cfg.vocab_size * cfg.hidden_size  # the LM head (a matmul even when tied to the embedding)
        attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len / 2
        return 6 * n_matmul + attn
