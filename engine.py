"""The sampling engine: sample.generate's samples, served at scale (train.py, eval.py, toy.py and bench.py call it).

Decoding is most of an R-Zero run (the Solver answers N x m = 80,000 questions per iteration). The engine keeps B
rows busy:
- Continuous batching: once B/8 rows are free they take the next jobs (prompt i, sample j); jobs admitted together
  that share a prompt share one prefill, copied into their rows. When the queue is empty and B/8 rows are done, the
  batch is compacted. Each job draws its own uniforms (sample.uniforms): its tokens are sample.generate's in any batch.
- The pool, `memory_budget` bytes: if it holds every row at its longest, rows own their slots (model.KVCache); else
  rows take pages (PagedKVCache) as they grow, and when they outgrow the pool the newest is preempted and requeued,
  to be recomputed (as vLLM does).
- Attention reads each page where it lies, once, against its own row's queries, and sums each page's share into its
  row: no copy, no padding, plain torch ops (on CUDA, FlexAttention's paged block mask would fuse the same reads).
- The step's state stays on the device; the host looks every `sync_every` steps (1 on a CPU; 8 on CUDA, where the
  slots read are bucketed: the k steps could be one CUDA graph) to collect the rows that ended and hand out pages.
Departures, for simplicity: no prefix pages shared by a group's rows, no chunked prefill, the CUDA graph is not
captured; on CUDA, index_add_ sums the pages' shares with atomics (bit for bit only under
torch.use_deterministic_algorithms). On a CPU with the pool holding every row, the arithmetic is sample.py's, to
the bit with one thread; with more, torch's attention rounds a row by its place in the batch (a token at a
probability boundary can flip), so compaction moves as few rows as it can.
"""
import sys
import time
from collections import deque
from itertools import islice

import numpy as np
import torch
from tqdm import tqdm

from model import KVCache, masked_attention
from sample import Completion, check_request, sample_next, stop_tail, uniforms

PAGE = 16  # cache slots per page


