"""Will it fit? The memory plan of a run per rank and per phase (Phase), from the model's shape and the settings,
before anything is loaded: the trained model (fp32 weights, gradients, AdamW, FSDP2-sharded) and its reference; a
replica only while it samples; a rollout's KV-cache pool and temporaries; an update's activations and log-prob chunk.
The per-token constants are counted from the ops of model.py, sample.py and engine.py; tests/test_memory.py holds the
plan to the peaks a run measures (--profile). A run refuses to start a plan that cannot fit.

    python train.py --preset qwen3-4b-base --plan --gpus 8 --gpu-memory-gb 40
    python train.py --plan --shape '{"model_type": "qwen3", ...config.json fields}' --gpus 8
"""
import contextlib
import dataclasses
import gc
import json
import os
import sys
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import PAGE, pages_for, sizing
from model import KVCache, ModelConfig, read_config
from runtime import resolve_model

GiB = 2**30


class Phase:  # the parts of an iteration, named once: the plan's columns, train.py's clock, --profile's rows
    challenger_rollouts, challenger_voting, challenger_update = "Challenger rollouts", "Challenger voting", \
        "Challenger update"
    dataset, solver_rollouts, solver_update = "dataset", "Solver rollouts", "Solver update"


# The presets' models, as their config.json on the hub says (so a plan needs no download).
HUB_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "tie_word_embeddings")
SHAPES = {name: dict(zip(HUB_FIELDS, fields), num_key_value_heads=8, head_dim=128) for name, fields in {
    "Qwen/Qwen3-4B-Base": ("qwen3", 151936, 2560, 9728, 36, 32, True),
    "Qwen/Qwen3-8B-Base": ("qwen3", 151936, 4096, 12288, 36, 32, False),
    "OctoThinker/OctoThinker-3B-Hybrid-Base": ("llama", 128256, 3072, 8192, 28, 24, True),
    "OctoThinker/OctoThinker-8B-Hybrid-Base": ("llama", 128256, 4096, 14336, 32, 32, False),
}.items()}
SAMPLE_BYTES = 40  # per decode-step logit (sample.sample_next): logits, fp32 copy, log-softmax, sort, cumsum, weights
LOGIT_BYTES = 20  # per logit of a log-prob chunk in the update: recomputed logits, float32 log-softmax, its grad


@dataclass
class PlanConfig:
    """the memory plan (train.py --plan)"""
    shape: str = ""  # config.json fields as JSON, instead of the model's
    gpus: int = 8  # ranks (torchrun processes); a real run uses its own
    gpus_per_node: int = 8  # ranks that share a node's host memory
    reserve_gb: float = 2.0  # of each GPU's memory (--gpu-memory-gb): CUDA context, NCCL buffers, allocator slack
    challenger_prompt_tokens: int = 200  # the Challenger prompt in a real tokenizer's chat template
    solver_prompt_tokens: int = 150  # the Solver's system turn and a problem
    bandwidth_gbs: float = 1555.0  # A100-40GB HBM; for the wall-time estimate
    tflops: float = 312.0  # A100 dense bf16


def n_params(s: ModelConfig):
    D, q, kv = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    block = D * (q + 2 * kv) + q * D + 3 * D * s.intermediate_size + 2 * D
    block += 2 * s.head_dim * s.qk_norm + (q + 2 * kv) * s.attention_bias + D * (s.attention_bias and s.model_type != "qwen2")
    embed = s.vocab_size * D * (1 if s.tie_word_embeddings else 2)
    return embed + s.num_hidden_layers * block + D, block


def act_bytes(s: ModelConfig, b):
    """Bytes per token autograd keeps for one block's backward in compute dtype b, as saved_tensors_hooks count."""
    D, q, kv, I = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim, s.intermediate_size
    heads = (2 * b + (8 if b == 4 else 6) * s.qk_norm) * (q + kv)
    return (24 if b == 4 else 16) * D + heads + 4 * b * I


