"""model.py against transformers: logits parity per family, checkpoint formats, round trips, errors, KV cache."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model
from model import KVCache, ModelConfig, Transformer, masked_attention

T = 130  # > 2 x original_max_position_embeddings (64 in conftest): llama3's frequency scaling is exercised
TOL = 1e-4
CASES = [("qwen3", False), ("qwen3", True), ("qwen2", False), ("qwen2", True), ("llama", False), ("llama", True)]


def tokens(B=2, T=T, vocab=128, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, idx):
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def edit_config(path, fn):
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    fn(d)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def ckpt(request, tmp_path_factory):
    """(folder, transformers model, reference logits) of one family, tied or untied."""
    family, tied = request.param
    d = tmp_path_factory.mktemp(family) / "hf"
    hf = make_hf_model(d, family, tie_word_embeddings=tied, initializer_range=0.1)
    idx = tokens()
    return str(d), hf, idx, logits_of(hf, idx)


# ---------------------------------------------------------------- parity with transformers


def test_logits_match_transformers(ckpt):
    path, hf, idx, ref = ckpt
    model = Transformer.from_pretrained(path)
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    out = logits_of(model, idx)
    assert out.shape == (2, T, 128) and out.dtype == torch.float32
    assert max_diff(out, ref) <= TOL
    with torch.no_grad():  # the hidden-state path grpo.py uses for chunked log-probs
        h = model(idx, return_hidden=True)
        assert h.shape == (2, T, 64)
        assert max_diff(model.lm_head(h), ref) <= TOL


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_attention_bias_matches_transformers(tmp_path, family):
    # transformers puts a bias on q/k/v/o for qwen3 and llama when attention_bias=True; qwen2 always has q/k/v
    hf = make_hf_model(tmp_path, family, attention_bias=True, initializer_range=0.1)
    idx = tokens()
    assert max_diff(logits_of(Transformer.from_pretrained(str(tmp_path)), idx), logits_of(hf, idx)) <= TOL


def test_llama3_rope_scaling_matters(tmp_path):
    """Guards the parity test: with the scaling removed the logits move, so matching them means something."""
    hf = make_hf_model(tmp_path, "llama", initializer_range=0.1)
    idx = tokens()
    ref = logits_of(hf, idx)

    def drop_scaling(d):
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d["rope_parameters"]["rope_theta"]}

    edit_config(str(tmp_path), drop_scaling)
    unscaled = Transformer.from_pretrained(str(tmp_path))
    assert unscaled.config.rope_scaling is None
    assert max_diff(logits_of(unscaled, idx), ref) > 1e-2


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_long_sequence_matches_transformers(tmp_path, family):
    """1,100 positions (llama: 17x its original 64, so the llama3 scaling matters): inv_freq equals
    transformers' bit for bit, and the logits hold 1e-5. With inv_freq computed in float64 and then cast (one
    ulp off in places) the phase error grows with the position: 2e-5 to 2.5e-4 here, at these weights
    (initializer_range=0.3: logits up to ~12, sharp enough attention to show it)."""
    hf = make_hf_model(tmp_path, family, initializer_range=0.3, max_position_embeddings=1200)
    model = Transformer.from_pretrained(str(tmp_path))
    assert torch.equal(model.inv_freq, hf.model.rotary_emb.inv_freq)
    assert (model.config.rope_scaling is not None) == (family == "llama")
    idx = tokens(B=1, T=1100)
    assert max_diff(logits_of(model, idx), logits_of(hf, idx)) <= 1e-5


def test_transformers_4x_config(ckpt, tmp_path):
    """config.json as transformers 4.x wrote it: rope_theta and rope_scaling at the top level, torch_dtype."""
    path, hf, idx, ref = ckpt
    hf.save_pretrained(tmp_path)

    def to_4x(d):
        rope = dict(d.pop("rope_parameters"))
        d["rope_theta"] = rope.pop("rope_theta")
        d["rope_scaling"] = rope if rope["rope_type"] != "default" else None
        d["torch_dtype"] = d.pop("dtype")

    edit_config(str(tmp_path), to_4x)
    with open(tmp_path / "config.json") as f:
        assert "rope_parameters" not in json.load(f)
    model = Transformer.from_pretrained(str(tmp_path))
    assert (model.config.rope_scaling is not None) == (hf.config.model_type == "llama")
    assert max_diff(logits_of(model, idx), ref) <= TOL


def test_sharded_checkpoint(ckpt, tmp_path):
    path, hf, idx, ref = ckpt
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = Transformer.from_pretrained(str(tmp_path))
    assert max_diff(logits_of(model, idx), ref) <= TOL


# ---------------------------------------------------------------- round trips


def test_round_trip_through_transformers(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf, idx, ref = ckpt
    ours = Transformer.from_pretrained(path)
    with torch.no_grad():  # move the weights off the checkpoint, so the test sees our save, not a copy of the input
        for p in ours.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    mine = logits_of(ours, idx)
    assert max_diff(mine, ref) > 1e-3
    ours.save_pretrained(str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert max_diff(logits_of(back, idx), mine) <= TOL
    again = Transformer.from_pretrained(str(tmp_path))
    assert torch.equal(logits_of(again, idx), mine)
    if ours.config.tie_word_embeddings:
        assert again.lm_head.weight is again.embed_tokens.weight
        assert again.lm_head.weight.data_ptr() == again.embed_tokens.weight.data_ptr()
    else:
        assert again.lm_head.weight.data_ptr() != again.embed_tokens.weight.data_ptr()


def test_save_in_shards_with_an_index_and_the_umask(ckpt, tmp_path):
    """Large models are written as transformers writes them: shards of at most max_shard_bytes and an index; both
    transformers and from_pretrained read it back exactly; files get the umask's mode (safetensors alone gives 0600)."""
    from transformers import AutoModelForCausalLM

    path, hf, idx, ref = ckpt
    ours = Transformer.from_pretrained(path)
    old = os.umask(0o022)
    try:
        ours.save_pretrained(str(tmp_path), max_shard_bytes=40_000)
    finally:
        os.umask(old)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert all(s.stat().st_size <= 40_000 + 10_000 or len(load_file(s)) == 1 for s in shards)  # + the header
    assert {oct(s.stat().st_mode & 0o777) for s in [*shards, tmp_path / "config.json"]} == {"0o644"}
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert max_diff(logits_of(back, idx), logits_of(ours, idx)) <= TOL
    assert torch.equal(logits_of(Transformer.from_pretrained(str(tmp_path)), idx), logits_of(ours, idx))


