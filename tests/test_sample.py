"""sample.py and engine.py: greedy against transformers, batching invariances, the sampling distribution, log-probs,
stopping, the shared prefill, the memory budget and the CLI. The behaviour tests run both samplers (the reader's
sample.generate and the serving engine.generate); tests/test_engine.py holds them to each other. Tiny random models,
CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

import engine
import sample
from conftest import make_hf_model, make_tokenizer
from engine import PAGE, pages_for
from model import KVCache, Transformer
from sample import BLOCK, Completion, chat_prompt, eos_ids_of, sample_next

# initializer_range=0.2 gives logits of std ~1.5: peaked enough that greedy has no near-ties and top-k / top-p
# cut real mass, flat enough that a temperature of 1 spreads samples over dozens of tokens
INIT = 0.2


def rand_prompts(lens, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (our model, the transformers model it was loaded from)."""
    out = {}
    for family in ("qwen3", "llama"):
        d = tmp_path_factory.mktemp("sample") / family
        hf = make_hf_model(d, family, initializer_range=INIT)
        out[family] = (Transformer.from_pretrained(str(d)).eval(), hf)
    return out


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A folder holding a tiny qwen3 model and its tokenizer (vocab sizes agree), as the CLI expects."""
    d = tmp_path_factory.mktemp("tok") / "qwen3"
    tok = make_tokenizer(d)
    make_hf_model(d, "qwen3", vocab=len(tok), initializer_range=INIT)
    return str(d), Transformer.from_pretrained(str(d)).eval(), tok


@pytest.fixture(params=["sample", "engine"])
def generate(request):
    """Each behaviour test runs on the reader's sampler and on the serving engine."""
    return {"sample": sample.generate, "engine": engine.generate}[request.param]


def greedy(generate, model, prompts, **kw):
    return generate(model, prompts, temperature=0.0, **kw)


def toks(results):
    return [[c.tokens for c in row] for row in results]


# ---------------------------------------------------------------- greedy == transformers, batching invariances


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_matches_transformers_generate(models, family, generate):
    model, hf = models[family]
    prompts = rand_prompts([3, 20, 55], seed=1)  # 55 + 16 > 64: past llama3's original context
    ours = greedy(generate, model, prompts, max_new_tokens=16)
    for p, row in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert row[0].tokens == ref[0, len(p):].tolist()
        assert row[0].finish_reason == "length"


def test_batch_of_different_lengths_equals_each_alone(models, generate):
    model, _ = models["qwen3"]
    prompts = rand_prompts([3, 17, 40], seed=2)
    batched = greedy(generate, model, prompts, n=2, max_new_tokens=12)
    for p, row in zip(prompts, batched):
        alone = greedy(generate, model, [p], max_new_tokens=12)[0][0]
        for c in row:  # greedy: both samples of the group are the same completion
            assert c.tokens == alone.tokens
            assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_samples_do_not_depend_on_batch_or_memory_budget(models, generate):
    """Each job's uniforms come from its own stream: a prompt sampled alone, in a batch, or one row at a time
    (memory_budget) gets the same completions."""
    model, _ = models["qwen3"]
    prompts = rand_prompts([4, 15, 8], seed=11)
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.95)
    batched = generate(model, prompts, seed=[7, 8, 9], **kw)
    one_row = generate(model, prompts, seed=[7, 8, 9], memory_budget=row_bytes(model, 15 + 10), **kw)
    alone = [generate(model, [p], seed=[s], **kw)[0] for p, s in zip(prompts, [7, 8, 9])]
    assert toks(batched) == toks(one_row) == toks(alone)
    assert len({tuple(c.tokens) for c in batched[0]}) > 1


def test_same_seed_same_output_different_seed_differs(models, generate):
    model, _ = models["qwen3"]
    prompts = rand_prompts([5, 9], seed=3)
    kw = dict(n=4, max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50)
    a = generate(model, prompts, seed=1, **kw)
    b = generate(model, prompts, seed=1, **kw)
    c = generate(model, prompts, seed=2, **kw)
    assert toks(a) == toks(b)
    assert [[x.logprobs for x in row] for row in a] == [[x.logprobs for x in row] for row in b]
    assert toks(a) != toks(c)


# ---------------------------------------------------------------- log-probs and the sampling distribution


