"""
What stage 1 of chunk-recurrent training keeps for stage 2, so that stage 2 does not compute it again: attention
outputs (KeptOutputs, a wrapper around the attention seam, attention.py) and MLP outputs (KeptMLPOutputs).

Stage 1 of chunk-recurrent training (no grad) computes each chunk's attention over the history; stage 2 recomputes
exactly the same (o, lse) - same queries, same positions, same pages - before its backward. Where GPU memory allows,
stage 1 keeps them and stage 2 skips its forward kernels. Outputs are keyed by (layer, chunk start, chunk length)
and kept within a byte budget; when it is full the chunks furthest left give way: stage 2 reaches them last, and
their attention, over the shortest history, is the cheapest to recompute.
"""
import contextlib

import torch
import torch.nn as nn

from attention import attend, attention_forward
from precision import FP32GradLinear, add_linear_main_grads


class KeptOutputs:
    def __init__(self, budget_bytes=0):
        self.budget_bytes = budget_bytes
        self.bytes = 0  # what the kept (o, lse) take now (a running sum: summing per call is quadratic)
        self._outputs = {}  # (layer, start, length) -> (o [B, C, H, D], lse [B, H, C] fp32)

    def __len__(self):
        return len(self._outputs)

    def attend(self, key, history, q, k, v, kernel, keep=False):
        """attention.attend of q over `history` for the call `key` = (layer, start, length): with the outputs kept
        for it (then forgotten: a chunk is recomputed once), or, with keep and no grad, keeping them if they fit."""
        kept = self._pop(key) if key in self._outputs else None
        size = q.numel() * q.element_size() + q.shape[0] * q.shape[2] * q.shape[1] * 4  # o and the fp32 lse
        if keep and kept is None and not torch.is_grad_enabled() and self._make_room(key, size):
            kept = self._outputs[key] = attention_forward(history, q, k, v, kernel)
            self.bytes += size
        return attend(history, q, k, v, kernel, kept=kept)

    def forget_from(self, layer, length):
        """Forget the layer's outputs that attended over positions >= length (truncated away)."""
        for key in [key for key in self._outputs if key[0] == layer and key[1] + key[2] > length]:
            self._pop(key)

    def _pop(self, key):
        o, lse = self._outputs.pop(key)
        self.bytes -= o.numel() * o.element_size() + lse.numel() * lse.element_size()
        return o, lse

    def _make_room(self, key, size):
        """Evict kept outputs of chunks left of key's until `size` more bytes fit; False if they cannot."""
        if self.bytes + size > self.budget_bytes:
            for old in sorted(self._outputs, key=lambda k: k[1]):
                if self.bytes + size <= self.budget_bytes or old[1] >= key[1]:
                    break
                self._pop(old)
        return self.bytes + size <= self.budget_bytes


