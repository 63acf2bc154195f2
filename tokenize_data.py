"""
Text -> token ids with a checkpoint's own tokenizer (tokenizer.json through the `tokenizers` library; transformers is
never needed), cached next to the data so that training reads a memory-mapped .bin.

Inputs (`src`):
- a text file: one document (UTF-8).
- a directory: every regular file below it, sorted by relative path, each one document (hidden files and empty
  files skipped; a .jsonl file among them is an error).
- a .jsonl file: one JSON object per line, either {"text": ...} (a document) or {"prompt": ..., "completion": ...}
  (a document whose prompt tokens carry no loss). All records of a file have the same kind.

Each document is encoded without the tokenizer's own template (add_special_tokens=False) and framed by the
checkpoint's bos / eos as its tokenizer_config.json says: bos where a bos token is named and added - add_bos_token
true, or, without that key, the tokenizer.json template adding it (Llama: yes; GPT-2: no; Qwen2.5 names none) - and
eos (tokenizer_config's eos_token, else config.json's eos_token_id) after every document as the separator
pretraining uses (Qwen2.5: <|endoftext|>) unless add_eos_token is false (Llama: bos alone separates documents).

Outputs, for a prefix P (default: the source path + ".tokens"):
    P.bin           token ids, uint16 or uint32 (data.py's format: data.load_tokens reads it as it is)
    P.bin.json      sidecar: dtype, vocab_size (data.py's two keys) plus n_tokens, tokenizer_sha256, source
                    fingerprint, doc_offsets [n_docs + 1], loss_mask (file name or null)
    P.mask.bin      prompt/completion only: uint8 per token, mask[i] = 1 if token i is a loss target (predicted
                    from position i - 1), 0 on bos and prompt tokens
The cache is reused while the tokenizer hash and the source fingerprint (size + mtime of every file) match; either
changing re-tokenizes. Bad input raises DataError, one line naming the file (and the line for JSONL).
"""

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data import read_json

FORMAT = 1  # bump when the cache layout or the framing rules change: old caches are then rebuilt
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}  # as data.py
PIECE_CHARS = 1 << 16  # long documents are encoded in pieces of about this many characters (see _pieces)
BATCH_CHARS = 4 << 20  # characters per encode_batch call: the pieces of a batch are encoded in parallel


class DataError(ValueError):
    """Bad input data; the message is one line that names the file (and line)."""


@dataclass
class CheckpointTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    sha256: str  # of tokenizer.json and the framing decided below: a change in either re-tokenizes
    vocab_size: int  # the model's (config.json), which may exceed the tokenizer's: ids must stay below it
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@dataclass
class TokenizedCorpus:
    path: str  # the .bin
    tokens: np.ndarray  # [n_tokens] memory-mapped uint16/uint32
    vocab_size: int
    doc_offsets: np.ndarray  # [n_docs + 1] int64: document d is tokens[doc_offsets[d]:doc_offsets[d + 1]]
    loss_mask: np.ndarray | None  # [n_tokens] uint8 memory-mapped, or None (every token is a target)
    reused: bool  # True if read from an existing cache


