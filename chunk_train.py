"""
Chunk-recurrent training: the exact full-sequence gradient with the activation memory of one chunk.

A sequence of T tokens is cut into chunks of C tokens. Chunk c influences later chunks only through its keys and
values at every layer, so backprop can run chunk by chunk if those K/V, and the gradients later chunks send back to
them, are kept in a store (paged_kv.py):

  stage 1 (no grad, chunks left to right): run each chunk through the layers, appending every layer's K/V to the
          store. Only what the cache needs runs: the last layer stops after its K/V projection - no attention, MLP,
          LM head or loss there - and the last chunk is skipped, since stage 2 starts with it and stores its K/V.
  stage 2 (chunks right to left): recompute the chunk's forward with grad, attending over the stored history plus
          itself; loss = (sum of the chunk's token losses) / (tokens in the whole batch); backward. The attention
          backward adds dL/dK, dL/dV of history positions into the store's fp32 gradient pages and hands the chunk's
          own K/V the gradient accumulated for them by all later chunks plus its own. Then the chunk's pages are
          released (LIFO) and the previous chunk goes next.

keep_activations=N (memory for speed): the N chunks before the last run stage 1 with grad instead, their
forward kept as in any backprop; stage 2 then runs only their backward, in the same right-to-left order, so the
gradient is the same. Each kept chunk saves a forward of the whole chunk (stage 2's recomputation), for one chunk's
activations more of memory per kept chunk (with N = chunks - 1 nothing is recomputed: plain backprop, chunk by chunk).
mlp_cache_bytes=M (memory for speed, finer grained): stage 1 keeps the MLP down projections' outputs within M bytes
and stage 2's recomputation takes them instead of running those GEMMs (kept_outputs.KeptMLPOutputs).

After the step, the parameters' gradients are those of the mean token loss of the whole batch, as full-sequence
backprop would compute them, accumulated in fp32 across chunks in either of two set-ups:
  - fp32 parameters, compute under autocast (`compute_dtype`): gradients accumulate in param.grad (fp32).
  - bf16 parameters (half the weight memory, for large models): gradients accumulate in an fp32 `param.main_grad`
    and param.grad stays None, so no sum over chunks is ever rounded to bf16 (precision.fp32_gradients, active
    during stage 2: the Linear weight-gradient GEMMs add into main_grad directly, hooks fold in the rest).
    Gradients accumulate into existing main_grad across steps, like param.grad does; set it to None (or zero it)
    to start over.
K/V are stored in the compute dtype, their gradients in fp32.

With a sparse store (PagedKVStore or OffloadedKVStore with sparse=..., sparse_attn.py) each block of queries
attends to a budget of selected history pages; stage 1 stores the selection and stage 2 reuses it, so the gradient
is the exact gradient of that sparse-attention model.
"""

import contextlib
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kept_outputs import KeptMLPOutputs
from model import check_doc_start, trained_tokens
from paged_kv import PagedKVStore
from precision import fp32_gradients


class ChunkAttention:
    """The attention backend model.py calls for the chunk at positions [start, start + T): store the chunk's K/V
    unless the store already holds them, then attend over the store (history + chunk). Stage 1 stores every chunk
    but the last; stage 2 finds them stored (same values: recomputation is deterministic) and stores the last
    itself. Idempotent, so recomputing a layer (activation checkpointing) never stores twice.
    keep_outputs (stage 1 of a training step): ask the store to keep the attention outputs, which stage 2 would
    otherwise recompute (PagedKVStore's output_cache_bytes).
    doc_start: the chunk's [B, T] document starts (absolute positions; see chunked_step), handed to the store, whose
    attention then masks every key before a query's document start; None: plain causal attention."""

    def __init__(self, store, start: int, keep_outputs: bool = False, doc_start=None):
        self.store, self.start, self.keep_outputs, self.doc_start = store, start, keep_outputs, doc_start

    def __call__(self, q, k, v, layer_idx):
        stored = self.store.length(layer_idx)
        if stored == self.start:
            self.store.append(layer_idx, k.detach(), v.detach())
        elif stored != self.start + q.shape[1]:
            raise RuntimeError(f"layer {layer_idx} holds {stored} tokens; chunk [{self.start}, "
                               f"{self.start + q.shape[1]}) needs {self.start} (to store) or its end (stored)")
        if self.doc_start is None:  # stores without document masks need not know the argument
            return self.store.attend(layer_idx, q, k, v, keep_output=self.keep_outputs)
        return self.store.attend(layer_idx, q, k, v, keep_output=self.keep_outputs, doc_start=self.doc_start)


