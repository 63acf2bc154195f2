"""Data loading: embedded corpus, .txt bytes, .bin token ids with their recorded dtype, batch determinism."""

import json

import numpy as np
import pytest
import torch

import data as data_module
from data import TokenData, load_tokens, open_corpus, stdlib_corpus, write_tokens


def test_stdlib_corpus_is_real_deterministic_text():
    a, b = stdlib_corpus(), stdlib_corpus()
    assert len(a) > 1_000_000 and np.array_equal(a, b)
    assert b"def " in a[:200_000].tobytes()  # Python source, as bytes


def test_splits_and_deterministic_batches(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(256)) * 40)
    data = TokenData(str(path), val_fraction=0.1)
    assert data.vocab_size == 256 and len(data.splits["val"]) == 1024 and len(data.splits["train"]) == 9216
    b = data.batch("train", 3, 100, seed=[1, 0, 5])
    x, y = b.x, b.y
    x2, x3 = data.batch("train", 3, 100, seed=[1, 0, 5]).x, data.batch("train", 3, 100, seed=[1, 0, 6]).x
    assert b.doc_start is None and x.shape == y.shape == (3, 100) and (x == x2).all() and not (x == x3).all()
    assert (x[:, 1:] == y[:, :-1]).all() and ((x + 1) % 256 == y).all()  # y is x shifted by one


def test_window_longer_than_split_is_an_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abc" * 100)
    data = TokenData(str(path), val_fraction=0.1)
    assert data.max_window("train") == 269
    data.batch("train", 1, 269, seed=0)
    with pytest.raises(ValueError, match="exceeds the train split"):
        data.batch("train", 1, 270, seed=0)


@pytest.mark.parametrize("vocab", [300, 151936, 200_000])
def test_bin_round_trip_records_dtype(tmp_path, vocab):
    ids = np.random.default_rng(vocab).integers(0, vocab, size=5000)
    path = str(tmp_path / "tok.bin")
    write_tokens(path, ids, vocab)
    meta = json.load(open(path + ".json"))
    assert meta == {"dtype": "uint16" if vocab <= 65536 else "uint32", "vocab_size": vocab, "num_tokens": 5000}
    tokens, v = load_tokens(path)
    assert v == vocab and np.array_equal(np.asarray(tokens), ids)


def test_bin_errors(tmp_path):
    path = tmp_path / "tok.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="no sidecar"):
        load_tokens(str(path))
    (tmp_path / "tok.bin.json").write_text("{not json")
    with pytest.raises(ValueError, match="expected JSON"):
        load_tokens(str(path))
    (tmp_path / "tok.bin.json").write_text('{"dtype": "int8", "vocab_size": 10}')
    with pytest.raises(ValueError, match="not one of"):
        load_tokens(str(path))
    (tmp_path / "tok.bin.json").write_text('{"dtype": "uint32", "vocab_size": 10}')
    path.write_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match="not a multiple"):
        load_tokens(str(path))
    with pytest.raises(FileNotFoundError):
        load_tokens(str(tmp_path / "missing.txt"))
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="tok.bin is empty"):
        load_tokens(str(path))


def test_bin_contents_are_checked_against_the_sidecar(tmp_path):
    """Every id below vocab_size (the largest one is reported), the recorded length equal to the file's."""
    path = str(tmp_path / "tok.bin")
    write_tokens(path, [1, 2, 3], vocab_size=10)
    np.array([1, 12, 3], dtype=np.uint16).tofile(path)  # an id the sidecar's vocabulary does not have
    with pytest.raises(ValueError, match="token id 12 is >= the vocab_size 10.*index 1"):
        load_tokens(path)
    np.array([1, 2, 3, 4], dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="records 3 uint16 tokens"):
        load_tokens(path)
    with open(path + ".json", "w") as f:
        json.dump({"dtype": "uint16", "vocab_size": 10}, f)  # an older sidecar without num_tokens still loads
    assert load_tokens(path)[0].tolist() == [1, 2, 3, 4]


def test_a_stream_too_short_for_both_splits_is_an_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"x" * 19)  # 10% of 19 is one validation token: no window
    with pytest.raises(ValueError, match="too few for a training and a validation window"):
        TokenData(str(path))
    path.write_bytes(b"x" * 20)
    assert TokenData(str(path)).max_window("val") == 1
    with pytest.raises(ValueError, match="out of range|must lie in"):
        write_tokens(str(tmp_path / "bad.bin"), [5, 10], vocab_size=10)


# ------------------------------------------------------------------------------------------------ documents


