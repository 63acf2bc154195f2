"""
Host work of one chunked training step, counted on a CPU (issue #18: "count launches and host work per chunk and cut
them"). A small model's step is host-bound on a GPU: its time goes to issuing PyTorch ops and Triton launches, not to
computing them. Their number does not depend on the device, so it is counted here, with Triton's interpreter
standing in for the GPU (the same launcher code runs; the interpreter's own tensor work is not counted).

    python bench/count_ops.py                                  # the tiny preset, 2048 tokens in chunks of 512
    python bench/count_ops.py --attn-kernel sdpa --layers 4    # another kernel, fewer layers (faster)
    python bench/count_ops.py --packed 4                       # 4 documents packed per sequence (doc_start masks)
    python bench/count_ops.py --keep-activations 3             # stage 1's chunks kept for stage 2 (no recompute)

Prints the totals per step and per layer-chunk (stage 1 and stage 2 together), and the most frequent ops.
"""
import argparse
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the launchers run, the kernels interpret
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from attention import ATTN_KERNELS, named_kernel  # noqa: E402
from chunk_train import chunked_step  # noqa: E402
from model import Model, preset  # noqa: E402
from paged_kv import PagedKVStore  # noqa: E402

class Counter(TorchDispatchMode):
    """aten ops by name and Triton launches by kernel name. A profile hook sees the interpreter's launch entry point
    (InterpretedFunction.run) called and return: that is a launch, and the ops issued in between are the
    interpreter's stand-in for the GPU, not counted (nothing in Triton or the project is replaced)."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.depth = collections.Counter(), collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.depth:
            self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))

    def _profile(self, frame, event, arg):
        code = frame.f_code
        if code.co_name == "run" and code.co_filename.endswith("interpreter.py"):
            if event == "call":
                if not self.depth:
                    self.launches[getattr(frame.f_locals.get("self"), "__name__", "?")] += 1
                self.depth += 1
            elif event == "return":
                self.depth -= 1

    def __enter__(self):
        sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *exc):
        sys.setprofile(None)
        return super().__exit__(*exc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a preset (the counts depend on layers and chunks, not width)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (counts scale with them)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--attn-kernel", default="triton", choices=ATTN_KERNELS)
    ap.add_argument("--packed", type=int, default=0, metavar="N", help="N equal documents per sequence (0: none)")
    ap.add_argument("--keep-activations", type=int, default=0, metavar="N",
                    help="chunks before the last whose stage-1 forward is kept for stage 2 (chunked_step)")
    ap.add_argument("--top", type=int, default=25, help="ops to list")
    args = ap.parse_args(argv)
    if args.seq % args.chunk or (args.packed and args.seq % args.packed):
        raise SystemExit(f"error: --seq {args.seq} must be a multiple of --chunk {args.chunk} and of --packed")

    cfg = preset(args.model)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    torch.manual_seed(0)
    model = Model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, args.seq))
    targets = torch.randint(0, cfg.vocab_size, (1, args.seq))
    doc_start = None
    if args.packed:  # each position's document start: documents of seq / N tokens
        pos = torch.arange(args.seq)
        doc_start = (pos - pos % (args.seq // args.packed))[None]
    store = PagedKVStore.for_sequence(model, 1, args.seq, args.page_size, torch.float32, "cpu",
                                      kernel=named_kernel(args.attn_kernel, "cpu"))

    def step():
        return chunked_step(model, idx, targets, args.chunk, args.page_size, store=store, doc_start=doc_start,
                            keep_activations=args.keep_activations)

    step()  # once uncounted: first-call work (caches, lazily built tables) is not per step
    model.zero_grad(set_to_none=True)
    with Counter() as count:
        step()
    layer_chunks = cfg.num_hidden_layers * args.seq // args.chunk
    n_ops, n_launches = sum(count.ops.values()), sum(count.launches.values())
    print(f"{args.model} ({cfg.num_hidden_layers} layers), {args.seq} tokens in chunks of {args.chunk}, "
          f"--attn-kernel {args.attn_kernel}{f', {args.packed} packed documents' if args.packed else ''}"
          f"{f', {args.keep_activations} chunks kept' if args.keep_activations else ''}: "
          f"{n_ops:,} aten ops and {n_launches:,} Triton launches per step, {n_ops / layer_chunks:.0f} and "
          f"{n_launches / layer_chunks:.1f} per layer-chunk")
    for name, n in count.launches.most_common():
        print(f"  launch {n:6d}  {name}")
    for name, n in count.ops.most_common(args.top):
        print(f"  op     {n:6d}  {name}")


if __name__ == "__main__":
    main()
