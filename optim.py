"""AdamW for mixed-precision training, with optimizer state that fits next to a 7B model on one GPU.

bf16 parameters get an fp32 master copy that the update works on (then copied back, rounded to bf16); fp32
parameters are updated in place. The gradient is read in fp32 from param.main_grad, where chunk_train accumulates it
for bf16 parameters, else from param.grad. The two Adam moments are stored in fp32, bf16 or block-wise int8.

Optimizer state in bytes per parameter (state_bytes_per_param), on top of the weights and the 4-byte fp32 gradient:

    moments   fp32 parameters   bf16 parameters (+ 4 B fp32 master)   Qwen2.5-7B, bf16 (7.6e9 params)
    fp32      8                 12                                    91 GB
    bf16      4                  8                                    61 GB
    int8      2.0625             6.0625                               46 GB
              (int8: 1 B per value and moment, + two fp32 per block of 256 values and moment)

The update runs one parameter at a time, in slices of `update_slice` elements (whole blocks), so its fp32
temporaries (dequantized moments, denominator, random numbers, quantizer scratch) stay at about 40 B x update_slice
(0.7 GB at the default 2**24), whatever the size of the largest parameter (the 7B's embedding: 545M values).

int8 codes, per block of BLOCK = 256 consecutive values of a moment: a log2 scale between the block's smallest and
largest nonzero magnitude (two fp32 per block), so every element gets the same relative precision. A linear code
(code = round(127 x / absmax)) would not do: one outlier column in a block (LLM gradients have them) rounds the rest
of m to zero, which stalls their updates (tried: 40-60% off fp32 AdamW on the test's gradients, against 3-4% now),
and v sits in the denominator, where a value rounded to zero blows its update up.
  - m (signed): sign and 7 bits of log2|m|, 126 steps over at most M_OCTAVES = 16 octaves (<= 9% apart), rounded
    to nearest; m below that range flushes to zero.
  - v (>= 0): 8 bits of log2(v), 254 steps over at most V_OCTAVES = 32 octaves (<= 9% apart), stochastically
    rounded; v below that range is raised to its bottom (a smaller update for a gradient 65536x below its block's).
Stochastic rounding (bf16: both moments; int8: v): the moments are running averages; with beta2 = 0.999, v moves
by ~0.1% a step, less than half a bf16 or int8 step, so round-to-nearest would leave it stuck (and m, once it has
nearly converged). Rounding up or down at random, with the probability that makes the stored value right on average,
lets small changes add up (tests: 800 steps of one gradient, bf16 moments 0.9% off fp32 AdamW's update; 15% with v
rounded to nearest). The random numbers come from a generator seeded with (seed, parameter index, step): a resumed
run draws the same ones, with no generator state to save. int8 m (a log code re-ranged per block each step) is
rounded to nearest.
"""

import math

import torch
import torch.nn.functional as F

BLOCK = 256  # values per int8 block, which has one log2 range (two fp32)
MOMENTS = ("fp32", "bf16", "int8")
# int8 log2 ranges are capped (see quantize_log): m's 126 steps over <= 16 octaves (<= 9% apart), v's 254 over
# <= 32 octaves (<= 9% apart; v = gradient squared, so 16 octaves of gradient magnitude within a block)
M_OCTAVES, V_OCTAVES = 16.0, 32.0


def state_bytes_per_param(moments: str, master: bool) -> float:
    """Optimizer state bytes per parameter: both moments, their int8 scales, and the fp32 master when `master`."""
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, not {moments!r}")
    both_moments = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0 + 2 * 8 / BLOCK}[moments]
    return both_moments + (4.0 if master else 0.0)


