"""Tests of kernels/gather_sdpa.py (SDPAKernel, the gather + fused-SDPA candidate of issue #18) against
attention.ReferenceKernel on the same parts: forward (o, lse) and backward (dq, dK/dV pages), one part and two
parts merged, then whole chunked steps through attend with the paged and the offloaded stores.

On a CPU the kernel runs PyTorch's CPU flash-attention op (the same code path as cuDNN/flash on CUDA, other ops);
on a GPU the CUDA ops ("cudnn", "flash"), bf16 only. Tolerances (relative to the largest reference magnitude, as in
tests/test_paged_attention.py): fp32 1e-5 (summation order only); bf16 2e-2 (bf16 inputs, P rounded inside the
fused kernels, o/dq and the per-call dK/dV stored in bf16 before their fp32 sums).
"""
import pytest
import torch

import cli
from attention import (ATTN_KERNELS, Part, ReferenceKernel, SDPAKernel, default_kernel, delta_for, kernel_name,
                       named_kernel)
from chunk_train import chunked_step
from kernels.lse_merge import merge_attention, merge_reference
from kernels.paged_attention import softmax_delta
from offload import OffloadedKVStore
from paged_kv import PagedKVStore
from sparse_attn import SparseConfig
from test_chunk_train import assert_grads_match, tiny_model
from test_paged_attention import DEVICE, assert_close, make_problem
from test_sparse_attn import make_sparse_problem

REF = ReferenceKernel()
BACKENDS = ["cpu"] if DEVICE == "cpu" else ["cudnn", "flash"]
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cpu" else [torch.bfloat16]  # the CUDA ops: bf16/fp16


def part_of(p, grads, kv_len=None, q_start=None, holds_chunk=True, last=True):
    """A Part over make_problem's pages, its dK/dV pages fp32 copies of `grads` (prefilled: the kernels add)."""
    return Part(p["k_pages"], p["v_pages"], grads[0].clone(), grads[1].clone(), p["table"],
                p["q_start"] if q_start is None else q_start, kv_len, holds_chunk=holds_chunk, last=last)


def run(kernel, q, do, parts, pass_o=False):
    """attend's steps over `parts` with `kernel`: (o, lse, dq, [(dk_pages, dv_pages) per part]). pass_o: the
    backward also gets the merged output (as attend passes it), else only delta."""
    if len(parts) == 1:
        o, lse = kernel.forward(q, parts[0])
        dq = None
    else:
        o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        for j, part in enumerate(parts):
            kernel.forward(q, part, out=(o, lse), merge=j > 0)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    o = o.to(q.dtype)
    delta = delta_for(kernel, do, o) if pass_o else softmax_delta(do, o)  # as attend hands it
    for part in parts:
        dq = kernel.backward(do, q, lse, delta, part, dq=dq, o=o if pass_o else None)
    return o, lse, dq, [(part.dk_pages, part.dv_pages) for part in parts]


def compare(p, dtype, backend, make_parts, pass_o, fallback=None):
    """SDPAKernel (with `fallback`) vs ReferenceKernel on fresh parts from make_parts(): o, lse, dq and every
    part's dK/dV pages at the positions the problem holds (the rest: NaN-poisoned K/V slots, their gradient pages
    left untouched)."""
    ref = run(REF, p["q"], p["do"], make_parts())
    got = run(SDPAKernel(backend, fallback), p["q"], p["do"], make_parts(), pass_o)
    assert got[0].dtype == p["q"].dtype and got[2].dtype == ref[2].dtype
    assert got[0].is_contiguous() and got[1].is_contiguous()  # as the Triton kernels return them
    for what, a, b in (("o", got[0], ref[0]), ("lse", got[1], ref[1]), ("dq", got[2], ref[2])):
        assert_close(a, b, dtype, what)
    t = p["touched"]
    for j, ((dk, dv), (rk, rv)) in enumerate(zip(got[3], ref[3])):
        assert_close(dk[t], rk[t], dtype, f"dk pages of part {j}")
        assert_close(dv[t], rv[t], dtype, f"dv pages of part {j}")
        assert torch.equal(dk[~t], p["prefill"][0][~t]) and torch.equal(dv[~t], p["prefill"][1][~t])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,hist,H,Hkv,D,page,explicit_kv_len", [
    (2, 16, 0, 2, 2, 16, 8, False),   # no history: the diagonal call alone, GQA ratio 1
    (2, 16, 24, 4, 2, 16, 8, False),  # history + diagonal, GQA ratio 2
    (1, 12, 20, 6, 2, 32, 8, True),   # ratio 3, head_dim 32, partial pages, kv_len = q_start + C given
])
@pytest.mark.parametrize("pass_o", [True, False], ids=["o", "delta-only"])
def test_one_part_matches_reference(backend, dtype, B, C, hist, H, Hkv, D, page, explicit_kv_len, pass_o):
    p = make_problem(B, C, hist, H, Hkv, D, page, dtype, seed=B * 1000 + hist * 10 + H)
    compare(p, dtype, backend, lambda: [part_of(p, p["prefill"], kv_len=hist + C if explicit_kv_len else None)],
            pass_o)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_o", [True, False], ids=["o", "delta-only"])