@torch.no_grad()
def recomputed_logprobs(model, prompt, completion, temperature):
    """log softmax(logits / T) of each completion token, from one plain forward pass of prompt + completion."""
    full = torch.tensor([prompt + completion])
    logits = model(full)[0, len(prompt) - 1: -1].float()  # (len(completion), V): the logits that chose each token
    return F.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_logprobs_equal_plain_forward(models, generate):
    model, _ = models["llama"]
    prompts = rand_prompts([4, 11, 30], seed=4)
    T, top_k = 0.8, 20
    out = generate(model, prompts, n=3, max_new_tokens=12, temperature=T, top_p=0.9, top_k=top_k, seed=0)
    for p, row in zip(prompts, out):
        for c in row:
            assert len(c.tokens) == len(c.logprobs) == 12
            ref = recomputed_logprobs(model, p, c.tokens, T)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)
            # every sampled token lies inside the top-k set of its step
            with torch.no_grad():
                logits = model(torch.tensor([p + c.tokens]))[0, len(p) - 1: -1]
            rank = (logits > logits.gather(-1, torch.tensor(c.tokens)[:, None])).sum(-1)
            assert int(rank.max()) < top_k


def test_greedy_logprobs_are_at_temperature_one(models, generate):
    model, _ = models["qwen3"]
    p = rand_prompts([7], seed=5)[0]
    c = greedy(generate, model, [p], max_new_tokens=8)[0][0]
    assert torch.allclose(torch.tensor(c.logprobs), recomputed_logprobs(model, p, c.tokens, 1.0), atol=1e-4)


@torch.no_grad()
def target_distribution(model, prompt, temperature, top_k, top_p):
    """The distribution of the first sampled token, by hand, in the order transformers and vLLM use:
    logits / T, keep the top_k largest, renormalise, keep the smallest head whose mass reaches top_p."""
    logits = model(torch.tensor([prompt]))[0, -1].double() / temperature  # (V,)
    probs = logits.softmax(-1)
    if top_k > 0:
        kth = probs.topk(top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum()
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order] = before < top_p
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


N_DRAWS = 20_000


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 8, 1.0), (1.3, 0, 0.7), (1.3, 20, 0.8)],
                         ids=["temperature", "top_k", "top_p", "top_k+top_p"])
def test_sampled_distribution_matches_target(models, temperature, top_k, top_p, generate):
    """20,000 first tokens against the hand-computed distribution. Tolerances: no token outside the kept set,
    ever; Pearson's chi-square over the kept tokens (bins with expected count < 5 merged) below
    df + 6 sqrt(2 df), a false alarm well under 1e-4 for a correct sampler; total variation < 0.03 (its
    expected value here is <= 0.015)."""
    model, _ = models["qwen3"]
    prompt = rand_prompts([12], seed=6)[0]
    target = target_distribution(model, prompt, temperature, top_k, top_p)
    out = generate(model, [prompt], n=N_DRAWS, max_new_tokens=1, temperature=temperature, top_p=top_p,
                   top_k=top_k, seed=0)
    first = torch.tensor([c.tokens[0] for c in out[0]])
    counts = torch.bincount(first, minlength=target.numel()).double()
    outside = counts[target == 0].sum().item()
    assert outside == 0, f"{outside:.0f} draws fell outside the top-k / top-p set"
    expected = N_DRAWS * target[target > 0]
    observed = counts[target > 0]
    small = expected < 5
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    if expected[-1] == 0:
        expected, observed = expected[:-1], observed[:-1]
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    df = expected.numel() - 1
    assert df >= 5  # the test has teeth: the kept set is not nearly a single token
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)
    tv = 0.5 * (counts / N_DRAWS - target).abs().sum().item()
    assert tv < 0.03, tv


# ---------------------------------------------------------------- the inverse CDF is exact


def old_sample_next(logits, u):
    """The float32 inverse CDF sample.py used before issue #15 (the reference that fails), with its uniforms:
    torch.rand in float32, multiples of 2^-24."""
    cdf = F.log_softmax(logits, -1).exp().cumsum(-1)  # (B, V), float32 running sum
    total = cdf[:, -1:]
    t = ((u * 2**24).floor() / 2**24).float()[:, None] * total
    return torch.searchsorted(cdf, torch.minimum(t, total * (1 - 2**-23)), right=True).squeeze(-1)


