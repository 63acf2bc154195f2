"""tokenize_data.py: ids equal the tokenizers library's own encoding of each document plus the checkpoint's
framing, the cache is data.py-readable, reused and invalidated correctly, and bad input is a one-line DataError."""

import json
import os

import numpy as np
import pytest

import tokenize_data
from data import load_tokens
from tiny_tokenizer import make_tokenizer_dir
from tokenize_data import DataError, load_corpus, main, tokenize_corpus

WORDS = ["the", "quick", "brown", "fox", "long", "context", "café", "東京", "keys", "values", "x", "123", "\t"]


def random_text(rng, n_words):
    seps = [" ", " ", " ", "\n", "\n\n", ", ", ".\n"]
    return "".join(str(rng.choice(WORDS)) + str(rng.choice(seps)) for _ in range(n_words))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A Qwen2.5-like checkpoint: no bos, eos <|endoftext|>."""
    path = tmp_path_factory.mktemp("ckpt")
    return str(path), make_tokenizer_dir(str(path))


def reference_ids(tokenizer, text, bos=None, eos=0):
    return ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False).ids + [eos]


def test_text_file_matches_library_encoding_and_data_reader(ckpt, tmp_path, monkeypatch):
    path, tokenizer = ckpt
    text = random_text(np.random.default_rng(1), 3000)
    src = tmp_path / "doc.txt"
    src.write_text(text, encoding="utf-8")
    monkeypatch.setattr(tokenize_data, "PIECE_CHARS", 500)  # many pieces: cutting must not change the ids
    monkeypatch.setattr(tokenize_data, "BATCH_CHARS", 2000)  # and several encode_batch calls
    corpus = tokenize_corpus(str(src), path, progress=False)
    want = reference_ids(tokenizer, text)
    assert corpus.path == str(src) + ".tokens.bin" and not corpus.reused
    assert corpus.tokens.tolist() == want and corpus.loss_mask is None
    assert corpus.doc_offsets.tolist() == [0, len(want)] and corpus.vocab_size == 300
    tokens, vocab = load_tokens(corpus.path)  # data.py's reader takes the sidecar's dtype and vocab_size
    assert vocab == 300 and tokens.tolist() == want
    assert tokenizer.decode(want[:-1]) == text


def test_directory_is_sorted_documents(ckpt, tmp_path):
    path, tokenizer = ckpt
    rng = np.random.default_rng(2)
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    texts = {"b.txt": random_text(rng, 50), "a.txt": random_text(rng, 30), "sub/c.txt": random_text(rng, 20)}
    for name, text in texts.items():
        (d / name).write_text(text)
    (d / "empty.txt").write_text("")  # no document
    (d / ".hidden").write_text("never read")
    corpus = tokenize_corpus(str(d) + "/", path, progress=False)
    assert corpus.path == str(d) + ".tokens.bin"  # next to the directory, not inside it
    docs = [reference_ids(tokenizer, texts[n]) for n in ["a.txt", "b.txt", "sub/c.txt"]]
    assert corpus.tokens.tolist() == sum(docs, [])
    assert corpus.doc_offsets.tolist() == np.cumsum([0] + [len(x) for x in docs]).tolist()


def test_jsonl_text_and_prompt_completion_masks(tmp_path):
    path = str(tmp_path / "llama_like")
    tokenizer = make_tokenizer_dir(path, bos="<s>", eos={"content": "<|endoftext|>"}, add_bos_token=True)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("<|endoftext|>")
    rng = np.random.default_rng(3)
    records = [{"prompt": random_text(rng, int(rng.integers(0, 9))), "completion": random_text(rng, 5)}
               for _ in range(6)]
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n" + "\n".join(json.dumps(r)
                                                                                     for r in records[3:]))
    corpus = tokenize_corpus(str(src), path, progress=False)
    ids, mask = [], []
    for r in records:
        p = tokenizer.encode(r["prompt"], add_special_tokens=False).ids
        c = tokenizer.encode(r["completion"], add_special_tokens=False).ids
        ids += [bos] + p + c + [eos]
        mask += [0] * (1 + len(p)) + [1] * (len(c) + 1)
    assert corpus.tokens.tolist() == ids and corpus.loss_mask.tolist() == mask
    assert len(corpus.doc_offsets) == 7
    assert os.path.basename(str(src) + ".tokens.mask.bin") == json.load(open(corpus.path + ".json"))["loss_mask"]

    src2 = tmp_path / "plain.jsonl"
    texts = [random_text(rng, 7) for _ in range(4)]
    src2.write_text("\n".join(json.dumps({"text": t, "meta": 1}) for t in texts))
    corpus = tokenize_corpus(str(src2), path, progress=False)
    assert corpus.tokens.tolist() == sum((reference_ids(tokenizer, t, bos, eos) for t in texts), [])
    assert corpus.loss_mask is None


@pytest.mark.parametrize("name,config,want", [
    ("qwen2.5", dict(bos=None), ("none", "eot")),  # no bos named; eos <|endoftext|> after each document
    ("llama", dict(bos="<s>", add_bos_token=True, add_eos_token=False), ("<s>", "none")),
    ("llama template", dict(bos="<s>", template_bos=True), ("<s>", "eot")),  # no add_bos_token: the template
    ("gpt2", dict(bos="<|endoftext|>"), ("none", "eot")),  # named, but neither the flag nor the template adds it
    ("config.json eos", dict(eos=None), ("none", "eot")),  # tokenizer_config names none: config.json's id
])
def test_document_framing_follows_the_checkpoint(tmp_path, name, config, want):
    path = str(tmp_path / "tok")
    tokenizer = make_tokenizer_dir(path, **config)
    ids = {"none": None, "<s>": tokenizer.token_to_id("<s>"), "eot": tokenizer.token_to_id("<|endoftext|>")}
    src = tmp_path / "doc.txt"
    src.write_text("the quick brown fox")
    corpus = tokenize_corpus(str(src), path, progress=False)
    bos, eos = ids[want[0]], ids[want[1]]
    body = tokenizer.encode("the quick brown fox", add_special_tokens=False).ids
    assert corpus.tokens.tolist() == ([bos] if bos is not None else []) + body + ([eos] if eos is not None else [])


def test_cache_reused_until_source_or_tokenizer_changes(ckpt, tmp_path):
    path, tokenizer = ckpt
    src = tmp_path / "doc.txt"
    src.write_text("the quick brown fox")
    first = tokenize_corpus(str(src), path, progress=False)
    again = tokenize_corpus(str(src), path, progress=False)
    assert again.reused and again.tokens.tolist() == first.tokens.tolist()
    src.write_text("values and keys, long context")  # new size and mtime
    changed = tokenize_corpus(str(src), path, progress=False)
    assert not changed.reused and changed.tokens.tolist() == reference_ids(tokenizer, src.read_text())
    other = str(tmp_path / "other_tok")
    other_tokenizer = make_tokenizer_dir(other, vocab_size=280)  # fewer merges: a different tokenizer
    retok = tokenize_corpus(str(src), other, progress=False)
    assert not retok.reused and retok.tokens.tolist() == reference_ids(other_tokenizer, src.read_text())
    assert retok.tokens.tolist() != changed.tokens.tolist()


def test_bad_input_is_one_line_data_error(ckpt, tmp_path):
    path, _ = ckpt

    def error(src, match, tok=path, **kw):
        with pytest.raises(DataError, match=match) as e:
            tokenize_corpus(str(src), tok, progress=False, **kw)
        assert "\n" not in str(e.value) and str(src).rstrip("/").split("/")[-1] in str(e.value)

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    error(empty, "no text")
    (tmp_path / "d").mkdir()
    error(tmp_path / "d", "no files")
    (tmp_path / "d" / "x.txt").write_text("")
    error(tmp_path / "d", "no text")
    (tmp_path / "d" / "y.jsonl").write_text('{"text": "a"}')
    with pytest.raises(DataError, match="y.jsonl: JSONL in a directory"):
        tokenize_corpus(str(tmp_path / "d"), path, progress=False)
    (tmp_path / "d" / "y.jsonl").unlink()
    error(tmp_path / "d", "inside the directory", out_prefix=str(tmp_path / "d" / "cache"))
    short = tmp_path / "short.txt"
    short.write_text("the")
    error(short, "too few", min_tokens=10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{not json\n')
    error(bad, r"bad.jsonl:4: not valid JSON")
    bad.write_text('{"text": "ok"}\n{"prompt": "p", "completion": "c"}\n')
    error(bad, r"bad.jsonl:2: a 'prompt' record")
    bad.write_text('{"prompt": "p"}\n')
    error(bad, r"bad.jsonl:1: a record needs")
    bad.write_text('{"text": 5}\n')
    error(bad, r"bad.jsonl:1: 'text' must be a string")
    bad.write_text("\n\n")
    error(bad, "no records")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    error(binary, "not UTF-8")
    small_vocab = str(tmp_path / "small_vocab")  # the model's vocabulary is smaller than the tokenizer's
    make_tokenizer_dir(small_vocab, model_vocab=100)
    src = tmp_path / "doc.txt"
    src.write_text("the quick brown fox")
    error(src, r"outside the vocabulary \[0, 100\)", tok=small_vocab)


def test_cache_that_disagrees_with_its_sidecar_is_an_error(ckpt, tmp_path):
    path, _ = ckpt
    src = tmp_path / "doc.txt"
    src.write_text(random_text(np.random.default_rng(4), 40))
    corpus = tokenize_corpus(str(src), path, progress=False)
    with open(corpus.path, "r+b") as f:
        f.truncate(os.path.getsize(corpus.path) - 2)  # one uint16 token lost
    with pytest.raises(DataError, match="doc.txt.tokens.bin: .* bytes, but its sidecar records"):
        tokenize_corpus(str(src), path, progress=False)
    with pytest.raises(DataError, match="sidecar records"):
        load_corpus(corpus.path)


def test_cli(ckpt, tmp_path, capsys):
    path, tokenizer = ckpt
    src = tmp_path / "doc.txt"
    src.write_text("keys and values")
    assert main([str(src), "--init-from", path]) == 0
    assert capsys.readouterr().out == f"{src}.tokens.bin written: {len(reference_ids(tokenizer, 'keys and values'))} " \
                                      f"tokens in 1 documents\n"
    assert main([str(src), "--init-from", path]) == 0 and "up to date" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert main([str(bad), "--init-from", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: ") and err.count("\n") == 1
