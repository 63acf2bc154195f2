"""
Several processes (GPUs) for train.py: the process groups of a torchrun launch and what a training loop needs of
them. Tensor parallelism (tensor_parallel.py), context parallelism (context_parallel.py) and data parallelism
(data_parallel.py) do the work; this file lays them out and gathers checkpoints.

    torchrun --nproc-per-node N train.py --tp T --cp P ...     N = T x P x D ranks; rank = (d * P + c) * T + t

Ranks t = 0..T-1 of one (d, c) form a tensor-parallel group (one model, heads split; consecutive ranks, so on one
host it spans NVLink neighbours); ranks c = 0..P-1 of one (d, t) a context-parallel group (the same sequences and
shard, the history's pages divided: its ranks compute identical gradients, so they need no reduction); ranks of one
(c, t) across d a data-parallel group (the same shard, different sequences). Every rank draws the step's global
batch of --batch x D sequences from (seed, step) and trains on its D-th share, so a run's losses are those of one
GPU at --batch x D. Checkpoints are gathered to rank 0 as the usual OUT/ckpt.pt of one GPU (full tensors: model, or
a LoRA run's adapters, and optimizer state: AdamW's moments, bf16 weights' fp32 masters and fp32 moments,
Adafactor's factors), so exports and resumes work at any T and D, one process included; OUT/lora/ holds the whole
adapters. A single process (no torchrun) sets up nothing and runs the plain path.
"""

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

import context_parallel
import data_parallel
import tensor_parallel
from cli import UserError
from tensor_parallel import TensorParallel