class KeptMLPOutputs:
    """The MLP down projections' outputs y [B, C, hidden], kept from stage 1 for stage 2 (chunk_train.py).

    Stage 2 recomputes a chunk's forward for its backward. The down projection's output only feeds the residual
    stream, and its backward needs only the projection's input h and weight, so with stage 1's y at hand (the same
    value: recomputation is deterministic, as the stored K/V already assume) stage 2 skips that GEMM: 2 x
    intermediate FLOPs per element kept, the most of any of a layer's outputs (the 7B: 37.9K per element; its sparse
    128K step in 4096-token chunks skips 0.47 PFLOP for 21.3 GiB and ran 0.67-0.78 s faster, bench/RESULTS.md).
    Chunks keep theirs in stage 1's order while `budget_bytes` allow. Stage 2 then skips the SwiGLU forward that
    feeds those GEMMs too (layer_ops.swiglu_into asks the projection's reads_input()): its backward recomputes h.

    installed(model) routes each layer's mlp.down_proj through this for a step; `chunk` = (start, length) names the
    chunk running now (chunk_train sets it): without grad a call keeps its output, with grad it takes the kept one
    if there is one and computes otherwise."""

    def __init__(self, budget_bytes=0):
        self.budget_bytes, self.bytes = budget_bytes, 0
        self.chunk = None
        self._outputs = {}  # (layer, start, length) -> y

    def __len__(self):
        return len(self._outputs)

    @contextlib.contextmanager
    def installed(self, model):
        """For the duration, each layer's mlp.down_proj of exactly nn.Linear or FP32GradLinear without hooks (a
        backward this class knows) goes through the cache; wrapped ones (LoRA, tensor parallel) and hooked ones
        keep their own path. Everything kept is dropped on exit."""
        swapped = []
        for layer, block in enumerate(model.layers):
            down = block.mlp.down_proj
            if type(down) in (nn.Linear, FP32GradLinear) and not (down._forward_hooks or down._forward_pre_hooks
                                                                  or down._backward_hooks):
                block.mlp.down_proj = _KeptOutputLinear(down, self, layer)
                swapped.append((block.mlp, down))
        try:
            yield self
        finally:
            for mlp, down in swapped:
                mlp.down_proj = down
            self._outputs.clear()
            self.bytes, self.chunk = 0, None

    def _key(self, layer):
        return (layer, *self.chunk)  # the running chunk's (start, length)

    def keep(self, layer, y):
        size = y.numel() * y.element_size()
        key = self._key(layer)
        if key not in self._outputs and self.bytes + size <= self.budget_bytes:
            self._outputs[key] = y
            self.bytes += size

    def holds(self, layer):
        """Whether an output of the running chunk at `layer` is kept."""
        return self.chunk is not None and self._key(layer) in self._outputs

    def take(self, layer):
        """The kept output of the running chunk at `layer` (then forgotten: a chunk is recomputed once), or None."""
        y = self._outputs.pop(self._key(layer), None)
        if y is not None:
            self.bytes -= y.numel() * y.element_size()
        return y


class _KeptOutputLinear(nn.Module):
    """A Linear `base` (its child, parameters unchanged) whose output KeptMLPOutputs keeps or hands back."""

    def __init__(self, base, cache, layer):
        super().__init__()
        self.base, self.cache, self.layer = base, cache, layer

    def reads_input(self):
        """False when the coming call returns a kept output (grad on, one kept for this layer and chunk): it reads
        h only in backward, so layer_ops.swiglu_into need not compute h now."""
        return not (torch.is_grad_enabled() and self.cache.holds(self.layer))

    def forward(self, h):
        if self.cache.chunk is None:
            return self.base(h)
        if not torch.is_grad_enabled():
            y = self.base(h)
            self.cache.keep(self.layer, y)
            return y
        y = self.cache.take(self.layer)
        if y is None:
            return self.base(h)
        # the parameters' gradients go where the base's backward would put them
        main_grads = self.base.main_grads() if type(self.base) is FP32GradLinear else None
        return _LinearOfKeptOutput.apply(h, self.base.weight, self.base.bias, _Holder(y), main_grads)


class _Holder:
    """A tensor passed to an autograd Function as a plain object: the Function returns it as its output, and an
    output that is also an input would become a view of it."""

    def __init__(self, tensor):
        self.tensor = tensor


class _LinearOfKeptOutput(torch.autograd.Function):
    """y = h W^T + b with y given (kept from stage 1): the forward returns it, the backward is the Linear's.
    Under autocast the forward's matmul would have run in h's dtype: the gradients are formed in it too and the
    parameters' cast back, as autograd through the cast would. main_grads: (weight's, bias's or None) fp32 tensors
    to add the parameter gradients into (FP32GradLinear), or None to return them."""

    @staticmethod
    def forward(ctx, h, weight, bias, kept, main_grads):
        ctx.save_for_backward(h, weight)
        ctx.main_grads, ctx.has_bias = main_grads, bias is not None
        return kept.tensor

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_w = grad_b = None
        if ctx.main_grads is not None:
            add_linear_main_grads(grad_out, h, *ctx.main_grads)
        else:
            grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = (grad_2d.t() @ h.reshape(-1, h.shape[-1])).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_2d.sum(0).to(weight.dtype)
        grad_h = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_h, grad_w, grad_b, None, None
