"""Benchmark: our sampler and log-prob path against transformers', side by side on one random Qwen3 model.

    python bench.py --preset cpu --threads 1,2  # a 25M-parameter Qwen3 shape, float32, ~13 min (BENCHMARKS.md)
    python bench.py --preset gpu              # Qwen3-1.7B and Qwen3-4B shapes, bfloat16, one CUDA GPU
    python bench.py --preset gpu --compile    # plus a torch.compile'd (CUDA-graph) decode step at batch 1

One process, the same weights, dtype, threads and inputs; medians of --repeats runs after a warm-up, interleaved
(BENCHMARKS.md reads the table). Rollout: P prompts x n samples whose lengths are geometric (vocab / mean_new_tokens
random ids are EOS); "rollout paged" is the long one in a KV budget of --paged-budget x (rows x max_len). Training:
forward + backward of completion log-probs ("sum logp" must agree). Decode b=1: time per token. % roofline: max(useful
FLOPs / FLOP/s, minimal bytes / bandwidth) / run time. CPU s is the steadier clock on a shared machine: --threads 1.
"""
import argparse
import collections
import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch

from grpo import token_logprobs
from engine import generate
from model import KVCache, Transformer

FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size")
SHAPES = {name: dict(zip(FIELDS, v)) for name, v in {  # the 1.7B and 4B are the released checkpoints' (random here)
    "cpu-25m": (384, 1024, 8, 6, 2, 64, 32000),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, 151936),
    "qwen3-4b": (2560, 9728, 36, 32, 8, 128, 151936),
}.items()}


@dataclass
class BenchConfig:
    shapes: tuple = ("cpu-25m",)
    device: str = "cpu"
    dtype: str = "float32"
    prompts: int = 16               # P
    prompt_len: tuple = (16, 64)    # prompt lengths drawn uniformly in [min, max]
    n: int = 4                      # samples per prompt
    max_new_tokens: int = 64
    mean_new_tokens: int = 32       # 1 / per-step stop probability (sets the number of EOS ids)
    long_rollout: tuple = (128, 48)  # (max_new_tokens, mean_new_tokens) of the "long" rollout rows; () = none
    train_batch: int = 8            # sequences per forward/backward (GRPOConfig.micro_batch)
    logprob_chunk: int = 1024       # GRPOConfig.logprob_chunk
    decode_tokens: int = 64         # batch-1 decode: tokens generated after a prompt_len[1]-token prompt
    memory_budget: int = 2**30      # engine.generate's KV-cache budget
    paged_budget: float = 0.25      # the paged row's budget, a fraction of the long rollout's rows x max_len
    repeats: int = 3
    threads: tuple = (0,)           # each count runs the whole table; 0 = torch's default (all cores)
    compile: bool = False
    seed: int = 0


PRESETS = {
    "cpu": {},
    "gpu": dict(shapes=("qwen3-1.7b", "qwen3-4b"), device="cuda", dtype="bfloat16", prompts=32, prompt_len=(32, 128),
                n=8, max_new_tokens=256, mean_new_tokens=128, decode_tokens=256, memory_budget=32 * 2**30,
                long_rollout=(1024, 512)),
}


def measure(fn, dev, profile_memory):
    """fn() once -> (result, wall s, CPU s, peak bytes it allocated: CUDA's, or the (slow) profiler's, or None)."""
    cuda, prof = dev == "cuda", torch.profiler.profile(profile_memory=True) if profile_memory else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif prof:
        prof.start()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    if cuda or not prof:
        return out, wall, cpu, torch.cuda.max_memory_allocated() - base if cuda else None
    prof.stop()
    # the running sum of allocations and frees; an op's net allocation counts from its start
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    return out, wall, cpu, max(itertools.accumulate((nbytes for _, nbytes in events), initial=0))


def machine_roofline(cfg, dtype):
    """-> (copy bandwidth in bytes/s, matmul FLOP/s), the best of three runs each; per CPU second on CPU."""
    cuda = cfg.device == "cuda"
    sync, clock = (torch.cuda.synchronize, time.perf_counter) if cuda else (lambda: None, time.process_time)
    # 512 MiB copied into a preallocated tensor: a clone would time page faults too
    x, y = torch.ones(2**27, device=cfg.device), torch.empty(2**27, device=cfg.device)
    m = 8192 if cuda else 2048
    a, b = (torch.randn(m, m, device=cfg.device, dtype=dtype) for _ in range(2))
    best = {"copy": 1e9, "mm": 1e9}
    for _ in range(3):
        for name, fn in (("copy", lambda: y.copy_(x)), ("mm", lambda: a @ b)):
            sync(); t = clock(); fn(); sync()
            best[name] = min(best[name], clock() - t)
    return 2 * x.numel() * x.element_size() / best["copy"], 2 * m**3 / best["mm"]