def least_memory(memory, device):
    """plan.Memory (device and host bytes) as the least over the ranks of the default group. Every rank plans on its
    own, and what the plan chooses from free memory (the weights' precision, offload, the kept chunks) must agree:
    a rank keeping another number of chunks would issue its collectives in another order."""
    t = torch.tensor([memory.device, memory.host], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return dataclasses.replace(memory, device=int(t[0]), host=int(t[1]))


@dataclass
class Layout:
    rank: int  # in the world
    world: int
    tp: int  # tensor-parallel degree
    dp: int  # data-parallel degree
    tp_group: object
    dp_group: object
    device: torch.device
    owns_process_group: bool  # this Layout initialized it (and destroys it in close())
    tensor: TensorParallel | None = None  # set by shard()
    cp: int = 1  # context-parallel degree
    cp_group: object = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.cp)

    @property
    def main(self) -> bool:
        """Rank 0 prints, logs and writes checkpoints."""
        return self.rank == 0

    def describe(self) -> str:
        return (f"parallel: {self.world} processes, tensor parallel {self.tp} (heads and MLP split; each rank's KV "
                f"pages hold 1/{self.tp} of the KV heads) x context parallel {self.cp} (each rank's pages hold 1/{self.cp} "
                f"of the chunks) x data parallel {self.dp} (--batch per rank), "
                f"{dist.get_backend()} on {self.device}")

    # ------------------------------------------------------------------------------------------ model and steps

    def shard(self, model):
        """Split the model over the tensor-parallel group, in place (before the optimizer and KV store exist)."""
        self.tensor = tensor_parallel.shard_model(model, self.tp_group)
        return model

    def local_batch(self, batch):
        """This rank's rows of the step's global data.Batch [batch x dp, T] (inputs, targets, document starts)."""
        rows = batch.x.shape[0] // self.dp
        share = slice(self.dp_rank * rows, (self.dp_rank + 1) * rows)
        return dataclasses.replace(batch, x=batch.x[share], y=batch.y[share],
                                   doc_start=None if batch.doc_start is None else batch.doc_start[share])

    def reduce_gradients(self, model):
        """Once per step, after the whole chunked step: sum the whole LoRA factors' partial gradients over the
        tensor-parallel group (tensor_parallel.py), then average every gradient over the data-parallel group."""
        self.tensor.reduce_partial_gradients(model)
        data_parallel.average_gradients(list(model.parameters()), self.dp_group)

    def mean(self, value: float) -> float:
        """The mean over data-parallel ranks of a per-rank number (the step's loss)."""
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.dp_group)
        return t.item() / self.dp

    def least_memory(self, memory):
        """plan.Memory with every rank's least free memory (the module's least_memory)."""
        return least_memory(memory, self.device)

    def any(self, flag: bool) -> bool:
        """Whether any rank raised its flag (Ctrl-C reaches ranks at different moments; all must stop together)."""
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t)
        return bool(t.item())

    def clip_grad_norm_(self, model, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ of the whole model's gradient (main_grad or grad), as one GPU's."""
        total = tensor_parallel.grad_norm_sq(model, self.tensor, data_parallel.gradient).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            g = data_parallel.gradient(p)
            if g is not None:
                g.mul_(coef.to(g.dtype))
        return total

    def rank_plan(self, plan, cfg, args, memory):
        """One rank's memory plan (plan.py) with its own verdict: the pages divided by cp, the weights, gradients
        and optimizer state by their tensor-parallel share (context_parallel.rank_plan). With cp > 1 the pages stay
        on the device (the sharded store does not offload) and no stage-1 outputs are kept. The choices made on
        the whole model's plan (weights' precision, offload for cp = 1) stand."""
        import plan as planner
        if self.cp > 1 and plan.offload:
            plan = planner.parts(cfg, args, False, plan.q_block or planner.DEFAULT_Q_BLOCK)
        total = sum(math.prod(s) for s in planner.param_shapes(cfg))
        share = context_parallel.rank_plan(plan, cfg, total, self.tp, self.cp)
        if self.cp > 1:
            share.device.pop(planner.OUTPUT_CACHE, None)
        share.refusal = planner.refusal(share, memory, args)
        return share

    # ------------------------------------------------------------------------------------------ checkpoints

    def _optimizer_names(self, optimizer, model) -> list[tuple[str, torch.nn.Parameter]]:
        names = {id(p): n for n, p in model.named_parameters()}
        return [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]

    def full_state(self, model, optimizer, only_trainable=False) -> tuple[dict, dict]:
        """(model state dict, optimizer state dict) of the whole model, as one GPU's run would save them
        (only_trainable: the model's trainable tensors only, a LoRA run's adapters; the frozen base is not gathered).
        Collective over the tensor-parallel group: every rank calls it."""
        tp = self.tensor
        if getattr(optimizer, "moments", None) == "int8":  # parallel.check refuses it; a guard for other callers
            raise UserError("tensor parallelism cannot gather int8 AdamW moments (blocks of a shard are not the "
                            "whole tensor's)")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model_state = tp.gather_state_dict({k: v for k, v in model.state_dict().items()
                                            if not only_trainable or k in trainable})
        opt_state = optimizer.state_dict()
        for i, (name, p) in enumerate(self._optimizer_names(optimizer, model)):
            # a new dict: state_dict() hands out the optimizer's own per-parameter dicts
            state = opt_state["state"][i] = dict(opt_state["state"].get(i, {}))
            for key, value in state.items():
                try:
                    state[key] = tp.gather_state(name, tuple(p.shape), value)
                except ValueError as e:
                    raise UserError(f"{key}: {e}") from None
        return model_state, opt_state

    def load_optimizer_state(self, optimizer, model, full: dict):
        """Load a full (one-GPU) optimizer state dict, each tensor cut to this rank's share (gather_state's
        inverse: moments and masters like their parameter, Adafactor factors along the split dim)."""
        for i, (name, p) in enumerate(self._optimizer_names(optimizer, model)):
            state = full["state"][i] = dict(full["state"].get(i, {}))
            for key, value in state.items():
                try:
                    state[key] = self.tensor.shard_state(name, tuple(p.shape), value)
                except ValueError as e:
                    raise UserError(f"--resume: {key}: {e}") from None
        optimizer.load_state_dict(full)

    def build_adafactor(self, groups, model, lr):
        """Adafactor over this rank's shards whose updates are one GPU's (tensor_parallel.Adafactor)."""
        names = {p: n for n, p in model.named_parameters()}
        return tensor_parallel.Adafactor(groups, tp=self.tensor, names=names, lr=lr)

    def barrier(self):
        dist.barrier()

    def close(self):
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def from_env(tp: int, device: torch.device, cp: int = 1) -> Layout | None:
    """The layout of a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment), its
    process groups created (nccl on GPUs, gloo on CPUs); None for a plain single process with --tp 1 --cp 1."""
    if "WORLD_SIZE" not in os.environ:
        if tp == cp == 1:
            return None
        flags = " ".join(f"--{name} {value}" for name, value in (("tp", tp), ("cp", cp)) if value > 1)
        raise UserError(f"{flags} needs {tp * cp} processes or a multiple: launch with torchrun --nproc-per-node N "
                        f"train.py {flags} ...")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", 0))
    if world % (tp * cp):
        raise UserError(f"--tp {tp} x --cp {cp} does not divide the {world} processes (WORLD_SIZE)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {device.index}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    dp = world // (tp * cp)
    d_, c_, t_ = rank // (tp * cp), rank // tp % cp, rank % tp  # this rank's indices
    groups = {}
    # every rank creates every group, in one order (new_group is collective)
    for kind, members, mine in (("tp", lambda d, c, t: [(d * cp + c) * tp + i for i in range(tp)], (d_, c_, 0)),
                                ("cp", lambda d, c, t: [(d * cp + i) * tp + t for i in range(cp)], (d_, 0, t_)),
                                ("dp", lambda d, c, t: [(i * cp + c) * tp + t for i in range(dp)], (0, c_, t_))):
        for d in range(1 if kind == "dp" else dp):
            for c in range(1 if kind == "cp" else cp):
                for t in range(1 if kind == "tp" else tp):
                    group = dist.new_group(members(d, c, t))
                    if (d, c, t) == mine:
                        groups[kind] = group
    return Layout(rank, world, tp, dp, groups["tp"], groups["dp"], device, owns, cp=cp, cp_group=groups["cp"])


def check(layout: Layout | None, cfg, args):
    """What the layout cannot do with this run, as a UserError, before any model is built. Under --tp > 1, bf16
    weights take fp32 AdamW moments only (the plan's auto choice is limited to them: plan_auto.TP_MOMENTS)."""
    if layout is not None and layout.cp > 1:
        context_parallel.check(args)
    if layout is None or layout.tp == 1:
        return
    why = tensor_parallel.check_divisible(cfg, layout.tp)
    if why:
        raise UserError(f"--tp {layout.tp}: {why}")
    if args.params_dtype in ("auto", "bfloat16") and not args.lora_rank:
        if args.moments in ("bf16", "int8"):
            # bf16: stochastic rounding draws its random numbers per shard, not the whole tensor's (the update
            # would not be one GPU's); int8: the 256-value blocks of a shard are not those of the whole tensor
            raise UserError(f"--tp {layout.tp} with --moments {args.moments}: not supported (a shard's "
                            f"{'random rounding' if args.moments == 'bf16' else 'int8 blocks'} differ from the whole "
                            f"tensor's); use --moments fp32")