def _special_token(value):
    """tokenizer_config.json names a special token as a string or as {"content": ...} (AddedToken); null = none."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(checkpoint_dir: str) -> CheckpointTokenizer:
    """The tokenizer of a HF checkpoint directory: tokenizer.json, framing from tokenizer_config.json/config.json."""
    from tokenizers import Tokenizer

    tok_path = os.path.join(checkpoint_dir, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise DataError(f"{checkpoint_dir}: no tokenizer.json (expected a Hugging Face checkpoint directory)")
    try:
        tokenizer = Tokenizer.from_file(tok_path)
    except Exception as e:  # the library raises a bare Exception for a malformed file
        raise DataError(f"{tok_path}: cannot load tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None
    cfg_path, tcfg_path = (os.path.join(checkpoint_dir, n) for n in ("config.json", "tokenizer_config.json"))
    cfg = read_json(cfg_path, DataError) if os.path.isfile(cfg_path) else {}
    tcfg = read_json(tcfg_path, DataError) if os.path.isfile(tcfg_path) else {}

    def token_id(name, source):
        ident = tokenizer.token_to_id(name)
        if ident is None:
            raise DataError(f"{source}: special token {name!r} is not in {tok_path}")
        return ident

    bos_name, eos_name = _special_token(tcfg.get("bos_token")), _special_token(tcfg.get("eos_token"))
    bos_id = token_id(bos_name, tcfg_path) if bos_name else None
    if bos_id is not None and not tcfg.get("add_bos_token", tokenizer.encode("a").ids[:1] == [bos_id]):
        bos_id = None  # named but not added: add_bos_token false, or (absent) the tokenizer's template omits it
    eos_id = None
    if tcfg.get("add_eos_token", True):
        if eos_name:
            eos_id = token_id(eos_name, tcfg_path)
        elif cfg.get("eos_token_id") is not None:
            ids = cfg["eos_token_id"]
            eos_id = int(ids[0] if isinstance(ids, list) else ids)  # a list: the first is the document end
    vocab_size = int(cfg.get("vocab_size") or tokenizer.get_vocab_size(with_added_tokens=True))
    h = hashlib.sha256()
    with open(tok_path, "rb") as f:
        h.update(f.read())
    h.update(json.dumps([FORMAT, bos_id, eos_id, vocab_size]).encode())
    return CheckpointTokenizer(tokenizer, h.hexdigest(), vocab_size, bos_id, eos_id)


# ------------------------------------------------------------------------------------------------ sources


def source_files(src):
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise DataError(f"{src}: no such file or directory")
    files = []
    for root, dirs, names in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names if not n.startswith(".")]
    files = sorted(files, key=lambda p: os.path.relpath(p, src))
    if not files:
        raise DataError(f"{src}: directory holds no files")
    jsonl = [p for p in files if p.endswith(".jsonl")]
    if jsonl:  # it would be read as one text document: surely not what was meant
        raise DataError(f"{jsonl[0]}: JSONL in a directory of text documents; pass the .jsonl file itself")
    return files


def source_fingerprint(src) -> str:
    """sha256 of (relative path, size, mtime_ns) of every input file: changes when any file does."""
    listing = [(os.path.relpath(p, src) if os.path.isdir(src) else os.path.basename(p), os.path.getsize(p),
                os.stat(p).st_mtime_ns) for p in source_files(src)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _jsonl_records(path):
    """-> (kind, [(line number, record)]) with kind "text" or "prompt" decided by the first record."""
    kind, records = None, []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        this = "text" if "text" in rec else "prompt" if "prompt" in rec and "completion" in rec else None
        if this is None:
            raise DataError(f"{path}:{n}: a record needs 'text', or 'prompt' and 'completion'; has {sorted(rec)}")
        kind = kind or this
        if this != kind:
            raise DataError(f"{path}:{n}: a {this!r} record in a file of {kind!r} records")
        fields = ("text",) if kind == "text" else ("prompt", "completion")
        for name in fields:
            if not isinstance(rec[name], str):
                raise DataError(f"{path}:{n}: '{name}' must be a string, got {type(rec[name]).__name__}")
        if not rec[fields[-1]]:
            raise DataError(f"{path}:{n}: '{fields[-1]}' is empty")
        records.append((n, rec))
    if not records:
        raise DataError(f"{path}: no records (empty JSONL file)")
    return kind, records


def _pieces(text):
    """Cut a long text after newlines followed by a non-space character, where byte-level BPE pre-tokenizers
    (GPT-2's, Qwen's: no pre-token holds a newline followed by a non-space) split anyway, so encoding the pieces
    gives the same ids as encoding the whole, in bounded memory and with progress to show. (A SentencePiece-style
    normalizer that prepends "▁" to its input would see each piece as a new input; Qwen2, the only family
    model.py loads, has none.)"""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = start + PIECE_CHARS
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        yield text[start:cut]
        start = cut
    yield text[start:]


# ------------------------------------------------------------------------------------------------ the cache


def _paths(prefix):
    return prefix + ".bin", prefix + ".bin.json", prefix + ".mask.bin"


def write_corpus(prefix, docs, vocab_size, masks=None, extra=None) -> TokenizedCorpus:
    """Write documents (a list of 1-D int arrays) as P.bin + P.bin.json (+ P.mask.bin from `masks`, one uint8
    array per document). `extra`: more sidecar keys (tokenizer hash, fingerprint, ...). Files appear atomically."""
    bin_path, meta_path, mask_path = _paths(prefix)
    ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    if ids.size == 0:
        raise DataError(f"{prefix}: no tokens to write (empty document set)")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise DataError(f"{bin_path}: token id {bad} outside the vocabulary [0, {vocab_size})")
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    offsets = np.cumsum([0] + [len(d) for d in docs]).tolist()
    meta = {"dtype": dtype, "vocab_size": int(vocab_size), "format": FORMAT, "n_tokens": int(ids.size),
            "doc_offsets": offsets, "loss_mask": None, **(extra or {})}
    if masks is not None:
        mask = np.concatenate([np.asarray(m, dtype=np.uint8) for m in masks])
        if mask.shape != ids.shape:
            raise ValueError(f"{mask_path}: {mask.size} mask values for {ids.size} tokens")
        mask.tofile(mask_path + ".tmp")
        os.replace(mask_path + ".tmp", mask_path)
        meta["loss_mask"] = os.path.basename(mask_path)
    ids.astype(BIN_DTYPES[dtype]).tofile(bin_path + ".tmp")
    os.replace(bin_path + ".tmp", bin_path)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(meta_path + ".tmp", meta_path)  # last: a sidecar only ever describes complete files
    return load_corpus(bin_path)


def load_corpus(bin_path, meta=None, reused=False) -> TokenizedCorpus:
    """Open P.bin with its sidecar (and mask), checking that the files agree with what the sidecar records."""
    meta_path = bin_path + ".json"
    if meta is None:
        if not os.path.isfile(meta_path):
            raise DataError(f"{bin_path}: no sidecar {meta_path}")
        meta = read_json(meta_path, DataError)
    try:
        dtype, vocab_size, n = meta["dtype"], int(meta["vocab_size"]), int(meta["n_tokens"])
        offsets = np.asarray(meta["doc_offsets"], dtype=np.int64)
        mask_name = meta["loss_mask"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_path}: missing or malformed key ({e!r})") from None
    if dtype not in BIN_DTYPES:
        raise DataError(f"{meta_path}: dtype {dtype!r} is not one of {list(BIN_DTYPES)}")
    size = os.path.getsize(bin_path) if os.path.isfile(bin_path) else None
    want = n * np.dtype(BIN_DTYPES[dtype]).itemsize
    if size != want:
        raise DataError(f"{bin_path}: {size} bytes, but its sidecar records {n} {dtype} tokens ({want} bytes); "
                        f"delete both to re-tokenize")
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise DataError(f"{meta_path}: doc_offsets must rise from 0 to n_tokens = {n}")
    mask = None
    if mask_name is not None:
        mask_path = os.path.join(os.path.dirname(bin_path), mask_name)
        if not os.path.isfile(mask_path) or os.path.getsize(mask_path) != n:
            raise DataError(f"{mask_path}: missing or not {n} bytes (one uint8 per token) as {meta_path} records")
        mask = np.memmap(mask_path, dtype=np.uint8, mode="r")
    tokens = np.memmap(bin_path, dtype=BIN_DTYPES[dtype], mode="r")
    return TokenizedCorpus(bin_path, tokens, vocab_size, offsets, mask, reused)


def _encode_documents(src, tok, progress):
    """-> (docs, masks or None): framed id arrays per document, one progress bar over the input's characters."""
    files = source_files(src)
    jsonl = len(files) == 1 and files[0] == src and src.endswith(".jsonl")
    if jsonl:
        kind, records = _jsonl_records(src)
        parts = [[r["text"]] if kind == "text" else [r["prompt"], r["completion"]] for _, r in records]
    else:
        kind, parts = "text", [[_read_text(p)] for p in files]
        if not any(p[0] for p in parts):
            raise DataError(f"{src}: no text (empty file or document set)")
        parts = [p for p in parts if p[0]]  # an empty file in a directory is no document
    bos, eos = [tok.bos_id] if tok.bos_id is not None else [], [tok.eos_id] if tok.eos_id is not None else []
    texts = [t for p in parts for t in p]  # every text of every document, in order
    encoded = [[] for _ in texts]  # their ids
    bar = tqdm(total=sum(map(len, texts)), unit="char", unit_scale=True, desc=f"tokenizing {src}",
               disable=not progress)
    batch, batch_chars = [], 0  # (text index, piece); encode_batch spreads a batch over the CPU cores

    def flush():
        for (i, _), ids in zip(batch, tok.encode_batch([piece for _, piece in batch])):
            encoded[i] += ids
        bar.update(sum(len(piece) for _, piece in batch))
        batch.clear()

    for i, text in enumerate(texts):
        for piece in _pieces(text):
            batch.append((i, piece))
            batch_chars += len(piece)
            if batch_chars >= BATCH_CHARS:
                flush()
                batch_chars = 0
    flush()
    bar.close()
    docs, masks, i = [], [] if kind == "prompt" else None, 0
    for p in parts:
        ids = encoded[i:i + len(p)]
        i += len(p)
        docs.append(np.asarray(bos + [t for e in ids for t in e] + eos, dtype=np.int64))
        if masks is not None:  # bos and prompt: no loss; completion and eos: loss
            prompt, completion = ids
            masks.append(np.r_[np.zeros(len(bos) + len(prompt), np.uint8),
                               np.ones(len(completion) + len(eos), np.uint8)])
    return docs, masks


