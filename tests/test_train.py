"""train.py end to end on the CPU: falling loss, exact resume, Ctrl-C, the chunked path. (Bad input: test_cli.py;
the memory plan: test_plan.py.)"""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import checkpoint
import train
from interrupt import stop_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--device", "cpu", "--seq", "64", "--batch", "4", "--eval-iters", "2"]


_stdlib_corpus = functools.cache(data.stdlib_corpus)


@pytest.fixture(autouse=True)
def stdlib_corpus_once(monkeypatch):
    """The default corpus (every stdlib .py file, globbed and read: ~0.5 s CPU a run) read once for this module's
    ~20 in-process runs; test_data.py tests stdlib_corpus itself, test_ctrl_c_saves_and_exits_cleanly reads it anew."""
    monkeypatch.setattr(data, "stdlib_corpus", _stdlib_corpus)


@pytest.fixture
def plain_layer_ops(monkeypatch):
    """model.py's plain-PyTorch RMSNorm/SwiGLU/RoPE (what a CPU without the interpreter runs) instead of the fused
    Triton ops under the interpreter: the tests using it are about checkpoints, resume and the chunked paths, not
    the fused ops (tests/test_layer_ops.py, test_model.py and test_chunk_train.py test those, inside the model and
    the chunked step too; test_smoke_loss_decreases trains through them end to end)."""
    from kernels import layer_ops
    monkeypatch.setattr(layer_ops, "available", lambda t: False)


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_smoke_loss_decreases(tmp_path):
    """Through the fused layer ops (the interpreter here, as on a GPU). 20 steps fall by ~0.9 (10 vs 10 steps)."""
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--steps", "20", "--eval-interval", "10", "--lr", "3e-3", "--out", out]) == 0
    curve = losses(out)
    assert len(curve) == 20
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 0.5, curve  # bytes start at ln(256) = 5.5
    assert os.path.isfile(os.path.join(out, "ckpt.pt")) and not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


BF16_INT8 = ["--params-dtype", "bfloat16", "--dtype", "bfloat16", "--moments", "int8"]


