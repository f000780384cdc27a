"""Batched sampling with a KV cache, shaped for GRPO: P prompts x n samples each.

How a request is served (R-Zero's requests are large: the Solver answers N x m = 80,000 questions per
iteration, the Challenger's reward samples m answers for each of 2,048 questions per step):
- The request is a queue of jobs (prompt i, sample j). B rows hold the jobs in flight; their keys and values live in
  a pool of pages (model.KVCache) of `memory_budget` bytes that a row takes as it grows, so a short answer costs its
  own tokens, not max_new_tokens. B is as many rows as the pool holds at the prompt plus `expected_new_tokens` each.
  When rows outgrow the pool, the newest is preempted and requeued, to be recomputed (as vLLM does): the oldest rows
  always progress. A pool that holds every row at max_len anyway (the toy run) is fixed: attention reads each row's
  pages in place, skipping the per-layer gather (on a CPU it cost more than attention: BENCHMARKS.md).
- A free row is refilled with the next job (continuous batching). Jobs admitted together that share a prompt
  share one prefill, copied into their rows (the GRPO group). Rows need no left padding (model.KVCache).
- When the queue is empty and 1/8 of the rows have finished, the batch is compacted to the live rows.
- Finishing is decided on the device; the host touches only the rows that finished, so per-step Python work
  does not grow with the batch (stop strings, which must be decoded, are the exception).

Returned log-probs are log softmax(logits / T) of the sampled token, before top-p / top-k truncation: the
quantity grpo.py recomputes for the PPO ratio (as in verl). With temperature 0 (greedy) they are at T = 1.
"""
import sys
import time
from collections import deque
from itertools import islice
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import PAGE, KVCache


@dataclass
class Completion:
    tokens: list  # generated ids, including the EOS / the token that completed a stop string
    logprobs: list  # log softmax(logits / T) of each generated token
    finish_reason: str  # "eos" | "stop" | "length"
    text: str | None = None  # decoded without special tokens, when a tokenizer was given


def chat_prompt(tokenizer, system, user):
    """Token ids of a system + user turn with the generation prompt, via the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:  # base models without a template (the authors' fallback)
        text = f"system: {system}\nuser: {user}\nassistant:"
    return tokenizer.encode(text, add_special_tokens=False)


def eos_ids_of(tokenizer):
    """The tokenizer's EOS plus chat-turn end tokens, so base and chat-formatted models both stop."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>") if t in vocab}
    return sorted(ids)


BLOCK = 256  # tokens per block of the two-level inverse CDF in sample_next


