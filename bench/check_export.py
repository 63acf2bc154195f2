"""
The GPU stage ft-0.5b-128k's two halves (bench/gpu_run.sh), in fp32 on the CPU-side of the check:

    python bench/check_export.py make DIR      a random Qwen2.5-0.5B-shaped HF checkpoint (transformers'
                                               Qwen2Config from model.py's preset, save_pretrained) + tokenizer files
    python bench/check_export.py compare OUT --init DIR
                                               OUT/hf (train.py --export) reloaded by transformers, and OUT/lora (if
                                               any) through peft onto DIR's Qwen2ForCausalLM: logits against ours
                                               (OUT/ckpt.pt's model) on a short input, max abs diff printed

Exit status 1 when a difference exceeds --tol.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import finetune  # noqa: E402
import checkpoint  # noqa: E402
from model import Model, preset  # noqa: E402


def make(path):
    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from tiny_tokenizer import make_tokenizer_dir

    cfg = preset("qwen2.5-0.5b")
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(hf_cfg).save_pretrained(path)
    make_tokenizer_dir(path)  # the checkpoint's own config.json stays
    print(f"wrote a random Qwen2.5-0.5B-shaped checkpoint to {path}")


def ours(out):
    """OUT/ckpt.pt's model in fp32 on the CPU (an adapters-only LoRA checkpoint over its --init-from base)."""
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
    if ckpt.get("adapters_only"):
        model = finetune.attach_lora(Model.from_pretrained(ckpt["args"]["init_from"]), ckpt["args"])
        finetune.load_adapters(model, ckpt["model"], "checkpoint")
    else:
        model = finetune.attach_lora(Model(ckpt["config"]), ckpt["args"])
        model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    return model.float().eval()


def compare(out, init, tol):
    import transformers

    idx = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(out)(idx)
        worst = 0.0
        hf_dir = os.path.join(out, "hf")
        if os.path.isdir(hf_dir):
            hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            diff = (hf(idx).logits - logits).abs().max().item()
            print(f"{hf_dir} (transformers) vs ours: max abs logit diff {diff:.3e}")
            worst = max(worst, diff)
        # the run must have moved the weights, else equal logits would not show the export carried the training
        init_logits = transformers.AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).eval()(idx).logits
        moved = (init_logits - logits).abs().max().item()
        print(f"ours vs the --init-from checkpoint: max abs logit diff {moved:.3e} (training moved the weights)")
        if moved == 0.0:
            print("the trained model equals its init: nothing was compared")
            return 1
        lora_dir = os.path.join(out, "lora")
        if os.path.isdir(lora_dir):
            import peft

            base = transformers.Qwen2ForCausalLM.from_pretrained(init, dtype=torch.float32)
            hf = peft.PeftModel.from_pretrained(base, lora_dir).eval()
            diff = (hf(input_ids=idx).logits - logits).abs().max().item()
            print(f"{lora_dir} (peft on transformers) vs ours: max abs logit diff {diff:.3e}")
            worst = max(worst, diff)
    print(f"worst {worst:.3e}, tolerance {tol:g}: {'OK' if worst <= tol else 'FAILED'}")
    return 0 if worst <= tol else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make").add_argument("dir")
    c = sub.add_parser("compare")
    c.add_argument("out")
    c.add_argument("--init", required=True)
    c.add_argument("--tol", type=float, default=1e-3)
    args = p.parse_args()
    if args.cmd == "make":
        make(args.dir)
        return 0
    return compare(args.out, args.init, args.tol)


if __name__ == "__main__":
    sys.exit(main())
