"""
PNG plots of a run, rewritten from OUT/log.jsonl at evaluations:

    OUT/loss.png              training loss per step, validation loss at each evaluation
    OUT/loss_by_position.png  validation loss by position bucket (evaluation.py), first and latest evaluation
    OUT/throughput.png        tokens/s and peak memory per step

Plotting takes a fraction of a second (more with the first import), so a run plots at an evaluation when PLOT_EVERY_S
have passed since it last plotted (or started), and always at its last evaluation (train.py).
matplotlib is imported lazily, through its object-oriented API with the Agg canvas (no pyplot, no global backend,
no display needed). Without matplotlib a run prints one notice and trains on.
"""

import importlib.util
import json
import os

PLOT_EVERY_S = 30.0
_notified = False


def read_log(path) -> list[dict]:
    """log.jsonl's records, a line cut short by a crash skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def _figure(width=6.4, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)  # a reader never sees half a file


def write_plots(out_dir: str, log_name: str = "log.jsonl") -> list[str]:
    """Write the three PNGs from out_dir/log.jsonl; returns their paths ([] without matplotlib)."""
    global _notified
    if importlib.util.find_spec("matplotlib") is None:
        if not _notified:
            print("plots: matplotlib is not installed, no PNGs written (pip install matplotlib)")
            _notified = True
        return []
    records = read_log(os.path.join(out_dir, log_name))
    steps = [r["step"] for r in records]
    paths = []

    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, [r["loss"] for r in records], label="train", linewidth=1)
    evals = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (mean over trained tokens)", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(os.path.join(out_dir, "loss.png"))
    _save(fig, paths[-1])

    curves = [r for r in records if r.get("val_by_position")]
    fig = _figure()
    ax = fig.add_subplot()
    shown = [(curves[0], "--"), (curves[-1], "o-")] if len(curves) > 1 else [(r, "o-") for r in curves]
    for r, style in shown:  # the first evaluation and the latest
        rows = [row for row in r["val_by_position"] if row[3]]  # buckets with trained tokens
        ax.plot([(a + b) / 2 for a, b, _, _ in rows], [loss for _, _, loss, _ in rows], style,
                label=f"step {r['step']} (val loss {r['val_loss']:.3f}, seq {r.get('val_seq')})")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="position in the document (bucket centre)", ylabel="val loss",
           title="loss by position: does more context help?")
    if curves:
        ax.legend()
    ax.grid(alpha=0.3)
    paths.append(os.path.join(out_dir, "loss_by_position.png"))
    _save(fig, paths[-1])

    fig = _figure(6.4, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, [r.get("tokens_per_s") for r in records], linewidth=1)
    top.set(ylabel="tokens/s", title="throughput and memory")
    bottom.plot(steps, [r.get("peak_mem_gib") for r in records], linewidth=1, color="tab:red")
    bottom.set(xlabel="step", ylabel="peak memory (GiB)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    paths.append(os.path.join(out_dir, "throughput.png"))
    _save(fig, paths[-1])
    return paths
