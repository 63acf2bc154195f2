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
Gradients of sharded parameters are the matching slices of one GPU's.

LoRA (lora.LoRALinear, y = base(x) + s (x A^T) B^T, A [r, in], B [out, r]): the base is cut as above; on a
column-parallel projection B is cut along out (rank r's [out/T, r]) and A stays whole, on a row-parallel one A is
cut along in ([r, in/T]) and B stays whole. The whole factor's gradient is then a partial sum over the ranks
(column: dA = s B_r^T dY_r^T x, each rank summing its own output columns; row: dB = s dY^T (x_r A_r^T), each rank
its own input columns), so `TensorParallel.partial` names them and `reduce_partial_gradients` sums them over the
group once per step, after the chunked backward (like data parallelism's average).

Optimizer state is gathered and cut like its parameter (`gather_state` / `shard_state`): a state tensor of the
parameter's shape (AdamW moments), its flat form (optim.MixedPrecisionAdamW: fp32 master, fp32 moments), or an
Adafactor factor ([out, 1] / [1, in]: cut when it runs along the split dim, else whole, see `Adafactor`).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from lora import LoRALinear


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
    partial: set[str] = field(default_factory=set)  # whole (replicated) LoRA factors whose gradient is a partial sum

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

    def _state_dim(self, name: str, shape: tuple, value: torch.Tensor) -> int | None:
        """The dim of `value` (optimizer state of parameter `name`, whose tensor has `shape`: the local one for
        local state, the full one for full state) along which it is cut like the parameter, or None when it is whole
        on every rank: replicated parameters, scalars, and Adafactor factors that averaged over the split dim
        (row_var [out, 1] of a row-parallel weight, col_var [1, in] of a column-parallel one). Flat state
        (MixedPrecisionAdamW's [numel]) is handled by the caller, viewed as `shape`."""
        d = self.dims.get(name)
        if d is None or self.size == 1 or value.dim() == 0:
            return None
        if value.dim() == len(shape) and all(v in (s, 1) for v, s in zip(value.shape, shape)):
            return d if value.shape[d] == shape[d] != 1 else None
        raise ValueError(f"optimizer state of {name} shaped {tuple(value.shape)} is neither its parameter's "
                         f"{tuple(shape)} nor a factor of it: tensor parallelism cannot gather or cut it")

    def _flat(self, shape: tuple, value: torch.Tensor) -> bool:
        return value.dim() == 1 and len(shape) > 1 and value.numel() == math.prod(shape)

    def gather_state(self, name: str, local_shape: tuple, value):
        """The full (one-GPU) form of optimizer state `value` of this rank's parameter `name` [local_shape]
        (collective over the group, like gather)."""
        if not torch.is_tensor(value) or name not in self.dims or self.size == 1:
            return value
        if self._flat(local_shape, value):  # MixedPrecisionAdamW: [numel] of the parameter's row-major order
            return self.gather(name, value.view(local_shape)).reshape(-1)
        d = self._state_dim(name, local_shape, value)
        if d is None:
            return value
        parts = [torch.empty_like(value) for _ in range(self.size)]
        dist.all_gather(parts, value.contiguous(), group=self.group)
        return torch.cat(parts, dim=d)

    def shard_state(self, name: str, local_shape: tuple, value):
        """This rank's share of full optimizer state `value` of parameter `name` (whose local shard is
        [local_shape]): the inverse of gather_state."""
        if not torch.is_tensor(value) or name not in self.dims or self.size == 1:
            return value
        full_shape = list(local_shape)
        full_shape[self.dims[name]] *= self.size
        if self._flat(full_shape, value):
            return self.shard(name, value.view(full_shape)).reshape(-1)
        d = self._state_dim(name, tuple(full_shape), value)
        return value if d is None else value.chunk(self.size, d)[self.rank].clone()

    def reduce_partial_gradients(self, model):
        """Sum the partial gradients of the whole LoRA factors over the group (once per step, after backward)."""
        if self.size == 1 or not self.partial:
            return
        grads = [p.grad for name, p in model.named_parameters() if name in self.partial and p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def check_divisible(cfg, size: int) -> str | None:
    """Why a model of shape cfg cannot be split over `size` ranks, or None."""
    if cfg.num_key_value_heads % size or cfg.intermediate_size % size:
        return (f"tensor parallelism over {size} ranks needs the KV heads ({cfg.num_key_value_heads}) and the "
                f"intermediate size ({cfg.intermediate_size}) to be multiples of {size}")
    return None


def _cut(param: nn.Parameter, dim: int, rank: int, size: int) -> nn.Parameter:
    with torch.no_grad():
        return nn.Parameter(param.chunk(size, dim)[rank].clone(), requires_grad=param.requires_grad)


def _keep_slice(linear: nn.Linear, dim: int, rank: int, size: int):
    """Replace the Linear's parameters by this rank's slice (dim 0: out-features, with the bias; 1: in-features);
    one rank keeps them as they are."""
    if size == 1:
        return
    linear.weight = _cut(linear.weight, dim, rank, size)
    if dim == 0 and linear.bias is not None:
        linear.bias = _cut(linear.bias, 0, rank, size)
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
    cuts = []  # (parameter's owner, attribute, dim): recorded as names once every Parameter is in place
    for i, block in enumerate(model.layers):
        for targets, dim in ((COLUMN_PARALLEL, 0), (ROW_PARALLEL, 1)):
            for name in targets:
                module = block.get_submodule(name)
                linear = module.base if isinstance(module, LoRALinear) else module
                if type(linear) is not nn.Linear:
                    raise ValueError(f"tensor parallelism shards plain nn.Linear projections (or LoRA over one); "
                                     f"layer {i}'s {name} is a {type(linear).__name__}")
                _keep_slice(linear, dim, rank, size)
                cuts.append((linear, "weight", dim))
                if dim == 0 and linear.bias is not None:
                    cuts.append((linear, "bias", 0))
                if isinstance(module, LoRALinear):
                    # column: B [out, r] cut along out, A [r, in] whole; row: A cut along in, B [out, r] whole
                    cut, whole = ("lora_B", "lora_A") if dim == 0 else ("lora_A", "lora_B")
                    if size > 1:
                        setattr(module, cut, _cut(getattr(module, cut), dim, rank, size))
                    cuts += [(module, cut, dim), (module, whole, None)]
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    dims, partial = {}, set()
    for owner, attr, dim in cuts:
        name = names[id(getattr(owner, attr))]
        if dim is None:
            partial.add(name)
        else:
            dims[name] = dim
    for block in model.layers:
        attn = block.self_attn
        attn.n_heads, attn.n_kv_heads = attn.n_heads // size, attn.n_kv_heads // size
        if size > 1:
            _region_hooks(block.self_attn, group)
            _region_hooks(block.mlp, group)
    return TensorParallel(group, rank, size, dims, partial)


class Adafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor (its single-tensor arithmetic, its state: step, row_var, col_var, variance) over this
    rank's shards, with the statistics that span a split dim summed over the group, so that every update is one
    GPU's (up to the order of the sums). For weight W [out, in] cut along d:
        row_var [out, 1]   mean over in of g^2: local for d = 0 (a shard of rows), an all-reduced sum for d = 1
        col_var [1, in]    mean over out of g^2: local for d = 1, an all-reduced sum for d = 0
        row_var.mean over out (the estimate's normaliser), ||W|| (alpha's RMS) and ||update|| (the clipping RMS):
                           sums over the whole tensor
    so a factor along the split dim is cut like W and the other one is whole and equal on every rank (what
    TensorParallel.gather_state / shard_state assume). `names`: {parameter: name in model.named_parameters()}."""

    def __init__(self, params, tp: TensorParallel, names: dict, **kwargs):
        super().__init__(params, **kwargs)
        self.tp, self.names = tp, names

    def _sum(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x summed over the group when the parameter `name` is cut (its local sum is a share), else x."""
        if name in self.tp.dims and self.tp.size > 1:
            x = x.contiguous()
            dist.all_reduce(x, group=self.tp.group)
        return x

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["maximize"]:
                raise ValueError("tensor_parallel.Adafactor does not maximize")
            lr, (eps1, eps2), d = float(group["lr"]), group["eps"], group["d"]
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group, lr, eps1, eps2, d)
        return loss

    def _update(self, p, grad, group, lr, eps1, eps2, d):
        name, state = self.names[p], self.state[p]
        dim, full = self.tp.dims.get(name), list(grad.shape)  # full: the whole parameter's shape
        if dim is not None:
            full[dim] *= self.tp.size
        if not state:  # torch's _init_group
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if grad.dim() > 1:
                state["row_var"] = grad.new_zeros(*grad.shape[:-1], 1)
                state["col_var"] = grad.new_zeros(*grad.shape[:-2], 1, grad.shape[-1])
            else:
                state["variance"] = torch.zeros_like(grad)
        if eps1 is None:
            eps1 = torch.finfo(p.dtype).eps
        state["step"] += 1
        t = state["step"].item()
        one_minus_beta2_t, rho_t = t ** group["beta2_decay"], min(lr, 1 / t ** 0.5)
        # norms as torch's (no parameter-sized temporaries), squared so that the ranks' shares add up
        norm_sq = self._sum(torch.linalg.vector_norm(p, dtype=torch.float32).square(), name)  # ||W||^2, whole tensor
        alpha = max(eps2, norm_sq.sqrt().item() / math.prod(full) ** 0.5) * rho_t
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        if grad.dim() > 1:  # [out, in]: row_var [out, 1], col_var [1, in]
            rows_sq = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_()  # [out, 1]: a share when dim = 1
            cols_sq = torch.linalg.vector_norm(grad, dim=-2, keepdim=True).square_()  # [1, in]: a share when dim = 0
            if dim == grad.dim() - 1:
                rows_sq = self._sum(rows_sq, name)
            if dim == grad.dim() - 2:
                cols_sq = self._sum(cols_sq, name)
            state["row_var"].lerp_(rows_sq.div_(full[-1]), one_minus_beta2_t)
            state["col_var"].lerp_(cols_sq.div_(full[-2]), one_minus_beta2_t)
            row_mean = state["row_var"].sum(dim=-2, keepdim=True)  # [1, 1]: over all rows when dim = 0
            if dim == grad.dim() - 2:
                row_mean = self._sum(row_mean, name)
            var_estimate = state["row_var"] @ state["col_var"]
            var_estimate.div_(row_mean.div_(full[-2]).clamp_(min=eps1))
        else:  # a vector (bias): elementwise, cut like it
            state["variance"].lerp_(grad * grad, one_minus_beta2_t)
            var_estimate = state["variance"].clone()
        update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        update_sq = self._sum(torch.linalg.vector_norm(update, dtype=torch.float32).square(), name)
        denom = max(1.0, update_sq.sqrt().item() / (math.prod(full) ** 0.5 * d))
        p.add_(update, alpha=-alpha / denom)


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
