"""
The KV / KV-gradient store of chunk-recurrent training, in three layers:

1. `PageAllocator` - bookkeeping in plain Python: a free list of page indices. Pages are handed out as chunks are
   appended (stage 1) and returned last-in-first-out as stage 2 retires chunks right to left.
2. `PagedKVStore` - storage: four preallocated pool tensors shaped [num_pages, page_size, n_kv_heads, head_dim],
   K and V in the model's compute dtype, dK and dV in fp32 (gradients of a long sequence are sums of many chunk
   contributions; bf16 accumulation would lose them; bf16 gradient pages are an option where memory decides, each
   chunk's contribution then being summed in fp32 and rounded once). Each (layer, batch element) has a page table
   of int32 indices; the attention kernels read K/V through it and add gradients into dK/dV through it: attend
   hands the seam (attention.py) one part, the whole pool seen through the layer's table. Gradient pages are zeroed
   when allocated, so nothing from an earlier step can leak into a gradient.
3. `ReferenceKVStore` - the same interface over contiguous per-layer tensors and plain-PyTorch attention, for tests.

The interface chunk_train.py uses:
    store.reset()                          forget everything (start of a step)
    store.append(layer, k, v)              k, v: [B, T, Hkv, D] -> stored at positions [length, length + T)
    store.length(layer)                    tokens stored for that layer
    store.attend(layer, q, k, v)           causal attention of the chunk's q over all stored positions; k, v are
                                           the chunk's own keys/values (the last T stored) as autograd tensors.
                                           Backward adds history gradients into the store and returns the chunk's
                                           dk/dv *including* what later chunks accumulated for it.
    store.truncate(layer, length)          drop positions >= length (frees their pages)
    store.clear_grad(layer, start, end)    zero the gradient accumulated for positions [start, end), start at a
                                           page boundary (chunked_step's detach_history)

With sparse=SparseConfig(...) attention is page-level sparse (sparse_attn.py): each block of queries reads only
its selected history pages and its own chunk. kernel=: the attention kernel (attention.py: Triton, or the
plain-PyTorch reference, the default for CPU tensors without Triton's interpreter).
"""

import functools
import math

import torch

from attention import OnePart, Part, default_kernel
from kept_outputs import KeptOutputs
from kernels.paged_reference import paged_attention_reference
from sparse_attn import PageSelector, doc_positions


class OutOfPages(RuntimeError):
    pass


def kv_heads(model) -> tuple[int, int]:
    """(KV heads, head_dim) of the model's attention layers as they are, not as its config says: a tensor-parallel
    rank's layers hold a share of the heads (tensor_parallel.py), and its pages hold only theirs."""
    attn = model.layers[0].self_attn
    return attn.n_kv_heads, attn.head_dim


