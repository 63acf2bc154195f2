"""
train.py's fine-tuning helpers: exporting a run as a Hugging Face checkpoint (export.py), LoRA adapters (lora.py).

    export_run(model, out, init_from)   OUT/hf/: the model (LoRA merged into --init-from's weights) with its
                                        checkpoint's config fields and tokenizer files
    export_checkpoint(out)              `train.py --export OUT`: OUT/ckpt.pt's model -> OUT/hf/
    attach_lora(model, args, seed)      --lora-rank: base weights frozen, fp32 adapters (seeded A init)
    save_adapter(model, out, ...)       OUT/lora/ in PEFT's format, beside each checkpoint
    lora_mismatch(args, ckpt_args)      a resumed run's LoRA settings differ from its checkpoint's (message or None)
    adapters_only(args)                 LoRA over an --init-from base: checkpoints hold the adapters only
    trainable_state(model)              {name: tensor} of what trains (a LoRA run's adapters)
    load_adapters(model, state, what)   trainable_state's dict back into a model, every key checked
    check_base(init_from, cfg, ckpt)    an adapters-only checkpoint's --init-from base is there, with its config
"""

import os

import torch

from cli import UserError
from export import export_hf
from lora import apply_lora, lora_modules, merge_lora, save_peft_adapter
from model import Model, ModelConfig


LORA_ARGS = ("lora_rank", "lora_alpha", "lora_targets")


def attach_lora(model, args: dict, seed=None):
    """With args["lora_rank"]: wrap the target projections in LoRA adapters (fp32, A seeded by `seed` so that a run
    is reproducible), freezing every other parameter. args: a run's arguments as a dict (a checkpoint's "args")."""
    if not args.get("lora_rank"):
        return model
    if seed is not None:
        torch.manual_seed(seed)
    return apply_lora(model, args["lora_rank"], args["lora_alpha"], tuple(args["lora_targets"]))


def lora_mismatch(args, ckpt_args: dict):
    """Why `args` cannot resume a checkpoint made with ckpt_args (LoRA settings), or None."""
    have = {name: getattr(args, name) for name in LORA_ARGS}
    had = {name: ckpt_args.get(name) for name in LORA_ARGS}
    had["lora_targets"] = tuple(had["lora_targets"]) if had["lora_targets"] is not None else None
    if have == had:
        return None
    fmt = lambda d: (f"--lora-rank {d['lora_rank']} --lora-alpha {d['lora_alpha']:g} --lora-targets "  # noqa: E731
                     f"{','.join(d['lora_targets'])}" if d["lora_rank"] else "no LoRA")
    return f"this run has {fmt(have)}, but its checkpoint was trained with {fmt(had)}: resume with the same"


def save_adapter(model, out: str, init_from=None, state: dict | None = None):
    """OUT/lora/ (PEFT format: adapter_config.json + adapter_model.safetensors) when the model has adapters.
    state: the adapters' whole tensors by parameter name (a tensor-parallel run's gathered ones), else the model's."""
    if lora_modules(model):
        save_peft_adapter(model, os.path.join(out, "lora"), base_model_name_or_path=init_from, state=state)


def _init_dir(init_from):
    """The --init-from directory when it still holds a config.json (its tokenizer files go with the export)."""
    if init_from and os.path.isfile(os.path.join(init_from, "config.json")):
        return init_from
    return None


def export_run(model, out: str, init_from=None) -> str:
    """Write OUT/hf/ from `model`; LoRA adapters are merged into the base weights first. Over an --init-from
    checkpoint the merge goes into that checkpoint's own weights, reloaded on the CPU: the run's frozen base may be a
    bf16 copy of them (--params-dtype auto), and the export must equal the checkpoint + adapters that peft loads.
    Otherwise in place (the model is plain afterwards). Returns the directory."""
    init_dir = _init_dir(init_from)
    if lora_modules(model):
        model = merge_lora(model, into=Model.from_pretrained(init_dir) if init_dir else None)
    try:
        return export_hf(model, os.path.join(out, "hf"), init_dir=init_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"--export: {e}") from None


def export_checkpoint(out: str, load_checkpoint) -> str:
    """`train.py --export OUT`: the model of OUT/ckpt.pt (load_checkpoint: checkpoint.load_checkpoint), on the CPU,
    written to OUT/hf/ (a LoRA run's adapters merged; adapters-only checkpoints over their --init-from base)."""
    path = os.path.join(out, "ckpt.pt")
    ckpt = load_checkpoint(path, flag="--export")
    init_from = ckpt["args"].get("init_from")
    if ckpt.get("adapters_only"):
        check_base(init_from, ckpt["config"], path, flag="--export")
        model = attach_lora(Model.from_pretrained(init_from), ckpt["args"])
        load_adapters(model, ckpt["model"], f"--export: {path}")
    else:
        model = attach_lora(Model(ckpt["config"]), ckpt["args"])
        load_weights(model, ckpt["model"], f"--export: {path}")
    return export_run(model, out, init_from)


def adapters_only(args) -> bool:
    """Whether a run's checkpoints hold only its LoRA adapters: the frozen base is an --init-from checkpoint that
    --resume reloads (a random-init base is saved whole: nothing else could restore it)."""
    return bool(args.lora_rank and args.init_from)


def trainable_state(model) -> dict:
    """{parameter name: tensor} of the parameters that train (a LoRA run: lora_A, lora_B of every adapter)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapters(model, state: dict, what: str):
    """trainable_state's dict into `model` (same LoRA settings); other keys or shapes are one UserError line."""
    expected = trainable_state(model)
    wrong = sorted(set(state) ^ set(expected)) or [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        raise UserError(f"{what} does not match this run's LoRA adapters ({wrong[0]}"
                        f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''})")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])
    return model


def check_base(init_from, cfg, ckpt_path: str, flag="--resume"):
    """An adapters-only checkpoint needs its base: --init-from must still hold a checkpoint of the same config."""
    if not init_from or not os.path.isdir(init_from):
        raise UserError(f"{flag}: {ckpt_path} holds LoRA adapters only and its base model ({init_from}) is gone: "
                        f"pass --init-from DIR with the same model")
    try:
        base = ModelConfig.from_pretrained(init_from)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{flag}: the base model of {ckpt_path}: {e}") from None
    if base != cfg:
        raise UserError(f"{flag}: {init_from} is not the base model of {ckpt_path} (its config differs: "
                        f"{base.num_hidden_layers} layers, hidden {base.hidden_size}, vocab {base.vocab_size})")


def load_weights(model, state: dict, what: str):
    """model.load_state_dict(state); a checkpoint whose weights do not fit its own config is one UserError line
    naming `what` (train.py's resume and --export both load through here)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{what} does not match its own config: {str(e).splitlines()[1].strip()}") from None
    return model
