"""
LoRA (low-rank adapters) for model.py's Model, saved and loaded in PEFT's adapter format.

Each target projection y = x W^T + b becomes

    y = base(x) + scale * (x A^T) B^T          A: [r, in]   B: [out, r]   scale = alpha / r

with the base Linear frozen (in whatever dtype the model holds it, bf16 for large models) and A, B trainable fp32
parameters: A kaiming-uniform and B zero, as PEFT initialises them, so training starts from the base model exactly.
LoRA plugs in from outside by swapping modules: model.py knows nothing of it. The base Linear stays a child named
`base`, called as a module, so another wrapper (a precision swap) can still find and replace it.

PEFT's adapter directory, which peft's `PeftModel.from_pretrained(Qwen2ForCausalLM, dir)` loads:
    adapter_config.json         {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": [...], ...}
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight [r, in]  (and lora_B.weight [out, r])
Our module paths are HF's (model.layers.N.self_attn.q_proj, ...), so the keys map 1:1.
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import read_json

# The seven projections of a Qwen2 layer; LoRA's usual "all linear layers" (the LM head and embedding excluded).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel) .model (the HF model)


class AdapterError(ValueError):
    """A PEFT adapter directory we cannot load; the message is one line naming the file."""


class LoRALinear(nn.Module):
    """base(x) + scale * (x A^T) B^T. lora_A, lora_B are fp32 parameters; the low-rank product runs in the
    activation dtype (under autocast: the autocast dtype, as F.linear casts to it)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init_lora_weights=True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x):  # x: [..., in] -> [..., out]
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # no-ops in fp32; bf16 activations get bf16 A, B
        return self.base(x) + F.linear(F.linear(x, a), b) * self.scale  # [..., r] in between: cheap for small r

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRALinear} in model order, e.g. "model.layers.0.self_attn.q_proj"."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _check_hyperparameters(rank, alpha, targets):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive finite number, got {alpha!r}")
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct names among {', '.join(LORA_TARGETS)}; got {list(targets)}")
    return targets


