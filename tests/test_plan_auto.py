"""plan.py's choices and suggestions on Qwen2.5-7B shapes with a fake Memory (meta shapes: nothing is allocated), and
its model-state parts against the tensors a real (tiny) run holds after a step."""

import json
import os

import pytest
import torch

import cli
import plan as planner
import plan_auto
import plan_suggest
import train
from model import preset
from test_plan import GIB, settings
from interrupt import stop_after

# the acceptance machine: one H200 (~139 GiB free) and ~120 GiB MemAvailable, less the host headroom
H200 = planner.Memory(device=139 * GIB, host=120 * GIB - planner.host_headroom(120 * GIB), on_gpu=True,
                      host_available=120 * GIB)
SEVEN_B = ("--model", "qwen2.5-7b", "--seq", "1048576")


def test_7b_at_1m_fits_with_the_default_flags():
    """fp32 weights + AdamW (16 B/param, 113 GiB) do not fit beside the rest; fp32 dK/dV pages (168 GiB) exceed the
    host: auto picks bf16 weights with the most precise moments that fit and bf16 dK/dV pages (112 GiB pinned)."""
    args = settings(*SEVEN_B, auto=True)
    assert (args.params_dtype, args.grad_pages, args.moments) == ("auto", "auto", None)
    plan, chosen = plan_auto.plan_auto(preset("qwen2.5-7b"), args, H200)
    assert plan.fits and plan.offload
    assert (chosen.params_dtype, chosen.moments, chosen.grad_pages) == ("bfloat16", "bf16", "bfloat16")
    assert chosen.precision_why == ["--params-dtype bfloat16 (auto: fp32 weights do not fit)",
                                    "--moments bf16 (the most precise whose plan fits)",
                                    "--grad-pages bfloat16 (auto: fp32 dK/dV pages do not fit)",
                                    "--attn-kernel sdpa (auto: gather + cuDNN for bf16 chunks on a GPU)",
                                    "--keep-activations 0 (auto: pages offloaded)"]
    assert plan.host["KV/dKV pages"] == 114_688 * 2**20  # 112 GiB
    assert args.params_dtype == "auto"  # plan_auto leaves the given settings alone
    # a small model at the same length keeps fp32 everywhere on the GPU side; the pages still go bf16 to fit
    small = settings("--model", "qwen2.5-0.5b", "--seq", "262144", auto=True)
    plan, chosen = plan_auto.plan_auto(preset("qwen2.5-0.5b"), small, H200)
    assert plan.fits and (chosen.params_dtype, chosen.grad_pages) == ("float32", "float32")


def test_refused_plan_suggests_changes_that_each_re_plan():
    """fp32 weights and pages given: REFUSED; each suggestion is the plan of that change alone."""
    cfg = preset("qwen2.5-7b")
    args = settings(*SEVEN_B, "--params-dtype", "float32", "--grad-pages", "float32")
    plan, _ = plan_auto.plan_auto(cfg, args, H200)
    assert not plan.fits
    found = {s.flags.split()[0] + (" " + s.flags.split()[1] if s.flags.startswith("--grad") else ""): s
             for s in plan_suggest.suggest(cfg, args, H200, plan)}
    assert {"--grad-pages bfloat16", "--params-dtype", "--lora-rank", "--chunk"} <= set(found), found
    assert "--seq" not in found  # fp32 weights + AdamW exceed the GPU at any length: no length is offered
    for flags, changes in (("--grad-pages bfloat16", dict(grad_pages="bfloat16")),
                           ("--lora-rank", dict(lora_rank=16, lora_alpha=32.0, lora_targets=cli.LORA_TARGETS))):
        direct, _ = plan_auto.plan_auto(cfg, plan_suggest.with_changes(args, **changes), H200)
        assert found[flags].plan.device == direct.device and found[flags].plan.host == direct.host
    assert not found["--grad-pages bfloat16"].plan.fits  # fp32 weights + AdamW still exceed the GPU
    # fp32 pages alone (weights left to the plan): the host limits the length; the longest --seq fits, and 1024
    # tokens more does not
    pages = settings(*SEVEN_B, "--grad-pages", "float32", auto=True)
    refused, _ = plan_auto.plan_auto(cfg, pages, H200)
    longest = [s for s in plan_suggest.suggest(cfg, pages, H200, refused) if s.flags.startswith("--seq")][0]
    seq = int(longest.flags.split()[1])
    assert 600_000 < seq < 1_000_000 and longest.plan.fits
    assert not plan_auto.plan_auto(cfg, plan_suggest.with_changes(pages, seq=seq + 1024), H200)[0].fits
    # no single change fits: the smallest combination that does is offered, and fits
    combined = [s for s in plan_suggest.suggest(cfg, args, H200, plan) if s.plan.fits and " --" in s.flags]
    assert combined and "--grad-pages bfloat16" in combined[0].flags, [s.flags for s in combined]
    line = combined[0].line(H200)
    assert ": FITS, " in line and "GiB planned on the gpu + " in line and "pinned host memory" in line, line


