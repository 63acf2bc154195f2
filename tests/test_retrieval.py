"""retrieval.py: deterministic examples whose answer is recoverable from the context and alone carries loss, a
dataset in tokenize_data's format, and answer_accuracy through chunked KV-store attention equal to a direct
full-sequence computation of the same argmaxes."""

import numpy as np
import pytest
import torch

from data import load_tokens
from model import Model, preset
from paged_kv import PagedKVStore, ReferenceKVStore
from retrieval import answer_accuracy, answer_predictions, corpus_examples, main, make_example, write_dataset
from tokenize_data import load_corpus

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # PagedKVStore on a CPU runs under Triton's interpreter


def test_same_seed_same_bytes():
    a = make_example(5, 3000, 2500)
    b = make_example(5, 3000, 2500)
    c = make_example(6, 3000, 2500)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    assert make_example((1, 2), 500, 300)[0].tobytes() != make_example((1, 3), 500, 300)[0].tobytes()


def test_answer_is_recoverable_and_alone_carries_loss():
    rng = np.random.default_rng(0)
    for trial in range(40):
        key_len, value_len, n_pairs = (int(x) for x in rng.integers(1, 6, size=3))
        n_pairs = min(n_pairs * 3, 10 ** key_len)
        length = int(rng.integers(200, 5000))
        pair_len = key_len + value_len + 3
        distance = int(rng.integers(pair_len, length - key_len - 2 - value_len + 1))
        ids, mask = make_example(trial, length, distance, n_pairs, key_len, value_len)
        text = ids.astype(np.uint8).tobytes()
        assert len(ids) == length == len(mask) and ids.max() < 256
        assert mask.tolist() == [0] * (length - value_len) + [1] * value_len  # exactly the answer bytes
        answer = text[-value_len:]
        question = text[-value_len - key_len - 2:-value_len]
        assert question[:1] == b"?" and question[-1:] == b"=" and question[1:-1].isdigit()
        context = text[:-value_len - key_len - 2]
        needle = b"#" + question[1:-1] + b"="
        assert context.count(needle) == 1  # the key occurs once before the question
        at = context.index(needle)
        assert context[at + len(needle):at + len(needle) + value_len] == answer and answer.isupper()
        assert len(context) - at == distance
        assert context.count(b"#") == n_pairs and context.count(b";") == n_pairs
        assert set(context.replace(b"#", b"").replace(b";", b"").replace(b"=", b"")) <= set(
            b"abcdefghijklmnopqrstuvwxyz 0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_bad_arguments():
    with pytest.raises(ValueError, match="distance must lie in"):
        make_example(0, 100, 5)
    with pytest.raises(ValueError, match="distance must lie in"):
        make_example(0, 100, 95)
    with pytest.raises(ValueError, match="distractor pairs"):
        make_example(0, 60, 40, n_pairs=8)
    with pytest.raises(ValueError, match="distinct keys"):
        make_example(0, 1000, 500, n_pairs=11, key_len=1)


def test_dataset_in_tokenize_data_format(tmp_path):
    prefix = str(tmp_path / "retrieval")
    corpus = write_dataset(prefix, 5, 400, 300, seed=3, n_pairs=4)
    again = load_corpus(prefix + ".bin")
    tokens, vocab = load_tokens(prefix + ".bin")  # data.py reads it as a plain token stream
    assert vocab == corpus.vocab_size == 256 and len(tokens) == 5 * 400
    examples = corpus_examples(again)
    for i, (ids, mask) in enumerate(examples):
        want_ids, want_mask = make_example((3, i), 400, 300, n_pairs=4)
        assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)
        assert np.array_equal(np.asarray(tokens[400 * i:400 * (i + 1)]), want_ids)


def test_cli_writes_dataset(tmp_path, capsys):
    prefix = str(tmp_path / "ret")
    assert main(["--out", prefix, "--examples", "2", "--length", "300", "--pairs", "3", "--seed", "9"]) == 0
    assert capsys.readouterr().out == f"wrote {prefix}.bin: 2 examples of 300 bytes, 600 tokens\n"
    for i, (ids, mask) in enumerate(corpus_examples(load_corpus(prefix + ".bin"))):
        want_ids, want_mask = make_example((9, i), 300, 290, n_pairs=3)  # default distance: as far as possible
        assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)
        assert ids[0] == ord("#")  # the queried pair opens the example
    assert main(["--out", prefix, "--length", "12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: distance must lie in") and err.count("\n") == 1


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = Model(preset("tiny")).to(DEVICE).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30)  # clear argmaxes (tied head): no near-ties between the paths
    return model


