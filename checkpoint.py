"""
What a run leaves in --out and reads back: OUT/ckpt.pt (written atomically; a LoRA run over --init-from keeps only its
adapters), its checks when loaded, what --resume takes from it, and OUT/log.jsonl reopened after the checkpoint's
step so that every step is logged once.
"""

import json
import os
from dataclasses import asdict

import torch
from tqdm import tqdm

import finetune
import plan as planner
from attention import ATTN_KERNELS
from cli import UserError, chunked
from model import ModelConfig

CHECKPOINT_KEYS = ("model", "optimizer", "step", "config", "args")


def save_checkpoint(path, model, optimizer, step, args, layout=None):
    """Atomic: write a temp file in the same directory, then rename over the old checkpoint. A LoRA run also
    writes its adapters to OUT/lora/ (PEFT format); over an --init-from base, ckpt.pt holds only the adapters
    (adapters_only: the base reloads from --init-from on --resume), over a random-init base the whole model.
    Several processes (parallel.py): every rank takes part in gathering the full tensors, rank 0 writes them."""
    adapters_only = finetune.adapters_only(args)
    if layout:  # the whole tensors (under --tp gathered from every rank's shards); an adapters-only save skips the base
        model_state, optimizer_state = layout.full_state(model, optimizer, only_trainable=adapters_only)
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    if adapters_only:
        model_state = {name: model_state[name] for name in finetune.trainable_state(model)}
    if layout and not layout.main:
        return
    tmp = path + ".tmp"
    torch.save({"model": model_state, "optimizer": optimizer_state, "step": step, "adapters_only": adapters_only,
                "config": asdict(model.config), "args": vars(args)}, tmp)
    os.replace(tmp, path)
    # OUT/lora/ from the whole adapters (model_state: gathered under --tp), as one GPU's run writes it
    finetune.save_adapter(model, os.path.dirname(path), args.init_from, model_state)


def load_checkpoint(path, flag="--resume") -> dict:
    """A checkpoint written by save_checkpoint, its keys and config checked; anything else is a UserError naming
    the file (and the flag that asked for it)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no 60 GB read up front
    except Exception as e:  # torch raises many types here; its advice (weights_only=False) would be unsafe
        raise UserError(f"{flag}: {path} is not a checkpoint of train.py (torch.load: {type(e).__name__})") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise UserError(f"{flag}: {path} is not a checkpoint of train.py (no {', '.join(missing)})")
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0 or not isinstance(ckpt["args"], dict):
        raise UserError(f"{flag}: {path} holds a bad step ({ckpt['step']!r}) or args")
    try:
        ckpt["config"] = ModelConfig(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{flag}: {path} holds a bad model config ({e})") from None
    return ckpt


def resume_settings(args, ckpt, ckpt_path):
    """--resume keeps the checkpoint's choices: auto settings take its values; given ones must equal them."""
    had = ckpt["args"]
    if args.params_dtype == "auto":  # checkpoints from before these flags: fp32 weights, fp32 gradient pages
        args.params_dtype = had.get("params_dtype") or "float32"
    if chunked(args) and args.grad_pages == "auto":
        args.grad_pages = had.get("grad_pages") if had.get("grad_pages") in planner.DTYPES else "float32"
    # the chunked path's other choices round differently (the kernels; kept chunks sum the head's gradients earlier),
    # so an exact resume keeps them too (checkpoints from before auto: the old defaults, recorded as given)
    if chunked(args) and args.keep_activations == "auto" and isinstance(had.get("keep_activations"), int):
        args.keep_activations = had["keep_activations"]
    if chunked(args) and args.attn_kernel == "auto" and had.get("attn_kernel") in set(ATTN_KERNELS) - {"auto"}:
        args.attn_kernel = had["attn_kernel"]
    if args.moments is None and args.params_dtype == "bfloat16":
        args.moments, args.moments_why = had.get("moments"), "the checkpoint's"
    for name in ("params_dtype", "moments"):
        was = had.get(name, "float32" if name == "params_dtype" else None)
        if was != getattr(args, name):
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}, but {ckpt_path} was trained with "
                            f"{was}: resume with the same")
    if finetune.lora_mismatch(args, had):
        raise UserError(f"--resume: {finetune.lora_mismatch(args, had)}")
    if ckpt.get("adapters_only"):  # the base comes from --init-from again: there, and the same model
        args.init_from = args.init_from or had.get("init_from")
        finetune.check_base(args.init_from, ckpt["config"], ckpt_path)
    for name in ("data", "documents", "eval_data"):  # allowed (a new data mix), but no longer an exact resume
        if name in had and had[name] != getattr(args, name, None):
            tqdm.write(f"note: --{name.replace('_', '-')} {getattr(args, name, None)} differs from the checkpoint's "
                       f"{had[name]}: the batches from here on differ from an uninterrupted run's")


def open_log(path, start):
    """log.jsonl for appending from step `start` on. A fresh run starts it empty; a resumed one drops the records
    after its checkpoint's step (a run that died between two saves), so that every step appears once."""
    if not start:
        return open(path, "w")
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a crash
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return open(path, "a")