def test_from_state_dict_equals_source(ckpt):
    """The plain copy train.py makes of a sharded model: same logits, tied again, with or without lm_head.weight."""
    path, hf, idx, ref = ckpt
    model = Transformer.from_pretrained(path)
    sd = model.state_dict()
    copies = [Transformer.from_state_dict(model.config, sd, model.hf_config),
              Transformer.from_state_dict(model.config, sd, model.hf_config, dtype=torch.float32, device="cpu")]
    if model.config.tie_word_embeddings:
        untied_sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        copies.append(Transformer.from_state_dict(model.config, untied_sd, model.hf_config))
    for copy in copies:
        assert torch.equal(logits_of(copy, idx), logits_of(model, idx))
        assert copy.hf_config == model.hf_config and copy.inv_freq.device.type == "cpu"
        assert (copy.lm_head.weight is copy.embed_tokens.weight) == model.config.tie_word_embeddings
    bf16 = Transformer.from_state_dict(model.config, sd, dtype=torch.bfloat16)
    assert torch.equal(logits_of(bf16, idx), logits_of(Transformer.from_pretrained(path, dtype=torch.bfloat16), idx))
    del sd["norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unexpected \[\]"):
        Transformer.from_state_dict(model.config, sd)


def test_tied_loaded_model_stays_tied_when_trained(tmp_path):
    make_hf_model(tmp_path, "qwen3", tie_word_embeddings=True)
    model = Transformer.from_pretrained(str(tmp_path))
    with torch.no_grad():
        model.embed_tokens.weight[3].add_(1.0)
    assert torch.equal(model.lm_head.weight[3], model.embed_tokens.weight[3])
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_model_built_from_config_saves_for_transformers(tmp_path, family):
    """A model never loaded from a checkpoint (no hf_config) writes a config.json transformers reads."""
    from transformers import AutoModelForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64} if family == "llama" else None
    cfg = ModelConfig(model_type=family, vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8 if family != "qwen3" else 12,
                      rope_theta=1e4, rope_scaling=rope, tie_word_embeddings=family == "qwen3",
                      attention_bias=family == "qwen2", qk_norm=family == "qwen3")
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    idx = tokens(vocab=96)
    mine = logits_of(ours, idx)
    ours.save_pretrained(str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert back.config.model_type == family
    assert max_diff(logits_of(back, idx), mine) <= TOL
    assert max_diff(logits_of(Transformer.from_pretrained(str(tmp_path)), idx), mine) == 0


# ---------------------------------------------------------------- dtype and device


def test_bfloat16_load(ckpt):
    path, hf, idx, ref = ckpt
    model = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = logits_of(model, idx)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: errors of a few 1e-2 on logits of std ~0.8 after two layers
    assert max_diff(out, ref) < 0.1
    assert (out.float() - ref).abs().mean().item() < 0.02


def test_dtype_from_config(tmp_path):
    make_hf_model(tmp_path, "qwen3")
    edit_config(str(tmp_path), lambda d: d.update(dtype="bfloat16"))
    model = Transformer.from_pretrained(str(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_no_tensor_left_on_meta(ckpt):
    model = Transformer.from_pretrained(ckpt[0])
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert "inv_freq" in tensors
    assert [n for n, t in tensors.items() if t.is_meta] == []
    assert {t.device.type for t in tensors.values()} == {"cpu"}


# ---------------------------------------------------------------- bad inputs: one clear sentence


@pytest.fixture
def folder(tmp_path):
    make_hf_model(tmp_path, "qwen3")
    return tmp_path


def raises_one_sentence(exc, match, path):
    with pytest.raises(exc, match=match) as e:
        Transformer.from_pretrained(str(path))
    msg = str(e.value)
    assert "\n" not in msg and 0 < len(msg) < 300, msg
    return msg


def test_missing_folder(tmp_path):
    raises_one_sentence(FileNotFoundError, "does not exist", tmp_path / "nope")


def test_folder_without_config(folder):
    os.remove(folder / "config.json")
    raises_one_sentence(FileNotFoundError, "config.json", folder)


def test_unsupported_model_type(folder):
    edit_config(str(folder), lambda d: d.update(model_type="gpt2"))
    raises_one_sentence(ValueError, "'gpt2'", folder)


def test_unsupported_rope_type(folder):
    edit_config(str(folder), lambda d: d.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}))
    raises_one_sentence(ValueError, "'yarn'", folder)


def test_missing_weights_file(folder):
    os.remove(folder / "model.safetensors")
    raises_one_sentence(FileNotFoundError, "model.safetensors", folder)


def test_truncated_weights_file(folder):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    raises_one_sentence(ValueError, "model.safetensors", folder)


def test_missing_shard(ckpt, tmp_path):
    ckpt[1].save_pretrained(tmp_path, max_shard_size="50KB")
    os.remove(sorted(tmp_path.glob("model-*.safetensors"))[-1])
    with pytest.raises((ValueError, FileNotFoundError)):
        Transformer.from_pretrained(str(tmp_path))


def test_missing_weight(folder):
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors")
    raises_one_sentence(ValueError, "model.layers.1.mlp.up_proj.weight", folder)


def test_extra_weight(folder):
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(sd, folder / "model.safetensors")
    raises_one_sentence(ValueError, "model.layers.0.self_attn.o_proj.bias", folder)


# ---------------------------------------------------------------- cached decoding == full recomputation


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def cached_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache") / request.param
    make_hf_model(d, request.param, initializer_range=0.1)
    return Transformer.from_pretrained(str(d)).eval()


@torch.no_grad()
def test_cached_decoding_equals_full_forward(cached_model):
    model = cached_model
    idx = tokens(B=2, T=90, seed=1)
    full = model(idx)  # (B, T, V)
    cache = model.new_cache(2, 90)
    pos = torch.arange(90).expand(2, 90)
    got = [model(idx[:, :40], cache=cache, input_pos=pos[:, :40])]  # prefill
    got.append(model(idx[:, 40:60], cache=cache, input_pos=pos[:, 40:60]))  # a chunk of 20 on top of the cache
    for t in range(60, 90):  # then one token at a time, past position 64 where llama3 scaling bites
        got.append(model(idx[:, t:t + 1], cache=cache, input_pos=pos[:, t:t + 1]))
    assert max_diff(torch.cat(got, 1), full) <= TOL


@torch.no_grad()
def test_cached_decoding_rows_of_different_lengths(cached_model):
    """One batch, right-padded prompts of lengths 50/23/7, each row decoding at its own positions."""
    model = cached_model
    lens, steps = [50, 23, 7], 30
    seqs = [tokens(B=1, T=n + steps, seed=10 + i)[0] for i, n in enumerate(lens)]
    L = max(lens)
    prompt = torch.zeros(3, L, dtype=torch.long)
    for b, n in enumerate(lens):
        prompt[b, :n] = seqs[b][:n]
    cache = model.new_cache(3, L + steps)
    logits = model(prompt, cache=cache, input_pos=torch.arange(L).expand(3, L))  # pads write slots nobody reads
    got = [[logits[b, n - 1]] for b, n in enumerate(lens)]
    pos = torch.tensor(lens)
    for s in range(steps - 1):
        step = torch.stack([seqs[b][n + s] for b, n in enumerate(lens)])[:, None]  # (3, 1)
        out = model(step, cache=cache, input_pos=(pos + s)[:, None])  # (3, 1, V)
        for b in range(3):
            got[b].append(out[b, 0])
    for b, n in enumerate(lens):
        alone = model(seqs[b][None])[0, n - 1:-1]  # the row by itself, no cache
        assert max_diff(torch.stack(got[b]), alone) <= TOL, b


@torch.no_grad()
def test_cache_copied_rows_and_compaction_mid_decode_equal_the_full_forward(cached_model):
    """Row 0's prefill copied into row 1 (the group's shared prompt, copy_rows), rows of different lengths, and
    dropping a row mid-decode (keep_rows moves a kept row past the end into the dropped row's place): each row
    decodes as the full forward of its own tokens."""
    model = cached_model
    lens, steps = [12, 12, 30, 7], 24
    seqs = [tokens(B=1, T=n + steps, seed=40 + i)[0] for i, n in enumerate(lens)]
    seqs[1][:12] = seqs[0][:12]  # rows 0 and 1 share a prompt, then go their own ways
    cache = model.new_cache(4, max(lens) + steps)
    prompt = torch.zeros(3, 30, dtype=torch.long)  # seqs 0, 2, 3 right-padded, prefilled into cache rows 0, 1, 2
    for i, b in enumerate((0, 2, 3)):
        prompt[i, : lens[b]] = seqs[b][: lens[b]]
    first = model(prompt, cache=cache, input_pos=torch.arange(30).expand(3, 30))
    cache.copy_rows([3], 2, 30)  # then moved so that row b holds seq b: seq 1 is seq 0's prompt, copied
    cache.copy_rows([2], 1, 30)
    cache.copy_rows([1], 0, 12)
    order, got = [0, 1, 2, 3], [[] for _ in lens]
    for s in range(steps):
        if s == 10:  # seq 2 is done: keep the rows of seqs 3, 0 and 1, in that order
            rows = cache.keep_rows([3, 0, 1], max(lens[b] + s for b in order))  # the old row of each row
            assert rows == [0, 1, 3]  # row 3 moved into row 2's place; rows 0 and 1 did not move
            order = [order[r] for r in rows]
        pos = torch.tensor([lens[b] + s for b in order])
        out = model(torch.stack([seqs[b][lens[b] + s] for b in order])[:, None], cache=cache, input_pos=pos[:, None])
        for i, b in enumerate(order):
            got[b].append(out[i, 0])
    for b in (0, 1, 3):
        alone = model(seqs[b][None])[0, lens[b]:]
        assert max_diff(torch.stack(got[b]), alone) <= TOL, b
    assert max_diff(first[0, 11], model(seqs[0][None, :12])[0, -1]) <= TOL


def test_query_heads_folded_for_cuda_kernels_equal_grouped_query_attention():
    """masked_attention on CUDA folds each KV head's query heads into the query length (fused kernels take a mask
    then): the same attention as enable_gqa, for decode (T = 1) and prefill (T > 1) queries."""
    g = torch.Generator().manual_seed(0)
    for T, S in ((1, 37), (9, 9)):
        q, k, v = (torch.randn(3, h, n, 8, generator=g) for h, n in ((6, T), (2, S), (2, S)))
        pos = torch.tensor([[S - 1], [5], [20]]) if T == 1 else torch.arange(T).expand(3, T)
        want = masked_attention(q, k, v, pos, fold=False)
        assert torch.allclose(masked_attention(q, k, v, pos, fold=True), want, atol=1e-6)
        mask = (torch.arange(S) <= pos[..., None]).unsqueeze(1)
        scores = q @ k.repeat_interleave(3, 1).transpose(-1, -2) / 8**0.5  # (3, 6, T, S): each head its KV head
        ref = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1)
        assert torch.allclose(ref @ v.repeat_interleave(3, 1), want, atol=1e-6)


