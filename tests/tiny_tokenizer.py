"""A tiny byte-level BPE tokenizer trained in memory with the `tokenizers` library (no download), saved as a
checkpoint directory's tokenizer.json + tokenizer_config.json + config.json, as Qwen2.5 lays them out."""

import json
import os

TRAINING_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "def tokenize(text): return text.split()",
    "Long context training needs long documents, and retrieval needs keys and values.",
    "Über naïve café — unicode survives byte-level BPE. 東京 123 456",
] * 20


def make_tokenizer_dir(path, vocab_size=300, bos=None, eos="<|endoftext|>", model_vocab=None, template_bos=False,
                       **tokenizer_config):
    """Write the files; bos/eos: tokenizer_config.json's bos_token/eos_token (None: null), tokenizer_config: more
    of its keys; template_bos: tokenizer.json's post-processor adds <s> (as Llama's does). -> the Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_LINES, trainer)
    if template_bos:
        bos_id = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                 special_tokens=[("<s>", bos_id)])
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "model_max_length": 131072, **tokenizer_config}, f)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):  # a checkpoint's own config.json (written by transformers) stays
        with open(config_path, "w") as f:
            json.dump({"model_type": "qwen2", "vocab_size": model_vocab or tokenizer.get_vocab_size(),
                       "eos_token_id": tokenizer.token_to_id("<|endoftext|>"), "bos_token_id": None}, f)
    return tokenizer
