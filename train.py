"""
R-Zero (Huang et al., 2025), Algorithm 1: a Challenger learns to write problems its Solver is unsure about, the
Solver learns from them, labelled by its own majority vote. No human data.

    python train.py                                          # the toy world on a laptop CPU (3-5 min)
    python train.py --preset qwen3-4b-base --model /path/to/Qwen3-4B-Base            # one GPU
    torchrun --nproc_per_node=8 train.py --preset qwen3-4b-base --model Qwen/Qwen3-4B-Base
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        train.py --preset qwen3-8b-base --model Qwen/Qwen3-8B-Base   # and --node_rank=1 on the other node
    python train.py --challenger-steps 0 --out-dir runs/untrained-challenger   # the key ablation
    python train.py --preset qwen3-4b-base --eval-data benchmarks/   # ... ending with the paper's table

Each iteration (RZERO.md, "Loop"), in the order of this file:
  1. Challenger phase: GRPO on the Challenger, rewarded by the frozen Solver's uncertainty (challenger.py).
  2. Dataset phase: the frozen Challenger writes N problems, the frozen Solver answers each m times; the majority
     is the pseudo-label, and problems of informative difficulty are kept (solver.py).
  3. Solver phase: GRPO on the Solver against the pseudo-labels (grpo.py).
The concept files are pure functions of data; this file samples, decides which rank does what, and saves. Each
field of TrainConfig (the concepts' settings, each declared in the file that reads it, plus the loop's) is a flag.
The lab's switches (sweep.py runs them over seeds): --shared-model, --labels oracle, --ttrl FILE, --validity-gate.

Distributed (torchrun, runtime.py): FSDP2 shards the trained model and reference; each rank samples its share, seeded
per item (the same samples on any number of ranks), and gathers what is batch-wide (votes, the repetition penalty).

Memory (memory.py plans it; a run checks the plan first): the frozen Solver and the dataset's Challenger wait in
CPU memory on a GPU run, moved in only to sample (`on_device`); a finished phase's models are freed (`release`).

Outputs (--out-dir): config.json, metrics.jsonl, timing.json, iter{i}/challenger/ and solver/ (Hugging Face folders,
float32 so that lr-1e-6 updates survive), questions.json, dataset.jsonl; the toy world adds measure.json files, and
--eval-data eval/ folders and benchmarks.md; state.pt holds the phase in progress: the same command resumes it.

Departures from the paper: AdamW with fp32 master weights (bf16 compute on GPU); the authors' Solver phase
runs 20 steps and keeps step 15, ours runs `solver_steps`; the toy preset is scaled down (see toy.py).
"""
import argparse
import gc
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields

import torch

import challenger
import grpo
import memory
import sample
import solver
from model import Transformer, check_folder
from runtime import (append_row, atomic, barrier, device_and_dtype, gather, init_distributed, my_share,
                     open_run_folder, peak_memory, print0, rank, read_json, resolve_model, share, world, write_text)