def write_documents(tmp_path, lengths, vocab=5000, masked=True, seed=0):
    """A tokenize_data cache of documents with the given lengths whose ids are their positions in the stream (so a
    window's first id is its offset), and a random loss mask. -> (path, offsets, mask)."""
    from tokenize_data import write_corpus

    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + list(lengths))
    docs = [np.arange(a, b) % vocab for a, b in zip(offsets[:-1], offsets[1:])]
    masks = [(rng.random(n) < 0.7).astype(np.uint8) for n in lengths] if masked else None
    write_corpus(str(tmp_path / "docs"), docs, vocab, masks)
    return str(tmp_path / "docs.bin"), offsets, (np.concatenate(masks) if masked else None)


def test_pack_batches_restart_at_documents_and_mask_targets(tmp_path):
    """pack: a window at a drawn offset; doc_start, the boundary targets and the loss mask, against a per-position
    reading of the offsets."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 40, size=120)
    path, offsets, mask = write_documents(tmp_path, lengths)
    data = TokenData(path)
    assert data.splits["train"].n_docs > 100 and data.documents == "pack"
    b = data.batch("train", 6, 50, seed=[3, 0, 1])
    assert b.x.shape == b.y.shape == b.doc_start.shape == (6, 50) and b.doc_start.dtype == b.x.dtype
    for row in range(6):
        s = int(b.x[row, 0])  # ids are positions
        for t in range(50):
            a = s + t
            d = max(i for i in range(len(offsets) - 1) if offsets[i] <= a)
            assert b.x[row, t] == a and b.doc_start[row, t] == max(offsets[d] - s, 0)
            last = offsets[d + 1] == a + 1  # the document's last token: its target would be the next document's
            want = -100 if last or not mask[a + 1] else a + 1
            assert b.y[row, t] == want, (row, t)
    again = data.batch("train", 6, 50, seed=[3, 0, 1])
    assert all((u == v).all() for u, v in zip((b.x, b.y, b.doc_start), (again.x, again.y, again.doc_start)))
    import model
    assert model.IGNORE_INDEX == data_module.IGNORE_INDEX == -100


def test_single_takes_the_leading_tokens_of_long_enough_documents(tmp_path):
    lengths = [10, 50, 70, 20, 100, 41, 40, 200]  # seq 40: documents of >= 41 tokens are usable
    path, offsets, _ = write_documents(tmp_path, lengths, masked=False)
    data = TokenData(path, documents="single", val_fraction=0.4)  # the split cuts the 200-token document
    assert data.usable_docs("train", 40) == 4 and data.max_window("train") == 99
    starts = set()
    for step in range(30):
        b = data.batch("train", 3, 40, seed=[0, 0, step])
        assert b.doc_start is None
        for row in range(3):
            s = int(b.x[row, 0])
            assert s in {10, 60, 150, 250}  # the documents of 50, 70, 100 and 41 tokens (offsets: cumsum)
            assert (b.x[row] == torch.arange(s, s + 40)).all() and (b.y[row] == b.x[row] + 1).all()
            starts.add(s)
    assert len(starts) == 4  # every usable document is drawn
    with pytest.raises(ValueError, match="longest document"):
        data.batch("train", 1, 100, seed=0)
    with pytest.raises(ValueError, match="one document"):
        TokenData(write_documents(tmp_path, [500], masked=False)[0], documents="single")


def test_byte_directory_held_out_data_and_what_needs_a_tokenizer(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_bytes(b"B" * 30)
    (d / "a.txt").write_bytes(b"A" * 20)
    (d / "sub" / "c.txt").write_bytes(b"C" * 50)
    (d / "empty.txt").write_bytes(b"")
    (d / ".hidden").write_bytes(b"H" * 99)
    corpus = open_corpus(str(d))
    assert corpus.vocab_size == 256 and corpus.doc_offsets.tolist() == [0, 20, 50, 100]
    assert bytes(corpus.tokens) == b"A" * 20 + b"B" * 30 + b"C" * 50
    held = tmp_path / "held.txt"
    held.write_bytes(b"xyz" * 10)
    data = TokenData(str(d), held_out=str(held))
    assert len(data.splits["train"]) == 100 and bytes(data.splits["val"].tokens) == b"xyz" * 10
    b = data.batch("val", 2, 29, seed=0)
    assert b.doc_start is None and bytes(b.x[0].numpy().astype(np.uint8)) == (b"xyz" * 10)[:29]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="r.jsonl: JSONL records are tokenized"):
        open_corpus(str(jsonl))
    with pytest.raises(ValueError, match="the default corpus is bytes"):
        open_corpus(None, tokenizer_dir=str(tmp_path))
    write_tokens(str(tmp_path / "v300.bin"), [1, 2, 299], 300)
    with pytest.raises(ValueError, match="vocab_size 300, .* 256: evaluation data must be tokenized"):
        TokenData(str(d), held_out=str(tmp_path / "v300.bin"))
    (d / "x.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="JSONL in a directory"):
        open_corpus(str(d))
