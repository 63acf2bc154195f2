"""Measurement helpers shared by bench.py's modes: timing with warm-up and medians, peak memory, the JSONL recorder,
the benchmark models. See bench.py for the modes and their commands."""

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

# Without a GPU (or with --device cpu) the Triton kernels run in Triton's interpreter, which must be switched on
# before triton is first imported (by the kernels and stores the modes import after this module).
if not torch.cuda.is_available() or any(a in ("--device=cpu", "cpu") for a in sys.argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from model import PRESETS, Model, ModelConfig, preset  # noqa: E402

GiB = 2**30
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError since torch 2.5

# Extra model shapes for the exactness check: like 'small' but with head_dim 128 (the Qwen2.5 head size).
BENCH_PRESETS = {
    "small-d128": dict(PRESETS["small"], num_attention_heads=4, num_key_value_heads=1),
}
T0 = time.perf_counter()  # for --time-budget

# ------------------------------------------------------------------------------------------------ helpers


def model_config(name) -> ModelConfig:
    if name in BENCH_PRESETS:
        return ModelConfig(**BENCH_PRESETS[name])
    try:
        return preset(name)
    except ValueError:
        raise SystemExit(f"error: unknown model {name!r}; choose one of: {', '.join([*PRESETS, *BENCH_PRESETS])}")


def full_sequence_step(model, idx, tgt, compute_dtype, checkpoint=False) -> float:
    """The baseline: model.py's full-sequence path, forward + backward of the mean token loss (autocast unless
    compute_dtype is fp32; `checkpoint` recomputes each block in backward)."""
    with torch.autocast(idx.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        logits = model(idx, checkpoint=checkpoint)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
    del logits
    loss.backward()
    return loss.item()


def build_model(name, device, seed) -> Model:
    """Random init, fp32, built directly on the device (a 7B model initialised on the CPU takes minutes)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return Model(model_config(name))


def random_tokens(vocab, batch, length, device, seed):
    """idx, targets [batch, length]: random token ids, targets shifted by one."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def timed(fn, device, warmup, repeats, setup=None, budget_s=None, events=False):
    """Call fn `warmup` times untimed, then time up to `repeats` calls (stopping early, after at least one, once the
    timed calls add up to budget_s). setup() runs before every call, outside the timing. Returns (seconds of each
    timed call, fn's last result). Timing: synchronize, perf_counter, fn, synchronize, perf_counter; or on CUDA with
    events=True, CUDA events around fn on an idle GPU ("isolated": the host's launch latency is in the time wherever
    the GPU waits for it, as for a call alone); events="queued", the events behind a GPU-side wait long enough for
    the host to enqueue all of fn first (the GPU's own time, kernels and the gaps between them: a call inside a
    step whose host runs ahead of the GPU, as triton.testing.do_bench and CUTLASS's profilers time kernels)."""
    result = None
    for _ in range(warmup):  # 0 is allowed for very long points: the first timed call then includes compilation
        if setup:
            setup()
        result = fn()
    times = []
    for _ in range(max(1, repeats)):
        if setup:
            setup()
        sync(device)
        if events and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if events == "queued":
                _hold_gpu(device, 0.05)  # 50 ms: the host enqueues fn (a few ms at most) behind it
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            result = fn()
            sync(device)
            times.append(time.perf_counter() - t)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return times, result


_CYCLES_PER_S = {}


def _hold_gpu(device, seconds):
    """Keep the GPU busy for about `seconds` (torch.cuda._sleep spins a kernel for a number of clock cycles; the
    cycles per second are measured once per device)."""
    if device not in _CYCLES_PER_S:
        probe = 10_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(probe)
        end.record()
        end.synchronize()
        _CYCLES_PER_S[device] = probe / max(start.elapsed_time(end) / 1e3, 1e-6)
    torch.cuda._sleep(int(_CYCLES_PER_S[device] * seconds))


def profile_once(fn, device, rows, title):
    """One more call of fn under torch.profiler: print the kernels taking the most GPU time (what to optimize), and
    how the call's wall time compares with the GPU time of its kernels and of its copies (where the GPU waits for
    the host or for transfers: the wall time the ops do not fill)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    averages = prof.key_averages()
    print(f"--- profile: {title}", flush=True)
    print(averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    gpu_us = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    on_gpu = [e for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA")]  # kernels, copies
    copies = sum(gpu_us(e) for e in on_gpu if e.key.startswith(("Memcpy", "Memset"))) / 1e6
    kernels = sum(gpu_us(e) for e in on_gpu) / 1e6 - copies
    print(f"--- profile: {title}: wall {wall:.3f} s (under the profiler), GPU kernels {kernels:.3f} s "
          f"({kernels / wall:.0%} of wall), copies {copies:.3f} s", flush=True)


def env_info(device) -> dict:
    """Recorded in every JSON line: what ran where."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:
        commit = ""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": commit,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


class Recorder:
    """Appends one JSON object per point to OUT/bench.jsonl and keeps the rows for the final table."""

    def __init__(self, out_dir, env):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "bench.jsonl")
        self.env, self.rows = env, []

    def emit(self, record: dict):
        record = {**record, **self.env}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.rows.append(record)
        print(format_row(record), flush=True)
        return record


def run_point(record, body, device):
    """record.update(body()) with status 'ok'; an OOM or any other error is recorded instead of raised.
    Whatever body allocated is freed afterwards (its frame dies with the exception)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        record.update(body())
        record.setdefault("status", "ok")
    except OOM as e:
        record.update(status="OOM", error=str(e).splitlines()[0][:300], peak_gib=peak_gib(device))
    except Exception as e:
        traceback.print_exc()
        record.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    free_memory(device)
    return record


def over_budget(args, estimate_s=0.0) -> bool:
    """True if a point expected to take estimate_s would end after --time-budget."""
    return bool(args.time_budget) and time.perf_counter() - T0 + estimate_s > args.time_budget


def r(x, digits=4):
    return None if x is None else round(x, digits)


# ------------------------------------------------------------------------------------------------ output


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def format_row(d) -> str:
    """One line per point, per mode."""
    status = d.get("status", "?")
    tail = "" if status == "ok" else f"  [{status}{': ' + d['error'] if d.get('error') else ''}]"
    if d.get("mode") == "step":
        chunked = d["path"] != "full"
        path = (d["path"] + ("+sdpa" if d.get("attn_kernel") == "sdpa" and chunked else "")
                + (f"+keep{d['keep_activations']}" if d.get("keep_activations") and chunked else ""))
        return (f"step {d['model']} {path:>7} T {d['length']:>7} c {d['chunk']} p {_f(d.get('page_size'), '>3')} "
                f"ckpt {int(d['checkpoint'])} | {_f(d.get('step_s'), '7.3f')} s {_f(d.get('tokens_per_s'), '7,.0f')} tok/s "
                f"{_f(d.get('tflops'), '5.1f')} TF/s | GiB peak {_f(d.get('peak_gib'), '5.2f')} act "
                f"{_f(d.get('activation_gib'), '5.2f')} pool {_f(d.get('pool_gib'), '5.2f')} | loss "
                f"{_f(d.get('loss'), '.4f')}{tail}")
    if d.get("mode") == "kernel":
        errs = " ".join(f"{k[:-8]} {d[k]:.0e}" for k in ("o_rel_err", "dq_rel_err", "dk_rel_err", "dv_rel_err")
                        if d.get(k) is not None)
        vs = (f" | /sdpa fwd {d['fwd_vs_sdpa']:.2f} bwd {_f(d.get('bwd_vs_sdpa'), '.2f')} f+b "
              f"{d['fwdbwd_vs_sdpa']:.2f} (isolated {_f(d.get('fwd_vs_sdpa_isolated'), '.2f')} "
              f"{_f(d.get('bwd_vs_sdpa_isolated'), '.2f')} {_f(d.get('fwdbwd_vs_sdpa_isolated'), '.2f')})"
              if d.get("fwd_vs_sdpa") is not None and d.get("fwdbwd_vs_sdpa") is not None else "")
        return (f"kernel {d.get('impl', '?'):>12} {d.get('config', '-'):>5} T {d['length']:>6} "
                f"q {_f(d.get('q_len'), '>6')} p {_f(d.get('page_size'), '>3')} | fwd {_f(d.get('fwd_ms'), '8.2f')} ms "
                f"{_f(d.get('fwd_tflops'), '5.1f')} TF/s | f+b {_f(d.get('fwdbwd_ms'), '8.2f')} ms "
                f"{_f(d.get('fwdbwd_tflops'), '5.1f')} TF/s"
                f"{vs}{' | rel err ' + errs if errs else ''}{tail}")
    if d.get("mode") == "exact":
        extra = ""
        if d.get("grad_rel_err") is not None:
            worst = str(d.get("worst_param")).removeprefix("model.").replace("layers.", "L")
            extra = (f" | grad err {d['grad_rel_err']:.2e} median {_f(d.get('median_param_rel_err'), '.1e')} "
                     f"worst {_f(d.get('worst_param_rel_err'), '.1e')} {worst}")
        if "passes" in d:
            extra += f" | /full_bf16 {d['ratio_vs_full_bf16']:.3f} {'PASS' if d['passes'] else 'FAIL'}"
        return (f"exact {d['model']} d{_f(d.get('head_dim'), '')} T {_f(d.get('length'), '')} "
                f"c {_f(d.get('chunk'), '')} p {_f(d.get('page_size'), '')} {d.get('variant', '-'):>12} "
                f"loss {_f(d.get('loss'), '.5f')}{extra}{tail}")
    return json.dumps(d)