def test_cache_bytes_and_shape():
    cfg = ModelConfig(num_hidden_layers=2, num_key_value_heads=1, head_dim=2)
    for dtype in (torch.float32, torch.bfloat16):
        assert KVCache.token_bytes(cfg, dtype) == 2 * 2 * 1 * 2 * dtype.itemsize
    cache = KVCache(cfg, rows=3, max_len=5, dtype=torch.float32, device="cpu")
    assert cache.k.shape == cache.v.shape == (2, 3, 1, 5, 2)  # (n_layer, rows, n_kv, max_len, hd)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_activation_checkpointing_gives_the_same_gradients_and_saves_less(tmp_path, family):
    """Per-block activation checkpointing (train.py --activation-checkpointing): the same loss and gradients as
    without, to float tolerance, while autograd keeps fewer tensors alive between forward and backward."""
    from grpo import token_logprobs

    make_hf_model(tmp_path / family, family)
    idx = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[:, 10:] = True
    results = []
    for on in (False, True):
        model = Transformer.from_pretrained(str(tmp_path / family))
        model.checkpoint_blocks = on
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = -token_logprobs(model, idx, mask, 1.0).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)))
    (l0, g0, s0), (l1, g1, s1) = results
    assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-6) for n in g0)
    assert s1 < s0 / 2, (s0, s1)  # only each block's input (and the logits chunks) is kept
    with torch.no_grad():  # sampling and log-prob passes never checkpoint
        assert torch.equal(model(idx), Transformer.from_pretrained(str(tmp_path / family))(idx))
