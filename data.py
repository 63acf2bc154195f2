"""
Token streams and their documents, no download ever needed.

Sources (`open_corpus`):
- default: the embedded corpus, this Python's own standard-library sources (*.py under sysconfig's stdlib path, no
  site-packages), read in sorted path order as bytes -> byte-level tokens (vocab 256), one stream. Real text on every
  machine, deterministic for a given Python version (about 30 MB on CPython 3.11).
- FILE.bin: raw token ids, nanoGPT style, with a sidecar FILE.bin.json {"dtype": "uint16"|"uint32", "vocab_size": N}
  written by `write_tokens`. The dtype is recorded, never guessed from the file size. A sidecar written by
  tokenize_data.py also records the documents (doc_offsets) and a loss mask (FILE.mask.bin).
- with a tokenizer (the --init-from checkpoint's tokenizer.json): a text file, a directory of text files or a .jsonl
  file, tokenized by tokenize_data.py and cached next to it as SRC.tokens.bin (+ sidecar, + mask).
- without one: a file's bytes (vocab 256, one document), or a directory's files' bytes (each file one document,
  sorted by relative path, hidden files skipped, no bos/eos). JSONL needs a tokenizer (its records are not bytes).

Documents (`TokenData(..., documents=)`); a batch is a `Batch` (x, y, doc_start):
- pack (default): the documents concatenated in order; each sequence is a window of --seq tokens at an offset drawn
  from (seed, step), as for a plain stream. doc_start[b, t] = index within the sequence of the first token of t's
  document (0 for the document the window cuts into), so attention never crosses a document boundary and RoPE
  positions restart at each document. The last token of a document predicts nothing (target IGNORE_INDEX): its
  target would be the next document's first token, which it cannot see. (With a tokenizer's eos framing, the eos
  is that last token, and is itself a target of the token before it.) One-document data (the default corpus, a
  .txt as bytes) has no boundaries: doc_start is None and windows are exactly those of a plain stream.
- single: each sequence is the leading --seq tokens of one document drawn from (seed, step), for long documents.
  Documents shorter than --seq + 1 tokens (a window and its targets) are skipped, not padded: a run that asked for
  long sequences gets no short ones; the start line says how many are usable. doc_start is None.
A loss mask (prompt tokens of {prompt, completion} records) sets the targets it masks to IGNORE_INDEX in both modes.

The last `val_fraction` of the tokens is the validation split (cutting one document in two), unless held-out data
is given (--eval-data), which is then the whole validation split and --data the whole training split. A window
longer than its split is an error that names both lengths: there is no silent wrap-around.

Opening a file checks it whole (an error names the file): empty, a sidecar that disagrees with the file's size,
token ids >= vocab_size (a vectorised max over the memory map: one pass, no copy), too few tokens for a training and
a validation window. Opening needs numpy only; torch is imported by `batch`, so that train.py checks --data before
importing torch.
"""

import glob
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # for the annotations only: opening data needs no torch
    import torch

BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
IGNORE_INDEX = -100  # a target that carries no loss: model.IGNORE_INDEX, F.cross_entropy's default ignore_index
DOCUMENT_MODES = ("pack", "single")


def stdlib_corpus() -> np.ndarray:
    """The embedded corpus as uint8 tokens: every stdlib .py file, sorted by relative path, concatenated."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    paths = [p for p in paths if "site-packages" not in p and "dist-packages" not in p]
    if not paths:
        raise RuntimeError(f"no Python sources found under {root}; pass --data FILE instead")
    chunks = []
    for p in paths:
        with open(os.path.join(root, p), "rb") as f:
            chunks.append(f.read())
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def read_json(path: str, error=ValueError):
    """The parsed JSON file at `path`; a file that is not UTF-8 JSON raises `error` with one line naming it (configs,
    sidecars and adapter files that users bring all go through here)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def write_tokens(path: str, ids, vocab_size: int):
    """Write token ids as FILE.bin plus the FILE.bin.json sidecar that records dtype, vocabulary size and length."""
    ids = np.asarray(ids)
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    ids.astype(BIN_DTYPES[dtype]).tofile(path)
    with open(path + ".json", "w") as f:
        json.dump({"dtype": dtype, "vocab_size": int(vocab_size), "num_tokens": int(ids.size)}, f)


