"""
R-Zero (Huang et al., 2025), Algorithm 1: a Challenger learns to write problems its Solver is unsure about; the
Solver learns from them, labelled by its own majority vote. No human data.

    python train.py                                          # the toy world on a laptop CPU (a few minutes)
    python train.py --preset qwen3-4b-base --model /path/to/Qwen3-4B-Base            # one GPU
    torchrun --nproc_per_node=8 train.py --preset qwen3-4b-base --model Qwen/Qwen3-4B-Base
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        train.py --preset qwen3-8b-base --model Qwen/Qwen3-8B-Base   # and --node_rank=1 on the other node
    python train.py --challenger-steps 0 --out-dir runs/untrained-challenger   # the paper's key ablation
    python train.py --help                                   # every setting, in the paper's words

Each iteration, from the Challenger and Solver of the previous one (both the base model at first):
  1. Challenger phase: GRPO on the Challenger, rewarded by the frozen Solver's uncertainty (challenger.py).
  2. Dataset phase: the frozen Challenger writes N problems, the frozen Solver answers each m times; the majority
     is the pseudo-label, and problems of informative difficulty are kept (solver.py).
  3. Solver phase: GRPO on the Solver against the pseudo-labels (solver.py, grpo.py).
This file is the method: three verbs (generate, vote, train on rollouts), the three phases, the loop. Each phase
skips itself when its output exists; a killed run resumes from the step in progress. Under torchrun each rank samples
its share, seeded per item (the same samples on any number of ranks), and gathers what is batch-wide.

Departures from the paper: AdamW with fp32 master weights (bf16 compute on GPU); the authors' Solver phase runs 20
steps and keeps step 15, ours runs `solver_steps`; the toy preset is scaled down (toy.py).
"""
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch

import challenger
import engine
import eval
import grpo
import memory
import report
import sample
import solver
from memory import Phase
from runtime import (barrier, device_and_dtype, export, frozen, gather, init_distributed, load_state, my_share,
                     on_device, on_rank0, open_run_folder, parse_settings, print0, rank, read_jsonl, sampling_copy,
                     save_state, share, trainable, world, write_text)


