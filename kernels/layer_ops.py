"""The per-token ops of a decoder layer, fused (Triton): RMSNorm, SwiGLU and RoPE, forward and backward.

Written as PyTorch formulas (model.py's `rms_norm`, `_rotate` and `F.silu(gate) * up`, which stay the CPU path and
the tests' references), each of these is 5-15 elementwise kernels with fp32 temporaries, and autograd saves several of those
for backward. Here each is one pass over its inputs, and the autograd functions save only what backward needs:

    RMSNorm   y = weight * (x * rstd) rounded as the formula rounds; saves x and rstd [rows] fp32
    SwiGLU    h = silu(gate) * up; saves gate and up. `swiglu_into` hands h to a consumer (model.py's down
              projection) that saves it only as a token, recomputed once in backward
    RoPE      rotates pairs (i, i + D/2); backward is the same kernel with the angles negated; saves nothing

Every kernel computes in fp32 and rounds where the PyTorch formula rounds (to the input dtype after each op),
so fp32 results agree with the formulas to rounding and bf16 ones to about one bf16 step.
Row-major tensors only: the launchers check contiguity rather than copy.
"""
import torch
import triton
import triton.language as tl

from kernels.paged_attention import _interpreting  # TRITON_INTERPRET=1 when the kernels were built


def available(t: torch.Tensor) -> bool:
    """Can the fused ops run on t? On CUDA tensors, and on CPU ones under the interpreter (tests)."""
    return t.is_cuda or (t.device.type == "cpu" and _interpreting())


def _tile(elements, total):
    """Elements per program: `elements` on the GPU (a few fp32 values per thread and live tensor, so nothing spills);
    under the interpreter, whose cost is per program and op, not per element, 64K, but no more than the `total`
    elements to cover (rounded up to a power of two): a masked-off lane costs the interpreter as much as a live one."""
    return min(1 << 16, triton.next_power_of_2(total)) if _interpreting() else elements


def _rows_per_program(n_rows, n_cols, elements):
    """Whole rows of n_cols per program, about _tile(elements) elements."""
    cols = triton.next_power_of_2(n_cols)
    return max(1, _tile(elements, n_rows * cols) // cols)


def _check(name, t, shape=None, dtype=None, device=None):
    if not isinstance(t, torch.Tensor) or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor, got {getattr(t, 'shape', type(t))}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not available(t):
        raise ValueError(f"{name} is on {t.device}: the fused ops need CUDA, or TRITON_INTERPRET=1 for CPU tensors")


# ------------------------------------------------------------------------------------------------ RMSNorm


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, eps,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (cdiv(n_rows, BLOCK_R),); a program normalises BLOCK_R whole rows of X [n_rows, n_cols]
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / n_cols + eps)  # [BLOCK_R]
    n = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the formula does
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(Y + offs, (w[None, :] * n).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, rows_per_program,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (n_programs,); a program owns rows [pid * rows_per_program, +rows_per_program), BLOCK_R at a time, and
    # writes its fp32 partial sum of dL/dweight to row pid of DW_PART [n_programs, n_cols] (summed by the launcher)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    first = tl.program_id(0) * rows_per_program
    for r0 in range(first, first + rows_per_program, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < tl.minimum(n_rows, first + rows_per_program)
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        n = x * rstd[:, None]
        dw += tl.sum(dy * n.to(X.dtype.element_ty).to(tl.float32), 0)
        # y = w * n_rounded: n's gradient is dy * w in y's dtype, arriving in x's dtype
        dn = (dy * w[None, :]).to(DY.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
        dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, 1) / n_cols)[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW_PART + tl.program_id(0) * n_cols + cols, dw, mask=col_ok)


# RMSNorm's backward runs at most this many programs (four per SM of an H100), each writing one fp32 row of partial
# weight gradients: enough programs to fill the GPU, few partial rows to add up after.
_NORM_BWD_PROGRAMS = 4 * 132


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x * rsqrt(mean(x^2) + eps)): normalised in fp32, rounded to x's dtype, scaled in the promoted
    dtype of x and weight (HF's formula; model.rms_norm). x [..., N] contiguous, weight [N]."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        _check("x", x)
        N = x.shape[-1]
        _check("weight", weight, (N,), device=x.device)
        rows = x.numel() // N
        y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block_r = _rows_per_program(rows, N, 8192)
        _rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](x, weight, y, rstd, rows, N, float(eps), BLOCK_R=block_r,
                                                           BLOCK_C=triton.next_power_of_2(N), num_warps=8)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        N = x.shape[-1]
        rows = x.numel() // N
        block_r = _rows_per_program(rows, N, 4096)
        # few programs, each looping over many rows, so that the partial dweight sums stay small
        n_programs = max(1, min(triton.cdiv(rows, block_r), _NORM_BWD_PROGRAMS))
        rows_per_program = triton.cdiv(triton.cdiv(rows, n_programs), block_r) * block_r
        n_programs = triton.cdiv(rows, rows_per_program)
        dx = torch.empty_like(x)
        dw_part = torch.empty((n_programs, N), dtype=torch.float32, device=x.device)
        _rms_norm_bwd_kernel[(n_programs,)](dy, x, weight, rstd, dx, dw_part, rows, N, rows_per_program,
                                            BLOCK_R=block_r, BLOCK_C=triton.next_power_of_2(N), num_warps=8)
        return dx, dw_part.sum(0).to(weight.dtype), None