def check_ids(tokens, vocab_size: int, path: str, source: str):
    """Every id < vocab_size (recorded in `source`): one vectorised pass over the (memory-mapped) array, no copy."""
    largest = int(tokens.max())
    if largest >= vocab_size:
        first = int(np.argmax(tokens >= vocab_size))
        raise ValueError(f"{path}: token id {largest} is >= the vocab_size {vocab_size} of {source} (first such id "
                         f"at index {first})")


def load_tokens(path: str | None):
    """-> (tokens: 1-D numpy array (memory-mapped for .bin), vocab_size), every id checked to be < vocab_size."""
    if path is None:
        return stdlib_corpus(), 256
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path} is empty")
    if not path.endswith(".bin"):
        return np.fromfile(path, dtype=np.uint8), 256
    meta_path = path + ".json"
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path} has no sidecar {meta_path} recording its dtype; write one such as "
                         f'{{"dtype": "uint16", "vocab_size": 151936}} (data.write_tokens does this)')
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        dtype, vocab_size = meta["dtype"], int(meta["vocab_size"])
        num_tokens = int(meta["num_tokens"]) if "num_tokens" in meta else None  # older sidecars lack it
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: expected JSON with 'dtype' and 'vocab_size' ({e})") from None
    if dtype not in BIN_DTYPES:
        raise ValueError(f"{meta_path}: dtype {dtype!r} is not one of {list(BIN_DTYPES)}")
    if vocab_size <= 0:
        raise ValueError(f"{meta_path}: vocab_size must be > 0, got {vocab_size}")
    itemsize = np.dtype(BIN_DTYPES[dtype]).itemsize
    if size % itemsize:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of {dtype}'s {itemsize}")
    if num_tokens is not None and num_tokens * itemsize != size:
        raise ValueError(f"{path}: {meta_path} records {num_tokens} {dtype} tokens ({num_tokens * itemsize} bytes), "
                         f"the file has {size} bytes")
    tokens = np.memmap(path, dtype=BIN_DTYPES[dtype], mode="r")
    check_ids(tokens, vocab_size, path, meta_path)
    return tokens, vocab_size


# ------------------------------------------------------------------------------------------------ corpora


@dataclass
class Corpus:
    """A token stream and its documents."""
    path: str  # what it was read from (for messages)
    tokens: np.ndarray  # [n] token ids (uint8/16/32, often memory-mapped)
    vocab_size: int
    doc_offsets: np.ndarray  # [n_docs + 1] int64: document d is tokens[doc_offsets[d]:doc_offsets[d + 1]]
    loss_mask: np.ndarray | None = None  # [n] uint8: 0 where token i is no loss target (predicted from i - 1)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def part(self, a: int, b: int) -> "Corpus":
        """tokens [a, b); a document cut by a or b keeps its part inside."""
        offsets = np.unique(np.clip(self.doc_offsets, a, b)) - a
        mask = self.loss_mask[a:b] if self.loss_mask is not None else None
        return Corpus(self.path, self.tokens[a:b], self.vocab_size, offsets.astype(np.int64), mask)


def byte_documents(src: str) -> Corpus:
    """A directory's files as bytes, each one document (sorted by relative path, hidden and empty files skipped)."""
    from tokenize_data import DataError, source_files  # the same listing rules as tokenization

    try:
        files = source_files(src)
    except DataError as e:
        raise ValueError(str(e)) from None
    docs = [np.fromfile(p, dtype=np.uint8) for p in files]
    docs = [d for d in docs if d.size]
    if not docs:
        raise ValueError(f"{src}: no text (every file is empty)")
    offsets = np.cumsum([0] + [d.size for d in docs]).astype(np.int64)
    return Corpus(src, np.concatenate(docs), 256, offsets)


PROGRESS_BYTES = 1 << 24  # tokenizing more text than this shows a progress bar (on stderr)


