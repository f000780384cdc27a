"""
R-Zero's loop: the Challenger learns to write problems its Solver is unsure about, the Solver learns from
them, labelled by its own majority vote. No human data.

    python train.py                                          # the toy world on a laptop CPU (~10 min)
    python train.py --preset qwen3-4b-base --model /path/to/Qwen3-4B-Base            # one GPU
    torchrun --nproc_per_node=8 train.py --preset qwen3-4b-base --model Qwen/Qwen3-4B-Base
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        train.py --preset qwen3-8b-base --model Qwen/Qwen3-8B-Base   # and --node_rank=1 on the other node
    python train.py --challenger-steps 0 --out-dir runs/untrained-challenger   # the key ablation

Each iteration (RZERO.md, "Loop"):
  1. Challenger phase: GRPO on the Challenger, rewarded by the frozen Solver's uncertainty (challenger.py).
  2. Dataset phase: the frozen Challenger writes N problems, the frozen Solver answers each m times, the
     majority is the pseudo-label, problems of informative difficulty are kept (solver.py).
  3. Solver phase: GRPO on the Solver against the pseudo-labels.
Both models and the frozen reference live in every process: no servers, no files passed between jobs.

Distributed: under torchrun the model being trained is sharded with FSDP2 (`fully_shard` per block, then the
root); a plain full copy is gathered once per rollout for sampling, each rank samples its share of prompts,
and what the method needs batch-wide (the majority votes, the repetition penalty) is gathered. The frozen
models are plain replicas. Gloo on CPU, NCCL on GPU.

Outputs (--out-dir): config.json, metrics.jsonl, iter{i}/{challenger,solver}/ (Hugging Face folders with the
tokenizer, float32 so that lr-1e-6 updates survive into the next iteration), iter{i}/dataset.jsonl, and
state.pt: the phase in progress (weights, optimizer, step), written atomically after every step. Re-running
the same command resumes from it; everything random is seeded from (seed, iteration, phase, step, rank).

Departures from the paper: AdamW with fp32 master weights (bf16 compute on GPU); the authors' Solver phase
runs 20 steps and keeps step 15, ours runs `solver_steps`; the toy preset is scaled down (see toy.py).
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import challenger
import grpo
import sample
import solver
from model import Transformer, check_folder


@dataclass
class TrainConfig:
    model: str = "toy"  # a Hugging Face folder, a hub id, or "toy" (the embedded toy world)
    out_dir: str = "runs/toy"
    iterations: int = 3
    seed: int = 0
    # Challenger phase
    challenger_steps: int = 5  # 0 = the "untrained Challenger" ablation
    challenger_prompts: int = 512  # prompts per step; each gets challenger_group completions
    challenger_group: int = 4
    challenger_max_new_tokens: int = 4096
    challenger_top_p: float = 0.99
    reward_variant: str = "paper"  # "paper" max(0, r_unc - r_rep) | "code" min(p, 1-p) - r_rep
    repetition_penalty: bool = True
    # voting: the frozen Solver answers each question m times
    m_answers: int = 10  # the paper's m (a flag named --m would clash with torchrun's own options)
    vote_top_k: int = 0
    answer_max_new_tokens: int = 4096
    # dataset phase
    n_problems: int = 8000
    problem_top_p: float = 0.95
    delta: float = 0.25
    filter: bool = True
    # Solver phase
    solver_steps: int = 15
    solver_problems: int = 512  # problems per step; each gets solver_group rollouts
    solver_group: int = 5
    solver_max_new_tokens: int = 4096
    solver_top_p: float = 0.99
    updates_per_step: int = 4  # optimizer updates per rollout step (both phases)
    # GRPO
    lr: float = 1e-6
    weight_decay: float = 0.01
    kl_coef: float = 0.01
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    loss_agg: str = "token_mean"
    grad_clip: float = 1.0
    micro_batch: int = 8
    temperature: float = 1.0  # every rollout and vote samples at this temperature (RZERO.md)
    # machine
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # compute/sampling dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    memory_budget_gb: float = 16.0  # KV-cache bytes a sampling call may allocate
    eval_problems: int = 512  # toy world only: held-out problems measured after every iteration
    eval_k: int = 4


PAPER = dict(iterations=3, challenger_steps=5, solver_steps=15, lr=1e-6)
PRESETS = {
    # toy: the paper's ratio of generated problems to Solver slots (8000 : 15 x 512), 336 : 10 x 32. With more
    # problems to spare, the Solver never runs short and the Challenger's aim cannot matter (measured: README).
    "toy": dict(model="toy", out_dir="runs/toy", challenger_steps=5, challenger_prompts=32, challenger_group=4,
                challenger_max_new_tokens=40, m_answers=10, answer_max_new_tokens=160, n_problems=336,
                solver_steps=10, solver_problems=32, solver_group=5, solver_max_new_tokens=160,
                updates_per_step=2, lr=5e-5, kl_coef=0.01, micro_batch=64, memory_budget_gb=1.0),
    "qwen3-4b-base": dict(PAPER, model="Qwen/Qwen3-4B-Base", out_dir="runs/qwen3-4b-base"),
    "qwen3-8b-base": dict(PAPER, model="Qwen/Qwen3-8B-Base", out_dir="runs/qwen3-8b-base"),
    "octothinker-3b": dict(PAPER, model="OctoAI/OctoThinker-3B-Hybrid-Base", out_dir="runs/octothinker-3b"),
    "octothinker-8b": dict(PAPER, model="OctoAI/OctoThinker-8B-Hybrid-Base", out_dir="runs/octothinker-8b"),
}
NOT_RESULT_FIELDS = ("out_dir", "device", "memory_budget_gb")  # may change between a run and its resume


def _flag_error(message):
    raise ValueError(message)


def parse_config(argv=None) -> TrainConfig:
    """--preset NAME applies its overrides; every field of TrainConfig is a flag (--field-name)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.error = _flag_error  # main prints one line; argparse would print the whole usage screen first
    ap.add_argument("--preset", default="toy", help=f"one of: {', '.join(PRESETS)}")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(flag, type={"int": int, "float": float, "str": str}.get(str(f.type), f.type), default=None)
    a = ap.parse_args(argv)
    if a.preset not in PRESETS:
        raise ValueError(f"unknown preset {a.preset!r} (known: {', '.join(PRESETS)})")
    cfg = TrainConfig(**PRESETS[a.preset])
    for f in dataclasses.fields(TrainConfig):
        if getattr(a, f.name) is not None:
            setattr(cfg, f.name, getattr(a, f.name))
    check_config(cfg)
    return cfg


