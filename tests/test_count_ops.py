"""bench/count_ops.py: the host work of a chunked step, counted through Triton's interpreter."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_counts_the_launches_the_chunked_step_makes():
    """2 layers, 2 chunks: stage 1 runs the first chunk only (the last is left to stage 2), and its last layer stops
    after the K/V projection, so 1 forward attention launch there; stage 2 recomputes both chunks through both layers
    (4 forward launches) and runs each backward once (4 dq, 4 dK/dV launches)."""
    proc = subprocess.run([sys.executable, "bench/count_ops.py", "--seq", "128", "--chunk", "64", "--page-size", "16",
                           "--top", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.splitlines()[0]
    counts = re.search(r"([\d,]+) aten ops and ([\d,]+) Triton", head).groups()
    ops, launches = (int(x.replace(",", "")) for x in counts)
    found = dict((name, int(n)) for n, name in re.findall(r"launch\s+(\d+)\s+(\S+)", proc.stdout))
    assert (found["_fwd_kernel"], found["_dq_kernel"], found["_dkdv_kernel"]) == (1 + 4, 4, 4), proc.stdout
    assert launches == sum(found.values()) and ops > 100, head  # the model's own ops are counted too
    assert len(re.findall(r"^  op ", proc.stdout, re.M)) == 5
