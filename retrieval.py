"""
A synthetic long-range retrieval task that shows whether a model uses its long context, deterministic and
byte-level (vocab 256), so the small preset can learn it from scratch and nothing is downloaded.

One example of `length` bytes:

    filler words ... #4821=QZKA; ... filler ... #0937=MMOP; ... filler ... ?4821=QZKA
                     `-- the queried pair, `distance` bytes before the question   `-- question and answer

Filler is lowercase words and spaces; each key->value pair is "#" + key + "=" + value + ";", the key spelled in
digits, (key_symbols > 10) in non-ASCII bytes, or (key_capitals) in capitals, the value in capitals or
(make_qa_example's values_like_keys) in the keys' alphabet. Keys are distinct, so the queried key appears once
before the question as a key (where keys and values share an alphabet a key may also occur inside another pair's
value), and key symbols never occur in filler. The loss mask covers exactly the answer bytes (mask[i] = 1: token i
is a loss target, as in tokenize_data.py), so the loss measures retrieval alone: the answer is unguessable without
finding the key `distance` bytes back (1 in 26 per byte for capitals, 1 in key_symbols for values_like_keys).

Ask fewer questions than there are pairs (make_qa_example): when every pair is asked, "a value not answered yet"
narrows question k of n to n - k + 1 candidates without reading any key, a loss of ln(n!)/n (1.51 for 10 of 10,
1.92 for 16 of 16), the plateau the H200's first table run sat on (bench/RESULTS.md).

`write_dataset` stores N examples as tokenize_data's .bin + .bin.json + .mask.bin (one document per example);
`answer_accuracy` scores a model through chunked no-grad attention over a KV store, so 32K+ token examples run in
the memory of one chunk.
"""

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from chunk_train import ChunkAttention, fill_kv
from sample import default_store
from tokenize_data import TokenizedCorpus, write_corpus

LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
CAPITALS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)
HIGH_BYTES = np.arange(128, 256, dtype=np.uint8)  # non-ASCII: never in filler, values or "#=;?"


def key_alphabet(key_symbols: int, capitals: bool = False):
    """The bytes keys are spelled in: the first key_symbols digits (<= 10), else the first key_symbols non-ASCII
    bytes (<= 128): one-byte keys of a large alphabet make a pure induction task (no digit pairs to match).
    capitals: the first key_symbols capitals (<= 26), the values' own alphabet. Why: on the H200 the copy circuit
    formed for the answers' later bytes (a capital string continued from its earlier copy) but never for the first
    byte after a digit or non-ASCII key (bench/RESULTS.md); a key in capitals makes the first byte the same
    continuation of a capital string."""
    if capitals:
        if not 2 <= key_symbols <= 26:
            raise ValueError(f"key_symbols must lie in [2, 26] for capital keys, got {key_symbols}")
        return CAPITALS[:key_symbols]
    if not 2 <= key_symbols <= 128:
        raise ValueError(f"key_symbols must lie in [2, 128], got {key_symbols}")
    return DIGITS[:key_symbols] if key_symbols <= 10 else HIGH_BYTES[:key_symbols]
VOCAB_SIZE = 256  # bytes


def _filler(rng, n):
    """n bytes of random lowercase words (2-9 letters) separated by single spaces."""
    out = rng.choice(LETTERS, size=n)
    pos = 0
    while pos < n:
        pos += int(rng.integers(2, 10))
        if pos < n:
            out[pos] = ord(" ")
            pos += 1
    return out