def check_config(c: TrainConfig):
    world = dist.get_world_size() if dist.is_initialized() else 1
    rules = [
        (0 <= c.delta <= 0.5, f"--delta must be in [0, 0.5], got {c.delta}"),
        (c.challenger_group >= 2 and c.solver_group >= 2, "group sizes (G) must be at least 2 for GRPO advantages"),
        (c.m_answers >= 1 and c.n_problems >= 1 and c.iterations >= 1, "--m-answers, --n-problems and --iterations must be >= 1"),
        (c.challenger_steps >= 0 and c.solver_steps >= 0, "step counts must be >= 0"),
        (c.lr > 0 and c.temperature > 0 and 0 < c.problem_top_p <= 1, "--lr and --temperature must be > 0"),
        (c.reward_variant in ("paper", "code"), f"--reward-variant must be paper or code, got {c.reward_variant!r}"),
        (c.loss_agg in grpo.LOSS_AGGS, f"--loss-agg must be one of {', '.join(grpo.LOSS_AGGS)}"),
        (c.dtype in ("auto", "float32", "bfloat16"), f"--dtype must be auto, float32 or bfloat16, got {c.dtype!r}"),
        (c.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {c.device!r}"),
        (c.challenger_prompts % (world * c.updates_per_step) == 0 and c.solver_problems % (world * c.updates_per_step) == 0,
         f"--challenger-prompts and --solver-problems must be multiples of ranks x --updates-per-step = {world * c.updates_per_step}"),
    ]
    for ok, msg in rules:
        if not ok:
            raise ValueError(msg)


# ------------------------------------------------------------------------------------------- distributed

def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*a):
    if rank() == 0:
        print(*a, flush=True)