def to_device(t, device):
    """A small host tensor (page ids) copied to `device` without the host waiting for the GPU: through pinned
    memory, non-blocking (the caching host allocator keeps the pinned copy alive until the copy has run)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class PageAllocator:
    """A free list of page indices [first, first + num_pages)."""

    def __init__(self, num_pages: int, first: int = 0):
        self.num_pages = num_pages
        self.free = list(range(first + num_pages - 1, first - 1, -1))  # pop() hands out first, first + 1, ...

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free):
            raise OutOfPages(f"KV page pool exhausted: {n} pages needed, {len(self.free)} of {self.num_pages} free")
        return [self.free.pop() for _ in range(n)]

    def release(self, pages: list[int]):
        self.free.extend(reversed(pages))  # LIFO: the pages released last are reused first

    @property
    def num_free(self) -> int:
        return len(self.free)


class PagedKVStore:
    def __init__(self, num_layers, batch, n_kv_heads, head_dim, page_size, num_pages, dtype, device,
                 grad_dtype=torch.float32, sparse=None, output_cache_bytes=0, kernel=None):
        """kernel: the attention kernel (attention.py); default: Triton for CUDA tensors or under Triton's
        interpreter, else the plain-PyTorch reference."""
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
        if grad_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"grad_dtype must be float32 or bfloat16, got {grad_dtype}")
        self.num_layers, self.batch, self.page_size = num_layers, batch, page_size
        shape = (num_pages, page_size, n_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.dk = torch.empty(shape, dtype=grad_dtype, device=device)
        self.dv = torch.empty(shape, dtype=grad_dtype, device=device)
        self.allocator = PageAllocator(num_pages)
        self.tables = [[[] for _ in range(batch)] for _ in range(num_layers)]  # tables[layer][b] = [page, ...]
        self.lengths = [0] * num_layers
        # the same tables on the device, int32 [B, n_pages] per layer. They grow by concatenation (new ids travel
        # through pinned memory, non-blocking) and shrink by slicing: nothing in a step waits for the GPU, which
        # a pageable host-to-device copy of the whole table per layer and chunk would make it do.
        empty = torch.empty(batch, 0, dtype=torch.int32, device=device)
        self._device_tables = [empty] * num_layers
        # sparse attention (sparse_attn.py): sparse=SparseConfig(...) keeps page summaries and selections
        self.selector = PageSelector(num_pages, n_kv_heads, head_dim, page_size, sparse, dtype,
                                     device) if sparse else None
        # attention outputs kept from stage 1 for stage 2, which would recompute them exactly (kept_outputs.py)
        self.kept_outputs = KeptOutputs(output_cache_bytes)
        self.kernel = kernel or default_kernel(device)

    @classmethod
    def for_sequence(cls, model, batch, seq_len, page_size, dtype, device, grad_dtype=torch.float32, sparse=None,
                     output_cache_bytes=0, kernel=None):
        """A pool exactly large enough for every layer's K/V of `batch` sequences of `seq_len` tokens."""
        cfg = model.config
        num_pages = cfg.num_hidden_layers * batch * math.ceil(seq_len / page_size)
        return cls(cfg.num_hidden_layers, batch, *kv_heads(model), page_size, num_pages,
                   dtype, device, grad_dtype=grad_dtype, sparse=sparse, output_cache_bytes=output_cache_bytes,
                   kernel=kernel)

    @staticmethod
    def output_bytes_per_token(cfg, dtype) -> int:
        """What keeping one token's attention outputs costs, over all layers: o in `dtype` and the fp32 lse."""
        return cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.head_dim * dtype.itemsize + 4)

    @staticmethod
    def bytes_per_token(cfg, dtype, grad_dtype=torch.float32) -> int:
        """Pool bytes per token per sequence: K and V in `dtype`, dK and dV in grad_dtype, over all layers."""
        per_layer = cfg.num_key_value_heads * cfg.head_dim * 2 * (dtype.itemsize + grad_dtype.itemsize)
        return cfg.num_hidden_layers * per_layer

    def length(self, layer) -> int:
        return self.lengths[layer]

    def page_table(self, layer) -> torch.Tensor:
        return self._device_tables[layer]

    def reset(self):
        for layer in range(self.num_layers):
            self.truncate(layer, 0)

    def append(self, layer, k, v):
        """k, v: [B, T, Hkv, D] written at positions [length, length + T) of every batch element."""
        B, T = k.shape[:2]
        start, end = self.lengths[layer], self.lengths[layer] + T
        n_new = math.ceil(end / self.page_size) - math.ceil(start / self.page_size)
        if n_new:
            new = self.allocator.alloc(n_new * B)
            for b in range(B):
                self.tables[layer][b].extend(new[b * n_new:(b + 1) * n_new])
            new = to_device(torch.tensor(new, dtype=torch.int32).view(B, n_new), self.k.device)
            self._device_tables[layer] = torch.cat([self._device_tables[layer], new], dim=1)
            new = new.flatten().long()
            self.dk.index_fill_(0, new, 0.0)  # gradient pages start at zero, whatever they held before
            self.dv.index_fill_(0, new, 0.0)
        if self.selector is not None:
            if start % self.page_size:
                raise ValueError(f"sparse attention appends at page boundaries: layer {layer} holds {start} tokens")
            self.selector.write(self._device_tables[layer][:, start // self.page_size:], k)
        rows = self._rows(layer, start, end)  # [B * T] flat row indices into [num_pages * page_size]
        self.k.view(-1, *self.k.shape[2:]).index_copy_(0, rows, k.reshape(B * T, *k.shape[2:]).to(self.k.dtype))
        self.v.view(-1, *self.v.shape[2:]).index_copy_(0, rows, v.reshape(B * T, *v.shape[2:]).to(self.v.dtype))
        self.lengths[layer] = end

    def _rows(self, layer, start, end):
        positions = torch.arange(start, end, device=self.k.device)
        pages = self.page_table(layer)[:, positions // self.page_size].long()  # [B, T]
        return (pages * self.page_size + positions % self.page_size).flatten()

    def truncate(self, layer, length):
        keep = math.ceil(length / self.page_size)
        for table in reversed(self.tables[layer]):
            self.allocator.release(table[keep:])
            del table[keep:]
        self.lengths[layer] = min(self.lengths[layer], length)
        self._device_tables[layer] = self._device_tables[layer][:, :keep]  # a prefix: no copy
        if self.selector is not None:
            self.selector.truncate(layer, length)
        self.kept_outputs.forget_from(layer, length)  # they attended over positions that are gone

    def clear_grad(self, layer, start, end):
        """Zero the dK/dV accumulated for the layer's positions [start, min(end, length)) (start a multiple of
        page_size; the pages are the chunk's own, so whole pages are zeroed)."""
        first, last = start // self.page_size, math.ceil(min(end, self.lengths[layer]) / self.page_size)
        if last > first:
            pages = self._device_tables[layer][:, first:last].flatten().long()
            self.dk.index_fill_(0, pages, 0.0)
            self.dv.index_fill_(0, pages, 0.0)

    def attend(self, layer, q, k, v, keep_output=False, doc_start=None):
        """The chunk's attention over the layer's pages: one part (attention.py), the whole pool seen through the
        layer's table, or with sparse attention through a table per kv head and query block. keep_output: keep the
        output (without grad, within output_cache_bytes) for a later attend of the same queries over the same
        positions, which then skips the forward kernels. doc_start [B, C]: the queries' document starts
        (absolute positions; see chunk_train.chunked_step), hiding every earlier position."""
        start = self.lengths[layer] - q.shape[1]  # the chunk's first position
        table, q_start, q_block, doc, index = self.page_table(layer), start, None, doc_start, None
        if self.selector is not None:
            table, q_start = self.selector.page_table(layer, q, table, start, doc_start)  # per kv head and block
            q_block = self.selector.q_block
            if doc_start is not None:  # in the positions of each block's table
                doc = doc_positions(self.selector.selections[layer][start], doc_start, start, self.page_size,
                                    q_block)
            if q_start and torch.is_grad_enabled():  # the backward's index of the history, for a chunk's layers
                index = functools.partial(self.selector.history_index, layer, start, self.k.shape[0])
        history = OnePart(Part(self.k, self.v, self.dk, self.dv, table, q_start, q_block=q_block, doc_start=doc,
                               history_index=index))
        return self.kept_outputs.attend((layer, start, q.shape[1]), history, q, k, v, self.kernel, keep=keep_output)


class _AddStoredGrad(torch.autograd.Function):
    """Identity in forward; backward adds `stored` (what later chunks accumulated for these K/V) to the gradient."""

    @staticmethod
    def forward(ctx, x, stored):
        ctx.stored = stored  # by reference: read at backward time (save_for_backward would trip on the history
        return x.view_as(x)  # hooks' in-place adds, which share the buffer's version counter)

    @staticmethod
    def backward(ctx, grad):
        return grad + ctx.stored.to(grad.dtype), None


class ReferenceKVStore:
    """Contiguous fp32-gradient buffers per layer and plain-PyTorch attention: the readable reference."""

    def __init__(self, num_layers, batch, n_kv_heads, head_dim, max_len, dtype, device):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.dk = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(num_layers)]
        self.dv = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers

    @classmethod
    def for_sequence(cls, model, batch, seq_len, page_size, dtype, device):
        return cls(model.config.num_hidden_layers, batch, *kv_heads(model), seq_len, dtype, device)

    def length(self, layer):
        return self.lengths[layer]

    def reset(self):
        for layer in range(len(self.lengths)):
            self.truncate(layer, 0)

    def append(self, layer, k, v):
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[1]
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        self.dk[layer][:, start:end] = 0
        self.dv[layer][:, start:end] = 0
        self.lengths[layer] = end

    def truncate(self, layer, length):
        self.lengths[layer] = min(self.lengths[layer], length)

    def clear_grad(self, layer, start, end):
        self.dk[layer][:, start:end] = 0
        self.dv[layer][:, start:end] = 0

    def attend(self, layer, q, k, v, keep_output=False, doc_start=None):  # keep_output: PagedKVStore's, ignored
        end = self.lengths[layer]
        start = end - q.shape[1]
        # history: constants whose gradient is routed into the fp32 buffers by a hook
        k_hist = self.k[layer][:, :start].detach().float().requires_grad_(torch.is_grad_enabled())
        v_hist = self.v[layer][:, :start].detach().float().requires_grad_(torch.is_grad_enabled())
        if torch.is_grad_enabled():
            k_hist.register_hook(lambda g: self.dk[layer][:, :start].add_(g))
            v_hist.register_hook(lambda g: self.dv[layer][:, :start].add_(g))
            k = _AddStoredGrad.apply(k, self.dk[layer][:, start:end])
            v = _AddStoredGrad.apply(v, self.dv[layer][:, start:end])
        k_all = torch.cat([k_hist, k.float()], dim=1)  # [B, end, Hkv, D]
        v_all = torch.cat([v_hist, v.float()], dim=1)
        # the reference kernel takes pages: view the contiguous buffer as one page per batch element
        table = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)[:, None]
        o = paged_attention_reference(q.float(), k_all, v_all, table, start, doc_start=doc_start)
        return o.to(q.dtype)