def make_example(seed, length: int, distance: int, n_pairs: int = 8, key_len: int = 4, value_len: int = 4,
                 key_symbols: int = 10):
    """-> (ids [length] int64, loss_mask [length] uint8): a deterministic function of all arguments.

    distance: bytes from the start of the queried pair to the start of the question; n_pairs - 1 distractor pairs
    sit at random elsewhere in the context. seed: an int or a tuple of ints (numpy's SeedSequence entropy)."""
    pair_len = key_len + value_len + 3  # "#" key "=" value ";"
    question_len = key_len + 2  # "?" key "="
    context = length - question_len - value_len
    if key_len < 1 or value_len < 1 or n_pairs < 1:
        raise ValueError(f"need key_len, value_len, n_pairs >= 1, got {key_len}, {value_len}, {n_pairs}")
    if not pair_len <= distance <= context:
        raise ValueError(f"distance must lie in [{pair_len}, {context}] for length {length}, got {distance}")
    alphabet = key_alphabet(key_symbols)
    if n_pairs > key_symbols ** key_len:
        raise ValueError(f"{n_pairs} distinct keys of {key_len} symbols (of {key_symbols}) do not exist")
    rng = np.random.default_rng(list(seed) if isinstance(seed, (tuple, list)) else seed)
    keys, seen = [], set()  # distinct keys in the order drawn; keys[0] is the one asked for
    while len(keys) < n_pairs:
        key = rng.choice(alphabet, size=key_len)
        if key.tobytes() not in seen:
            seen.add(key.tobytes())
            keys.append(key)
    values = [rng.choice(CAPITALS, size=value_len) for _ in range(n_pairs)]

    ids = _filler(rng, context)
    needle = context - distance
    # distractor slots: pair-sized cells of the context that do not overlap the queried pair
    slots = [s for s in range(0, context - pair_len + 1, pair_len) if s + pair_len <= needle or s >= needle + pair_len]
    if len(slots) < n_pairs - 1:
        raise ValueError(f"length {length} leaves room for {len(slots)} distractor pairs, {n_pairs - 1} asked")
    starts = [needle] + sorted(rng.choice(slots, size=n_pairs - 1, replace=False).tolist())
    for start, key, value in zip(starts, keys, values):
        ids[start:start + pair_len] = np.r_[ord("#"), key, ord("="), value, ord(";")]
    question = np.r_[ord("?"), keys[0], ord("=")].astype(np.uint8)
    ids = np.r_[ids, question, values[0]].astype(np.int64)
    mask = np.zeros(length, dtype=np.uint8)
    mask[-value_len:] = 1
    return ids, mask


