"""train.py end to end on the CPU: falling loss, exact resume, Ctrl-C, and one clear line for each bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--device", "cpu", "--seq", "64", "--batch", "4", "--eval-iters", "2"]


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_smoke_loss_decreases(tmp_path):
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--steps", "60", "--lr", "3e-3", "--out", out]) == 0
    curve = losses(out)
    assert len(curve) == 60
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 0.5, curve  # bytes start at ln(256) = 5.5
    assert os.path.isfile(os.path.join(out, "ckpt.pt")) and not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, monkeypatch, optimizer):
    args = TINY + ["--steps", "8", "--eval-interval", "3", "--optimizer", optimizer]
    full = str(tmp_path / "full")
    assert train.main(args + ["--out", full]) == 0

    class StopAfterFive(train.StopRequest):  # as if Ctrl-C came during step 5
        reads = 0

        @property
        def requested(self):
            StopAfterFive.reads += 1
            return StopAfterFive.reads >= 5

        @requested.setter
        def requested(self, value):
            pass

    part = str(tmp_path / "part")
    monkeypatch.setattr(train, "StopRequest", StopAfterFive)
    assert train.main(args + ["--out", part]) == 130
    monkeypatch.undo()
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


def test_bad_input_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "missing.txt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr, proc.stderr


def run_error(capsys, argv):
    """In-process main(): returns (exit code, stderr); argparse errors exit via SystemExit."""
    try:
        code = train.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return code, err


def test_bad_inputs(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    code, err = run_error(capsys, TINY + out + ["--seq", "0"])
    assert code == 2 and "--seq must be > 0" in err
    code, err = run_error(capsys, ["--model", "qwen9"] + out)
    assert code == 2 and "invalid choice: 'qwen9'" in err
    code, err = run_error(capsys, TINY + out + ["--resume"])
    assert code == 2 and "no checkpoint" in err
    os.makedirs(tmp_path / "o", exist_ok=True)
    (tmp_path / "o" / "ckpt.pt").write_bytes(b"garbage")
    code, err = run_error(capsys, TINY + out + ["--resume"])
    assert code == 2 and "cannot read" in err
    bin_path = tmp_path / "t.bin"
    bin_path.write_bytes(b"\x00\x01" * 100)
    code, err = run_error(capsys, TINY + out + ["--data", str(bin_path)])
    assert code == 2 and "sidecar" in err
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 1000)
    code, err = run_error(capsys, TINY + out + ["--data", str(big), "--seq", "5000"])
    assert code == 2 and "longer than the training split" in err
    code, err = run_error(capsys, TINY[:-4] + out + ["--seq", "20000000", "--batch", "64", "--steps", "1"])
    assert code == 2 and "the longest --seq that fits" in err
    if not torch.cuda.is_available():
        code, err = run_error(capsys, ["--device", "cuda"] + out)
        assert code == 2 and "CUDA is not available" in err


def test_plan_prints_the_parts_and_allocates_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert train.main(TINY + ["--seq", "4096", "--chunk", "1024", "--plan", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for part in ("weights (fp32)", "gradients (fp32)", "optimizer (adamw)", "activations (one 1024-token chunk)",
                 "KV/dKV page pool", "total"):
        assert part in text, text
    assert not out.exists()  # nothing written, nothing trained


def test_plan_matches_the_pool_and_parameter_sizes():
    """The exactly known parts of the plan: parameter bytes and the KV/dKV pool (bf16 K/V + fp32 dK/dV)."""
    args = train.resolve_defaults(train.parse_args(["--model", "qwen2.5-7b", "--device", "cpu", "--seq", "1000000",
                                                    "--dtype", "bfloat16", "--optimizer", "adafactor"]))
    cfg = train.preset("qwen2.5-7b")
    # sparse attention (the default at 1M tokens) adds page summaries (bf16, per page and kv head) and, per layer,
    # chunk, kv head and 128-query block, the stored selection (64 int32 pages) and page table (64 + 64 int32)
    assert args.sparse
    plan, per_token = train.memory_plan(cfg, args)
    summaries = 28 * math.ceil(1_000_000 / 64) * 4 * 128 * 2
    blocks = 28 * math.ceil(1_000_000 / 4096) * 4 * (4096 // 128)
    selections, tables = blocks * 4 * 64, blocks * 4 * (64 + 4096 // 64)
    assert plan["gpu"]["sparse index (page summaries, selections)"] == summaries + selections + tables
    # offloaded, the GPU keeps the summaries (selection reads them), the host the selections (only indices move)
    plan, _ = train.memory_plan(cfg, args, offload=True)
    assert plan["gpu"]["sparse index (page summaries)"] == summaries
    assert plan["host"]["sparse index (selections)"] == selections
    args.select = "quest"  # --select quest: per-channel key (min, max) summaries, twice the mean key's
    assert train.memory_plan(cfg, args, offload=True)[0]["gpu"]["sparse index (page summaries)"] == 2 * summaries
    args.sparse = False
    plan, per_token = train.memory_plan(cfg, args)
    assert not any("sparse" in part for part in plan["gpu"])
    assert plan["gpu"]["weights (fp32)"] == 4 * 7_615_616_512
    assert per_token == {"gpu": 28 * 4 * 128 * 2 * (2 + 4), "host": 0} and per_token["gpu"] == 172_032  # 172 KB
    assert plan["gpu"]["KV/dKV page pool"] == 172_032 * 1_000_000
    # offloaded: the pages move to pinned host memory, the GPU keeps three 64K-token buffers whatever the length
    plan, per_token = train.memory_plan(cfg, args, offload=True)
    assert plan["host"] == {"KV/dKV pages (pinned)": 172_032 * 1_000_000} and per_token == {"gpu": 0, "host": 172_032}
    assert plan["gpu"]["KV/dKV page cache (3 x 65536 tokens)"] == 3 * 65536 * 4 * 128 * 2 * (2 + 4)
    args.grad_pages = "bfloat16"  # bf16 dK/dV pages: 115 KB per token
    assert train.memory_plan(cfg, args, offload=True)[1]["host"] == 28 * 4 * 128 * 2 * (2 + 2) == 114_688


def test_planner_offloads_only_when_the_pool_does_not_fit(monkeypatch):
    args = train.resolve_defaults(train.parse_args(["--model", "qwen2.5-0.5b", "--device", "cpu", "--seq", "262144",
                                                    "--dtype", "bfloat16", "--host-memory", "64", "--attn", "dense"]))
    cfg, device = train.preset("qwen2.5-0.5b"), torch.device("cpu")
    monkeypatch.setattr(train, "available_memory", lambda d: 40 * 2**30)  # a GPU with 40 GiB free
    assert train.plan_run(cfg, args, device)[2] is False  # 9 GiB of pages fit next to the model
    args.seq = 2**21  # 72 GiB of pages: offloaded, 64 GiB of host is not enough either
    plan, per_token, offload = train.plan_run(cfg, args, device)
    assert offload and sum(plan["host"].values()) == 36_864 * 2**21
    with pytest.raises(train.UserError, match="on the host.*longest --seq that fits is ~1677721"):
        train.check_fits(plan, per_token, args, device)
    args.offload = "off"
    with pytest.raises(train.UserError, match="on cpu.*longest --seq that fits is"):
        train.check_fits(*train.plan_run(cfg, args, device)[:2], args, device)
    args.offload, args.sparse = "auto", True  # sparse attention offloads alike; its selections go to the host too
    plan, per_token, offload = train.plan_run(cfg, args, device)
    assert offload and "sparse index (page summaries)" in plan["gpu"] and "sparse index (selections)" in plan["host"]
    assert args.q_block == args.chunk == 4096  # offloaded: one selection per chunk (fewer pages cross PCIe)
    with pytest.raises(train.UserError, match="on the host.*longest --seq that fits is"):
        train.check_fits(plan, per_token, args, device)


def test_mismatched_checkpoint_shapes(tmp_path, capsys):
    from test_model import make_hf_checkpoint

    make_hf_checkpoint(tmp_path / "hf", tied=True, shard=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    capsys.readouterr()  # drop save_pretrained's progress output
    code, err = run_error(capsys, ["--init-from", str(tmp_path / "hf"), "--device", "cpu", "--out", str(tmp_path)])
    assert code == 2 and "--init-from" in err and "shape" in err


def test_chunked_path_follows_the_full_sequence_path(tmp_path):
    """--seq > --chunk trains chunk-recurrently; its gradients are exact, so two steps give the same losses."""
    args = ["--model", "tiny", "--device", "cpu", "--seq", "96", "--batch", "1", "--steps", "2", "--eval-iters", "1"]
    assert train.main(args + ["--out", str(tmp_path / "full")]) == 0
    chunked = args + ["--chunk", "32", "--page-size", "16"]
    assert train.main(chunked + ["--out", str(tmp_path / "chunked")]) == 0
    assert train.main(chunked + ["--offload", "on", "--cache-tokens", "32", "--out", str(tmp_path / "offload")]) == 0
    for a, b, c in zip(losses(tmp_path / "full"), losses(tmp_path / "chunked"), losses(tmp_path / "offload")):
        assert abs(a - b) <= 1e-5 * a and abs(a - c) <= 1e-5 * a