def test_history_only_parts_merged_match_reference(backend, dtype, pass_o):
    """The offloaded store's shape of a call: a history-only part (kv_len <= q_start: all visible, no diagonal)
    then the part holding the chunk, merged by out/merge, each backward with the merged lse and delta. The first
    part reads the first 20 positions of the same table as if the queries sat at 28 (kv_len < q_start); the second
    all 28 + C, so positions 0..19 get gradients from both parts."""
    B, C, hist, H, Hkv, D, page = 2, 8, 20, 4, 2, 16, 8
    p = make_problem(B, C, hist, H, Hkv, D, page, dtype, seed=7)

    def parts():
        return [part_of(p, p["prefill"], kv_len=hist, q_start=hist + 8, holds_chunk=False, last=False),
                part_of(p, p["prefill"])]
    compare(p, dtype, backend, parts, pass_o)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,n_hist,n_sel,Hkv,D,page,q_block", [
    (2, 32, 6, 3, 2, 16, 8, 32),  # one block: 3 of 6 history pages per (batch row, kv head), GQA 2:1
    (1, 24, 4, 2, 1, 32, 8, 24),  # GQA 4:1, head_dim 32, a partial own page
    (1, 16, 0, 0, 2, 16, 8, 16),  # no history: the diagonal call alone
    (2, 32, 6, 3, 2, 16, 16, 16),  # two blocks, each its own 3 pages: the history through the fallback
    (1, 40, 5, 2, 2, 32, 16, 16),  # three blocks, the last partial, head_dim 32 (Triton pages: >= 16 tokens)
])
@pytest.mark.parametrize("pass_o", [True, False], ids=["o", "delta-only"])
def test_sparse_part_matches_reference(backend, dtype, B, C, n_hist, n_sel, Hkv, D, page, q_block, pass_o):
    """A sparse part: each kv head's (and block's) history from its own selected pages, then the chunk's own
    pages; o, lse, dq and the dK/dV pages against the reference kernel on the same part. One query block per chunk
    (q_block >= C, as the offloaded plan chooses): all of it through the fused op. Several (the in-GPU store's
    default): the history through the fallback (the device's default kernel: Triton, or its interpreter here),
    merged with the fused op's diagonal."""
    H = 4
    p = make_sparse_problem(B, C, n_hist, n_sel, H, Hkv, D, page, q_block, dtype, seed=n_hist * 100 + C + q_block)
    p["touched"] = torch.ones(p["k_pages"].shape[:2], dtype=torch.bool, device=DEVICE)  # untouched: equal prefill

    def parts():
        return [Part(p["k_pages"], p["v_pages"], p["prefill"][0].clone(), p["prefill"][1].clone(), p["table"],
                     p["q_start"], q_block=q_block)]
    compare(p, dtype, backend, parts, pass_o, fallback=default_kernel(DEVICE) if q_block < C else None)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True], ids=["dense", "per-head"])
