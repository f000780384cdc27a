"""GRPO: each piece against a hand computation, the fast paths against slow obvious ones, and a tiny run."""
import copy
import math

import pytest
import torch

from conftest import make_hf_model
from grpo import (GRPOConfig, Rollout, group_advantages, grpo_update, loss_normaliser, make_optimizer,
                  policy_loss, rollout_logprobs, token_logprobs)
from model import Transformer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo") / "qwen3"
    make_hf_model(d, "qwen3", tie_word_embeddings=True)  # tied, as Qwen3-4B-Base: lm_head grads reach the embedding
    return str(d)


def load(model_dir):
    return Transformer.from_pretrained(model_dir, dtype=torch.float32)


class GradRecorder:
    """Stands in for the optimizer: keeps the accumulated gradients instead of stepping."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]


def naive_logprobs(model, ids, mask, temperature):
    logp = (model(ids).float() / temperature).log_softmax(-1)           # (B, T, vocab)
    logp = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)           # (B, T-1)
    return torch.nn.functional.pad(logp, (1, 0)) * mask                 # (B, T)


def random_batch(seed=0, B=6, T=12, vocab=128):
    """Right-padded rows with different prompt and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        p = 1 + b % 3
        mask[b, p:p + 2 + (5 * b) % (T - p - 1)] = True
    return ids, mask


# ---------------------------------------------------------------- hand computations

def test_group_advantages():
    adv, n_zero = group_advantages([1.0, 0.0, 1.0, 0.0, 0.1, 0.1, 0.1, 0.1, 3.0, 1.0, 2.0, 2.0], group_size=4)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1, 0)
    assert n_zero == 1
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (s + 1e-6))
    assert torch.equal(adv[4:8], torch.zeros(4))  # exactly zero, though the mean of 0.1s rounds off
    torch.testing.assert_close(adv[8:], torch.tensor([1.0, -1.0, 0.0, 0.0]) / (math.sqrt(2 / 3) + 1e-6))
    adv, n_zero = group_advantages(torch.tensor([2.0, 0.0, 5.0, 5.0]), group_size=2, scale_by_std=False)
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0] and n_zero == 1
    with pytest.raises(ValueError):
        group_advantages([1.0, 2.0, 3.0], group_size=2)


def clip_case(dual_clip=3.0):
    """Ratios and advantages that hit every branch; float64 so the expected numbers are exact."""
    ratio = torch.tensor([[1.0, 1.5, 0.5],    # A = +1: inside, clipped high (1.3), below range (not clipped for A > 0)
                          [0.5, 2.0, 5.0],    # A = -1: clipped low (0.8), above range (not clipped), dual-clipped
                          [4.0, 1.0, 0.7]],   # A = -2: dual-clipped, inside, clipped low
                         dtype=torch.float64)
    old = torch.randn(3, 3, dtype=torch.float64)
    logp = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -2.0], dtype=torch.float64)
    cfg = GRPOConfig(dual_clip=dual_clip)
    loss, stats = policy_loss(logp, old, None, adv, torch.ones(3, 3, dtype=torch.bool), cfg, 9.0)
    return logp, ratio, loss, stats