def make_qa_example(seed, length: int, distance: int, n_pairs: int = 64, n_questions: int = 16, key_len: int = 4,
                    value_len: int = 4, key_symbols: int = 10, separator: bool = True, key_capitals: bool = False,
                    values_like_keys: bool = False):
    """-> (ids [length] int64, loss_mask [length] uint8): many questions per example, for training.

    n_pairs key->value pairs sit in the first `length - distance - n_questions * qa_len` bytes (qa_len = key_len +
    value_len + 3), the rest is filler, and the example ends with n_questions questions about distinct pairs, each
    "?" key "=" value ";". Every queried pair starts at least `distance` bytes before the first question, so every
    answer lies `distance` or more bytes after its pair; the loss mask covers the value bytes of every question.
    separator=False drops the "=": "#" key value ";" and "?" key value ";", so the value directly follows its key,
    the textbook induction pattern (with "=" the value sits two places after the key's last symbol, and the circuit
    needs a two-back copy besides). key_capitals: keys spelled in capitals (key_alphabet); a key may then also occur
    inside another pair's value (for 3-capital keys and 16 pairs of 4-capital values, about 0.4% of questions).
    values_like_keys: values spelled in the keys' alphabet too (chance 1 / key_symbols per byte): with 128 non-ASCII
    symbols a symbol pair recurs by chance ~100x less often than a capital pair, so a match on the last two symbols
    is nearly always the right pair (with capitals, ~8% of them recur elsewhere in an 8-pair example)."""
    sep = [ord("=")] if separator else []
    pair_len = qa_len = key_len + value_len + 2 + len(sep)
    context = length - n_questions * qa_len
    if key_len < 1 or value_len < 1 or not 1 <= n_questions <= n_pairs:
        raise ValueError(f"need key_len, value_len >= 1 and 1 <= n_questions <= n_pairs, got {key_len}, "
                         f"{value_len}, {n_questions}, {n_pairs}")
    alphabet = key_alphabet(key_symbols, key_capitals)
    if n_pairs > key_symbols ** key_len:
        raise ValueError(f"{n_pairs} distinct keys of {key_len} symbols (of {key_symbols}) do not exist")
    slots = list(range(0, context - distance + 1, pair_len))  # pair starts at least `distance` before question 1
    if distance < pair_len or len(slots) < n_pairs:
        raise ValueError(f"length {length} at distance {distance} leaves room for {max(len(slots), 0)} pairs before "
                         f"{n_questions} questions, {n_pairs} asked (distance must also be >= {pair_len})")
    rng = np.random.default_rng(list(seed) if isinstance(seed, (tuple, list)) else seed)
    keys = rng.choice(key_symbols ** key_len, size=n_pairs, replace=False)  # distinct, as base-key_symbols numbers
    keys = [alphabet[(k // key_symbols ** np.arange(key_len - 1, -1, -1)) % key_symbols] for k in keys]
    values = [rng.choice(alphabet if values_like_keys else CAPITALS, size=value_len) for _ in range(n_pairs)]
    ids = _filler(rng, context)
    for start, key, value in zip(sorted(rng.choice(slots, size=n_pairs, replace=False).tolist()), keys, values):
        ids[start:start + pair_len] = np.r_[ord("#"), key, sep, value, ord(";")]
    asked = rng.choice(n_pairs, size=n_questions, replace=False)
    questions = [np.r_[ord("?"), keys[i], sep, values[i], ord(";")] for i in asked]
    ids = np.r_[ids, *questions].astype(np.int64)
    mask = np.zeros(length, dtype=np.uint8)
    for q in range(n_questions):
        answer = context + q * qa_len + 1 + key_len + len(sep)
        mask[answer:answer + value_len] = 1
    return ids, mask


def write_dataset(prefix: str, n_examples: int, length: int, distance: int, seed: int = 0,
                  **task) -> TokenizedCorpus:
    """N examples (example i from seed (seed, i)) as prefix.bin + .bin.json + .mask.bin, one document each."""
    examples = [make_example((seed, i), length, distance, **task) for i in range(n_examples)]
    meta = {"task": {"name": "retrieval", "n_examples": n_examples, "length": length, "distance": distance,
                     "seed": seed, **task}}
    return write_corpus(prefix, [e[0] for e in examples], VOCAB_SIZE, [e[1] for e in examples], meta)


def corpus_examples(corpus: TokenizedCorpus):
    """[(ids, loss_mask)] per document of a corpus written by write_dataset (or tokenize_data with masks)."""
    bounds = corpus.doc_offsets.tolist()
    return [(np.asarray(corpus.tokens[a:b], dtype=np.int64), np.asarray(corpus.loss_mask[a:b]))
            for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class RetrievalScore:
    token_accuracy: float  # fraction of answer tokens whose argmax prediction is right
    exact_match: float  # fraction of answers (maximal runs of target tokens) with every token right
    n_examples: int
    n_answers: int  # make_example: one per example; make_qa_example: n_questions
    byte_accuracy: tuple  # accuracy of each answer's k-th token (k = 0, 1, ...): which part of the copy fails


@torch.no_grad()
def answer_predictions(model, ids, mask, store, chunk_size=4096, compute_dtype=None):
    """ids [B, T] int64, mask [B, T] bool (loss targets) -> [B, T] int64: the argmax prediction for every target
    position (what position i - 1's logits say), -1 elsewhere. Chunks before the first needed position only fill
    the store (fill_kv); later ones run the whole model, the LM head on the needed positions alone."""
    B, T = ids.shape
    dtype = next(model.parameters()).dtype
    compute_dtype = compute_dtype or dtype
    needed = torch.zeros_like(mask)
    needed[:, :-1] = mask[:, 1:]  # position i's logits predict token i + 1
    columns = needed.any(0).nonzero().flatten().tolist()
    pred = torch.full((B, T), -1, dtype=torch.long, device=ids.device)
    if not columns:
        return pred
    store.reset()
    s0 = columns[0] // chunk_size * chunk_size
    fill_kv(model, ids[:, :s0], store, chunk_size, compute_dtype)
    for s in range(s0, columns[-1] + 1, chunk_size):
        e = min(s + chunk_size, T)
        with torch.autocast(ids.device.type, dtype=compute_dtype, enabled=compute_dtype != dtype):
            x = model.hidden(ids[:, s:e], attn=ChunkAttention(store, s), start_pos=s)
            cols = [c for c in columns if s <= c < e]
            logits = model.head(x[:, [c - s for c in cols]])  # [B, len(cols), vocab]
        pred[:, [c + 1 for c in cols]] = logits.argmax(-1)
    return torch.where(mask, pred, -1)


def answer_accuracy(model, examples, chunk_size=4096, batch_size=1, compute_dtype=None, make_store=None,
                    progress=False) -> RetrievalScore:
    """Score `examples` [(ids, loss_mask)] (make_example's or make_qa_example's outputs): argmax predictions at the
    target positions against the targets, per token and per answer. Consecutive examples of one length share a batch (up to batch_size).
    make_store(batch, seq_len) -> an empty KV store (default: sample.default_store in the compute dtype)."""
    device = next(model.parameters()).device
    if not examples:
        raise ValueError("no examples to score")
    if make_store is None:
        def make_store(batch, seq_len):
            return default_store(model, seq_len, batch, dtype=compute_dtype)
    batches, i = [], 0
    while i < len(examples):
        j = i + 1
        while j < len(examples) and j - i < batch_size and len(examples[j][0]) == len(examples[i][0]):
            j += 1
        batches.append(examples[i:j])
        i = j
    correct = total = exact = answers = 0
    right_at, seen_at = {}, {}  # offset within an answer -> right predictions, targets
    store, store_shape = None, None  # one store, replaced when the batch's [B, T] changes
    for batch in tqdm(batches, desc="retrieval eval", disable=not progress):
        ids = torch.as_tensor(np.stack([e[0] for e in batch]), dtype=torch.long, device=device)
        mask = torch.as_tensor(np.stack([e[1] for e in batch]), device=device).bool()
        if tuple(ids.shape) != store_shape:
            store = None  # free the old pool first
            store, store_shape = make_store(*ids.shape), tuple(ids.shape)
        hit = (answer_predictions(model, ids, mask, store, chunk_size, compute_dtype) == ids) & mask
        correct += int(hit.sum())
        total += int(mask.sum())
        starts = mask.clone()
        starts[:, 1:] &= ~mask[:, :-1]  # the first token of each answer
        span = starts.flatten().cumsum(0).view_as(mask)  # answer ids, distinct across rows
        answers += int(starts.sum())
        exact += int(starts.sum()) - span[mask & ~hit].unique().numel()
        # offset of each target within its answer: its column minus the column of its answer's first token
        cols = torch.arange(mask.shape[1], device=device).expand_as(mask)
        first = torch.where(starts, cols, -1).cummax(1).values
        for k, h in zip((cols - first)[mask].tolist(), hit[mask].tolist()):
            right_at[k] = right_at.get(k, 0) + h
            seen_at[k] = seen_at.get(k, 0) + 1
    return RetrievalScore(correct / max(total, 1), exact / max(answers, 1), len(examples), answers,
                          tuple(right_at[k] / seen_at[k] for k in sorted(seen_at)))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a synthetic retrieval dataset (.bin + .bin.json + .mask.bin).")
    ap.add_argument("--out", required=True, help="output prefix P: writes P.bin, P.bin.json, P.mask.bin")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--length", type=int, default=32768, help="bytes per example")
    ap.add_argument("--distance", type=int, default=None, help="bytes from the queried pair to the question "
                                                               "(default: as far as the length allows)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    distance = args.distance if args.distance is not None else args.length - 6 - 4  # key_len + 2, value_len
    try:
        corpus = write_dataset(args.out, args.examples, args.length, distance, args.seed, n_pairs=args.pairs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {corpus.path}: {args.examples} examples of {args.length} bytes, {len(corpus.tokens)} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
