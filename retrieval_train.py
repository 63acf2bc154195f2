"""
The long-range retrieval experiment: train a byte-level model from scratch, chunk-recurrently, on retrieval.py's
many-question task, and measure answer accuracy at a fixed distance as it trains.

    python retrieval_train.py train --out runs/dense --attn dense --distance 32768 --steps 1000
    python retrieval_train.py train --out runs/sparse --attn sparse ...      # page-level sparse attention
    python retrieval_train.py train --out runs/detached --attn detached ...  # no gradient into earlier chunks' K/V
    python retrieval_train.py plot --out runs/retrieval.png runs/dense runs/sparse runs/detached

Each example (retrieval.make_qa_example) holds --pairs key->value pairs early, then filler, then --questions
questions at the end; every asked pair starts at least --distance bytes before the first question and the loss
covers the answer bytes alone (targets elsewhere are model.IGNORE_INDEX). A step trains on --batch fresh examples,
a function of (seed, step). Every --eval-every steps the model answers a fixed held-out set at the final distance
(seeds disjoint from training) by greedy argmax: per-byte accuracy (chance 1/26) and exact match of whole answers.

Modes (--attn): dense, exact chunk-recurrent training (chunk_train.chunked_step); sparse, the same with the store's
page-level sparse attention (--budget history tokens per 128-query block, MeanKey selection; evaluated sparse too);
detached, dense attention with the gradients into earlier chunks' K/V cut (chunked_step(detach_history=True)): a
pair --chunk or more bytes before its question can then only be found by weights trained for something else.

--curriculum D0: the training distance stays at D0 for the first --curriculum-hold of the steps, then grows
geometrically to --distance by --curriculum-frac of them (the length with it); evaluation is always at --distance,
and at D0 too (exact_match_at_start). --hold-until ACC ends the hold as soon as that exact match reaches ACC (the
growth then starts early and the full distance gets the steps saved).
Why a hold: the retrieval circuit forms suddenly after a long plateau (bench/RESULTS.md), and short examples buy the
plateau's steps cheaply; once formed, the growing distance only has to stretch it.

Writes OUT/config.json, OUT/log.jsonl (one record per step; evaluation fields every --eval-every steps) and
OUT/curve.png. `plot` draws several runs' curves in one PNG and prints a table of their final figures.
"""

import argparse
import json
import math
import os
import sys
import time


def chance_per_byte(args):
    """Accuracy of a uniform guess per answer byte: values are uniform capitals, or symbols of the keys' alphabet."""
    return 1 / args.key_symbols if args.values_like_keys else 1 / 26


class UserError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(argv):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser("train", help="train one mode, evaluating as it goes")
    t.add_argument("--out", required=True, help="run directory (refused if it holds a run, unless --overwrite)")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--attn", choices=("dense", "sparse", "detached"), default="dense")
    t.add_argument("--distance", type=int, default=32768, help="bytes from each asked pair to the first question")
    t.add_argument("--length", type=int, default=None,
                   help="bytes per example (default: distance + room for the pairs and questions, page-aligned)")
    t.add_argument("--pairs", type=int, default=64, help="key->value pairs per example")
    t.add_argument("--questions", type=int, default=32, help="questions (answers) per example")
    t.add_argument("--key-len", type=int, default=4, help="symbols per key")
    t.add_argument("--key-symbols", type=int, default=10,
                   help="alphabet of a key symbol: digits (<= 10), else that many non-ASCII bytes (<= 128)")
    t.add_argument("--key-capitals", action="store_true",
                   help="keys spelled in the first --key-symbols capitals (<= 26), the values' alphabet")
    t.add_argument("--value-len", type=int, default=4, help="symbols per answer (capitals by default)")
    t.add_argument("--values-like-keys", action="store_true",
                   help="values spelled in the keys' alphabet (chance 1 / --key-symbols per byte)")
    t.add_argument("--no-separator", dest="separator", action="store_false",
                   help='pairs "#" key value ";" (no "="): the value right after its key')
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=8, help="examples per step (at --distance)")
    t.add_argument("--short-batch", type=int, default=None, metavar="B0",
                   help="on the curriculum: B0 examples per step at D0, as many tokens per step while the examples "
                        "grow, never fewer than --batch examples")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--curriculum", type=int, default=0, metavar="D0", help="start distance (0: none)")
    t.add_argument("--curriculum-frac", type=float, default=0.8, help="reach --distance at this fraction of steps")
    t.add_argument("--curriculum-hold", type=float, default=0.0, help="stay at D0 for this fraction of the steps")
    t.add_argument("--hold-until", type=float, default=None, metavar="ACC",
                   help="end the hold early once the exact match at D0 reaches ACC (checked every --eval-every)")
    t.add_argument("--eval-every", type=int, default=25)
    t.add_argument("--eval-examples", type=int, default=16)
    t.add_argument("--model", default="small", help="model.py preset (default: %(default)s)")
    t.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    t.add_argument("--hidden", type=int, default=None, help="override the preset's hidden size (head_dim kept)")
    t.add_argument("--chunk", type=int, default=2048)
    t.add_argument("--page-size", type=int, default=64)
    t.add_argument("--budget", type=int, default=4096, help="sparse: history tokens per query block")
    t.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop after the first step that ends past S seconds of training (evaluating there)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p = sub.add_parser("plot", help="one PNG of several runs' curves, and a table of their final figures")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("runs", nargs="+", help="run directories")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ checks


