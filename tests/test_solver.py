"""Solver: the majority vote, the pseudo-labelled dataset (band filter, counts, ablations) and the binary reward.

solver.py is pure: the frozen Solver's responses are scripted (SCRIPT) and voted on with solver.vote, as
train.vote does with the sampled ones, so no model runs.
"""
import pytest

import sample
import solver
from solver import SolverConfig, Vote, build_dataset, majority_vote, solver_reward


def scripted(k, label="42"):
    """10 responses of which k box `label` and the other 10 - k box distinct wrong answers."""
    return [f"so the answer is \\boxed{{{label}}}"] * k + [f"\\boxed{{{100 + j}}}" for j in range(10 - k)]


SCRIPT = {f"problem agreeing {k}/10": scripted(k) for k in range(2, 11)}  # p = 0.2 .. 1.0
SCRIPT["problem nobody boxes"] = ["I give up"] * 10
SCRIPT["problem half missing"] = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{3}",
                                  "\\boxed{4}"] + ["no box"] * 5  # 3 equivalent answers; 5 missing
PROBLEMS = list(SCRIPT) + [None, "   \n"]  # two unparsable Challenger outputs


def votes_of(problems, cfg):
    """One Vote per problem on its scripted responses (None where the problem is None, as train.vote gives)."""
    return [None if q is None else solver.vote(SCRIPT.get(q, ["\\boxed{1}"] * 10), cfg) for q in problems]


def test_band_filter_keeps_3_to_7_of_10():
    records, counts = build_dataset(PROBLEMS, votes_of(PROBLEMS, SolverConfig()), SolverConfig())
    kept = {r["problem"]: (r["pseudo_label"], r["p"]) for r in records}
    assert kept == {**{f"problem agreeing {k}/10": ("42", k / 10) for k in range(3, 8)},
                    # missing answers count in m: 3 of 10 agree on 1/2 -> p = 0.3, kept
                    "problem half missing": ("\\frac{1}{2}", 0.3)}
    assert counts == dict(generated=13, unparsable=2, no_majority=1, out_of_band=4, kept=6)  # out: 2, 8, 9, 10 of 10
    assert sum(v for k, v in counts.items() if k != "generated") == counts["generated"]
    # a blank question is unparsable whatever its vote says; a kept problem is stored stripped
    records, counts = build_dataset(["  problem agreeing 5/10 \n", " "], [votes_of(["problem agreeing 5/10"],
                                    SolverConfig())[0]] * 2, SolverConfig())
    assert [r["problem"] for r in records] == ["problem agreeing 5/10"] and counts["unparsable"] == 1
    assert build_dataset([], [], SolverConfig()) == ([], dict(generated=0, unparsable=0, no_majority=0,
                                                              out_of_band=0, kept=0))


