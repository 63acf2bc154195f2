import os
import sys

import pytest
import torch

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
