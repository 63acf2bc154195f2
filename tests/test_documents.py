"""Documents, loss masks and evaluation through train.py's data path: tokenized text, directories and JSONL; packed
batches and prompt masks against a per-document fp32 reference (loss and gradient, full and chunked path); the loss
by position; the plots; every bad-data case as one `error:` line and exit status 2."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import train
from data import TokenData
from evaluation import evaluate, position_edges, token_losses
from model import Model, ModelConfig
from tiny_tokenizer import make_tokenizer_dir

WORDS = ["the", "quick", "brown", "fox", "long", "context", "keys", "values", "x", "123", "café"]
CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


@pytest.fixture(autouse=True)
def plain_layer_ops(monkeypatch):
    """model.py's plain-PyTorch RMSNorm/SwiGLU/RoPE rather than the Triton interpreter: these tests are about the
    data, masks and evaluation (the fused ops have their own tests), and the interpreter would make them slow."""
    from kernels import layer_ops
    monkeypatch.setattr(layer_ops, "available", lambda t: False)


def text(rng, n):
    return " ".join(str(w) for w in rng.choice(WORDS, size=n)) + ".\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer checkpoint (vocab 300, eos after each document), a JSONL of prompt/completion records of random
    lengths and a directory of text documents. -> SimpleNamespace of paths and the tokenizer."""
    root = tmp_path_factory.mktemp("documents")
    tok = make_tokenizer_dir(str(root / "tok"))
    rng = np.random.default_rng(0)
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": text(rng, int(rng.integers(1, 12))),
                                       "completion": text(rng, int(rng.integers(1, 8)))}) + "\n" for _ in range(80)))
    docs = root / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i:02d}.txt").write_text(text(rng, int(rng.integers(5, 60))))
    return SimpleNamespace(root=root, tok=str(root / "tok"), tokenizer=tok, sft=str(sft), docs=str(docs))


def prepared(argv):
    return cli.prepare(["--device", "cpu", "--plan"] + argv)


def test_text_is_tokenized_with_the_checkpoints_tokenizer(corpus, capsys):
    """--data DIR with an --init-from tokenizer: the batches decode to the documents' text, eos after each one,
    and the cache is written next to the data (a second run reuses it)."""
    args, data = prepared(["--init-from", corpus.tok, "--data", corpus.docs, "--seq", "24", "--batch", "3"])
    assert data.vocab_size == 300 and os.path.isfile(corpus.docs + ".tokens.bin")
    whole = "".join(open(os.path.join(corpus.docs, n)).read() + "<|endoftext|>" for n in sorted(os.listdir(
        corpus.docs)))
    b = data.batch("train", 3, 24, seed=[1, 0, 0])
    for row in b.x.tolist():
        assert corpus.tokenizer.decode(row, skip_special_tokens=False) in whole
    assert data.splits["train"].n_docs >= 11 and b.doc_start is not None  # the 10% tail cuts the last ones
    mtime = os.path.getmtime(corpus.docs + ".tokens.bin")
    prepared(["--init-from", corpus.tok, "--data", corpus.docs, "--seq", "24"])
    assert os.path.getmtime(corpus.docs + ".tokens.bin") == mtime


def reference_loss(model, batch):
    """Per document, fp32 and plain: each document of each row through model.forward alone (positions from 0,
    causal), the cross-entropy of its trained targets, the mean over every trained target of the batch."""
    total, count = 0.0, 0
    for row in range(batch.x.shape[0]):
        starts = sorted(set(batch.doc_start[row].tolist())) if batch.doc_start is not None else [0]
        for a, b in zip(starts, starts[1:] + [batch.x.shape[1]]):
            logits = model(batch.x[row:row + 1, a:b])[0]
            y = batch.y[row, a:b]
            keep = y != -100
            total = total + F.cross_entropy(logits[keep], y[keep], reduction="sum")
            count += int(keep.sum())
    return total / count


def run_args(**kw):
    base = dict(chunk=4096, page_size=64, dtype="float32", params_dtype="float32", seq=64, batch=3, seed=0,
                eval_iters=2, keep_activations=0)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("chunk", [4096, 32], ids=["full", "chunked"])
