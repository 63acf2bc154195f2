"""
fp32 gradient accumulation for low-precision (bf16) parameters, installed on a model from outside.

A bf16 model halves the weight memory, but a gradient summed over many chunks (chunk_train.py) or micro-batches in
bf16 loses the small contributions. So each low-precision parameter gets an fp32 `param.main_grad` that every
backward adds into, and param.grad stays None:

  - Linear weights and biases: the weight-gradient GEMM accumulates onto main_grad in fp32 (beta = 1) instead of
    writing a bf16 weight.grad that a second kernel then adds - the same sum with one rounding fewer, and no extra
    pass over 2 + 8 bytes per parameter per chunk (bench/RESULTS.md). `fp32_gradients` swaps every nn.Linear of the
    model, wherever it sits (inside a LoRA-style wrapper too), for an `FP32GradLinear` over the same Parameters and
    hooks, and swaps the originals back on exit.
  - the token embedding's rows: the rows a call looked up add their gradients into main_grad in fp32
    (`FP32GradEmbedding`), instead of a bf16 gradient of the whole [vocab, hidden] table, zero but for those rows,
    that a hook then adds: for the 7B's 152K vocabulary a 1 GB table per chunk and a 5 GB pass over it
    (~90 ms of its sparse 128K step, bench/RESULTS.md).
  - every other parameter (norms, a tied LM head's weight as the embedding, a wrapper's own weights, the
    weights of nn.Linear or nn.Embedding subclasses, whose forward this cannot know): its bf16 gradient arrives in
    param.grad, and a post-accumulate-grad hook folds it into main_grad.

model.py knows nothing of this: it calls its Linear modules, whatever class they have at the time.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def add_matmul_fp32(out, a, b):
    """out += a @ b for an fp32 `out`, the products summed in fp32 and never rounded to a's (bf16) dtype first."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
    elif out.is_cuda:  # one GEMM: bf16 inputs, fp32 accumulate, beta = 1 onto out (cuBLAS reads and writes it)
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:  # the CPU has no mixed-dtype GEMM; the same sum through fp32 copies (tests)
        out.addmm_(a.float(), b.float())


def _over_state(cls, module):
    """A module of class `cls` over the very state of `module`: the same Parameters (ties and optimizer references
    hold), hooks and flags."""
    swapped = cls.__new__(cls)
    swapped.__dict__.update(vars(module))
    return swapped


class _LinearMainGrad(torch.autograd.Function):
    """y = x W^T + b whose backward adds dL/dW, dL/db into fp32 `main_grad` tensors instead of returning them."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_main_grad, bias_main_grad):
        ctx.save_for_backward(x, weight)
        ctx.main_grads = weight_main_grad, bias_main_grad
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        add_linear_main_grads(grad_out, x, *ctx.main_grads)
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


def add_linear_main_grads(grad_out, x, weight_main_grad, bias_main_grad=None):
    """The weight (and bias) gradients of y = x W^T + b added into fp32 main_grad tensors: grad_out [..., out],
    x [..., in]; W's [out, in] += dY^T X, b's [out] += the sum of dY over tokens, both summed in fp32."""
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # [tokens, out_features]
    add_matmul_fp32(weight_main_grad, grad_2d.t(), x.reshape(-1, x.shape[-1]))
    if bias_main_grad is not None:
        bias_main_grad += grad_2d.sum(0, dtype=torch.float32)


class FP32GradLinear(nn.Linear):
    """nn.Linear whose backward adds dL/dW (and dL/db) straight into the fp32 `main_grad` its weight (and bias)
    carry; weight.grad stays None on that path. Without main_grad, or without grad, it is nn.Linear."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP32GradLinear":
        return _over_state(cls, linear)

    def main_grads(self):
        """(weight's, bias's or None) fp32 main_grad tensors that this call's backward adds into, or None when it
        runs as nn.Linear (no main_grad, or no gradient wanted)."""
        weight_main_grad = getattr(self.weight, "main_grad", None)
        bias_main_grad = getattr(self.bias, "main_grad", None)
        if (weight_main_grad is None or (self.bias is not None and bias_main_grad is None)
                or not (torch.is_grad_enabled() and self.weight.requires_grad)):
            return None
        return weight_main_grad, bias_main_grad

    def forward(self, x):
        main_grads = self.main_grads()
        if main_grads is None:
            return F.linear(x, self.weight, self.bias)
        return _LinearMainGrad.apply(x, self.weight, self.bias, *main_grads)


