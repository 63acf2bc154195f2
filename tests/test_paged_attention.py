"""Tests of kernels/paged_attention.py against a plain-PyTorch fp32 reference.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set below before
triton is imported, as tests/conftest.py also does). With a GPU the compiled kernels are
tested on "cuda" (or interpreted there too if TRITON_INTERPRET=1 is set by hand).
"""
import math
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: kernels are built at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention import OnePart, Part, ReferenceKernel, TritonKernel, attend  # noqa: E402
from kernels.paged_attention import paged_attention_forward, softmax_delta  # noqa: E402
from kernels.paged_attention_backward import paged_attention_backward  # noqa: E402
from kernels.paged_reference import (gather_pages, paged_attention_reference,  # noqa: E402
                                     paged_attention_reference_backward)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances relative to the largest reference magnitude of each compared tensor (at least 1:
# inputs are O(1), and e.g. dq of a lone query is 0 exactly but ~1e-7 after rounding).
# fp32: the kernels use exact ("ieee") fp32 dots; only summation order differs -> ~1e-5.
# bf16: inputs are identical, but P and dS are rounded to bf16 before their matmuls (as in
# FlashAttention) and o/dq are stored in bf16 -> errors of a few 2^-8 ulps, so 2e-2.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_close(actual, expected, dtype, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN in kernel output"
    tol = TOL[dtype]
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def make_problem(B, C, hist, H, Hkv, D, page_size, dtype, seed, extra_cols=1):
    """Random q and a page pool twice as large as needed. Each batch row gets its own shuffled,
    non-contiguous pages (plus `extra_cols` unused table columns). Every slot not holding one of
    the kv_len valid positions, including the tail of the last page, is poisoned with NaN."""
    g = torch.Generator().manual_seed(seed)
    kv_len = hist + C
    n_cols = -(-kv_len // page_size) + extra_cols
    num_pages = 2 * B * n_cols + 3
    table = torch.randperm(num_pages, generator=g)[: B * n_cols].view(B, n_cols).to(torch.int32)
    pos = torch.arange(kv_len)
    phys, slot = table[:, pos // page_size].long(), pos % page_size  # [B, kv_len], [kv_len]
    pages = []
    for _ in range(2):
        p = torch.full((num_pages, page_size, Hkv, D), float("nan"))
        p[phys, slot] = torch.randn(B, kv_len, Hkv, D, generator=g)
        pages.append(p.to(dtype))
    touched = torch.zeros(num_pages, page_size, dtype=torch.bool)
    touched[phys, slot] = True
    q = torch.randn(B, C, H, D, generator=g).to(dtype)
    do = torch.randn(B, C, H, D, generator=g).to(dtype)
    prefill = [torch.randn(num_pages, page_size, Hkv, D, generator=g) for _ in range(2)]  # fp32
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(q=to(q), do=to(do), k_pages=to(pages[0]), v_pages=to(pages[1]), table=to(table),
                q_start=hist, touched=to(touched), prefill=[to(p) for p in prefill])


def reference_grads(p, scale=None):
    """fp32 reference o, lse and dq, dk_pages, dv_pages (autograd through the reference)."""
    q = p["q"].detach().float().requires_grad_()  # detach: .float() of fp32 is the same tensor
    kp = p["k_pages"].detach().float().requires_grad_()
    vp = p["v_pages"].detach().float().requires_grad_()
    o, lse = paged_attention_reference(q, kp, vp, p["table"], p["q_start"], scale, return_lse=True)
    o.backward(p["do"].float())
    return o.detach(), lse.detach(), q.grad, kp.grad, vp.grad


def seed_of(*args):
    return zlib.crc32(repr(args).encode())


# Every (history, chunk) pair for both dtypes; page size, head dim and GQA ratio cycle so each
# value meets both dtypes and several history/chunk shapes. 37 = partial last page, 80 = several
# pages; C = 19, 33, 40, 48 are not multiples of any tile size and span several query tiles;
# 47 and 49 put tile boundaries one off the page/tile grid (off-by-one traps in loop bounds).
_CASES = []
_SHAPES = [(h, c) for h in (0, 37, 80) for c in (1, 19, 32)] + [(64, 48), (49, 40), (47, 33)]
for _i, (_hist, _c) in enumerate(_SHAPES):
    for _j, _dtype in enumerate((torch.float32, torch.bfloat16)):
        _k = _i + _j
        _CASES.append(dict(page_size=(16, 32)[_k % 2], D=(16, 64)[(_i // 2 + _j) % 2],
                           Hkv=(4, 2, 1)[_k % 3], hist=_hist, C=_c, dtype=_dtype))


@pytest.mark.parametrize("case", _CASES, ids=lambda c: "ps{page_size}-d{D}-kv{Hkv}-h{hist}-c{C}-{dtype}".format(**c))
def test_forward_backward_match_reference(case):
    check_against_reference(case)


# page 16: kv tiles of 2 and 4 pages, a partial last page, a history ending inside a tile
@pytest.mark.parametrize("case", [dict(page_size=16, D=16, Hkv=2, hist=37, C=33, dtype=torch.float32),
                                  dict(page_size=16, D=64, Hkv=4, hist=80, C=19, dtype=torch.bfloat16),
                                  dict(page_size=16, D=16, Hkv=1, hist=0, C=48, dtype=torch.float32)],
                         ids=lambda c: "h{hist}-c{C}-{dtype}".format(**c))
def test_kv_tiles_spanning_pages(case, wide_kv_tiles):
    check_against_reference(case)


def check_against_reference(case):
    dtype = case["dtype"]
    p = make_problem(2, case["C"], case["hist"], 4, case["Hkv"], case["D"], case["page_size"], dtype,
                     seed=seed_of(case))
    ref_o, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(p)

    o, lse = paged_attention_forward(p["q"], p["k_pages"], p["v_pages"], p["table"], p["q_start"])
    assert o.dtype == dtype and o.shape == p["q"].shape
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, case["C"])
    assert_close(o, ref_o, dtype, "o")
    assert_close(lse, ref_lse, torch.float32, "lse")  # fp32 scores of identical inputs, even for bf16

    dk_pages, dv_pages = (t.clone() for t in p["prefill"])
    dq = paged_attention_backward(p["do"], p["q"], o, lse, p["k_pages"], p["v_pages"], p["table"],
                                  p["q_start"], dk_pages, dv_pages)
    assert dq.dtype == dtype and dq.shape == p["q"].shape
    assert_close(dq, ref_dq, dtype, "dq")
    t = p["touched"]
    for name, got, pre, ref in (("dk", dk_pages, p["prefill"][0], ref_dk), ("dv", dv_pages, p["prefill"][1], ref_dv)):
        # the kernel ADDS into the pages: expected = prefill + gradient, on the valid positions
        assert_close(got[t] - pre[t], ref[t], dtype, f"{name}_pages contribution")
        assert_close(got[t], pre[t] + ref[t], dtype, f"{name}_pages")
        # unused pages and slots past kv_len must be left bit-for-bit alone
        assert torch.equal(got[~t], pre[~t]), f"{name}_pages written outside the kv range"


def test_custom_scale():
    p = make_problem(1, 21, 30, 4, 2, 32, 16, torch.float32, seed=seed_of("scale"))
    ref_o, ref_lse, ref_dq, ref_dk, _ = reference_grads(p, scale=0.37)
    o, lse = paged_attention_forward(p["q"], p["k_pages"], p["v_pages"], p["table"], p["q_start"], scale=0.37)
    assert_close(o, ref_o, torch.float32, "o")
    assert_close(lse, ref_lse, torch.float32, "lse")
    dk, dv = (torch.zeros_like(x) for x in p["prefill"])
    dq = paged_attention_backward(p["do"], p["q"], o, lse, p["k_pages"], p["v_pages"], p["table"],
                                  p["q_start"], dk, dv, scale=0.37)
    assert_close(dq, ref_dq, torch.float32, "dq")
    assert_close(dk[p["touched"]], ref_dk[p["touched"]], torch.float32, "dk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_deterministic(dtype):
    p = make_problem(2, 32, 80, 4, 1, 16, 16, dtype, seed=seed_of("det", dtype))
    o, lse = paged_attention_forward(p["q"], p["k_pages"], p["v_pages"], p["table"], p["q_start"])
    runs = []
    for _ in range(2):
        dk, dv = (t.clone() for t in p["prefill"])
        dq = paged_attention_backward(p["do"], p["q"], o, lse, p["k_pages"], p["v_pages"], p["table"],
                                      p["q_start"], dk, dv)
        runs.append((dq, dk, dv))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


KERNELS = [TritonKernel(), ReferenceKernel()]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_seam(dtype, kernel):
    """attention.attend over one part (PagedKVStore's case), with either kernel."""
    B, C, hist, H, Hkv, D = 2, 19, 37, 4, 2, 16
    p = make_problem(B, C, hist, H, Hkv, D, 32, dtype, seed=seed_of("autograd", dtype))
    _, _, ref_dq, ref_dk, ref_dv = reference_grads(p)
    q = p["q"].clone().requires_grad_()
    # the chunk's own K/V as autograd leaves; their values are already in the pages
    k = gather_pages(p["k_pages"], p["table"], hist, C).clone().requires_grad_()
    v = gather_pages(p["v_pages"], p["table"], hist, C).clone().requires_grad_()
    dk_pages, dv_pages = (t.clone() for t in p["prefill"])

    with torch.no_grad():  # stage-1 style call: no graph, grad pages not needed
        o_ng = attend(OnePart(Part(p["k_pages"], p["v_pages"], None, None, p["table"], hist)), q, k, v, kernel)
    assert o_ng.grad_fn is None and o_ng.dtype == dtype

    o = attend(OnePart(Part(p["k_pages"], p["v_pages"], dk_pages, dv_pages, p["table"], hist)), q, k, v, kernel)
    assert torch.equal(o.detach(), o_ng)
    o.backward(p["do"])
    assert_close(q.grad, ref_dq, dtype, "dq")
    t = p["touched"]
    assert_close(dk_pages[t], p["prefill"][0][t] + ref_dk[t], dtype, "dk_pages")
    assert_close(dv_pages[t], p["prefill"][1][t] + ref_dv[t], dtype, "dv_pages")
    # dk/dv of the chunk = its rows of the grad pages (prefill stands for later chunks' share)
    assert k.grad.dtype == dtype
    assert torch.equal(k.grad, gather_pages(dk_pages, p["table"], hist, C).to(dtype))
    assert torch.equal(v.grad, gather_pages(dv_pages, p["table"], hist, C).to(dtype))


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
def test_chunk_recurrent_matches_full_sequence(kernel):
    """Two chunks processed like stage 2 of chunk-recurrent training (last chunk first), with
    K/V through the attention seam (either kernel), give the gradients of plain attention over the sequence."""
    B, L, C, H, Hkv, D, ps = 2, 56, 28, 4, 2, 16, 16
    g = torch.Generator().manual_seed(seed_of("recurrent"))
    q, k, v = (torch.randn(B, L, n, D, generator=g).to(DEVICE) for n in (H, Hkv, Hkv))
    do = torch.randn(B, L, H, D, generator=g).to(DEVICE)
    table = torch.randperm(20, generator=g)[: B * 4].view(B, 4).to(torch.int32).to(DEVICE)
    k_pages = torch.zeros(20, ps, Hkv, D, device=DEVICE)
    v_pages = torch.zeros_like(k_pages)
    pos = torch.arange(L, device=DEVICE)
    k_pages[table[:, pos // ps].long(), pos % ps] = k
    v_pages[table[:, pos // ps].long(), pos % ps] = v
    dk_pages, dv_pages = torch.zeros_like(k_pages), torch.zeros_like(k_pages)

    grads = {}
    for start in (C, 0):
        qc, kc, vc = (t[:, start:start + C].clone().requires_grad_() for t in (q, k, v))
        o = attend(OnePart(Part(k_pages, v_pages, dk_pages, dv_pages, table, start)), qc, kc, vc, kernel)
        o.backward(do[:, start:start + C])
        grads[start] = (qc.grad, kc.grad, vc.grad)
    got = [torch.cat([grads[0][i], grads[C][i]], dim=1) for i in range(3)]

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", qr, kr.repeat_interleave(H // Hkv, 2)) / math.sqrt(D)
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vr.repeat_interleave(H // Hkv, 2)).backward(do)
    for name, a, b in zip(("dq", "dk", "dv"), got, (qr.grad, kr.grad, vr.grad)):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
@pytest.mark.parametrize("dtype, page_size, grad_dtype", [(torch.float32, 16, torch.float32),
                                                         (torch.bfloat16, 32, torch.float32),
                                                         (torch.bfloat16, 16, torch.bfloat16)])
def test_split_over_kv_parts_matches_whole(dtype, page_size, grad_dtype, kernel):
    """Attention split the way offload.py streams it: history parts [0, a), [a, hist) and the
    chunk itself, each a Part over its own slice of the page table with kv_len and a shifted
    q_start; forward merged by lse, backward with shared lse/delta accumulating dq. Equals the
    single call and the reference, for the Triton kernels and the plain-PyTorch one. bf16 grad
    pages: the kernel sums in fp32, rounds once."""
    B, C, H, Hkv, D = 2, 37, 4, 2, 16
    hist = 5 * page_size
    p = make_problem(B, C, hist, H, Hkv, D, page_size, dtype, seed=seed_of("split", dtype, page_size, grad_dtype))
    ref_o, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(p)
    q, table = p["q"], p["table"]
    dk_pages, dv_pages = (t.to(grad_dtype, copy=True) for t in p["prefill"])
    parts = [Part(p["k_pages"], p["v_pages"], dk_pages, dv_pages, table[:, lo // page_size:-(-hi // page_size)],
                  hist - lo, hi - lo) for lo, hi in [(0, 2 * page_size), (2 * page_size, hist), (hist, hist + C)]]

    o = torch.empty(q.shape, dtype=torch.float32, device=DEVICE)
    lse = torch.empty(B, H, C, device=DEVICE)
    for i, part in enumerate(parts):
        kernel.forward(q, part, out=(o, lse), merge=i > 0)
    assert_close(o, ref_o, dtype, "merged o")
    assert_close(lse, ref_lse, torch.float32, "merged lse")
    whole_o, whole_lse = kernel.forward(q, Part(p["k_pages"], p["v_pages"], None, None, table, hist))
    assert whole_o.dtype == dtype
    assert_close(o, whole_o.float(), dtype, "merged o vs single call")

    o = o.to(dtype)
    delta = softmax_delta(p["do"], o)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=DEVICE)
    for part in parts[::-1]:
        out = kernel.backward(p["do"], q, lse, delta, part, dq=dq)
        assert out is dq
    assert_close(dq, ref_dq, dtype, "accumulated dq")
    t = p["touched"]
    gtol = dtype if grad_dtype == torch.float32 else torch.bfloat16
    for name, got, pre, ref in (("dk", dk_pages, p["prefill"][0], ref_dk), ("dv", dv_pages, p["prefill"][1], ref_dv)):
        assert got.dtype == grad_dtype
        assert_close(got[t].float(), pre.to(grad_dtype)[t].float() + ref[t], gtol, f"{name}_pages")
        assert torch.equal(got[~t], pre.to(grad_dtype)[~t]), f"{name}_pages written outside the kv parts"



@pytest.mark.parametrize("H, Hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv", ["whole", "history part", "chunk part"])
def test_reference_dense_table_matches_per_block_expansion(H, Hkv, grad_dtype, kv):
    """The reference's dense path (a 2-D table: one batched matmul per kv head, in-place softmax) computes what its
    generic path does for the same table expanded to 4-D (every kv head and block of 16 queries sharing it):
    forward o/lse, with and without autograd, and the backward's dq and dK/dV page adds (fp32 and bf16 pages,
    summed in fp32 and rounded once), also for parts (kv_len, shifted q_start) and GQA. q is left untouched."""
    B, C, D, page_size, q_block = 2, 37, 16, 16, 16
    hist = 3 * page_size
    p = make_problem(B, C, hist, H, Hkv, D, page_size, torch.float32, seed=seed_of("dense", H, Hkv, grad_dtype, kv))
    q, table = p["q"], p["table"]
    lo, hi = {"whole": (0, hist + C), "history part": (page_size, hist), "chunk part": (hist, hist + C)}[kv]
    table = table[:, lo // page_size:-(-hi // page_size)]
    q_start, kv_len = hist - lo, hi - lo
    table4 = table[:, None, None].expand(B, Hkv, -(-C // q_block), table.shape[1])
    args = dict(q_start=q_start, return_lse=True, kv_len=kv_len)
    q_before = q.clone()
    with torch.no_grad():
        o2, lse2 = paged_attention_reference(q, p["k_pages"], p["v_pages"], table, **args)
    assert torch.equal(q, q_before)
    o4, lse4 = paged_attention_reference(q, p["k_pages"], p["v_pages"], table4, q_block=q_block, **args)
    assert_close(o2, o4, torch.float32, "dense o")
    assert_close(lse2, lse4, torch.float32, "dense lse")
    qg = q.clone().requires_grad_()
    o_ad, lse_ad = paged_attention_reference(qg, p["k_pages"], p["v_pages"], table, **args)
    assert_close(o_ad.detach(), o4, torch.float32, "dense o under autograd")
    assert_close(lse_ad.detach(), lse4, torch.float32, "dense lse under autograd")

    delta = softmax_delta(p["do"], o4)
    grads = []
    for t, extra in ((table, {}), (table4, dict(q_block=q_block))):
        dk_pages, dv_pages = (x.to(grad_dtype, copy=True) for x in p["prefill"])
        dq = paged_attention_reference_backward(p["do"], q, lse4, delta, p["k_pages"], p["v_pages"], t, q_start,
                                                dk_pages, dv_pages, kv_len=kv_len, **extra)
        grads.append((dq, dk_pages, dv_pages))
    assert torch.equal(q, q_before)
    (dq2, dk2, dv2), (dq4, dk4, dv4) = grads
    assert_close(dq2, dq4, torch.float32, "dense dq")
    gtol = torch.float32 if grad_dtype == torch.float32 else torch.bfloat16
    for name, got, ref, pre in (("dk", dk2, dk4, p["prefill"][0]), ("dv", dv2, dv4, p["prefill"][1])):
        assert got.dtype == grad_dtype
        assert_close(got.float(), ref.float(), gtol, f"dense {name}_pages")
        assert not torch.equal(got, pre.to(grad_dtype)), f"{name}: nothing added"


def _bad(**changes):
    """A valid small problem with one argument broken; returns (forward args, backward extras)."""
    D = changes.pop("D", 16)
    page_size = changes.pop("page_size", 16)
    q = torch.randn(1, 4, 2, D, device=DEVICE)
    pages = torch.randn(4, page_size, 1, D, device=DEVICE)
    args = dict(q=q, k_pages=pages, v_pages=pages.clone(), page_table=torch.tensor([[0, 1]], dtype=torch.int32,
                device=DEVICE), q_start=20, dk_pages=torch.zeros_like(pages), dv_pages=torch.zeros_like(pages))
    args.update({k: (f(args) if callable(f) else f) for k, f in changes.items()})
    return args


@pytest.mark.parametrize("args, match", [
    (dict(D=24), "head_dim"),
    (dict(page_size=24), "page_size"),
    (dict(page_size=8), "page_size"),
    (dict(dk_pages=lambda a: a["dk_pages"].half()), "dk_pages"),
    (dict(dv_pages=lambda a: a["dv_pages"].bfloat16()), "one dtype"),
    (dict(dv_pages=lambda a: a["dv_pages"][:, :, :, :8]), "dv_pages"),
    (dict(page_table=lambda a: a["page_table"][:, :1]), "page_table too short"),
    (dict(q_start=30), "page_table too short"),
    (dict(page_table=lambda a: a["page_table"].long()), "int32"),
    (dict(q_start=-1), "q_start"),
    (dict(k_pages=lambda a: torch.randn(4, 16, 3, 16, device=DEVICE),
          v_pages=lambda a: torch.randn(4, 16, 3, 16, device=DEVICE)), "multiple"),
    (dict(k_pages=lambda a: a["k_pages"].bfloat16()), "dtype"),
    (dict(q=lambda a: a["q"][0]), "4-D"),
])
def test_launcher_value_errors(args, match):
    a = _bad(**args)
    with pytest.raises(ValueError, match=match):
        if "dk_pages" in args or "dv_pages" in args:  # only the backward takes grad pages
            q = a["q"]
            lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], device=DEVICE)
            paged_attention_backward(q, q, q, lse, a["k_pages"], a["v_pages"], a["page_table"], a["q_start"],
                                     a["dk_pages"], a["dv_pages"])
        else:
            paged_attention_forward(a["q"], a["k_pages"], a["v_pages"], a["page_table"], a["q_start"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_delta_matches_formula(dtype):
    """softmax_delta's kernel (contiguous inputs) = rowsum(dO * O) in fp32 to fp32 rounding, laid out [B, H, C];
    strided inputs take the formula itself."""
    g = torch.Generator().manual_seed(seed_of("delta", dtype))
    do, o = (torch.randn(2, 37, 3, 32, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    want = torch.einsum("bchd,bchd->bhc", do.double(), o.double())
    got = softmax_delta(do, o)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 37) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    strided = softmax_delta(do.transpose(1, 2).contiguous().transpose(1, 2), o)
    torch.testing.assert_close(strided, got, rtol=0, atol=1e-5 * want.abs().max().item())
