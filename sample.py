"""
Generation from a Qwen2 checkpoint, nanoGPT style, through the same KV stores training uses (paged_kv.py):

    prefill: the prompt, chunk by chunk (chunk_train.fill_kv for all but the last chunk: every layer's K/V appended,
             the last layer stopping at its K/V projection), then the last chunk through the whole model for the
             logits of the prompt's final position;
    decode:  one token at a time: its K/V appended to the store at position t, its query attending over [0, t].

A prompt of any length costs the activations of one chunk. Greedy when temperature == 0, else sampling from
softmax(logits / temperature) restricted to the top_k tokens and/or the smallest set of tokens whose probability
reaches top_p.

    python sample.py --init-from DIR --prompt "Once upon a time" --max-new-tokens 50
    python sample.py --init-from DIR --prompt-file long.txt --max-new-tokens 200 --temperature 0.8 --top-p 0.95
"""

import argparse
import sys

import torch

from chunk_train import ChunkAttention, fill_kv
from model import Model
from paged_kv import PagedKVStore, ReferenceKVStore
from tokenize_data import DataError, load_tokenizer


def default_store(model, seq_len, batch=1, page_size=64, dtype=None):
    """A store for `batch` sequences of seq_len tokens, K/V in `dtype` (default: the model's; under autocast, the
    compute dtype): the paged Triton kernels on a GPU, plain PyTorch elsewhere."""
    p = next(model.parameters())
    store_class = PagedKVStore if p.is_cuda else ReferenceKVStore
    return store_class.for_sequence(model, batch, seq_len, page_size, dtype or p.dtype, p.device)


def next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None) -> int:
    """logits: [vocab] -> a token id: argmax if temperature == 0, else a draw after the top-k / top-p filters."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def prefill(model, idx, store, chunk_size):
    """Append every layer's K/V of idx [1, T] to the (empty) store, chunk by chunk -> logits [vocab] at T - 1."""
    T = idx.shape[1]
    last = (T - 1) // chunk_size * chunk_size  # the final chunk runs through the whole model
    fill_kv(model, idx[:, :last], store, chunk_size, compute_dtype=next(model.parameters()).dtype)  # no autocast
    x = model.hidden(idx[:, last:], attn=ChunkAttention(store, last), start_pos=last)
    return model.head(x[:, -1:])[0, -1]


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, store=None, chunk_size=512, temperature=0.0, top_k=None,
             top_p=None, seed=0, eos_id=None) -> list[int]:
    """prompt_ids: a non-empty sequence of token ids -> up to max_new_tokens new ids (fewer if eos_id appears; the
    eos is included). store: a dense PagedKVStore / ReferenceKVStore for one sequence with room for the prompt and
    the new tokens (default: default_store); it is reset first. (A sparse PagedKVStore appends whole pages only, so
    it cannot decode a token at a time.)"""
    device = next(model.parameters()).device
    idx = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)[None]  # [1, T]
    if idx.shape[1] == 0:
        raise ValueError("the prompt is empty: generation needs at least one token")
    if max_new_tokens < 0 or chunk_size <= 0 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 0, chunk_size > 0, temperature >= 0; got {max_new_tokens}, "
                         f"{chunk_size}, {temperature}")
    if (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError(f"top_p must lie in (0, 1] and top_k be >= 1, got {top_p}, {top_k}")
    if int(idx.max()) >= model.config.vocab_size or int(idx.min()) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {model.config.vocab_size})")
    store = store if store is not None else default_store(model, idx.shape[1] + max_new_tokens)
    store.reset()
    generator = torch.Generator(device=device).manual_seed(seed)
    new = []
    if max_new_tokens == 0:
        return new
    logits = prefill(model, idx, store, chunk_size)
    for t in range(idx.shape[1], idx.shape[1] + max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)
        new.append(token)
        if token == eos_id or len(new) == max_new_tokens:
            break
        x = model.hidden(torch.tensor([[token]], device=device), attn=ChunkAttention(store, t), start_pos=t)
        logits = model.head(x)[0, -1]  # [vocab]
    return new


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate text from a Hugging Face Qwen2 checkpoint directory.")
    ap.add_argument("--init-from", required=True, help="checkpoint directory (config.json, safetensors, "
                                                        "tokenizer.json)")
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="a UTF-8 file holding the prompt (any length)")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=4096, help="prompt tokens per prefill chunk")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        if args.prompt_file is not None:
            try:
                with open(args.prompt_file, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{args.prompt_file}: cannot read the prompt ({e})") from None
        else:
            text = args.prompt
        tok = load_tokenizer(args.init_from)
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
        if not ids:
            raise DataError(f"{args.prompt_file or '--prompt'}: the prompt is empty")
        dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
        model = Model.from_pretrained(args.init_from, dtype=dtype, device=args.device).eval()
        if max(ids) >= model.config.vocab_size:
            raise DataError(f"{args.init_from}: the tokenizer yields id {max(ids)} >= the model's vocabulary "
                            f"{model.config.vocab_size}")
        new = generate(model, ids, args.max_new_tokens, chunk_size=args.chunk_size, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=tok.eos_id)
    except (DataError, ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text + tok.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