def pages_for(length):
    return -(-length // PAGE)


def sizing(cfg, dtype, jobs, longest_prompt, max_new_tokens, memory_budget, expected_new_tokens=None):
    """(pages, rows, paged) of a request, as Engine serves it and memory.py plans it."""
    max_len = longest_prompt + max_new_tokens
    pages = max(min(memory_budget // (PAGE * KVCache.token_bytes(cfg, dtype)), jobs * pages_for(max_len)),
                pages_for(max_len))
    expect = min(expected_new_tokens or max_new_tokens, max_new_tokens)
    rows = max(1, min(jobs, pages // pages_for(longest_prompt + expect)))
    return pages, rows, rows * pages_for(max_len) > pages


def attention_bytes(cfg, dtype, rows, pages):
    """Bytes one decode step of one layer's PagedKVCache.attend moves, op by op: `pages` pages read in place."""
    b, nh, hd, n_kv = dtype.itemsize, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    x = pages * nh  # (page, query head) pairs
    kv = 2 * pages * PAGE * n_kv * hd * b + 2 * rows * n_kv * hd * b  # each page read once; the new k, v
    # queries per page (written, read); float32 scores (written, masked, max, shifted, exp, summed, read by @ V);
    # the pages' shares of each row's output (written, summed into the row); the rows' outputs
    return kv + 2 * x * hd * b + 10 * x * PAGE * 4 + 2 * x * hd * 4 + 2 * rows * nh * hd * 4


class PagedKVCache:
    """model.KVCache's contract over a pool of pages, (n_layer, pages + 1, n_kv, PAGE, hd): slot s of row r is slot
    s % PAGE of page table[r, s // PAGE]. Page 0 is scratch: free rows' writes land there, where no row reads."""

    def __init__(self, cfg, rows, pages, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, pages + 1, cfg.num_key_value_heads, PAGE, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.table = torch.zeros(rows, pages_for(max_len), dtype=torch.long, device=device)  # (rows, max_pages)
        # each page's row and its column in that row's table: its slot s is position col * PAGE + s
        self.page_row = torch.zeros(pages + 1, dtype=torch.long, device=device)
        self.page_col = torch.full((pages + 1,), self.table.size(1), dtype=torch.long, device=device)  # unseen
        self.held = [[] for _ in range(rows)]  # the host's copy: the pages of each row, in slot order
        self.free = list(range(pages, 0, -1))  # pop() hands out the lowest page first, and a released one next
        self.read = 1  # attention reads pages [0, read): up to the highest page given, in steps of 8

    def grow(self, rows, lengths):
        """Give each row pages for slots 0..length-1. False (and no change) if the free pages do not suffice."""
        need = [(r, pages_for(n) - len(self.held[r])) for r, n in zip(rows, lengths)]
        if sum(max(0, k) for _, k in need) > len(self.free):
            return False
        at = []  # (row, table column, the page given there)
        for r, k in need:
            for _ in range(k):
                self.held[r].append(self.free.pop())
                at.append((r, len(self.held[r]) - 1, self.held[r][-1]))
        self._assign(at)
        return True

    def _assign(self, at):  # (row, column, page) triples into the table and the pages' rows and columns
        if at:
            r, j, page = torch.tensor(at, device=self.table.device).T
            self.table[r, j], self.page_row[page], self.page_col[page] = page, r, j
            top = max(p for *_, p in at) + 1
            self.read = max(self.read, min(len(self.page_row), -(-top // 8) * 8))  # in steps of 8: fewer shapes

    def release(self, rows):  # the rows' pages back to the free list, unseen until given again
        pages = [p for r in rows for p in self.held[r]]
        for r in rows:
            self.free += self.held[r][::-1]
            self.held[r] = []
        self.table[rows] = 0
        self.page_col[pages] = self.table.size(1)

    def copy_rows(self, rows, src, length):  # slots 0..length-1 of row src into `rows` (grown): whole pages
        n = pages_for(length)
        to, frm = self.table[rows, :n].flatten(), self.table[src, :n].repeat(len(rows))
        for layer in (*self.k, *self.v):  # a layer at a time, so the copy's temporary is one layer's
            layer[to] = layer[frm]

    def keep_rows(self, rows, length=None):
        """Keep `rows` (the others released) as rows 0.., their pages moved to the bottom: attention reads no free
        page. -> rows (the old row of each)."""
        self.held = [self.held[r] for r in rows]
        n = sum(map(len, self.held))
        holes = iter(sorted(set(range(1, n + 1)) - {p for h in self.held for p in h}))
        moves = {p: next(holes) for h in self.held for p in h if p > n}  # a page above n -> a hole below
        if moves:
            src, dst = (torch.tensor(x, device=self.table.device) for x in zip(*moves.items()))
            for layer in (*self.k, *self.v):
                layer[dst] = layer[src]
            self.held = [[moves.get(p, p) for p in h] for h in self.held]
        self.free = list(range(len(self.page_row) - 1, n, -1))
        self.table = self.table.new_zeros(len(rows), self.table.size(1))
        self.page_row.zero_(), self.page_col.fill_(self.table.size(1))
        self.read = 1
        self._assign([(r, j, p) for r, h in enumerate(self.held) for j, p in enumerate(h)])
        return rows

    def write(self, layer, rows, k, v, input_pos):  # k, v: (B, n_kv, T, hd) into (rows[b], slot input_pos[b, t])
        page, slot = self.table[rows].gather(1, input_pos // PAGE), input_pos % PAGE  # (B, T) each
        self.k[layer][page, :, slot] = k.transpose(1, 2)  # indexed view is (B, T, n_kv, hd)
        self.v[layer][page, :, slot] = v.transpose(1, 2)

    def attend(self, layer, q, k, v, input_pos, kv_len=None):  # batch row b is cache row b; -> (B, nh, T, hd)
        B, nh, T, hd = q.shape
        g = nh // k.size(1)
        self.write(layer, slice(None), k, v, input_pos)
        K, V = self.k[layer][: self.read], self.v[layer][: self.read]  # (P, n_kv, PAGE, hd): in place, no copy
        row, col = self.page_row[: self.read], self.page_col[: self.read]  # (P,) each
        qp = (q * hd**-0.5).reshape(B, -1, g * T, hd)[row]  # (P, n_kv, g*T, hd): each page meets its row's queries
        s = (qp @ K.transpose(-1, -2)).float()  # (P, n_kv, g*T, PAGE)
        seen = col[:, None, None] * PAGE + torch.arange(PAGE, device=q.device) <= input_pos[row][..., None]
        s.masked_fill_(~seen.repeat(1, g, 1).unsqueeze(1), float("-inf"))  # slots past the position; free pages
        # a softmax over each row's pages: scores in the scale of the row's largest, each page's share summed
        top = s.amax(-1)  # (P, n_kv, g*T)
        m = torch.full((B, *top.shape[1:]), torch.finfo(s.dtype).min, device=q.device)  # (B, n_kv, g*T)
        m.scatter_reduce_(0, row[:, None, None].expand_as(top), top, "amax")
        w = s.sub_(m[row].unsqueeze(-1)).exp_()  # (P, n_kv, g*T, PAGE)
        y = torch.zeros(B, *s.shape[1:3], hd, device=q.device).index_add_(0, row, (w.to(V.dtype) @ V).float())
        total = torch.zeros_like(m).index_add_(0, row, w.sum(-1))  # (B, n_kv, g*T); 0 only for a row of no page
        return (y / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]).to(q.dtype).view(B, nh, T, hd)


class Prefill:
    """A prefill of fresh rows: writes into `rows` of `cache`, attends to the prompt's own keys and values."""

    def __init__(self, cache, rows):
        self.cache, self.rows = cache, rows

    def attend(self, layer, q, k, v, input_pos, kv_len):
        self.cache.write(layer, self.rows, k, v, input_pos)
        return masked_attention(q, k, v, input_pos)  # (B, nh, T, hd)


@torch.no_grad()
def generate(model, prompts, stats=None, **request):
    """sample.generate's samples of its request, served by an Engine; stats: a dict to receive Engine.stats."""
    engine = Engine(model, prompts, **request)
    results = engine.run()
    if stats is not None:
        stats.update(engine.stats)
    return results


class Engine:
    """One generate call: the queue of jobs, the rows in flight and the cache they live in. run() is the loop."""

    def __init__(self, model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, eos_ids=(),
                 stop_strings=(), tokenizer=None, seed=None, memory_budget=2**30, expected_new_tokens=None,
                 progress=False, sync_every=None):
        self.seeds = check_request(prompts, stop_strings, tokenizer, seed)
        self.model, self.prompts, self.max_new = model, prompts, max_new_tokens
        self.sampling = temperature, top_p, top_k
        self.eos_ids, self.stop_strings, self.tokenizer = eos_ids, stop_strings, tokenizer
        self.dev = dev = model.inv_freq.device
        self.k = 1 if stop_strings else sync_every or (8 if dev.type == "cuda" else 1)  # decode steps between looks
        self.jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        self.queue = deque(range(len(self.jobs)))  # jobs to serve, in order; a preempted job goes back to the front
        cfg, dtype = model.config, model.embed_tokens.weight.dtype
        self.token_bytes = KVCache.token_bytes(cfg, dtype)
        longest = max(map(len, prompts))
        self.max_len = longest + max_new_tokens
        pages, B, self.paged = sizing(cfg, dtype, len(self.jobs), longest, max_new_tokens, memory_budget,
                                      expected_new_tokens)
        self.B = B  # unpaged: each row owns its max_len slots, read in place
        self.cache = PagedKVCache(cfg, B, pages, self.max_len, dtype, dev) if self.paged else \
            KVCache(cfg, B, self.max_len, dtype, dev)
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev)
        self.job = np.full(B, -1)  # host: the job each row holds, -1 = free
        self.pos = np.zeros(B, dtype=np.int64)  # host: the position each row feeds in next (a bound, inside a window)
        self.pos_d = torch.zeros(B, dtype=torch.long, device=dev)  # the device's own: exact
        self.live = torch.zeros(B, dtype=torch.bool, device=dev)  # rows decoding a job that has not ended
        self.n_gen = torch.zeros(B, dtype=torch.long, device=dev)
        # each row's tokens, log-probs and uniforms; column max_new_tokens takes the draws of rows past their end
        self.out_tok = torch.zeros(B, max_new_tokens + 1, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(B, max_new_tokens + 1, device=dev)
        self.u = torch.zeros(B, max_new_tokens + 1, dtype=torch.float64, device=dev)
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.logits = torch.zeros(B, cfg.vocab_size, device=dev)
        self.results = [[None] * n for _ in prompts]
        self.stats = dict(rows=B, paged=self.paged, peak_rows=0, preempted=0, pages=pages, steps=0, kv_moved=0,
                          kv_ideal=0)
        self.bar = Progress(len(self.jobs)) if progress else None

    def run(self):
        while True:
            free = np.flatnonzero(self.job < 0)
            if self.queue and len(free) >= max(1, self.B // 8):  # a prefill per single freed row wastes matmuls
                self.admit(free.tolist())
            if not (self.job >= 0).any():
                break
            self.stats["peak_rows"] = max(self.stats["peak_rows"], int((self.job >= 0).sum()))
            for step in range(self.k):  # k steps on the device alone; the host looks before the last forward
                stopped = self.sample()
                if step < self.k - 1:
                    self.forward()
            self.finish(stopped)
            self.grow_or_preempt()
            live = self.job >= 0
            if not live.any():
                continue  # every row ended: refill (or end) before the next forward
            if not self.queue and live.sum() <= self.B - max(1, self.B // 8):
                self.compact()
            self.forward()
        if self.bar:
            self.bar.close()
        return self.results

    def admit(self, rows):
        """Prefill the next jobs' prompts, once per distinct prompt, into the free `rows` the free pages allow."""
        take, need = [], 0
        for q in islice(self.queue, len(rows)):  # the next jobs, as many as the free pages hold
            need += pages_for(len(self.prompts[self.jobs[q][0]]) + self.k - 1) if self.paged else 0
            if self.paged and need > len(self.cache.free):
                break
            take.append(q)
        for _ in take:
            self.queue.popleft()
        if not take:
            return
        rows, ps = rows[: len(take)], [self.prompts[self.jobs[q][0]] for q in take]  # the taken jobs' rows, prompts
        if self.paged:  # the prompt and the k - 1 steps before the host looks again
            self.cache.grow(rows, [len(p) + self.k - 1 for p in ps])
        groups = {}  # prompt (identical objects, e.g. [prompt] * n, count as one) -> (the prompt, its rows)
        for r, p in zip(rows, ps):
            groups.setdefault(id(p), (p, []))[1].append(r)
        order = {key: u for u, key in enumerate(groups)}
        U, L = len(groups), max(len(p) for p, _ in groups.values())
        idx = torch.zeros(U, L, dtype=torch.long)  # right-padded prompts (U, L)
        for u, (p, _) in enumerate(groups.values()):
            idx[u, : len(p)] = torch.tensor(p)
        lead = [g[0] for _, g in groups.values()]  # the row each prefill runs in
        h = self.model(idx.to(self.dev), cache=Prefill(self.cache, lead), kv_len=L, return_hidden=True)  # (U, L, D)
        last = torch.tensor([len(p) - 1 for p, _ in groups.values()], device=self.dev)
        first = self.model.lm_head(h[torch.arange(U, device=self.dev), last]).float()  # (U, V): last positions only
        for p, (r0, *copies) in groups.values():  # the group's other rows copy the one prefill
            if copies:
                self.cache.copy_rows(copies, r0, len(p))
        src = torch.tensor([order[id(p)] for p in ps], device=self.dev)  # each row's prefill
        dst = torch.tensor(rows, device=self.dev)
        self.logits[dst] = first[src]
        self.job[rows], self.pos[rows] = take, list(map(len, ps))
        self.pos_d[dst], self.n_gen[dst], self.live[dst] = torch.tensor(self.pos[rows], device=self.dev), 0, True
        self.u[dst, : self.max_new] = torch.stack([uniforms(self.seeds[self.jobs[q][0]], self.jobs[q][1],
                                                            self.max_new) for q in take]).to(self.dev)

    def sample(self):
        """Each row's next token; rows that end are marked on the device -> stop-string flags (B,) or None."""
        at = torch.arange(self.B, device=self.dev), self.n_gen  # (row, step): past its end, the spare column
        tok, lp = sample_next(self.logits, *self.sampling, self.u[at])  # (B,), (B,)
        self.out_tok[at], self.out_lp[at] = tok, lp
        self.n_gen += self.live
        done = self.live & (torch.isin(tok, self.eos) | (self.n_gen >= self.max_new))
        stopped = None
        if self.stop_strings:  # the text's tails: the one per-step host work that grows with the batch
            rows = np.flatnonzero(self.job >= 0)
            tails = self.tokenizer.batch_decode([self.out_tok[r, max(0, c - stop_tail(self.stop_strings)): c].tolist()
                                                 for r, c in zip(rows, self.n_gen[rows].tolist())])
            stopped = np.zeros(self.B, dtype=bool)
            stopped[rows] = [any(s in t for s in self.stop_strings) for t in tails]
            done |= torch.as_tensor(stopped, device=self.dev)
        self.live &= ~done
        self.tok = tok
        return stopped

    def forward(self):
        live = self.job >= 0
        kv_len = int(self.pos[live].max()) + 1  # the slots the longest row reads
        if self.k > 1:  # static shapes between looks of the host: the window's longest, in steps of 8 pages
            kv_len = min(self.max_len, -(-(kv_len + self.k - 1) // (8 * PAGE)) * 8 * PAGE)
        self.logits = self.model(self.tok[:, None], cache=self.cache, input_pos=self.pos_d[:, None],
                                 kv_len=kv_len)[:, -1].float()  # (B, V)
        self.pos_d += self.live  # rows that ended stay put (writing their last slot again)
        cfg = self.model.config
        moved = cfg.num_hidden_layers * attention_bytes(cfg, self.cache.k.dtype, self.B, self.cache.read) \
            if self.paged else \
            self.B * kv_len * self.token_bytes  # model.KVCache: every row's slots up to kv_len
        self.stats["steps"] += 1
        self.stats["kv_moved"] += moved
        self.stats["kv_ideal"] += int((self.pos[live] + 1).sum()) * self.token_bytes
        self.pos[live] += 1

    def finish(self, stopped):
        """The host's look: the rows that ended since the last one become Completions; their rows are freed."""
        ended = np.flatnonzero((self.job >= 0) & ~self.live.cpu().numpy())
        if not len(ended):
            return
        rows = torch.as_tensor(ended, device=self.dev)
        counts = self.n_gen[rows].tolist()
        toks, lps = self.out_tok[rows, : max(counts)].tolist(), self.out_lp[rows, : max(counts)].tolist()
        for r, c, t, lp in zip(ended, counts, toks, lps):
            i, j = self.jobs[self.job[r]]
            reason = "eos" if t[c - 1] in self.eos_ids else "stop" if stopped is not None and stopped[r] else "length"
            text = self.tokenizer.decode(t[:c], skip_special_tokens=True) if self.tokenizer is not None else None
            self.results[i][j] = Completion(t[:c], lp[:c], reason, text)
            if self.bar:
                self.bar.update(c)
        if self.paged:
            self.cache.release(ended.tolist())
        self.job[ended] = -1

    def grow_or_preempt(self):
        """Pages for the next k forwards; when none are free, the newest row is preempted (later, the same tokens)."""
        while self.paged:
            live = np.flatnonzero(self.job >= 0)
            if self.cache.grow(live.tolist(), np.minimum(self.pos[live] + self.k, self.max_len).tolist()):
                return
            victim = int(live[self.job[live].argmax()])
            self.queue.appendleft(int(self.job[victim]))
            self.cache.release([victim])
            self.job[victim], self.live[victim] = -1, False
            self.stats["preempted"] += 1

    def compact(self):
        """Drop the finished rows from the batch (rows that own slots move them; paged rows renumber their table)."""
        keep = np.flatnonzero(self.job >= 0)
        keep = self.cache.keep_rows(keep.tolist(), int(self.pos[keep].max()))  # the slots written so far
        kt = torch.as_tensor(keep, device=self.dev)  # the old row of each row now
        self.job, self.pos, self.B = self.job[keep], self.pos[keep], len(keep)
        for name in ("pos_d", "live", "n_gen", "out_tok", "out_lp", "u", "tok"):
            setattr(self, name, getattr(self, name)[kt])


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