class StepProgress:
    """One progress bar over a whole step, both stages: stage 1's chunks count 1 each, stage 2's 3 each (a chunk's
    forward recomputed + its backward: about three forwards), so that the ETA holds across the stages. The postfix
    says the stage, its chunk and its tokens/s."""

    STAGE_2_WEIGHT = 3

    def __init__(self, stage1_chunks: int, stage2_chunks: int, tokens_per_chunk: int, enabled: bool):
        self.bar = tqdm(total=stage1_chunks + self.STAGE_2_WEIGHT * stage2_chunks, desc="step", leave=False,
                        disable=not enabled, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
                                                        "{postfix}")
        self.counts, self.tokens_per_chunk = {1: stage1_chunks, 2: stage2_chunks}, tokens_per_chunk
        self.stage, self.done, self.t0 = 1, 0, None

    def chunk_done(self, stage: int):
        if stage != self.stage or self.t0 is None:
            self.stage, self.done, self.t0 = stage, 0, self.bar.format_dict["elapsed"]
        self.done += 1
        rate = self.done * self.tokens_per_chunk / max(1e-9, self.bar.format_dict["elapsed"] - self.t0)
        self.bar.set_postfix_str(f"stage {stage}: chunk {self.done}/{self.counts[stage]}, {rate:,.0f} tok/s",
                                 refresh=False)
        self.bar.update(1 if stage == 1 else self.STAGE_2_WEIGHT)

    def close(self):
        self.bar.close()


def _chunks(seq_len, chunk_size):
    return [(s, min(s + chunk_size, seq_len)) for s in range(0, seq_len, chunk_size)]


def _base_dtype(model) -> torch.dtype:
    """The dtype of the base weights: the frozen parameters' (LoRA: fp32 adapters train beside a bf16 or fp32 base),
    or with none frozen every parameter's. They must share one; a trainable one is fp32 or that dtype."""
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    dtypes = frozen or {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        raise ValueError(f"all {'frozen ' if frozen else ''}parameters must share one dtype, found "
                         f"{sorted(map(str, dtypes))}")
    base = dtypes.pop()
    odd = {p.dtype for p in model.parameters() if p.requires_grad} - {base, torch.float32}
    if odd:
        raise ValueError(f"trainable parameters must be float32 or the base weights' {base}, found "
                         f"{sorted(map(str, odd))}")
    return base


def _autocast(model, device, compute_dtype):
    # no weight cache: each weight is used once per chunk, and the cache would pin a bf16 copy of every weight for
    # the whole chunk (15 GB for a 7B model), defeating per-layer recomputation
    enabled = compute_dtype != _base_dtype(model)  # on whenever the compute dtype differs from the base weights'
    return torch.autocast(device.type, dtype=compute_dtype, enabled=enabled, cache_enabled=False)


def _check(model, idx, targets, chunk_size, store, doc_start=None):
    if idx.dim() != 2:
        raise ValueError(f"idx must be [batch, seq_len], got shape {tuple(idx.shape)}")
    if targets is not None and targets.shape != idx.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must have idx's shape {tuple(idx.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    page_size = getattr(store, "page_size", None)
    if page_size and chunk_size % page_size:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of page_size {page_size}, so that a chunk's "
                         f"pages are its own and stage 2 can release them")
    check_doc_start(doc_start, idx)
    _base_dtype(model)


def _slice(doc_start, s, e):
    """The chunk [s, e) of doc_start [B, T] as the kernels take it: int32, contiguous. Made once per chunk and
    stage and shared by every layer (the kernels' launchers would otherwise cast and copy it once per layer and
    call)."""
    if doc_start is None:
        return None
    return doc_start[:, s:e].to(torch.int32).contiguous()