@pytest.mark.parametrize("optimizer, extra", [("adamw", []), ("adafactor", []), ("adamw", ["--lora-rank", "4"]),
                                              ("adamw", BF16_INT8)],
                         ids=["adamw", "adafactor", "lora", "bf16-params-int8"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, monkeypatch, plain_layer_ops, optimizer, extra):
    args = TINY + ["--steps", "8", "--eval-interval", "3", "--optimizer", optimizer] + extra
    full = str(tmp_path / "full")
    assert train.main(args + ["--out", full]) == 0

    StopAfterFive = stop_after(5)  # as if Ctrl-C came during step 5

    part = str(tmp_path / "part")
    with monkeypatch.context() as m:
        m.setattr(train, "StopRequest", StopAfterFive)
        assert train.main(args + ["--out", part]) == 130
    assert torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["step"] == 5
    assert train.main(args + ["--out", part, "--resume"]) == 0
    assert losses(part) == losses(full)  # bit-identical on the CPU


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--steps", "100000", "--out", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "checkpoint saved" in stdout
    step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert step == len(losses(out)) >= 3


def test_mismatched_checkpoint_shapes(tmp_path, capsys):
    from test_model import make_hf_checkpoint

    make_hf_checkpoint(tmp_path / "hf", tied=True, shard=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    capsys.readouterr()  # drop save_pretrained's progress output
    code = train.main(["--init-from", str(tmp_path / "hf"), "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--init-from" in err and "shape" in err, err


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4", "--lora-targets", "q_proj,down_proj"]],
                         ids=["full", "lora"])
def test_chunked_path_follows_the_full_sequence_path(tmp_path, plain_layer_ops, extra, capsys):
    """--seq > --chunk trains chunk-recurrently; its gradients are exact, so two steps give the same losses: pages
    on the device or offloaded, through --attn-kernel sdpa (kernels/gather_sdpa.py, the CPU flash op here), and
    with stage 1's forwards kept (--keep-activations auto, the default: with RAM to spare, 2 of the 3 chunks before
    the last)."""
    args = ["--model", "tiny", "--device", "cpu", "--seq", "96", "--batch", "1", "--steps", "2", "--eval-iters", "1",
            "--eval-interval", "2"]  # one evaluation, at the end
    args += extra
    assert train.main(args + ["--out", str(tmp_path / "full")]) == 0
    chunked = args + ["--chunk", "32", "--page-size", "16"]
    assert train.main(chunked + ["--keep-activations", "0", "--out", str(tmp_path / "chunked")]) == 0
    assert train.main(chunked + ["--offload", "on", "--cache-tokens", "32", "--out", str(tmp_path / "offload")]) == 0
    assert train.main(chunked + ["--attn-kernel", "sdpa", "--keep-activations", "0", "--out",
                                 str(tmp_path / "sdpa")]) == 0
    capsys.readouterr()
    assert train.main(chunked + ["--out", str(tmp_path / "kept")]) == 0
    assert "--keep-activations 2 (auto: the output cache first, then half of what is left)" in capsys.readouterr().out
    runs = [losses(tmp_path / name) for name in ("full", "chunked", "offload", "sdpa", "kept")]
    assert all(len(run) == 2 for run in runs)
    for a, *others in zip(*runs):
        assert all(abs(a - b) <= 1e-5 * a for b in others), (a, others)


def assert_export_matches(out, tmp_path):
    """OUT/hf loads in transformers with the logits of OUT/ckpt.pt's model (fp32, 1e-4)."""
    transformers = pytest.importorskip("transformers")
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
    model = train.Model(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf"), dtype=torch.float32).eval()
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model.eval()(idx) - hf(idx).logits).abs().max().item()
    assert err <= 1e-4, err


def test_export_at_the_end_and_from_a_checkpoint(tmp_path):
    """--export writes OUT/hf (with the --init-from tokenizer); `--export OUT` alone rewrites it from OUT/ckpt.pt."""
    from test_model import make_hf_checkpoint
    from tiny_tokenizer import make_tokenizer_dir

    init = tmp_path / "init"
    make_hf_checkpoint(init, tied=False, shard=False)
    make_tokenizer_dir(init)  # its config.json (the checkpoint's) stays
    out, text = str(tmp_path / "run"), tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 20)  # tokenized with the checkpoint's tokenizer
    args = ["--init-from", str(init), "--data", str(text), "--device", "cpu", "--seq", "32", "--batch", "2",
            "--steps", "2", "--eval-iters", "1", "--out", out]
    assert train.main(args + ["--export"]) == 0
    assert os.path.isfile(os.path.join(out, "hf", "tokenizer.json"))
    assert_export_matches(out, tmp_path)
    os.remove(os.path.join(out, "hf", "config.json"))
    assert train.main(["--export", out]) == 0  # no training: the log keeps its two steps
    assert len(losses(out)) == 2 and os.path.isfile(os.path.join(out, "hf", "config.json"))
    assert_export_matches(out, tmp_path)


def test_lora_run_saves_peft_adapters_and_exports_the_merged_model(tmp_path):
    """--lora-rank: only the adapters change; OUT/lora loads through peft onto transformers' Qwen2ForCausalLM with
    our logits, and --export writes the merged model with the same logits (fp32, 1e-4). The run trains over a bf16
    copy of the base (as --params-dtype auto chooses for LoRA on a GPU): the export still merges into --init-from's
    own fp32 weights (merging into the bf16 copy was 5.6e-2 off on the H200's 0.5B check)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_model import make_hf_checkpoint

    import lora

    init = tmp_path / "init"
    make_hf_checkpoint(init, tied=True, shard=False)
    out = str(tmp_path / "run")
    assert train.main(["--init-from", str(init), "--device", "cpu", "--seq", "32", "--batch", "2", "--steps", "3",
                       "--eval-iters", "1", "--lr", "1e-2", "--lora-rank", "4", "--params-dtype", "bfloat16",
                       "--dtype", "bfloat16", "--out", out, "--export"]) == 0
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
    # over an --init-from base the checkpoint holds the adapters only: the base is frozen, reloaded from there
    assert ckpt["adapters_only"] and all(k.endswith(("lora_A", "lora_B")) for k in ckpt["model"])
    assert any(k.endswith("lora_B") and ckpt["model"][k].abs().max() > 0 for k in ckpt["model"])  # adapters trained
    ours = lora.apply_lora(train.Model.from_pretrained(str(init)), 4, 8.0)
    ours.load_state_dict(ckpt["model"], strict=False)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, os.path.join(out, "lora")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf"), dtype=torch.float32).eval()
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours.eval()(idx)
        assert (logits - hf(input_ids=idx).logits).abs().max().item() <= 1e-4
        assert (logits - merged(idx).logits).abs().max().item() <= 1e-4
    os.remove(os.path.join(out, "hf", "model.safetensors"))
    assert train.main(["--export", out]) == 0  # from the adapters-only checkpoint, over the --init-from base
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (logits - merged(idx).logits).abs().max().item() <= 1e-4


def test_bf16_params_default_to_the_most_precise_moments_that_fit(tmp_path, capsys):
    args = TINY + ["--params-dtype", "bfloat16", "--dtype", "bfloat16", "--plan", "--out", str(tmp_path / "o")]
    assert train.main(args) == 0
    text = capsys.readouterr().out
    assert "AdamW moments: fp32 (the plan fits)" in text and "weights (bf16)" in text, text
    assert "gradients (fp32 main_grad)" in text and "optimizer (adamw, fp32 moments, fp32 master)" in text, text
