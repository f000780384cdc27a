"""Sampling with a KV cache, shaped for GRPO: n completions of each prompt, and the log-prob of every token.

The sampler to read first (generate): for each prompt, prefill it once, copy its keys and values into the n rows
of its group, and decode the n rows together to the end. engine.py serves the same request at scale and returns the
same samples: sample j of prompt i draws from its own stream of uniforms, whatever batch it is decoded in (tests/
test_engine.py holds the engine to this sampler, as tests/test_model.py holds model.py to transformers).

Returned log-probs are log softmax(logits / T) of the sampled token, before top-p / top-k truncation: the
quantity grpo.py recomputes for the PPO ratio (as in verl). With temperature 0 (greedy) they are at T = 1.
Kept simple on purpose: one prompt at a time, rows that ended decode on until the group is done, stop strings
are looked for by decoding each row's last tokens every step.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Completion:
    tokens: list  # generated ids, including the EOS / the token that completed a stop string
    logprobs: list  # log softmax(logits / T) of each generated token
    finish_reason: str  # "eos" | "stop" | "length"
    text: str | None = None  # decoded without special tokens, when a tokenizer was given


def chat_prompt(tokenizer, system, user):
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
TOP_P_HEAD = 1024  # top-p looks for its kept set among this many most likely tokens (a partial sort) first


def top_p_filter(logp, top_p, head=None):
    """logp (B, V) -> -inf outside the smallest set of most likely tokens holding top_p of the mass (of what top-k
    left, as transformers and vLLM do), looked for among the TOP_P_HEAD most likely first; rows whose head holds
    less sort in full (asking whether any does is a host sync on CUDA; FlashInfer's rejection sampler avoids it)."""
    V = logp.size(-1)
    k = min(head or TOP_P_HEAD, V)
    sorted_lp, order = logp.topk(k)  # (B, k), descending; k = V: a full sort
    probs = sorted_lp.softmax(-1)  # in the head's normalisation, so top_p is scaled by the head's mass below
    cut = top_p if k == V else top_p * (logp.logsumexp(-1, keepdim=True) - sorted_lp.logsumexp(-1, keepdim=True)).exp()
    drop = probs.cumsum(-1) - probs > cut  # mass before this token already exceeds top_p; keeps the first
    out = torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    if k < V and not drop[:, -1].all():  # the head's last token is kept: the set may go on past the head
        rows = torch.nonzero(~drop[:, -1]).flatten()
        out[rows] = top_p_filter(logp[rows], top_p, head=V)
    return out


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
        filtered = top_p_filter(filtered, top_p)
    # Inverse CDF (torch.multinomial on CPU is ~20x slower than a cumsum). A float32 CDF would give tokens under 6e-8
    # probability 0 or ~6e-8 (a total variation of ~1e-3 at 151k tokens), so u and the sums are float64, in two
    # levels for speed: the block of BLOCK tokens holding t = u * total, from the block sums, then the token.
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


def check_request(prompts, stop_strings, tokenizer, seed):
    """One clear error for a request we cannot serve; -> each prompt's seed (seed + i, or one given per prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the completions")
    if seed is None:
        seed = int(torch.randint(2**31, ()))  # from the global RNG: torch.manual_seed still reproduces a run
    return list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]


def uniforms(seed, j, max_new_tokens):
    """Sample j's own stream (float64: see sample_next): its tokens are the same in any batch, order or split."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + j) % 2**62)
    return torch.rand(max_new_tokens, generator=g, dtype=torch.float64)


def stop_tail(stop_strings):  # tokens decoded to look for a stop string at the end of a completion
    return max((len(s) for s in stop_strings), default=0) + 8


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, eos_ids=(),
             stop_strings=(), tokenizer=None, seed=None, **serving):
    """n completions of each prompt (token-id lists) -> [len(prompts)][n] Completions. seed: an int (prompt i gets
    seed + i) or one per prompt. The arguments only engine.generate uses (`serving`) are accepted and ignored."""
    seeds = check_request(prompts, stop_strings, tokenizer, seed)
    dev = model.inv_freq.device
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev)
    results = []
    for prompt, s in zip(prompts, seeds):
        L = len(prompt)
        cache = model.new_cache(n, L + max_new_tokens)
        logits = model(torch.tensor([prompt], device=dev), cache=cache, input_pos=torch.arange(L, device=dev)[None])
        cache.copy_rows(range(1, n), 0, L)  # the prompt, prefilled once in row 0, into the other rows
        logits = logits[:, -1].float().expand(n, -1)  # (n, V)
        u = torch.stack([uniforms(s, j, max_new_tokens) for j in range(n)]).to(dev)  # (n, max_new_tokens)
        toks, lps = [], []  # per step: (n,) each
        ended = torch.zeros(n, dtype=torch.bool, device=dev)  # a row that ended decodes on; its tokens are cut
        stop_at = [None] * n  # the step at which a row's text first holds a stop string
        for t in range(max_new_tokens):
            tok, lp = sample_next(logits, temperature, top_p, top_k, u[:, t])  # (n,), (n,)
            toks.append(tok), lps.append(lp)
            ended |= torch.isin(tok, eos)
            for r in range(n) if stop_strings else ():
                tail = tokenizer.decode(torch.stack(toks[-stop_tail(stop_strings):])[:, r].tolist())
                if stop_at[r] is None and not ended[r] and any(x in tail for x in stop_strings):
                    stop_at[r] = t
                    ended[r] = True
            if ended.all() or t == max_new_tokens - 1:
                break
            pos = torch.full((n, 1), L + t, device=dev)
            logits = model(tok[:, None], cache=cache, input_pos=pos)[:, -1].float()  # (n, V)
        toks, lps = torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist()  # (n, steps) each
        row = []
        for r in range(n):
            c = next((t + 1 for t, x in enumerate(toks[r]) if x in eos_ids or t == stop_at[r]), len(toks[r]))
            reason = "eos" if toks[r][c - 1] in eos_ids else "stop" if stop_at[r] is not None else "length"
            text = tokenizer.decode(toks[r][:c], skip_special_tokens=True) if tokenizer is not None else None
            row.append(Completion(toks[r][:c], lps[r][:c], reason, text))
        results.append(row)
    return results