def my_share(items):
    """This rank's contiguous slice of a list (ranks get equal shares when len % world == 0)."""
    n, r, w = len(items), rank(), world()
    return items[r * n // w:(r + 1) * n // w]


def gather(items):
    """Concatenate every rank's list, in rank order (the inverse of my_share)."""
    if world() == 1:
        return list(items)
    out = [None] * world()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def update_share(n, updates):
    """Global indices of this rank's rollout prompts: each optimizer update's block of the batch is split
    across ranks, so the u-th block of every rank's rollout makes up update u, as in one process."""
    idx = []
    for u in range(updates):
        lo, size = u * n // updates, (u + 1) * n // updates - u * n // updates
        idx += range(lo + rank() * size // world(), lo + (rank() + 1) * size // world())
    return idx


def share_seeds(seed, n):
    """One sampling seed per item of this rank's share of n items, set by the item's global index: the samples
    are the same whatever the number of ranks."""
    return [seed + k for k in range(rank() * n // world(), (rank() + 1) * n // world())]


def distributed_vote(model, tokenizer, problems, m, cfg, none_is_answer=False, seed=0):
    """solver.answer_and_vote over a batch-wide list of problems, each rank voting on its share."""
    votes = solver.answer_and_vote(model, tokenizer, my_share(problems), m, cfg, none_is_answer=none_is_answer,
                                   seed=share_seeds(seed, len(problems)))
    return gather(votes)


def step_seed(c, it, phase, step):
    return (((c.seed * 1000 + it) * 10 + phase) * 100_000 + step) * 1_000_000  # + item index < 1e6


# ------------------------------------------------------------------------------------------- models

class Run:
    """What every phase needs: settings, device, tokenizer, paths."""

    def __init__(self, c: TrainConfig, base: str):
        from transformers import AutoTokenizer

        self.c, self.base = c, base
        self.toy = os.path.isfile(os.path.join(base, "toy.json"))  # a toy world: its checker can measure the run
        cuda = c.device == "cuda" or (c.device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        self.dtype = torch.float32 if c.dtype == "float32" or (c.dtype == "auto" and not cuda) else torch.bfloat16
        try:
            self.tok = AutoTokenizer.from_pretrained(base)
        except Exception:
            raise ValueError(f"model folder {base!r} has no loadable tokenizer") from None
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else sample.eos_ids_of(self.tok)[0]
        self.grpo = grpo.GRPOConfig(lr=c.lr, weight_decay=c.weight_decay, clip_low=c.clip_low, clip_high=c.clip_high,
                                    dual_clip=c.dual_clip or None, kl_coef=c.kl_coef, loss_agg=c.loss_agg,
                                    max_len_norm=max(c.challenger_max_new_tokens, c.solver_max_new_tokens),
                                    grad_clip=c.grad_clip, micro_batch=c.micro_batch, temperature=c.temperature)
        self.vote = solver.SolverConfig(m=c.m_answers, temperature=c.temperature, top_k=c.vote_top_k, delta=c.delta,
                                        use_filter=c.filter, max_new_tokens=c.answer_max_new_tokens,
                                        code_variant_band=c.reward_variant == "code", progress=rank() == 0,
                                        memory_budget=int(c.memory_budget_gb * 2**30))
        self.chal = challenger.ChallengerConfig(
            group_size=c.challenger_group, temperature=c.temperature, top_p=c.challenger_top_p,
            max_new_tokens=c.challenger_max_new_tokens, dataset_top_p=c.problem_top_p,
            reward_variant=c.reward_variant, use_repetition_penalty=c.repetition_penalty, m=c.m_answers,
            solver_temperature=c.temperature, solver_top_k=c.vote_top_k, solver_max_new_tokens=c.answer_max_new_tokens,
            memory_budget=int(c.memory_budget_gb * 2**30), progress=rank() == 0)
        self.budget = int(c.memory_budget_gb * 2**30)

    def path(self, *p):
        return os.path.join(self.c.out_dir, *p)

    def frozen(self, path):
        """A plain replica for sampling and reference log-probs, in the compute dtype, without grads."""
        return Transformer.from_pretrained(path, dtype=self.dtype, device=self.device).eval().requires_grad_(False)

    def trainable(self, path):
        """fp32 master weights; FSDP2 under torchrun (bf16 compute, fp32 gradient reduction on GPU)."""
        model = Transformer.from_pretrained(path, dtype=torch.float32, device=self.device)
        if world() > 1:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
            for block in model.layers:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        return model

    def autocast(self):
        on = self.device.type == "cuda" and self.dtype != torch.float32 and world() == 1
        return torch.autocast("cuda", dtype=self.dtype, enabled=on)

    def full_state(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

    def sampler(self, model):
        """The current policy as a plain module for decoding: full weights gathered once per rollout."""
        if world() == 1 and self.dtype == torch.float32:
            return model
        with torch.device("meta"):
            copy = Transformer(model.config, model.hf_config)
        sd = {k: v.to(self.dtype) for k, v in self.full_state(model).items()}
        copy.load_state_dict(sd, assign=True)
        if model.config.tie_word_embeddings:
            copy.lm_head.weight = copy.embed_tokens.weight
        copy.inv_freq = model.inv_freq.to(self.device)
        return copy.eval().requires_grad_(False)

    def export(self, model, name):
        """The model as a Hugging Face folder with the tokenizer, written to a temp folder then renamed."""
        sd = self.full_state(model)
        final = self.path(name)
        if rank() == 0:
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            Transformer.save_pretrained(model, tmp, state_dict=sd)
            self.tok.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        barrier()

    def log(self, row):
        """Appends a row to metrics.jsonl, replacing a row of the same step left by a run that crashed before
        its checkpoint (resumed steps are deterministic, so the new row says the same)."""
        if rank() == 0:
            key = lambda r: (r["iteration"], r["phase"], r.get("step"))
            with open(self.path("metrics.jsonl")) as f:
                rows = [line for line in f if key(json.loads(line)) != key(row)]
            with open(self.path("metrics.jsonl.tmp"), "w") as f:
                clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
                f.writelines(rows + [json.dumps(clean) + "\n"])
            os.replace(self.path("metrics.jsonl.tmp"), self.path("metrics.jsonl"))


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------- checkpoints

def save_state(run, model, opt, meta):
    """state.pt: the phase in progress after a completed step. Atomic: a crash leaves the previous one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        tmp = run.path("state.pt.tmp")
        torch.save(dict(model=msd, optim=osd, meta=meta, rng=torch.get_rng_state()), tmp)
        os.replace(tmp, run.path("state.pt"))
    barrier()


def load_state(run, model, opt, it, phase):
    """Returns the next step to run: 0, or one past the step saved in state.pt for this (iteration, phase)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not os.path.isfile(run.path("state.pt")):
        return 0
    st = torch.load(run.path("state.pt"), map_location="cpu", weights_only=False)
    if (st["meta"]["iteration"], st["meta"]["phase"]) != (it, phase):
        return 0
    set_state_dict(model, opt, model_state_dict=st["model"], optim_state_dict=st["optim"],
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(st["rng"])
    print0(f"resuming iteration {it} {phase} phase after step {st['meta']['step'] + 1}")
    return st["meta"]["step"] + 1


# ------------------------------------------------------------------------------------------- GRPO phases

def rollout_batch(run, prompts, completions, rewards, group, model, ref):
    """Right-padded prompt+completion ids, completion mask, group advantages, old and reference log-probs."""
    seqs = [p + c.tokens for p, c in zip(prompts, completions)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), run.pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, len(p):len(s)] = True
    ids, mask = ids.to(run.device), mask.to(run.device)
    adv, zero_groups = grpo.group_advantages(rewards, group)
    with run.autocast():  # old log-probs recomputed by the trainer: ratio is exactly 1 at the first update
        old = grpo.rollout_logprobs(model, ids, mask, run.grpo)
        refl = grpo.rollout_logprobs(ref, ids, mask, run.grpo) if run.c.kl_coef > 0 else None
    return grpo.Rollout(ids, mask, adv.to(run.device), old, refl), zero_groups


def updates(run, model, opt, rollout):
    """The step's optimizer updates, each over an equal slice of the rollout batch; mean of their stats."""
    B, U = rollout.input_ids.shape[0], run.c.updates_per_step
    stats = []
    for u in range(U):
        rows = slice(u * B // U, (u + 1) * B // U)
        part = grpo.Rollout(rollout.input_ids[rows], rollout.completion_mask[rows], rollout.advantages[rows],
                            rollout.old_logp[rows], None if rollout.ref_logp is None else rollout.ref_logp[rows])
        with run.autocast():
            stats.append(grpo.grpo_update(model, opt, part, run.grpo))
    good = [s for s in stats if not s["skipped"]] or stats  # a skipped update's stats are NaN
    return {k: sum(s[k] for s in good) / len(good) for k in stats[0]} | {"skipped": sum(s["skipped"] for s in stats)}


def histogram(ps, bins=10):
    h = [0] * (bins + 1)
    for p in ps:
        h[min(bins, int(p * bins + 1e-9))] += 1
    return h


def challenger_phase(run, it, prev_challenger, frozen_solver):
    c = run.c
    model = run.trainable(prev_challenger)
    ref = run.frozen(prev_challenger)
    opt = grpo.make_optimizer(model, run.grpo)
    prompt = challenger.challenger_prompt(run.tok)
    for step in range(load_state(run, model, opt, it, "challenger"), c.challenger_steps):
        t0 = time.time()
        mine = update_share(c.challenger_prompts, c.updates_per_step)
        outs = sample.generate(run.sampler(model), [prompt] * len(mine), n=c.challenger_group,
                               max_new_tokens=c.challenger_max_new_tokens, temperature=c.temperature,
                               top_p=c.challenger_top_p, eos_ids=sample.eos_ids_of(run.tok), tokenizer=run.tok,
                               seed=[step_seed(c, it, 1, step) + g for g in mine], memory_budget=run.budget,
                               progress=rank() == 0)
        comps = [x for row in outs for x in row]
        t1 = time.time()
        G = c.challenger_group  # the penalty and the votes are batch-wide: gather, in global order
        every = sorted(zip(gather(mine), gather([[x.text for x in row] for row in outs])))
        texts = [t for _, row in every for t in row]
        rewards, stats = challenger.challenger_rewards(texts, frozen_solver, run.tok, run.chal,
                                                       seed=step_seed(c, it, 2, step), vote=distributed_vote)
        local = [g * G + j for g in mine for j in range(G)]
        t2 = time.time()
        rollout, zero = rollout_batch(run, [prompt] * len(comps), comps, [rewards[i] for i in local],
                                      c.challenger_group, model, ref)
        upd = updates(run, model, opt, rollout)
        ps = [s["p"] for s in stats if s["p"] is not None]
        reward = sum(rewards) / len(rewards)
        row = dict(iteration=it, phase="challenger", step=step, reward=reward,
                   valid_format=sum(s["valid_format"] for s in stats) / len(stats), p_hist=histogram(ps),
                   mean_p=sum(ps) / max(1, len(ps)), zero_var_groups=zero / max(1, len(outs)),
                   mean_len=sum(len(x.tokens) for x in comps) / len(comps), sample_s=t1 - t0,
                   reward_s=t2 - t1, update_s=time.time() - t2,
                   tokens_per_s=sum(len(x.tokens) for x in comps) / max(1e-9, t1 - t0), **upd)
        save_state(run, model, opt, dict(iteration=it, phase="challenger", step=step))
        run.log(row)  # after the checkpoint: a logged step is a saved step
        print0(f"iter {it} challenger step {step + 1}/{c.challenger_steps}: reward {reward:.3f}, "
               f"mean p {sum(ps) / max(1, len(ps)):.2f}, {time.time() - t0:.1f}s")
    run.export(model, f"iter{it}/challenger")


def solver_phase(run, it, prev_solver, records):
    c = run.c
    model = run.trainable(prev_solver)
    ref = run.frozen(prev_solver)
    opt = grpo.make_optimizer(model, run.grpo)
    g = torch.Generator().manual_seed(c.seed * 7919 + it)
    order = torch.randperm(len(records), generator=g).tolist()  # same order on every rank
    for step in range(load_state(run, model, opt, it, "solver"), c.solver_steps):
        t0 = time.time()
        picks = [records[order[(step * c.solver_problems + k) % len(order)]] for k in range(c.solver_problems)]
        mine = [picks[g] for g in update_share(c.solver_problems, c.updates_per_step)]
        prompts = [solver.solver_prompt(run.tok, r["problem"]) for r in mine]
        outs = sample.generate(run.sampler(model), prompts, n=c.solver_group, max_new_tokens=c.solver_max_new_tokens,
                               temperature=c.temperature, top_p=c.solver_top_p, eos_ids=sample.eos_ids_of(run.tok),
                               tokenizer=run.tok,
                               seed=[step_seed(c, it, 3, step) + g for g in update_share(c.solver_problems, c.updates_per_step)],
                               memory_budget=run.budget,
                               progress=rank() == 0)
        t1 = time.time()
        comps = [x for row in outs for x in row]
        rewards = [solver.solver_reward(x.text, r["pseudo_label"]) for r, row in zip(mine, outs) for x in row]
        rep_prompts = [p for p in prompts for _ in range(c.solver_group)]
        rollout, zero = rollout_batch(run, rep_prompts, comps, rewards, c.solver_group, model, ref)
        upd = updates(run, model, opt, rollout)
        rewards_all = gather(rewards)
        reward = sum(rewards_all) / len(rewards_all)
        row = dict(iteration=it, phase="solver", step=step, reward=reward, zero_var_groups=zero / len(outs),
                   mean_len=sum(len(x.tokens) for x in comps) / len(comps), sample_s=t1 - t0,
                   update_s=time.time() - t1, tokens_per_s=sum(len(x.tokens) for x in comps) / max(1e-9, t1 - t0),
                   **upd)
        save_state(run, model, opt, dict(iteration=it, phase="solver", step=step))
        run.log(row)
        print0(f"iter {it} solver step {step + 1}/{c.solver_steps}: reward {reward:.3f}, {time.time() - t0:.1f}s")
    run.export(model, f"iter{it}/solver")


class NothingToTrain(Exception):
    """Ends the run with one line: bad settings, or a dataset phase that kept no problem."""


def dataset_phase(run, it, challenger_path, frozen_solver):
    """The frozen Challenger writes N problems; the frozen Solver labels them by majority vote and filters."""
    c, out = run.c, run.path(f"iter{it}", "dataset.jsonl")
    if os.path.isfile(out):
        with open(out) as f:
            return [json.loads(line) for line in f]
    t0 = time.time()
    writer = run.frozen(challenger_path)
    mine = challenger.write_problems(writer, run.tok, len(my_share(range(c.n_problems))), run.chal,
                                     seed=share_seeds(step_seed(c, it, 4, 0), c.n_problems))
    problems = gather(mine)
    records, counts = solver.build_dataset(problems, frozen_solver, run.tok, run.vote, seed=step_seed(c, it, 5, 0),
                                           vote=distributed_vote)
    row = dict(iteration=it, phase="dataset", **counts, p_hist=histogram([r["p"] for r in records]),
               seconds=time.time() - t0)
    if run.toy:
        import toy
        row |= dict(questions=toy.question_stats(problems),
                    pseudo_label_acc=sum(toy.check_answer(r["problem"], r["pseudo_label"]) for r in records)
                    / max(1, len(records)))
    run.log(row)
    print0(f"iter {it} dataset: kept {counts['kept']} of {counts['generated']} problems {counts}")
    if not records:
        raise NothingToTrain(f"iteration {it}: every generated problem was filtered out ({counts}), so there is "
                             f"nothing to train the Solver on")
    if rank() == 0:
        with open(out + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(out + ".tmp", out)
    barrier()
    return records


def evaluate(run, name, solver_path):
    """Toy world only: the Solver's held-out accuracy (the checker measures; it never trains anything)."""
    if not run.toy or run.c.eval_problems <= 0:
        return None
    import toy

    out = run.path(name, "eval.json") if name != "base" else run.path("base_eval.json")
    if not os.path.isfile(out) and rank() == 0:
        res = toy.heldout_accuracy(run.frozen(solver_path), run.tok, toy.heldout_problems(run.c.eval_problems),
                                   k=run.c.eval_k, max_new_tokens=run.c.solver_max_new_tokens)
        with open(out + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(out + ".tmp", out)
    barrier()
    with open(out) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------- main

def prepare_out_dir(c: TrainConfig):
    """A new run folder gets config.json; an existing one must hold the same settings (then we resume)."""
    cfg_file = os.path.join(c.out_dir, "config.json")
    mine = {k: v for k, v in asdict(c).items() if k not in NOT_RESULT_FIELDS}
    exists = os.path.isfile(cfg_file)
    barrier()  # every rank looks before rank 0 writes, so all take the same branch (and reach the same barriers)
    if exists:
        with open(cfg_file) as f:
            theirs = {k: v for k, v in json.load(f).items() if k not in NOT_RESULT_FIELDS}
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"run folder {c.out_dir!r} holds a run with other settings ({', '.join(diff)}); "
                             f"use another --out-dir")
        return
    if rank() == 0:
        os.makedirs(c.out_dir, exist_ok=True)
        with open(cfg_file + ".tmp", "w") as f:
            json.dump(asdict(c), f, indent=2)
        os.replace(cfg_file + ".tmp", cfg_file)
        open(os.path.join(c.out_dir, "metrics.jsonl"), "a").close()
    barrier()


def resolve_model(name):
    """A local folder, "toy", or a hub id fetched with huggingface_hub when the network allows."""
    if name == "toy":
        import toy
        if rank() == 0:
            toy.toy_path()
        barrier()
        return toy.toy_path()
    if os.path.isdir(name):
        return name
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        raise FileNotFoundError(f"{name!r} is not a local folder and could not be fetched from the hub "
                                f"({type(e).__name__})") from None


def summary(run, rows):
    print0("\n" + "=" * 96)
    print0(f"{'':10}{'chal. reward':>13}{'kept':>12}{'pseudo acc':>11}{'q difficulty':>13}{'q distinct':>11}"
           f"{'greedy':>9}{'mean@' + str(run.c.eval_k):>9}")
    for name, r in rows:
        def f(k, fmt="{:.3f}"):
            return fmt.format(r[k]) if r.get(k) is not None else "-"
        print0(f"{name:10}{f('reward'):>13}{f('kept', '{}'):>12}{f('pseudo_acc'):>11}{f('difficulty', '{:.2f}'):>13}"
               f"{f('distinct'):>11}{f('greedy'):>9}{f('mean_at_k'):>9}")
    print0("=" * 96)


def main(argv=None):
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        try:
            c = parse_config(argv)
            base = resolve_model(c.model)
            check_folder(base)
            prepare_out_dir(c)
            run = Run(c, base)
        except (ValueError, FileNotFoundError) as e:
            raise NothingToTrain(e) from None  # a user's mistake: one line, not a traceback
        rzero(run)
    except NothingToTrain as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        if world() == 1:
            raise
        # a rank that dies must take the job down: exiting at once lets torchrun stop the ranks that wait in
        # a collective, where a normal interpreter exit could hang on the process group
        traceback.print_exc()
        code = 1
    else:
        code = 0
    if world() > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def rzero(run):
    c, t_start = run.c, time.time()
    torch.manual_seed(c.seed)
    print0(f"R-Zero: {c.iterations} iterations from {run.base} on {world()} x {run.device} -> {c.out_dir}")
    rows = []
    ev = evaluate(run, "base", run.base)
    if ev:
        rows.append(("base", dict(greedy=ev["greedy"], mean_at_k=ev["mean_at_k"])))
    chal_prev, solv_prev = run.base, run.base
    for it in range(1, c.iterations + 1):
        os.makedirs(run.path(f"iter{it}"), exist_ok=True)
        frozen_solver = run.frozen(solv_prev)
        if not os.path.isdir(run.path(f"iter{it}", "challenger")):
            challenger_phase(run, it, chal_prev, frozen_solver)
        records = dataset_phase(run, it, run.path(f"iter{it}", "challenger"), frozen_solver)
        del frozen_solver
        if not os.path.isdir(run.path(f"iter{it}", "solver")):
            solver_phase(run, it, solv_prev, records)
        chal_prev, solv_prev = run.path(f"iter{it}", "challenger"), run.path(f"iter{it}", "solver")
        row = iteration_row(run, it, records)
        ev = evaluate(run, f"iter{it}", solv_prev)
        if ev:
            row |= dict(greedy=ev["greedy"], mean_at_k=ev["mean_at_k"])
        rows.append((f"iter {it}", row))
    summary(run, rows)
    print0(f"done in {time.time() - t_start:.0f}s; models and metrics in {c.out_dir}")


def iteration_row(run, it, records):
    """The iteration's numbers for the summary table, read back from metrics.jsonl (so resumed runs have them)."""
    row = dict(kept=len(records))
    with open(run.path("metrics.jsonl")) as f:
        for m in map(json.loads, f):
            if m["iteration"] != it:
                continue
            if m["phase"] == "challenger":
                row["reward"] = m["reward"]  # the last step's
            if m["phase"] == "dataset":
                row["kept"] = f"{m['kept']}/{m['generated']}"
                if "questions" in m:
                    row |= dict(pseudo_acc=m["pseudo_label_acc"], difficulty=m["questions"]["mean_difficulty"],
                                distinct=m["questions"]["distinct"])
    return row


if __name__ == "__main__":
    main()
