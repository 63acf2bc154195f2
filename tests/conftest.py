import os
import sys

import pytest

# One intra-op thread (set before torch loads; subprocesses inherit it): the tests' tensors are tiny, so a second
# thread gains nothing, while on a shared 2-core machine (CI, or other jobs) OpenMP's spinning threads multiply the
# run time of every small op several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# tests import the top-level modules (model, data, train, ...) from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Without a GPU, Triton kernels run through Triton's CPU interpreter; this must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def wide_kv_tiles(monkeypatch):
    """Kernel tiles whose kv side spans several pages (the kernels then look pages up per position): BLOCK_N 32
    for the forward and dQ, 64 for dK/dV, over the tests' 16-position pages."""
    import kernels.paged_attention as pa
    monkeypatch.setattr(pa, "_launch_config",
                        lambda kind, *args: (32, 64, 4, 1) if kind == "dkdv" else (16, 32, 4, 1))


class LowRankDelta(torch.nn.Module):
    """A LoRA-like wrapper written for the tests: base(x) + x @ A @ B, the wrapped nn.Linear its child `base`,
    A [in, rank] and B [rank, out] random in the base weight's dtype."""

    def __init__(self, base, rank, generator):
        super().__init__()
        self.base = base
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.A = torch.nn.Parameter((0.1 * torch.randn(base.in_features, rank, generator=generator)).to(**like))
        self.B = torch.nn.Parameter((0.1 * torch.randn(rank, base.out_features, generator=generator)).to(**like))

    def forward(self, x):
        return self.base(x) + x @ self.A @ self.B


@pytest.fixture
def wrap_linears():
    """wrap(module, rank=2, seed=0): replace every nn.Linear inside `module` by a LowRankDelta around it."""
    def wrap(module, rank=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, LowRankDelta(child, rank, g))
        return module
    return wrap