@dataclass
class TrainConfig(solver.SolverConfig, challenger.ChallengerConfig, grpo.GRPOConfig):
    model: str = "toy"  # a Hugging Face folder, a hub id, or "toy" (the embedded toy world)
    out_dir: str = "runs/toy"
    iterations: int = 3
    seed: int = 0
    # Challenger phase: steps x prompts x group completions, all from the one Challenger prompt
    challenger_steps: int = 5  # 0 = the "untrained Challenger" ablation
    challenger_prompts: int = 512
    challenger_group: int = 4
    challenger_max_new_tokens: int = 4096
    challenger_top_p: float = 0.99
    # dataset phase: the frozen Challenger writes n_problems
    n_problems: int = 8000
    problem_top_p: float = 0.95
    # Solver phase: steps x problems x group rollouts
    solver_steps: int = 15
    solver_problems: int = 512
    solver_group: int = 5
    solver_max_new_tokens: int = 4096
    solver_top_p: float = 0.99
    challenger_updates: int = 4  # optimizer updates per Challenger rollout step (equal slices of its batch)
    solver_updates: int = 4  # ... per Solver rollout step
    # machine
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # compute/sampling dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    memory_budget_gb: float = 16.0  # KV-cache pages a sampling call may allocate
    expected_new_tokens: int = 1024  # rows in flight are sized for completions this long (0: max_new_tokens)
    activation_checkpointing: bool = False  # recompute each block in backward (the real presets: on, as the authors)
    gpu_memory_gb: float = 0.0  # memory a rank may use, which the plan is checked against (0: the GPU's; CPU: none)
    profile: bool = False  # measure each phase's peak tensor memory too, and print it beside the plan
    # a world that knows the answers (the toy world) measures the Solver on held-out problems every iteration
    eval_problems: int = 512
    eval_k: int = 4
    # the lab (sweep.py runs them over seeds): the paper's ablations and R-Zero's siblings; the defaults are R-Zero
    shared_model: bool = False  # one set of weights plays both roles (the paper's "one model" ablation)
    labels: str = "vote"  # vote | oracle: the toy world's checker labels the kept problems (the ceiling; toy only)
    ttrl: str = ""  # a JSON Lines file of problems: no Challenger, the Solver step on these every iteration (TTRL)
    # real models: the base and every iteration's Solver measured on benchmark files (eval.py: the paper's table)
    eval_data: str = ""  # a JSON Lines file or a folder of them
    eval_limit: int = 0  # the first N problems of each (0: all)

    def __post_init__(self):
        grpo.GRPOConfig.__post_init__(self)
        upd = (self.challenger_updates, self.solver_updates)

        def check(ok, message):
            if not ok:
                raise ValueError(message)

        check(0 <= self.delta <= 0.5, f"--delta must be in [0, 0.5], got {self.delta}")
        check(self.challenger_group >= 2 and self.solver_group >= 2, "group sizes (G) must be at least 2 for GRPO")
        check(min(self.m_answers, self.n_problems, self.iterations, self.eval_k, *upd) >= 1,
              "--m-answers, --n-problems, --iterations, --eval-k and the --*-updates must be >= 1")
        check(self.challenger_steps >= 0 and self.solver_steps >= 0, "step counts must be >= 0")
        check(self.lr > 0 and self.temperature > 0, "--lr and --temperature must be > 0")
        check(all(0 < t <= 1 for t in (self.challenger_top_p, self.problem_top_p, self.solver_top_p)),
              "--challenger-top-p, --problem-top-p and --solver-top-p must be in (0, 1]")
        words = dict(reward_variant=("paper", "code"), band=("paper", "code"), dtype=("auto", "float32", "bfloat16"),
                     device=("auto", "cpu", "cuda"), labels=("vote", "oracle"))
        for name, allowed in words.items():  # "--dtype must be auto, float32 or bfloat16, got 'x'"
            value, listed = getattr(self, name), ", ".join(allowed[:-1]) + " or " + allowed[-1]
            check(value in allowed, f"--{name.replace('_', '-')} must be {listed}, got {value!r}")
        check(not (self.ttrl and self.shared_model), "--shared-model needs a Challenger, and --ttrl has none")
        check(self.eval_limit >= 0, "--eval-limit must be >= 0")
        check(self.challenger_prompts % (world() * upd[0]) == 0,
              f"--challenger-prompts must be a multiple of ranks x --challenger-updates = {world() * upd[0]}")
        check(self.solver_problems % (world() * upd[1]) == 0,
              f"--solver-problems must be a multiple of ranks x --solver-updates = {world() * upd[1]}")


# The paper's settings are the TrainConfig defaults; its batch of 128 gives 4 updates per step in both phases. The
# authors' scripts ran 32 Challenger updates per step, micro-batches of 2 (the Solver's: 1): grpo.GRPOConfig.loss_agg.
PAPER = dict(iterations=3, challenger_steps=5, solver_steps=15, challenger_updates=4, solver_updates=4, lr=1e-6,
             activation_checkpointing=True)