def test_page_copy_kernels_match_reference(grad_dtype, per_head):
    """kernels/page_copy.py's Triton gather and add (the interpreter on a CPU) against their PyTorch references
    on fresh random pages: positions 5..5+n-1 of a shuffled table (shared by the kv heads, or one per kv head),
    bf16 pages into bf16; a gradient as the fused backward returns it (a transposed view) added into fp32 or bf16
    pages. The gather is a copy: exact. The add: fp32 exact to rounding; bf16 pages: both round the fp32 sum once
    (1 ulp)."""
    from kernels.page_copy import add_rows, add_rows_reference, gather_rows, gather_rows_reference
    g = torch.Generator().manual_seed(3)
    B, Hkv, D, page, n_pages, n = 2, 3, 32, 16, 12, 40
    pages = torch.randn(n_pages * B, page, Hkv, D, generator=g).to(torch.bfloat16).to(DEVICE)  # the K/V pool's
    own = torch.randperm(n_pages * B, generator=g).view(B, n_pages)  # each batch row its own pages
    heads = Hkv if per_head else 1  # per head: each kv head 4 of its row's pages, in its own order
    table = torch.stack([own[b, torch.randperm(n_pages, generator=g)[:4]] for b in range(B) for _ in range(heads)])
    table = table.view(B, heads, 4)[:, 0] if not per_head else table.view(B, Hkv, 4)
    table = table.to(torch.int32).to(DEVICE)
    got, ref = gather_rows(pages, table, 5, n, torch.bfloat16), gather_rows_reference(pages, table, 5, n,
                                                                                   torch.bfloat16)
    assert got.shape == (B, Hkv, n, D) and torch.equal(got, ref)
    assert got.transpose(1, 2).is_contiguous()  # the [B, S, H, D] layout the fused ops read
    grad = torch.randn(B, n, Hkv, D, generator=g).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    base = torch.randn(pages.shape, generator=g).to(grad_dtype).to(DEVICE)
    got, ref = base.clone(), base.clone()
    add_rows(got, table, 5, grad)
    add_rows_reference(ref, table, 5, grad)
    tol = 0 if grad_dtype == torch.float32 else 2**-7
    assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    assert (got != base).sum() > 0.9 * grad.numel()  # the positions were written...
    assert (got != base).sum() <= grad.numel()  # ...and nothing else


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_page_heads_matches_reference(dtype):
    """kernels/page_copy.copy_page_heads (Triton; the interpreter on a CPU) against its PyTorch reference and a
    loop over (j, kv head) on fresh random pools: each kv head's rows of its own pages into other pages, zeros
    where the source is -1, nothing written where the destination is -1, every other row untouched. A copy:
    exact."""
    from kernels.page_copy import copy_page_heads, copy_page_heads_reference
    g = torch.Generator().manual_seed(5)
    Hkv, D, page, n_src, n_dst, n = 3, 32, 16, 10, 8, 6
    src = torch.randn(n_src, page, Hkv, D, generator=g).to(dtype).to(DEVICE)
    base = torch.randn(n_dst, page, Hkv, D, generator=g).to(dtype).to(DEVICE)
    src_pages = torch.stack([torch.randperm(n_src, generator=g)[:n] for _ in range(Hkv)], 1)  # [n, Hkv]
    dst_pages = torch.stack([torch.randperm(n_dst, generator=g)[:n] for _ in range(Hkv)], 1)  # no (page, head) twice
    src_pages[0, 1] = src_pages[3, 0] = -1  # zeros
    dst_pages[2, 2] = dst_pages[4, 0] = -1  # skipped
    src_pages, dst_pages = src_pages.to(DEVICE), dst_pages.to(DEVICE)
    got, ref = base.clone(), base.clone()
    copy_page_heads(src, src_pages, got, dst_pages)
    copy_page_heads_reference(src, src_pages, ref, dst_pages)
    assert torch.equal(got, ref)
    expected = base.clone()
    for j in range(n):
        for h in range(Hkv):
            s, d = int(src_pages[j, h]), int(dst_pages[j, h])
            if d >= 0:
                expected[d, :, h] = src[s, :, h] if s >= 0 else 0
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="must both be"):
        copy_page_heads(src, src_pages[:, :2], got, dst_pages[:, :2])