def test_narrower_band_and_no_filter_ablation():
    cfg = SolverConfig(delta=0.1)
    records, counts = build_dataset(PROBLEMS, votes_of(PROBLEMS, cfg), cfg)
    assert sorted(r["p"] for r in records) == [0.4, 0.5, 0.6]
    cfg = SolverConfig(filter=False)
    records, counts = build_dataset(PROBLEMS, votes_of(PROBLEMS, cfg), cfg)
    assert counts == dict(generated=13, unparsable=2, no_majority=1, out_of_band=0, kept=10)
    assert sorted(r["p"] for r in records) == [0.2, 0.3, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_code_band():
    cfg = SolverConfig(band="code")
    records, counts = build_dataset(PROBLEMS, votes_of(PROBLEMS, cfg), cfg)
    # 0.3 <= p <= 0.8 keeps 3..8 of 10; missing answers vote "None", which wins "half missing" (5 of 10)
    # and "nobody boxes" (10 of 10): both dropped as having no real majority
    assert sorted(r["p"] for r in records) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert counts == dict(generated=13, unparsable=2, no_majority=2, out_of_band=3, kept=6)
    # the code band's filter applies to whatever votes it is given: a paper-style vote on "half missing"
    # (majority 1/2 at p = 0.3) is kept by it
    records, _ = build_dataset(["problem half missing"], votes_of(["problem half missing"], SolverConfig()), cfg)
    assert [(r["pseudo_label"], r["p"]) for r in records] == [("\\frac{1}{2}", 0.3)]


def test_vote_extracts_the_last_box_of_each_response():
    v = solver.vote(SCRIPT["problem half missing"], SolverConfig())
    assert v.answers == ["\\frac{1}{2}", "0.5", "1/2", "3", "4"] + [None] * 5
    assert (v.majority, v.p) == ("\\frac{1}{2}", 0.3)
    v = solver.vote(SCRIPT["problem agreeing 9/10"], SolverConfig())
    assert (v.majority, v.p) == ("42", 0.9)
    v = solver.vote(["first \\boxed{1} then \\boxed{2}", None, "", "\\boxed{2}"], SolverConfig())
    assert v == Vote("2", 0.5, ["2", None, None, "2"])  # a missing response (None) is a missing answer
    # band="code" counts a missing answer as the answer "None" (the authors' code)
    assert solver.vote(SCRIPT["problem half missing"], SolverConfig(band="code")) == Vote(
        "None", 0.5, ["\\frac{1}{2}", "0.5", "1/2", "3", "4"] + [None] * 5)
    assert solver.vote(SCRIPT["problem nobody boxes"], SolverConfig()) == Vote(None, 0.0, [None] * 10)


def test_majority_vote_groups_by_equivalence():
    assert majority_vote(["0.5", "\\frac12", "1/2", "2", "2"]) == Vote("0.5", 0.6, ["0.5", "\\frac12", "1/2", "2", "2"])
    assert majority_vote(["\\frac{1}{2}", "0.5"]).majority == "\\frac{1}{2}"  # representative: first seen
    v = majority_vote(["(1,2)", "[1,2]", "\\left( 1, 2 \\right)"])
    assert (v.majority, v.p) == ("(1,2)", pytest.approx(2 / 3))
    answers = ["18", "18.0", "\\$18", "17", "18 dollars", None, "1{,}8", "19", "17", "18"]
    v = majority_vote(answers)
    assert (v.majority, v.p) == ("18", 0.5) and v.answers == answers and v.answers is not answers  # a copy


def test_majority_vote_ties_go_to_the_first_group():
    mv = lambda a: (lambda v: (v.majority, v.p))(majority_vote(a))
    assert mv(["3", "4", "4", "3"]) == ("3", 0.5)
    assert mv(["4", "3", "3", "4"]) == ("4", 0.5)
    assert mv(["1", "2", "3"]) == ("1", pytest.approx(1 / 3))


def test_majority_vote_missing_answers():
    mv = lambda a, **kw: (lambda v: (v.majority, v.p))(majority_vote(a, **kw))
    assert mv([None, None, None, "5", "5"]) == ("5", 0.4)
    assert mv([None, None, None, "5", "5"], none_is_answer=True) == ("None", 0.6)
    assert mv([None, None, "5", "5"], none_is_answer=True) == ("None", 0.5)  # tie: None came first
    assert mv([None] * 3) == (None, 0.0)
    assert mv([None] * 3, none_is_answer=True) == ("None", 1.0)
    assert mv([]) == (None, 0.0) and mv([], none_is_answer=True) == (None, 0.0)
    assert mv(["", "7", "  "]) == ("7", pytest.approx(1 / 3))  # empty answers are missing answers
    assert majority_vote(["", "7", "  "]).answers == ["", "7", "  "]  # recorded as given


def test_solver_prompt():
    from conftest import make_tokenizer

    tok = make_tokenizer()
    assert solver.solver_prompt(tok, "hello") == sample.chat_prompt(tok, solver.SOLVER_SYSTEM, "hello")
    assert "\\boxed{}" in solver.SOLVER_SYSTEM and "step by step" in solver.SOLVER_SYSTEM


def test_solver_reward():
    assert solver_reward("7 * 6 = 42, so \\boxed{42}", "42") == 1.0
    assert solver_reward("first \\boxed{41}, no wait: \\boxed{42}", "42") == 1.0  # the LAST box counts
    assert solver_reward("first \\boxed{42}, no wait: \\boxed{41}", "42") == 0.0
    assert solver_reward("the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0  # equivalence, not string match
    assert solver_reward("the answer is 42", "42") == 0.0  # no box, no reward
    assert solver_reward("", "42") == 0.0 and solver_reward(None, "42") == 0.0