PRESETS = {
    # toy: the paper's ratio of generated problems to Solver slots (8000 : 15 x 512), 272 : 8 x 32. With more
    # problems to spare, the Solver never runs short and the Challenger's aim cannot matter (measured: README).
    "toy": dict(model="toy", out_dir="runs/toy", challenger_steps=5, challenger_prompts=32, challenger_group=4,
                challenger_max_new_tokens=40, m_answers=10, answer_max_new_tokens=160, n_problems=272,
                solver_steps=8, solver_problems=32, solver_group=5, solver_max_new_tokens=160,
                challenger_updates=2, solver_updates=2, lr=5e-5, kl_coef=0.01, micro_batch=8, memory_budget_gb=1.0,
                expected_new_tokens=0),
    "qwen3-4b-base": dict(PAPER, model="Qwen/Qwen3-4B-Base", out_dir="runs/qwen3-4b-base"),
    "qwen3-8b-base": dict(PAPER, model="Qwen/Qwen3-8B-Base", out_dir="runs/qwen3-8b-base"),
    "octothinker-3b": dict(PAPER, model="OctoThinker/OctoThinker-3B-Hybrid-Base", out_dir="runs/octothinker-3b"),
    "octothinker-8b": dict(PAPER, model="OctoThinker/OctoThinker-8B-Hybrid-Base", out_dir="runs/octothinker-8b"),
}
# may change on resume; a finished run given more --iterations goes on
NOT_RESULT_FIELDS = ("out_dir", "device", "memory_budget_gb", "expected_new_tokens", "activation_checkpointing",
                     "gpu_memory_gb", "profile", "iterations", "eval_data", "eval_limit")


def _flag_error(message):
    raise ValueError(message)  # main prints one line; argparse would print the whole usage screen first


def parse_config(argv=None) -> TrainConfig:
    """--preset NAME applies its overrides; every field of TrainConfig is a flag (--field-name)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.error = _flag_error
    ap.add_argument("--preset", default="toy", help=f"one of: {', '.join(PRESETS)}")
    for f in fields(TrainConfig):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        ap.add_argument("--" + f.name.replace("_", "-"), default=None, **kind)
    a = ap.parse_args(argv)
    if a.preset not in PRESETS:
        raise ValueError(f"unknown preset {a.preset!r} (known: {', '.join(PRESETS)})")
    flags = {k: v for k, v in vars(a).items() if v is not None and k != "preset"}
    return TrainConfig(**PRESETS[a.preset] | flags)


def step_seed(c, it, phase, step):
    return (((c.seed * 1000 + it) * 10 + phase) * 100_000 + step) * 1_000_000  # + item index < 1e6


@dataclass
class Run:
    """What every phase needs besides the settings: where it runs and writes, and the tokenizer."""
    c: TrainConfig
    base: str  # the base model's folder
    tok: object
    device: torch.device
    dtype: torch.dtype
    seconds: dict = field(default_factory=dict)  # phase or "phase: kind of work" -> seconds
    tokens: dict = field(default_factory=dict)  # phase -> tokens sampled
    current: str = ""  # the phase running now
    peaks: dict = field(default_factory=dict)  # phase -> peak tensor bytes (--profile)
    solver_prompt_tokens: int = 0  # the longest Solver prompt seen (for the memory plan; 0: none yet)

    def path(self, *p):
        return os.path.join(self.c.out_dir, *p)


@contextmanager
def phase(run, name):
    """A part of the loop, named as in memory.py's plan: timed and, with --profile, its peak tensor bytes measured."""
    t0, outer, run.current = time.time(), run.current, name
    with peak_memory(run.device) if run.c.profile else nullcontext() as m:
        yield
    run.current = outer
    spent(run, name, time.time() - t0)
    if m is not None:
        run.peaks[name] = max(run.peaks.get(name, 0), m.bytes)


def spent(run, name, seconds):
    run.seconds[name] = run.seconds.get(name, 0.0) + seconds


def shard(run, model):
    """FSDP2 under torchrun: each block is a unit (gathered for its forward and backward only), then the root."""
    if world() > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=run.dtype, reduce_dtype=torch.float32)
        for unit in [*model.layers, model]:
            fully_shard(unit, mp_policy=mp)
    return model


def frozen(run, path, reference=False):
    """A model without grads in the compute dtype: the reference sharded, a sampling replica parked in CPU memory."""
    dev = run.device if reference or run.device.type == "cpu" else "cpu"
    model = Transformer.from_pretrained(path, dtype=run.dtype, device=dev).eval().requires_grad_(False)
    return shard(run, model) if reference else model


@contextmanager
def on_device(run, model):
    """A parked replica on the GPU for the block; back in CPU memory after it. Nothing to move on a CPU run."""
    gpu = run.device.type == "cuda"
    try:
        yield model.to(run.device) if gpu else model
    finally:
        if gpu:
            model.to("cpu")
            torch.cuda.empty_cache()


def trainable(run, path):
    """fp32 master weights; FSDP2 under torchrun (bf16 compute, fp32 gradient reduction on GPU)."""
    model = Transformer.from_pretrained(path, dtype=torch.float32, device=run.device)
    model.checkpoint_blocks = run.c.activation_checkpointing
    return shard(run, model)


