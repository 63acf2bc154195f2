"""lora.py against references: the LoRA formula in fp64, peft's PeftModel on transformers' Qwen2ForCausalLM with the
same base weights (logits, fp32, max abs error <= 1e-4 as in tests/test_model.py), the merged model, and
full-sequence backprop for chunked gradients (fp32, relative error <= 1e-5 per parameter as in
tests/test_chunk_train.py)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from chunk_train import chunked_step
from export import export_hf
from lora import (LORA_TARGETS, AdapterError, LoRALinear, apply_lora, load_peft_adapter, lora_modules, merge_lora,
                  save_peft_adapter)
from model import Model, ModelConfig
from paged_kv import ReferenceKVStore

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 300


def random_model(tied: bool = False, seed: int = 0, layers: int = 2) -> Model:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = Model(cfg).eval()
    with torch.no_grad():  # random biases and norm weights, so that parity means something
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_twin(model: Model):
    """transformers' Qwen2ForCausalLM with our model's (plain, un-LoRA'd) weights."""
    cfg = transformers.Qwen2Config(**{k: v for k, v in model.config.to_hf_dict().items()
                                      if k not in ("model_type", "architectures")})
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    hf.load_state_dict(model.state_dict())
    return hf


def randomize_adapters(model, seed: int = 1):
    """Nonzero B (zero at init), fresh A: the delta must change the logits for parity to mean anything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / math.sqrt(m.in_features))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def tokens(seed=0, batch=2, seq=24):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_err(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ the module


def test_lora_linear_matches_formula_fp32():
    """base(x) + (alpha / r) (x A^T) B^T and its gradients (x, A, B) against fp64 autograd; init as PEFT's."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(24, 40, bias=True), rank=4, alpha=8)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert 0 < layer.lora_A.abs().max() <= 1 / math.sqrt(24)  # kaiming_uniform(a=sqrt 5): bound 1/sqrt(fan_in)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 24, requires_grad=True)
    hooked = []
    layer.base.register_forward_hook(lambda *args: hooked.append(1))  # base runs as a module: swappable
    y = layer(x)
    assert hooked == [1]
    params64 = [t.detach().double().requires_grad_() for t in (layer.base.weight, layer.base.bias, layer.lora_A,
                                                               layer.lora_B, x)]
    w, b, a, bb, x64 = params64
    ref = x64 @ w.T + b + 2.0 * (x64 @ a.T) @ bb.T
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    for got, want in ((layer.lora_A.grad, a.grad), (layer.lora_B.grad, bb.grad), (x.grad, x64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_lora_linear_bf16_base_under_autocast():
    """bf16 frozen base, fp32 adapters, bf16 autocast: a bf16 output and fp32 adapter gradients, within bf16
    rounding (rel. error <= 3e-2) of the fp64 formula."""
    torch.manual_seed(1)
    base = torch.nn.Linear(32, 48, bias=True).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, rank=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    a, bb = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    ref = x.double() @ base.weight.double().T + base.bias.double() + 2.0 * (x.double() @ a.T) @ bb.T
    dy = torch.randn_like(ref)
    y.float().backward(dy.float())
    ref.backward(dy)
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32 and base.weight.grad is None
    for got, want in ((y.detach(), ref.detach()), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, bb.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() <= 3e-2


def test_apply_lora_wraps_targets_and_freezes_the_rest():
    model = random_model()
    apply_lora(model, rank=4, alpha=8)
    modules = lora_modules(model)
    assert len(modules) == 7 * model.config.num_hidden_layers
    assert {name.rpartition(".")[2] for name in modules} == set(LORA_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}" for name in modules for ab in "AB"}
    assert model.model.layers[1].self_attn.q_proj.scale == 2.0

    model, idx = random_model(), tokens()
    with torch.no_grad():
        base_logits = model(idx)
        apply_lora(model, rank=4, alpha=8, targets=LORA_TARGETS)
        assert torch.equal(model(idx), base_logits)  # B = 0: training starts from the base model exactly


# ------------------------------------------------------------------------------------------------ PEFT format


def test_peft_loads_our_adapter_with_our_logits(tmp_path):
    model, idx = random_model(tied=False), tokens(1)
    hf = hf_twin(model)
    with torch.no_grad():
        base_logits = hf(idx).logits
    apply_lora(model, rank=4, alpha=8, targets=LORA_TARGETS)
    randomize_adapters(model)
    save_peft_adapter(model, str(tmp_path / "lora"), base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, list(LORA_TARGETS))
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B"
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "lora")).eval()
    with torch.no_grad():
        ours, theirs = model(idx), peft_model(idx).logits
    assert max_err(theirs, base_logits) > 1e-2  # the adapter matters ...
    assert max_err(ours, theirs) <= 1e-4  # ... and peft applies it as we do


def test_we_load_peft_saved_adapter_with_its_logits(tmp_path):
    """The other direction: an adapter written by peft itself (its full adapter_config.json) loads into our model."""
    model, idx = random_model(tied=True, seed=2), tokens(2)
    hf = hf_twin(model)
    lora_config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    peft_model = peft.get_peft_model(hf, lora_config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        theirs = peft_model(idx).logits
    peft_model.save_pretrained(str(tmp_path / "lora"))
    load_peft_adapter(model, str(tmp_path / "lora"))  # applies LoRA with the adapter's r, alpha and targets
    assert len(lora_modules(model)) == len(LORA_TARGETS) * model.config.num_hidden_layers
    with torch.no_grad():
        assert max_err(model(idx), theirs) <= 1e-4


def test_save_load_round_trip(tmp_path):
    """All seven targets; into a plain model (LoRA applied from the config) and into one already LoRA'd."""
    from safetensors.torch import load_file
    model = random_model(seed=4)
    apply_lora(model, rank=3, alpha=5.0)
    randomize_adapters(model, seed=4)
    save_peft_adapter(model, str(tmp_path / "a"))
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 7 * 2
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for fresh in (random_model(seed=4), apply_lora(random_model(seed=4), rank=3, alpha=5.0)):
        load_peft_adapter(fresh, str(tmp_path / "a"))
        got = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
        assert next(iter(lora_modules(fresh).values())).scale == 5.0 / 3


def test_merge_lora_equals_unmerged_forward():
    model, idx = random_model(tied=True, seed=5), tokens(5)
    apply_lora(model, rank=4, alpha=8, targets=LORA_TARGETS)
    randomize_adapters(model, seed=5)
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        merged = model(idx)
    assert not lora_modules(model)
    assert set(model.state_dict()) == set(random_model(tied=True).state_dict())  # a plain model again
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert max_err(merged, unmerged) <= 1e-5


def test_all_seven_targets_through_peft_merge_and_export(tmp_path):
    """down_proj included: peft's logits with our adapter = our merged model's = transformers' on its export."""
    model, idx = random_model(tied=False, seed=6), tokens(6)
    hf = hf_twin(model)
    apply_lora(model, rank=4, alpha=8)
    randomize_adapters(model, seed=6)
    save_peft_adapter(model, str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "lora")).eval()(idx).logits
        merged = merge_lora(model)(idx)
    assert max_err(merged, theirs) <= 1e-4
    export_hf(model, str(tmp_path / "hf"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_err(exported(idx).logits, theirs) <= 1e-4


# ------------------------------------------------------------------------------------------------ training


def test_chunked_gradients_with_lora_equal_full_sequence():
    """chunked_step (reference store, 3 chunks of 32, batch 2) vs the full-sequence mean cross-entropy backward:
    the loss and every adapter's gradient; the frozen base gets none. One layer: the Triton interpreter's cost is
    per kernel launch, and chunk_train's own tests cover deeper models; what is new here is LoRA in the chunks."""
    model = random_model(seed=7, layers=1)
    apply_lora(model, rank=4, alpha=8, targets=LORA_TARGETS)
    randomize_adapters(model, seed=7)
    model.train()
    idx, targets = tokens(7, seq=96), tokens(8, seq=96)
    ref_loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    store = ReferenceKVStore.for_sequence(model, 2, 96, 16, torch.float32, idx.device)
    loss = chunked_step(model, idx, targets, chunk_size=32, page_size=16, store=store)
    assert abs(loss - ref_loss.item()) <= 1e-5 * ref_loss.item()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        err = ((p.grad - ref[name]).norm() / ref[name].norm()).item()
        assert ref[name].norm() > 0 and err <= 1e-5, f"{name}: relative error {err:.2e}"


# ------------------------------------------------------------------------------------------------ errors


def test_bad_hyperparameters():
    for rank in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            apply_lora(random_model(), rank=rank, alpha=8)
    for alpha in (0, -1.0, float("nan"), float("inf"), "8"):
        with pytest.raises(ValueError, match="alpha must be a positive finite number"):
            apply_lora(random_model(), rank=4, alpha=alpha)
    for targets in ((), ("q_proj", "lm_head"), ("q_proj", "q_proj")):
        with pytest.raises(ValueError, match="targets must be distinct names among q_proj"):
            apply_lora(random_model(), rank=4, alpha=8, targets=targets)
    model = apply_lora(random_model(), rank=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_peft_adapter(random_model(), "unused")


def test_bad_adapter_directories(tmp_path):
    from safetensors.torch import load_file, save_file
    good = tmp_path / "good"
    model = apply_lora(random_model(), rank=4, alpha=8, targets=("q_proj", "v_proj"))
    save_peft_adapter(model, str(good))
    config = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))

    def broken(name, config_edit=None, tensors_edit=None, raw_config=None, raw_weights=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(raw_config if raw_config is not None
                                               else json.dumps({**config, **(config_edit or {})}))
        if raw_weights is not None:
            (d / "adapter_model.safetensors").write_bytes(raw_weights)
        else:
            save_file(tensors_edit(dict(tensors)) if tensors_edit else tensors, str(d / "adapter_model.safetensors"))
        return str(d)

    cases = [
        (str(tmp_path / "missing"), r"missing/adapter_config.json: not found"),
        (broken("json", raw_config="{"), r"json/adapter_config.json: not valid JSON"),
        (broken("ia3", {"peft_type": "IA3"}), r"ia3/adapter_config.json: peft_type 'IA3' is not supported"),
        (broken("dora", {"use_dora": True}), r"dora/adapter_config.json: use_dora=True is not supported"),
        (broken("save", {"modules_to_save": ["lm_head"]}), r"save/adapter_config.json: modules_to_save"),
        (broken("regex", {"target_modules": ".*proj"}), r"regex/adapter_config.json: target_modules must be a list"),
        (broken("head", {"target_modules": ["lm_head"]}), r"head/adapter_config.json: LoRA targets must be"),
        (broken("rank", {"r": 0}), r"rank/adapter_config.json: LoRA rank must be"),
        (broken("corrupt", raw_weights=b"\x00" * 64), r"corrupt/adapter_model.safetensors: cannot read"),
        (broken("shape", {"r": 2}), r"shape/adapter_model.safetensors: .*has shape \(4, 64\), rank 2 on this model"),
        (broken("keys", tensors_edit=lambda t: {k: v for k, v in t.items() if ".1.self_attn.v_proj" not in k}),
         r"keys/adapter_model.safetensors: keys do not match the model: missing \['base_model.model.model.layers.1"),
    ]
    for path, message in cases:
        fresh = random_model()
        with pytest.raises(AdapterError, match=message):
            load_peft_adapter(fresh, path)
        assert not lora_modules(fresh)  # validated before the model changes
    lora_model = apply_lora(random_model(), rank=8, alpha=8, targets=("q_proj", "v_proj"))
    with pytest.raises(AdapterError, match=r"good/adapter_config.json: r 4 differs from the model's LoRA 8"):
        load_peft_adapter(lora_model, str(good))