class Costs:
    """Useful FLOPs (no padding, no finished rows) and minimal bytes (the weights once per step) of the workloads."""

    def __init__(self, c, dtype):
        attn = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * 2  # q,k,v,o
        self.mm = c.num_hidden_layers * (attn + 3 * c.hidden_size * c.intermediate_size)  # weights in matmuls
        self.head = c.hidden_size * c.vocab_size
        self.attn = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim  # FLOPs per (query, key) pair
        self.kv = KVCache.token_bytes(c, dtype)  # cache bytes per token
        self.weights = (self.mm + self.head) * dtype.itemsize

    def rollout(self, prompt_lens, gen_lens, n):
        """prompt_lens (P,), gen_lens (P*n,) grouped by prompt -> (FLOPs, bytes)."""
        flops = sum(2 * self.mm * L + self.attn * L * (L + 1) / 2 + 2 * self.head for L in prompt_lens)
        rows = [(L, g) for L, gs in zip(prompt_lens, zip(*[iter(gen_lens)] * n)) for g in gs]
        ctx = sum((g - 1) * L + (g - 1) * g / 2 for L, g in rows)  # keys read by the g - 1 decode steps
        flops += sum(g - 1 for g in gen_lens) * 2 * (self.mm + self.head) + self.attn * ctx
        return flops, max(gen_lens) * self.weights + ctx * self.kv

    def training(self, seq_lens, n_scored):  # backward = 2 x forward
        return 3 * (sum(2 * self.mm * T + self.attn * T * (T + 1) / 2 for T in seq_lens) + 2 * self.head * n_scored)


def make_inputs(cfg, vocab):
    g = torch.Generator().manual_seed(cfg.seed)
    rand_len = lambda: int(torch.randint(cfg.prompt_len[0], cfg.prompt_len[1] + 1, (1,), generator=g))
    prompts = [torch.randint(vocab, (rand_len(),), generator=g).tolist() for _ in range(cfg.prompts)]
    perm, n_eos = torch.randperm(vocab, generator=g), round(vocab / cfg.mean_new_tokens)
    eos_ids, pad_id = sorted(perm[:n_eos].tolist()), int(perm[n_eos])
    # training batch: prompt + a geometric completion, right-padded (B, T)
    p_lens = [rand_len() for _ in range(cfg.train_batch)]
    u = torch.rand(cfg.train_batch, generator=g)
    c_lens = (u.log() / torch.tensor(1 - 1 / cfg.mean_new_tokens).log()).ceil().clamp(1, cfg.max_new_tokens)
    seq_lens = [p + int(c) for p, c in zip(p_lens, c_lens)]
    ids = torch.randint(vocab, (cfg.train_batch, max(seq_lens)), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, T) in enumerate(zip(p_lens, seq_lens)):
        ids[b, T:] = pad_id
        mask[b, p:T] = True
    return prompts, eos_ids, pad_id, ids.to(cfg.device), mask.to(cfg.device), seq_lens


def rollout_ours(model, prompts, eos_ids, cfg, seed, stats=None, expected_new_tokens=None):
    out = generate(model, prompts, n=cfg.n, max_new_tokens=cfg.max_new_tokens, eos_ids=eos_ids, seed=seed,
                   memory_budget=cfg.memory_budget, expected_new_tokens=expected_new_tokens, stats=stats)
    return [len(c.tokens) for row in out for c in row]  # (P*n,) grouped by prompt


def rollout_hf(hf, prompts, eos_ids, pad_id, cfg, seed, min_new=0):
    L = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])  # left-padded (P, L), as generate expects
    att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    # top_k=0: its default top_k=50 would sample another distribution
    out = hf.generate(input_ids=ids.to(cfg.device), attention_mask=att.to(cfg.device), do_sample=True, temperature=1.0,
                      top_k=0, top_p=1.0, num_return_sequences=cfg.n, max_new_tokens=cfg.max_new_tokens,
                      min_new_tokens=min_new, eos_token_id=eos_ids, pad_token_id=pad_id)
    new = out[:, L:]  # (P*n, steps): a finished row is padded with pad_id after its EOS
    is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    return torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.size(1)).tolist()


def train_ours(model, ids, mask, cfg):
    logp = token_logprobs(model, ids, mask, 1.0, chunk=cfg.logprob_chunk).sum()  # (B, T) summed, 0 off completions
    logp.backward()
    return logp.item()


