"""Shared fixtures: tiny random Hugging Face models and a tiny tokenizer, built locally (no downloads)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(family, vocab=128, **over):
    """A transformers config of each supported family, a few layers wide."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    common.update(over)
    if family == "qwen3":
        return Qwen3Config(head_dim=24, rope_theta=1e6, **common)  # head_dim != hidden/heads on purpose
    if family == "qwen2":
        return Qwen2Config(rope_theta=1e6, **common)
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(rope_parameters=rope, **common)
    raise ValueError(family)


def make_hf_model(path, family="qwen3", seed=0, **over):
    """Saves a random transformers model of `family` to `path`; returns the transformers model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(family, **over), dtype=torch.float32).eval()
    with torch.no_grad():  # random norms, so a wrong norm placement cannot hide behind all-ones weights
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    hf.save_pretrained(path)
    return hf


def make_tokenizer(path=None):
    """A tiny word-level tokenizer with a Qwen-style chat template, EOS and PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = list("0123456789+-*/=()[]{}\\.,:;?!<>_^$#") + [
        "the", "a", "answer", "is", "what", "question", "boxed", "step", "by", "reason", "final", "put",
        "within", "system", "user", "assistant", "problem", "hello", "world", "math", "\n", "write", "one"]
    vocab = {w: i for i, w in enumerate(specials + ["<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                unk_token="<unk>", additional_special_tokens=specials[1:2])
    t.chat_template = CHAT_TEMPLATE
    if path:
        t.save_pretrained(path)
    return t


@pytest.fixture
def tiny_qwen3(tmp_path):
    d = tmp_path / "qwen3"
    hf = make_hf_model(d, "qwen3")
    return str(d), hf
