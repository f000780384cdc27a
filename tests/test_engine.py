"""engine.py against sample.generate, sample for sample (random requests, budgets that force preemption, every
sampling setting, stop strings, the host looking every k steps), and its paged cache against full recomputation.
Tiny random models, CPU."""
import random

import pytest
import torch

import engine
import sample
from conftest import make_hf_model, make_tokenizer
from engine import PAGE, PagedKVCache, Prefill, pages_for
from model import KVCache, ModelConfig, Transformer

FAMILIES = ("qwen3", "qwen2", "llama")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp("engine") / family
        make_hf_model(d, family, initializer_range=0.2)  # logits of std ~1.5: top-k / top-p cut real mass
        out[family] = Transformer.from_pretrained(str(d)).eval()
    return out


def rand_request(rng, vocab=128):
    """A random request: prompts (some repeated objects, as train.py passes [prompt] * k), group size, lengths,
    sampling settings, EOS ids, and a memory budget from ample to a pool that forces preemption."""
    p = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
    prompts = [p if rng.random() < 0.3 else [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
               for _ in range(rng.randint(1, 5))]
    kw = dict(n=rng.randint(1, 5), max_new_tokens=rng.randint(1, 40), temperature=rng.choice([0.0, 0.7, 1.0, 1.3]),
              top_k=rng.choice([0, 0, 5, 20]), top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
              eos_ids=rng.sample(range(vocab), rng.choice([0, 4, 12])), seed=rng.randrange(10**6))
    return prompts, kw


def budget(rng, model, prompts, kw):
    """Rows of max_len (fixed), a pool for a few rows at a short expected length (paged), or one row (preempts)."""
    max_len = max(map(len, prompts)) + kw["max_new_tokens"]
    row = pages_for(max_len) * PAGE * KVCache.token_bytes(model.config, torch.float32)
    return rng.choice([dict(), dict(memory_budget=row * rng.randint(1, 4)),
                       dict(memory_budget=row * rng.randint(1, 3), expected_new_tokens=rng.randint(1, 8)),
                       dict(memory_budget=row, expected_new_tokens=1)])


def assert_same(got, want, context):
    assert len(got) == len(want), context
    for g_row, w_row in zip(got, want):
        assert len(g_row) == len(w_row), context
        for g, w in zip(g_row, w_row):
            assert (g.tokens, g.finish_reason, g.text) == (w.tokens, w.finish_reason, w.text), context
            assert g.logprobs == pytest.approx(w.logprobs, rel=1e-5, abs=1e-5), context  # other batches: float noise


SEEN = {}  # case -> the engine's stats, for the coverage check below


@pytest.mark.parametrize("case", range(48))
def test_engine_equals_the_reader_sampler(models, case):
    rng = random.Random(case)
    model = models[FAMILIES[case % 3]]
    prompts, kw = rand_request(rng)
    serving = budget(rng, model, prompts, kw) | dict(sync_every=rng.choice([None, 1, 3, 8]))
    st = SEEN[case] = {}
    got = engine.generate(model, prompts, stats=st, **kw, **serving)
    assert_same(got, sample.generate(model, prompts, **kw), (case, kw, serving, st))


def test_the_random_requests_cover_paging_and_preemption():
    """The cases above are not all easy: some keep rows of max_len, some page, some preempt."""
    if len(SEEN) < 48:
        pytest.skip("runs after the 48 cases")
    n = dict(fixed=sum(not s["paged"] for s in SEEN.values()), paged=sum(s["paged"] for s in SEEN.values()),
             preempted=sum(s["preempted"] > 0 for s in SEEN.values()))
    assert min(n.values()) >= 5, n


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "qwen3"
    tok = make_tokenizer(d)
    make_hf_model(d, "qwen3", vocab=len(tok), initializer_range=0.2)
    return Transformer.from_pretrained(str(d)).eval(), tok


@pytest.mark.parametrize("case", range(6))
def test_engine_equals_the_reader_sampler_with_stop_strings(with_tokenizer, case):
    """Stop strings taken from what the model writes (so that some rows stop), rows in a pool that pages."""
    model, tok = with_tokenizer
    rng = random.Random(100 + case)
    words = ["the", "answer", "is", "boxed", "1", "2", "step"]
    prompts = [sample.chat_prompt(tok, "put the answer within boxed", " ".join(rng.choices(words, k=rng.randint(1, 6))))
               for _ in range(rng.randint(1, 3))]
    kw = dict(n=rng.randint(1, 4), max_new_tokens=rng.randint(5, 30), temperature=rng.choice([0.0, 1.0]),
              eos_ids=sample.eos_ids_of(tok), tokenizer=tok, seed=case)
    free = [c.tokens for row in sample.generate(model, prompts, **kw) for c in row]
    kw["stop_strings"] = [tok.decode(rng.choice(c)) for c in rng.sample(free, min(2, len(free)))]
    max_len = max(map(len, prompts)) + kw["max_new_tokens"]
    row = pages_for(max_len) * PAGE * KVCache.token_bytes(model.config, torch.float32)
    got = engine.generate(model, prompts, memory_budget=row * 2, expected_new_tokens=2, sync_every=4, **kw)
    want = sample.generate(model, prompts, **kw)
    assert_same(got, want, case)
    assert any(c.finish_reason == "stop" for r in want for c in r)


# ---------------------------------------------------------------- the paged cache == full recomputation


def tokens(T, seed, vocab=128):
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_paged_cache_rows_growing_in_turn_equal_the_full_forward(models, family):
    """Rows that take pages in turn (so each row's pages are scattered over the pool, not in order), prefilled
    alone through Prefill, then decoded a chunk of 5 tokens at a time and one token at a time: the full forward's
    logits. A released row's pages go to another row; dropping a row renumbers the table."""
    model = models[family]
    lens, steps = [37, 5, 20], 40
    seqs = [tokens(n + steps, seed=20 + i) for i, n in enumerate(lens)]
    cache = PagedKVCache(model.config, 3, 60, max(lens) + steps, torch.float32, "cpu")
    for b, n in enumerate(lens):
        assert cache.grow([b], [n])
        model(seqs[b][None, :n], cache=Prefill(cache, [b]), kv_len=n)
    got = [[] for _ in lens]
    s = 0
    while s < steps:
        T = 5 if s < 10 else 1  # chunks of 5 queries first: the page-wise attention with T > 1
        pos = torch.tensor(lens)[:, None] + s + torch.arange(T)  # (3, T)
        assert cache.grow([0, 1, 2], (pos[:, -1] + 1).tolist())
        idx = torch.stack([seqs[b][lens[b] + s: lens[b] + s + T] for b in range(3)])
        out = model(idx, cache=cache, input_pos=pos)
        for b in range(3):
            got[b].append(out[b])
        s += T
    assert sorted(p for row in cache.held for p in row) == list(range(1, 1 + sum(pages_for(n + steps) for n in lens)))
    assert any(row != list(range(row[0], row[0] + len(row))) for row in cache.held)  # scattered pages
    for b, n in enumerate(lens):
        alone = model(seqs[b][None])[0, n:]
        assert (torch.cat(got[b]) - alone).abs().max() <= 1e-4, b
    # row 1 ends; its pages go to a new sequence in row 1 while rows 0 and 2 go on; then row 0 is dropped
    cache.release([1])
    assert cache.table[1].eq(0).all()
    new = tokens(30, seed=99)
    assert cache.grow([1], [20]) and set(cache.held[1]) <= set(range(1, 61))
    model(new[None, :20], cache=Prefill(cache, [1]), kv_len=20)
    cache.release([0])
    cache.keep_rows([2, 1])  # row 2 (all of its tokens fed) is row 0 now, the new sequence row 1
    pos = torch.tensor([[len(seqs[2])], [20]])
    assert cache.grow([0, 1], (pos[:, 0] + 1).tolist())
    out = model(torch.tensor([[7], [int(new[20])]]), cache=cache, input_pos=pos)
    assert (out[0, 0] - model(torch.cat([seqs[2], torch.tensor([7])])[None])[0, -1]).abs().max() <= 1e-4
    assert (out[1, 0] - model(new[None, :21])[0, -1]).abs().max() <= 1e-4


def test_paged_cache_pages_grow_copy_keep():
    cfg = ModelConfig(num_hidden_layers=2, num_key_value_heads=1, head_dim=2)
    cache = PagedKVCache(cfg, rows=3, pages=4, max_len=3 * PAGE, dtype=torch.float32, device="cpu")
    assert cache.k.shape == (2, 5, 1, PAGE, 2)  # page 0 is scratch
    assert cache.grow([0, 2], [PAGE + 1, 3]) and cache.held == [[1, 2], [], [3]]
    assert not cache.grow([1], [2 * PAGE + 1]) and cache.held[1] == []  # 3 pages wanted, 1 free: no change
    assert cache.table.tolist() == [[1, 2, 0], [0, 0, 0], [3, 0, 0]]
    assert cache.page_row[1:4].tolist() == [0, 0, 2] and cache.page_col[1:4].tolist() == [0, 1, 0]
    cache.k[:, 1:3] = torch.arange(2 * 2 * PAGE * 2.0).view(2, 2, 1, PAGE, 2)
    cache.v[:, 1:3] = -cache.k[:, 1:3]
    cache.release([2])
    assert cache.grow([2], [PAGE + 2]) and cache.held[2] == [3, 4]
    cache.copy_rows([2], 0, PAGE + 2)  # both pages of row 0 into row 2's pages
    assert torch.equal(cache.k[:, 3:5], cache.k[:, 1:3]) and torch.equal(cache.v[:, 3:5], -cache.k[:, 1:3])
    kept = cache.k[:, 3:5].clone()
    cache.release([0])
    cache.keep_rows([2, 1])  # row 2 is row 0 now, and its pages move down to pages 1 and 2
    assert cache.held == [[1, 2], []] and cache.table.tolist() == [[1, 2, 0], [0, 0, 0]]
    assert torch.equal(cache.k[:, 1:3], kept) and cache.free == [4, 3]
    assert cache.page_row[1:3].tolist() == [0, 0] and cache.page_col[1:3].tolist() == [0, 1]


# ---------------------------------------------------------------- top-p from a partial sort, sizing


@pytest.mark.parametrize("head", [4, 32, 10**6])
def test_top_p_from_the_head_equals_a_full_sort(monkeypatch, head):
    """The kept set from the TOP_P_HEAD most likely tokens (falling back to a full sort for rows whose head holds
    less than top_p) is the full sort's, on flat and peaked rows, with and without top-k."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * torch.linspace(0.2, 6, 64)[:, None]  # flat to peaked
    monkeypatch.setattr(sample, "TOP_P_HEAD", head)
    for top_p in (0.3, 0.9, 0.99):
        for top_k in (0, 20):
            lp = logits.log_softmax(-1)
            if top_k:
                lp = lp.masked_fill(lp < lp.topk(top_k).values[:, -1:], float("-inf"))
            got = sample.top_p_filter(lp, top_p)
            srt, order = lp.sort(descending=True)
            p = srt.softmax(-1)
            want = lp.scatter(-1, order, srt.masked_fill(p.cumsum(-1) - p > top_p, float("-inf")))
            assert torch.equal(got.isinf(), want.isinf()), (top_p, top_k)
            assert torch.equal(got[~got.isinf()], lp[~got.isinf()])


def test_sizing():
    cfg = ModelConfig(num_hidden_layers=2, num_key_value_heads=2, head_dim=4)  # 128 bytes a token: 2 KiB a page
    size = lambda budget, **kw: engine.sizing(cfg, torch.float32, 10, 20, 20, budget, **kw)  # 10 jobs of 40 slots
    assert size(2**30) == (30, 10, False)  # no more pages than every job at max_len: every row, unpaged
    assert size(12 * 2048) == (12, 4, False)  # 4 rows of 3 pages
    assert size(12 * 2048, expected_new_tokens=4) == (12, 6, True)  # 6 rows of 2 pages expected: paged
    assert size(0) == (3, 1, False)  # at least one row of max_len
