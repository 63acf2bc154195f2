"""
Run each paged attention kernel twice on one 7B-shaped call (4096 queries after HIST positions of history, page 64,
28/4 heads, d=128), for Nsight Compute to profile the second run (GPU only):

    ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --launch-skip 3 --launch-count 3 -k 'regex:_(fwd|dq|dkdv)_kernel' python3 bench/ncu_probe.py

The first run of each kernel compiles it; `--launch-skip 3` skips those three launches.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import kernels.paged_attention as pa  # noqa: E402
from sweep_tiles import inputs  # noqa: E402

hist = int(os.environ.get("HIST", 12288))
q, do, k_pages, v_pages, dk_pages, dv_pages, table, q_start = inputs(hist + 4096, 4096, 64, torch.device("cuda"))
for _ in range(2):
    o, lse = pa.paged_attention_forward(q, k_pages, v_pages, table, q_start)
    pa.paged_attention_backward(do, q, o, lse, k_pages, v_pages, table, q_start, dk_pages, dv_pages)
torch.cuda.synchronize()
print("done")