def release(run):
    """Frees a finished phase's models now: FSDP's hooks tie them into reference cycles, which only gc frees."""
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def sampler(run, model):
    """The policy as a plain module to decode with: each weight cast on its shard, then gathered (no full fp32 copy)."""
    if world() == 1 and run.dtype == torch.float32:
        return model
    tied = model.config.tie_word_embeddings
    sd = {k: v.to(run.dtype) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}
    plain = Transformer.from_state_dict(model.config, sd, model.hf_config, device=run.device)
    return plain.eval().requires_grad_(False)


def export(run, model, name):
    """The model as a Hugging Face folder with the tokenizer, written whole or not at all."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with phase(run, "saving"):  # every rank takes part in gathering an FSDP model's weights; rank 0 gets them
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank() == 0:
            with atomic(run.path(name)) as tmp:
                Transformer.save_pretrained(model, tmp, state_dict=sd)
                run.tok.save_pretrained(tmp)
        barrier()


def generate(run, model, prompts, n, max_new_tokens, top_p, seeds, top_k=0):
    """sample.generate at the run's temperature (the one GRPO's log-probs assume); [] for no prompts."""
    if not prompts:
        return []
    outs = sample.generate(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=run.c.temperature,
                           top_p=top_p, top_k=top_k, eos_ids=sample.eos_ids_of(run.tok), tokenizer=run.tok,
                           seed=seeds, memory_budget=int(run.c.memory_budget_gb * 2**30),
                           expected_new_tokens=run.c.expected_new_tokens, progress=rank() == 0)
    run.tokens[run.current] = run.tokens.get(run.current, 0) + sum(len(x.tokens) for row in outs for x in row)
    return outs


def vote(run, model, questions, seed):
    """solver.vote of the frozen Solver's m answers to each question (the k-th seeded seed + k); None for None."""
    c = run.c
    valid = [q for q in questions if q is not None]
    prompts = [solver.solver_prompt(run.tok, q) for q in my_share(valid)]
    run.solver_prompt_tokens = max([run.solver_prompt_tokens, *map(len, prompts)])
    with on_device(run, model):
        outs = generate(run, model, prompts, c.m_answers, c.answer_max_new_tokens, top_p=1.0, top_k=c.vote_top_k,
                        seeds=[seed + k for k in share(len(valid))])
    votes = iter(gather([solver.vote([x.text for x in row], c) for row in outs]))
    return [None if q is None else next(votes) for q in questions]