def pair_len(args):
    """Bytes of one pair (and of one question): "#" key "=" value ";" ("?" ... ";"), without "=" on --no-separator."""
    return args.key_len + args.value_len + 2 + args.separator


def resolve(args):
    """Check the training arguments (no torch needed) and fill in the derived length; UserError if bad."""
    for name in ("distance", "pairs", "questions", "value_len", "steps", "batch", "eval_every", "eval_examples",
                 "chunk", "page_size", "budget"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.short_batch is not None and not (args.curriculum and args.short_batch >= args.batch):
        raise UserError(f"--short-batch {args.short_batch} needs --curriculum and must be >= --batch {args.batch}")
    if args.questions > args.pairs:
        raise UserError(f"--questions {args.questions} exceeds --pairs {args.pairs}")
    if args.page_size < 16 or args.page_size & (args.page_size - 1) or args.chunk % args.page_size:
        raise UserError(f"--page-size {args.page_size} must be a power of two >= 16 dividing --chunk {args.chunk}")
    if args.attn == "sparse" and (args.budget % args.page_size or args.budget < 2 * args.page_size):
        raise UserError(f"--budget {args.budget} must be a multiple of --page-size {args.page_size}, at least two")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UserError(f"--time-budget must be > 0, got {args.time_budget:g}")
    if not (args.lr > 0 and args.weight_decay >= 0 and 0 < args.curriculum_frac <= 1 and args.warmup >= 0):
        raise UserError("need --lr > 0, --weight-decay >= 0, 0 < --curriculum-frac <= 1, --warmup >= 0")
    if not 0 <= args.curriculum_hold < args.curriculum_frac:
        raise UserError(f"--curriculum-hold {args.curriculum_hold:g} must lie in [0, --curriculum-frac "
                        f"{args.curriculum_frac:g})")
    if args.hold_until is not None and not (0 <= args.hold_until <= 1 and args.curriculum and args.curriculum_hold):
        raise UserError(f"--hold-until {args.hold_until:g} must lie in [0, 1] and needs --curriculum and "
                        f"--curriculum-hold > 0")
    if not 0 <= args.curriculum <= args.distance:
        raise UserError(f"--curriculum {args.curriculum} must lie in [0, --distance {args.distance}]")
    if not 2 <= args.key_symbols <= 128:
        raise UserError(f"--key-symbols {args.key_symbols} must lie in [2, 128]")
    if args.key_capitals and args.key_symbols > 26:
        raise UserError(f"--key-symbols {args.key_symbols} must be <= 26 with --key-capitals")
    if not 1 <= args.key_len <= 8 or args.pairs > args.key_symbols ** args.key_len:
        raise UserError(f"--key-len {args.key_len} must lie in [1, 8] and allow --pairs {args.pairs} distinct keys")
    pair = pair_len(args)
    if args.curriculum and args.curriculum < pair:
        raise UserError(f"--curriculum {args.curriculum} must be >= {pair} (a pair's length)")
    overhead = 2 * args.pairs * pair + args.questions * pair  # pairs at half density, then the questions
    if args.length is None:
        args.length = math.ceil((args.distance + overhead) / args.page_size) * args.page_size
    room = (args.length - args.questions * pair - args.distance) // pair + 1
    if args.distance < pair or room < args.pairs:
        raise UserError(f"--length {args.length} at --distance {args.distance} leaves room for {max(room, 0)} "
                        f"pairs before {args.questions} questions, --pairs {args.pairs} asked")
    if os.path.exists(os.path.join(args.out, "log.jsonl")) and not args.overwrite:
        raise UserError(f"--out {args.out} already holds a run (log.jsonl); pass --overwrite or another --out")
    return args


def distance_at(step, args, hold_end=None):
    """The training distance of `step`: --distance, or on the curriculum D0 * (D / D0)^progress, page-aligned.
    hold_end: the step at which --hold-until ended the hold early (None: the planned --curriculum-hold); the growth
    then takes as many steps as planned, and the full distance the rest."""
    hold = args.curriculum_hold * args.steps if hold_end is None else min(hold_end, args.curriculum_hold * args.steps)
    end = hold + (args.curriculum_frac - args.curriculum_hold) * args.steps
    progress = min(1.0, max(0.0, step - hold) / max(1, end - hold))
    if not args.curriculum or progress >= 1:
        return args.distance
    d = args.curriculum * (args.distance / args.curriculum) ** progress
    return max(pair_len(args), min(args.distance, round(d / args.page_size) * args.page_size))


def length_at(distance, args):
    """The example length at a training distance: --length (the full distance's) less the distance not travelled."""
    return args.length - args.distance + distance


def longest_with(batch, args):
    """The longest example batch_at gives `batch` (> --batch) examples (its inverse), page-aligned: what that
    batch's store must hold."""
    longest = args.short_batch * length_at(args.curriculum, args) // batch
    return min(args.length, -(-longest // args.page_size) * args.page_size)


def batch_at(step, args, hold_end=None):
    """The examples of `step`: --batch, or on the curriculum with --short-batch B0 the power of two nearest below
    B0 * length(D0) / length (the same tokens per step as at D0), between --batch and B0. Why: the plateau before the
    circuit forms is counted in answers seen, and short examples sell answers cheaply."""
    if not args.short_batch:
        return args.batch
    fit = args.short_batch * length_at(args.curriculum, args) // length_at(distance_at(step, args, hold_end), args)
    return max(args.batch, min(args.short_batch, 1 << (fit.bit_length() - 1) if fit else 0))


def lr_at(step, args):
    """Linear warm-up, then cosine decay to lr / 10 at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


# ------------------------------------------------------------------------------------------------ training


def build_model(args, device):
    from model import Model, ModelConfig, PRESETS
    if args.model not in PRESETS:
        raise UserError(f"--model {args.model!r} is not a preset; choose one of: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[args.model])
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if args.hidden is not None:
        if args.hidden % head_dim or args.hidden <= 0:
            raise UserError(f"--hidden {args.hidden} must be a positive multiple of the preset's head_dim {head_dim}")
        heads = args.hidden // head_dim
        ratio = cfg["intermediate_size"] / cfg["hidden_size"]
        cfg.update(hidden_size=args.hidden, num_attention_heads=heads,
                   num_key_value_heads=math.gcd(heads, cfg["num_key_value_heads"]),
                   intermediate_size=round(args.hidden * ratio / 16) * 16)
    if args.layers is not None:
        if args.layers <= 0:
            raise UserError(f"--layers must be > 0, got {args.layers}")
        cfg["num_hidden_layers"] = args.layers
    import torch
    torch.manual_seed(args.seed)
    return Model(ModelConfig(**cfg)).to(device)


def make_store(args, model, batch, length, device, dtype):
    """The KV/dKV pages of one batch: dense or page-level sparse (the plain-PyTorch attention on a CPU)."""
    from attention import ReferenceKernel
    from paged_kv import PagedKVStore
    from sparse_attn import MeanKey, SparseConfig
    sparse = SparseConfig(budget=args.budget, q_block=128, rule=MeanKey()) if args.attn == "sparse" else None
    kernel = ReferenceKernel() if device.type == "cpu" else None
    return PagedKVStore.for_sequence(model, batch, length, args.page_size, dtype, device, sparse=sparse,
                                     kernel=kernel)


def examples_at(seed, n, length, distance, args):
    from retrieval import make_qa_example
    return [make_qa_example((*seed, i), length, distance, args.pairs, args.questions, args.key_len,
                            args.value_len, args.key_symbols, args.separator, args.key_capitals,
                            args.values_like_keys)
            for i in range(n)]


def batch_tensors(examples, device):
    """-> ids [B, T], targets [B, T]: targets[:, i] = ids[:, i + 1] where that token is an answer byte, else
    IGNORE_INDEX (no loss); n_targets."""
    import numpy as np
    import torch
    from model import IGNORE_INDEX

    ids = torch.as_tensor(np.stack([e[0] for e in examples]), device=device)
    mask = torch.as_tensor(np.stack([e[1] for e in examples]), device=device).bool()
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], IGNORE_INDEX)
    return ids, targets, int(mask[:, 1:].sum())


def evaluate(model, stores, heldout, args, device, dtype):
    from retrieval import answer_accuracy
    score = answer_accuracy(model, heldout, args.chunk, args.batch, dtype,
                            make_store=lambda b, t: stores[b] if b in stores else make_store(args, model, b, t,
                                                                                             device, dtype))
    return score


def train(args):
    import numpy as np
    import torch
    from tqdm import tqdm
    from chunk_train import chunked_step

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    model = build_model(args, device)
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # compute (autocast) and K/V pages
    stores = {args.batch: make_store(args, model, args.batch, args.length, device, dtype)}  # one per batch size
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    heldout = examples_at((args.seed, 1), args.eval_examples, args.length, args.distance, args)
    # on a curriculum, the same questions at its start distance too: whether the circuit is exact where it trains
    # first, before the distance grows (the H200 run's hold ended with it half-formed: bench/RESULTS.md)
    heldout_start = (examples_at((args.seed, 1), args.eval_examples, length_at(args.curriculum, args), args.curriculum,
                                 args)
                     if args.curriculum else None)
    cfg, chance = model.config, chance_per_byte(args)
    config = {**vars(args), "device": str(device), "params": model.num_params(), "chance_per_byte": chance,
              "model_config": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size",
                                                            "num_attention_heads", "num_key_value_heads")}}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    until = f" or until exact match {args.hold_until:g} there" if args.hold_until is not None else ""
    curriculum = (f" (curriculum from {args.curriculum}, held for {args.curriculum_hold:.0%} of the steps{until}, "
                  f"grown by {args.curriculum_frac:.0%})" if args.curriculum else "")
    tqdm.write(f"retrieval {args.attn}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
               f"{model.num_params() / 1e6:.1f}M params on {device} | {args.batch} x {args.length} bytes"
               f"{f' ({args.short_batch} x shorter ones at first)' if args.short_batch else ''}, "
               f"{args.questions} answers of {args.value_len} bytes each at distance >= {args.distance}"
               f"{curriculum} | chunk {args.chunk}"
               f"{f', sparse budget {args.budget}' if args.attn == 'sparse' else ''} | chance {chance:.3f}/byte")
    extra = {"detach_history": True} if args.attn == "detached" else {}
    log = open(os.path.join(args.out, "log.jsonl"), "w")
    rates, acc, exact = [], float("nan"), float("nan")
    bar = tqdm(range(args.steps), desc=f"retrieval {args.attn}", dynamic_ncols=True)
    started, steps, hold_end, logged, interrupted = time.perf_counter(), args.steps, None, 0, False
    try:  # Ctrl-C: stop, keep what finished (log.jsonl is written a step at a time) and plot it
        for step in bar:
            t0 = time.perf_counter()
            distance = distance_at(step, args, hold_end)
            length = length_at(distance, args)
            batch = batch_at(step, args, hold_end)
            if batch not in stores:
                stores[batch] = make_store(args, model, batch, longest_with(batch, args), device, dtype)
            ids, targets, n_targets = batch_tensors(examples_at((args.seed, 0, step), batch, length, distance,
                                                                args), device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            loss = chunked_step(model, ids, targets, args.chunk, args.page_size, dtype, store=stores[batch], **extra)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates.append(ids.numel() / (time.perf_counter() - t0))
            record = {"step": step + 1, "loss": loss, "distance": distance, "length": length, "batch": batch,
                      "lr": lr_at(step, args), "tokens_per_s": rates[-1], "elapsed_s": time.perf_counter() - started}
            out_of_time = args.time_budget is not None and record["elapsed_s"] > args.time_budget
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps or out_of_time:
                model.eval()
                score = evaluate(model, stores, heldout, args, device, dtype)
                acc, exact = score.token_accuracy, score.exact_match
                if heldout_start is not None:
                    at_start = evaluate(model, stores, heldout_start, args, device, dtype)
                    record |= {"exact_match_at_start": at_start.exact_match,
                               "byte_accuracy_at_start": list(at_start.byte_accuracy)}
                    if (args.hold_until is not None and hold_end is None and distance == args.curriculum
                            and record["exact_match_at_start"] >= args.hold_until):
                        hold_end = record["hold_ended_at"] = step + 1
                        tqdm.write(f"step {step + 1}: exact match {record['exact_match_at_start']:.3f} at "
                                   f"distance {args.curriculum} >= --hold-until {args.hold_until:g}: the distance "
                                   f"grows from here")
                model.train()
                record |= {"token_accuracy": acc, "exact_match": exact, "byte_accuracy": list(score.byte_accuracy)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            logged = step + 1
            bar.set_postfix({"loss": f"{loss:.3f}", "d": distance, "acc": f"{acc:.3f}", "exact": f"{exact:.3f}",
                             "tok/s": f"{rates[-1]:,.0f}"})
            if out_of_time:
                steps = step + 1
                tqdm.write(f"stopped after step {steps} of {args.steps}: --time-budget {args.time_budget:g} s spent")
                break
    except KeyboardInterrupt:
        steps, interrupted = logged, True
        tqdm.write(f"interrupted after step {steps} of {args.steps}: plotting the finished steps")
    bar.close()
    log.close()
    plot([args.out], os.path.join(args.out, "curve.png"))
    median = float(np.median(rates)) if rates else float("nan")
    print(f"{'interrupted' if interrupted else 'done'}: {args.attn}, {steps} steps, distance {args.distance} | "
          f"per-byte accuracy {acc:.3f}, exact match {exact:.3f} (chance {chance:.3f} per byte) | {median:,.0f} tok/s "
          f"(median) | {args.out}/log.jsonl, curve.png")
    return 130 if interrupted else 0  # 128 + SIGINT, as a shell reports a Ctrl-C


# ------------------------------------------------------------------------------------------------ plot


def read_run(run):
    """-> (config dict, [log records]) of a run directory; UserError if it is not one."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(run, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{run}: not a run of retrieval_train.py ({type(e).__name__}: {e})") from None
    return config, records


def plot(runs, out):
    """Exact match and per-byte accuracy against step, one line per run, and each run's training loss with its
    curriculum distance beside them, in one PNG; prints a table of the final figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    loaded = [read_run(run) for run in runs]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    distance_axis = axes[2].twinx()
    print(f"{'run':<28} {'mode':<9} {'steps':>5} {'distance':>8} {'exact':>6} {'per-byte':>8} {'tok/s':>9}  "
          f"by answer byte (1st, 2nd, ...)")
    for run, (config, records) in zip(runs, loaded):
        evals = [r for r in records if "exact_match" in r]
        label = f"{config['attn']} ({os.path.basename(os.path.normpath(run))})"
        for ax, key in zip(axes, ("exact_match", "token_accuracy")):
            line, = ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker=".", label=label)
        at_start = [r for r in evals if "exact_match_at_start" in r]
        if at_start:  # the same questions at the curriculum's start distance
            axes[0].plot([r["step"] for r in at_start], [r["exact_match_at_start"] for r in at_start], linestyle="--",
                         color=line.get_color(), label=f"{label} at {config['curriculum']}")
        steps = [r["step"] for r in records]
        window = max(1, len(records) // 50)  # a running mean: one step's loss is noisy
        losses = [sum(r["loss"] for r in records[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(records))]
        axes[2].plot(steps, losses, color=line.get_color(), label=label)
        distance_axis.plot(steps, [r["distance"] for r in records], color=line.get_color(), linestyle=":")
        rates = sorted(r["tokens_per_s"] for r in records)
        last = evals[-1] if evals else {"exact_match": float("nan"), "token_accuracy": float("nan")}
        print(f"{run[-28:]:<28} {config['attn']:<9} {len(records):>5} {config['distance']:>8} "
              f"{last['exact_match']:>6.3f} {last['token_accuracy']:>8.3f} "
              f"{rates[len(rates) // 2] if rates else float('nan'):>9,.0f}  "
              f"{' '.join(f'{a:.2f}' for a in last.get('byte_accuracy', []))}")
    distances = "/".join(map(str, sorted({config["distance"] for config, _ in loaded})))
    value_lens = sorted({config.get("value_len", 4) for config, _ in loaded})
    per_byte = max(config.get("chance_per_byte", 1 / 26) for config, _ in loaded)  # the highest of the runs' alphabets
    for ax, title, level in ((axes[0], f"exact match (whole {'/'.join(map(str, value_lens))}-byte answers)",
                              per_byte ** value_lens[0]), (axes[1], "per-byte accuracy", per_byte)):
        ax.axhline(level, color="gray", linestyle=":", label="chance")
        ax.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02), title=f"{title}, held-out, distance {distances}")
        ax.grid(alpha=0.3)
    if any(config.get("curriculum") for config, _ in loaded):  # dashed lines to name
        axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[2].set(xlabel="step", ylabel="training loss (answer bytes, running mean)", title="training loss (solid), "
                "training distance (dotted)")
    distance_axis.set(yscale="log", ylabel="training distance (bytes)")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "plot":
            print(f"wrote {plot(args.runs, args.out)}")
            return 0
        return train(resolve(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