class _EmbeddingMainGrad(torch.autograd.Function):
    """rows = weight[idx] whose backward adds dL/d(rows) into the looked-up rows of an fp32 `main_grad`."""

    @staticmethod
    def forward(ctx, idx, weight, weight_main_grad):
        ctx.save_for_backward(idx)
        ctx.main_grad = weight_main_grad
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        rows, grad = idx.flatten(), grad_out.reshape(-1, grad_out.shape[-1]).float()  # [tokens], [tokens, hidden]
        if ctx.main_grad.is_cuda:  # repeated tokens summed in a fixed order (a sort, not atomics): deterministic
            ctx.main_grad.index_put_((rows,), grad, accumulate=True)
        else:  # the CPU's index_add_ is sequential over the index
            ctx.main_grad.index_add_(0, rows, grad)
        return None, None, None


class FP32GradEmbedding(nn.Embedding):
    """nn.Embedding whose backward adds the looked-up rows' gradients straight into the fp32 `main_grad` its weight
    carries; weight.grad stays None on that path. Without main_grad, without grad, or with any of nn.Embedding's
    options that change the gradient or the lookup (padding_idx, max_norm, scale_grad_by_freq, sparse), it is
    nn.Embedding."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "FP32GradEmbedding":
        return _over_state(cls, embedding)

    def forward(self, idx):
        main_grad = getattr(self.weight, "main_grad", None)
        plain = (self.padding_idx is None and self.max_norm is None and not self.scale_grad_by_freq
                 and not self.sparse)
        if main_grad is None or not plain or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(idx)
        return _EmbeddingMainGrad.apply(idx, self.weight, main_grad)


def low_precision_params(model):
    """The trainable parameters that are not fp32 (each tied one once)."""
    return [p for p in model.parameters() if p.requires_grad and p.dtype != torch.float32]


def allocate_main_grads(model):
    """An fp32 zero main_grad for every trainable low-precision parameter that has none."""
    for p in low_precision_params(model):
        if getattr(p, "main_grad", None) is None:
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)


def drop_main_grads(model):
    """Free every parameter's main_grad (a later backward under fp32_gradients starts from zeros)."""
    for p in model.parameters():
        p.main_grad = None


def _fold_into_main_grad(param):
    """Post-accumulate-grad hook: param.main_grad (fp32) += param.grad; drop grad. (It also fires, with no grad, for
    an FP32GradLinear weight, which wrote into main_grad itself; it is needed on those too: a tied LM head's weight
    is the embedding's, whose gradient arrives as param.grad.)"""
    if param.grad is not None:
        param.main_grad.add_(param.grad)
        param.grad = None


_FP32_GRAD_CLASSES = {nn.Linear: FP32GradLinear, nn.Embedding: FP32GradEmbedding}


def _swap_modules(model):
    """Replace every module of exactly class nn.Linear or nn.Embedding (subclasses keep their own forward) in its
    parent by its FP32Grad class over the same state. Returns [(parent, name, original)] to undo it."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _FP32_GRAD_CLASSES:
                setattr(parent, name, _over_state(_FP32_GRAD_CLASSES[type(child)], child))
                swapped.append((parent, name, child))
    return swapped


@contextlib.contextmanager
def fp32_gradients(model):
    """While active, low-precision parameters accumulate each backward's gradient in fp32 param.main_grad (created
    as zeros where missing; existing ones are added to, like param.grad): the model's nn.Linear and nn.Embedding
    modules are FP32GradLinear and FP32GradEmbedding, the other parameters' gradients are folded in by hooks. fp32
    models are left alone."""
    params = low_precision_params(model)
    if not params:
        yield
        return
    allocate_main_grads(model)
    hooks = [p.register_post_accumulate_grad_hook(_fold_into_main_grad) for p in params]
    swapped = _swap_modules(model)
    try:
        yield
    finally:
        for parent, name, original in swapped:
            setattr(parent, name, original)
        for hook in hooks:
            hook.remove()
