"""What folding a chunk's bf16 weight gradients into fp32 `main_grad` costs, and what fusing the fold into the
weight-gradient GEMM saves (bench/RESULTS.md, "Fused fp32 gradient accumulation"). For every Linear of one
Qwen2.5-7B layer and the LM head, at 4096 tokens: (a) bf16 GEMM dW = dY^T X, then main_grad += dW (precision.py's
fold hook, which now only serves the embedding and norms); (b) one GEMM accumulating into fp32 main_grad in place
(addmm with out_dtype=float32, beta=1: precision.FP32GradLinear's way); (c) the bf16 GEMM alone (the floor).
Prints ms per model (28 layers + head) and the fused result's error vs fp32.

    python3 bench/wgrad_probe.py      (on a GPU, from the repo root)
"""

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import timed  # noqa: E402


def cuda_ms(fn, repeats=7):
    """Median GPU time of fn in ms (CUDA events, after one warm-up call)."""
    return statistics.median(timed(fn, torch.device("cuda"), 1, repeats, events=True)[0]) * 1e3


def main():
    tokens, hidden, inter, kv, vocab, layers = 4096, 3584, 18944, 512, 152064, 28
    shapes = {"q/o": (hidden, hidden, 2), "k/v": (kv, hidden, 2), "gate/up": (inter, hidden, 2),
              "down": (hidden, inter, 1)}  # name: (out_features, in_features, count per layer)
    totals = {"split": 0.0, "fused": 0.0, "gemm": 0.0}
    for name, (n_out, n_in, count) in list(shapes.items()) + [("lm_head", (vocab, hidden, 1 / layers))]:
        x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(n_out, n_in, device="cuda", dtype=torch.float32)

        def split():
            main_grad.add_(dy.t() @ x)

        def fused():
            torch.addmm(main_grad, dy.t(), x, out_dtype=torch.float32, out=main_grad)

        def gemm():
            return dy.t() @ x

        ms = {"split": cuda_ms(split), "fused": cuda_ms(fused), "gemm": cuda_ms(gemm)}
        main_grad.zero_()
        fused()
        fused()
        ref = 2 * (dy.float().t() @ x.float())
        err = ((main_grad - ref).norm() / ref.norm()).item()
        for k in totals:
            totals[k] += ms[k] * count * layers
        print(f"{name:8s} [{n_out} x {n_in}]  split {ms['split']:.3f} ms  fused {ms['fused']:.3f} ms  "
              f"bf16 GEMM alone {ms['gemm']:.3f} ms  fused rel. err vs fp32 {err:.1e}", flush=True)
    print(f"per chunk of {tokens} tokens, whole 7B model: split {totals['split']:.1f} ms, fused {totals['fused']:.1f} "
          f"ms, bf16 GEMM alone {totals['gemm']:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