def train_hf(hf, ids, mask):
    logits = hf(input_ids=ids, use_cache=False).logits  # (B, T, V)
    logp = (logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum()
    logp.backward()
    return logp.item()


def decode_compiled(model, prompt, cfg):
    """Batch-1 decode through a torch.compile'd step: static shapes (all max_len slots, masked) compile once."""
    dev, max_len = cfg.device, len(prompt) + cfg.decode_tokens
    cache = model.new_cache(1, max_len)
    step = torch.compile(lambda tok, pos: model(tok, cache=cache, input_pos=pos, kv_len=max_len)[:, -1],
                         mode="reduce-overhead" if dev == "cuda" else None, fullgraph=True)

    @torch.no_grad()  # traced without autograd: nothing to save for a backward
    def run(seed):
        idx = torch.tensor([prompt], device=dev)
        logits = model(idx, cache=cache, input_pos=torch.arange(len(prompt), device=dev)[None], kv_len=max_len)[:, -1]
        for t in range(len(prompt), max_len):
            logits = step(torch.multinomial(logits.float().softmax(-1), 1), torch.tensor([[t]], device=dev))
    return run


def bench_shape(cfg, shape, dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    hf_cfg = Qwen3Config(**SHAPES[shape], tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=4096)
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = Transformer.from_pretrained(tmp, dtype=dtype, device=cfg.device).eval()
    costs = Costs(ours.config, dtype)
    prompts, eos_ids, pad_id, ids, mask, seq_lens = make_inputs(cfg, ours.config.vocab_size)
    dec_prompt = (prompts[0] * cfg.prompt_len[1])[: cfg.prompt_len[1]]
    dec = replace(cfg, n=1, max_new_tokens=cfg.decode_tokens)
    stats = collections.defaultdict(dict)  # name -> engine.generate's stats of its last run (steps, bytes moved)
    runs = {  # name -> (workload, fn(seed) -> result)
        "rollout ours": ("rollout", lambda s: rollout_ours(ours, prompts, eos_ids, cfg, s, stats["rollout ours"])),
        "rollout transformers": ("rollout", lambda s: rollout_hf(hf, prompts, eos_ids, pad_id, cfg, s)),
        "training ours": ("training", lambda s: train_ours(ours, ids, mask, cfg)),
        "training transformers": ("training", lambda s: train_hf(hf, ids, mask)),
        "decode b=1 ours": ("decode", lambda s: rollout_ours(ours, [dec_prompt], (), dec, s)),
        "decode b=1 transformers": ("decode", lambda s: rollout_hf(hf, [dec_prompt], eos_ids, pad_id, dec, s,
                                                                   min_new=cfg.decode_tokens)),
        "machine": ("machine", lambda s: machine_roofline(cfg, dtype)),  # between the runs: under the same load
    }
    if cfg.long_rollout:  # the same prompts, longer answers
        lcfg = replace(cfg, max_new_tokens=cfg.long_rollout[0], mean_new_tokens=cfg.long_rollout[1])
        _, l_eos, l_pad, *_ = make_inputs(lcfg, ours.config.vocab_size)
        runs["rollout long ours"] = ("rollout", lambda s: rollout_ours(ours, prompts, l_eos, lcfg, s,
                                                                          stats["rollout long ours"]))
        rows_x_len = len(prompts) * cfg.n * (max(map(len, prompts)) + cfg.long_rollout[0]) * costs.kv
        pcfg = replace(lcfg, memory_budget=int(cfg.paged_budget * rows_x_len))
        runs["rollout paged ours"] = ("rollout", lambda s: rollout_ours(
            ours, prompts, l_eos, pcfg, s, stats["rollout paged ours"], lcfg.mean_new_tokens))
        runs["rollout long transformers"] = ("rollout", lambda s: rollout_hf(hf, prompts, l_eos, l_pad, lcfg, s))
    if cfg.compile:
        runs["decode b=1 ours compiled"] = ("decode", decode_compiled(ours, dec_prompt, cfg))
    res = {name: [] for name in runs}  # name -> [measure's (result, wall s, CPU s, peak)], the warm-up's first
    for r in range(-1, cfg.repeats):  # r = -1: warm-up, not timed
        for name, (_, fn) in list(runs.items()):
            ours.zero_grad(set_to_none=True)
            hf.zero_grad(set_to_none=True)
            try:
                res[name].append(measure(lambda: fn(cfg.seed + r), cfg.device, profile_memory=r < 0))
            except Exception as e:  # an untested compiler backend costs its own row, not the table
                if "compiled" not in name:
                    raise
                print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                del runs[name]
    n_params = ours.num_params()
    del hf, ours
    gc.collect()

    med = statistics.median
    bw, flops = (med(o[i] for o, *_ in res["machine"][1:]) for i in (0, 1))
    del runs["machine"]  # not a row of the table
    print(f"\n### {shape}: {n_params / 1e6:.1f}M parameters, {cfg.dtype}, threads {torch.get_num_threads()}, "
          f"medians of {cfg.repeats}; machine: copy {bw / 1e9:.1f} GB/s, matmul {flops / 1e12:.3f} TFLOP/s\n")
    print("| run | wall s | CPU s | tok/s | tok/CPU-s | peak MiB | detail | % roofline | MB/step (x ideal) |\n"
          + "|---" * 9 + "|")
    rows = {}
    for name, (work, _) in runs.items():
        warm, *timed = res[name]
        outs, walls, cpus, peaks = zip(*timed)  # CUDA's warm-up also allocates workspaces; CPU profiles only it
        wall, cpu, peak = med(walls), med(cpus), med(peaks if cfg.device == "cuda" else [warm[3]]) / 2**20
        times = walls if cfg.device == "cuda" else cpus  # the roofline's clock (see machine_roofline)
        if work == "rollout":
            roof = (costs.rollout([len(p) for p in prompts], o, cfg.n) for o in outs)  # (FLOPs, bytes) per run
            tok_s, tok_c = (med(sum(o) / t for o, t in zip(outs, ts)) for ts in (walls, cpus))
            frac = med(max(f / flops, b / bw) / t for (f, b), t in zip(roof, times))
            lens = [g for o in outs for g in o]
            detail = f"length {sum(lens) / len(lens):.1f} / {max(lens)}"
        elif work == "training":
            tok_s, tok_c = sum(seq_lens) / wall, sum(seq_lens) / cpu
            frac = costs.training(seq_lens, int(mask.sum())) / flops / med(times)
            detail = f"sum logp {med(outs):.2f}"
        else:  # decode
            step = med(times) / cfg.decode_tokens
            byts = costs.weights + costs.kv * (cfg.prompt_len[1] + cfg.decode_tokens / 2)
            tok_s, tok_c, frac = cfg.decode_tokens / wall, cfg.decode_tokens / cpu, byts / bw / step
            detail = f"{step * 1e3:.2f} ms/token, {byts / step / 1e9:.1f} GB/s"
        rows[name] = (tok_s, tok_c, peak)
        moved = "-"
        if stats[name].get("steps"):  # per decode step: the weights, and the attention's traffic against the ideal
            st = stats[name]
            per_step, ideal = (costs.weights + st[k] / st["steps"] for k in ("kv_moved", "kv_ideal"))
            moved = f"{per_step / 1e6:,.0f} ({per_step / ideal:.2f}x)"
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {tok_s:,.0f} | {tok_c:,.0f} | {peak:,.0f} | {detail} | "
              f"{100 * frac:.0f}% | {moved} |")
    print()
    works = ("rollout", "rollout long", "rollout paged", "training", "decode b=1")
    for work in [w for w in works if f"{w} ours" in rows]:
        base = "rollout long" if work == "rollout paged" else work  # the same requests, no budget
        (a, ac, am), (b, bc, bm) = rows[f"{work} ours"], rows[f"{base} transformers"]
        print(f"{work}: ours / transformers = {a / b:.2f}x tokens/s ({ac / bc:.2f}x per CPU second), "
              f"{am / max(bm, 1e-9):.2f}x peak memory")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Ours vs transformers: rollout, training and decode throughput.")
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--threads", type=lambda v: tuple(int(t) for t in v.split(",")),
                    help="thread counts, e.g. 1,2: the table once per count (0 = all cores)")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd batch-1 decode step")
    a = ap.parse_args(argv)
    over = {k: v for k, v in vars(a).items() if k != "preset" and v is not None}  # the preset, then the flags given
    cfg = replace(BenchConfig(**PRESETS[a.preset]), **over)
    error = ("--preset gpu needs a CUDA GPU and this torch sees none; run --preset cpu here."
             if cfg.device == "cuda" and not torch.cuda.is_available() else
             "need --repeats >= 1 and --threads >= 0 (0 = all cores)." if cfg.repeats < 1 or min(cfg.threads) < 0 else None)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    import transformers
    transformers.logging.set_verbosity_error()
    dev_name = torch.cuda.get_device_name() if cfg.device == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"{dev_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} (above 0: other processes share the machine)")
    print(f"rollout: P={cfg.prompts} prompts of {cfg.prompt_len[0]}-{cfg.prompt_len[1]} tokens x n={cfg.n}, "
          f"max_new_tokens={cfg.max_new_tokens}, stop probability 1/{cfg.mean_new_tokens} per step; "
          f"training: {cfg.train_batch} sequences; decode: batch 1, {cfg.decode_tokens} tokens")
    all_cores = torch.get_num_threads()
    for threads in cfg.threads:
        torch.set_num_threads(threads or all_cores)
        for shape in cfg.shapes:
            bench_shape(cfg, shape, getattr(torch, cfg.dtype))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
