"""optim.py against plain fp32 references: torch.optim.AdamW on fp32 copies of the parameters (same hyperparameters,
same gradients), torch.nn.utils.clip_grad_norm_ on fp32 gradients, and the int8 codes' stated error bounds.

Tolerances, on the accumulated update of each tensor after STEPS steps, d = w_N - w_0 against the reference's d_ref:
  - fp32 moments: |d - d_ref| / |d_ref| <= 1e-6 (the same arithmetic; in practice bit-identical on the CPU).
  - bf16 moments: <= 1% and cosine > 0.9999: bf16 keeps 8 bits, so each step's moments carry up to 0.8% rounding
    error (stochastic), random in sign, which averages down over the steps (measured: 0.3-0.35%).
  - int8 moments: <= 6% and cosine > 0.998: codes are <= 9% apart (module docstring), so each step's m and v are
    off by up to 4.5-9%, again random (measured: 3-4%). A wrong bias correction or a stale moment is off by far more
    (checked by hand: dropping the v bias correction fails every moment option).
"""

import io

import pytest
import torch

from optim import (BLOCK, M_OCTAVES, MOMENTS, V_OCTAVES, MixedPrecisionAdamW, choose_moments, clip_grad_norm_,
                   dequantize_log, quantize_log, state_bytes_per_param)

SHAPES = [(96, 64), (300, 64), (96,), (64,)]  # two matrices (the decay group), a bias and a norm weight (no decay)
STEPS = 30
TOLERANCE = {"fp32": (1e-6, 1 - 1e-6), "bf16": (0.01, 0.9999), "int8": (0.06, 0.998)}  # (relative, min cosine)