def test_packed_prompt_masked_step_equals_a_per_document_reference(corpus, chunk):
    """train_step on a packed batch of prompt/completion records: attention and positions restart at each document,
    prompt tokens and document ends carry no loss, the mean is over the trained tokens; loss and gradients equal
    the per-document fp32 reference (rel 1e-5 / 1e-4)."""
    data = TokenData(corpus.sft, tokenizer_dir=corpus.tok)
    batch = data.batch("train", 3, 64, seed=[7, 0, 0])
    assert batch.doc_start is not None and (batch.doc_start[:, -1] > 0).all()  # several documents per row
    assert 0 < int((batch.y == -100).sum()) < batch.y.numel()  # masked targets and trained ones
    torch.manual_seed(0)
    model = Model(CFG)
    ref = reference_loss(model, batch)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    args = run_args(chunk=chunk, page_size=16)
    loss = train.train_step(model, batch.x, batch.y, args, torch.device("cpu"), None, batch.doc_start)
    assert abs(loss - ref.item()) <= 1e-5 * ref.item()
    for n, p in model.named_parameters():
        err = (p.grad - want[n]).norm() / want[n].norm()
        assert err <= 1e-4, (n, err.item())


def test_loss_by_position_is_consistent_with_the_loss(corpus):
    """evaluate(): the buckets' token-weighted mean is the loss; both paths give the same token losses; each
    bucket's mean equals the per-document reference's over its positions."""
    data = TokenData(corpus.docs, tokenizer_dir=corpus.tok, held_out=corpus.sft)
    torch.manual_seed(1)
    model = Model(CFG)
    full, chunked = run_args(seq=160, batch=2, eval_iters=1), run_args(seq=160, batch=2, eval_iters=1, chunk=32,
                                                                        page_size=16)
    result = evaluate(model, data, full, torch.device("cpu"), None)
    assert [(b.start, b.end) for b in result.buckets] == [(0, 64), (64, 128), (128, 160)]
    assert position_edges(64) == [0, 64] and position_edges(65) == [0, 64, 65] and position_edges(20) == [0, 20]
    assert sum(b.tokens for b in result.buckets) == result.tokens
    assert sum(b.loss * b.tokens for b in result.buckets if b.tokens) / result.tokens == pytest.approx(result.loss)
    batch = data.batch("val", 2, 160, seed=[0, 1, 0])
    per_token = token_losses(model, batch, full, None)
    assert (per_token - token_losses(model, batch, chunked, None)).abs().max() <= 1e-5
    assert result.loss == pytest.approx(reference_loss(model, batch).item(), rel=1e-5)
    pos = torch.arange(160) - batch.doc_start
    trained = batch.y != -100
    for b in result.buckets:
        inside = trained & (pos >= b.start) & (pos < b.end)
        assert b.tokens == int(inside.sum())
        if b.tokens:
            assert b.loss == pytest.approx(per_token[inside].double().mean().item(), rel=1e-5)