def test_ppo_clip_and_dual_clip():
    logp, ratio, loss, stats = clip_case()
    pg = torch.tensor([[-1.0, -1.3, -0.5], [0.8, 2.0, 3.0], [6.0, 2.0, 1.6]], dtype=torch.float64)
    assert loss.item() == pytest.approx(pg.sum().item() / 9, rel=1e-12)
    loss.backward()
    # clipped tokens carry no gradient; the others d/dlogp (-A * ratio) / 9
    expect = torch.tensor([[-1.0, 0.0, -0.5], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64) / 9
    torch.testing.assert_close(logp.grad, expect, rtol=1e-12, atol=1e-12)
    assert float(stats["clip_frac_high"]) == pytest.approx(1 / 9)
    assert float(stats["clip_frac_low"]) == pytest.approx(2 / 9)
    assert float(stats["dual_clip_frac"]) == pytest.approx(2 / 9)
    assert float(stats["ratio"]) == pytest.approx(ratio.mean().item())
    assert float(stats["tokens"]) == 9
    _, _, loss, stats = clip_case(dual_clip=0.0)  # without dual-clip the A < 0, big-ratio tokens are unbounded
    assert loss.item() == pytest.approx((pg.sum().item() - 3.0 - 6.0 + 5.0 + 8.0) / 9, rel=1e-12)
    assert float(stats["dual_clip_frac"]) == 0.0


def test_k3_kl_values_clamp_and_sign():
    logp = torch.tensor([[-1.0, -2.0, -1.0, -25.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -2.0, 5.0]], dtype=torch.float64)   # d = ref - logp = 0, 1, -1, 30
    cfg = GRPOConfig(kl_coef=1.0)
    loss, stats = policy_loss(logp, logp.detach(), ref, torch.zeros(1, dtype=torch.float64),
                              torch.ones(1, 4, dtype=torch.bool), cfg, 4.0)
    k3 = [0.0, math.e - 2, math.exp(-1), 10.0]  # exp(d) - d - 1, the last clamped to kl_clamp
    assert loss.item() == pytest.approx(sum(k3) / 4, rel=1e-12)
    assert float(stats["kl"]) == pytest.approx(sum(k3) / 4, rel=1e-6)  # stats are float32
    loss.backward()
    g = logp.grad[0]
    assert torch.isfinite(g).all() and g[0] == 0 and g[3] == 0  # at the reference and where clamped: no pull
    # descent moves logp toward ref: the gradient has the sign of (logp - ref)
    assert torch.equal(torch.sign(g[1:3]), torch.sign(logp.detach() - ref)[0, 1:3])
    assert g[1].item() == pytest.approx((1 - math.e) / 4)  # d/dlogp k3 = 1 - exp(d)


def test_loss_aggregation_modes():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)  # 3 tokens and 1 token
    logp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -2.0])                                         # ratio 1: per-token loss = -A
    expect = {"token_mean": (4, (-3 + 2) / 4), "seq_mean_token_mean": (2, (-1 + 2) / 2),
              "constant": (20, (-3 + 2) / 20)}
    for agg, (norm, value) in expect.items():
        cfg = GRPOConfig(loss_agg=agg, max_len_norm=10)
        assert loss_normaliser(mask, cfg).item() == norm
        loss, _ = policy_loss(logp, logp, None, adv, mask, cfg, loss_normaliser(mask, cfg))
        assert loss.item() == pytest.approx(value)
    with pytest.raises(ValueError):
        GRPOConfig(loss_agg="mean")


# ---------------------------------------------------------------- fast paths against slow ones

def test_token_logprobs_matches_naive_values_and_grads(model_dir):
    model = load(model_dir)
    ids, mask = random_batch()
    w = torch.randn(ids.shape)
    naive = naive_logprobs(model, ids, mask, 0.7)
    (naive * w).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    for chunk in (1024, 5):  # 5 < N: several checkpointed chunks
        model.zero_grad(set_to_none=True)
        fast = token_logprobs(model, ids, mask, 0.7, chunk=chunk)
        assert fast.dtype == torch.float32 and torch.equal(fast[~mask], torch.zeros((~mask).sum()))
        torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
        (fast * w).sum().backward()
        for p, g in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(rollout_logprobs(model, ids, mask, GRPOConfig(micro_batch=4, temperature=0.7)),
                                   naive.detach(),
                                   atol=1e-5, rtol=0)


def test_first_step_is_plain_policy_gradient(model_dir):
    model = load(model_dir)
    ids, mask = random_batch(seed=1)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.0, 0.3])
    cfg = GRPOConfig(grad_clip=1e9, micro_batch=4, kl_coef=0.0)
    opt = GradRecorder(model)
    stats = grpo_update(model, opt, Rollout(ids, mask, adv), cfg)  # old_logp None: recomputed, ratio == 1
    assert stats["ratio"] == 1.0 and stats["clip_frac_low"] == stats["clip_frac_high"] == 0.0
    model.zero_grad(set_to_none=True)
    pg = -(adv[:, None] * naive_logprobs(model, ids, mask, 1.0) * mask).sum() / mask.sum()  # REINFORCE, token mean
    pg.backward()
    assert stats["loss"] == pytest.approx(-(adv[:, None] * mask).sum().item() / mask.sum().item(), abs=1e-6)
    for p, g in zip(model.parameters(), opt.grads):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "constant"])
