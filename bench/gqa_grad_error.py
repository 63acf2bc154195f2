"""
How far each way of handing GQA to cuDNN's fused attention lands from fp32 (CUDA only): one unmasked call of 4096
queries over 12288 keys at Qwen2.5-7B's heads (28 query / 4 kv heads, head_dim 128), bf16 inputs, three seeds.

    native           K/V with their 4 heads, cuDNN sums each group's dK/dV itself (SDPAKernel's route)
    fold             the 7 query heads of a group folded into the query length: [B, 4, 7 x 4096, D] queries
    repeat+fp32 sum  K/V repeated to the 28 query heads, the per-head dK/dV summed over each group in fp32

Prints the relative error (Frobenius norm) of o, dq, dK and dV against an fp32 reference from the same bf16
inputs. bench/RESULTS.md (sixteenth session) has the numbers and what followed from them.

    PYTHONPATH=. python bench/gqa_grad_error.py
"""
import torch

from kernels.gather_sdpa import _sdpa_backward, _sdpa_forward

B, H, HKV, L, S, D = 1, 28, 4, 4096, 12288, 128
G, SCALE = H // HKV, D ** -0.5


def relative_error(got, ref):
    return ((got.float() - ref).norm() / ref.norm()).item()


def fp32_reference(q, k, v, do):
    """o, dq, dk, dv in fp32 from the bf16 inputs: plain softmax attention, K/V repeated to the query heads."""
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    o = torch.softmax(q @ k.repeat_interleave(G, 1).transpose(-1, -2) * SCALE, -1) @ v.repeat_interleave(G, 1)
    o.backward(do.float())
    return dict(o=o.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def routes(q, k, v, do):
    """{route: dict(o, dq, dk, dv)} through cuDNN (q, do [B, H, L, D]; k, v [B, HKV, S, D], all bf16)."""
    o, lse = _sdpa_forward("cudnn", q, k, v, False, SCALE)
    dq, dk, dv = _sdpa_backward("cudnn", do, q, k, v, o, lse, False, SCALE)
    out = {"native": dict(o=o, dq=dq, dk=dk, dv=dv)}
    q_fold, do_fold = q.reshape(B, HKV, G * L, D), do.reshape(B, HKV, G * L, D)  # heads h = kv head * G + g
    o, lse = _sdpa_forward("cudnn", q_fold, k, v, False, SCALE)
    dq, dk, dv = _sdpa_backward("cudnn", do_fold, q_fold, k, v, o, lse, False, SCALE)
    out["fold"] = dict(o=o.reshape(B, H, L, D), dq=dq.reshape(B, H, L, D), dk=dk, dv=dv)
    k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    o, lse = _sdpa_forward("cudnn", q, k_rep, v_rep, False, SCALE)
    dq, dk, dv = _sdpa_backward("cudnn", do, q, k_rep, v_rep, o, lse, False, SCALE)
    group_sum = [g.float().view(B, HKV, G, S, D).sum(2) for g in (dk, dv)]
    out["repeat+fp32 sum"] = dict(o=o, dq=dq, dk=group_sum[0], dv=group_sum[1])
    return out


def main():
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v, do = (torch.randn(*shape, generator=g, device="cuda").bfloat16()
                       for shape in ((B, H, L, D), (B, HKV, S, D), (B, HKV, S, D), (B, H, L, D)))
        ref = fp32_reference(q, k, v, do)
        for name, got in routes(q, k, v, do).items():
            print(f"seed {seed} {name:16s} " + " ".join(f"{x} {relative_error(got[x], ref[x]):.3e}"
                                                       for x in ("o", "dq", "dk", "dv")))


if __name__ == "__main__":
    main()