def open_corpus(path: str | None, tokenizer_dir: str | None = None) -> Corpus:
    """The Corpus of a --data/--eval-data path (see the module doc). tokenizer_dir: a checkpoint directory holding
    tokenizer.json; with one, text, directories and JSONL are tokenized (cached), and the byte-level default corpus
    is refused (a BPE model would silently train on bytes). Every problem raises ValueError/OSError, one line."""
    from tokenize_data import DataError, load_corpus, load_tokenizer, source_files, tokenize_corpus

    if path is None:
        if tokenizer_dir:
            raise ValueError(f"the default corpus is bytes, but {tokenizer_dir} has a tokenizer: give --data (text, "
                             f"a directory or JSONL, tokenized with it; or a .bin of its ids)")
        tokens, vocab = load_tokens(None)
        return Corpus("<python stdlib sources>", tokens, vocab, np.array([0, len(tokens)], np.int64))
    path = path.rstrip("/") or path
    if path.endswith(".bin"):
        tokens, vocab = load_tokens(path)
        meta = read_json(path + ".json")
        recorded = meta.get("tokenizer_sha256") if isinstance(meta, dict) else None
        if recorded and tokenizer_dir and recorded != load_tokenizer(tokenizer_dir).sha256:
            raise ValueError(f"{path} was tokenized with another tokenizer (or framing) than {tokenizer_dir}'s "
                             f"tokenizer.json: re-tokenize the source with it")
        if isinstance(meta, dict) and "doc_offsets" in meta:  # written by tokenize_data: documents, maybe a mask
            try:
                c = load_corpus(path, meta)
            except DataError as e:
                raise ValueError(str(e)) from None
            return Corpus(path, tokens, vocab, c.doc_offsets, c.loss_mask)
        return Corpus(path, tokens, vocab, np.array([0, len(tokens)], np.int64))
    if tokenizer_dir:
        try:
            files = [path] if os.path.isfile(path) else source_files(path)
            c = tokenize_corpus(path, tokenizer_dir, progress=sum(map(os.path.getsize, files)) > PROGRESS_BYTES)
        except DataError as e:
            raise ValueError(str(e)) from None
        check_ids(c.tokens, c.vocab_size, c.path, c.path + ".json")  # a reused cache is re-checked too
        return Corpus(path, c.tokens, c.vocab_size, c.doc_offsets, c.loss_mask)
    if path.endswith(".jsonl"):
        raise ValueError(f"{path}: JSONL records are tokenized with a checkpoint's tokenizer: --init-from a "
                         f"checkpoint holding tokenizer.json (or tokenize it: python tokenize_data.py)")
    if os.path.isdir(path):
        return byte_documents(path)
    tokens, vocab = load_tokens(path)
    return Corpus(path, tokens, vocab, np.array([0, len(tokens)], np.int64))


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    x: "torch.Tensor"  # [B, T] int64 input ids
    y: "torch.Tensor"  # [B, T] int64 targets (x shifted by one), IGNORE_INDEX where no loss
    doc_start: "torch.Tensor | None"  # [B, T] int64 first position of each token's document, or None

    def to(self, device) -> "Batch":
        return Batch(self.x.to(device), self.y.to(device),
                     self.doc_start.to(device) if self.doc_start is not None else None)