def mass_below(draw, logits, cuts, bits=53):
    """P(token < c) of an inverse-CDF sampler draw(logits (B, V), u (B,)) for each cut c, exactly: the token is a
    non-decreasing function of u, so P(token < c) is the u at which it reaches c, found by bisection."""
    cuts = torch.as_tensor(cuts)
    lo, hi = torch.zeros(len(cuts), dtype=torch.float64), torch.ones(len(cuts), dtype=torch.float64)
    rows = logits.repeat(len(cuts), 1)  # contiguous: log_softmax over an expanded view is ~3x slower
    for _ in range(bits):  # to 2^-bits: 53 is all of a float64 u
        mid = (lo + hi) / 2
        below = draw(rows, mid) < cuts
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi


def test_inverse_cdf_draws_every_token_exactly():
    """A Qwen-sized vocabulary: 64 likely tokens at random places and 151,872 of ~6.6e-9 each (1e-3 in all). The
    old float32 running sum rounds each token's interval to whole ulps of the sum before it (6e-8 past the
    first likely token) and its u lies on a 2^-24 grid: most tail tokens could never be drawn, the others got
    ~9x their probability. Measured exactly, token by token, on 2 runs of 8 consecutive tokens: relative error
    old ~8 (and 1: undrawable), new ~1e-6. The tolerance, 1e-5, is the float32 rounding of the log-probs the
    sampler is given (|log p| ~ 19 here, whose ulp is 1.9e-6)."""
    V = 151_936
    g = torch.Generator().manual_seed(0)
    p = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    head = torch.randperm(V, generator=g)[:64]
    p[head] = 0.0
    p *= 1e-3 / p.sum()  # the tail: 1e-3 in all, each token < 1e-8
    e = -torch.rand(64, generator=g, dtype=torch.float64).log()
    p[head] = (1 - 1e-3) * e / e.sum()  # the head: a flat Dirichlet draw
    logits = p.log().float()[None]
    ref = logits.double().softmax(-1)[0]  # what the sampler is asked to draw from
    starts = torch.randint(V // 8, V - 9, (2,), generator=g)  # past the first likely token, most likely
    cuts = (starts[:, None] + torch.arange(9)).flatten()  # P(token < c) at 2 x 9 cuts: 2 x 8 token masses
    want = ref[(starts[:, None] + torch.arange(8)).flatten()]
    rel = {}
    new = lambda x, u: sample_next(x, 1.0, 1.0, 0, u)[0]
    for name, draw, bits in (("old", old_sample_next, 40), ("new", new, 53)):  # old: its u has 24 bits
        got = mass_below(draw, logits, cuts, bits).view(2, 9).diff(dim=-1).flatten()  # (16,) token masses
        rel[name] = ((got - want).abs() / want).max().item()
    assert rel["old"] > 0.5, rel  # the old sampler fails the tolerance by five orders of magnitude
    assert rel["new"] < 1e-5, rel


def test_inverse_cdf_never_draws_weight_zero():
    """u at 0, at the largest double below 1, at 1 and on a grid, on a vocabulary of whole and partial blocks with
    most tokens cut (-inf): every draw has weight > 0, and each kept token's mass is its probability."""
    V = 3 * BLOCK + 17  # the last block is padding but for 17 tokens
    keep = torch.tensor([1, 5, BLOCK - 1, BLOCK, 2 * BLOCK + 3, V - 17, V - 2])
    logits = torch.full((1, V), float("-inf"))
    logits[0, keep] = torch.linspace(-3, 2, len(keep))
    u = torch.cat([torch.tensor([0.0, 1 - 2**-53, 1.0], dtype=torch.float64),  # 1.0 is out of contract, clamped
                   torch.linspace(0, 1 - 1e-9, 999, dtype=torch.float64)])
    tok, lp = sample_next(logits.expand(len(u), V), 1.0, 1.0, 0, u)
    assert torch.isin(tok, keep).all() and tok[0] == keep[0] and tok[1] == tok[2] == keep[-1]
    assert torch.equal(lp, F.log_softmax(logits[0], -1)[tok])
    got = mass_below(lambda x, v: sample_next(x, 1.0, 1.0, 0, v)[0], logits, keep + 1)
    want = logits[0, keep].double().softmax(-1).cumsum(0)
    assert (got - want).abs().max() < 1e-6


# ---------------------------------------------------------------- the group shares one prefill


def counting_forward(model, monkeypatch):
    calls = []  # the (batch, tokens) shape of every forward
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, *a, **kw:
                        calls.append(tuple(idx.shape)) or forward(idx, *a, **kw))
    return calls


