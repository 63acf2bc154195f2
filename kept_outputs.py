"""
Attention outputs kept from stage 1 for stage 2, a wrapper around the attention seam (attention.py).

Stage 1 of chunk-recurrent training (no grad) computes each chunk's attention over the history; stage 2 recomputes
exactly the same (o, lse) - same queries, same positions, same pages - before its backward. Where GPU memory allows,
stage 1 keeps them and stage 2 skips its forward kernels. Outputs are keyed by (layer, chunk start, chunk length)
and kept within a byte budget; when it is full the chunks furthest left give way: stage 2 reaches them last, and
their attention, over the shortest history, is the cheapest to recompute.
"""
import torch

from attention import attend, attention_forward


class KeptOutputs:
    def __init__(self, budget_bytes=0):
        self.budget_bytes = budget_bytes
        self.bytes = 0  # what the kept (o, lse) take now (a running sum: summing per call is quadratic)
        self._outputs = {}  # (layer, start, length) -> (o [B, C, H, D], lse [B, H, C] fp32)

    def __len__(self):
        return len(self._outputs)

    def attend(self, key, history, q, k, v, kernel, keep=False):
        """attention.attend of q over `history` for the call `key` = (layer, start, length): with the outputs kept
        for it (then forgotten: a chunk is recomputed once), or, with keep and no grad, keeping them if they fit."""
        kept = self._pop(key) if key in self._outputs else None
        size = q.numel() * q.element_size() + q.shape[0] * q.shape[2] * q.shape[1] * 4  # o and the fp32 lse
        if keep and kept is None and not torch.is_grad_enabled() and self._make_room(key, size):
            kept = self._outputs[key] = attention_forward(history, q, k, v, kernel)
            self.bytes += size
        return attend(history, q, k, v, kernel, kept=kept)

    def forget_from(self, layer, length):
        """Forget the layer's outputs that attended over positions >= length (truncated away)."""
        for key in [key for key in self._outputs if key[0] == layer and key[1] + key[2] > length]:
            self._pop(key)

    def _pop(self, key):
        o, lse = self._outputs.pop(key)
        self.bytes -= o.numel() * o.element_size() + lse.numel() * lse.element_size()
        return o, lse

    def _make_room(self, key, size):
        """Evict kept outputs of chunks left of key's until `size` more bytes fit; False if they cannot."""
        if self.bytes + size > self.budget_bytes:
            for old in sorted(self._outputs, key=lambda k: k[1]):
                if self.bytes + size <= self.budget_bytes or old[1] >= key[1]:
                    break
                self._pop(old)
        return self.bytes + size <= self.budget_bytes
