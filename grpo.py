"""GRPO: the policy-gradient step that trains both the Challenger and the Solver of R-Zero.

Each completion of a prompt's group of G gets a scalar reward r, its advantage is relative to its group (no value
network), and every completion token is trained with PPO-clip plus a k3 KL penalty to a frozen reference policy
(the policy at the start of the phase):

    A_i    = (r_i - mean(r_group)) / (std(r_group) + 1e-6)                    broadcast over its tokens
    ratio  = exp(logp - logp_old)
    pg     = max(-A * ratio, -A * clip(ratio, 1 - 0.2, 1 + 0.3))              "clip-higher" (DAPO)
    pg     = min(pg, -A * 3.0)        if A < 0                                 dual-clip (Ye et al. 2020)
    k3     = exp(d) - d - 1,  d = logp_ref - logp,  clamped to [-10, 10]       (Schulman 2020)
    loss_t = pg + 0.01 * k3

then aggregated by `loss_agg`: "token_mean", "seq_mean_token_mean" or "constant" (Dr. GRPO: no length bias).

Choices and departures from the paper / the authors' EasyR1 code:
- The normaliser is the WHOLE optimizer batch's: theirs is each micro-batch's, so their update depends on it.
- Log-probs come from chunks of hidden states in float32: a [B, T, vocab] tensor never exists.
- old_logp None is the detached current policy (ratio 1): the first update's, whose policy sampled the rollout.
- `train_step` makes one `grpo_update` per slice of the rollout batch (R-Zero: 4 per step). No entropy bonus, no
  KL in the reward; an update is skipped when the gradient norm is non-finite.
FSDP2: the lm_head is applied to the hidden states of a `model(...)` call (the root stays unsharded until backward);
every rank must hold the same number of sequences: each micro-batch forward/backward runs collectives.
"""
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "constant")


@dataclass
class GRPOConfig:
    """GRPO, in both phases (grpo.py)"""
    lr: float = 1e-6  # AdamW learning rate, constant
    weight_decay: float = 0.01  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    clip_low: float = 0.2  # PPO clip: the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.3  # ... the upper side ("clip-higher")
    dual_clip: float = 3.0  # dual-clip: cap of -A * ratio where A < 0 (0: off)
    kl_coef: float = 0.01  # weight of the k3 KL penalty to the reference (the policy at the start of the phase)
    kl_clamp: float = 10.0  # the k3 term is clamped to [-kl_clamp, kl_clamp]
    # The authors' Solver ran micro-batch 1 with a token mean per micro-batch, so its update was in effect
    # "seq_mean_token_mean" (their Challenger: micro-batch 2, in between)
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | constant (Dr. GRPO): how token losses average
    max_len_norm: int = 4096  # the constant of --loss-agg constant (the longest response)
    grad_clip: float = 1.0  # gradient-norm clip; a step with a non-finite norm is skipped
    micro_batch: int = 8  # sequences per forward/backward (gradients accumulate over the optimizer batch)
    temperature: float = 1.0  # of every rollout and vote: log-probs are of logits / T, the sampler's own
    logprob_chunk: int = 1024  # tokens per lm_head + log_softmax chunk (a [tokens, vocab] tensor never exists)
    scale_adv_by_std: bool = True  # advantages (r - mean) / std; off: r - mean (Dr. GRPO)

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}.")
        if self.dual_clip and self.dual_clip <= 1 + self.clip_high:
            raise ValueError(f"dual_clip must exceed 1 + clip_high = {1 + self.clip_high}, got {self.dual_clip}.")


@dataclass
class Rollout:
    input_ids: torch.Tensor              # (B, T) right-padded prompt + completion
    completion_mask: torch.Tensor        # (B, T) bool: completion tokens to train on (no prompt, no pads)
    advantages: torch.Tensor             # (B,) one per sequence
    old_logp: torch.Tensor | None = None  # (B, T) log-probs of the sampling policy; None = current policy
    ref_logp: torch.Tensor | None = None  # (B, T) log-probs of the frozen reference; None = no KL term

    def __post_init__(self):
        self.completion_mask = self.completion_mask.bool()
        if self.completion_mask.shape != self.input_ids.shape or self.advantages.shape != self.input_ids.shape[:1]:
            raise ValueError("Rollout: input_ids/completion_mask must be (B, T) and advantages (B,).")
        if self.completion_mask[:, 0].any() or not self.completion_mask.any(1).all():
            raise ValueError("Rollout: every sequence needs a prompt token first and at least one completion token.")


