"""Gather + fused SDPA: a candidate attention kernel (issue #18) that copies a part's pages into contiguous K/V and
computes through PyTorch's fused attention ops (cuDNN or FlashAttention on CUDA, the CPU flash kernel on CPUs), to
be measured against the Triton paged kernels (bench.py kernel --kernels triton,sdpa). Not the default kernel: it is
kept only if it beats Triton on the GPU.

The kernel interface is attention.py's (forward(q, part, scale, out, merge) -> (o, lse); backward(do, q, lse,
delta, part, scale, dq) -> dq, dK/dV added into part.dk_pages/dv_pages). For a dense part (2-D table, no document
mask) the queries at positions q_start..q_start+C-1 see the table's positions p < kv_len with p <= q_start + i
(bottom-right causal). That splits into two fused calls, merged by log-sum-exp:

    history   keys 0..Nh-1, Nh = min(q_start, kv_len), visible to every query: no mask.
    diagonal  the chunk's own keys q_start..q_start+C-1 (present when kv_len = q_start + C): a square C x C call
              with top-left causal masking (square: top-left = bottom-right).

GQA (H = Hkv * G query heads), two ways (native_gqa):
    native    the ops take K/V with Hkv heads as they are and return dK/dV per kv head, summed over the group
              (torch's CPU flash op, cuDNN and flash: their meta kernels agree; checked on the CPU, torch 2.13):
              no copies. The default on CPUs; on CUDA a candidate until measured (bench.py kernel --kernels
              sdpa-gqa).
    fold      the default on CUDA (measured, torch 2.11). History: each kv head's G query heads folded into the
              query length, q [B, C, Hkv*G, D] -> [B, Hkv, G*C, D] (row g*C + i is query i of head kv*G + g), so
              K/V are not repeated and the merged lse [B, H, C] is the folded lse [B, Hkv, G*C] as a view.
              Diagonal: K/V repeated over the G heads of a group ([B, H, C, D], small) and their gradients summed
              back over the group.

K/V are gathered once per call, from the pages through the table, by one index_select of the flat page rows into
[B, kv_len, Hkv, D] (q.dtype) viewed as [B, Hkv, kv_len, D] (the [B, S, H, D] memory layout the fused ops take).

Backward: each call's gradients with the ops' own backward functions, given the FINAL (merged) lse and the merged
output (attend passes it as o; without it, one rebuilt from delta, see _out_for_delta): then P = exp(S - lse_final)
is exactly this call's share of the whole softmax and dS = P * (dP - delta_final), so the partial dq, dK, dV add up
to the exact gradients, the same identity the Triton kernels and the reference use for several parts. dK/dV are
added into the pages through the table (index_add_ in fp32; bf16 pages: the fp32 sum rounded once, as the
reference does).

Ops (torch >= 2.5; checked on 2.13 CPU, the GPU machines run 2.11):
    CPU    aten::_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, *, attn_mask, scale)
               -> (out, logsumexp [B, H, L] fp32, natural log)
           aten::_scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, logsumexp,
               dropout_p, is_causal, *, attn_mask, scale) -> (dq, dk, dv)
    cudnn  aten::_scaled_dot_product_cudnn_attention(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal,
               return_debug_mask, *, scale) -> (out, logsumexp [B, H, L, 1] fp32 natural log, cum_seq_q, cum_seq_k,
               max_q, max_k, philox_seed, philox_offset, debug_attn_mask)
           aten::_scaled_dot_product_cudnn_attention_backward(grad_out, q, k, v, out, logsumexp, philox_seed,
               philox_offset, attn_bias, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale)
    flash  aten::_scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale)
               -> (out, logsumexp [B, H, L] fp32 natural log, cum_seq_q, cum_seq_k, max_q, max_k, rng_state,
               unused, debug_attn_mask)
           aten::_scaled_dot_product_flash_attention_backward(grad_out, q, k, v, out, logsumexp, cum_seq_q,
               cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *, scale)
All take q/k/v as [B, H, L, D] (any strides with the last one 1) and dropout 0; without dropout the backward
functions do not read the philox tensors, and cum_seq_* are None (undefined) for dense batches, as the forward
ops return them. The CUDA ops take bf16/fp16 only.

Not supported (NotImplementedError, or handed to `fallback` if one is given, e.g. TritonKernel()): sparse parts
(4-D per-block tables, q_block), packed-document masks (doc_start), and parts whose table ends partway into the
chunk's own positions (q_start < kv_len < q_start + C; no store makes them). Offloaded dense parts (history-only
parts with kv_len <= q_start, then the part holding the chunk) are ordinary dense parts and supported.
"""
import math

import torch

ATEN = torch.ops.aten


