"""
Evaluation at full length: the mean loss over the trained tokens of held-out batches, and the same loss by position
bucket, the standard "does more context help" curve.

Every batch runs at the evaluation length (--seq, or the held-out tail's longest window when shorter) through the
path training uses: chunk by chunk (chunk_train.chunked_token_losses, over the training store) when it exceeds
--chunk, else the whole sequence at once (Model.hidden + Model.token_losses). Both give each position's loss, fp32
[B, T], 0 where the target is IGNORE_INDEX; the mean and the curve are sums of these over the trained tokens, so the
buckets' token-weighted mean is the loss itself.

Buckets are log2 in the position within the document (t - doc_start[b, t]: the context a token has, which in a
packed batch restarts at each document): [0, 64), [64, 128), [128, 256), ..., the last ending at the length.
"""

from dataclasses import dataclass

import numpy as np
import torch

from chunk_train import chunked_token_losses
from cli import chunked
from model import IGNORE_INDEX
from plan import DTYPES

FIRST_BUCKET = 64  # tokens of the first bucket: positions below it are one point of the curve


def position_edges(seq: int) -> list[int]:
    """Bucket edges for length seq: [0, 64, 128, ..., seq] (64 doubling while below seq)."""
    edges, end = [0], FIRST_BUCKET
    while end < seq:
        edges.append(end)
        end *= 2
    return edges + [seq]


@dataclass
class Bucket:
    start: int  # positions [start, end) within the document
    end: int
    loss: float  # mean loss of the trained tokens there (nan if none)
    tokens: int  # how many


@dataclass
class EvalResult:
    loss: float  # mean loss over every trained token evaluated
    tokens: int  # trained tokens evaluated
    seq: int  # the evaluation length
    buckets: list[Bucket]

    def record(self) -> dict:
        """The keys log.jsonl records (plots.py reads them back)."""
        return {"val_loss": self.loss, "val_tokens": self.tokens, "val_seq": self.seq,
                "val_by_position": [[b.start, b.end, b.loss, b.tokens] for b in self.buckets]}


class PositionLoss:
    """Sums of token losses and counts of trained tokens per position bucket, over any number of batches."""

    def __init__(self, seq: int):
        self.seq, self.edges = seq, np.asarray(position_edges(seq))
        self.sums, self.counts = np.zeros(len(self.edges) - 1), np.zeros(len(self.edges) - 1, np.int64)

    def add(self, losses, targets, doc_start=None):
        """losses, targets, doc_start (or None): [B, T] tensors of one batch."""
        pos = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
        if doc_start is not None:
            pos = pos - doc_start
        trained = (targets != IGNORE_INDEX).cpu().numpy()
        bucket = np.searchsorted(self.edges, pos.cpu().numpy(), side="right")[trained] - 1
        n = len(self.sums)
        self.sums += np.bincount(bucket, weights=losses.double().cpu().numpy()[trained], minlength=n)
        self.counts += np.bincount(bucket, minlength=n)

    def result(self) -> EvalResult:
        total = int(self.counts.sum())
        means = [s / c if c else float("nan") for s, c in zip(self.sums, self.counts)]
        buckets = [Bucket(int(a), int(b), float(m), int(c))
                   for a, b, m, c in zip(self.edges[:-1], self.edges[1:], means, self.counts)]
        return EvalResult(float(self.sums.sum() / total) if total else float("nan"), total, self.seq, buckets)


def token_losses(model, batch, args, store):
    """Each position's loss of a Batch (data.py, on the model's device), fp32 [B, T], 0 where not trained, through
    the chunked path (args.seq > args.chunk and the batch longer than a chunk) or the full sequence."""
    x, y, doc_start = batch.x, batch.y, batch.doc_start
    if chunked(args) and x.shape[1] > args.chunk:
        return chunked_token_losses(model, x, y, args.chunk, args.page_size, DTYPES[args.dtype], store=store,
                                    doc_start=doc_start)
    enabled = DTYPES[args.dtype] != DTYPES[args.params_dtype]  # as train.autocast
    with torch.no_grad(), torch.autocast(x.device.type, dtype=DTYPES[args.dtype], enabled=enabled):
        return model.token_losses(model.hidden(x, doc_start=doc_start), y)


def evaluate(model, data, args, device, store) -> EvalResult:
    """args.eval_iters validation batches of data (data.TokenData), each drawn from (seed, 1, i): the same batches
    at every evaluation of a run, fresh or resumed."""
    seq = min(args.seq, data.max_window("val"))
    acc = PositionLoss(seq)
    for i in range(args.eval_iters):
        batch = data.batch("val", args.batch, seq, seed=[args.seed, 1, i]).to(device)
        acc.add(token_losses(model, batch, args, store), batch.y, batch.doc_start)
    return acc.result()