def test_runs_log_the_curve_and_write_plots(corpus, tmp_path):
    """Byte-level directory, packed, with --eval-data; then --documents single: log.jsonl holds val_loss and the
    curve at each evaluation, and the three PNGs are written."""
    out = str(tmp_path / "pack")
    base = ["--model", "tiny", "--device", "cpu", "--seq", "64", "--batch", "2", "--steps", "2", "--eval-iters", "1",
            "--eval-interval", "1"]
    with open(corpus.root / "held.txt", "w") as f:
        f.write(text(np.random.default_rng(5), 200))
    assert train.main(base + ["--data", corpus.docs, "--eval-data", str(corpus.root / "held.txt"), "--out", out]) == 0
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(r["val_seq"] == 64 for r in evals)
    assert [row[:2] for row in evals[-1]["val_by_position"]] == [[0, 64]]
    for name in ("loss.png", "loss_by_position.png", "throughput.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    out = str(tmp_path / "single")
    single = ["--data", corpus.docs, "--documents", "single", "--seq", "48", "--steps", "1", "--out", out]
    assert train.main(base + single) == 0
    assert os.path.isfile(os.path.join(out, "loss_by_position.png"))


def bad(tmp_path, capsys, argv, message):
    code = train.main(["--device", "cpu", "--seq", "32", "--batch", "1", "--steps", "1",
                       "--out", str(tmp_path / "out")] + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, (code, err)


def test_bad_data_is_one_error_line(corpus, tmp_path, capsys):
    tok = ["--init-from", corpus.tok]
    (tmp_path / "emptydir").mkdir()
    bad(tmp_path, capsys, ["--data", str(tmp_path / "emptydir")], "emptydir: directory holds no files")
    (tmp_path / "emptydir" / "a.txt").write_text("")
    bad(tmp_path, capsys, ["--data", str(tmp_path / "emptydir")], "no text")
    bad(tmp_path, capsys, tok + ["--data", str(tmp_path / "emptydir")], "no text")
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox")
    bad(tmp_path, capsys, tok + ["--data", str(short)], "too few for a training and a validation window")
    bad(tmp_path, capsys, ["--data", corpus.docs, "--seq", "5000"], "--seq 5000 is longer than the training split")
    bad(tmp_path, capsys, ["--data", corpus.docs, "--documents", "single", "--seq", "600"],
        "no document of")
    one = tmp_path / "one.txt"
    one.write_text(text(np.random.default_rng(2), 100))
    bad(tmp_path, capsys, ["--data", str(one), "--documents", "single"], "is one document")
    bad(tmp_path, capsys, ["--data", corpus.docs, "--eval-data", str(short), "--seq", "30"],
        f"--seq 30 is longer than {short} (18 tokens)")
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"text": "fine"}\n{"text": "ok"}\n{oops\n')
    bad(tmp_path, capsys, tok + ["--data", str(lines)], "bad.jsonl:3: not valid JSON")
    bad(tmp_path, capsys, ["--data", corpus.docs, "--eval-data", str(lines)], "--eval-data: ")
    bad(tmp_path, capsys, ["--data", corpus.docs, "--eval-data", str(tmp_path / "none.txt")], "does not exist")
    lines.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    bad(tmp_path, capsys, tok + ["--data", str(lines)], "bad.jsonl:2: a record needs 'text', or 'prompt' and")
    bad(tmp_path, capsys, ["--data", str(lines)], "JSONL records are tokenized with a checkpoint's tokenizer")
    bad(tmp_path, capsys, tok, "the default corpus is bytes")
    small = str(tmp_path / "small_vocab")
    make_tokenizer_dir(small, model_vocab=100)
    bad(tmp_path, capsys, ["--init-from", small, "--data", corpus.docs + "/00.txt"],
        "outside the vocabulary [0, 100)")
    cache = corpus.sft + ".tokens.bin"
    TokenData(corpus.sft, tokenizer_dir=corpus.tok)  # the cache exists
    with open(cache, "ab") as f:
        f.write(b"\x00\x00")  # a token more than the sidecar records
    bad(tmp_path, capsys, ["--data", cache], "bytes, but its sidecar records")
    bad(tmp_path, capsys, tok + ["--data", corpus.sft], "bytes, but its sidecar records")
    meta = json.load(open(cache + ".json"))
    with open(cache, "r+b") as f:
        f.truncate(2 * meta["n_tokens"])
    ids = np.memmap(cache, dtype=np.uint16, mode="r+")
    ids[5] = 300  # an id past the vocabulary, same size
    ids.flush()
    bad(tmp_path, capsys, ["--data", cache], "token id 300 is >= the vocab_size 300")
    bad(tmp_path, capsys, tok + ["--data", corpus.sft], "token id 300 is >= the vocab_size 300")
    os.remove(cache)
    other = str(tmp_path / "other_tok")
    make_tokenizer_dir(other, vocab_size=280)  # fewer merges: another tokenizer
    TokenData(corpus.sft, tokenizer_dir=other)  # writes the cache with its ids
    bad(tmp_path, capsys, tok + ["--data", cache], "was tokenized with another tokenizer")
    os.remove(cache)
