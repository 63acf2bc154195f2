"""
Export a Model as a Hugging Face checkpoint directory, the inverse of Model.from_pretrained:

    config.json                         every field transformers' Qwen2Config needs; the init checkpoint's other
                                        fields (bos/eos ids, ...) kept
    model.safetensors                   HF names, one dtype; past max_shard_bytes instead
    model-0000N-of-0000M.safetensors    shards, plus model.safetensors.index.json {"metadata": {"total_size": bytes},
                                        "weight_map": {name: shard}}
    tokenizer.json, ...                 copied from the init checkpoint, whichever it has

so that `transformers.AutoModelForCausalLM.from_pretrained(dir)` gives our logits. Our parameter names are HF's, so
the weights are the state dict itself; a tied LM head is left out, as transformers saves it (the embedding is it).
A model with LoRA adapters must be merged first (lora.merge_lora).

The directory is written under a hidden temporary name next to out_dir and renamed into place when complete: an
interrupted export leaves a `.NAME.partial-*` directory, never a half one under the real name, and an existing
export is replaced only once the new one is whole.
"""

import json
import os
import secrets
import shutil

import torch

from data import read_json
from model import Model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")

# Qwen2Config fields that model.py's ModelConfig does not carry: defaults where the init checkpoint's config.json
# lacks them, and what our model implies whatever it says (no sliding window, plain RoPE)
_CONFIG_DEFAULTS = {"attention_dropout": 0.0, "use_cache": True, "sliding_window": None}
_CONFIG_FORCED = {"use_sliding_window": False, "rope_scaling": None}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", as HF writes it


def read_init_config(init_dir: str) -> dict:
    """The parsed config.json of the init checkpoint directory (one-line ValueError naming the file if bad)."""
    file = os.path.join(init_dir, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{file}: not found (init_dir must be a Hugging Face checkpoint directory)")
    config = read_json(file)
    if not isinstance(config, dict):
        raise ValueError(f"{file}: not a JSON object")
    return config


def hf_config(model_config, dtype: torch.dtype, init_config: dict | None = None) -> dict:
    """config.json for a model of `model_config` (model.ModelConfig) with weights in `dtype`: the init checkpoint's
    fields, with our architecture fields, RoPE and dtype written over them."""
    config = {k: v for k, v in (init_config or {}).items() if k != "transformers_version"}
    for key, value in _CONFIG_DEFAULTS.items():
        config.setdefault(key, value)
    config.setdefault("max_window_layers", model_config.num_hidden_layers)
    config.update({**_CONFIG_FORCED, **model_config.to_hf_dict()})
    # RoPE: transformers >= 5 reads rope_parameters, older versions rope_theta; both, consistent
    config["rope_parameters"] = {**(config.get("rope_parameters") or {}), "rope_type": "default",
                                 "rope_theta": model_config.rope_theta}
    if "layer_types" in config:  # transformers >= 5 derives it when absent; when present it must fit the depth
        config["layer_types"] = ["full_attention"] * model_config.num_hidden_layers
    config["dtype"] = config["torch_dtype"] = _dtype_name(dtype)  # transformers >= 5 reads dtype, older torch_dtype
    return dict(sorted(config.items()))


def hf_state_dict(model) -> dict:
    """{HF name: tensor} of the model's weights (no copies); a tied LM head left out."""
    with torch.device("meta"):
        expected = Model(model.config).state_dict()
    state = model.state_dict()
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        hint = "; merge LoRA adapters first (lora.merge_lora)" if any(".lora_" in k for k in odd) else ""
        raise ValueError(f"the model's parameters are not a plain Qwen2's: {odd[:3]}"
                         f"{'...' if len(odd) > 3 else ''}{hint}")
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # the embedding; transformers re-ties it from the config
    return state


def shard_names(sizes: dict, max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most max_shard_bytes in order (a tensor larger than that gets its own)."""
    shards, current, current_bytes = [], [], 0
    for name, size in sizes.items():
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    return shards + [current] if current else shards


def _write_weights(state: dict, out_dir: str, dtype: torch.dtype, max_shard_bytes: int):
    from safetensors.torch import save_file

    sizes = {name: t.numel() * dtype.itemsize for name, t in state.items()}
    shards = shard_names(sizes, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, names in zip(files, shards):  # one shard's host copies at a time
        tensors = {name: state[name].detach().to(device="cpu", dtype=dtype).contiguous() for name in names}
        save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in sorted(names)}}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def _replace_dir(new: str, out_dir: str):
    """Rename the complete directory `new` to out_dir, moving an existing out_dir aside until then."""
    if not os.path.lexists(out_dir):
        os.rename(new, out_dir)
        return
    old = f"{os.path.dirname(out_dir)}/.{os.path.basename(out_dir)}.old-{secrets.token_hex(4)}"
    os.rename(out_dir, old)
    os.rename(new, out_dir)
    shutil.rmtree(old)


def export_hf(model, out_dir: str, init_dir: str | None = None, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 2**30) -> str:
    """Write `model` (model.Model, no unmerged LoRA) as a HF checkpoint directory `out_dir` (replacing an existing
    one). init_dir: the checkpoint the run started from; its config.json fields and tokenizer files are kept.
    dtype: of the saved weights (default: the model's embedding's). Returns out_dir."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a directory")
    init_config = read_init_config(init_dir) if init_dir is not None else None
    if init_config is not None and init_config.get("vocab_size", model.config.vocab_size) != model.config.vocab_size:
        raise ValueError(f"{os.path.join(init_dir, 'config.json')}: vocab_size {init_config['vocab_size']} differs "
                         f"from the model's {model.config.vocab_size}; its tokenizer would not fit")
    state = hf_state_dict(model)
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    config = hf_config(model.config, dtype, init_config)

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = f"{os.path.dirname(out_dir)}/.{os.path.basename(out_dir)}.partial-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    try:
        _write_weights(state, tmp, dtype, max_shard_bytes)
        for name in TOKENIZER_FILES if init_dir is not None else ():
            if os.path.isfile(os.path.join(init_dir, name)):
                shutil.copyfile(os.path.join(init_dir, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "config.json"), "w") as f:  # last: a directory with a config looks complete
            json.dump(config, f, indent=2)
        _replace_dir(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out_dir