@pytest.fixture(autouse=True)
def one_thread():
    """These are many small ops; on a busy 2-core box each waits for a second OpenMP thread (~20 ms an op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gradient_sequence(steps, seed=1):
    """Realistic gradients: per-row scales spread over three decades (1e-4 .. 0.14), a persistent direction plus
    noise, and 1% outliers 30x larger."""
    gen = torch.Generator().manual_seed(seed)
    scales = [torch.empty(shape[0], *[1] * (len(shape) - 1)).uniform_(-9, -2, generator=gen).exp()
              for shape in SHAPES]
    means = [torch.randn(shape, generator=gen) for shape in SHAPES]
    sequence = []
    for _ in range(steps):
        sequence.append([scale * (0.5 * mean + torch.randn(shape, generator=gen)
                                  + (torch.rand(shape, generator=gen) < 0.01) * 30 * torch.randn(shape, generator=gen))
                         for shape, scale, mean in zip(SHAPES, scales, means)])
    return sequence


def groups(params, weight_decay=0.1):
    return [{"params": params[:2], "weight_decay": weight_decay}, {"params": params[2:], "weight_decay": 0.0}]


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dtype)) for shape in SHAPES]


def set_gradient(p, g):
    """As chunk_train leaves them: fp32 main_grad on bf16 parameters (p.grad None), fp32 grad on fp32 ones."""
    if p.dtype == torch.float32:
        p.grad = g.clone()
    else:
        p.main_grad = g.clone()


@pytest.mark.parametrize("moments,dtype,betas", [
    ("fp32", torch.float32, (0.9, 0.95)), ("fp32", torch.bfloat16, (0.9, 0.95)),
    ("bf16", torch.float32, (0.9, 0.95)), ("bf16", torch.bfloat16, (0.9, 0.95)), ("bf16", torch.bfloat16, (0.9, 0.999)),
    ("int8", torch.float32, (0.9, 0.95)), ("int8", torch.bfloat16, (0.9, 0.95)), ("int8", torch.bfloat16, (0.9, 0.999)),
])
def test_matches_torch_adamw(moments, dtype, betas):
    params = make_params(dtype)
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    start = [r.detach().clone() for r in reference]
    hyper = dict(lr=1e-3, betas=betas, eps=1e-8)
    # update_slice of 8 blocks: the matrices are updated in several slices, the last one of (300, 64) partial
    optimizer = MixedPrecisionAdamW(groups(params), moments=moments, update_slice=8 * BLOCK, **hyper)
    reference_optimizer = torch.optim.AdamW(groups(reference), **hyper)
    for step, grads in enumerate(gradient_sequence(STEPS)):
        lr = 1e-3 * (1 - step / STEPS)  # a schedule, set through param_groups as train.py does
        for group in optimizer.param_groups + reference_optimizer.param_groups:
            group["lr"] = lr
        for p, r, g in zip(params, reference, grads):
            set_gradient(p, g)
            r.grad = g.clone()
        optimizer.step()
        reference_optimizer.step()
        for p, g in zip(params, grads):  # step() leaves gradients alone
            assert torch.equal(p.grad if dtype == torch.float32 else p.main_grad, g)
            assert dtype == torch.float32 or p.grad is None

    max_relative, min_cosine = TOLERANCE[moments]
    for p, r, w0 in zip(params, reference, start):
        master = optimizer.master(p).detach()
        assert master.dtype == torch.float32 and master.shape == p.shape
        assert torch.equal(p.detach(), master.to(dtype))  # the parameter is its master, rounded
        update, reference_update = (master - w0).flatten(), (r.detach() - w0).flatten()
        relative = ((update - reference_update).norm() / reference_update.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(update, reference_update, dim=0).item()
        assert relative <= max_relative and cosine >= min_cosine, (tuple(p.shape), relative, cosine)


@pytest.mark.parametrize("moments", MOMENTS)
def test_weight_decay_only_in_decay_group(moments):
    """Zero gradients: Adam's part of the update is 0 / (0 + eps) = 0, what is left is the decay."""
    params = make_params(torch.bfloat16)
    start = [p.detach().float().clone() for p in params]
    optimizer = MixedPrecisionAdamW(groups(params, weight_decay=0.5), lr=0.1, moments=moments)
    for _ in range(5):
        for p in params:
            set_gradient(p, torch.zeros(p.shape))
        optimizer.step()
    for p, w0 in zip(params[:2], start[:2]):
        torch.testing.assert_close(optimizer.master(p), w0 * (1 - 0.1 * 0.5) ** 5, rtol=1e-6, atol=0)
    for p, w0 in zip(params[2:], start[2:]):
        assert torch.equal(optimizer.master(p), w0)


@pytest.mark.parametrize("moments", MOMENTS)
def test_resume_is_bit_identical(moments):
    """N steps, save, load into a fresh model and optimizer, M more steps == N + M steps uninterrupted, bit for bit."""
    grads = gradient_sequence(7)
    lrs = [1e-3 * (step + 1) / 7 for step in range(7)]

    def run(params, optimizer, steps):
        for step in steps:
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
            for p, g in zip(params, grads[step]):
                set_gradient(p, g)
            optimizer.step()
            optimizer.zero_grad()

    def make(seed):  # bf16 matrices with main_grad, fp32 bias and norm with grad
        params = make_params(torch.bfloat16, seed)[:2] + make_params(torch.float32, seed)[2:]
        return params, MixedPrecisionAdamW(groups(params), lr=1.0, betas=(0.9, 0.95), moments=moments, seed=seed)

    params, optimizer = make(seed=0)
    run(params, optimizer, range(7))

    resumed_params, resumed_optimizer = make(seed=0)
    run(resumed_params, resumed_optimizer, range(4))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in resumed_params], "optimizer": resumed_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    fresh_params, fresh_optimizer = make(seed=3)  # other weights, other seed: all must come from the checkpoint
    with torch.no_grad():
        for p, saved in zip(fresh_params, checkpoint["params"]):
            p.copy_(saved)
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    run(fresh_params, fresh_optimizer, range(4, 7))

    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.master(p), fresh_optimizer.master(q))
    state, fresh_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert state.keys() == fresh_state.keys()
    for i in state:
        assert state[i].keys() == fresh_state[i].keys()
        for key, value in state[i].items():
            assert torch.equal(value, fresh_state[i][key]) if torch.is_tensor(value) else value == fresh_state[i][key]