def tokenize_corpus(src: str, tokenizer_dir: str, out_prefix: str | None = None, progress: bool = True,
                    min_tokens: int = 2) -> TokenizedCorpus:
    """Tokenize `src` (text file, directory or JSONL) with the checkpoint's tokenizer, or reuse the cache at
    out_prefix (default: src + ".tokens") when the tokenizer hash and source fingerprint match.
    min_tokens: fewer tokens in all is an error (training needs a window and its shifted targets)."""
    src = src.rstrip("/") or src
    prefix = out_prefix or src + ".tokens"
    if os.path.isdir(src) and os.path.abspath(prefix).startswith(os.path.abspath(src) + os.sep):
        raise DataError(f"{src}: the cache {prefix}.bin would lie inside the directory and be read as a document")
    tok = load_tokenizer(tokenizer_dir)
    fingerprint = source_fingerprint(src)
    bin_path, meta_path, _ = _paths(prefix)
    if os.path.isfile(meta_path):
        meta = read_json(meta_path, DataError)
        if (isinstance(meta, dict) and meta.get("tokenizer_sha256") == tok.sha256
                and meta.get("source_fingerprint") == fingerprint):
            return load_corpus(bin_path, meta, reused=True)  # a cache that disagrees with its sidecar is an error
    docs, masks = _encode_documents(src, tok, progress)
    n = sum(len(d) for d in docs)
    if n < min_tokens:
        raise DataError(f"{src}: {n} tokens, too few (at least {min_tokens} needed)")
    extra = {"tokenizer_sha256": tok.sha256, "source": os.path.abspath(src), "source_fingerprint": fingerprint,
             "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    return write_corpus(prefix, docs, tok.vocab_size, masks, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Tokenize a text file, directory or JSONL with a checkpoint's tokenizer "
                                             "into SRC.tokens.bin (+ .bin.json sidecar, + .mask.bin for prompt/"
                                             "completion records); an up-to-date cache is reused.")
    ap.add_argument("src")
    ap.add_argument("--init-from", required=True, help="checkpoint directory holding tokenizer.json")
    ap.add_argument("--out", default=None, help="output prefix (default: SRC.tokens)")
    args = ap.parse_args(argv)
    try:
        corpus = tokenize_corpus(args.src, args.init_from, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = "up to date" if corpus.reused else "written"
    print(f"{corpus.path} {state}: {len(corpus.tokens)} tokens in {len(corpus.doc_offsets) - 1} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