def test_unsupported_parts_raise_or_fall_back():
    """Document masks, a table ending inside the chunk, and (without a fallback for their history) sparse tables
    of several query blocks are not taken: NotImplementedError, or the fallback kernel's result when one is
    given."""
    p = make_problem(1, 8, 8, 2, 2, 16, 8, torch.float32, seed=3)
    docs = part_of(p, p["prefill"])._replace(doc_start=torch.zeros(1, 8, dtype=torch.int32, device=DEVICE))
    inside = part_of(p, p["prefill"], kv_len=12)
    s = make_sparse_problem(1, 16, 3, 2, 2, 2, 16, 8, 8, torch.float32, seed=6)  # two blocks of 8 queries
    blocks = Part(s["k_pages"], s["v_pages"], *s["prefill"], s["table"], s["q_start"], q_block=8)
    for part, q in ((docs, p["q"]), (inside, p["q"]), (blocks, s["q"])):
        with pytest.raises(NotImplementedError):
            SDPAKernel("cpu" if DEVICE == "cpu" else "cudnn").forward(q, part)
    for part in (docs, inside):
        o, lse = SDPAKernel(fallback=REF).forward(p["q"], part)
        o_ref, lse_ref = REF.forward(p["q"], part)
        assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


def test_named_kernel_hands_what_sdpa_does_not_take_to_the_default():
    """named_kernel("sdpa") (--attn-kernel sdpa): SDPAKernel with the device's default kernel as its fallback, so
    document-masked parts (and on a GPU fp32 ones, which the CUDA ops refuse) get the default kernel's result."""
    kernel = named_kernel("sdpa", DEVICE)
    assert isinstance(kernel, SDPAKernel) and type(kernel.fallback) is type(default_kernel(DEVICE))
    assert type(named_kernel("triton", DEVICE)) is type(default_kernel(DEVICE))
    with pytest.raises(ValueError, match="must be one of"):
        named_kernel("cudnn", DEVICE)
    # auto (the default): sdpa on CUDA for chunks of batch x tokens x hidden >= 2^22 (smaller ones are host-bound),
    # the default kernel on CPUs
    assert [kernel_name("auto", "cuda", n) for n in (2**22, 2**22 - 1)] == ["sdpa", "triton"]
    assert kernel_name("auto", "cpu", 2**30) == "triton" and kernel_name("sdpa", "cpu", 0) == "sdpa"
    assert type(named_kernel("auto", DEVICE, 2**30)) is type(named_kernel("sdpa" if DEVICE != "cpu" else "triton",
                                                                             DEVICE))
    for name in ATTN_KERNELS:  # cli.py spells the names out (it imports no torch); every one of them parses there
        assert cli.parse_args(["--attn-kernel", name]).attn_kernel == name
    dtypes = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        p = make_problem(1, 16, 16, 2, 2, 16, 16, dtype, seed=4)  # the Triton fallback's pages: >= 16 tokens
        parts = [part_of(p, p["prefill"])._replace(doc_start=torch.zeros(1, 16, dtype=torch.int32, device=DEVICE))]
        if DEVICE != "cpu" and dtype == torch.float32:
            parts.append(part_of(p, p["prefill"]))  # a plain dense part, but fp32 on CUDA
        for part in parts:
            o, lse = kernel.forward(p["q"], part)
            o_ref, lse_ref = kernel.fallback.forward(p["q"], part)
            assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


def chunked_grads(store_of, model, batch, seq, chunk, page, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)
    targets = torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)
    model.zero_grad(set_to_none=True)
    loss = chunked_step(model, idx, targets, chunk_size=chunk, page_size=page, store=store_of(model, batch, seq))
    return loss, {n: q.grad.clone() for n, q in model.named_parameters()}


@pytest.mark.skipif(DEVICE != "cpu", reason="fp32 chunked steps: the CUDA ops take bf16 only")
@pytest.mark.parametrize("store", ["paged", "offload"])
@pytest.mark.parametrize("attn", ["dense", "sparse"])
def test_chunked_step_through_attend_matches_reference_kernel(store, attn):
    """A whole chunked fp32 step with SDPAKernel in the store: loss and every parameter gradient equal the reference
    kernel's (rel. 1e-5). Dense: batch 2, partial last chunk and page; offload: history in parts of 32 tokens.
    Sparse: one selection per 32-token chunk and kv head, 3 of up to 6 history pages; offload: buffers of 8 pages."""
    sparse = SparseConfig(budget=48, q_block=32) if attn == "sparse" else None
    batch, seq, cache, seed = (2, 72, 32, 11) if sparse is None else (1, 128, 128, 12)
    chunk, page = 32, 16
    model = tiny_model(5)

    def store_of(kernel):
        if store == "paged":
            return lambda m, b, s: PagedKVStore.for_sequence(m, b, s, page, torch.float32, DEVICE, sparse=sparse,
                                                             kernel=kernel)
        return lambda m, b, s: OffloadedKVStore.for_sequence(m, b, s, page, torch.float32, DEVICE,
                                                             cache_tokens=cache, sparse=sparse, kernel=kernel)
    ref_loss, ref_grads = chunked_grads(store_of(REF), model, batch, seq, chunk, page, seed=seed)
    loss, grads = chunked_grads(store_of(SDPAKernel()), model, batch, seq, chunk, page, seed=seed)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for n, q in model.named_parameters():
        q.grad = grads[n]
    assert_grads_match(model, ref_grads)


