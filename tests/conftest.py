"""Shared fixtures: tiny random Hugging Face models and a tiny tokenizer, built locally (no downloads)."""
import contextlib
import io
import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    """The CPU suite stays on the CPU on any host (its equalities are float32's; device=auto would pick a GPU), and so
    do the runs it starts; `python -m pytest -m cuda tests` runs the GPU checks (tests/test_gpu.py) instead."""
    config.addinivalue_line("markers", "cuda: a check that needs a CUDA GPU (python -m pytest -m cuda tests)")
    # pytest resets warning filters per test: runtime.py's own (a checkpoint saved by one process) must be said here
    config.addinivalue_line("filterwarnings", "ignore:torch.distributed is disabled")
    if "cuda" not in (config.option.markexpr or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    if "cuda" not in (config.option.markexpr or ""):  # without -m cuda, the GPU checks do not run
        skip = pytest.mark.skip(reason="a GPU check: python -m pytest -m cuda tests")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


def main_code(argv):
    """The exit code of train.main run here on one thread (bit-identical to a subprocess with OMP_NUM_THREADS=1)."""
    import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv)
    except SystemExit as e:
        return e.code or 0
    finally:
        torch.set_num_threads(threads)
    return 0


def train_here(argv):
    """`python train.py ARGV` run here (no ~5 s of imports), its output captured, as subprocess.run returns it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main_code(list(argv))
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


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


def byte_level_tokenizer(chat_template=None):
    """A byte-level tokenizer with no merges: every string round-trips, so a rendered prompt can be read back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                additional_special_tokens=["<|im_start|>"])
    t.chat_template = chat_template
    return t


QWEN3_CHAT_TEMPLATE = os.path.join(os.path.dirname(__file__), "data", "qwen3_chat_template.jinja")  # as shipped


@pytest.fixture
def tiny_qwen3(tmp_path):
    d = tmp_path / "qwen3"
    hf = make_hf_model(d, "qwen3")
    return str(d), hf


@pytest.fixture(scope="session")
def small_toy(tmp_path_factory):
    """A toy world small enough to build in seconds (300 pretraining steps), yet one that writes parsable
    questions and boxed answers, for train.py runs that the checker measures."""
    import toy
    cfg = toy.ToyConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=32, steps=300, batch_size=8, seq_len=128, warmup=20)
    path = str(tmp_path_factory.mktemp("small_toy") / "world")
    toy.build_toy(path, cfg, log_every=0)
    return path


MARKOV_CHAIN = {  # token -> {next token: probability}; anything else -> <|im_end|>
    "assistant": {"<question>": 0.6, "\\boxed{7}": 0.25, "\\boxed{8}": 0.15},
    "<question>": {"What": 1.0}, "What": {"is": 1.0}, "is": {"3": 0.5, "5": 0.5},
    "3": {"+": 1.0}, "5": {"+": 1.0}, "+": {"4": 0.5, "6": 0.5}, "4": {"?": 1.0}, "6": {"?": 1.0},
    "?": {"</question>": 1.0}, "</question>": {"\\boxed{7}": 0.5, "\\boxed{8}": 0.3, "\\boxed{9}": 0.2},
}


def make_markov_world(path, filler=False, vocab=0, layers=1, intermediate=16, heads=2, kv_heads=1, head_dim=8):
    """A Qwen3 checkpoint + tokenizer that is a hand-set bigram chain, for fast train.py tests.

    One-hot embeddings (hidden size = vocab size), a block whose output projections are zero (so it starts
    as the identity) and an lm_head holding log-probabilities: the next token depends on the current token
    only. After the chat template's generation prompt it writes either `<question> What is 3 + 4 ?
    </question> \\boxed{7}` (the numbers vary) or a bare `\\boxed{8}`, so Challenger rewards, majority votes
    (p near 1/2) and the band filter all have something to work on, deterministically and in milliseconds.
    filler: after the answer it writes `x` until max_new_tokens (every completion is as long as allowed);
    vocab, layers, ...: a bigger model (unused words, identity blocks) with the same chain, for memory tests.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "system", "user", "assistant"]
    chain = dict(MARKOV_CHAIN)
    if filler:
        chain |= {w: {"x": 1.0} for w in ("\\boxed{7}", "\\boxed{8}", "\\boxed{9}", "x")}
    words += sorted({w for k, nxt in chain.items() for w in [k, *nxt]} - set(words))
    words += [f"w{i}" for i in range(vocab - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                unk_token="<unk>")
    t.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    t.save_pretrained(path)
    V = len(words)
    cfg = Qwen3Config(vocab_size=V, hidden_size=V, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=False,
                      rms_norm_eps=1e-6, max_position_embeddings=4096)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    logp = torch.full((V, V), -30.0)  # logp[current, next]
    for cur in words:
        for nxt, p in chain.get(cur, {"<|im_end|>": 1.0}).items():
            logp[vocab[cur], vocab[nxt]] = math.log(p)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(torch.eye(V))
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.lm_head.weight.copy_(logp.T / math.sqrt(V))  # the final RMSNorm scales one-hots by sqrt(V)
    hf.save_pretrained(path)
    return str(path)
