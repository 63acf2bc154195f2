"""train.py's command line as a user meets it: every bad input is one `error:` line and exit status 2, with an
existing run left byte-identical; a finished run resumed says so; --plan gives a verdict; --help shows the defaults
without importing torch."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cli
import train
from data import write_tokens
from lora import LORA_TARGETS
from model import PRESETS
from sparse_attn import RULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--device", "cpu", "--model", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--eval-iters", "1"]


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Inputs shared by every case, made once: a tiny finished run (2 steps, the real train.py), data files, bad
    checkpoints. -> {name: path}."""
    root = tmp_path_factory.mktemp("cli")
    paths = {name: str(root / name) for name in ("run", "text", "file", "garbage", "nokeys", "short")}
    with open(paths["text"], "wb") as f:
        f.write(bytes(range(256)) * 20)  # 5120 byte tokens
    with open(paths["file"], "w") as f:
        f.write("not a directory")
    with open(paths["short"], "wb") as f:
        f.write(b"abc")
    assert train.main(RUN + ["--data", paths["text"], "--out", paths["run"]]) == 0
    os.makedirs(paths["garbage"])
    with open(os.path.join(paths["garbage"], "ckpt.pt"), "wb") as f:
        f.write(b"garbage")
    os.makedirs(paths["nokeys"])
    torch.save({"weights": torch.zeros(2)}, os.path.join(paths["nokeys"], "ckpt.pt"))
    ids = np.arange(1000) % 300
    for name, vocab in (("vocab300", 300), ("badid", 200)):
        paths[name] = str(root / f"{name}.bin")
        ids.astype(np.uint16).tofile(paths[name])
        with open(paths[name] + ".json", "w") as f:
            json.dump({"dtype": "uint16", "vocab_size": vocab}, f)
    paths["empty"] = str(root / "empty.bin")
    write_tokens(paths["empty"], [], 256)
    paths["sidecar"] = str(root / "sidecar.bin")
    write_tokens(paths["sidecar"], np.arange(100), 256)
    with open(paths["sidecar"], "ab") as f:
        f.write(b"\x00\x00")  # a token more than the sidecar records
    paths["nosidecar"] = str(root / "nosidecar.bin")
    np.arange(100, dtype=np.uint16).tofile(paths["nosidecar"])
    return paths