def test_kept_activations_are_the_first_suggestion_to_give_back():
    """--keep-activations that the GPU cannot hold (0.5B at 256K, 16K-token chunks, 15 kept: ~20 GiB each): REFUSED,
    and the first suggestion, --keep-activations 0, fits."""
    cfg = preset("qwen2.5-0.5b")
    args = settings("--model", "qwen2.5-0.5b", "--seq", "262144", "--chunk", "16384", "--attn", "dense",
                    "--keep-activations", "15", auto=True)
    plan, _ = plan_auto.plan_auto(cfg, args, H200)
    assert not plan.fits and plan.device[planner.KEPT_ACTIVATIONS] > 139 * GIB
    first = plan_suggest.suggest(cfg, args, H200, plan)[0]
    assert first.flags == "--keep-activations 0" and first.plan.fits
    assert planner.KEPT_ACTIVATIONS not in first.plan.device


def test_lora_at_the_longest_length_is_suggested_on_the_host_limit():
    """LoRA's 7B fits the GPU easily; the host's pages limit the length, which the suggestion names."""
    cfg = preset("qwen2.5-7b")
    args = settings("--model", "qwen2.5-7b", "--seq", "2097152", "--lora-rank", "16", auto=True)
    plan, chosen = plan_auto.plan_auto(cfg, args, H200)
    assert not plan.fits and "pinned host memory" in plan.refusal
    seq = [s for s in plan_suggest.suggest(cfg, args, H200, plan) if s.flags.startswith("--seq")][0]
    assert seq.plan.fits and 1_000_000 < int(seq.flags.split()[1]) < 1_100_000, seq.flags


def test_lora_base_is_bf16_and_fp32_weights_count_their_autocast_copies():
    """auto keeps LoRA's frozen base in bf16; an fp32 base under bf16 compute also holds a bf16 copy of every weight
    for a chunk (autocast saves the cast for the input gradient: 14 GiB for 7B, measured on the H200)."""
    cfg = preset("qwen2.5-7b")
    args = settings("--model", "qwen2.5-7b", "--seq", "1048576", "--lora-rank", "16", auto=True)
    plan, chosen = plan_auto.plan_auto(cfg, args, H200)
    assert plan.fits and chosen.params_dtype == "bfloat16"
    assert "--params-dtype bfloat16 (auto: LoRA: the frozen base in bf16)" in chosen.precision_why
    assert not any("autocast" in name for name in plan.device)
    fp32 = planner.plan_run(cfg, plan_suggest.with_changes(chosen, params_dtype="float32"), H200)
    n = sum(torch.Size(shape).numel() for shape in planner.param_shapes(cfg))
    assert fp32.device["bf16 copies of the fp32 weights (autocast)"] == 2 * n
    assert sum(fp32.device.values()) - sum(plan.device.values()) == 4 * n  # fp32 base (+2 B) and its copies (+2 B)


