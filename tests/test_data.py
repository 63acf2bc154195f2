"""Data loading: embedded corpus, .txt bytes, .bin token ids with their recorded dtype, batch determinism."""

import json

import numpy as np
import pytest

from data import TokenData, load_tokens, stdlib_corpus, write_tokens


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
    x, y, x2, x3 = b.x, b.y, data.batch("train", 3, 100, seed=[1, 0, 5]).x, data.batch("train", 3, 100, seed=[1, 0, 6]).x
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
