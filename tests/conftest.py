import os
import sys

import torch

# tests import the top-level modules (model, data, train, ...) from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Without a GPU, Triton kernels run through Triton's CPU interpreter; this must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