def _swap(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS) -> nn.Module:
    """Wrap every nn.Linear whose name is in `targets` (q_proj, ..., down_proj) in a LoRALinear and freeze every
    other parameter. In place; returns the model. Cast the model to its base dtype first: the adapters are made
    fp32, and a later model.to(bf16) would cast them too."""
    targets = _check_hyperparameters(rank, alpha, targets)
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets]
    if not names:
        raise ValueError(f"no Linear module named {' / '.join(targets)} in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _swap(model, name, LoRALinear(model.get_submodule(name), rank, alpha))  # its A, B require grad
    return model


def merge_lora(model: nn.Module, into: nn.Module | None = None) -> nn.Module:
    """Fold each adapter into its base weight, W += scale * B A (computed in fp32, rounded once to W's dtype), and
    put the base Linear back in the wrapper's place: a plain model again, for export. In place; returns the model.
    The base parameters stay frozen. into: a plain model of the same architecture (e.g. the --init-from checkpoint's
    own weights, where the run trained over a bf16 copy of them): the adapters are folded into its Linear of the
    same name instead, `model` is left as it is, and `into` is returned."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            w = (into.get_submodule(name) if into is not None else m.base).weight
            delta = m.scale * (m.lora_B.float() @ m.lora_A.float())  # [out, r] @ [r, in]
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
            if into is None:
                _swap(model, name, m.base)
    return model if into is None else into


# ------------------------------------------------------------------------------------------------ PEFT format


def _shared(modules: dict, attr: str):
    values = {getattr(m, attr) for m in modules.values()}
    if len(values) != 1:  # PEFT would need rank_pattern / alpha_pattern; apply_lora never makes this
        raise ValueError(f"LoRA adapters with different {attr}s {sorted(values)} cannot be saved as one r/lora_alpha")
    return values.pop()


def _atomic_write(path: str, write):
    """write(tmp_path), then rename over path: a reader never sees a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_peft_adapter(model: nn.Module, path: str, base_model_name_or_path: str | None = None,
                      state: dict | None = None):
    """Write the model's adapters to directory `path` as PEFT does: adapter_config.json + adapter_model.safetensors
    (fp32 A and B under PEFT's key names). state: {"<module path>.lora_A": tensor, ...} to write instead of the
    modules' own A and B (a tensor-parallel run's, gathered whole: each rank's modules hold a share)."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save")
    rank, alpha = _shared(modules, "rank"), _shared(modules, "alpha")
    targets = [t for t in LORA_TARGETS if any(name.rpartition(".")[2] == t for name in modules)]
    tensors = {}
    for name, m in modules.items():
        for factor in ("lora_A", "lora_B"):
            tensor = getattr(m, factor) if state is None else state[f"{name}.{factor}"]
            tensors[f"{PEFT_PREFIX}{name}.{factor}.weight"] = tensor.detach().float().contiguous().cpu()
    # LoraConfig fields with long-standing names; everything else is left to PEFT's defaults
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True, "revision": None,
    }
    os.makedirs(path, exist_ok=True)
    _atomic_write(os.path.join(path, ADAPTER_WEIGHTS), lambda f: save_file(tensors, f, metadata={"format": "pt"}))

    def write_config(f):
        with open(f, "w") as out:
            json.dump(config, out, indent=2)
    _atomic_write(os.path.join(path, ADAPTER_CONFIG), write_config)


# adapter_config.json fields whose non-default values change the adapter's math in ways we do not implement
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "target_parameters": None, "exclude_modules": None, "trainable_token_indices": None,
                "layer_replication": None, "alora_invocation_tokens": None, "use_qalora": False}


def read_adapter_config(path: str) -> dict:
    """The validated adapter_config.json of a PEFT LoRA adapter directory -> {"r", "lora_alpha", "target_modules"}."""
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise AdapterError(f"{file}: not found (expected a PEFT adapter directory)")
    cfg = read_json(file, AdapterError)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r} "
                           f"is not supported (only 'LORA')")
    for key, default in _UNSUPPORTED.items():
        value = cfg.get(key, default)
        if value != default and not (default is None and value in ([], {})):
            raise AdapterError(f"{file}: {key}={value!r} is not supported (only {default!r})")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        raise AdapterError(f"{file}: target_modules must be a list of module names, got {targets!r}")
    try:
        targets = _check_hyperparameters(cfg.get("r"), cfg.get("lora_alpha"), targets)
    except ValueError as e:
        raise AdapterError(f"{file}: {e}") from None
    order = [t for t in LORA_TARGETS if t in targets]  # canonical order, whatever order PEFT wrote
    return {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "target_modules": order}


def load_peft_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT LoRA adapter directory into the model, applying LoRA first if the model has none (then with the
    adapter's rank, alpha and targets; if it has some, they must match). Everything is validated before the model
    changes. In place; returns the model."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    config_file, weights_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    modules = lora_modules(model)
    if modules:
        have = {"r": _shared(modules, "rank"), "lora_alpha": _shared(modules, "alpha"),
                "target_modules": [t for t in LORA_TARGETS if any(n.rpartition(".")[2] == t for n in modules)]}
        for key in have:
            if have[key] != cfg[key]:
                raise AdapterError(f"{config_file}: {key} {cfg[key]!r} differs from the model's LoRA {have[key]!r}")
    else:  # the Linears apply_lora will wrap
        modules = {name: m for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name.rpartition(".")[2] in cfg["target_modules"]}
    r = cfg["r"]
    shapes = {}  # PEFT key -> the shape the model needs
    for name, m in modules.items():
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, m.in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, r)

    if not os.path.isfile(weights_file):
        raise AdapterError(f"{weights_file}: not found")
    try:
        state = load_file(weights_file, device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise AdapterError(f"{weights_file}: cannot read safetensors ({e})") from None
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise AdapterError(f"{weights_file}: keys do not match the model: missing {missing[:3]}"
                           f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                           f"{'...' if len(unexpected) > 3 else ''}")
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise AdapterError(f"{weights_file}: {key} has shape {tuple(state[key].shape)}, "
                               f"rank {r} on this model needs {shape}")

    if not lora_modules(model):
        apply_lora(model, r, cfg["lora_alpha"], cfg["target_modules"])
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_A.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"].to(m.lora_A.dtype))
            m.lora_B.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"].to(m.lora_B.dtype))
    return model