def choose_moments(n_params: int, master: bool, budget_bytes: float) -> tuple[str | None, str]:
    """For a memory planner: the most precise moments whose state (state_bytes_per_param) fits in budget_bytes, or
    None, with a line that says why."""
    need = {moments: n_params * state_bytes_per_param(moments, master) for moments in MOMENTS}
    sizes = ", ".join(f"{moments} {need[moments] / 2**30:.1f} GiB" for moments in MOMENTS)
    for moments in MOMENTS:
        if need[moments] <= budget_bytes:
            return moments, (f"{moments} AdamW moments: the most precise whose state fits in "
                             f"{budget_bytes / 2**30:.1f} GiB ({sizes}{', incl. fp32 master' if master else ''})")
    return None, f"no AdamW state fits in {budget_bytes / 2**30:.1f} GiB ({sizes})"


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x [n] -> [ceil(n / BLOCK), BLOCK], zero-padded."""
    return F.pad(x, (0, -x.numel() % BLOCK)).view(-1, BLOCK)


def quantize_log(x: torch.Tensor, signed: bool, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [n] -> (codes [nb, BLOCK], log2 range fp32 [nb, 2]), nb = ceil(n / BLOCK): the block's (lo, hi) of
    log2|x| over its nonzero values, lo raised to at most M_OCTAVES (signed) or V_OCTAVES below hi.
    Code c >= 1 stands for magnitude 2 ** (lo + (c - 1) (hi - lo) / (top - 1)), 0 for zero; top = 127 when signed
    (int8 codes carry the sign; 7 bits of magnitude), else 255 (x >= 0, uint8 codes). Below 2 ** lo, signed values
    flush to zero, unsigned ones rise to 2 ** lo (for m and v: the update shrinks, never grows). Rounds to nearest
    without `noise`; with noise fp32 [n] uniform in [0, 1), at random (error up to one step, zero on average)."""
    top = 127 if signed else 255
    blocks = _blocks(x)
    magnitude = blocks.abs() if signed else blocks
    nonzero = magnitude > 0
    logs = magnitude.log2()  # -inf at zeros
    hi = logs.amax(dim=1)
    lo = torch.maximum(logs.masked_fill(~nonzero, math.inf).amin(dim=1), hi - (M_OCTAVES if signed else V_OCTAVES))
    empty = ~nonzero.any(dim=1)
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    steps_per_octave = (top - 1) / (hi - lo).clamp_min(1e-30)  # a block of equal magnitudes: all codes 1
    position = (logs - lo[:, None]).mul_(steps_per_octave[:, None])  # in [0, top - 1], below 0 where raised
    if signed:  # m below the range is flushed to zero: a smaller update, never a larger one
        nonzero &= position >= 0
    position += 0.5 if noise is None else _blocks(noise)
    codes = position.floor_().clamp_(0, top - 1).add_(1).masked_fill_(~nonzero, 0)
    if signed:
        return codes.mul_(blocks.sign()).to(torch.int8), torch.stack([lo, hi], dim=1)
    return codes.to(torch.uint8), torch.stack([lo, hi], dim=1)


