"""
The Solver side of R-Zero: its prompt, the pseudo-labelled dataset it trains on, and its reward (Sec. 3.3).

One step is shared with the Challenger: `answer_and_vote` lets the frozen Solver answer a batch of questions m
times each (one batched sampling call over all questions x m), extracts each answer's last \\boxed{}, and
takes the majority by mathematical equivalence (grader.majority_vote). For question x:
    y* = majority answer (the pseudo-label),  p = #answers equivalent to y* / m.
The Challenger's uncertainty reward is a function of p (challenger.py); the Solver dataset keeps the questions
of informative difficulty:
    keep x  iff  |p - 1/2| <= delta,  delta = 0.25   (3..7 agreeing answers out of m = 10)
and the Solver is then trained with GRPO on reward 1[last boxed answer == y*].

Paper vs the authors' code (the paper is the default, the code is a switch):
- `code_variant_band=True`: keep 0.3 <= p <= 0.8 (the code used m = 9), count a missing \\boxed{} as the
  answer "None" when voting, and drop problems whose majority is empty / "None".
- The code's Solver reward was 0.9 * correct + 0.1 * format(<think> tags), a leftover of its template;
  here it is the paper's binary reward.
- Voting samples at temperature 1 with no top-p / top-k truncation (the code used top-k 40): p is meant to be
  the Solver's own probability of reaching its majority answer, and its training rollouts (top-p 0.99) are
  all but untruncated. Set `top_k=40` to match the code.
"""
from dataclasses import dataclass

import grader
import sample

SOLVER_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class SolverConfig:
    # voting: the frozen Solver answers each question m times
    m: int = 10
    temperature: float = 1.0
    top_p: float = 1.0  # untruncated: p estimates the policy's own answer distribution
    top_k: int = 0  # the authors' code used 40
    max_new_tokens: int = 4096
    memory_budget: int = 2**30  # KV-cache bytes per sampling call (sample.generate)
    progress: bool = False  # a tqdm bar while sampling
    # dataset filter
    delta: float = 0.25  # keep |p - 1/2| <= delta
    use_filter: bool = True  # False = the paper's "without filtering" ablation (keep every problem with a majority)
    code_variant_band: bool = False  # the code's 0.3 <= p <= 0.8, missing answers vote "None"
    # GRPO rollouts of the Solver on the kept problems
    group_size: int = 5  # G
    rollout_temperature: float = 1.0
    rollout_top_p: float = 0.99


@dataclass
class Vote:
    majority: str | None  # pseudo-label y*; None when no answer was extracted (or "None" won, code variant)
    p: float  # fraction of the m answers equivalent to the majority
    answers: list  # the m extracted boxed answers, None where a response had none


def solver_prompt(tokenizer, problem: str) -> list[int]:
    return sample.chat_prompt(tokenizer, SOLVER_SYSTEM, problem)


def sample_answers(model, tokenizer, problems: list[str], m: int, cfg: SolverConfig, seed=None) -> list[list[str]]:
    """m sampled responses per problem, [len(problems)][m], from ONE batched call (never a loop over problems)."""
    if not problems:
        return []
    prompts = [solver_prompt(tokenizer, q) for q in problems]
    out = sample.generate(model, prompts, n=m, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=sample.eos_ids_of(tokenizer),
                          tokenizer=tokenizer, seed=seed, memory_budget=cfg.memory_budget, progress=cfg.progress)
    return [[c.text for c in row] for row in out]


def answer_and_vote(model, tokenizer, problems: list[str], m: int, cfg: SolverConfig, none_is_answer=False,
                    seed=None) -> list[Vote]:
    """The frozen Solver scores a batch of questions: m answers each, majority by equivalence, p."""
    votes = []
    for responses in sample_answers(model, tokenizer, problems, m, cfg, seed=seed):
        answers = [grader.extract_boxed(r) if r else None for r in responses]
        majority, p = grader.majority_vote(answers, none_is_answer=none_is_answer)
        votes.append(Vote(majority, float(p), answers))
    return votes


def in_band(p: float, cfg: SolverConfig) -> bool:
    eps = 1e-9  # p = k/m in floating point: 0.3 and 0.8 must sit inside their band
    if cfg.code_variant_band:
        return 0.3 - eps <= p <= 0.8 + eps
    return abs(p - 0.5) <= cfg.delta + eps


def build_dataset(problems: list, model, tokenizer, cfg: SolverConfig, seed=None, vote=None) -> tuple[list[dict], dict]:
    """Pseudo-label N generated problems; returns (records {problem, pseudo_label, p}, counts at each filter).

    problems: the Challenger's parsed questions, None (or blank) where a completion had no parsable question.
    counts: generated = unparsable + no_majority + out_of_band + kept.
    vote: a drop-in for answer_and_vote (same arguments), e.g. one that splits the problems across ranks.
    """
    counts = dict(generated=len(problems), unparsable=0, no_majority=0, out_of_band=0, kept=0)
    valid = [q.strip() for q in problems if q is not None and q.strip()]
    counts["unparsable"] = len(problems) - len(valid)
    votes = (vote or answer_and_vote)(model, tokenizer, valid, cfg.m, cfg, none_is_answer=cfg.code_variant_band,
                                      seed=seed)
    records = []
    for q, v in zip(valid, votes):
        if v.majority is None or not v.majority.strip() or (cfg.code_variant_band and v.majority.strip() == "None"):
            counts["no_majority"] += 1
        elif cfg.use_filter and not in_band(v.p, cfg):
            counts["out_of_band"] += 1
        else:
            records.append(dict(problem=q, pseudo_label=v.majority, p=v.p))
    counts["kept"] = len(records)
    return records, counts


def solver_reward(response_text: str, pseudo_label: str) -> float:
    """Paper's Solver reward: 1 if the response's last \\boxed{} answer is equivalent to the pseudo-label."""
    pred = grader.extract_boxed(response_text) if response_text else None
    return 1.0 if pred is not None and grader.is_equiv(pred, pseudo_label) else 0.0
