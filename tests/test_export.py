"""export.py against transformers: the exported directory loads with AutoModelForCausalLM and gives our logits
(fp32, max abs error <= 1e-4, like tests/test_model.py's parity tests), keeps the init checkpoint's config fields and
tokenizer, and replaces an earlier export only once complete."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from export import export_hf
from model import Model, ModelConfig

transformers = pytest.importorskip("transformers")

VOCAB = 300


def random_model(tied: bool, seed: int = 0, **overrides) -> Model:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied), **overrides})
    model = Model(cfg).eval()
    with torch.no_grad():  # Model initialises biases and norms to constants: randomise them so parity means something
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def assert_transformers_logits_match(model: Model, path, seed: int = 0):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        err = (model(idx) - hf(idx).logits).abs().max().item()
    assert err <= 1e-4, err
    return hf


@pytest.mark.parametrize("tied,sharded", [(True, False), (False, False), (True, True), (False, True)])
def test_export_loads_in_transformers_with_our_logits(tmp_path, tied, sharded):
    model = random_model(tied, seed=int(tied) + 2 * int(sharded))
    max_shard = 40_000 if sharded else 5 * 2**30  # tiny model: ~0.5 MB (tied) in fp32 -> about a dozen shards
    out = tmp_path / "hf"
    export_hf(model, out, max_shard_bytes=max_shard)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-")]
    if sharded:
        assert "model.safetensors" not in files and len(shards) > 2
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        from safetensors import safe_open
        total = 0
        for shard in shards:
            with safe_open(str(out / shard), "pt") as f:
                sizes = [f.get_tensor(k).nbytes for k in f.keys()]
                assert all(index["weight_map"][k] == shard for k in f.keys())
            assert sum(sizes) <= max_shard or len(sizes) == 1  # only a tensor larger than a shard exceeds it
            total += sum(sizes)
        assert index["metadata"]["total_size"] == total
    else:
        assert files == ["config.json", "model.safetensors"]
    hf = assert_transformers_logits_match(model, out)
    if sharded:
        names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    else:
        names = set(load_file(str(out / "model.safetensors")))
    assert ("lm_head.weight" in names) != tied  # a tied head is the embedding, saved once, as transformers does
    assert hf.config.tie_word_embeddings == tied


def make_init_checkpoint(path, model: Model):
    """An init checkpoint directory as a user has one: a config.json in transformers 4's layout (top-level
    rope_theta, torch_dtype) with bos/eos/pad ids and fields we do not model, a real (tiny) tokenizer and a
    generation_config.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    os.makedirs(path)
    config = {**model.config.to_hf_dict(), "bos_token_id": 3, "eos_token_id": 4, "pad_token_id": 5,
              "use_mrope": False, "rope_scaling": {"type": "default"}, "sliding_window": 4096,
              "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.40.1"}
    (path / "config.json").write_text(json.dumps(config))
    vocab = {w: i for i, w in enumerate(["<unk>", "a", "b", "<s>", "</s>", "<pad>", "hello", "world"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 3, "eos_token_id": [4, 5]}))
    return config


def test_export_keeps_init_config_and_tokenizer(tmp_path):
    model = random_model(tied=True, seed=5, rope_theta=1e6)  # our RoPE base differs from the init's 1e4: ours wins
    init = tmp_path / "init"
    make_init_checkpoint(init, model)
    out = tmp_path / "run" / "hf"  # parent created by the export
    export_hf(model, out, init_dir=init)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"], config["use_mrope"],
            config["sliding_window"], config["rope_scaling"], config["use_sliding_window"]) == (
        3, 4, 5, False, 4096, None, False)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e6
    assert config["dtype"] == config["torch_dtype"] == "float32" and "transformers_version" not in config
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (init / name).read_bytes(), name
    assert not (out / "vocab.json").exists() and not (out / "merges.txt").exists()  # not in init: not copied
    hf_config = transformers.AutoConfig.from_pretrained(str(out))
    assert (hf_config.bos_token_id, hf_config.eos_token_id) == (3, 4)
    assert hf_config.rope_parameters["rope_theta"] == 1e6
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("hello world a").ids == [6, 7, 1]
    tok, init_tok = (transformers.AutoTokenizer.from_pretrained(str(d)) for d in (out, init))
    text = "hello a world b <s>"
    assert tok(text).input_ids == init_tok(text).input_ids and tok.eos_token_id == init_tok.eos_token_id == 4
    hf = assert_transformers_logits_match(model, out, seed=1)
    assert hf.generation_config.eos_token_id == [4, 5]


def test_export_dtype(tmp_path):
    model = random_model(tied=False, seed=6)
    export_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    saved = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, p in model.state_dict().items():
        assert saved[name].dtype == torch.bfloat16 and torch.equal(saved[name], p.to(torch.bfloat16)), name
    model.to(torch.bfloat16)  # default: the model's own dtype
    export_hf(model, tmp_path / "own")
    own = load_file(str(tmp_path / "own" / "model.safetensors"))
    assert all(torch.equal(own[k], saved[k]) for k in saved)
    assert json.loads((tmp_path / "own" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_replaces_an_existing_one_only_when_complete(tmp_path, monkeypatch):
    import safetensors.torch
    out = tmp_path / "hf"
    first = random_model(tied=True, seed=7)
    export_hf(first, out, max_shard_bytes=40_000)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    real_save, calls = safetensors.torch.save_file, []

    def failing_save(*args, **kwargs):  # the second shard's write dies: an export interrupted half-way
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    second = random_model(tied=True, seed=8)
    with pytest.raises(OSError, match="disk full"):
        export_hf(second, out, max_shard_bytes=40_000)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # the old export, untouched
    assert os.listdir(tmp_path) == ["hf"]  # the partial directory is gone
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    export_hf(second, out)  # now complete: replaces the sharded export by a single file, no stale shards left
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"] and os.listdir(tmp_path) == ["hf"]
    assert_transformers_logits_match(second, out)


def test_export_errors(tmp_path):
    from lora import apply_lora
    model = random_model(tied=True)
    with pytest.raises(ValueError, match=r"init/config.json: not found"):
        export_hf(model, tmp_path / "out", init_dir=tmp_path / "init")
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"init/config.json: not valid JSON"):
        export_hf(model, tmp_path / "out", init_dir=tmp_path / "init")
    (tmp_path / "init" / "config.json").write_text(json.dumps({**model.config.to_hf_dict(), "vocab_size": 512}))
    with pytest.raises(ValueError, match=r"init/config.json: vocab_size 512 differs"):
        export_hf(model, tmp_path / "out", init_dir=tmp_path / "init")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        export_hf(model, tmp_path / "file")
    apply_lora(model, rank=2, alpha=4)
    with pytest.raises(ValueError, match="merge LoRA adapters first"):
        export_hf(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["file", "init"]  # no failed export left anything behind