def decode(s, b, tok, rows, prompt, max_new, U, pool):
    """Transient bytes of one sampling call with `rows` in flight; tok: KV-cache bytes per token."""
    pages = min(pool, rows * pages_for(prompt + max_new))  # the most one layer's attention reads in a decode step
    # engine.PagedKVCache.attend reads pages in place; per page and query head: its query (b), scores and weights
    # (fp32, then b), its share (b, fp32); and the slots-seen mask (an upper bound for the unpaged cache's attention)
    attention = pages * s.num_attention_heads * (s.head_dim * (2 * b + 4) + PAGE * (4 + b) + 2 * PAGE)
    logits = rows * s.vocab_size * SAMPLE_BYTES
    arrays = rows * max_new * 20  # tokens (int64), log-probs (fp32), uniforms (fp64) of every row
    # a prefill of U prompts (one layer's no-grad intermediates and pages), or the rows copying its pages by layer
    prefill = U * prompt * (b * (2 * s.hidden_size + 3 * s.intermediate_size) + tok / s.num_hidden_layers)
    prefill = max(prefill, rows * prompt * tok / s.num_hidden_layers / 2) + U * s.vocab_size * 4
    # the prefill and a decode step's attention and logits are not alive at once: it counts only by what it exceeds
    return dict(attention=attention, logits=logits + arrays, prefill=max(0, prefill - attention - logits))