def _flat_rows(table, length, page_size):
    """Flat row [B, length] of positions 0..length-1 of every batch row in pages.view(-1, Hkv, D)."""
    pos = torch.arange(length, device=table.device)
    return table.long()[:, pos // page_size] * page_size + pos % page_size


def _gather(pages, rows, dtype):
    """pages [num_pages, page_size, Hkv, D] at rows [B, n] -> [B, Hkv, n, D] (a transposed view of one contiguous
    [B, n, Hkv, D] index_select: the [B, S, H, D] layout the fused ops read without a copy)."""
    B, n = rows.shape
    kv = pages.view(-1, *pages.shape[2:]).index_select(0, rows.flatten())  # [B * n, Hkv, D]
    return kv.view(B, n, *pages.shape[2:]).to(dtype).transpose(1, 2)


def _add_rows(pages, rows, grad):
    """pages[rows] += grad: rows [B, n] flat page rows, grad [B, Hkv, n, D]; the sum in fp32 (bf16 pages: rounded
    once, as in the reference)."""
    Hkv, D = pages.shape[2], pages.shape[3]
    flat = pages.view(-1, Hkv, D)
    grad = grad.transpose(1, 2).reshape(-1, Hkv, D).float()  # [B * n, Hkv, D] in the order of rows
    rows = rows.flatten()
    if pages.dtype == torch.float32:
        flat.index_add_(0, rows, grad)
    else:
        flat.index_copy_(0, rows, flat.index_select(0, rows).float().add_(grad).to(pages.dtype))


def _fold(t, Hkv):
    """[B, C, H, D] -> [B, Hkv, G*C, D]: row g*C + i is query i of head kv*G + g (a copy, or a view when G = 1)."""
    B, C, H, D = t.shape
    return t.view(B, C, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, H // Hkv * C, D)


def _unfold(t, C):
    """[B, Hkv, G*C, D] (any strides) -> [B, C, H, D] (the inverse of _fold)."""
    B, Hkv, GC, D = t.shape
    return t.reshape(B, Hkv, GC // C, C, D).permute(0, 3, 1, 2, 4).reshape(B, C, Hkv * (GC // C), D)


def _repeat_heads(t, G):
    """[B, Hkv, n, D] -> [B, Hkv*G, n, D], head kv*G + g reading kv head kv (t itself when G = 1)."""
    return t if G == 1 else t.repeat_interleave(G, dim=1)


def _merge(o1, lse1, o2, lse2):
    """Two partial attentions (o [B, C, H, D] in any dtype and strides, lse [B, H, C] fp32) over disjoint keys ->
    their union's (o fp32, contiguous), by log-sum-exp (rows that see nothing in both keep o = 0, lse = -inf).
    Written into one fp32 tensor (the products promote bf16 in place of an fp32 copy of each input)."""
    lse = torch.logaddexp(lse1, lse2)
    shift = lse.masked_fill(lse == float("-inf"), 0.0)
    w1, w2 = (torch.exp(x - shift).transpose(1, 2)[..., None] for x in (lse1, lse2))  # [B, C, H, 1]
    o = torch.mul(o1, w1, out=torch.empty(o1.shape, dtype=torch.float32, device=o1.device))
    return o.addcmul_(o2, w2), lse


def _out_for_delta(do, delta):
    """An output O' [B, C, H, D] (do.dtype) with rowsum(dO * O') = delta: O' = dO * delta / |dO|^2 per row (0 where
    dO = 0, whose delta is 0). The fused backward ops read `out` only to form delta = rowsum(dO * out) themselves;
    a caller that hands delta without the merged output (the kernel interface's o=None) gets this passed as `out`.
    In fp32 exact to rounding; in bf16 O' is rounded, so the ops' delta differs from the given one by ~2^-9 relative
    (the size of the rounding of the bf16 merged output that delta came from)."""
    d = do.float()
    n2 = d.square().sum(-1)  # [B, C, H]
    c = torch.where(n2 > 0, delta.transpose(1, 2) / n2.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return (d * c[..., None]).to(do.dtype)


# ------------------------------------------------------------------------------------------------ the fused ops


def _sdpa_forward(backend, q, k, v, causal, scale):
    """One fused call: q [B, H, L, D], k, v [B, H or Hkv, S, D] -> (o [B, H, L, D], lse [B, H, L] fp32 natural
    log)."""
    B, H, L, _ = q.shape
    if backend == "cpu":
        o, lse = ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif backend == "cudnn":
        o, lse = ATEN._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    elif backend == "flash":
        o, lse = ATEN._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        raise ValueError(f"unknown backend {backend!r}")
    # cuDNN: [B, H, L, 1]; slicing guards a padded lse; the CPU op's may be laid out [B, L, H]: made contiguous, as
    # the interface's lse is (a cross-rank all_reduce pairs elements in memory order)
    return o, lse.reshape(B, H, -1)[..., :L].contiguous()


def _sdpa_backward(backend, do, q, k, v, o, lse, causal, scale):
    """The fused call's backward: do, q, o [B, H, L, D], k, v [B, H or Hkv, S, D], lse [B, H, L] fp32 (natural
    log) -> (dq, dk, dv) in q.dtype, dk and dv with k's heads."""
    L, S = q.shape[2], k.shape[2]
    lse = lse.float().contiguous()
    if backend == "cpu":
        return ATEN._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, causal,
                                                                         scale=scale)
    seed = torch.empty((), dtype=torch.long, device=q.device)  # philox state: unused without dropout
    offset = torch.empty((), dtype=torch.long, device=q.device)
    if backend == "cudnn":
        return ATEN._scaled_dot_product_cudnn_attention_backward(do, q, k, v, o, lse.unsqueeze(-1), seed, offset,
                                                                 None, None, None, L, S, 0.0, causal, scale=scale)
    if backend == "flash":
        return ATEN._scaled_dot_product_flash_attention_backward(do, q, k, v, o, lse, None, None, L, S, 0.0, causal,
                                                                 seed, offset, scale=scale)
    raise ValueError(f"unknown backend {backend!r}")


OPS = {"cpu": ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"),
       "cudnn": ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
       "flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")}


class SDPAKernel:
    """Gather + fused SDPA over dense parts (see the module docstring). backend: "cpu", "cudnn" or "flash"; None
    picks "cpu" for CPU tensors and "cudnn" for CUDA ones (what F.scaled_dot_product_attention uses for bf16 on
    an H100/H200). fallback: a kernel for the parts this one does not take (sparse, document masks); None raises
    NotImplementedError on them. fp32 tensors on CUDA go to the fallback, or raise NotImplementedError without one
    (the CUDA ops take bf16/fp16). native_gqa: K/V with fewer heads handed to the ops as they are (True) or the
    fold and repeat of the module docstring (False); None: native on CPUs, fold on CUDA."""

    def __init__(self, backend=None, fallback=None, native_gqa=None):
        if backend is not None and backend not in OPS:
            raise ValueError(f"SDPAKernel: backend must be one of {', '.join(OPS)}, got {backend!r}")
        missing = [name for name in OPS.get(backend, ()) if not hasattr(ATEN, name)]  # an older torch
        if missing:
            raise NotImplementedError(f"SDPAKernel({backend!r}): torch {torch.__version__} lacks {missing}")
        self.backend, self.fallback, self.native_gqa = backend, fallback, native_gqa

    def _native(self, q):
        return q.device.type == "cpu" if self.native_gqa is None else self.native_gqa

    def _backend(self, q):
        backend = self.backend or ("cpu" if q.device.type == "cpu" else "cudnn")
        if (backend == "cpu") != (q.device.type == "cpu"):
            raise NotImplementedError(f"SDPAKernel: backend {backend!r} on {q.device.type} tensors")
        if backend != "cpu" and q.dtype not in (torch.bfloat16, torch.float16):
            raise NotImplementedError(f"SDPAKernel: the {backend} op takes bf16/fp16 only, got {q.dtype}")
        return backend

    def _split(self, q, part):
        """(Nh, Ld): history keys 0..Nh-1 (no mask) and the diagonal's length (0 or C), or None if the part is
        not one this kernel takes (with a fallback, fp32 CUDA tensors are not taken either: the ops refuse them)."""
        if part.q_block is not None or part.table.dim() != 2 or part.doc_start is not None:
            return None
        if self.fallback is not None and q.device.type != "cpu" and q.dtype not in (torch.bfloat16, torch.float16):
            return None
        C = q.shape[1]
        kv_len = part.q_start + C if part.kv_len is None else min(part.kv_len, part.q_start + C)
        Nh, Ld = min(part.q_start, kv_len), max(kv_len - part.q_start, 0)
        return (Nh, Ld) if Ld in (0, C) else None

    def _unsupported(self, part, what):
        if self.fallback is None:
            raise NotImplementedError(
                f"SDPAKernel takes dense parts only (2-D table, no doc_start, kv_len <= q_start or = q_start + C); "
                f"got q_block={part.q_block}, table {tuple(part.table.shape)}, doc_start "
                f"{'set' if part.doc_start is not None else 'None'}, q_start {part.q_start}, kv_len {part.kv_len} "
                f"({what}); pass fallback=TritonKernel() to hand such parts over")

    def forward(self, q, part, scale=None, out=None, merge=False):
        split = self._split(q, part)
        if split is None:
            self._unsupported(part, "forward")
            return self.fallback.forward(q, part, scale, out=out, merge=merge)
        backend = self._backend(q)
        B, C, H, D = q.shape
        Hkv = part.k_pages.shape[2]
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        Nh, Ld = split  # Ld > 0 only where Nh = q_start: the keys are positions 0..Nh+Ld-1 of the table
        rows = _flat_rows(part.table, Nh + Ld, part.k_pages.shape[1])  # [B, Nh + Ld]
        k, v = _gather(part.k_pages, rows, q.dtype), _gather(part.v_pages, rows, q.dtype)  # [B, Hkv, Nh + Ld, D]
        native = self._native(q)
        o = lse = None  # o: a [B, C, H, D] view of a call's output (q.dtype), or the two calls merged (fp32)
        if Nh and native:  # every query sees keys 0..Nh-1: one unmasked call
            oh, lh = _sdpa_forward(backend, q.transpose(1, 2), k[:, :, :Nh], v[:, :, :Nh], False, scale)
            o, lse = oh.transpose(1, 2), lh.float()
        elif Nh:  # the same, the groups folded into the query length
            oh, lh = _sdpa_forward(backend, _fold(q, Hkv), k[:, :, :Nh], v[:, :, :Nh], False, scale)
            o, lse = _unfold(oh, C), lh.reshape(B, H, C).float()  # [B, Hkv, G*C] is [B, H, C] row for row
        if Ld:  # the chunk's own C keys: a square top-left causal call (fold: K/V repeated over each group)
            kd, vd = (t[:, :, Nh:] if native else _repeat_heads(t[:, :, Nh:], H // Hkv) for t in (k, v))
            od, ld = _sdpa_forward(backend, q.transpose(1, 2), kd, vd, True, scale)
            od, ld = od.transpose(1, 2), ld.float()  # [B, C, H, D], [B, H, C]
            o, lse = (od, ld) if o is None else _merge(o, lse, od, ld)
        if o is None:  # a part of no keys
            o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.full((B, H, C), float("-inf"), dtype=torch.float32, device=q.device)
        if out is None:
            return o.to(q.dtype).contiguous(), lse
        if merge:
            o, lse = _merge(out[0], out[1], o, lse)
        out[0].copy_(o)
        out[1].copy_(lse)
        return out

    def backward(self, do, q, lse, delta, part, scale=None, dq=None, o=None):
        split = self._split(q, part)
        if split is None:
            self._unsupported(part, "backward")
            return self.fallback.backward(do, q, lse, delta, part, scale, dq=dq, o=o)
        backend = self._backend(q)
        B, C, H, D = q.shape
        Hkv = part.k_pages.shape[2]
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        Nh, Ld = split
        q, do = q.contiguous(), do.to(q.dtype).contiguous()
        rows = _flat_rows(part.table, Nh + Ld, part.k_pages.shape[1])  # [B, Nh + Ld], as in the forward
        k, v = _gather(part.k_pages, rows, q.dtype), _gather(part.v_pages, rows, q.dtype)
        # `out` for the ops, which form delta = rowsum(dO * out) themselves: the merged output (attend passes it),
        # or one rebuilt from delta (_out_for_delta); with the merged lse, each call's P is its share of the whole
        # softmax and dS = P * (dP - delta) its exact share of dS
        o = _out_for_delta(do, delta) if o is None else o.to(q.dtype).contiguous()
        grad = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if dq is None else dq
        lse = lse.float()
        native, G = self._native(q), H // Hkv
        dot, qt, ot = do.transpose(1, 2), q.transpose(1, 2), o.transpose(1, 2)  # [B, H, C, D] views
        if Nh and native:
            gq, gk, gv = _sdpa_backward(backend, dot, qt, k[:, :, :Nh], v[:, :, :Nh], ot, lse, False, scale)
            grad.add_(gq.transpose(1, 2))
        elif Nh:
            gq, gk, gv = _sdpa_backward(backend, _fold(do, Hkv), _fold(q, Hkv), k[:, :, :Nh], v[:, :, :Nh],
                                        _fold(o, Hkv), lse.reshape(B, Hkv, -1), False, scale)
            grad.add_(_unfold(gq, C))
        if Nh:
            _add_rows(part.dk_pages, rows[:, :Nh], gk)  # [B, Hkv, Nh, D]
            _add_rows(part.dv_pages, rows[:, :Nh], gv)
        if Ld:
            kd, vd = (t[:, :, Nh:] if native else _repeat_heads(t[:, :, Nh:], G) for t in (k, v))
            gq, gk, gv = _sdpa_backward(backend, dot, qt, kd, vd, ot, lse, True, scale)
            grad.add_(gq.transpose(1, 2))
            if not native:  # [B, H, C, D]: the group's heads summed, in fp32 without an fp32 copy of each
                gk, gv = (g.reshape(B, Hkv, G, C, D).sum(2, dtype=torch.float32) for g in (gk, gv))
            _add_rows(part.dk_pages, rows[:, Nh:], gk)  # [B, Hkv, C, D]
            _add_rows(part.dv_pages, rows[:, Nh:], gv)
        return grad.to(q.dtype) if dq is None else dq
