"""
Token streams for training, no download ever needed.

- default: the embedded corpus, this Python's own standard-library sources (*.py under sysconfig's stdlib path, no
  site-packages), read in sorted path order as bytes -> byte-level tokens (vocab 256). Real text on every machine,
  deterministic for a given Python version (about 30 MB on CPython 3.11).
- FILE.txt (or any non-.bin file): its bytes, vocab 256.
- FILE.bin: raw token ids, nanoGPT style, with a sidecar FILE.bin.json {"dtype": "uint16"|"uint32", "vocab_size": N}
  written by `write_tokens`. The dtype is recorded, never guessed from the file size.

The last `val_fraction` of a stream is the validation split. A window longer than its split is an error that names
both lengths: there is no silent wrap-around, a long sequence must be real contiguous text.

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

import numpy as np

BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


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
    largest = int(tokens.max())  # reads the file once, without a copy
    if largest >= vocab_size:
        first = int(np.argmax(tokens >= vocab_size))
        raise ValueError(f"{path}: token id {largest} is >= the vocab_size {vocab_size} of {meta_path} (first such "
                         f"id at index {first})")
    return tokens, vocab_size


class TokenData:
    """Train/validation splits of one token stream and deterministic batches drawn from them."""

    def __init__(self, path: str | None = None, val_fraction: float = 0.1):
        self.path = path or "<python stdlib sources>"
        tokens, self.vocab_size = load_tokens(path)
        n_val = int(len(tokens) * val_fraction)
        if len(tokens) - n_val < 2 or n_val < 2:  # a window needs one token plus its target
            raise ValueError(f"{self.path}: only {len(tokens)} tokens, too few for a training and a validation "
                             f"window ({math.ceil(2 / val_fraction)} at least)")
        self.splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val:]}

    def max_window(self, split: str) -> int:
        """Longest sequence length a batch of `split` can have (one extra token is needed for the targets)."""
        return len(self.splits[split]) - 1

    def batch(self, split: str, batch_size: int, seq_len: int, seed: int):
        """(x, y): [batch_size, seq_len] int64, y = x shifted by one. Windows start at offsets drawn from `seed`
        alone, so step s of any run (fresh or resumed) sees the same batch when seeded with e.g. (seed, s)."""
        import torch  # here, not at the top: opening (and checking) a file needs no torch (see the module doc)

        data = self.splits[split]
        if seq_len > self.max_window(split):
            raise ValueError(f"sequence length {seq_len} exceeds the {split} split of {self.path} "
                             f"({len(data)} tokens; the longest window is {self.max_window(split)})")
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, len(data) - seq_len, size=batch_size)
        windows = np.stack([np.asarray(data[s: s + seq_len + 1], dtype=np.int64) for s in starts])
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]