@dataclass
class TrainConfig(solver.SolverConfig, challenger.ChallengerConfig, grpo.GRPOConfig):
    """R-Zero's loop"""
    # -- the loop (Algorithm 1)
    model: str = "toy"  # the base model: a Hugging Face folder, a hub id, or "toy" (toy_world/, the one that ships)
    out_dir: str = "runs/toy"  # the run folder (the same command resumes it)
    iterations: int = 3  # Challenger-dataset-Solver rounds (the paper: 3)
    seed: int = 0  # every sample is seeded from it, per item: the same samples on any number of ranks
    # -- the Challenger phase (Sec. 3.2): steps x prompts x G completions, all from the one Challenger prompt
    challenger_steps: int = 5  # GRPO steps per iteration; 0 = the paper's "untrained Challenger" ablation
    challenger_prompts: int = 512  # rollouts per step (the authors' code: 512 prompts, 2,048 questions)
    challenger_group: int = 4  # G: questions sampled per prompt
    challenger_updates: int = 4  # optimizer updates per step, over equal slices of its batch (paper: batch 128)
    challenger_max_new_tokens: int = 4096  # token budget of a Challenger completion
    challenger_top_p: float = 0.99  # nucleus sampling of Challenger rollouts (temperature: --temperature)
    # -- the dataset phase (Sec. 3.3): the frozen Challenger writes N problems, the frozen Solver votes on each
    n_problems: int = 8000  # N: problems the Challenger writes per iteration
    problem_top_p: float = 0.95  # nucleus sampling of those problems
    # -- the Solver phase (Sec. 3.3): steps x problems x G rollouts, rewarded by agreement with the pseudo-label
    solver_steps: int = 15  # GRPO steps per iteration (the authors run 20 and keep step 15)
    solver_problems: int = 512  # problems per step
    solver_group: int = 5  # G: answers sampled per problem
    solver_updates: int = 4  # optimizer updates per step, over equal slices of its batch (paper: batch 128)
    solver_max_new_tokens: int = 4096  # token budget of a Solver answer
    solver_top_p: float = 0.99  # nucleus sampling of Solver rollouts
    # -- the machine
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # compute and sampling dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    memory_budget_gb: float = 16.0  # KV-cache pages one sampling call may allocate
    expected_new_tokens: int = 1024  # rows in flight are sized for completions this long (0: the token budget)
    activation_checkpointing: bool = False  # recompute each block in backward (the real presets: on, as the authors)
    gpu_memory_gb: float = 0.0  # memory a rank may use, which the plan is checked against (0: the GPU's; CPU: none)
    timeout_minutes: int = 180  # a rank waiting this long for the others ends the run (rollouts differ; NCCL's: 10)
    profile: bool = False  # also measure each phase's peak tensor memory, and print it beside the memory plan
    # -- measuring (nothing trains on it): a world that knows the answers, and benchmark files
    eval_problems: int = 512  # toy world: held-out problems measured after every iteration (0: none)
    eval_k: int = 4  # toy world: samples per problem for mean@k and maj@k
    eval_data: str = ""  # benchmark JSON Lines file or folder: eval.py's table of the base and every Solver
    eval_limit: int = 0  # the first N problems of each benchmark (0: all)
    # -- the lab (sweep.py runs them over seeds): the paper's ablations and R-Zero's siblings
    shared_model: bool = False  # one set of weights plays both roles (the paper's "one model" ablation)
    labels: str = "vote"  # vote | oracle: the toy world's checker labels the kept problems (the ceiling; toy only)
    ttrl: str = ""  # a JSON Lines file of problems: no Challenger, the Solver step on these every iteration (TTRL)

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
        ranks = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's (the process group starts after the settings)
        check(self.challenger_prompts % (ranks * upd[0]) == 0,
              f"--challenger-prompts must be a multiple of ranks x --challenger-updates = {ranks * upd[0]}")
        check(self.solver_problems % (ranks * upd[1]) == 0,
              f"--solver-problems must be a multiple of ranks x --solver-updates = {ranks * upd[1]}")


# The paper's settings are the TrainConfig defaults; its batch of 128 gives 4 updates per step in both phases. The
# authors' scripts ran 32 Challenger updates per step, micro-batches of 2 (the Solver's: 1): grpo.GRPOConfig.loss_agg.
PAPER = dict(activation_checkpointing=True)
PRESETS = {
    # toy: the paper's ratio of generated problems to Solver slots (8000 : 15 x 512), 238 : 7 x 32: with more to
    # spare, the Challenger's aim did not matter (an earlier world). On the CPU: the world's tables are float32's.
    "toy": dict(model="toy", out_dir="runs/toy", device="cpu", challenger_steps=4, challenger_prompts=32,
                challenger_group=4, challenger_max_new_tokens=40, m_answers=10, answer_max_new_tokens=160,
                n_problems=238, solver_steps=7, solver_problems=32, solver_group=5, solver_max_new_tokens=160,
                challenger_updates=2, solver_updates=2, lr=5e-5, kl_coef=0.01, micro_batch=8, memory_budget_gb=1.0,
                expected_new_tokens=0),
    "qwen3-4b-base": dict(PAPER, model="Qwen/Qwen3-4B-Base", out_dir="runs/qwen3-4b-base"),
    "qwen3-8b-base": dict(PAPER, model="Qwen/Qwen3-8B-Base", out_dir="runs/qwen3-8b-base"),
    "octothinker-3b": dict(PAPER, model="OctoThinker/OctoThinker-3B-Hybrid-Base", out_dir="runs/octothinker-3b"),
    "octothinker-8b": dict(PAPER, model="OctoThinker/OctoThinker-8B-Hybrid-Base", out_dir="runs/octothinker-8b"),
}
# may change on resume; a finished run given more --iterations goes on
NOT_RESULT_FIELDS = ("out_dir", "device", "memory_budget_gb", "expected_new_tokens", "activation_checkpointing",
                     "gpu_memory_gb", "timeout_minutes", "profile", "iterations", "eval_data", "eval_limit")