def state_bytes(model, optimizer) -> int:
    """Bytes of the parameters, their gradients (grad or fp32 main_grad) and the optimizer's tensors."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        for g in (p.grad, getattr(p, "main_grad", None)):
            total += g.numel() * g.element_size() if g is not None else 0
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


@pytest.mark.parametrize("extra", [[], ["--params-dtype", "bfloat16", "--dtype", "bfloat16", "--moments", "int8"],
                                   ["--lora-rank", "4"], ["--lora-rank", "4", "--params-dtype", "bfloat16",
                                                          "--dtype", "bfloat16"]],
                         ids=["fp32", "bf16-int8", "lora", "lora-bf16"])
def test_state_parts_match_the_tensors_after_a_step(extra):
    """The plan's weights + gradients + optimizer state against a tiny model's real tensors after one step, within
    1% (int8 moments pad each parameter to whole 256-value blocks)."""
    args = settings("--model", "tiny", "--seq", "32", "--batch", "2", *extra, gpu=False)
    cfg = preset("tiny")
    model = train.build_model(args, cfg, None, torch.device("cpu"))
    optimizer = train.build_optimizer(args, model, torch.device("cpu"))
    x = torch.randint(0, 256, (2, 33))
    train.train_step(model, x[:, :-1], x[:, 1:], args, torch.device("cpu"), None)
    optimizer.step()
    planned = sum(planner.state_parts(cfg, args).values())
    real = state_bytes(model, optimizer)
    assert abs(planned - real) <= 0.01 * real, (planned, real)


def test_lora_over_init_from_checkpoints_the_adapters_only_and_resumes_exactly(tmp_path, monkeypatch):
    """ckpt.pt of a LoRA run over --init-from holds the adapters (the base reloads on --resume), and the resumed
    run prints the uninterrupted run's losses; a missing base is one error line."""
    from test_model import make_hf_checkpoint

    init = tmp_path / "init"
    make_hf_checkpoint(init, tied=True, shard=False)
    args = ["--init-from", str(init), "--device", "cpu", "--seq", "32", "--batch", "2", "--steps", "4",
            "--eval-iters", "1", "--eval-interval", "2", "--lora-rank", "4", "--lr", "1e-2"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert train.main(args + ["--out", full]) == 0
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert ckpt["adapters_only"] and ckpt["model"] and all(k.endswith(("lora_A", "lora_B")) for k in ckpt["model"])

    StopAfterTwo = stop_after(2)  # as if Ctrl-C came during step 2

    monkeypatch.setattr(train, "StopRequest", StopAfterTwo)
    assert train.main(args + ["--out", part]) == 130
    monkeypatch.undo()
    assert train.main(args[2:] + ["--out", part, "--resume"]) == 0  # the base: the checkpoint's --init-from
    assert losses(part) == losses(full)  # bit-identical on the CPU
    os.rename(init, tmp_path / "moved")
    assert train.main(args[2:] + ["--out", part, "--resume", "--steps", "6"]) == 2


def test_no_eval_no_checkpoint_and_the_per_step_record(tmp_path):
    """--eval-iters 0 --save never: no evaluation, no ckpt.pt; log.jsonl has each step's time and peaks."""
    out = tmp_path / "run"
    assert train.main(["--model", "tiny", "--device", "cpu", "--seq", "32", "--batch", "2", "--steps", "2",
                       "--eval-iters", "0", "--save", "never", "--out", str(out)]) == 0
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert not (out / "ckpt.pt").exists() and len(records) == 2 and "val_loss" not in records[-1]
    assert all(r["step_s"] > 0 and r["peak_host_rss_gib"] > 0 for r in records)


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_resume_keeps_the_checkpoints_kernel_and_kept_chunks():
    """--attn-kernel auto and --keep-activations auto take a resumed checkpoint's values, as --grad-pages auto does:
    the kernels round differently and kept chunks sum the head's gradients earlier, so choosing again (free memory
    may differ) would break the exact resume. Given values stay; checkpoints from before auto recorded the old
    defaults (triton, 0)."""
    from checkpoint import resume_settings

    ckpt = {"args": {"params_dtype": "float32", "grad_pages": "float32", "attn_kernel": "triton",
                     "keep_activations": 0}}
    args = settings("--model", "small", "--seq", "65536", "--attn", "dense", auto=True)
    assert (args.attn_kernel, args.keep_activations) == ("auto", "auto")
    resume_settings(args, ckpt, "run/ckpt.pt")
    assert (args.attn_kernel, args.keep_activations) == ("triton", 0)
    args = settings("--model", "small", "--seq", "65536", "--attn", "dense", "--attn-kernel", "sdpa",
                    "--keep-activations", "3", auto=True)
    resume_settings(args, ckpt, "run/ckpt.pt")
    assert (args.attn_kernel, args.keep_activations) == ("sdpa", 3)
