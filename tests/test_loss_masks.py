"""Loss masks (targets == IGNORE_INDEX) and detached history in the chunked step, against full-sequence autograd.

fp32 throughout, the paged store with the plain-PyTorch reference kernel (what a CPU runs; the kernels are compared
with it in test_paged_attention.py), tiny shapes: chunk 32, page 16.
"""

import pytest
import torch
import torch.nn.functional as F

from attention import ReferenceKernel
from chunk_train import chunked_loss, chunked_step, chunked_token_losses, full_sequence_step
from model import IGNORE_INDEX, trained_tokens
from offload import OffloadedKVStore
from paged_kv import PagedKVStore
from test_chunk_train import DEVICE, assert_grads_match, tiny_model

REF = ReferenceKernel()


def masked_batch(seed, batch, seq):
    """Random ids and targets, the targets IGNORE_INDEX over prompt-like spans (a span per row at a random place,
    one crossing a chunk boundary, and the first tokens of every row)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (batch, seq), generator=g)
    targets = torch.randint(0, 256, (batch, seq), generator=g)
    targets[:, :5] = IGNORE_INDEX
    for b in range(batch):
        a = int(torch.randint(8, seq - 20, (1,), generator=g))
        targets[b, a:a + 13] = IGNORE_INDEX
    targets[0, 28:40] = IGNORE_INDEX  # across the chunk boundary at 32
    return idx.to(DEVICE), targets.to(DEVICE)


def grads_of(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def reference_grads(model, idx, targets, attn=None):
    """Full-sequence autograd of the mean loss over the trained tokens (F.cross_entropy's ignore_index mean)."""
    model.zero_grad(set_to_none=True)
    logits = model.head(model.hidden(idx, attn=attn))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.item(), grads_of(model)


def paged(model, batch, seq):
    return PagedKVStore.for_sequence(model, batch, seq, 16, torch.float32, DEVICE, kernel=REF)


def test_masked_targets_give_the_full_sequence_mean_over_trained_tokens():
    model = tiny_model(1)
    idx, targets = masked_batch(1, 2, 80)
    ref_loss, ref = reference_grads(model, idx, targets)
    loss = chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=paged(model, 2, 80))
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert_grads_match(model, ref)
    model.zero_grad(set_to_none=True)
    loss = full_sequence_step(model, idx, targets)  # the full-sequence path the CLI runs
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert_grads_match(model, ref)
    model.zero_grad(set_to_none=True)
    assert abs(chunked_loss(model, idx, targets, 32, 16, store=paged(model, 2, 80)) - ref_loss) <= 1e-5 * ref_loss

    per_token = chunked_token_losses(model, idx, targets, 32, 16, store=paged(model, 2, 80))
    with torch.no_grad():
        want = F.cross_entropy(model(idx).transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
    assert per_token.shape == targets.shape and per_token.dtype == torch.float32
    assert torch.allclose(per_token, want, rtol=1e-5, atol=1e-5)
    assert (per_token[targets == IGNORE_INDEX] == 0).all() and (per_token[targets != IGNORE_INDEX] > 0).all()
    assert abs(per_token.sum().item() / trained_tokens(targets) - ref_loss) <= 1e-5 * ref_loss


def test_no_trained_token_gives_zero_loss_and_zero_gradients():
    model = tiny_model(2)
    idx, targets = masked_batch(2, 1, 64)
    targets[:] = IGNORE_INDEX
    assert chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=paged(model, 1, 64)) == 0.0
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    model.zero_grad(set_to_none=True)
    assert full_sequence_step(model, idx, targets) == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert chunked_loss(model, idx, targets, 32, 16, store=paged(model, 1, 64)) == 0.0


class DetachedHistoryAttention:
    """Full-sequence causal attention in which query t of chunk c = t // chunk sees every earlier key, but the keys
    and values of tokens before the chunk's start are detached: what chunked_step(detach_history=True) means."""

    def __init__(self, chunk):
        self.chunk = chunk

    def __call__(self, q, k, v, layer_idx):
        B, T, H, D = q.shape
        g = H // k.shape[2]
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)  # [B, T, H, D]
        chunk_of = torch.arange(T, device=q.device) // self.chunk
        own = chunk_of[:, None] == chunk_of[None, :]  # [T, T]: key in the query's chunk
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        s_own = torch.einsum("bthd,bshd->bhts", q, k) / D ** 0.5
        s_hist = torch.einsum("bthd,bshd->bhts", q, k.detach()) / D ** 0.5
        s = torch.where(own, s_own, s_hist).masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, dim=-1)
        return (torch.einsum("bhts,bshd->bthd", p * own, v) + torch.einsum("bhts,bshd->bthd", p * ~own, v.detach()))


@pytest.mark.parametrize("store_kind", ["paged", "offloaded"])
def test_detached_history_drops_the_gradient_into_earlier_chunks(store_kind):
    model = tiny_model(3)
    B, T, chunk = 2, 80, 32
    idx, targets = masked_batch(3, B, T)
    ref_loss, ref = reference_grads(model, idx, targets, attn=DetachedHistoryAttention(chunk))
    _, exact = reference_grads(model, idx, targets)
    store = {"paged": lambda: paged(model, B, T),
             "offloaded": lambda: OffloadedKVStore.for_sequence(model, B, T, 16, torch.float32, DEVICE,
                                                                cache_tokens=48, kernel=REF)}[store_kind]()
    loss = chunked_step(model, idx, targets, chunk_size=chunk, page_size=16, store=store, detach_history=True)
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert_grads_match(model, ref)
    model.zero_grad(set_to_none=True)
    # and it is a different gradient from the exact one (the q/k projections above all)
    err = (ref["model.layers.0.self_attn.k_proj.weight"] - exact["model.layers.0.self_attn.k_proj.weight"]).norm()
    assert err > 1e-2 * exact["model.layers.0.self_attn.k_proj.weight"].norm()