class TokenData:
    """Train/validation splits of a corpus and deterministic batches drawn from them (see the module doc)."""

    def __init__(self, path: "str | Corpus | None" = None, val_fraction: float = 0.1, documents: str = "pack",
                 held_out: "str | Corpus | None" = None, tokenizer_dir: str | None = None):
        """path: the training data (a path for open_corpus, or a Corpus); held_out: the validation data, else the
        last val_fraction of path's tokens."""
        if documents not in DOCUMENT_MODES:
            raise ValueError(f"documents must be one of {DOCUMENT_MODES}, got {documents!r}")
        corpus = path if isinstance(path, Corpus) else open_corpus(path, tokenizer_dir)
        self.path, self.vocab_size, self.documents = corpus.path, corpus.vocab_size, documents
        n = len(corpus.tokens)
        if held_out is not None:
            if not isinstance(held_out, Corpus):
                held_out = open_corpus(held_out, tokenizer_dir)
            if held_out.vocab_size != corpus.vocab_size:
                raise ValueError(f"{held_out.path} has vocab_size {held_out.vocab_size}, {corpus.path} "
                                 f"{corpus.vocab_size}: evaluation data must be tokenized as the training data")
            if len(held_out.tokens) < 2:
                raise ValueError(f"{held_out.path}: {len(held_out.tokens)} token, too few for one window (2 at "
                                 f"least)")
            self.splits = {"train": corpus, "val": held_out}
            if n < 2:
                raise ValueError(f"{self.path}: {n} token, too few for one window (2 at least)")
        else:
            n_val = int(n * val_fraction)
            if n - n_val < 2 or n_val < 2:  # a window needs one token plus its target
                raise ValueError(f"{self.path}: only {n} tokens, too few for a training and a validation "
                                 f"window ({math.ceil(2 / val_fraction)} at least)")
            self.splits = {"train": corpus.part(0, n - n_val), "val": corpus.part(n - n_val, n)}
        if documents == "single" and corpus.n_docs < 2:
            raise ValueError(f"--documents single draws whole documents, but {self.path} is one document (no "
                             f"boundaries): use --documents pack (windows of it)")

    def doc_lengths(self, split: str) -> np.ndarray:
        return np.diff(self.splits[split].doc_offsets)

    def usable_docs(self, split: str, seq_len: int) -> int:
        """single mode: how many documents of `split` hold a window of seq_len tokens and its targets."""
        return int((self.doc_lengths(split) >= seq_len + 1).sum())

    def max_window(self, split: str) -> int:
        """Longest sequence length a batch of `split` can have (one extra token is needed for the targets)."""
        if self.documents == "single":
            return int(self.doc_lengths(split).max()) - 1
        return len(self.splits[split].tokens) - 1

    def batch(self, split: str, batch_size: int, seq_len: int, seed) -> Batch:
        """A Batch of [batch_size, seq_len] from `split`. Windows (pack) or documents (single) are drawn from `seed`
        alone, so step s of any run (fresh or resumed) sees the same batch when seeded with e.g. (seed, s)."""
        import torch  # here, not at the top: opening (and checking) a file needs no torch (see the module doc)

        c = self.splits[split]
        if seq_len > self.max_window(split):
            what = "longest document" if self.documents == "single" else "split"
            raise ValueError(f"sequence length {seq_len} exceeds the {split} split of {self.path} "
                             f"({len(c.tokens)} tokens; the longest window is {self.max_window(split)}, its {what})")
        rng = np.random.default_rng(seed)
        if self.documents == "single":
            usable = np.flatnonzero(self.doc_lengths(split) >= seq_len + 1)
            starts = c.doc_offsets[usable[rng.integers(0, len(usable), size=batch_size)]]
        else:
            starts = rng.integers(0, len(c.tokens) - seq_len, size=batch_size)
        windows = np.stack([np.asarray(c.tokens[s: s + seq_len + 1], dtype=np.int64) for s in starts])
        x, y = windows[:, :-1], windows[:, 1:].copy()
        if c.loss_mask is not None:  # mask[i] = 0: token i is no target
            mask = np.stack([np.asarray(c.loss_mask[s + 1: s + seq_len + 1]) for s in starts])
            y[mask == 0] = IGNORE_INDEX
        doc_start = None
        if self.documents == "pack" and c.n_docs > 1:
            pos = starts[:, None] + np.arange(seq_len)  # [B, T] positions in the split
            doc = np.searchsorted(c.doc_offsets, pos, side="right") - 1  # each position's document
            doc_start = np.maximum(c.doc_offsets[doc] - starts[:, None], 0)
            y[c.doc_offsets[doc + 1] == pos + 1] = IGNORE_INDEX  # a document's last token: its target is the next's
            doc_start = torch.from_numpy(doc_start.astype(np.int64))
        return Batch(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), doc_start)