def sample_next(logits, temperature, top_p, top_k, u):
    """logits (B, V), float64 uniforms u (B,) in [0, 1) -> next tokens (B,), their log-probs under logits/T (B,)."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = F.log_softmax(logits / temperature, dim=-1)  # (B, V)
    filtered = logp
    if top_k > 0:
        kth = torch.topk(filtered, min(top_k, filtered.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = filtered.sort(dim=-1, descending=True)
        probs = sorted_lp.softmax(-1)  # renormalised over the top-k survivors first, as transformers and vLLM do
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p; keeps the first
        filtered = filtered.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    # Inverse CDF (torch.multinomial on CPU is ~20x slower than a cumsum: 57 vs 3 ms for 64 x 32k), exact to the
    # float32 rounding of the weights. A float32 CDF (ulps of 6e-8 near 1) and u (a 2^-24 grid) give tokens under
    # 6e-8 probability 0 or ~6e-8: a total variation of ~1e-3 at 151k tokens. So u and the sums are float64, in two
    # levels (a float64 cumsum over 151k tokens costs ~2x a float32 one): the block of BLOCK tokens holding t = u *
    # total, from the cumsum of the block sums (float32, faster: ~1e-7 relative error, as in w), then the token.
    B, V = filtered.shape
    w = filtered.new_empty(B, -(-V // BLOCK) * BLOCK)  # padded to whole blocks with weight 0
    w[:, V:] = 0
    torch.exp(filtered, out=w[:, :V])
    w = w.view(B, -1, BLOCK)  # (B, nb, BLOCK)
    mass = w.sum(-1).double()  # (B, nb)
    edges = F.pad(mass.cumsum(-1), (1, 0))  # (B, nb + 1): block b holds [edges[b], edges[b + 1])
    total, zero = edges[:, -1:], edges.new_zeros(())
    t = torch.minimum(u[:, None].double() * total, total.nextafter(zero))  # (B, 1), < total
    blk = torch.searchsorted(edges, t, right=True) - 1  # edges[blk] <= t < edges[blk + 1]: the block has mass
    cdf = w[torch.arange(B, device=w.device), blk[:, 0]].double().cumsum(-1)  # (B, BLOCK)
    end = cdf[:, -1:]
    # where t falls in the block, scaled from its float32 sum to its cumsum; kept below the end, so right=True
    # never returns a token of weight 0 (padding, top-k / top-p cut)
    r = torch.minimum((t - edges.gather(-1, blk)) * (end / mass.gather(-1, blk)), end.nextafter(zero))
    tok = (blk * BLOCK + torch.searchsorted(cdf, r, right=True)).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class Progress:
    """How far a sampling call is: a tqdm bar on a terminal, else (a torchrun log) a line every `every` seconds."""

    def __init__(self, total, every=60.0):
        self.bar = tqdm(total=total, desc="sampling", leave=False) if sys.stderr.isatty() else None
        self.total, self.done, self.tokens, self.every, self.t0 = total, 0, 0, every, time.time()
        self.last = self.t0

    def update(self, tokens):
        self.done, self.tokens = self.done + 1, self.tokens + tokens
        if self.bar:
            self.bar.update(1)
        elif time.time() - self.last >= self.every:
            self.last = time.time()
            print(f"sampling: {self.done}/{self.total} completions, {self.tokens / (self.last - self.t0):.0f} "
                  f"tokens/s, {self.last - self.t0:.0f}s", flush=True)

    def close(self):
        if self.bar:
            self.bar.close()


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, eos_ids=(),
             stop_strings=(), tokenizer=None, seed=None, memory_budget=2**30, expected_new_tokens=None,
             progress=False, stats=None):
    """prompts: token-id lists; seed: an int (prompt i gets seed + i) or one per prompt. memory_budget: bytes of
    KV-cache pages; rows in flight are as many as it holds at expected_new_tokens each (default max_new_tokens: no
    preemption). stats: a dict to receive rows, peak_rows, preempted. Returns [len(prompts)][n] Completions."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the completions")
    dev = next(model.parameters()).device
    if seed is None:
        seed = int(torch.randint(2**31, ()))  # from the global RNG: torch.manual_seed still reproduces a run
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]
    longest = max(map(len, prompts))
    max_len = longest + max_new_tokens
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    queue = deque(range(len(jobs)))  # jobs to serve, in order; a preempted job goes back to the front
    page_bytes = PAGE * KVCache.token_bytes(model.config, model.embed_tokens.weight.dtype)
    # the pool: the budget, but no more than every job at max_len, and at least one row of max_len
    pages = max(min(memory_budget // page_bytes, len(jobs) * KVCache.pages_for(max_len)), KVCache.pages_for(max_len))
    expect = min(expected_new_tokens or max_new_tokens, max_new_tokens)
    B = max(1, min(len(jobs), pages // KVCache.pages_for(longest + expect)))
    # pages=None: the pool holds every row at max_len, so each row owns its pages for good (read in place)
    cache = model.new_cache(B, max_len, pages=None if B * KVCache.pages_for(max_len) <= pages else pages)
    eos_t = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev)
    stop_tail = max((len(s) for s in stop_strings), default=0) + 8  # tokens decoded to look for a stop string

    row_job = np.full(B, -1)  # job index held by each row, -1 = free
    row_pos = np.zeros(B, dtype=np.int64)  # position (= cache slot) of the next token each row feeds in
    n_gen = torch.zeros(B, dtype=torch.long, device=dev)
    out_tok = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    out_lp = torch.zeros(B, max_new_tokens, device=dev)
    # uniforms: each job's own stream (admit), so its output is the same in any batch, budget, rank split, preemption
    uniforms = torch.zeros(B, max_new_tokens, dtype=torch.float64, device=dev)  # float64: see sample_next
    next_logits = torch.zeros(B, model.config.vocab_size, device=dev)
    results = [[None] * n for _ in prompts]
    st = dict(rows=B, peak_rows=0, preempted=0, pages=pages)
    bar = Progress(len(jobs)) if progress else None

    def admit(rows):
        """Prefill the next jobs' prompts, once per distinct prompt, into the free `rows` their pages allow."""
        take, need = [], 0
        for r, q in zip(rows, list(islice(queue, len(rows)))):  # the next jobs, as many as the free pages hold
            need += max(0, KVCache.pages_for(len(prompts[jobs[q][0]])) - len(cache.held[r]))
            if need > len(cache.free):
                break
            take.append(queue.popleft())  # q
        if not take:
            return
        rows, ps = rows[: len(take)], [prompts[jobs[q][0]] for q in take]  # the taken jobs' rows and prompts
        cache.grow(rows, list(map(len, ps)))
        groups = {}  # prompt (identical objects, e.g. [prompt] * n, count as one) -> (the prompt, its rows)
        for r, p in zip(rows, ps):
            groups.setdefault(id(p), (p, []))[1].append(r)
        U, L = len(groups), max(len(p) for p, _ in groups.values())
        idx = torch.zeros(U, L, dtype=torch.long, device=dev)  # right-padded prompts (U, L)
        for u, (p, _) in enumerate(groups.values()):
            idx[u, : len(p)] = torch.tensor(p, device=dev)
        lead = torch.tensor([g[0] for _, g in groups.values()], device=dev)  # the row each prefill runs in: (U,)
        h = model(idx, cache=cache.view(lead), input_pos=torch.arange(L, device=dev).expand(U, L), kv_len=L,
                  return_hidden=True)  # (U, L, D); the pad positions write slots nobody reads
        last = torch.tensor([len(p) - 1 for p, _ in groups.values()], device=dev)
        first = model.lm_head(h[torch.arange(U, device=dev), last]).float()  # (U, V): last positions only
        for p, (r0, *copies) in groups.values():  # the group's other rows copy the one prefill
            if copies:
                cache.copy_prefix(copies, r0, len(p))
        src = torch.tensor([list(groups).index(id(p)) for p in ps], device=dev)  # the prefill of each row
        dst = torch.as_tensor(rows, device=dev)
        next_logits[dst] = first[src]
        row_job[rows], row_pos[rows] = take, list(map(len, ps))
        n_gen[dst] = 0
        streams = [torch.Generator().manual_seed((seeds[jobs[q][0]] * 1_000_003 + jobs[q][1]) % 2**62) for q in take]
        uniforms[dst] = torch.stack([torch.rand(max_new_tokens, generator=g, dtype=torch.float64)
                                     for g in streams]).to(dev)

    while True:
        free = np.flatnonzero(row_job < 0)
        # refill once a few rows are free (a prefill per single freed row would waste the matmuls)
        if queue and len(free) >= max(1, B // 8):
            admit(free.tolist())
        live = row_job >= 0
        if not live.any():
            break
        st["peak_rows"] = max(st["peak_rows"], int(live.sum()))
        at = torch.arange(B, device=dev), n_gen.clamp(max=max_new_tokens - 1)  # (row, step) of each row's token
        tok, lp = sample_next(next_logits, temperature, top_p, top_k, uniforms[at])  # (B,), (B,)
        out_tok[at], out_lp[at] = tok, lp
        n_gen += 1
        done = torch.as_tensor(live, device=dev) & (torch.isin(tok, eos_t) | (n_gen >= max_new_tokens))
        stopped = np.zeros(B, dtype=bool)
        if stop_strings:
            live_rows = np.flatnonzero(live)
            tails = tokenizer.batch_decode([out_tok[r, max(0, c - stop_tail): c].tolist()
                                            for r, c in zip(live_rows, n_gen[live_rows].tolist())])
            stopped[live_rows] = [any(s in t for s in stop_strings) for t in tails]
            done |= torch.as_tensor(stopped, device=dev)
        finished = torch.nonzero(done).flatten().tolist()  # only finished rows touch the host
        for r in finished:
            i, j = jobs[row_job[r]]
            c = int(n_gen[r])
            toks = out_tok[r, :c].tolist()
            reason = "eos" if toks[-1] in eos_ids else "stop" if stopped[r] else "length"
            text = tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else None
            results[i][j] = Completion(toks, out_lp[r, :c].tolist(), reason, text)
            if bar:
                bar.update(len(toks))
        cache.release(finished)
        row_job[finished] = -1
        # the next forward writes each live row's token at slot row_pos: a row entering a new page takes one;
        # when none is free, the newest row is preempted (its job starts again later, with the same uniforms)
        while True:
            live = row_job >= 0
            grow = np.flatnonzero(live & (row_pos % PAGE == 0))
            if cache.grow(grow.tolist(), (row_pos[grow] + 1).tolist()):
                break
            victim = int(np.flatnonzero(live)[row_job[live].argmax()])
            queue.appendleft(int(row_job[victim]))
            cache.release([victim])
            row_job[victim] = -1
            st["preempted"] += 1
        if not live.any():
            continue  # every row finished this step: refill (or end) before the next forward
        if not queue and live.sum() <= B - max(1, B // 8):  # compact: drop finished rows from the batch
            keep = np.flatnonzero(live)
            kt = torch.as_tensor(keep, device=dev)
            cache.keep_rows(keep.tolist(), length=int(row_pos[keep].max()))  # the slots written so far
            row_job, row_pos, B = row_job[keep], row_pos[keep], len(keep)
            n_gen, out_tok, out_lp, tok, uniforms = n_gen[kt], out_tok[kt], out_lp[kt], tok[kt], uniforms[kt]
            live = np.ones(B, dtype=bool)
        kv_len = int(row_pos[live].max()) + 1
        pos = torch.as_tensor(row_pos[:, None], device=dev)  # (B, 1)
        next_logits = model(tok[:, None], cache=cache, input_pos=pos, kv_len=kv_len)[:, -1].float()  # (B, V)
        row_pos += live  # free rows stay put; their writes land in the scratch page
    if bar:
        bar.close()
    if stats is not None:
        stats.update(st)
    return results