def plan(c, s: ModelConfig, pc: PlanConfig, world=None, cuda=True):
    """-> (phases: {phase: {item: bytes}}, rows: {rollout: rows in flight}). c: a train.TrainConfig."""
    W = world or pc.gpus
    b = 2 if (cuda and c.dtype != "float32") or c.dtype == "bfloat16" else 4
    P, Pb = n_params(s)
    tok = KVCache.token_bytes(s, dtype := torch.bfloat16 if b == 2 else torch.float32)  # keys, values: every layer
    # the trained model's fp32 shards (gradients only in the update) and the reference's, in every training phase
    trained = dict(weights=4 * P / W, optimizer=8 * P / W, reference=b * P / W)
    replica = b * P  # a full copy in the compute dtype
    fsdp = cuda or W > 1  # FSDP2 on every GPU run and under torchrun
    sampler = replica if fsdp or b != 4 else 0  # one CPU process in float32 samples from the trained model itself
    parked = 0 if cuda else replica  # on CPU, a model "off the GPU" is still in the same memory
    rows, phases = {}, {}

    def rollout(name, jobs, prompt, max_new, n, distinct):  # sized as the engine sizes it
        pool, r, _ = sizing(s, dtype, jobs, prompt, max_new, int(c.memory_budget_gb * GiB), c.expected_new_tokens)
        rows[name] = r
        return dict(kv_cache=(pool + 1) * PAGE * tok) | decode(s, b, tok, r, prompt, max_new,
                                                             max(1, min(distinct, r // n)), pool)

    def update(seqs, T, micro_batch):
        n = micro_batch * T
        # the saved blocks (checkpointing: each block's input, and one block recomputed) + one block's gradients
        saved = n * (s.hidden_size * b * s.num_hidden_layers + act_bytes(s, b)) if c.activation_checkpointing else \
            n * act_bytes(s, b) * s.num_hidden_layers
        block = n * b * (s.intermediate_size + s.hidden_size)
        gathered = (2 * Pb * b + s.vocab_size * s.hidden_size * (b + 4)) if fsdp else 0  # blocks; root + its grad
        reduce = 4 * Pb if fsdp and b == 2 else 0  # a block's bf16 gradients cast to fp32 for the reduce-scatter
        return dict(gradients=4 * P / W, fsdp_gathered=gathered, fsdp_reduce_scatter=reduce, batch=seqs * T * 17,
                    activations=saved + block, logprob_chunk=min(c.logprob_chunk, n) * s.vocab_size * LOGIT_BYTES)

    G, m, ch_jobs = c.challenger_group, c.m_answers, c.challenger_prompts * c.challenger_group // W
    cT, sT = pc.challenger_prompt_tokens + c.challenger_max_new_tokens, pc.solver_prompt_tokens + c.solver_max_new_tokens
    phases[Phase.challenger_rollouts] = trained | dict(sampling_copy=sampler, frozen_solver=parked) | rollout(
        Phase.challenger_rollouts, ch_jobs, pc.challenger_prompt_tokens, c.challenger_max_new_tokens, G, 1)
    phases[Phase.challenger_voting] = trained | dict(frozen_solver=replica) | rollout(
        Phase.challenger_voting, ch_jobs * m, pc.solver_prompt_tokens, c.answer_max_new_tokens, m, ch_jobs * m)
    phases[Phase.challenger_update] = trained | dict(frozen_solver=parked) | update(ch_jobs, cT, c.micro_batch)
    voting = dict(frozen_solver=replica, frozen_challenger=parked) | rollout(
        "dataset voting", -(-c.n_problems // W) * m, pc.solver_prompt_tokens, c.answer_max_new_tokens, m, c.n_problems)
    gen = dict(frozen_solver=parked, frozen_challenger=replica) | rollout(
        "dataset problems", -(-c.n_problems // W), pc.challenger_prompt_tokens, c.challenger_max_new_tokens, 1, 1)
    phases[Phase.dataset] = max(voting, gen, key=lambda p: sum(p.values()))  # the larger; voting on a tie
    S = c.solver_problems * c.solver_group // W
    phases[Phase.solver_rollouts] = trained | dict(sampling_copy=sampler) | rollout(
        Phase.solver_rollouts, S, pc.solver_prompt_tokens, c.solver_max_new_tokens, c.solver_group, S)
    phases[Phase.solver_update] = trained | update(S, sT, c.micro_batch)
    return phases, rows


def hours_per_iteration(c, s, pc, rows, W):
    """Roofline hours of an iteration per rank -> (decoding at pc.bandwidth_gbs, training at 10 FLOPs/param/token)."""
    P, tok = n_params(s)[0], KVCache.token_bytes(s, torch.bfloat16)
    L = lambda mx: min(c.expected_new_tokens or mx, mx)  # the mean length of a completion
    ch = c.challenger_steps * c.challenger_prompts * c.challenger_group  # completions, all ranks together
    so = c.solver_steps * c.solver_problems * c.solver_group
    cp, sp = pc.challenger_prompt_tokens, pc.solver_prompt_tokens
    work = [  # (rows in flight, completions per rank, mean length, prompt)
        (rows[Phase.challenger_rollouts], ch / W, L(c.challenger_max_new_tokens), cp),
        (rows[Phase.challenger_voting], ch * c.m_answers / W, L(c.answer_max_new_tokens), sp),
        (rows["dataset problems"], c.n_problems / W, L(c.challenger_max_new_tokens), cp),
        (rows["dataset voting"], c.n_problems * c.m_answers / W, L(c.answer_max_new_tokens), sp),
        (rows[Phase.solver_rollouts], so / W, L(c.solver_max_new_tokens), sp)]
    decode_s = sum(jobs * n / r * (2 * P + r * (p + n / 2) * tok) for r, jobs, n, p in work) / (pc.bandwidth_gbs * 1e9)
    trained_tokens = (ch * (cp + L(c.challenger_max_new_tokens)) + so * (sp + L(c.solver_max_new_tokens))) / W
    return decode_s / 3600, 10 * P * trained_tokens / (pc.tflops * 1e12) / 3600


def shape_of(c, shape_json=None):
    """The model's shape: --shape JSON (config.json fields), the model folder's config.json, or a known hub id."""
    if shape_json:
        return ModelConfig.from_hf(json.loads(shape_json))
    if not os.path.isdir(c.model) and c.model in SHAPES:
        return ModelConfig.from_hf(SHAPES[c.model])
    return ModelConfig.from_hf(read_config(c.model if os.path.isdir(c.model) else resolve_model(c.model)))


def verdict(c, s, pc, gpu_memory_gb, cuda=True):
    """None if every phase fits in gpu_memory_gb, else one sentence: the phase, by how much, and a fix."""
    reserve = pc.reserve_gb if cuda else 0
    limit = (gpu_memory_gb - reserve) * GiB
    name, items = max(plan(c, s, pc, cuda=cuda)[0].items(), key=lambda kv: sum(kv[1].values()))
    if sum(items.values()) <= limit:
        return None
    largest = max(items, key=items.get)
    smaller = lambda field, *values: [(field, v) for v in values if v < getattr(c, field)]
    pool = smaller("memory_budget_gb", 12, 8, 4)
    rest = [("activation_checkpointing", True)] * (not c.activation_checkpointing) + smaller("micro_batch", 4, 2, 1) \
        + smaller("logprob_chunk", 512, 256)
    # the pool first when it is the largest part; cumulative: checkpointing stays on while the micro-batch shrinks
    tries = (pool + rest if largest == "kv_cache" else rest + pool) + [("gpus", w) for w in (16, 32, 64) if w > pc.gpus]
    fix, changed = "GPUs with more memory", {}
    for k, v in tries:
        changed[k] = v
        c2 = dataclasses.replace(c, **{f: x for f, x in changed.items() if f != "gpus"})  # gpus: plan's world
        if max(sum(p.values()) for p in plan(c2, s, pc, changed.get("gpus"), cuda)[0].values()) <= limit:
            fix = " ".join(f"--{f.replace('_', '-')}" + ("" if x is True else f" {x}") for f, x in changed.items())
            break
    return (f"the {name} phase needs {sum(items.values()) / GiB:.1f} GiB per GPU, more than the {limit / GiB:.1f} "
            f"GiB available ({gpu_memory_gb:g} GiB less {reserve:g} reserved), {largest.replace('_', ' ')} the "
            f"largest part; it would fit with {fix}")


def report(c, s, pc, phases, rows, gpu_memory_gb):
    items = [k for k in dict.fromkeys(k for p in phases.values() for k in p) if any(p.get(k) for p in phases.values())]
    print(f"Memory plan: {c.model} ({n_params(s)[0] / 1e9:.2f}B parameters), {pc.gpus} rank(s) x "
          f"{gpu_memory_gb:g} GiB, KV pool {c.memory_budget_gb:g} GiB, micro-batch {c.micro_batch}, "
          f"activation checkpointing {'on' if c.activation_checkpointing else 'off'}")
    print("| GiB per rank | " + " | ".join(phases) + " |\n" + "|---" * (len(phases) + 1) + "|")
    for k in items + ["total"]:
        vals = [sum(p.values()) if k == "total" else p.get(k, 0) for p in phases.values()]
        print(f"| {k.replace('_', ' ')} | " + " | ".join(f"{v / GiB:.2f}" for v in vals) + " |")
    print("rows in flight: " + ", ".join(f"{k} {v}" for k, v in rows.items()) +
          f" (at {c.expected_new_tokens or 'max'} new tokens per completion)")
    replica, ranks = (2 if c.dtype != "float32" else 4) * n_params(s)[0], min(pc.gpus, pc.gpus_per_node)
    print(f"host memory per node: {(ranks * replica + 5e9) / GiB:.1f} GiB ({ranks} ranks x a parked replica of "
          f"{replica / GiB:.1f} GiB, and rank 0's export shard of at most 5 GB); loading reads each rank's shard "
          f"of the checkpoint only, and checkpoints are written and read by shards")
    dec, tr = hours_per_iteration(c, s, pc, rows, pc.gpus)
    print(f"estimated time per iteration: {dec + tr:.1f} h ({dec:.1f} h decoding at {pc.bandwidth_gbs:g} GB/s, "
          f"{tr:.1f} h training at {pc.tflops:g} TFLOP/s, both at 100%); the authors: ~50 h for 3 iterations of "
          f"Qwen3-4B-Base on 8 x A100-40GB")


def check(c, folder, world, device, challenger_prompt_tokens):
    """None if a starting train.py's plan fits in --gpu-memory-gb (default: the GPU's; CPU: no limit), else why not."""
    cuda = device.type == "cuda"
    limit = c.gpu_memory_gb or (torch.cuda.get_device_properties(device).total_memory / GiB if cuda else 0)
    pc = PlanConfig(gpus=world, challenger_prompt_tokens=challenger_prompt_tokens)
    return limit and verdict(c, shape_of(dataclasses.replace(c, model=folder)), pc, limit, cuda)


def profile(c, folder, world, cuda, prompt_tokens, seconds, peaks):
    """--profile: each phase's time and peak (the largest rank's) beside the plan -> (lines, profile.json)."""
    pc = PlanConfig(gpus=world, challenger_prompt_tokens=prompt_tokens[0], solver_prompt_tokens=prompt_tokens[1])
    phases, rows = plan(c, shape_of(dataclasses.replace(c, model=folder)), pc, cuda=cuda)
    table = {k: dict(seconds=seconds.get(k, 0.0), peak=max(p.get(k, (0, 0))[0] for p in peaks),
                     reserved=max(p.get(k, (0, 0))[1] for p in peaks), plan=sum(phases[k].values()))
             for k in phases if any(k in p for p in peaks)}
    lines = [f"{'phase':22}{'seconds':>10}{'peak MiB':>12}{'plan MiB':>12}{'peak/plan':>11}" + " reserved MiB" * cuda]
    lines += [f"{k:22}{t['seconds']:10.1f}{t['peak'] / 2**20:12.1f}{t['plan'] / 2**20:12.1f}{t['peak'] / t['plan']:11.2f}"
              + f"{t['reserved'] / 2**20:13.1f}" * cuda for k, t in table.items()]
    return lines, dict(phases=table, plan=phases, rows=rows)


def main(c, pc):
    """train.py --plan: print the plan; exit 2 with one sentence if it does not fit."""
    gpu_gb = c.gpu_memory_gb or 40.0
    s = shape_of(c, pc.shape)
    report(c, s, pc, *plan(c, s, pc), gpu_gb)
    if msg := verdict(c, s, pc, gpu_gb):
        print(f"error: does not fit: {msg}", file=sys.stderr)
        sys.exit(2)
    print("fits")


# ------------------------------------------------------------------------------------------ measuring

def _storages(objs):
    """The distinct storages under the tensors in objs (a DTensor's: its local shard's)."""
    out = {}
    for o in objs:
        if isinstance(o, torch.Tensor) and not o.is_meta:
            with contextlib.suppress(Exception):  # tensor subclasses without a storage of their own raise
                st = getattr(o, "_local_tensor", o).untyped_storage()
                out[id(st)] = st
    return out.values()


class peak_memory(TorchDispatchMode):
    """`with peak_memory(device) as m:` -> m.bytes, the peak of live tensor bytes, and m.reserved. CPU (slow): each
    storage counts until its Python handle is finalized, on any thread (torch.profiler misses gloo's frees)."""

    def __init__(self, device):
        super().__init__()
        self.cuda, self.bytes = torch.device(device).type == "cuda", 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.live, self.sizes = 0, {}
        with warnings.catch_warnings():  # deprecated attributes warn when looked at
            warnings.simplefilter("ignore", FutureWarning)
            self._track(_storages(gc.get_objects()))
        self.bytes, resize = self.live, torch.UntypedStorage.resize_

        def resize_(st, n):  # FSDP2 frees and re-allocates gathered weights by resizing their storage
            if id(st) in self.sizes:
                self._set(id(st), n)
            return resize(st, n)
        self._resize, torch.UntypedStorage.resize_ = resize, resize_
        return super().__enter__()

    def _set(self, key, n):  # storage `key` now holds n bytes
        self.live += n - self.sizes.get(key, 0)
        self.sizes[key] = n
        self.bytes = max(self.bytes, self.live)

    def _track(self, storages):
        for st in storages:
            if id(st) not in self.sizes:
                self._set(id(st), st.nbytes())
                weakref.finalize(st, self._free, id(st))

    def _free(self, key):
        self.live -= self.sizes.pop(key, 0)  # 0: freed after the block ended

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._track(_storages(torch.utils._pytree.tree_leaves(out)))
        return out

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            return False
        torch.UntypedStorage.resize_ = self._resize
        self.sizes, self.reserved = {}, self.bytes  # finalizers still pending find nothing to subtract
        return super().__exit__(*exc)