@torch.no_grad()
def fill_kv(model, idx, store, chunk_size, compute_dtype=torch.float32, targets=None, progress=False,
            doc_start=None, token_losses=None, mlp_outputs=None):
    """Stage 1: append every layer's K/V of idx [B, T] to `store`, chunk by chunk, left to right.
    With `targets`, also run the head and return the summed token loss (evaluation; IGNORE_INDEX targets add
    nothing); without, the last layer stops at its K/V projection and None is returned. token_losses: an fp32
    [B, T] tensor to write each position's loss into (with targets). doc_start [B, T]: document starts (see
    chunked_step). progress: a bar of its own (True) or a step's StepProgress. mlp_outputs: a KeptMLPOutputs
    installed in the model, told each chunk (it keeps their MLP outputs)."""
    B, T = idx.shape
    last = model.config.num_hidden_layers - 1
    loss_sum = torch.zeros((), device=idx.device)
    step_bar = progress if isinstance(progress, StepProgress) else None
    for s, e in tqdm(_chunks(T, chunk_size), desc="stage 1", leave=False, disable=progress is not True):
        ds = _slice(doc_start, s, e)
        backend = ChunkAttention(store, s, keep_outputs=targets is None, doc_start=ds)
        if mlp_outputs is not None:
            mlp_outputs.chunk = (s, e - s)
        with _autocast(model, idx.device, compute_dtype):
            x = model.embed(idx[:, s:e])
            cos, sin = model.rope(s, e - s, idx.device, doc_start=ds)
            for i, block in enumerate(model.layers):
                if i == last and targets is None:
                    _, k, v = block.qkv(x, cos, sin)
                    store.append(i, k, v)
                else:
                    x = block(x, cos, sin, backend)
            if targets is not None:
                if token_losses is not None:
                    token_losses[:, s:e] = model.token_losses(x, targets[:, s:e])
                    loss_sum += token_losses[:, s:e].sum()
                else:
                    loss_sum += model.loss(x, targets[:, s:e])[0]
        if step_bar is not None:
            step_bar.chunk_done(1)
    return loss_sum if targets is not None else None


def chunked_step(model, idx, targets, chunk_size=4096, page_size=64, compute_dtype=torch.float32, store=None,
                 checkpoint=False, progress=False, doc_start=None, detach_history=False,
                 keep_activations: int = 0, mlp_cache_bytes: int = 0) -> float:
    """Forward + backward of the mean token loss over idx/targets [B, T]; gradients accumulate into param.grad
    (fp32 parameters) or param.main_grad (bf16 parameters), in fp32 either way.

    The mean is over the trained tokens of the whole batch: targets == IGNORE_INDEX (model.py) carry no loss
    (prompt spans, padding), and the sum is divided by trained_tokens(targets). A batch with none: loss 0, no
    gradient added.
    store: a PagedKVStore (or ReferenceKVStore) with room for B x T tokens in every layer; default: a fresh one.
    checkpoint: also recompute each layer inside the chunk (less activation memory, one more forward).
    doc_start [B, T] int64 (packed documents): the absolute position of each token's document start,
    nondecreasing along T, doc_start[b, t] <= t. Token t attends to [doc_start[b, t], t] only and its RoPE
    position is t - doc_start[b, t]. None: one document per row.
    detach_history: drop the gradient that flows from a chunk's queries into earlier chunks' K/V (each chunk's
    K/V then get the gradient of their own chunk's queries only): an experiment on what exact KV gradients buy,
    not the exact gradient.
    keep_activations: how many chunks before the last keep their forward from stage 1 for stage 2 (module
    docstring); at most chunks - 1 take effect.
    mlp_cache_bytes: memory for the MLP down projections' outputs that stage 1 keeps so that stage 2 skips those
    GEMMs (kept_outputs.KeptMLPOutputs; the same gradient); 0 (or checkpoint): none kept.
    Returns the loss (a float)."""
    B, T = idx.shape
    if store is None:
        store = PagedKVStore.for_sequence(model, B, T, page_size, compute_dtype, idx.device)
    _check(model, idx, targets, chunk_size, store, doc_start)
    n_trained = trained_tokens(targets)
    store.reset()  # a step interrupted earlier may have left pages allocated
    chunks = _chunks(T, chunk_size)
    if keep_activations < 0:
        raise ValueError(f"keep_activations must be >= 0, got {keep_activations}")
    n_kept = min(keep_activations, len(chunks) - 1)
    # stage 1 skips the last chunk: nothing after it needs its K/V before stage 2 recomputes (and stores) them; the
    # n_kept chunks before it run with grad (below), so the no-grad part stops at the first of them
    s_kept = chunks[len(chunks) - 1 - n_kept][0]
    bar = StepProgress(len(chunks) - 1, len(chunks), B * chunk_size, progress)
    # with checkpoint, each layer's forward runs again inside its backward: nothing to keep for
    mlp_outputs = KeptMLPOutputs(mlp_cache_bytes) if mlp_cache_bytes > 0 and not checkpoint else None
    with mlp_outputs.installed(model) if mlp_outputs is not None else contextlib.nullcontext():
        fill_kv(model, idx[:, :s_kept], store, chunk_size, compute_dtype, progress=bar,
                doc_start=_slice(doc_start, 0, s_kept), mlp_outputs=mlp_outputs)
        total = _stage_2(model, idx, targets, chunks, n_kept, store, bar, detach_history,
                         compute_dtype=compute_dtype, checkpoint=checkpoint, n_trained=n_trained,
                         doc_start=doc_start, mlp_outputs=mlp_outputs)
    bar.close()
    return total.item()