def test_n_samples_share_one_prefill(models, monkeypatch):
    model, _ = models["qwen3"]
    calls = counting_forward(model, monkeypatch)
    prompts = rand_prompts([6, 9], seed=7)
    out = engine.generate(model, prompts, n=4, max_new_tokens=5, temperature=1.0, seed=0)
    prefills = [s for s in calls if s[1] > 1]
    assert prefills == [(2, 9)]  # one forward over the two distinct prompts, not 2 x 4 rows
    assert all(s[1] == 1 and s[0] <= 8 for s in calls if s[1] == 1)
    assert len(calls) == 1 + 4  # prefill, then one decode step per token after the first
    for row in out:  # rows copied from one prefill still sample independently
        assert len({tuple(c.tokens) for c in row}) > 1


def test_reader_sampler_prefills_each_prompt_once_for_its_group(models, monkeypatch):
    model, _ = models["qwen3"]
    calls = counting_forward(model, monkeypatch)
    out = sample.generate(model, rand_prompts([6, 9], seed=7), n=4, max_new_tokens=5, temperature=1.0, seed=0)
    assert calls == [(1, 6)] + [(4, 1)] * 4 + [(1, 9)] + [(4, 1)] * 4  # a prefill, then its group of 4 rows
    for row in out:
        assert len({tuple(c.tokens) for c in row}) > 1


# ---------------------------------------------------------------- stopping


def truncate_at(tokens, eos):
    """What a run with `eos` must return, given the run without it."""
    for t, x in enumerate(tokens):
        if x in eos:
            return tokens[: t + 1], "eos"
    return tokens, "length"


def test_stop_on_eos(models, generate):
    model, _ = models["llama"]
    prompts = rand_prompts([5, 13, 9], seed=8)
    free = greedy(generate, model, prompts, max_new_tokens=12)
    eos = [free[0][0].tokens[3], free[1][0].tokens[6]]
    out = greedy(generate, model, prompts, n=2, max_new_tokens=12, eos_ids=eos)
    reasons = set()
    for ref, row in zip(free, out):
        want, reason = truncate_at(ref[0].tokens, eos)
        for c in row:
            assert c.tokens == want and c.finish_reason == reason and c.text is None
            assert c.logprobs == pytest.approx(ref[0].logprobs[: len(want)], abs=1e-4)
            reasons.add(reason)
    assert out[0][0].tokens[-1] in eos and len(out[0][0].tokens) <= 4
    assert "eos" in reasons


def test_max_new_tokens_is_length(models, generate):
    model, _ = models["qwen3"]
    out = generate(model, rand_prompts([4, 6], seed=9), n=3, max_new_tokens=7, seed=0)
    for row in out:
        for c in row:
            assert isinstance(c, Completion)
            assert len(c.tokens) == len(c.logprobs) == 7 and c.finish_reason == "length"


def test_stop_strings(with_tokenizer, generate):
    _, model, tok = with_tokenizer
    prompt = chat_prompt(tok, "put the answer within boxed", "hello world")
    free = greedy(generate, model, [prompt], max_new_tokens=12, tokenizer=tok)[0][0]
    assert free.text == tok.decode(free.tokens, skip_special_tokens=True)
    # a word the greedy completion produces, as the stop string; tokens 0-3 are the special ones
    k = next(t for t in range(3, 12) if free.tokens[t] > 3)
    stop = tok.convert_ids_to_tokens(free.tokens[k])
    first = next(t for t in range(12) if stop in tok.decode(free.tokens[: t + 1]))  # may be before k
    out = greedy(generate, model, [prompt], n=2, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
    for c in out[0]:
        assert c.tokens == free.tokens[: first + 1]
        assert c.finish_reason == "stop"
        assert c.text == tok.decode(c.tokens, skip_special_tokens=True) and stop in c.text


def test_eos_text_and_helpers(with_tokenizer, generate):
    _, model, tok = with_tokenizer
    assert eos_ids_of(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")})
    prompt = chat_prompt(tok, "system", "hello world")
    msgs = [{"role": "system", "content": "system"}, {"role": "user", "content": "hello world"}]
    assert prompt == tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)
    free = greedy(generate, model, [prompt], max_new_tokens=10)[0][0]
    eos = [free.tokens[4]]
    c = greedy(generate, model, [prompt], max_new_tokens=10, eos_ids=eos, tokenizer=tok)[0][0]
    assert c.finish_reason == "eos" and c.tokens[-1] == eos[0]
    assert c.text == tok.decode(c.tokens, skip_special_tokens=True)


def test_chat_prompt_fallback_without_template():
    tok = make_tokenizer()
    tok.chat_template = None
    ids = chat_prompt(tok, "system", "hello world")
    assert ids == tok.encode("system: system\nuser: hello world\nassistant:", add_special_tokens=False)


def test_bad_requests_raise_value_error(models, generate):
    model, _ = models["qwen3"]
    with pytest.raises(ValueError):
        generate(model, [])
    with pytest.raises(ValueError):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError):
        generate(model, [[1, 2]], stop_strings=["x"])