def test_rejects_other_moments_and_shapes():
    params = make_params(torch.bfloat16)
    saved = MixedPrecisionAdamW(groups(params), moments="int8").state_dict()
    with pytest.raises(ValueError):
        MixedPrecisionAdamW(groups(params), moments="bf16").load_state_dict(saved)
    with pytest.raises(ValueError):
        MixedPrecisionAdamW(groups(params), moments="fp16")
    stepped = MixedPrecisionAdamW(groups(params), moments="int8")
    for p, g in zip(params, gradient_sequence(1)[0]):
        set_gradient(p, g)
    stepped.step()
    other = [torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.bfloat16))] + params[1:]  # another shape
    with pytest.raises(ValueError):
        MixedPrecisionAdamW(groups(other), moments="int8").load_state_dict(stepped.state_dict())


@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clips, does not clip
def test_clip_grad_norm_matches_torch(max_norm):
    params = make_params(torch.bfloat16)[:2] + make_params(torch.float32)[2:]
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    for p, r, g in zip(params, reference, gradient_sequence(1)[0]):
        set_gradient(p, g)
        r.grad = g.clone()
    total = clip_grad_norm_(params, max_norm)
    reference_total = torch.nn.utils.clip_grad_norm_(reference, max_norm)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, reference_total, rtol=1e-6, atol=0)
    assert (total > max_norm) == (max_norm == 0.05)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.main_grad if p.dtype == torch.bfloat16 else p.grad, r.grad, rtol=1e-6, atol=0)