def group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    """rewards (B*G,), consecutive groups of group_size -> (advantages (B*G,), number of zero-variance groups)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}.")
    r = rewards.view(-1, group_size)                                     # (B, G)
    adv = r - r.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(1, keepdim=True) + eps)  # unbiased std (n - 1), torch's default as in verl/EasyR1
    zero_var = (r == r[:, :1]).all(1)                                    # (B,) all-equal groups: no signal
    adv = adv.masked_fill(zero_var[:, None], 0.0)  # exact zeros: the mean of equal floats can round off
    return adv.flatten(), int(zero_var.sum())


def assemble(prompts, completions, rewards, group_size, pad_id, cfg, device=None):
    """Prompts, completions (token ids, groups of group_size) and rewards -> (Rollout, zero-variance groups)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)  # (B, T) right-padded
    mask = torch.zeros(ids.shape, dtype=torch.bool)                              # (B, T) completion tokens
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, len(p):len(s)] = True
    adv, zero_groups = group_advantages(rewards, group_size, cfg.scale_adv_by_std)
    return Rollout(ids.to(device), mask.to(device), adv.to(device)), zero_groups


def split(rollout, n):
    B = rollout.input_ids.shape[0]
    fields = (rollout.input_ids, rollout.completion_mask, rollout.advantages, rollout.old_logp, rollout.ref_logp)
    return [Rollout(*(None if x is None else x[u * B // n:(u + 1) * B // n] for x in fields)) for u in range(n)]


def my_prompts(n, updates):
    """This rank's share of a step's n prompts (global indices): each update's slice is split across ranks."""
    r, w = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cuts = [u * n // updates for u in range(updates + 1)]  # update u: the prompts cuts[u]:cuts[u + 1]
    return [i for lo, hi in zip(cuts, cuts[1:])
            for i in range(lo + r * (hi - lo) // w, lo + (r + 1) * (hi - lo) // w)]


def _chunk_logprobs(lm_head, h, targets, temperature):
    logits = lm_head(h).float() / temperature                           # (n, vocab) float32
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)  # (n,)


def token_logprobs(model, input_ids, completion_mask, temperature, chunk=1024):
    """logp[b, t] = log_softmax(logits[b, t-1] / T)[input_ids[b, t]] where completion_mask[b, t], else 0."""
    mask = completion_mask[:, 1:].bool()         # (B, T-1): position t predicts token t+1; column 0 ignored
    h = model(input_ids, return_hidden=True)[:, :-1][mask]  # (B, T, D) -> (N, D) only the positions we score
    targets = input_ids[:, 1:][mask]             # (N,)
    parts = [checkpoint(_chunk_logprobs, model.lm_head, h[i:i + chunk], targets[i:i + chunk], temperature,
                        use_reentrant=False)    # backward keeps one chunk of logits alive, not N of them
             for i in range(0, targets.numel(), chunk)]
    vals = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=h.device).masked_scatter(mask, vals)  # (B, T-1)
    return torch.nn.functional.pad(logp, (1, 0))  # (B, T)


def loss_normaliser(mask, cfg):
    if cfg.loss_agg == "token_mean":
        return mask.sum().float()
    n_seq = torch.tensor(float(mask.shape[0]), device=mask.device)
    return n_seq * cfg.max_len_norm if cfg.loss_agg == "constant" else n_seq


def policy_loss(logp, old_logp, ref_logp, advantages, mask, cfg, normaliser):
    """(B, T) log-probs and mask, (B,) advantages -> (loss, stats). normaliser: the whole optimizer batch's."""
    mask = mask.float()
    adv = advantages[:, None].float()                     # (B, 1) broadcast over the sequence's tokens
    ratio = (logp - old_logp).clamp(-20, 20).exp()        # clamp: exp overflow would give inf * 0 = nan grads
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))  # (B, T)
    if cfg.dual_clip:
        # for A < 0 the clipped objective is unbounded in ratio: one stale token could dominate the batch
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip), pg)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = (ref_logp - logp).clamp(-20, 20)
        kl = (d.exp() - d - 1).clamp(-cfg.kl_clamp, cfg.kl_clamp)  # k3: unbiased, >= 0, low variance
    loss_tok = pg + cfg.kl_coef * kl                       # (B, T)
    if cfg.loss_agg == "seq_mean_token_mean":
        loss = ((loss_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normaliser
    else:
        loss = (loss_tok * mask).sum() / normaliser

    with torch.no_grad():
        n = mask.sum()
        mean = lambda x: (x.float() * mask).sum() / n.clamp(min=1)
        dual = cfg.dual_clip or float("inf")
        stats = dict(clip_frac_low=mean((adv < 0) & (ratio < 1 - cfg.clip_low)),
                     clip_frac_high=mean((adv > 0) & (ratio > 1 + cfg.clip_high)),
                     dual_clip_frac=mean((adv < 0) & (ratio > dual)), kl=mean(kl), ratio=mean(ratio),
                     entropy=mean(-logp), tokens=n)  # -log p of sampled tokens: a one-sample entropy estimate
    return loss, stats


def _micro_batches(mask, size):
    """(rows, T_mb) of `size` sequences at a time, sorted by length: a micro-batch pads to its own longest."""
    ends = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(1)  # (B,)
    order = ends.argsort(stable=True)
    ends = ends[order].tolist()  # one sync
    for i in range(0, mask.shape[0], size):
        yield order[i:i + size], int(ends[min(i + size, len(ends)) - 1])


@torch.no_grad()
def rollout_logprobs(model, input_ids, completion_mask, cfg):
    """token_logprobs over a whole batch in micro-batches, without grad (e.g. the reference model's ref_logp)."""
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)  # (B, T)
    for rows, t in _micro_batches(completion_mask.bool(), cfg.micro_batch):
        out[rows, :t] = token_logprobs(model, input_ids[rows, :t], completion_mask[rows, :t], cfg.temperature,
                                       cfg.logprob_chunk)
    return out


def make_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]  # all decayed (norms, embeddings), as in EasyR1
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


STAT_KEYS = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "kl", "ratio", "entropy")