def snapshot(root):
    """Every file under root and its bytes."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return found


CHUNKED = ["--seq", "512", "--chunk", "256"]
# (arguments after a valid base command line; a piece of the expected message). {name} is a path of `files`,
# {out} a fresh directory. Most fail before torch is imported; the last few need the model or a checkpoint.
CASES = [
    (["--batch", "0"], "--batch must be > 0"),
    (["--seq", "-5"], "--seq must be > 0"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--eval-interval", "0"], "--eval-interval must be > 0"),
    (["--eval-iters", "-1"], "--eval-iters must be >= 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--min-lr", "1"], "must not exceed --lr"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["--host-memory", "0"], "--host-memory must be > 0"),
    (["--warmup", "5"], "--warmup 5 exceeds --steps 2"),
    (["--seq", "abc"], "invalid int value"),
    (["--model", "qwen9"], "invalid choice: 'qwen9'"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--resume", "--overwrite"], "give one of them"),
    (CHUNKED + ["--page-size", "8"], "--page-size must be a power of two >= 16"),
    (CHUNKED + ["--page-size", "7"], "--page-size must be a power of two >= 16"),
    (["--seq", "512", "--chunk", "100", "--page-size", "16"], "--chunk 100 must be a multiple of --page-size"),
    (["--page-size", "7"], "--page-size 7 is not used"),
    (["--q-block", "3"], "--q-block 3 is not used"),
    (["--cache-tokens", "4096"], "--cache-tokens 4096 is not used"),
    (["--keep-activations", "1"], "--keep-activations 1 is not used"),
    (CHUNKED + ["--keep-activations", "-1"], "--keep-activations must be >= 0"),
    (["--offload", "on"], "--offload on works on the chunked path only"),
    (["--attn", "sparse"], "--attn sparse works on the chunked path only"),
    (CHUNKED + ["--attn", "dense", "--budget", "256"], "--budget 256 is not used"),
    (CHUNKED + ["--q-block", "64"], "--q-block 64 is not used"),
    (CHUNKED + ["--offload", "off", "--cache-tokens", "256"], "--cache-tokens 256 is not used"),
    (CHUNKED + ["--cache-tokens", "128"], "--cache-tokens 128 must be >= --chunk 256"),
    (CHUNKED + ["--attn", "sparse", "--budget", "100"], "--budget 100 must be a multiple of --page-size"),
    (CHUNKED + ["--attn", "sparse", "--budget", "128", "--q-block", "24"], "--q-block must be a power of two"),
    (["--init-from", "{file}"], "is not a directory"),
    (["--out", "{file}"], "is a file, not a directory"),
    (["--out", "{file}/sub"], "cannot be created or written"),
    (["--out", "{run}"], "already holds a run (ckpt.pt, log.jsonl)"),
    (["--out", "{out}", "--resume"], "--resume: no checkpoint at"),
    (["--data", "{out}/missing.txt"], "does not exist"),
    (["--data", "{short}"], "too few for a training and a validation window"),
    (["--data", "{empty}"], "empty.bin is empty"),
    (["--data", "{badid}"], "badid.bin: token id 299 is >= the vocab_size 200"),
    (["--data", "{sidecar}"], "records 100 uint16 tokens"),
    (["--data", "{nosidecar}"], "has no sidecar"),
    (["--seq", "5000"], "--seq 5000 is longer than the training split"),
    (["--export", "{out}"], "--export: no checkpoint at"),
    (["--lora-alpha", "8"], "--lora-alpha 8.0 is not used: LoRA is off"),
    (["--lora-rank", "0"], "--lora-rank must be > 0"),
    (["--moments", "int8"], "--moments int8 is not used: --params-dtype float32"),
    (["--params-dtype", "bfloat16"], "needs --dtype bfloat16 (compute), got --dtype float32"),
    (["--params-dtype", "bfloat16", "--dtype", "bfloat16", "--optimizer", "adafactor"], "not --optimizer adafactor"),
    (["--out", "{run}", "--resume", "--params-dtype", "bfloat16", "--dtype", "bfloat16"], "was trained with float32"),
    (["--lora-rank", "4", "--lora-targets", "q_proj,lm_head"], "--lora-targets 'q_proj,lm_head' must be distinct"),
    (["--lora-rank", "4", "--lora-targets", "q_proj,q_proj"], "must be distinct names"),
    (["--export", "{run}", "--resume"], "--resume does not apply"),
]
# after torch: checkpoints, the model's vocabulary, the memory plan. The checks above ran in a fresh `python
# train.py` each, as a user runs it (most answer before torch is imported); these are called in-process through
# train.main (the same prepare and run, minus the seconds of a fresh torch import per case).
AFTER_TORCH = [
    (["--out", "{garbage}", "--resume"], "garbage/ckpt.pt is not a checkpoint of train.py"),
    (["--out", "{nokeys}", "--resume"], "nokeys/ckpt.pt is not a checkpoint of train.py (no model, optimizer"),
    (["--out", "{run}", "--resume", "--optimizer", "adafactor"], "was trained with adamw"),
    (["--out", "{run}", "--resume", "--lora-rank", "4"], "but its checkpoint was trained with no LoRA"),
    (["--out", "{run}", "--resume", "--model", "small"], "holds a different model (2 layers, hidden 64)"),
    (["--data", "{vocab300}"], "has vocab_size 300, the model only 256"),
    (["--init-from", "{run}"], "--model and --init-from both choose the model"),
    (["--batch", "100000000"], "fits at --batch 100000000"),  # ~30 TB of activations
]


@pytest.mark.parametrize("extra, message", CASES + AFTER_TORCH,
                         ids=[" ".join(argv) for argv, _ in CASES + AFTER_TORCH])
def test_bad_input_is_one_error_line_and_leaves_runs_untouched(files, tmp_path, capsys, extra, message):
    paths = {**files, "out": str(tmp_path / "out")}
    in_process = (extra, message) in AFTER_TORCH
    extra = [arg.format(**paths) for arg in extra]
    argv = RUN + ["--data", files["text"], "--out", paths["out"]] + extra  # the last of a repeated option counts
    before = {name: snapshot(files[name]) for name in ("run", "garbage", "nokeys")}
    if in_process:
        capsys.readouterr()
        code = train.main(argv)
        out, err = capsys.readouterr()
    else:
        proc = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    err = err.strip()
    assert code == 2, (code, err, out)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert {name: snapshot(files[name]) for name in before} == before  # byte-identical


def test_resume_of_a_finished_run_says_so(files, tmp_path, capsys):
    """At or beyond --steps, --resume prints one clear line and exits 0: no nan figures, nothing written."""
    before = snapshot(files["run"])
    for steps in ("2", "1"):
        argv = RUN + ["--data", files["text"], "--out", files["run"], "--resume", "--steps", steps]
        assert train.main(argv) == 0
        out = capsys.readouterr().out
        assert "is at step 2" in out and "the run is finished" in out and "nan" not in out.lower(), out
    assert snapshot(files["run"]) == before


def logged_steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_overwrite_starts_afresh_and_the_start_line_names_the_settings(files, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(files["run"], out)
    assert train.main(RUN + ["--data", files["text"], "--out", out, "--overwrite", "--steps", "1"]) == 0
    assert logged_steps(out) == [1]  # the old run's records are gone
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 1
    start = capsys.readouterr().out.split("train:")[0]
    for setting in ("model: tiny", "seq 32 x batch 2", "full-sequence", "float32 compute", "on cpu",
                    "planned on the cpu", "adamw, lr 0.001 (a small model from scratch) -> 0.0001 (warm-up 1, cosine to step 1)",
                    "weight decay 0.1", "grad clip 1", "seed 1337", f"out: {out}", "eval every 1 steps x 1 batches"):
        assert setting in start, (setting, start)
    assert "gpu" not in start.lower(), start


def test_default_lr_follows_what_is_trained_and_resume_keeps_the_checkpoints(files, tmp_path):
    """The default peak lr depends on what trains (a random 7B model diverges at 1e-3); a resumed run keeps the
    checkpoint's lr and min-lr unless given, so its schedule continues the one it was started with."""
    import argparse

    def lr(**given):
        return cli.default_lr(argparse.Namespace(**{"lora_rank": None, "init_from": None, "model": None, **given}))[0]
    assert (lr(model="tiny"), lr(model="qwen2.5-7b"), lr(init_from="dir"), lr(init_from="dir", lora_rank=8)) == \
        (1e-3, 3e-4, 2e-5, 2e-4)
    out = str(tmp_path / "run")
    assert train.main(RUN + ["--data", files["text"], "--out", out, "--lr", "4e-3"]) == 0
    assert train.main(RUN + ["--data", files["text"], "--out", out, "--resume", "--steps", "3"]) == 0
    with open(os.path.join(out, "log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    # cosine from 4e-3 to 4e-4 over steps 1..2 after one warm-up step: halfway at step index 2
    assert last["step"] == 3 and last["lr"] == pytest.approx(4e-4 + 0.5 * 3.6e-3)


def test_resume_with_other_data_says_the_batches_differ(files, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(files["run"], out)  # trained on files["text"]
    other = str(tmp_path / "other.txt")
    with open(other, "wb") as f:
        f.write(bytes(range(256)) * 16)
    assert train.main(RUN + ["--data", other, "--out", out, "--resume", "--steps", "3"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --data")]
    assert len(notes) == 1 and "differ from an uninterrupted run" in notes[0], notes


def test_resume_drops_log_records_after_the_checkpoint(files, tmp_path):
    """A run that died between two saves logged steps its checkpoint lacks: resumed, each step is logged once."""
    out = str(tmp_path / "run")
    shutil.copytree(files["run"], out)  # its checkpoint is at step 2
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "loss": 5.0}) + "\n" + '{"step": 4, "lo')  # and a line cut short
    assert train.main(RUN + ["--data", files["text"], "--out", out, "--resume", "--steps", "3"]) == 0
    assert logged_steps(out) == [1, 2, 3]


def test_plan_prints_a_verdict(files, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--device", "cpu", "--model", "tiny", "--data", files["text"], "--plan", "--out", str(out)]
    assert train.main(base + ["--seq", "1024", "--chunk", "256", "--batch", "1"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("FITS") and "KV/dKV page pool [cpu]" in text and "[gpu]" not in text, text
    assert train.main(base + ["--seq", "64", "--batch", "100000000"]) == 0  # ~60 TB of activations
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert any(line.startswith("REFUSED: --seq 64 x --batch 100000000 needs") for line in lines), text
    assert lines[lines.index("what would fit (each re-planned):") + 1].startswith("  --batch "), text  # FITS first
    assert "FITS" in lines[lines.index("what would fit (each re-planned):") + 1], text
    assert not out.exists()  # --plan writes nothing


def test_help_shows_every_default_without_importing_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "train.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert not {"torch", "triton", "numpy"} & imported
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for default in ("(default: 4096)", "(default: 64)", "(default: 1e-3 for the tiny and small presets", "(default: 65536)", "(default: 1337)",
                    "(default: out)", "(default: 0.1)", "(default: 1.0)", "(default: lr / 10)", "(default: adamw)",
                    "(default: steps / 10)", "(default: auto)", "(default: eval)"):
        assert default in text, default


def test_presets_and_rules_listed_by_the_cli_are_the_real_ones():
    assert cli.MODEL_PRESETS == tuple(PRESETS)
    assert cli.SELECTION_RULES == tuple(RULES)
    assert cli.LORA_TARGETS == LORA_TARGETS