def test_micro_batches_equal_one_batch(model_dir, agg):
    model = load(model_dir)
    ids, mask = random_batch(seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        cur = token_logprobs(model, ids, mask, 1.0)
    old = (cur + 0.4 * torch.randn(cur.shape, generator=g)) * mask  # stale enough to hit the clips
    ref = (cur + 0.4 * torch.randn(cur.shape, generator=g)) * mask
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0, -3.0, 0.3])
    rollout = Rollout(ids, mask, adv, old_logp=old, ref_logp=ref)
    results = []
    for mb in (6, 4, 1):
        opt = GradRecorder(model)
        stats = grpo_update(model, opt, rollout, GRPOConfig(loss_agg=agg, grad_clip=1e9, micro_batch=mb,
                                                            kl_coef=0.1, max_len_norm=16))
        results.append((stats, opt.grads))
    (s0, g0) = results[0]
    assert s0["clip_frac_low"] + s0["clip_frac_high"] + s0["dual_clip_frac"] > 0.1
    for s, grads in results[1:]:
        for k in ("loss", "kl", "ratio", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "tokens"):
            assert s[k] == pytest.approx(s0[k], abs=1e-6), k
        for a, b in zip(grads, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # and the micro-batched path equals the loss written out on the full, naive log-probs
    model.zero_grad(set_to_none=True)
    cfg = GRPOConfig(loss_agg=agg, kl_coef=0.1, max_len_norm=16)
    loss, _ = policy_loss(naive_logprobs(model, ids, mask, 1.0), old, ref, adv, mask, cfg, loss_normaliser(mask, cfg))
    loss.backward()
    assert s0["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for p, g in zip(model.parameters(), g0):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- tiny end-to-end

@torch.no_grad()
def sample(model, prompt, n, steps):
    """Plain ancestral sampling at T = 1; returns a Rollout-ready (ids, mask, sampler log-probs)."""
    ids = torch.tensor(prompt).repeat(n, 1)                              # (n, P)
    logps = []
    for _ in range(steps):
        lp = model(ids)[:, -1].float().log_softmax(-1)                   # (n, vocab)
        nxt = torch.multinomial(lp.exp(), 1)                             # (n, 1)
        logps.append(lp.gather(1, nxt))
        ids = torch.cat([ids, nxt], 1)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, len(prompt):] = True
    old = torch.zeros(ids.shape)
    old[:, len(prompt):] = torch.cat(logps, 1)
    return ids, mask, old


@torch.no_grad()
def prob_of(model, prompt, token):
    return model(torch.tensor([prompt]))[0, -1].softmax(-1)[token].item()


def test_reward_for_one_token_raises_its_probability(model_dir):
    torch.manual_seed(0)
    model, ref_model = load(model_dir), load(model_dir)
    prompt, target, G = [5, 9, 17, 3], 42, 16
    cfg = GRPOConfig(lr=1e-2, micro_batch=8)
    opt = make_optimizer(model, cfg)
    before = prob_of(model, prompt, target)
    for _ in range(8):
        ids, mask, old = sample(model, prompt, G, steps=4)
        rewards = (ids[:, len(prompt):] == target).float().mean(1)       # (G,) share of target tokens
        adv, _ = group_advantages(rewards, G)
        ref = rollout_logprobs(ref_model, ids, mask, cfg)
        stats = grpo_update(model, opt, Rollout(ids, mask, adv, old_logp=old, ref_logp=ref), cfg)
        assert stats["skipped"] == 0 and math.isfinite(stats["grad_norm"])
    after = prob_of(model, prompt, target)
    assert after > 0.3 and after > 20 * before, (before, after)


def test_kl_alone_keeps_and_pulls_policy_to_reference(model_dir):
    torch.manual_seed(0)
    ref_model, prompt = load(model_dir), [5, 9, 17, 3]
    cfg = GRPOConfig(lr=1e-3, weight_decay=0.0, kl_coef=1.0)
    ids, mask, _ = sample(ref_model, prompt, 8, steps=4)
    ref = rollout_logprobs(ref_model, ids, mask, cfg)
    zero = Rollout(ids, mask, torch.zeros(8), ref_logp=ref)              # reward 0 for all: no policy gradient
    with torch.no_grad():
        ref_logits = ref_model(ids)
    # at the reference the KL gradient vanishes: the policy stays put
    model = load(model_dir)
    opt = make_optimizer(model, cfg)
    for _ in range(3):
        grpo_update(model, opt, zero, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref_logits, atol=1e-6, rtol=0)
    # moved away from the reference, the KL term alone brings it back
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    kls = [grpo_update(model, opt, zero, cfg)["kl"] for _ in range(10)]
    assert kls[0] > 1e-3 and kls[-1] < 0.1 * kls[0], kls


def test_non_finite_gradient_skips_the_step(model_dir):
    model = load(model_dir)
    ids, mask = random_batch(seed=4)
    before = copy.deepcopy(model.state_dict())
    opt = make_optimizer(model, GRPOConfig())
    adv = torch.tensor([1.0, float("nan"), 0.0, 0.0, 1.0, -1.0])
    stats = grpo_update(model, opt, Rollout(ids, mask, adv), GRPOConfig())
    assert stats["skipped"] == 1 and not math.isfinite(stats["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and len(opt.state) == 0


def test_rollout_validation():
    ids, mask = random_batch()
    with pytest.raises(ValueError):
        Rollout(ids, mask, torch.zeros(5))
    bad = mask.clone()
    bad[0] = False
    with pytest.raises(ValueError):
        Rollout(ids, bad, torch.zeros(6))


# ---------------------------------------------------------------- data parallel (FSDP2, 2 CPU ranks)

def _fsdp_rank(rank, world, model_dir, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)  # two ranks share the two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = load(model_dir)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    rollout = fsdp_rollout(model_dir)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)  # each rank holds half of the global batch
    shard = Rollout(rollout.input_ids[rows], rollout.completion_mask[rows], rollout.advantages[rows],
                    rollout.old_logp[rows], rollout.ref_logp[rows])
    stats = grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), shard, FSDP_CFG)
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save((stats, state), out)
    dist.destroy_process_group()


FSDP_CFG = GRPOConfig(loss_agg="seq_mean_token_mean", kl_coef=0.1, micro_batch=2)


def fsdp_rollout(model_dir):
    model = load(model_dir)
    ids, mask = random_batch(seed=5, B=8)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        cur = token_logprobs(model, ids, mask, 1.0)
    old = (cur + 0.4 * torch.randn(cur.shape, generator=g)) * mask
    ref = (cur + 0.4 * torch.randn(cur.shape, generator=g)) * mask
    return Rollout(ids, mask, torch.randn(8, generator=g), old_logp=old, ref_logp=ref)


def test_fsdp_two_ranks_equal_one_process(model_dir, tmp_path):
    """Global normaliser + loss * world_size: the sharded update equals the single-process one."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_fsdp_rank, args=(2, model_dir, port, out), nprocs=2)
    dist_stats, dist_state = torch.load(out)
    model = load(model_dir)
    stats = grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), fsdp_rollout(model_dir), FSDP_CFG)
    for k in ("loss", "grad_norm", "kl", "ratio", "tokens"):
        assert dist_stats[k] == pytest.approx(stats[k], rel=1e-5), k
    for k, v in model.state_dict().items():
        torch.testing.assert_close(dist_state[k], v, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- GRPO batches

def two_groups(scale_adv_by_std=True):
    """2 prompts x G = 2 completions: group 1 rewards (1, 0), group 2 (0.5, 0.5) (zero variance)."""
    import grpo

    prompts = [[5, 6], [5, 6], [7], [7]]
    completions = [[1, 2, 3], [4], [8, 9], [10, 11, 12, 13]]
    return grpo.assemble(prompts, completions, [1.0, 0.0, 0.5, 0.5], 2, 0,
                         grpo.GRPOConfig(scale_adv_by_std=scale_adv_by_std))


def test_assemble_pads_masks_and_scores_groups():
    rollout, zero = two_groups()
    assert rollout.input_ids.tolist() == [[5, 6, 1, 2, 3], [5, 6, 4, 0, 0], [7, 8, 9, 0, 0], [7, 10, 11, 12, 13]]
    assert rollout.completion_mask.tolist() == [[False, False, True, True, True], [False, False, True, False, False],
                                                [False, True, True, False, False], [False, True, True, True, True]]
    # group 1: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / (0.7071 + 1e-6); group 2: equal rewards -> exactly 0
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert rollout.advantages.tolist() == pytest.approx([a, -a, 0.0, 0.0], abs=1e-6) and zero == 1
    assert rollout.advantages[2:].tolist() == [0.0, 0.0]
    assert rollout.old_logp is None and rollout.ref_logp is None
    rollout, zero = two_groups(scale_adv_by_std=False)  # Dr. GRPO: r - mean
    assert rollout.advantages.tolist() == [0.5, -0.5, 0.0, 0.0] and zero == 1


def test_split_slices_concatenate_back_to_the_batch():
    import grpo

    rollout, _ = two_groups()
    rollout.old_logp = torch.arange(20.0).view(4, 5)
    halves = grpo.split(rollout, 2)
    assert [h.input_ids.shape[0] for h in halves] == [2, 2]
    for field in ("input_ids", "completion_mask", "advantages", "old_logp"):
        assert torch.equal(torch.cat([getattr(h, field) for h in halves]), getattr(rollout, field)), field
    assert all(h.ref_logp is None for h in halves)
    assert torch.equal(halves[1].input_ids, rollout.input_ids[2:])  # consecutive: update u takes rows u*B/n..
    (whole,) = grpo.split(rollout, 1)
    assert torch.equal(whole.input_ids, rollout.input_ids)
    quarters = grpo.split(rollout, 4)
    assert [q.input_ids.tolist() for q in quarters] == [[row] for row in rollout.input_ids.tolist()]


def test_my_prompts_gives_each_rank_its_part_of_every_update(monkeypatch):
    import grpo

    assert grpo.my_prompts(8, 2) == list(range(8))  # one process: everything, in order
    monkeypatch.setattr(grpo.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(grpo.dist, "get_world_size", lambda: 2)
    per_rank = {}
    for r in (0, 1):
        monkeypatch.setattr(grpo.dist, "get_rank", lambda r=r: r)
        per_rank[r] = grpo.my_prompts(8, 2)
    # update 0 is prompts 0..3 (rank 0: 0, 1; rank 1: 2, 3), update 1 is 4..7
    assert per_rank == {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}
    # split(., 2) of each rank's rollout: the u-th halves of both ranks make up update u, as in one process
    for u in range(2):
        assert per_rank[0][2 * u:2 * u + 2] + per_rank[1][2 * u:2 * u + 2] == list(range(4 * u, 4 * u + 4))


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_train_step_is_old_logprobs_then_updates_over_slices(tmp_path, kl_coef):
    """train_step == recompute old log-probs (and the reference's when kl_coef > 0), then one grpo_update per
    equal slice; its stats are the updates' mean. It skips the old pass of the first slice (the policy has not
    moved yet): the same weights as recomputing it."""
    import copy

    import grpo
    from conftest import make_hf_model
    from model import Transformer

    make_hf_model(tmp_path / "m", "qwen3")
    cfg = grpo.GRPOConfig(lr=1e-2, kl_coef=kl_coef, micro_batch=2)
    g = torch.Generator().manual_seed(0)
    prompts = [p for p in (torch.randint(0, 128, (3,), generator=g).tolist() for _ in range(2)) for _ in range(3)]
    completions = [torch.randint(0, 128, (2 + k % 4,), generator=g).tolist() for k in range(6)]
    rewards = [1.0, 0.0, 0.0, 0.2, 0.9, 0.5]
    ref = Transformer.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():  # a reference that differs from the policy, so the KL term is not zero
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    model = Transformer.from_pretrained(str(tmp_path / "m"))
    twin = copy.deepcopy(model)
    rollout, _ = grpo.assemble(prompts, completions, rewards, 3, 0, cfg)
    stats = grpo.train_step(model, grpo.make_optimizer(model, cfg), rollout, ref, cfg, 2)
    by_hand, _ = grpo.assemble(prompts, completions, rewards, 3, 0, cfg)
    by_hand.old_logp = grpo.rollout_logprobs(twin, by_hand.input_ids, by_hand.completion_mask, cfg)
    if kl_coef:
        by_hand.ref_logp = grpo.rollout_logprobs(ref, by_hand.input_ids, by_hand.completion_mask, cfg)
    opt = grpo.make_optimizer(twin, cfg)
    parts = [grpo.grpo_update(twin, opt, part, cfg) for part in grpo.split(by_hand, 2)]
    assert rollout.old_logp is None  # set per slice, from the second on
    assert (rollout.ref_logp is None) == (kl_coef == 0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    for k in ("loss", "kl", "ratio", "tokens", "grad_norm"):
        assert stats[k] == pytest.approx((parts[0][k] + parts[1][k]) / 2, rel=1e-4, abs=1e-6), k
    assert stats["skipped"] == 0 and (stats["kl"] > 0) == (kl_coef > 0)
    assert parts[0]["ratio"] == pytest.approx(1.0, abs=1e-6)  # the first update is on-policy