def test_zero_grad_keeps_main_grad_buffer():
    params = make_params(torch.bfloat16)[:2] + make_params(torch.float32)[2:]
    for p, g in zip(params, gradient_sequence(1)[0]):
        set_gradient(p, g)
    buffers = [p.main_grad.data_ptr() for p in params[:2]]
    MixedPrecisionAdamW(groups(params)).zero_grad()
    assert [p.main_grad.data_ptr() for p in params[:2]] == buffers
    assert all(not p.main_grad.any() for p in params[:2])
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("moments", MOMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_per_param_is_what_the_state_holds(moments, dtype):
    p = torch.nn.Parameter(torch.randn(16, BLOCK).to(dtype))
    p.grad, p.main_grad = (torch.randn(16, BLOCK), None) if dtype == torch.float32 else (None, torch.randn(16, BLOCK))
    optimizer = MixedPrecisionAdamW([p], moments=moments)
    optimizer.step()
    held = sum(t.numel() * t.element_size() for t in optimizer.state[p].values() if torch.is_tensor(t))
    assert held / p.numel() == state_bytes_per_param(moments, master=dtype == torch.bfloat16)


def test_choose_moments_picks_the_most_precise_that_fits():
    """Qwen2.5-7B, bf16 weights with fp32 master: 91 GB of fp32-moment state, 61 GB bf16, 46 GB int8."""
    n = 7_615_616_512
    assert choose_moments(n, True, 100e9)[0] == "fp32"
    assert choose_moments(n, True, 70e9)[0] == "bf16"
    moments, why = choose_moments(n, True, 50e9)
    assert moments == "int8" and "int8" in why
    assert choose_moments(n, True, 40e9)[0] is None
    assert choose_moments(n, False, 20e9)[0] == "int8"  # fp32 weights: no master, 15.7 GB of int8 state


def values_with_outliers(n, seed=0):
    """Magnitudes over six decades, 0.5% outliers 1000x larger, exact zeros and a few values 1e-6 smaller (below
    the code ranges: they exercise the flush / raise rules)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.empty(n).uniform_(-7, 0, generator=gen).exp()
    x[torch.rand(n, generator=gen) < 0.005] *= 1000
    x[::53] = 0
    x[5::97] *= 1e-6
    return x


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_log_round_trip_error_bound(signed, stochastic):
    """Within a block's range, the decoded magnitude is within half a step (nearest) or one step (stochastic) of
    the value in log2; zeros stay zero; below the range, signed values flush to zero, unsigned ones rise to its
    bottom."""
    n, top, cap = 40 * BLOCK + 77, (127 if signed else 255), (M_OCTAVES if signed else V_OCTAVES)
    x = values_with_outliers(n)
    if not signed:
        x = x.square()
    noise = torch.rand(n, generator=torch.Generator().manual_seed(1)) if stochastic else None
    codes, log2_range = quantize_log(x, signed, noise)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == (41, BLOCK)
    decoded = dequantize_log(codes, log2_range, n)

    lo, hi = log2_range.repeat_interleave(BLOCK, dim=0)[:n].unbind(dim=1)
    assert ((hi - lo) <= cap).all() and ((hi - lo) > cap - 1).any()  # the cap binds somewhere
    step = (hi - lo) / (top - 1)
    in_range = (x.abs() > 0) & (x.abs().log2() >= lo)
    below = (x.abs() > 0) & ~in_range
    assert below.any() and in_range.sum() > 0.9 * n
    error = (decoded[in_range].abs().log2() - x[in_range].abs().log2()).abs()
    bound = step[in_range] * (1.0 if stochastic else 0.5) + 1e-4
    assert (error <= bound).all(), (error - bound).max()
    assert torch.equal(decoded[in_range].sign(), x[in_range].sign())
    assert (decoded[x == 0] == 0).all()
    if signed:
        assert (decoded[below] == 0).all()
    else:
        torch.testing.assert_close(decoded[below], lo[below].exp2(), rtol=1e-5, atol=0)


def test_stochastic_rounding_is_unbiased_in_log2():
    """Averaged over many draws, the stochastically rounded log2 code lands on the value itself: no drift, which
    is what lets v's small per-step changes add up (rounding to nearest is off by up to half a step here)."""
    x = values_with_outliers(BLOCK, seed=2).square()
    x = x[x > 0]
    gen = torch.Generator().manual_seed(3)
    logs = torch.stack([dequantize_log(*quantize_log(x, False, torch.rand(x.shape, generator=gen)), x.numel())
                        for _ in range(400)]).log2()
    codes, log2_range = quantize_log(x, False)
    step = (log2_range[0, 1] - log2_range[0, 0]) / 254
    in_range = x.log2() >= log2_range[0, 0]
    drift = (logs.mean(dim=0) - x.log2())[in_range].abs()
    assert drift.max() < 0.15 * step  # 400 draws of a uniform: standard error of the mean <= 0.025 step


def test_bf16_moments_keep_growing_over_long_runs():
    """The same gradient every step, beta2 = 0.999: v grows by ~1/t a step, which after a few hundred steps is less
    than half a bf16 step, so v rounded to nearest stops growing and the bias-corrected update grows like sqrt(t):
    15% off fp32 AdamW after 800 steps (2.3% with only m rounded to nearest). Stochastic rounding keeps the moments
    right on average: 0.9% off (measured)."""
    gen = torch.Generator().manual_seed(4)
    n = 4 * BLOCK
    grad = torch.randn(n, generator=gen).sign() * 0.01 * torch.rand(n, generator=gen).mul(-16).exp2()
    p, reference = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    optimizer = MixedPrecisionAdamW([p], moments="bf16", **hyper)
    reference_optimizer = torch.optim.AdamW([reference], **hyper)
    p.grad, reference.grad = grad.clone(), grad.clone()
    for _ in range(800):
        optimizer.step()
        reference_optimizer.step()
    relative = ((p - reference).norm() / reference.norm()).item()
    assert relative <= 0.015, relative
