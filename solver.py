"""The Solver side of R-Zero: its prompt, the pseudo-labelled dataset it trains on, and its reward (Sec. 3.3).

The frozen Solver answers a question m times; `vote` takes the majority of the last \\boxed{} answers by equivalence
(grader.is_equiv):  y* = the majority answer (the pseudo-label),  p = #answers equivalent to y* / m.
The Challenger's reward is a function of p; the Solver's dataset keeps questions of informative difficulty,
    keep x  iff  |p - 1/2| <= delta,  delta = 0.25   (3..7 agreeing answers out of m = 10),
and the Solver is then trained with GRPO on reward 1[last boxed answer == y*].

Paper vs the authors' code (the paper is the default, the code is a switch):
- `band="code"`: keep 0.3 <= p <= 0.8; a missing \\boxed{} votes "None"; a majority "None" or empty is dropped.
- The code's Solver reward was 0.9 * correct + 0.1 * format(<think> tags), a template leftover; here the paper's.
- Voting samples untruncated (the code: top-k 40, `vote_top_k=40`): p is meant as the Solver's own probability.
"""
from dataclasses import dataclass

import grader
import sample

SOLVER_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class SolverConfig:
    """voting and the Solver dataset (solver.py)"""
    m_answers: int = 10  # m: the frozen Solver's answers per question (a flag --m would clash with torchrun's)
    vote_top_k: int = 0  # voting samples untruncated (top-p 1: p is the policy's own); the authors' code: top-k 40
    answer_max_new_tokens: int = 4096  # token budget of a voting answer
    delta: float = 0.25  # the filter: keep a problem if |p - 1/2| <= delta (3..7 of 10 agree)
    filter: bool = True  # the filter on (off: the paper's "without filtering" ablation keeps every majority)
    band: str = "paper"  # paper | code: the code's 0.3 <= p <= 0.8, and a missing answer votes "None"


@dataclass
class Vote:
    majority: str | None  # pseudo-label y*; None when no answer was extracted (or "None" won, code band)
    p: float  # fraction of the m answers equivalent to the majority
    answers: list  # the m extracted boxed answers, None where a response had none


def solver_prompt(tokenizer, problem: str) -> list[int]:
    return sample.chat_prompt(tokenizer, SOLVER_SYSTEM, problem)


def majority_vote(answers, none_is_answer=False) -> Vote:
    """The largest group of equivalent answers (ties: the first formed) and its share; a missing answer counts in
    the denominator but forms no group, unless none_is_answer (the code's "None")."""
    groups = []  # [representative, count] in order of formation
    for a in answers:
        if not grader.is_answer(a):
            if not none_is_answer:
                continue
            a = "None"
        for g in groups:
            if grader.is_equiv(g[0], a):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    if not groups:
        return Vote(None, 0.0, list(answers))
    best = max(groups, key=lambda g: g[1])  # max keeps the first of equal counts
    return Vote(best[0], best[1] / len(answers), list(answers))


def vote(responses: list[str | None], cfg: SolverConfig) -> Vote:
    answers = [grader.extract_boxed(r) if r else None for r in responses]
    return majority_vote(answers, none_is_answer=cfg.band == "code")


def in_band(p: float, cfg: SolverConfig) -> bool:
    eps = 1e-9  # p = k/m in floating point: 0.3 and 0.8 must sit inside their band
    if cfg.band == "code":
        return 0.3 - eps <= p <= 0.8 + eps
    return abs(p - 0.5) <= cfg.delta + eps


def build_dataset(questions: list, votes: list, cfg: SolverConfig) -> tuple[list[dict], dict]:
    """Records {problem, pseudo_label, p} and the counts: generated = unparsable + no_majority + out_of_band + kept."""
    counts = dict(generated=len(questions), unparsable=0, no_majority=0, out_of_band=0, kept=0)
    records = []
    for q, v in zip(questions, votes):
        if q is None or not q.strip():
            counts["unparsable"] += 1
        elif v.majority is None or not v.majority.strip() or (cfg.band == "code" and v.majority.strip() == "None"):
            counts["no_majority"] += 1
        elif cfg.filter and not in_band(v.p, cfg):
            counts["out_of_band"] += 1
        else:
            records.append(dict(problem=q.strip(), pseudo_label=v.majority, p=v.p))
    counts["kept"] = len(records)
    return records, counts


def solver_reward(response_text: str, pseudo_label: str) -> float:
    """Paper's Solver reward: 1 if the response's last \\boxed{} answer is equivalent to the pseudo-label."""
    pred = grader.extract_boxed(response_text) if response_text else None
    return 1.0 if pred is not None and grader.is_equiv(pred, pseudo_label) else 0.0
