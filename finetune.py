"""
train.py's fine-tuning helpers: exporting a run as a Hugging Face checkpoint (export.py), LoRA adapters (lora.py).

    export_run(model, out, init_from)   OUT/hf/: the model (LoRA merged first, in place) with the --init-from
                                        checkpoint's config fields and tokenizer files
    export_checkpoint(out)              `train.py --export OUT`: OUT/ckpt.pt's model -> OUT/hf/
"""

import os

from cli import UserError
from export import export_hf
from lora import lora_modules, merge_lora
from model import Model


def _init_dir(init_from):
    """The --init-from directory when it still holds a config.json (its tokenizer files go with the export)."""
    if init_from and os.path.isfile(os.path.join(init_from, "config.json")):
        return init_from
    return None


def export_run(model, out: str, init_from=None) -> str:
    """Write OUT/hf/ from `model`; LoRA adapters are merged into the base weights first (in place: the model is
    plain afterwards). Returns the directory."""
    if lora_modules(model):
        merge_lora(model)
    try:
        return export_hf(model, os.path.join(out, "hf"), init_dir=_init_dir(init_from))
    except (OSError, ValueError) as e:
        raise UserError(f"--export: {e}") from None


def export_checkpoint(out: str, load_checkpoint, attach=lambda model, args: None) -> str:
    """`train.py --export OUT`: the model of OUT/ckpt.pt (load_checkpoint: train.load_checkpoint), on the CPU,
    written to OUT/hf/. attach(model, ckpt_args) adds what the run added to the plain model (LoRA adapters) before
    its state is loaded."""
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"), flag="--export")
    model = Model(ckpt["config"])
    attach(model, ckpt["args"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"--export: {out}/ckpt.pt does not match its own config: "
                        f"{str(e).splitlines()[1].strip()}") from None
    return export_run(model, out, ckpt["args"].get("init_from"))
