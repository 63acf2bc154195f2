"""
What would make a refused plan fit: each change of the command line re-planned on its own (plan_auto.py), then the
smallest combination when no single change does. `--plan` prints them; train.py's refusal names the first that fits.

    candidates   --keep-activations 0 (if given), --offload on, a smaller --chunk, --grad-pages bfloat16,
                 --params-dtype bfloat16 [--moments X],
                 --lora-rank 16, the largest --batch and the longest --seq that fit (binary search: memory grows
                 with both, so every smaller value fits when one does)
"""

import copy
import itertools
from dataclasses import dataclass

from cli import LORA_TARGETS, chunked
from model import ModelConfig
from plan import Memory, Plan, summary
from plan_auto import plan_auto

LORA_SUGGESTED_RANK = 16


@dataclass
class Suggestion:
    """A change of the command line and the plan it gives (re-planned with it)."""
    flags: str
    plan: Plan

    def line(self, memory: Memory) -> str:
        verdict = "FITS" if self.plan.fits else "REFUSED"
        return f"{self.flags}: {verdict}, {summary(self.plan, memory)}"


def with_changes(args, **changes):
    """A copy of the run's settings with `changes` applied (args itself is left alone)."""
    trial = copy.copy(args)
    for name, value in changes.items():
        setattr(trial, name, value)
    return trial


def _largest_fitting(cfg, args, memory, name, low, high):
    """The largest value of integer setting `name` in [low, high] whose plan fits (plans fit for all values below
    one that fits: memory grows with --seq and --batch), or None."""
    if low > high or not plan_auto(cfg, with_changes(args, **{name: low}), memory)[0].fits:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if plan_auto(cfg, with_changes(args, **{name: mid}), memory)[0].fits:
            low = mid
        else:
            high = mid - 1
    return low


def _moves(cfg, args, plan) -> list[tuple[str, dict]]:
    """The single changes worth re-planning, least intrusive first: (flags, changed args). args: the run's
    arguments before plan_auto (auto settings still auto)."""
    moves = []
    if chunked(args) and args.keep_activations not in (0, "auto"):  # speed bought with memory: given back first
        moves.append(("--keep-activations 0", dict(keep_activations=0)))
    if chunked(args) and not plan.offload and args.offload != "on":
        moves.append(("--offload on", dict(offload="on")))
    if chunked(args):
        smaller = [c for c in (args.chunk >> i for i in range(1, 4)) if c >= max(args.page_size, 512)]
        for c in smaller:
            moves.append((f"--chunk {c}", dict(chunk=c)))
    if chunked(args) and args.grad_pages == "float32":
        moves.append(("--grad-pages bfloat16", dict(grad_pages="bfloat16")))
    if args.params_dtype == "float32" or (args.params_dtype == "bfloat16" and args.moments not in (None, "int8")):
        extra = "" if args.dtype == "bfloat16" else " --dtype bfloat16"
        extra += "" if args.optimizer == "adamw" else " --optimizer adamw"
        moves.append((f"--params-dtype bfloat16{extra}",
                      dict(params_dtype="bfloat16", dtype="bfloat16", optimizer="adamw", moments=None)))
    if not args.lora_rank:
        moves.append((f"--lora-rank {LORA_SUGGESTED_RANK}",
                      dict(lora_rank=LORA_SUGGESTED_RANK, lora_alpha=2.0 * LORA_SUGGESTED_RANK,
                           lora_targets=LORA_TARGETS, moments=None)))
    return moves


def _flags(flags: str, chosen) -> str:
    """A suggestion's flags, with the --moments plan_auto chose for bf16 weights."""
    if "--params-dtype bfloat16" in flags and chosen.moments:
        return f"{flags} --moments {chosen.moments}"
    return flags


def suggest(cfg: ModelConfig, args, memory: Memory, plan: Plan) -> list[Suggestion]:
    """For a refused `plan` of args (as given: auto settings still auto): each change of _moves re-planned alone
    (of several --chunk values, the largest that fits, else the smallest), the largest smaller --batch and the
    longest --seq that fit, and, if no change fits alone, the smallest combination of the changes that does (with
    the longest --seq under all of them if none does). The fitting ones first, in that order."""
    out, discrete = [], []
    chunk_moves = []
    for flags, changes in _moves(cfg, args, plan):
        new_plan, chosen = plan_auto(cfg, with_changes(args, **changes), memory)
        if flags.startswith("--chunk"):
            chunk_moves.append(Suggestion(flags, new_plan))
            continue
        out.append(Suggestion(_flags(flags, chosen), new_plan))
        discrete.append((flags, changes))
    if chunk_moves:
        fitting = [m for m in chunk_moves if m.plan.fits]
        best = fitting[0] if fitting else chunk_moves[-1]
        first = ("--keep-activations 0", "--offload on")  # less intrusive than a smaller chunk: before it
        out.insert(sum(1 for s in out[:2] if s.flags in first), best)
        discrete.append((best.flags, dict(chunk=int(best.flags.split()[1]))))
    if args.batch > 1:
        batch = _largest_fitting(cfg, args, memory, "batch", 1, args.batch - 1)
        if batch is not None:
            out.append(Suggestion(f"--batch {batch}", plan_auto(cfg, with_changes(args, batch=batch), memory)[0]))
    shortest = args.chunk + 1 if chunked(args) else 1
    seq = _largest_fitting(cfg, args, memory, "seq", shortest, args.seq - 1)
    if seq is not None:
        seq = max(shortest, seq - seq % 1024) if seq >= 4096 else seq  # a round length: it fits too
        out.append(Suggestion(f"--seq {seq}", plan_auto(cfg, with_changes(args, seq=seq), memory)[0]))
    if not any(s.plan.fits for s in out):
        out.append(_combination(cfg, args, memory, discrete, shortest))
    return sorted(out, key=lambda s: not s.plan.fits)


def _combination(cfg, args, memory, moves, shortest) -> Suggestion:
    """The fewest of `moves` that fit together (the first such in their order); if even all do not, all of them
    and the longest --seq that fits with them (or all of them, refused)."""
    for size in range(2, len(moves) + 1):
        for combo in itertools.combinations(moves, size):
            trial = args
            for _, changes in combo:
                trial = with_changes(trial, **changes)
            plan, chosen = plan_auto(cfg, trial, memory)
            if plan.fits:
                return Suggestion(_flags(" ".join(flags for flags, _ in combo), chosen), plan)
    trial, flags = args, " ".join(flags for flags, _ in moves)
    for _, changes in moves:
        trial = with_changes(trial, **changes)
    seq = _largest_fitting(cfg, trial, memory, "seq", shortest, args.seq - 1)
    if seq is not None:
        trial, flags = with_changes(trial, seq=seq), f"{flags} --seq {seq}"
    plan, chosen = plan_auto(cfg, trial, memory)
    return Suggestion(_flags(flags, chosen), plan)