def parse_config(argv=None) -> TrainConfig:
    """--preset NAME, then every field of TrainConfig as a flag (runtime.parse_settings)."""
    return parse_settings(TrainConfig, argv, PRESETS, description=__doc__.split("\n\n")[0],
                          usage="python train.py [--preset NAME] [--setting VALUE ...]",
                          epilog="[the default (the paper's), and the toy preset's value where it differs]")


def step_seed(c, it, stream, step):  # stream 1-5: the kinds of sample, in the loop's order
    return (((c.seed * 1000 + it) * 10 + stream) * 100_000 + step) * 1_000_000  # + item index < 1e6


@dataclass
class Run:
    """What every phase needs besides the settings: where it runs and writes, the tokenizer, the clock."""
    c: TrainConfig
    base: str  # the base model's folder
    tok: object
    device: torch.device
    dtype: torch.dtype
    clock: report.Clock = None
    solver_prompt_tokens: int = 0  # the longest Solver prompt seen (for the memory plan; 0: none yet)

    def __post_init__(self):
        self.clock = self.clock or report.Clock(self.device, self.c.profile)

    def path(self, *p):
        return os.path.join(self.c.out_dir, *p)


class NothingToTrain(Exception):
    """Ends the run with one line: bad settings, or a dataset phase that kept no problem."""


# ------------------------------------------------------------------------------------------ the three verbs

def generate(run, model, prompts, n, max_new_tokens, top_p, seeds, top_k=0):
    """n samples of each prompt at the run's temperature (the one GRPO's log-probs assume); [] for no prompts."""
    if not prompts:
        return []
    outs = engine.generate(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=run.c.temperature,
                           top_p=top_p, top_k=top_k, eos_ids=sample.eos_ids_of(run.tok), tokenizer=run.tok,
                           seed=seeds, memory_budget=int(run.c.memory_budget_gb * 2**30),
                           expected_new_tokens=run.c.expected_new_tokens, progress=rank() == 0)
    clock = run.clock
    clock.tokens[clock.current] = clock.tokens.get(clock.current, 0) + sum(len(x.tokens) for r in outs for x in r)
    return outs


def vote(run, model, questions, seed):
    """The frozen Solver's m answers to each question and their majority (solver.vote; question k seeded seed + k)
    -> (votes, None where the question is None; answers that stopped at the token budget)."""
    c = run.c
    valid = [q for q in questions if q is not None]
    prompts = [solver.solver_prompt(run.tok, q) for q in my_share(valid)]
    run.solver_prompt_tokens = max([run.solver_prompt_tokens, *map(len, prompts)])
    with on_device(model, run.device):
        outs = generate(run, model, prompts, c.m_answers, c.answer_max_new_tokens, top_p=1.0, top_k=c.vote_top_k,
                        seeds=[seed + k for k in share(len(valid))])
    votes = iter(gather([solver.vote([x.text for x in row], c) for row in outs]))
    cut = sum(gather([sum(x.finish_reason == "length" for row in outs for x in row)]))
    return [None if q is None else next(votes) for q in questions], cut