@pytest.mark.parametrize("into", ["new", "in-place"])
def test_merge_kernel_matches_reference(into):
    """kernels/lse_merge.py's fused merge (Triton; the interpreter on a CPU) against merge_reference on fresh
    random partials: o as the fused ops leave it (a transposed view of [B, H, C, D]), rows seeing nothing in one
    part or both (lse -inf), written new in bf16 or in place into an fp32 running
    result (out = the first input). Tolerances: fp32 1e-6 relative (exp and log rounding); bf16 output: its
    rounding, 2^-8."""
    g = torch.Generator().manual_seed(1)
    B, H, D, C = 2, 3, 32, 24
    o1 = torch.randn(B, H, C, D, generator=g).to(DEVICE).transpose(1, 2)  # [B, C, H, D] views
    l1 = torch.randn(B, H, C, generator=g).to(DEVICE)
    o2 = torch.randn(B, H, C, D, generator=g).bfloat16().to(DEVICE).transpose(1, 2)
    l2 = torch.randn(B, H, C, generator=g).to(DEVICE)
    l1[0, 1, :3] = float("-inf")  # query rows 0..2 of head 1 see nothing in the first part...
    l2[0, 1, :2] = float("-inf")  # ...and rows 0, 1 nothing at all
    ref_o, ref_lse = merge_reference(o1, l1, o2, l2)
    if into == "new":
        o, lse = merge_attention(o1, l1, o2, l2, dtype=torch.bfloat16)
        assert o.dtype == torch.bfloat16 and o.is_contiguous() and lse.is_contiguous()
        assert_close(o, ref_o, torch.bfloat16, "o")
    else:
        o, lse = o1.contiguous(), l1.clone()  # an fp32 running result, merged into in place
        merge_attention(o, lse, o2, l2, out=(o, lse))
        assert (o - ref_o).abs().max() <= 1e-6 * ref_o.abs().max()
    seen = lse > float("-inf")
    assert torch.equal(seen, ref_lse > float("-inf")) and not seen[0, 1, :2].any() and seen[0, 1, 2:].all()
    assert (lse[seen] - ref_lse[seen]).abs().max() <= 1e-6 * ref_lse[seen].abs().max()
    assert torch.equal(o[0, :2, 1].float(), torch.zeros(2, D, device=DEVICE))


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_cuda_ops_on_the_meta_device(backend):
    """The CUDA branch without a GPU: the cuDNN / flash ops' meta kernels take this file's arguments (schemas,
    None for undefined tensors, philox placeholders) and give the shapes and dtypes the interface promises, for a
    part with history and diagonal at Qwen2.5-7B's head shapes (28 / 4 heads, head_dim 128)."""
    B, C, hist, H, Hkv, D, page = 1, 64, 128, 28, 4, 128, 16
    n = (hist + C) // page
    q = torch.empty(B, C, H, D, dtype=torch.bfloat16, device="meta")
    pages = torch.empty(B * n, page, Hkv, D, dtype=torch.bfloat16, device="meta")
    grads = torch.empty(B * n, page, Hkv, D, dtype=torch.float32, device="meta")
    part = Part(pages, pages, grads, grads, torch.arange(B * n, device="meta").view(B, n).int(), hist)
    kernel = SDPAKernel(backend)
    o, lse = kernel.forward(q, part)
    assert (o.shape, o.dtype, lse.shape, lse.dtype) == (q.shape, q.dtype, (B, H, C), torch.float32)
    dq = kernel.backward(q, q, lse, softmax_delta(q, o), part)
    assert (dq.shape, dq.dtype) == (q.shape, q.dtype)
