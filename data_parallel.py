"""
Data parallelism over sequences: each rank of a group trains on its own sequences with a full (or tensor-parallel)
copy of the model, and the gradients are averaged over the group once per step, after chunked_step's stage 2 has
accumulated every chunk's share locally (many backward calls, no communication in between).

Not FSDP2's fully_shard: chunk_train.py calls a model's parts outside their forward() (Block.qkv for the last
layer in stage 1, Model.embed, Model.loss's sliced head), where fully_shard's hooks, which gather the sharded
parameters, never run; and with set_requires_gradient_sync(False) it would keep unsharded gradients anyway. Sharding
weights and optimizer state over data-parallel ranks (ZeRO) is therefore not done: every data-parallel rank holds
its whole (tensor-parallel) share of the weights, gradients and optimizer state.
"""

import torch
import torch.distributed as dist

BUCKET_NUMEL = 1 << 25  # elements per all-reduce (128 MB of fp32): few calls, bounded temporary memory


def gradient(p):
    """The gradient a step reads: fp32 main_grad for bf16 weights (precision.py), else grad."""
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def average_gradients(params, group=None):
    """Replace each parameter's gradient by its mean over the ranks of `group`, in flat buckets of one dtype.
    Collective: every rank calls it with its parameters in the same order, each with a gradient."""
    size = dist.get_world_size(group)
    if size == 1:
        return
    grads = [gradient(p) for p in params if p.requires_grad]
    if any(g is None for g in grads):
        raise RuntimeError("average_gradients: a trainable parameter has no gradient (ranks would disagree)")
    bucket, numel = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        numel += g.numel()
        last = i + 1 == len(grads)
        if last or numel >= BUCKET_NUMEL or grads[i + 1].dtype != g.dtype:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, group=group)
            flat /= size
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            bucket, numel = [], 0