def train_on(run, model, ref, opt, prompts, completions, rewards, group, updates):
    pad = run.tok.pad_token_id if run.tok.pad_token_id is not None else sample.eos_ids_of(run.tok)[0]
    rollout, zero = grpo.assemble(prompts, [x.tokens for x in completions], rewards, group, pad, run.c, run.device)
    stats = grpo.train_step(model, opt, rollout, ref, run.c, updates)  # on GPU, FSDP2 computes in bf16
    run.clock.add(f"{run.clock.current}: log-prob passes", stats.pop("logprob_pass_s"))
    run.clock.add(f"{run.clock.current}: GRPO updates", stats.pop("grpo_update_s"))
    lens = [len(x.tokens) for x in completions]
    return stats | dict(zero_var_groups=zero / (len(rewards) // group), mean_len=sum(lens) / len(lens)), sum(lens)


def start_phase(run, it, name, path):
    """The policy, its frozen reference (for the KL term) and AdamW from `path`, or resumed -> (..., first step)."""
    model = trainable(path, run.device, run.dtype, run.c.activation_checkpointing)
    ref = frozen(path, run.device, run.dtype, reference=True)
    opt = grpo.make_optimizer(model, run.c)
    saved = load_state(run.path("state"), model, opt, dict(iteration=it, phase=name))
    if saved:
        print0(f"resuming iteration {it} {name} phase after step {saved['step'] + 1}")
    return model, ref, opt, saved["step"] + 1 if saved else 0


def end_step(run, it, name, step, model, opt):
    with run.clock("saving"):  # before the step is logged: a logged step is a saved step
        save_state(run.path("state"), model, opt, dict(iteration=it, phase=name, step=step))


# ------------------------------------------------------------------------------------------ the three phases

def challenger_phase(run, it, prev_challenger, solver_path):
    """GRPO on the Challenger, rewarded by the frozen Solver's uncertainty less a repetition penalty -> its folder."""
    c, G, out = run.c, run.c.challenger_group, run.path(f"iter{it}", "challenger")
    if on_rank0(os.path.isdir, out):  # rank 0 decides, so every node takes the same branch
        return out
    model, ref, opt, first = start_phase(run, it, "challenger", prev_challenger)
    frozen_solver = frozen(solver_path, run.device, run.dtype)
    prompt = challenger.challenger_prompt(run.tok)
    for step in range(first, c.challenger_steps):
        t0 = time.time()
        mine = grpo.my_prompts(c.challenger_prompts, c.challenger_updates)  # global indices of this rank's prompts
        with run.clock(Phase.challenger_rollouts):
            outs = generate(run, sampling_copy(model, run.device, run.dtype), [prompt] * len(mine), G,
                            c.challenger_max_new_tokens, c.challenger_top_p, seeds=[step_seed(c, it, 1, step) + g
                                                                                    for g in mine])
        t1 = time.time()
        # the reward is batch-wide (the repetition penalty clusters every question): gather, in global order
        done = sorted(zip(gather(mine), gather([[(x.text, x.finish_reason == "length") for x in row] for row in outs])))
        texts, cut = [t for _, row in done for t, _ in row], sum(cut for _, row in done for _, cut in row)
        questions = [challenger.parse_question(t) for t in texts]
        with run.clock(Phase.challenger_voting):
            votes, votes_cut = vote(run, frozen_solver, questions, seed=step_seed(c, it, 2, step))
        own = [challenger.parse_challenger_answer(t) for t in texts] if c.validity_gate else None
        rewards, stats = challenger.challenger_rewards(questions, votes, c, own)
        t2 = time.time()
        comps = [x for row in outs for x in row]
        with run.clock(Phase.challenger_update):
            upd, tokens = train_on(run, model, ref, opt, [prompt] * len(comps), comps,
                                   [rewards[g * G + j] for g in mine for j in range(G)], G, c.challenger_updates)
        times = (t0, t1, t2, time.time(), tokens)
        end_step(run, it, "challenger", step, model, opt)
        report.challenger_step(run, it, step, texts, cut, stats, rewards, votes, votes_cut, upd, times)
    with run.clock("saving"):
        export(model, run.tok, out)
    return out


def dataset_phase(run, it, challenger_path, solver_path):
    """N problems of the frozen Challenger, labelled by the frozen Solver's vote, kept if informative -> records."""
    c, out = run.c, run.path(f"iter{it}", "dataset.jsonl")
    if (kept := on_rank0(read_jsonl, out)) is not None:
        return kept
    t0 = time.time()
    if c.ttrl:  # TTRL: the same problems every iteration, from a file
        questions = eval.read_problems(c.ttrl)
    else:
        mine, prompt = share(c.n_problems), challenger.challenger_prompt(run.tok)  # one prompt object: one prefill
        with run.clock(Phase.dataset), on_device(frozen(challenger_path, run.device, run.dtype), run.device) as w:
            outs = generate(run, w, [prompt] * len(mine), 1, c.challenger_max_new_tokens, c.problem_top_p,
                            seeds=[step_seed(c, it, 3, 0) + k for k in mine])
        questions = gather([challenger.parse_question(row[0].text) for row in outs])
    with run.clock(Phase.dataset):
        votes, _ = vote(run, frozen(solver_path, run.device, run.dtype), questions, seed=step_seed(c, it, 4, 0))
    records, counts = solver.build_dataset(questions, votes, c)
    if c.labels == "oracle":  # the lab's ceiling: the same kept problems, labelled by the checker, not the vote
        records = report.toy_world(run.base).oracle_labels(records)
        counts |= dict(no_truth=counts["kept"] - len(records), kept=len(records))
    report.dataset(run, it, counts, records, time.time() - t0)
    if not records:
        raise NothingToTrain(f"iteration {it}: every generated problem was filtered out ({counts}), so there is "
                             f"nothing to train the Solver on")
    if rank() == 0:
        write_text(run.path(f"iter{it}", "questions.json"), json.dumps(questions))
        write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    barrier()
    return records


def solver_phase(run, it, prev_solver, records):
    """GRPO on the Solver: reward 1 when an answer's last \\boxed{} is the pseudo-label -> the new Solver's folder."""
    c, G, out = run.c, run.c.solver_group, run.path(f"iter{it}", "solver")
    if on_rank0(os.path.isdir, out):
        return out
    model, ref, opt, first = start_phase(run, it, "solver", prev_solver)
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

    for step in range(first, c.solver_steps):
        t0 = time.time()
        mine = grpo.my_prompts(c.solver_problems, c.solver_updates)
        problems = [nth(step * c.solver_problems + g) for g in mine]
        prompts = [solver.solver_prompt(run.tok, r["problem"]) for r in problems]
        with run.clock(Phase.solver_rollouts):
            outs = generate(run, sampling_copy(model, run.device, run.dtype), prompts, G, c.solver_max_new_tokens,
                            c.solver_top_p, seeds=[step_seed(c, it, 5, step) + g for g in mine])
        t1 = time.time()
        rewards = [solver.solver_reward(x.text, r["pseudo_label"]) for r, row in zip(problems, outs) for x in row]
        with run.clock(Phase.solver_update):
            upd, tokens = train_on(run, model, ref, opt, [p for p in prompts for _ in range(G)],
                                   [x for row in outs for x in row], rewards, G, c.solver_updates)
        times = (t0, t1, time.time(), tokens)
        end_step(run, it, "solver", step, model, opt)
        report.solver_step(run, it, step, rewards, upd, times)
    with run.clock("saving"):
        export(model, run.tok, out)
    return out


# ------------------------------------------------------------------------------------------ the loop

def rzero(run):
    """Algorithm 1, with the lab's switches (--ttrl, --shared-model) one line each."""
    torch.manual_seed(run.c.seed)
    report.measured(run, "base", run.base)  # the base model's numbers, where a world or --eval-data measures them
    challenger_path = solver_path = run.base
    for it in range(1, run.c.iterations + 1):
        if not run.c.ttrl:  # TTRL has no Challenger: its problems come from a file
            challenger_path = challenger_phase(run, it, challenger_path, solver_path)
        if run.c.shared_model:  # one set of weights: the Challenger just trained is the Solver that votes and learns
            solver_path = challenger_path
        records = dataset_phase(run, it, challenger_path, solver_path)
        solver_path = solver_phase(run, it, solver_path, records)
        if run.c.shared_model:
            challenger_path = solver_path
        report.measured(run, f"iter{it}", solver_path)
    report.finish(run)


def main(argv=None):
    code = 0
    try:
        try:
            argv = sys.argv[1:] if argv is None else list(argv)
            if "--plan" in argv:  # print the memory plan (memory.py) and stop
                pc, rest = parse_settings(memory.PlanConfig, [a for a in argv if a != "--plan"], known=True)
                return memory.main(parse_config(rest), pc)
            c = parse_config(argv)
            init_distributed(device_and_dtype(c.device, c.dtype)[0], c.timeout_minutes)
            run = Run(c, *report.preflight(c))
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