def _stage_2(model, idx, targets, chunks, n_kept, store, bar, detach_history, **per_chunk):
    """The kept chunks' forwards (stage 1's order), then every chunk's backward right to left, recomputing the
    forward of those not kept. Returns the summed loss (a tensor)."""
    total = torch.zeros((), device=idx.device)
    with fp32_gradients(model):  # the kept forwards too: their weight gradients go where stage 2's go
        kept = {}  # chunk start -> ChunkForward, in stage 1's order (they store their K/V as they run)
        for s, e in chunks[len(chunks) - 1 - n_kept:-1]:
            kept[s] = forward_chunk(model, idx, targets, s, e, store, **per_chunk)
            bar.chunk_done(1)
        for s, e in chunks[::-1]:
            forward = kept.pop(s) if s in kept else forward_chunk(model, idx, targets, s, e, store, **per_chunk)
            total += forward.backward(store, detach_history)
            bar.chunk_done(2)
    return total


@dataclass
class ChunkForward:
    """A chunk's forward with grad, its backward still to run: x [B, C, hidden] the last layer's output, dx its
    gradient from the loss (the head's backward already ran, model.loss(backward=True)), loss the chunk's share of
    the mean loss (detached), num_layers the model's. The autograd graph hangs off x."""
    start: int
    end: int
    x: torch.Tensor
    dx: torch.Tensor
    loss: torch.Tensor
    num_layers: int

    def backward(self, store, detach_history=False):
        """Backprop the chunk (every later chunk's backward must have run: the gradients they sent to its K/V are
        read from the store's pages now), then release its pages. Returns the loss."""
        if detach_history:  # what later chunks sent back to this chunk's K/V is dropped: start its gradient at zero
            for layer in range(self.num_layers):
                store.clear_grad(layer, self.start, self.end)
        self.x.backward(self.dx)
        for layer in range(self.num_layers):
            store.truncate(layer, self.start)  # the chunk is retired: its K/V and gradient pages go back to the pool
        return self.loss