def train_on(run, model, ref, opt, prompts, completions, rewards, group, updates):
    """GRPO on this rank's rollouts: assemble the batch, then the step's optimizer updates (grpo.py)."""
    pad = run.tok.pad_token_id if run.tok.pad_token_id is not None else sample.eos_ids_of(run.tok)[0]
    rollout, zero = grpo.assemble(prompts, [x.tokens for x in completions], rewards, group, pad, run.c, run.device)
    cast = run.device.type == "cuda" and run.dtype != torch.float32 and world() == 1  # FSDP2 casts by itself
    with torch.autocast("cuda", dtype=run.dtype, enabled=cast):
        stats = grpo.train_step(model, opt, rollout, ref, run.c, updates)
    spent(run, f"{run.current}: log-prob passes", stats.pop("logprob_pass_s"))
    spent(run, f"{run.current}: GRPO updates", stats.pop("grpo_update_s"))
    lens = [len(x.tokens) for x in completions]
    return stats | dict(zero_var_groups=zero / (len(rewards) // group), mean_len=sum(lens) / len(lens)), sum(lens)


def save_state(run, model, opt, meta):
    """state.pt: the phase in progress after a completed step. Atomic: a crash leaves the previous one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    with phase(run, "saving"):
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank() == 0:
            with atomic(run.path("state.pt")) as tmp:
                torch.save(dict(model=msd, optim=osd, meta=meta, rng=torch.get_rng_state()), tmp)
        barrier()


def load_state(run, model, opt, it, phase):
    """Returns the next step to run: 0, or one past the step saved in state.pt for this (iteration, phase)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = run.path("state.pt")
    st = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None
    if st is None or (st["meta"]["iteration"], st["meta"]["phase"]) != (it, phase):
        return 0
    set_state_dict(model, opt, model_state_dict=st["model"], optim_state_dict=st["optim"],
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(st["rng"])
    print0(f"resuming iteration {it} {phase} phase after step {st['meta']['step'] + 1}")
    return st["meta"]["step"] + 1


def log(run, row):
    append_row(run.path("metrics.jsonl"), row, key=lambda r: (r["iteration"], r["phase"], r.get("step")))


def histogram(ps, bins=10):  # bin k holds p in [k/bins, (k+1)/bins); the last, p = 1
    return [sum(min(bins, int(p * bins + 1e-9)) == k for p in ps) for k in range(bins + 1)]


def challenger_phase(run, it, prev_challenger, solver_path):
    c, G = run.c, run.c.challenger_group
    model, ref = trainable(run, prev_challenger), frozen(run, prev_challenger, reference=True)
    frozen_solver = frozen(run, solver_path)
    opt = grpo.make_optimizer(model, c)
    prompt = challenger.challenger_prompt(run.tok)
    for step in range(load_state(run, model, opt, it, "challenger"), c.challenger_steps):
        t0 = time.time()
        mine = grpo.my_prompts(c.challenger_prompts, c.challenger_updates)  # global indices of this rank's prompts
        with phase(run, "Challenger rollouts"):
            outs = generate(run, sampler(run, model), [prompt] * len(mine), G, c.challenger_max_new_tokens,
                            c.challenger_top_p, seeds=[step_seed(c, it, 1, step) + g for g in mine])
        t1 = time.time()
        # the reward is batch-wide (the repetition penalty clusters every question): gather, in global order
        texts = [t for _, row in sorted(zip(gather(mine), gather([[x.text for x in row] for row in outs])))
                 for t in row]
        questions = [challenger.parse_question(t) for t in texts]
        with phase(run, "Challenger voting"):
            votes = vote(run, frozen_solver, questions, seed=step_seed(c, it, 2, step))
        own = [challenger.parse_challenger_answer(t) for t in texts] if c.validity_gate else None
        rewards, stats = challenger.challenger_rewards(questions, votes, c, own)
        t2 = time.time()
        comps = [x for row in outs for x in row]
        with phase(run, "Challenger update"):
            upd, tokens = train_on(run, model, ref, opt, [prompt] * len(comps), comps,
                                   [rewards[g * G + j] for g in mine for j in range(G)], G, c.challenger_updates)
        ps = [s["p"] for s in stats if s["p"] is not None]
        row = dict(iteration=it, phase="challenger", step=step, reward=sum(rewards) / len(rewards),
                   valid_format=sum(s["valid_format"] for s in stats) / len(stats), p_hist=histogram(ps),
                   mean_p=sum(ps) / max(1, len(ps)), gated=sum(s["gated"] for s in stats) / len(stats),
                   sample_s=t1 - t0, reward_s=t2 - t1, update_s=time.time() - t2,
                   tokens_per_s=tokens / max(1e-9, t1 - t0), **upd)
        save_state(run, model, opt, dict(iteration=it, phase="challenger", step=step))
        log(run, row)  # after the checkpoint: a logged step is a saved step
        print0(f"iter {it} challenger step {step + 1}/{c.challenger_steps}: reward {row['reward']:.3f}, "
               f"mean p {row['mean_p']:.2f}, {time.time() - t0:.1f}s")
    export(run, model, f"iter{it}/challenger")


def problems_file(path):
    """The problems of a JSON Lines file: its problem or question field, as eval.py reads them; never an answer."""
    import eval
    out = []
    for i, r in enumerate(eval.read_jsonl(path), 1):
        q = r[eval.pick(r, ("problem", "question"), None, "question", f"{path} line {i}")]
        if not isinstance(q, str) or "options" in r or "choices" in r:
            raise ValueError(f"{path} line {i}: --ttrl takes free-answer problems (a text problem, no options)")
        out.append(q.strip())
    return out


class NothingToTrain(Exception):
    """Ends the run with one line: bad settings, or a dataset phase that kept no problem."""


def dataset_phase(run, it, challenger_path, solver_path):
    """The frozen Challenger writes N problems, the frozen Solver's vote labels them, the informative ones are kept."""
    c, out = run.c, run.path(f"iter{it}", "dataset.jsonl")
    if os.path.isfile(out):
        with open(out) as f:
            return [json.loads(line) for line in f]
    t0 = time.time()
    if c.ttrl:  # TTRL: the same problems every iteration, from a file
        questions = problems_file(c.ttrl)
    else:
        mine, prompt = share(c.n_problems), challenger.challenger_prompt(run.tok)  # one prompt object: one prefill
        with phase(run, "dataset"), on_device(run, frozen(run, challenger_path)) as writer:
            outs = generate(run, writer, [prompt] * len(mine), 1, c.challenger_max_new_tokens, c.problem_top_p,
                            seeds=[step_seed(c, it, 4, 0) + k for k in mine])
        questions = gather([challenger.parse_question(row[0].text) for row in outs])
    with phase(run, "dataset"):
        votes = vote(run, frozen(run, solver_path), questions, seed=step_seed(c, it, 5, 0))
    records, counts = solver.build_dataset(questions, votes, c)
    if c.labels == "oracle":  # the lab's ceiling: the same kept problems, labelled by the checker, not the vote
        records = toy_world(run).oracle_labels(records)
        counts["no_truth"], counts["kept"] = counts["kept"] - len(records), len(records)
    log(run, dict(iteration=it, phase="dataset", **counts, p_hist=histogram([r["p"] for r in records]),
                  seconds=time.time() - t0))
    print0(f"iter {it} dataset: kept {counts['kept']} of {counts['generated']} problems {counts}")
    if not records:
        raise NothingToTrain(f"iteration {it}: every generated problem was filtered out ({counts}), so there is "
                             f"nothing to train the Solver on")
    if rank() == 0:
        write_text(run.path(f"iter{it}", "questions.json"), json.dumps(questions))
        write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    barrier()
    return records


def solver_phase(run, it, prev_solver, records):
    c, G = run.c, run.c.solver_group
    model, ref = trainable(run, prev_solver), frozen(run, prev_solver, reference=True)
    opt = grpo.make_optimizer(model, c)
    if len(records) < c.solver_problems:
        print0(f"warning: iteration {it} kept {len(records)} problems, fewer than one Solver step's "
               f"{c.solver_problems}: each step repeats problems (EasyR1 would need a full batch)")
    orders = {}  # epoch -> its permutation: the problems are reshuffled every pass over them, as EasyR1's sampler

    def nth(k):
        e = k // len(records)
        if e not in orders:
            g = torch.Generator().manual_seed(c.seed * 7919 + it + 1_000_003 * e)
            orders[e] = torch.randperm(len(records), generator=g).tolist()  # same order on every rank
        return records[orders[e][k % len(records)]]

    for step in range(load_state(run, model, opt, it, "solver"), c.solver_steps):
        t0 = time.time()
        mine = grpo.my_prompts(c.solver_problems, c.solver_updates)
        problems = [nth(step * c.solver_problems + g) for g in mine]
        prompts = [solver.solver_prompt(run.tok, r["problem"]) for r in problems]
        with phase(run, "Solver rollouts"):
            outs = generate(run, sampler(run, model), prompts, G, c.solver_max_new_tokens, c.solver_top_p,
                            seeds=[step_seed(c, it, 3, step) + g for g in mine])
        t1 = time.time()
        rewards = [solver.solver_reward(x.text, r["pseudo_label"]) for r, row in zip(problems, outs) for x in row]
        with phase(run, "Solver update"):
            upd, tokens = train_on(run, model, ref, opt, [p for p in prompts for _ in range(G)],
                                   [x for row in outs for x in row], rewards, G, c.solver_updates)
        every = gather(rewards)
        row = dict(iteration=it, phase="solver", step=step, reward=sum(every) / len(every), sample_s=t1 - t0,
                   update_s=time.time() - t1, tokens_per_s=tokens / max(1e-9, t1 - t0), **upd)
        save_state(run, model, opt, dict(iteration=it, phase="solver", step=step))
        log(run, row)
        print0(f"iter {it} solver step {step + 1}/{c.solver_steps}: reward {row['reward']:.3f}, "
               f"{time.time() - t0:.1f}s")
    export(run, model, f"iter{it}/solver")


def toy_world(run):
    """The seam to a world that knows the answers (toy.py: its checker measures, and labels), or None."""
    if os.path.isfile(os.path.join(run.base, "toy.json")):
        import toy
        return toy


def measure(run, name, solver_path):
    """toy.measure of the base or an iteration, once (rank 0, kept in the run folder); {} without a toy world."""
    if not (toy := toy_world(run)) or run.c.eval_problems == 0:
        return {}
    out = run.path(name, "measure.json") if name != "base" else run.path("base_measure.json")
    # the base model's numbers are the world's: kept beside it, so the next run on this world reuses them
    key = (run.c.eval_problems, run.c.eval_k, run.c.solver_max_new_tokens, run.device.type, run.dtype)
    kept = os.path.join(run.base, "measure-" + "-".join(str(x).removeprefix("torch.") for x in key) + ".json")
    if not os.path.isfile(out) and rank() == 0:
        if name == "base" and os.path.isfile(kept):
            res = read_json(kept)
        else:
            with phase(run, "held-out measuring"):
                res = toy.measure(solver_path, None if name == "base" else run.path(name), run.c.eval_problems,
                                  run.c.eval_k, run.c.solver_max_new_tokens, run.device, run.dtype)
            if name == "base":  # runs of a sweep may write it at once: each through a temporary file of its own
                with suppress(OSError):  # a read-only model folder: measured again next time
                    write_text(f"{kept}.{os.getpid()}", json.dumps(res))
                    os.replace(f"{kept}.{os.getpid()}", kept)
        write_text(out, json.dumps(res))
    barrier()
    return read_json(out)


def rzero(run):
    c, t_start = run.c, time.time()
    torch.manual_seed(c.seed)
    print0(f"R-Zero: {c.iterations} iterations from {run.base} on {world()} x {run.device} -> {c.out_dir}")
    rows, evals = [("base", measure(run, "base", run.base))], [("base", benchmarks(run, "base", run.base))]
    challenger_path, solver_path = run.base, run.base
    for it in range(1, c.iterations + 1):
        os.makedirs(run.path(f"iter{it}"), exist_ok=True)
        if not c.ttrl:  # TTRL has no Challenger: its problems come from a file
            if not os.path.isdir(run.path(f"iter{it}", "challenger")):
                challenger_phase(run, it, challenger_path, solver_path)
                release(run)
            challenger_path = run.path(f"iter{it}", "challenger")
        if c.shared_model:  # one set of weights: the Challenger just trained is the Solver that votes and learns
            solver_path = challenger_path
        records = dataset_phase(run, it, challenger_path, solver_path)
        release(run)
        if not os.path.isdir(run.path(f"iter{it}", "solver")):
            solver_phase(run, it, solver_path, records)
            release(run)
        solver_path = run.path(f"iter{it}", "solver")
        challenger_path = solver_path if c.shared_model else challenger_path
        rows.append((f"iter {it}", iteration_row(run, it) | measure(run, f"iter{it}", solver_path)))
        evals.append((f"iter {it}", benchmarks(run, f"iter{it}", solver_path)))
    measured = toy_world(run).columns(c.eval_k) if toy_world(run) and c.eval_problems else []
    summary(rows, [("chal. reward", 13, "reward", "{:.3f}"), ("kept", 12, "kept", "{}")] + measured)
    if c.eval_data:
        benchmark_table(run, evals)
    time_table(run, time.time() - t_start)
    if c.profile:
        memory.profile(run)
    print0(f"done in {time.time() - t_start:.0f}s; models and metrics in {c.out_dir}")


def benchmarks(run, name, solver_path):
    """eval.py's greedy pass@1 of the base or an iteration's Solver on --eval-data, once (kept in the run folder)."""
    c = run.c
    if not c.eval_data:
        return None
    import eval
    out = run.path("base_eval") if name == "base" else run.path(name, "eval")
    done = os.path.join(out, "results.json")
    asked = read_json(done)["config"] if os.path.isfile(done) else None
    if asked is None or (asked["data"], asked["limit"]) != ([c.eval_data], c.eval_limit):
        cfg = eval.EvalConfig(model=[solver_path], data=[c.eval_data], out=out, limit=c.eval_limit, device=c.device,
                              dtype=c.dtype, general_max_new_tokens=2 * c.solver_max_new_tokens,
                              max_new_tokens=c.solver_max_new_tokens, memory_budget_gb=c.memory_budget_gb)
        with phase(run, "benchmarks"):
            eval.run(cfg)
        release(run)
    barrier()
    (res,) = read_json(done)["results"].values()
    return res


def benchmark_table(run, evals):
    """The paper's table (rows: base, iterations; columns: benchmarks, MATH AVG), also as benchmarks.md."""
    cols = [k for k, v in evals[0][1].items() if v is not None]  # GENERAL AVG is None without general benchmarks
    cell = lambda v: "-" if v is None else f"{v['score'] if isinstance(v, dict) else v:.2f}"
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(res.get(k)) for k in cols) + " |" for name, res in evals]
    print0("\n" + "\n".join(lines))
    if rank() == 0:
        write_text(run.path("benchmarks.md"), "\n".join(lines) + "\n")


def time_table(run, total):
    """Where this process's time went: each phase, its kinds of work, its sampling speed (timing.json too)."""
    order = ["Challenger rollouts", "Challenger voting", "Challenger update", "dataset", "Solver rollouts",
             "Solver update", "held-out measuring", "benchmarks", "saving"]
    rows = [(k, run.seconds[k]) for k in order if k in run.seconds]
    print0(f"\n{'where the time went':34}{'seconds':>9}{'share':>7}{'sampled tok/s':>15}")
    for k, v in rows + [("other (loading models, the loop)", total - sum(v for _, v in rows))]:
        tps = f"{run.tokens[k] / v:15.0f}" if run.tokens.get(k) and v > 0 else ""
        print0(f"{k:34}{v:9.1f}{v / total:7.0%}{tps}")
        for sub in (s for s in run.seconds if s.startswith(k + ": ")):
            print0(f"  {sub[len(k) + 2:]:32}{run.seconds[sub]:9.1f}{run.seconds[sub] / total:7.0%}")
    if rank() == 0:
        write_text(run.path("timing.json"), json.dumps(dict(total=total, seconds=run.seconds, tokens=run.tokens)))


def iteration_row(run, it):
    """The loop's own numbers of an iteration, read back from metrics.jsonl (so resumed runs have them)."""
    with open(run.path("metrics.jsonl")) as f:
        last = {m["phase"]: m for m in map(json.loads, f) if m["iteration"] == it}  # each phase's last row
    ch, ds = last.get("challenger", {}), last.get("dataset")  # the Challenger's last step; the one dataset row
    return dict(reward=ch.get("reward"), kept=f"{ds['kept']}/{ds['generated']}" if ds else None)


def summary(rows, cols):  # cols: (title, width, key, format) per column
    print0("\n" + "=" * 96)
    print0(f"{'':10}" + "".join(f"{title:>{w}}" for title, w, _, _ in cols))
    for name, r in rows:
        print0(f"{name:10}" + "".join(f"{fmt.format(r[k]) if r.get(k) is not None else '-':>{w}}"
                                      for _, w, k, fmt in cols))
    print0("=" * 96)


def main(argv=None):
    init_distributed()
    code = 0
    try:
        try:
            argv = sys.argv[1:] if argv is None else list(argv)
            if "--plan" in argv:  # print the memory plan (memory.py) and stop
                pc, shape, rest = memory.parse_args([a for a in argv if a != "--plan"])
                return memory.main(parse_config(rest), pc, shape)
            c = parse_config(argv)
            base = resolve_model(c.model)
            check_folder(base)
            from transformers import AutoTokenizer
            try:
                tok = AutoTokenizer.from_pretrained(base)
            except Exception:
                raise ValueError(f"model folder {base!r} has no loadable tokenizer") from None
            run = Run(c, base, tok, *device_and_dtype(c.device, c.dtype))
            if c.labels == "oracle" and not toy_world(run):
                raise ValueError("--labels oracle needs a world that knows the answers (the toy world); "
                                 f"{base!r} is not one")
            if c.ttrl and not problems_file(c.ttrl):  # a missing or unreadable file ends here, in one sentence
                raise ValueError(f"--ttrl file {c.ttrl!r} holds no problems")
            if c.eval_data:
                import eval
                for p in eval.benchmark_paths([c.eval_data]):
                    eval.load_benchmark(p, eval.EvalConfig(limit=c.eval_limit))
            if too_big := memory.for_run(run)[2]:  # refuse before anything is written, not an hour in
                raise ValueError(f"the run does not fit: {too_big} (python train.py ... --plan prints the plan)")
            open_run_folder(c.out_dir, asdict(c), NOT_RESULT_FIELDS)
        except (ValueError, FileNotFoundError) as e:
            raise NothingToTrain(e) from None  # a user's mistake: one line, not a traceback
        rzero(run)
    except NothingToTrain as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        if world() == 1:
            raise
        # a dying rank exits at once, so torchrun stops the ranks waiting in a collective (a normal exit can hang)
        traceback.print_exc()
        code = 1
    if world() > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