# ------------------------------------------------------------------------------------------------ SwiGLU


@triton.jit
def _silu_rounded(g, DTYPE: tl.constexpr):
    """silu(g) in fp32, rounded to DTYPE (F.silu's result), and sigmoid(g) in fp32. g: fp32."""
    sig = tl.sigmoid(g)
    return (g * sig).to(DTYPE).to(tl.float32), sig


@triton.jit
def _swiglu_fwd_kernel(G, U, H, n, BLOCK: tl.constexpr):
    # grid: (cdiv(n, BLOCK),) over the flat elements; h = silu(g) * u, each product rounded to the dtype
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    s, _ = _silu_rounded(g, H.dtype.element_ty)
    tl.store(H + offs, (s * u).to(H.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(G, U, DH, DG, DU, H, n, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
    # grid as the forward: dL/dgate, dL/dup from dL/dh, and (STORE_H) h recomputed. As autograd on the formula:
    # du = dh * s, ds = dh * u (in the dtype), then silu's backward in fp32: dg = ds * sig * (1 + g * (1 - sig)).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
    s, sig = _silu_rounded(g, H.dtype.element_ty)
    ds = (dh * u).to(H.dtype.element_ty).to(tl.float32)
    tl.store(DU + offs, (dh * s).to(DU.dtype.element_ty), mask=ok)
    tl.store(DG + offs, (ds * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=ok)
    if STORE_H:
        tl.store(H + offs, (s * u).to(H.dtype.element_ty), mask=ok)


def swiglu_forward(gate, up):
    """h = silu(gate) * up; gate, up: contiguous, same shape and dtype."""
    _check("gate", gate)
    _check("up", up, gate.shape, gate.dtype, gate.device)
    h = torch.empty_like(gate)
    n = gate.numel()
    block = _tile(2048, n)
    _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, h, n, BLOCK=block)
    return h


def swiglu_backward(gate, up, dh, want_h=True):
    """-> (dL/dgate, dL/dup, h) for h = silu(gate) * up and dL/dh = dh (all gate's shape and dtype); h is None
    unless want_h (then the kernel skips writing it)."""
    _check("gate", gate)
    _check("up", up, gate.shape, gate.dtype, gate.device)
    dh = dh.to(gate.dtype).contiguous()
    _check("dh", dh, gate.shape)
    dgate, dup = torch.empty_like(gate), torch.empty_like(gate)
    h = torch.empty_like(gate) if want_h else dgate  # dgate: a placeholder pointer the kernel never writes through
    n = gate.numel()
    block = _tile(1024, n)
    _swiglu_bwd_kernel[(triton.cdiv(n, block),)](gate, up, dh, dgate, dup, h, n, STORE_H=want_h, BLOCK=block)
    return dgate, dup, h if want_h else None


class SwiGLUFunction(torch.autograd.Function):
    """h = silu(gate) * up, saving gate and up [..., intermediate] only. A consumer of h that saved h through
    swiglu_into's hooks gets it back from `recomputed_output(node)` (node: h.grad_fn), computed once and kept on
    the node until the node's own backward, which runs after every consumer's (autograd's topological order)."""

    @staticmethod
    def forward(ctx, gate, up, compute=True):
        # compute=False: the consumer will not read h's values now (swiglu_into): they are left uncomputed and
        # recomputed_output forms them when a backward unpacks h
        ctx.save_for_backward(gate, up)
        ctx.inputs = ctx.recomputed = None
        return swiglu_forward(gate, up) if compute else torch.empty_like(gate)

    @staticmethod
    def backward(ctx, dh):
        gate, up = SwiGLUFunction._saved_inputs(ctx)
        ctx.inputs = ctx.recomputed = None  # every consumer of h is done with it
        dgate, dup, _ = swiglu_backward(gate, up, dh, want_h=False)
        return dgate, dup, None

    @staticmethod
    def _saved_inputs(node):
        # unpacked once per backward and kept: saved-tensor hooks may allow only one unpack (checkpointing does)
        if node.inputs is None:
            node.inputs = node.saved_tensors
        return node.inputs

    @staticmethod
    def recomputed_output(node):
        if node.recomputed is None:
            node.recomputed = swiglu_forward(*SwiGLUFunction._saved_inputs(node))
        return node.recomputed


class _SaveAsRecompute:
    """Saved-tensor hooks that store h (or any view of it) as its geometry and unpack it as the same view of h
    recomputed by SwiGLUFunction.recomputed_output; every other saved tensor passes through untouched."""

    def __init__(self, h):
        self.node, self.dtype, self.device = h.grad_fn, h.dtype, h.device
        self.storage = h.untyped_storage().data_ptr()  # not h itself: holding h would keep it alive

    def pack(self, t):
        if (type(t) is torch.Tensor and t.device == self.device and t.dtype == self.dtype
                and t.untyped_storage().data_ptr() == self.storage):
            return t.shape, t.stride(), t.storage_offset()
        return t

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        return SwiGLUFunction.recomputed_output(self.node).as_strided(*packed)


def swiglu_into(consumer, gate, up):
    """consumer(silu(gate) * up) with h never saved for backward: the consumer (a module: its hooks, wrappers and
    weight gradients all see h) saves tokens instead, and backward recomputes h once from gate and up, the only
    tensors this saves. Autograd through the formula would save silu(gate) and h as well, a layer's largest
    activations. gate, up: contiguous, same shape and dtype.
    A consumer with reads_input() False (kept_outputs.py: its output is kept from an earlier forward, and h only
    saved for its backward) gets h uncomputed, where h is part of the graph (so that backward recomputes it)."""
    graph = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    unread = graph and not getattr(consumer, "reads_input", lambda: True)()
    h = SwiGLUFunction.apply(gate, up, not unread)
    if h.grad_fn is None or h.numel() == 0:  # no graph (no grad needed): nothing is saved
        return consumer(h)
    hooks = _SaveAsRecompute(h)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        return consumer(h)


# ------------------------------------------------------------------------------------------------ RoPE


@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_rows, n_heads, seq_len, sin_sign,
                 HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    # grid: (cdiv(n_rows, BLOCK_R),) over the rows of X [B * T * n_heads, 2 * HALF]; row r is position
    # (r // n_heads) % seq_len. y = x * cos + rotate_half(x) * sin_sign * sin, rotate_half(x) = (-x2, x1), each
    # product and the sum rounded to the dtype as the formula does. sin_sign = -1 rotates back (the backward).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < n_rows)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    pos = ((rows // n_heads) % seq_len)[:, None]
    x_offs = rows.to(tl.int64)[:, None] * (2 * HALF) + cols
    x1 = tl.load(X + x_offs, mask=row_ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_offs + HALF, mask=row_ok, other=0.0).to(tl.float32)
    dt = Y.dtype.element_ty
    c1 = tl.load(COS + pos * (2 * HALF) + cols, mask=row_ok, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(COS + pos * (2 * HALF) + HALF + cols, mask=row_ok, other=0.0).to(dt).to(tl.float32)
    s1 = (sin_sign * tl.load(SIN + pos * (2 * HALF) + cols, mask=row_ok, other=0.0)).to(dt).to(tl.float32)
    s2 = (sin_sign * tl.load(SIN + pos * (2 * HALF) + HALF + cols, mask=row_ok, other=0.0)).to(dt).to(tl.float32)
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(Y + x_offs, y1.to(dt), mask=row_ok)
    tl.store(Y + x_offs + HALF, y2.to(dt), mask=row_ok)


def rope_rotate(x, cos, sin, inverse=False):
    """x [B, T, heads, D] contiguous, cos/sin [T, D] (shared by the batch rows) or [B, T, D] (per row: positions
    restarting at packed documents) fp32 -> x rotated (by the negated angles if inverse)."""
    _check("x", x)
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-1] // 2 & (x.shape[-1] // 2 - 1):
        raise ValueError(f"x must be [B, T, heads, D] with D/2 a power of two, got {tuple(x.shape)}")
    B, T, H, D = x.shape
    shape = (B, T, D) if cos.dim() == 3 else (T, D)
    _check("cos", cos, shape, torch.float32, x.device)
    _check("sin", sin, shape, torch.float32, x.device)
    y = torch.empty_like(x)
    rows = B * T * H
    block_r = _rows_per_program(rows, D // 2, 4096)
    # row r of x is (b, t) = divmod(r // H, T): a [T, D] table is read at t, a [B, T, D] one at b * T + t
    n_pos = T if cos.dim() == 2 else B * T
    _rope_kernel[(triton.cdiv(rows, block_r),)](x, cos, sin, y, rows, H, n_pos, -1.0 if inverse else 1.0,
                                                HALF=D // 2, BLOCK_R=block_r)
    return y


class RopeFunction(torch.autograd.Function):
    """RoPE whose backward is the inverse rotation: saves cos/sin (shared by every layer), nothing per call."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_rotate(dy.contiguous(), cos, sin, inverse=True), None, None
