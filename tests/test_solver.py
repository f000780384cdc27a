"""Solver: the pseudo-labelled dataset (band filter, counts, ablations) and the binary reward.

The frozen Solver is a stub whose answers are scripted (solver.sample_answers is monkeypatched); one test
checks that the real sample_answers makes ONE batched sample.generate call.
"""
import pytest

import sample
import solver
from solver import SolverConfig, build_dataset, solver_reward


def scripted(k, label="42"):
    """10 responses of which k box `label` and the other 10 - k box distinct wrong answers."""
    return [f"so the answer is \\boxed{{{label}}}"] * k + [f"\\boxed{{{100 + j}}}" for j in range(10 - k)]


SCRIPT = {f"problem agreeing {k}/10": scripted(k) for k in range(2, 11)}  # p = 0.2 .. 1.0
SCRIPT["problem nobody boxes"] = ["I give up"] * 10
SCRIPT["problem half missing"] = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{3}",
                                  "\\boxed{4}"] + ["no box"] * 5  # 3 equivalent answers; 5 missing
PROBLEMS = list(SCRIPT) + [None, "   \n"]  # two unparsable Challenger outputs


@pytest.fixture
def stub_solver(monkeypatch):
    calls = []

    def fake_sample_answers(model, tokenizer, problems, m, cfg, seed=None):
        calls.append(list(problems))
        return [SCRIPT[q][:m] for q in problems]

    monkeypatch.setattr(solver, "sample_answers", fake_sample_answers)
    return calls


def test_band_filter_keeps_3_to_7_of_10(stub_solver):
    records, counts = build_dataset(PROBLEMS, None, None, SolverConfig())
    kept = {r["problem"]: (r["pseudo_label"], r["p"]) for r in records}
    assert kept == {**{f"problem agreeing {k}/10": ("42", k / 10) for k in range(3, 8)},
                    # missing answers count in m: 3 of 10 agree on 1/2 -> p = 0.3, kept
                    "problem half missing": ("\\frac{1}{2}", 0.3)}
    assert counts == dict(generated=13, unparsable=2, no_majority=1, out_of_band=4, kept=6)  # out: 2, 8, 9, 10 of 10
    assert sum(v for k, v in counts.items() if k != "generated") == counts["generated"]
    assert stub_solver == [list(SCRIPT)]  # one batched call, unparsable problems never reach the Solver


def test_narrower_band_and_no_filter_ablation(stub_solver):
    records, counts = build_dataset(PROBLEMS, None, None, SolverConfig(delta=0.1))
    assert sorted(r["p"] for r in records) == [0.4, 0.5, 0.6]
    records, counts = build_dataset(PROBLEMS, None, None, SolverConfig(use_filter=False))
    assert counts == dict(generated=13, unparsable=2, no_majority=1, out_of_band=0, kept=10)
    assert sorted(r["p"] for r in records) == [0.2, 0.3, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_code_band(stub_solver):
    records, counts = build_dataset(PROBLEMS, None, None, SolverConfig(code_variant_band=True))
    # 0.3 <= p <= 0.8 keeps 3..8 of 10; missing answers vote "None", which wins "half missing" (5 of 10)
    # and "nobody boxes" (10 of 10): both dropped as having no real majority
    assert sorted(r["p"] for r in records) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert counts == dict(generated=13, unparsable=2, no_majority=2, out_of_band=3, kept=6)


def test_answer_and_vote(stub_solver):
    votes = solver.answer_and_vote(None, None, ["problem half missing", "problem agreeing 9/10"], 10, SolverConfig())
    assert votes[0].answers == ["\\frac{1}{2}", "0.5", "1/2", "3", "4"] + [None] * 5
    assert (votes[0].majority, votes[0].p) == ("\\frac{1}{2}", 0.3)
    assert (votes[1].majority, votes[1].p) == ("42", 0.9)
    assert solver.answer_and_vote(None, None, [], 10, SolverConfig()) == []
    # a drop-in vote (train.py splits the problems across ranks this way) replaces answer_and_vote
    seen = []
    split_vote = lambda *a, **kw: seen.append(kw) or solver.answer_and_vote(*a, **kw)
    assert build_dataset(PROBLEMS, None, None, SolverConfig(), seed=5, vote=split_vote)[1]["kept"] == 6
    assert seen == [dict(none_is_answer=False, seed=5)]


def test_sample_answers_is_one_batched_call(monkeypatch):
    from conftest import make_tokenizer

    tok = make_tokenizer()
    calls = []

    def fake_generate(model, prompts, n=1, **kw):
        calls.append((prompts, n, kw))
        return [[sample.Completion([], [], "eos", f"\\boxed{{{i}.{j}}}") for j in range(n)] for i in range(len(prompts))]

    monkeypatch.setattr(sample, "generate", fake_generate)
    cfg = SolverConfig(top_k=40, max_new_tokens=64)
    out = solver.sample_answers(None, tok, ["what is 1 + 1 ?", "hello world"], 3, cfg, seed=7)
    assert out == [["\\boxed{0.0}", "\\boxed{0.1}", "\\boxed{0.2}"], ["\\boxed{1.0}", "\\boxed{1.1}", "\\boxed{1.2}"]]
    (prompts, n, kw), = calls
    assert n == 3 and prompts == [solver.solver_prompt(tok, "what is 1 + 1 ?"), solver.solver_prompt(tok, "hello world")]
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["max_new_tokens"], kw["seed"]) == (1.0, 1.0, 40, 64, 7)
    assert kw["eos_ids"] == sample.eos_ids_of(tok)
    assert solver.solver_prompt(tok, "hello") == sample.chat_prompt(tok, solver.SOLVER_SYSTEM, "hello")
    assert "\\boxed{}" in solver.SOLVER_SYSTEM and "step by step" in solver.SOLVER_SYSTEM


def test_solver_reward():
    assert solver_reward("7 * 6 = 42, so \\boxed{42}", "42") == 1.0
    assert solver_reward("first \\boxed{41}, no wait: \\boxed{42}", "42") == 1.0  # the LAST box counts
    assert solver_reward("first \\boxed{42}, no wait: \\boxed{41}", "42") == 0.0
    assert solver_reward("the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0  # equivalence, not string match
    assert solver_reward("the answer is 42", "42") == 0.0  # no box, no reward
    assert solver_reward("", "42") == 0.0 and solver_reward(None, "42") == 0.0
