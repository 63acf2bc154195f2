"""retrieval_train.py: the experiment driver end to end at toy scale (every mode writes its log and curve, plot
combines runs), a loss on the answer bytes alone, a deterministic held-out set, and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import retrieval_train as rt
from model import IGNORE_INDEX
from retrieval import make_qa_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 chunks of 64 bytes: every asked pair sits >= 64 bytes, a chunk or more, before the questions
TOY = ["--model", "tiny", "--distance", "64", "--pairs", "4", "--questions", "2", "--chunk", "64", "--page-size",
       "16", "--budget", "32", "--batch", "2", "--steps", "2", "--eval-every", "1", "--eval-examples", "2",
       "--device", "cpu"]


def test_qa_example_layout():
    ids, mask = make_qa_example(3, 400, 200, n_pairs=8, n_questions=4)
    text = ids.astype(np.uint8).tobytes()
    questions = text[-4 * 11:]
    assert len(ids) == len(mask) == 400 and mask.sum() == 16
    for q in range(4):
        question = questions[11 * q:11 * (q + 1)]
        assert question[:1] == b"?" and question[5:6] == b"=" and question[-1:] == b";"
        at = text.index(b"#" + question[1:6])  # the pair, once, at least `distance` before the first question
        assert text.count(b"#" + question[1:6]) == 1 and 400 - 44 - at >= 200
        assert text[at + 6:at + 10] == question[6:10]
        assert mask[400 - 44 + 11 * q:400 - 44 + 11 * (q + 1)].tolist() == [0] * 6 + [1] * 4 + [0]
    assert np.array_equal(make_qa_example(3, 400, 200, n_pairs=8, n_questions=4)[0], ids)
    with pytest.raises(ValueError, match="leaves room for"):
        make_qa_example(0, 400, 300, n_pairs=8, n_questions=4)


def test_qa_example_with_one_byte_keys_of_a_large_alphabet():
    """--key-symbols 128: keys are single non-ASCII bytes, found nowhere but in their pair and question."""
    ids, mask = make_qa_example(5, 600, 200, n_pairs=64, n_questions=16, key_len=1, value_len=1, key_symbols=128)
    text = ids.astype(np.uint8).tobytes()
    pairs = [text[i + 1] for i in range(len(text) - 4) if text[i:i + 1] == b"#"]
    assert len(pairs) == len(set(pairs)) == 64 and all(k >= 128 for k in pairs)
    questions = text[-16 * 5:]
    for q in range(16):
        key, answer = questions[5 * q + 1], questions[5 * q + 3:5 * q + 4]
        assert questions[5 * q:5 * q + 1] == b"?" and text.count(bytes([key])) == 2  # its pair and its question
        assert text[text.index(bytes([ord("#"), key, ord("=")])) + 3:][:1] == answer and answer.isupper()
    assert mask.sum() == 16 and (ids[mask.astype(bool)] < 128).all()
    # without the "=": "#kV;" pairs and "?kV;" questions, the loss on V right after its key
    ids, mask = make_qa_example(5, 600, 200, n_pairs=64, n_questions=16, key_len=1, value_len=1, key_symbols=128,
                                separator=False)
    text = ids.astype(np.uint8).tobytes()
    assert b"=" not in text and mask.sum() == 16
    for q in range(16):
        question = text[-16 * 4 + 4 * q:][:4]
        assert question[:1] == b"?" and question[3:4] == b";" and text.count(question[1:3]) == 2  # pair, question
        assert mask[600 - 16 * 4 + 4 * q:][:4].tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="key_symbols must lie in"):
        make_qa_example(0, 600, 200, key_len=1, key_symbols=129)


def test_qa_example_with_capital_keys():
    """--key-capitals: keys spelled in capitals (the values' alphabet), no "=": each pair "#" + 3-capital key + 4
    capitals + ";", each question the same after "?", the loss on the 4 value capitals."""
    ids, mask = make_qa_example(6, 600, 200, n_pairs=16, n_questions=8, key_len=3, value_len=4, key_symbols=26,
                                separator=False, key_capitals=True)
    text = ids.astype(np.uint8).tobytes()
    pairs = [text[i + 1:i + 8] for i in range(len(text) - 8) if text[i:i + 1] == b"#"]
    assert len(pairs) == 16 and len({p[:3] for p in pairs}) == 16 and all(p.isupper() for p in pairs)
    for q in range(8):
        question = text[600 - 8 * 9 + 9 * q:][:9]
        assert question[:1] == b"?" and question[8:9] == b";" and question[1:8] in pairs
        assert mask[600 - 8 * 9 + 9 * q:][:9].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"\[2, 26\] for capital keys"):
        make_qa_example(0, 600, 200, key_len=2, key_symbols=27, key_capitals=True)


def test_qa_example_with_values_like_keys():
    """--values-like-keys: keys and values both in 128 non-ASCII symbols (2-symbol keys, 4-symbol values); filler and
    punctuation stay ASCII, so every non-ASCII byte belongs to a key or a value."""
    ids, mask = make_qa_example(3, 600, 200, n_pairs=8, n_questions=4, key_len=2, value_len=4, key_symbols=128,
                                separator=False, values_like_keys=True)
    text = ids.astype(np.uint8).tobytes()
    pairs = [text[i + 1:i + 7] for i in range(len(text) - 7) if text[i:i + 1] == b"#"]
    assert len(pairs) == 8 and all(min(p) >= 128 for p in pairs) and (ids >= 128).sum() == 8 * 6 + 4 * 6
    answers = ids[mask.astype(bool)]
    assert len(answers) == 16 and (answers >= 128).all()
    args = rt.resolve(rt.parse(["train", "--out", "/nonexistent/x", "--key-symbols", "128", "--values-like-keys"]))
    assert rt.chance_per_byte(args) == 1 / 128


def test_loss_only_on_answer_bytes():
    """The targets of a batch: the next byte where it is an answer byte, IGNORE_INDEX (no loss) everywhere else."""
    args = type("Args", (), {"pairs": 4, "questions": 2, "key_len": 4, "value_len": 4, "key_symbols": 10,
                             "separator": True, "key_capitals": False,
                             "values_like_keys": False})
    examples = rt.examples_at((0, 0, 5), 2, 176, 64, args)
    ids, targets, n = rt.batch_tensors(examples, "cpu")
    mask = torch.as_tensor(np.stack([e[1] for e in examples])).bool()
    assert n == 2 * 2 * 4 and int((targets != IGNORE_INDEX).sum()) == n
    assert torch.equal(targets[:, :-1] != IGNORE_INDEX, mask[:, 1:]) and (targets[:, -1] == IGNORE_INDEX).all()
    assert torch.equal(targets[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
    answers = ids[:, 1:][mask[:, 1:]]
    assert ((answers >= ord("A")) & (answers <= ord("Z"))).all()


def test_heldout_set_is_fixed_and_apart_from_training():
    args = type("Args", (), {"pairs": 4, "questions": 2, "key_len": 4, "value_len": 4, "key_symbols": 10,
                             "separator": True, "key_capitals": False,
                             "values_like_keys": False})
    a = rt.examples_at((7, 1), 3, 176, 64, args)
    b = rt.examples_at((7, 1), 3, 176, 64, args)
    train = [e for step in range(3) for e in rt.examples_at((7, 0, step), 2, 176, 64, args)]
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert not any(np.array_equal(x[0], t[0]) for x in a for t in train)


def train_subprocess(out, mode, *extra):
    """The driver as a user runs it, on the plain-PyTorch CPU path (without the Triton interpreter that the tests'
    process runs the fused layer ops through)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "retrieval_train.py", "train", "--out", out, "--attn", mode, *TOY, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_ctrl_c_keeps_the_finished_steps_and_plots_them(tmp_path):
    """SIGINT mid-run (as Ctrl-C sends it): the run stops, log.jsonl keeps every finished step, curve.png is
    written, and the exit status is 130."""
    import signal
    import time
    out = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the run starts with SIGINT's default action, as a terminal's foreground job does: under a shell that ignores
    # SIGINT (a background job of a script), Python would keep ignoring it and the run would train on. -X
    # faulthandler: a run that does not stop prints every thread's stack at SIGABRT (below)
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "retrieval_train.py", "train", "--out", out,
                             "--attn", "dense", *TOY, "--steps", "100000", "--eval-every", "1000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = os.path.join(out, "log.jsonl")
    deadline = time.monotonic() + 120
    while not (os.path.exists(log) and open(log).read().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"no exit within 120 s of SIGINT; the run's stacks at SIGABRT:\n{stderr[-6000:]}\n{stdout}")
    assert proc.returncode == 130, stderr[-2000:]
    records = [json.loads(line) for line in open(log)]
    assert len(records) >= 2 and [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert f"interrupted after step {len(records)} of 100000" in stdout
    assert stdout.splitlines()[-1].startswith(f"interrupted: dense, {len(records)} steps")
    assert os.path.getsize(os.path.join(out, "curve.png")) > 0


@pytest.mark.parametrize("modes", [("sparse", "detached")])
def test_train_writes_log_and_curve_then_plot_combines(tmp_path, capsys, modes):
    """Two steps of each mode on a toy model (dense is these paths with neither twist), then one PNG of both. The
    detached run is on a held curriculum with --short-batch: step 1 at the start distance with more examples,
    evaluated there too."""
    runs = []
    for mode in modes:
        out = str(tmp_path / mode)
        curriculum = ("--curriculum", "32", "--curriculum-hold", "0.7", "--hold-until", "0", "--short-batch",
                      "4", "--eval-every", "1", "--steps", "3") * (mode == "detached")
        steps = 3 if curriculum else 2
        assert train_subprocess(out, mode, *curriculum).splitlines()[-1].startswith(f"done: {mode}, {steps} steps, "
                                                                                     f"distance 64")
        records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert all(0 <= r["token_accuracy"] <= 1 and 0 <= r["exact_match"] <= 1 for r in records)
        # the per-answer-byte accuracies average to the per-byte one (every answer has --value-len bytes)
        assert all(r["token_accuracy"] == pytest.approx(np.mean(r["byte_accuracy"])) for r in records)
        assert all(np.isfinite(r["loss"]) for r in records)
        if curriculum:
            # the planned hold is 2.1 steps; --hold-until 0 ends it at the first evaluation (after step 1), so the
            # third step is past the growth (0.3 steps long): the full distance
            assert [(r["distance"], r["batch"]) for r in records] == [(32, 4), (32, 4), (64, 2)]
            assert records[0]["hold_ended_at"] == 1 and not any("hold_ended_at" in r for r in records[1:])
            assert all(0 <= r["exact_match_at_start"] <= 1 for r in records)
        else:
            assert all(r["length"] == 176 and r["distance"] == 64 and r["batch"] == 2 for r in records)
        assert json.load(open(os.path.join(out, "config.json")))["attn"] == mode
        assert os.path.getsize(os.path.join(out, "curve.png")) > 0
        runs.append(out)
    png = str(tmp_path / "all.png")
    assert rt.main(["plot", "--out", png, *runs]) == 0
    table = capsys.readouterr().out.splitlines()
    assert os.path.getsize(png) > 0 and len(table) == 2 + len(modes) and table[-1] == f"wrote {png}"
    assert [row.split()[1] for row in table[1:-1]] == list(modes)
    assert rt.main(["plot", "--out", png, str(tmp_path)]) == 2  # not a run directory
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: not a run of retrieval_train.py")


def test_curriculum_grows_the_distance():
    args = rt.resolve(rt.parse(["train", "--out", "/nonexistent/x", "--distance", "32768", "--curriculum", "4096",
                                "--steps", "100", "--curriculum-frac", "0.5"]))
    distances = [rt.distance_at(step, args) for step in range(100)]
    assert distances[0] == 4096 and distances[50:] == [32768] * 50
    assert all(a <= b for a, b in zip(distances, distances[1:])) and all(d % 64 == 0 for d in distances)
    args.curriculum_hold = 0.3  # 30 steps at D0, then the same growth compressed into steps 30..50
    held = [rt.distance_at(step, args) for step in range(100)]
    assert held[:31] == [4096] * 31 and 4096 < held[31] < held[49] < 32768 and held[50:] == [32768] * 50
    early = [rt.distance_at(step, args, hold_end=10) for step in range(100)]  # --hold-until met at step 10
    assert early[:11] == [4096] * 11 and early[11:31] == held[31:51] and early[30:] == [32768] * 70


@pytest.mark.parametrize("flags", [[], ["--no-separator"], ["--key-symbols", "128", "--values-like-keys"]])
def test_pair_len_is_the_generated_pairs_length(flags):
    """rt.pair_len (torch-free, for checking flags before any import of torch) repeats retrieval.make_qa_example's
    layout: every "#" ... ";" pair and "?" ... ";" question of a generated example is that long."""
    args = rt.resolve(rt.parse(["train", "--out", "/nonexistent/x", "--distance", "256", "--pairs", "6",
                                "--questions", "3", "--key-len", "2", "--value-len", "3", *flags]))
    ids, _ = rt.examples_at((0,), 1, args.length, args.distance, args)[0]
    starts = [i for i, t in enumerate(ids.tolist()) if t in (ord("#"), ord("?"))]
    ends = [i for i, t in enumerate(ids.tolist()) if t == ord(";")]
    assert len(starts) == len(ends) == 6 + 3
    assert all(e - s + 1 == rt.pair_len(args) for s, e in zip(starts, ends))


def test_short_batch_keeps_the_tokens_per_step_while_examples_grow():
    args = rt.resolve(rt.parse(["train", "--out", "/nonexistent/x", "--distance", "32768", "--curriculum", "512",
                                "--steps", "100", "--curriculum-frac", "0.5", "--batch", "4", "--short-batch", "64",
                                "--key-len", "1", "--value-len", "1", "--pairs", "8", "--questions", "8"]))
    assert rt.pair_len(args) == 5  # "#" 1 digit "=" 1 capital ";"
    batches = [rt.batch_at(step, args) for step in range(100)]
    lengths = [args.length - args.distance + rt.distance_at(step, args) for step in range(100)]
    assert batches[0] == 64 and batches[50:] == [4] * 50 and all(a >= b for a, b in zip(batches, batches[1:]))
    for b, t in zip(batches, lengths):  # powers of two; no more tokens than at D0 unless held at --batch
        assert b & (b - 1) == 0 and (b * t <= 64 * lengths[0] or b == 4) and (2 * b * t > 64 * lengths[0] or b == 64)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "error: --steps must be > 0"),
    (["--attn", "local"], "error: argument --attn: invalid choice"),
    (["--distance", "4096", "--length", "4100"], "error: --length 4100 at --distance 4096 leaves room for"),
    (["--curriculum-hold", "0.9"], "error: --curriculum-hold 0.9 must lie in [0, --curriculum-frac 0.8)"),
    (["--hold-until", "0.9"], "error: --hold-until 0.9 must lie in [0, 1] and needs --curriculum and"),
    (["--short-batch", "16"], "error: --short-batch 16 needs --curriculum and must be >= --batch 8"),
    (["--value-len", "0"], "error: --value-len must be > 0"),
    (["--key-symbols", "300"], "error: --key-symbols 300 must lie in [2, 128]"),
    (["--key-symbols", "30", "--key-capitals"], "error: --key-symbols 30 must be <= 26 with --key-capitals"),
    (["--chunk", "100"], "error: --page-size 64 must be a power of two >= 16 dividing --chunk 100"),
    (["--key-len", "1", "--pairs", "64"], "error: --key-len 1 must lie in [1, 8] and allow --pairs 64 distinct keys"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, argv, message):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "retrieval_train.py", "train", "--out", str(out), *argv], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (out / "log.jsonl").exists()


def test_an_earlier_run_is_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("earlier\n")
    proc = subprocess.run([sys.executable, "retrieval_train.py", "train", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out") and proc.stderr.count("\n") == 1
    assert (out / "log.jsonl").read_text() == "earlier\n"