def full_sequence_predictions(model, ids):
    """Argmax of model(ids) [B, T, vocab], dense attention over the whole sequence, shifted onto the targets."""
    with torch.no_grad():
        pred = model(ids).argmax(-1)
    return torch.cat([torch.full_like(pred[:, :1], -1), pred[:, :-1]], dim=1)


T, VALUE_LEN = 96, 4


@pytest.fixture(scope="module")
def scored_examples(tiny_model):
    """Three 96-byte examples with 4-byte answers: example 0's answer is replaced by the model's own greedy answer
    (4 of 4 right), example 1's too but with its last byte changed (3 of 4 right: a target never influences its
    own prediction), example 2 keeps its random answer. -> (examples, ids [3, T], mask [3, T], direct predictions)"""
    model = tiny_model
    examples = [make_example(s, T, 60, n_pairs=3, value_len=VALUE_LEN) for s in range(3)]
    ids = torch.as_tensor(np.stack([e[0] for e in examples]), device=DEVICE)
    mask = torch.as_tensor(np.stack([e[1] for e in examples]), device=DEVICE).bool()
    for j in range(T - VALUE_LEN, T):  # greedy decoding of examples 0 and 1's answers, a byte at a time
        ids[:2, j] = full_sequence_predictions(model, ids[:2])[:, j]
    ids[1, -1] = (ids[1, -1] + 1) % 256
    examples = [(ids[i].cpu().numpy(), examples[i][1]) for i in range(3)]
    direct = torch.where(mask, full_sequence_predictions(model, ids), -1)
    return examples, ids, mask, direct


def make_store(model, kind, batch, seq_len):
    store_class = PagedKVStore if kind == "paged" else ReferenceKVStore
    return store_class.for_sequence(model, batch, seq_len, 16, torch.float32, DEVICE)


@pytest.mark.parametrize("store_kind", ["reference", "paged"])
def test_chunked_predictions_equal_full_sequence_argmax(tiny_model, scored_examples, store_kind):
    """The targets 92..95 are predicted from positions 91..94: with 40-token chunks fill_kv stores [0, 80) and the
    chunk [80, 96) runs the whole model (the LM head on the needed positions only); with 92-token chunks the
    positions straddle chunks [0, 92) and [92, 96)."""
    _, ids, mask, direct = scored_examples
    assert (direct[mask] >= 0).all() and (direct[~mask] == -1).all()
    store = make_store(tiny_model, store_kind, 3, T)
    for chunk_size in (40, 92) if store_kind == "reference" else (40,):  # the interpreter is slow: one for paged
        chunked = answer_predictions(tiny_model, ids, mask, store, chunk_size=chunk_size)
        assert torch.equal(chunked, direct), chunk_size


def test_answer_accuracy_counts_right_answers(tiny_model, scored_examples):
    """batch_size 2: a batch of examples 0 and 1 and a batch of example 2 alone (a store of its own size); the
    answers straddle no chunk boundary here but the 32-token chunks leave fill_kv two of them."""
    examples, ids, _, direct = scored_examples
    right_2 = int((direct[2] == ids[2]).sum())  # what the full-sequence argmax says of the random answer
    score = answer_accuracy(tiny_model, examples, chunk_size=32, batch_size=2,
                            make_store=lambda b, t: make_store(tiny_model, "reference", b, t))
    assert score.n_examples == 3
    assert score.token_accuracy == pytest.approx((4 + 3 + right_2) / 12)
    assert score.exact_match == pytest.approx((1 + 0 + (right_2 == 4)) / 3)
    right_2_at = (direct[2] == ids[2])[-VALUE_LEN:].tolist()  # example 1 misses only its last byte
    assert score.byte_accuracy == pytest.approx([(2 + r) / 3 for r in right_2_at[:-1]] + [(1 + right_2_at[-1]) / 3])