def forward_chunk(model, idx, targets, s, e, store, compute_dtype=torch.float32, checkpoint=False, n_trained=None,
                  doc_start=None, mlp_outputs=None) -> ChunkForward:
    """The forward with grad of the chunk [s, e) of idx/targets [B, T] over the store's history (it stores the
    chunk's K/V unless stored), and the loss's sliced head backward: (sum of the chunk's token losses) /
    n_trained (trained_tokens(targets) of the whole idx if None). mlp_outputs: a KeptMLPOutputs installed in the
    model (the chunk's MLP outputs kept in stage 1 are taken from it)."""
    if n_trained is None:
        n_trained = trained_tokens(targets)
    ds = _slice(doc_start, s, e)
    if mlp_outputs is not None:
        mlp_outputs.chunk = (s, e - s)
    with _autocast(model, idx.device, compute_dtype):
        x = model.hidden(idx[:, s:e], attn=ChunkAttention(store, s, doc_start=ds), start_pos=s,
                         checkpoint=checkpoint, doc_start=ds)
        loss, dx = model.loss(x, targets[:, s:e], scale=1.0 / max(n_trained, 1), backward=True)  # sliced head bwd
    return ChunkForward(s, e, x, dx, loss, model.config.num_hidden_layers)


def backward_chunk(model, idx, targets, s, e, store, compute_dtype=torch.float32, checkpoint=False, n_trained=None,
                   doc_start=None, detach_history=False):
    """Stage 2 for the chunk [s, e) of idx/targets [B, T], the store holding every layer's K/V of [0, s) (or of
    [0, e)): recompute with grad, backward (sum of the chunk's token losses / n_trained, the trained tokens of the
    whole idx: trained_tokens(targets) if None), then release the chunk's pages. Returns the chunk's share of the
    loss (a detached tensor). doc_start, detach_history: see chunked_step (doc_start of the whole idx)."""
    return forward_chunk(model, idx, targets, s, e, store, compute_dtype, checkpoint, n_trained,
                         doc_start).backward(store, detach_history)


@torch.no_grad()
def chunked_loss(model, idx, targets, chunk_size=4096, page_size=64, compute_dtype=torch.float32, store=None,
                 progress=False, doc_start=None) -> float:
    """The mean token loss of idx/targets [B, T] over its trained tokens (targets != IGNORE_INDEX; 0.0 if none)
    without gradients, chunk by chunk (evaluation at any length). doc_start: see chunked_step."""
    B, T = idx.shape
    if store is None:
        store = PagedKVStore.for_sequence(model, B, T, page_size, compute_dtype, idx.device)
    _check(model, idx, targets, chunk_size, store, doc_start)
    n_trained = trained_tokens(targets)
    store.reset()
    loss_sum = fill_kv(model, idx, store, chunk_size, compute_dtype, targets=targets, progress=progress,
                       doc_start=doc_start)
    store.reset()
    return loss_sum.item() / max(n_trained, 1)


@torch.no_grad()
def chunked_token_losses(model, idx, targets, chunk_size, page_size, compute_dtype=torch.float32, store=None,
                         doc_start=None) -> torch.Tensor:
    """The loss of every position, fp32 [B, T] (0 where the target is IGNORE_INDEX), chunk by chunk without
    gradients: for evaluators that bucket the loss by position. doc_start: see chunked_step."""
    B, T = idx.shape
    if store is None:
        store = PagedKVStore.for_sequence(model, B, T, page_size, compute_dtype, idx.device)
    _check(model, idx, targets, chunk_size, store, doc_start)
    out = torch.zeros(B, T, dtype=torch.float32, device=idx.device)
    store.reset()
    fill_kv(model, idx, store, chunk_size, compute_dtype, targets=targets, doc_start=doc_start, token_losses=out)
    store.reset()
    return out


def full_sequence_step(model, idx, targets, checkpoint=False, doc_start=None) -> float:
    """The full-sequence counterpart of chunked_step (no chunks, no store; call it under the caller's autocast):
    forward of idx [B, T] with Model.hidden, backward of the mean loss over the trained tokens (IGNORE_INDEX
    targets excluded; 0 and no gradient if none). Returns the loss (a float)."""
    check_doc_start(doc_start, idx)
    x = model.hidden(idx, checkpoint=checkpoint, doc_start=doc_start)
    loss, dx = model.loss(x, targets, scale=1.0 / max(trained_tokens(targets), 1), backward=True)
    x.backward(dx)
    return loss.item()