def dequantize_log(codes: torch.Tensor, log2_range: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of quantize_log (signed for int8 codes): fp32 [numel]."""
    top = 127 if codes.dtype == torch.int8 else 255
    lo, hi = log2_range.unbind(dim=1)
    magnitude_codes = codes.float().abs_() if codes.dtype == torch.int8 else codes.float()
    logs = (magnitude_codes - 1).mul_(((hi - lo) / (top - 1))[:, None]).add_(lo[:, None])
    x = logs.exp2_().masked_fill_(codes == 0, 0.0)
    if codes.dtype == torch.int8:
        x = x.mul_(codes.sign())
    return x.view(-1)[:numel]


def _to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16 rounded up or down at random (bf16 keeps the top 16 bits of fp32): add a uniform 16-bit number to
    the low half, then cut it off."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return (x.view(torch.int32) + noise).bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)


def _gradient(p: torch.Tensor) -> torch.Tensor | None:
    main_grad = getattr(p, "main_grad", None)
    return main_grad if main_grad is not None else p.grad


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the gradients step() reads (main_grad, else grad): scales them in place so
    that their total L2 norm is at most max_norm. Returns the total norm before clipping, fp32 scalar tensor."""
    grads = [g for g in map(_gradient, params) if g is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return total


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction; the same arithmetic as torch.optim.AdamW) on fp32 master
    weights, moments stored as `moments` ("fp32", "bf16" or "int8", see the module docstring). Param groups take
    their own lr / weight_decay / betas / eps. step() leaves gradients alone; zero_grad() clears them."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, moments="int8",
                 seed=0, update_slice=1 << 24):
        if moments not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, not {moments!r}")
        if update_slice <= 0 or update_slice % BLOCK:
            raise ValueError(f"update_slice must be a positive multiple of {BLOCK}, not {update_slice}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments, self.seed, self.update_slice = moments, seed, update_slice
        for p in self._params():
            if not p.is_contiguous():
                raise ValueError("parameters must be contiguous (the update works on flat slices)")

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 weights the update works on: p's master copy (bf16 p, after its first step), else p."""
        master = self.state[p].get("master")
        return p if master is None else master.view_as(p)

    def _init_state(self, p: torch.Tensor) -> dict:
        n, device = p.numel(), p.device
        state = {"step": 0}
        if p.dtype != torch.float32:
            state["master"] = p.detach().float().view(-1)  # a copy: 4 B/param
        if self.moments == "int8":
            nb = -(-n // BLOCK)
            for name, code_dtype in (("exp_avg", torch.int8), ("exp_avg_sq", torch.uint8)):
                state[f"{name}_codes"] = torch.zeros(nb, BLOCK, dtype=code_dtype, device=device)
                state[f"{name}_log2_range"] = torch.zeros(nb, 2, device=device)
        else:
            dtype = torch.float32 if self.moments == "fp32" else torch.bfloat16
            state["exp_avg"] = torch.zeros(n, dtype=dtype, device=device)
            state["exp_avg_sq"] = torch.zeros(n, dtype=dtype, device=device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0  # the parameter's position over all groups: seeds its random numbers, keys its saved state
        for group in self.param_groups:
            for p in group["params"]:
                grad = _gradient(p)
                if grad is not None:
                    self._update(p, grad, group, index)
                index += 1
        return loss

    def _update(self, p, grad, group, index):
        if not self.state[p]:
            self.state[p] = self._init_state(p)
        state = self.state[p]
        state["step"] += 1
        t, lr, eps, weight_decay = state["step"], group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        step_size, bias_correction2_sqrt = lr / (1 - beta1**t), (1 - beta2**t) ** 0.5
        weights, grad, n = state.get("master", p.detach()).view(-1), grad.view(-1), p.numel()
        generator = None
        if self.moments != "fp32":
            generator = torch.Generator(p.device)
            generator.manual_seed(((self.seed * 1_000_003 + index) * 1_000_003 + t) % (1 << 63))
        for start in range(0, n, self.update_slice):
            end = min(start + self.update_slice, n)
            g, w = grad[start:end].float(), weights[start:end]
            m, v = self._load(state, "exp_avg", start, end), self._load(state, "exp_avg_sq", start, end)
            w.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            w.addcdiv_(m, denom, value=-step_size)
            self._store(state, "exp_avg", start, end, m, generator)
            self._store(state, "exp_avg_sq", start, end, v, generator)
            if "master" in state:
                p.detach().view(-1)[start:end].copy_(w)  # round to nearest bf16

    def _load(self, state, name, start, end) -> torch.Tensor:
        """Moment `name`, elements [start, end), in fp32. For fp32 moments a view: updated in place."""
        if self.moments == "fp32":
            return state[name][start:end]
        if self.moments == "bf16":
            return state[name][start:end].float()
        rows = slice(start // BLOCK, -(-end // BLOCK))
        return dequantize_log(state[f"{name}_codes"][rows], state[f"{name}_log2_range"][rows], end - start)

    def _store(self, state, name, start, end, x, generator):
        if self.moments == "fp32":
            return
        if self.moments == "bf16":
            state[name][start:end].copy_(_to_bf16_stochastic(x, generator))
            return
        rows = slice(start // BLOCK, -(-end // BLOCK))
        if name == "exp_avg":
            codes, log2_range = quantize_log(x, signed=True)
        else:
            codes, log2_range = quantize_log(x, signed=False, noise=torch.rand(x.shape, device=x.device,
                                                                                generator=generator))
        state[f"{name}_codes"][rows], state[f"{name}_log2_range"][rows] = codes, log2_range

    def zero_grad(self, set_to_none: bool = True):
        """p.grad -> None (or zeros); p.main_grad is zeroed in place, its 4 B/param buffer kept for the next step."""
        for p in self._params():
            if getattr(p, "main_grad", None) is not None:
                p.main_grad.zero_()
        super().zero_grad(set_to_none)

    def state_dict(self) -> dict:
        """Hyperparameters and state, parameters by their position over the groups (as torch optimizers do). The
        tensors are the live ones: torch.save the dict before stepping again."""
        index = {p: i for i, p in enumerate(self._params())}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        state = {index[p]: dict(s) for p, s in self.state.items() if s}
        return {"moments": self.moments, "seed": self.seed, "param_groups": groups, "state": state}

    def load_state_dict(self, state_dict: dict):
        """Restore what state_dict() saved, into an optimizer over the same parameters in the same groups. Tensors
        keep their dtype (torch's own load would cast the fp32 master to the bf16 parameter's dtype)."""
        if state_dict["moments"] != self.moments:
            raise ValueError(f"saved with {state_dict['moments']} moments, this optimizer has {self.moments}")
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("saved param groups do not match this optimizer's")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.seed, params = state_dict["seed"], self._params()
        self.state.clear()
        for i, saved in state_dict["state"].items():
            p = params[i]
            n, nb = p.numel(), -(-p.numel() // BLOCK)
            shapes = {"master": (n,), "exp_avg": (n,), "exp_avg_sq": (n,), "exp_avg_codes": (nb, BLOCK),
                      "exp_avg_sq_codes": (nb, BLOCK), "exp_avg_log2_range": (nb, 2), "exp_avg_sq_log2_range": (nb, 2)}
            if any(torch.is_tensor(v) and tuple(v.shape) != shapes[k] for k, v in saved.items()):
                raise ValueError(f"saved state of parameter {i} does not match its shape {tuple(p.shape)}")
            self.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in saved.items()}