# ---------------------------------------------------------------- memory budget


def row_bytes(model, max_len):  # the pages of one row of max_len slots
    return pages_for(max_len) * PAGE * KVCache.token_bytes(model.config, torch.float32)


@pytest.mark.parametrize("rows", [1, 3])
def test_memory_budget_serves_every_completion(models, rows):
    model, _ = models["qwen3"]
    prompts = rand_prompts([5, 9, 14], seed=10)
    n, max_new = 3, 10
    free = greedy(engine.generate, model, prompts, n=n, max_new_tokens=max_new)
    eos = [free[0][0].tokens[2], free[2][0].tokens[7]]  # rows finish at different steps, so rows get refilled
    unconstrained = greedy(engine.generate, model, prompts, n=n, max_new_tokens=max_new, eos_ids=eos)
    budget = rows * row_bytes(model, 14 + max_new)
    st = {}
    out = greedy(engine.generate, model, prompts, n=n, max_new_tokens=max_new, eos_ids=eos, memory_budget=budget,
                 stats=st)
    # as many rows as the budget holds at max_new_tokens each, each row owning its max_len slots (not paged)
    assert (st["rows"], st["peak_rows"], st["paged"]) == (rows, rows, False)
    assert len(out) == 3 and all(len(row) == n for row in out)
    assert toks(out) == toks(unconstrained)
    assert [[c.finish_reason for c in r] for r in out] == [[c.finish_reason for c in r] for r in unconstrained]
    assert {c.finish_reason for r in out for c in r} == {"eos", "length"}


def test_rows_sized_by_expected_length_hold_more_in_flight_and_preemption_changes_nothing(models):
    """The cache holds the tokens a row has, not max_new_tokens per row: with short answers expected, the same
    budget keeps more rows in flight than rows of max_len would (the old cache). When answers run longer than
    expected and pages run out, the newest rows are preempted and started again: the same completions."""
    model, _ = models["qwen3"]
    generate = engine.generate
    prompts = rand_prompts([6, 9, 12, 7], seed=21)
    max_new = 64
    budget = 4 * row_bytes(model, 12 + max_new)  # the old cache: 4 rows of max_len
    free = greedy(generate, model, prompts, n=4, max_new_tokens=max_new)
    eos = sorted({c.tokens[3] for row in free for c in row[:1]})  # most answers end after a few tokens
    kw = dict(n=4, max_new_tokens=max_new, temperature=1.0, top_p=0.95, eos_ids=eos, seed=[3, 4, 5, 6])
    ample, old, short, tight = {}, {}, {}, {}
    want = generate(model, prompts, memory_budget=2**30, stats=ample, **kw)
    got_old = generate(model, prompts, memory_budget=budget, stats=old, **kw)
    got_short = generate(model, prompts, memory_budget=budget, expected_new_tokens=8, stats=short, **kw)
    got_tight = generate(model, prompts, memory_budget=budget // 4, expected_new_tokens=2, stats=tight, **kw)
    lens = [len(c.tokens) for row in want for c in row]
    assert min(lens) < 10 and max(lens) == max_new  # short answers, and some that run to the cap
    assert old["rows"] == 4 and old["preempted"] == 0 and not old["paged"]
    assert short["peak_rows"] > 2 * old["peak_rows"] and short["paged"]
    assert tight["preempted"] > 0
    assert toks(got_old) == toks(got_short) == toks(got_tight) == toks(want)
    for a, b in zip((c for r in got_tight for c in r), (c for r in want for c in r)):  # other batches: float noise
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