def grpo_update(model, optimizer, rollout, cfg):
    """One optimizer step over the whole rollout batch (gradient accumulation over micro-batches)."""
    mask = rollout.completion_mask
    world = dist.get_world_size() if dist.is_initialized() else 1
    normaliser = loss_normaliser(mask, cfg)
    if world > 1:  # the global denominator makes the ranks' losses sum to the global loss; `* world` below
        dist.all_reduce(normaliser)  # undoes the data-parallel gradient averaging

    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(len(STAT_KEYS) + 2, device=mask.device)  # loss, token-weighted stats, tokens
    for rows, t in _micro_batches(mask, cfg.micro_batch):
        m = mask[rows, :t]                                        # (b, t) padding columns trimmed
        logp = token_logprobs(model, rollout.input_ids[rows, :t], m, cfg.temperature, cfg.logprob_chunk)
        old = logp.detach() if rollout.old_logp is None else rollout.old_logp[rows, :t]
        ref = None if rollout.ref_logp is None else rollout.ref_logp[rows, :t]
        loss, st = policy_loss(logp, old, ref, rollout.advantages[rows], m, cfg, normaliser)
        (loss * world).backward()
        sums += torch.stack([loss.detach()] + [st[k] * st["tokens"] for k in STAT_KEYS] + [st["tokens"]])
    if world > 1:
        dist.all_reduce(sums)

    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    skipped = not torch.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # also frees the grads before the next rollout

    stats = {k: float(v / sums[-1].clamp(min=1)) for k, v in zip(STAT_KEYS, sums[1:-1])}
    stats.update(loss=float(sums[0]), tokens=float(sums[-1]), grad_norm=float(grad_norm), skipped=float(skipped))
    return stats


def train_step(model, optimizer, rollout, ref, cfg, updates):
    """The reference's and old log-probs, then `updates` optimizer updates over equal slices -> their mean stats."""
    t0 = time.perf_counter()
    if ref is not None and cfg.kl_coef > 0:
        rollout.ref_logp = rollout_logprobs(ref, rollout.input_ids, rollout.completion_mask, cfg)
        if hasattr(ref, "reshard"):  # FSDP2 keeps a root gathered for a backward, which a reference never runs
            ref.reshard()
    parts = split(rollout, updates)
    for part in parts[1:]:
        part.old_logp = rollout_logprobs(model, part.input_ids, part.completion_mask, cfg)
    t1 = time.perf_counter()
    stats = [grpo_update(model, optimizer, part, cfg) for part in parts]
    good = [s for s in stats if not s["skipped"]] or stats  # a skipped update's stats are NaN
    return {k: sum(s[k] for s in good) / len(good) for k in stats[0]} | {"skipped": sum(s["skipped"] for s in stats),
            "logprob_pass_s": t1 - t0, "grpo_update_s": time.perf_counter() - t1}
