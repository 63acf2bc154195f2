"""
Tensor parallelism (Megatron-style), applied to a built model.py Model from outside: every layer's attention heads
and MLP columns are split across the ranks of a process group; embedding, norms and the LM head stay replicated.

    rank r of T, a layer with H query heads, Hkv KV heads (group g = H / Hkv), intermediate size I:
    q_proj, k_proj, v_proj (weight and bias)   rows of KV heads [r Hkv/T, (r+1) Hkv/T) and their q heads
                                               [r H/T, (r+1) H/T) (q head h reads KV head h // g: same block)
    o_proj                                     the same q heads' columns
    gate_proj, up_proj / down_proj             rows / columns [r I/T, (r+1) I/T)

Every shard is the r-th of T equal contiguous chunks of the full tensor along one dim (`TensorParallel.dims`), so
sharding a full state dict is `chunk(T, dim)[r]` and gathering one is all_gather + cat: checkpoints stay those of
one GPU. The attention and MLP modules are the regions: their input goes through `_CopyToRegion` (identity forward,
all-reduce of the input gradient in backward: each rank's q/k/v or gate/up sees only its columns, so its dx is a
partial sum; without this all-reduce the norms, the lower layers and the embedding get wrong gradients) and their
output through `_ReduceFromRegion` (all-reduce of the partial row-parallel product forward, identity backward).
Both are installed as forward hooks on the modules, so model.py stays single-device; Attention reads its head counts
from its own attributes, which sharding sets, and PagedKVStore.for_sequence reads them there (paged_kv.kv_heads): a
rank's page pool (device or pinned host) holds its KV heads only.

Replicated parameters get identical gradients on every rank (their inputs and the gradients reaching them are
identical after the region all-reduces), so they need no reduction; the loss is computed by every rank alike.
Gradients of sharded parameters are the matching slices of one GPU's. Only exact nn.Linear projections are
sharded: wrapped ones (LoRA) are refused.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduces (sums) the ranks' partial outputs; identity backward (the sum's gradient is the same for
    every term)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# the projections by how they are split: out-features (dim 0 of weight and bias) or in-features (dim 1 of weight)
COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


@dataclass
class TensorParallel:
    """The sharding of a model over `group`: this rank's index and the group's size, and for each sharded parameter
    (by its name in model.named_parameters()) the dim along which the full tensor was cut into `size` chunks."""
    group: object
    rank: int
    size: int
    dims: dict[str, int]

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor `name` (a parameter or anything of its shape: optimizer moments);
        replicated parameters are returned as they are."""
        if name not in self.dims:
            return full
        return full.chunk(self.size, self.dims[name])[self.rank].clone()

    def gather(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's slice (collective: every rank of the group calls it, in one order)."""
        if name not in self.dims or self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=self.dims[name])

    def shard_state_dict(self, state: dict) -> dict:
        return {k: self.shard(k, v) for k, v in state.items()}

    def gather_state_dict(self, state: dict) -> dict:
        return {k: self.gather(k, v) for k, v in state.items()}


def check_divisible(cfg, size: int) -> str | None:
    """Why a model of shape cfg cannot be split over `size` ranks, or None."""
    if cfg.num_key_value_heads % size or cfg.intermediate_size % size:
        return (f"tensor parallelism over {size} ranks needs the KV heads ({cfg.num_key_value_heads}) and the "
                f"intermediate size ({cfg.intermediate_size}) to be multiples of {size}")
    return None


def _keep_slice(linear: nn.Linear, dim: int, rank: int, size: int):
    """Replace the Linear's parameters by this rank's slice (dim 0: out-features, with the bias; 1: in-features);
    one rank keeps them as they are."""
    if size == 1:
        return
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.chunk(size, dim)[rank].clone(),
                                     requires_grad=linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.chunk(size, 0)[rank].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _region_hooks(module: nn.Module, group):
    def pre(mod, args):
        return (_CopyToRegion.apply(args[0], group), *args[1:])

    def post(mod, args, out):
        return _ReduceFromRegion.apply(out, group)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def shard_model(model, group=None) -> TensorParallel:
    """Split `model` (a model.Model, full weights identical on every rank) in place over the ranks of `group`
    (default: the whole world) and install the region all-reduces. Returns the sharding record. Build the
    optimizer and the KV store after this: they see the local parameters and heads."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    cfg = model.config
    why = check_divisible(cfg, size)
    if why:
        raise ValueError(why)
    dims = {}
    for i, block in enumerate(model.layers):
        for names, dim in ((COLUMN_PARALLEL, 0), (ROW_PARALLEL, 1)):
            for name in names:
                linear = block.get_submodule(name)
                if type(linear) is not nn.Linear:
                    raise ValueError(f"tensor parallelism shards plain nn.Linear projections; layer {i}'s {name} "
                                     f"is a {type(linear).__name__} (LoRA and other wrappers are not supported)")
                _keep_slice(linear, dim, rank, size)
                dims[f"model.layers.{i}.{name}.weight"] = dim
                if dim == 0 and linear.bias is not None:
                    dims[f"model.layers.{i}.{name}.bias"] = 0
        attn = block.self_attn
        attn.n_heads, attn.n_kv_heads = attn.n_heads // size, attn.n_kv_heads // size
        if size > 1:
            _region_hooks(block.self_attn, group)
            _region_hooks(block.mlp, group)
    return TensorParallel(group, rank, size, dims)


def grad_norm_sq(model, tp: TensorParallel | None, gradient) -> torch.Tensor:
    """The squared L2 norm of the whole (unsharded) model's gradient, as one GPU would compute it: sharded
    parameters' shares summed over the group, replicated ones counted once. gradient(p): the tensor to measure
    (p.grad, or main_grad for bf16 weights)."""
    device = next(model.parameters()).device
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    dims = tp.dims if tp is not None else {}
    for name, p in model.named_parameters():
        g = gradient(p)
        if g is not None:
            sq = torch.linalg.vector_norm(g, dtype=torch.float32).to(device) ** 2
            if name in dims:
                sharded += sq
            else:
                replicated += sq
    if tp is not None and tp.size > 1:
        dist.all_reduce(sharded, group=tp.group)
    return sharded + replicated
