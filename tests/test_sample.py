"""sample.py: greedy generation through the KV stores equals transformers' generate on a tiny random checkpoint
(prompt prefilled over several chunks, decoding across a page boundary), the sampling filters keep exactly the
top-k / nucleus tokens at their renormalised probabilities, and the CLI prints text or a one-line error."""

import pytest
import torch

from model import Model
from paged_kv import PagedKVStore, ReferenceKVStore
from sample import generate, main, next_token
from tiny_tokenizer import make_tokenizer_dir
from tokenize_data import load_tokenizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # PagedKVStore on a CPU runs under Triton's interpreter


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 2-layer Qwen2ForCausalLM (vocab 300, head_dim 16) saved with its tokenizer -> (dir, HF model)."""
    transformers = pytest.importorskip("transformers")
    path = str(tmp_path_factory.mktemp("sample_ckpt"))
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True,
                                   rope_theta=1e4, rms_norm_eps=1e-6)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF sets biases and norms to constants; random ones make parity mean more
        for name, p in hf.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "embed" in name:
                p.mul_(20)  # larger logits: a random model's greedy path then has clear argmaxes
    hf.save_pretrained(path)
    make_tokenizer_dir(path)
    return path, hf


@pytest.mark.parametrize("store_kind", ["reference", "paged"])
def test_greedy_matches_transformers_generate(checkpoint, store_kind):
    path, hf = checkpoint
    model = Model.from_pretrained(path, device=DEVICE).eval()
    prompt = torch.randint(0, 300, (44,), generator=torch.Generator().manual_seed(1)).tolist()
    n_new = 6  # positions 44..49: decoding appends into a partly filled page, then opens the next (page 16)
    if store_kind == "paged":
        store = PagedKVStore.for_sequence(model, 1, 44 + n_new, 16, torch.float32, DEVICE)
    else:
        store = ReferenceKVStore.for_sequence(model, 1, 44 + n_new, 16, torch.float32, DEVICE)
    ours = generate(model, prompt, n_new, store=store, chunk_size=16)  # chunks [0,16) [16,32) [32,44)
    with torch.no_grad():
        ref = hf.to(DEVICE).generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=n_new, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, 44:].tolist()
    assert len(ref) == n_new and ours == ref
    assert store.length(0) == 44 + n_new - 1  # the last token is returned, never fed back


def test_sampling_draws_from_filtered_renormalised_distribution():
    torch.manual_seed(2)
    logits = torch.randn(12) * 2
    probs = torch.softmax(logits.double() / 0.7, -1)
    order = probs.argsort(descending=True)
    for top_k, top_p in [(4, None), (None, 0.6), (5, 0.8), (None, None)]:
        keep = torch.zeros(12, dtype=torch.bool)
        keep[order[:top_k or 12]] = True
        if top_p is not None:  # nucleus: the highest-ranked tokens until their mass reaches top_p
            mass = probs[keep].sum()
            ranked = [int(i) for i in order if keep[i]]
            cum = torch.cumsum(probs[ranked] / mass, 0)
            n_keep = int((cum < top_p).sum()) + 1
            keep[:] = False
            keep[ranked[:n_keep]] = True
        want = torch.where(keep, probs, 0) / probs[keep].sum()
        g = torch.Generator().manual_seed(3)
        draws = torch.tensor([next_token(logits, 0.7, top_k, top_p, g) for _ in range(3000)])
        freq = torch.bincount(draws, minlength=12).double() / len(draws)
        assert (freq[~keep] == 0).all()
        torch.testing.assert_close(freq, want, atol=0.035, rtol=0)  # ~4 standard errors of 3000 draws
    assert next_token(logits) == int(logits.argmax())


def test_sampled_generation_is_seeded(checkpoint):
    path, _ = checkpoint
    model = Model.from_pretrained(path).eval()
    runs = [generate(model, list(range(5, 13)), 3, chunk_size=8, temperature=20.0, top_p=0.99, seed=7)
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 3
    logits = torch.randn(50, generator=torch.Generator().manual_seed(4))
    assert next_token(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(5)) == int(logits.argmax())


def test_cli_prints_text_or_one_line_error(checkpoint, tmp_path, capsys):
    path, hf = checkpoint
    prompt_file = tmp_path / "prompt.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 2
    prompt_file.write_text(text)
    assert main(["--init-from", path, "--prompt-file", str(prompt_file), "--max-new-tokens", "3",
                 "--chunk-size", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(path)
    with torch.no_grad():  # the reference: transformers' greedy continuation of the same tokens (no eos yet)
        ref = hf.cpu().generate(torch.tensor([tok.encode(text)]), max_new_tokens=3, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(tok.encode(text)):].tolist()
    assert tok.eos_id not in ref and out == text + tok.decode(ref) + "\n"
    for args, match in [(["--prompt-file", str(tmp_path / "missing.txt")], "missing.txt: cannot read"),
                        (["--prompt", ""], "--prompt: the prompt is empty")]:
        assert main(["--init-from", path, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1
    assert main(["--init-from", str(tmp_path), "--prompt", "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
