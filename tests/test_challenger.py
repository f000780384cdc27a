"""Challenger: parsing, BLEU-4 (method 1), average-linkage clustering, repetition penalty and the batch reward.

challenger.py is pure: the frozen Solver's votes are built from scripted responses with solver.vote (as train.vote
does with sampled ones), so no model runs.
"""
import math
import random
import time

import numpy as np
import pytest

import challenger as ch
import sample
import solver
from challenger import ChallengerConfig, average_linkage_clusters, bleu4, parse_challenger_answer, parse_question


# ----------------------------------------------------------------------------- parsing

def test_parse_question_forms():
    assert parse_question("<question> What is 2+2? </question>\\boxed{4}") == "What is 2+2?"
    assert parse_challenger_answer("<question> What is 2+2? </question>\\boxed{4}") == "4"
    text = "Let me think.\n<question>first draft</question>\n<question>Final: find x.</question>\n\\boxed{7}"
    assert parse_question(text) == "Final: find x."  # the LAST question
    assert parse_challenger_answer(text) == "7"
    # nested tags: as re.findall(r"<question>(.*?)</question>", DOTALL)[-1] would read it (the authors' parser)
    assert parse_question("<question>outer <question>inner</question> tail</question>") == "outer <question>inner"
    assert parse_question("<question>no closing tag") is None
    assert parse_question("no opening tag</question>") is None
    assert parse_question("<question>  \n </question>\\boxed{1}") is None  # empty is a bad format
    assert parse_question("<question>A</question><question></question>") is None  # last one empty, as the code
    assert parse_question("") is None and parse_question(None) is None
    # the Challenger's answer is read after its question only; a boxed inside the question does not count
    assert parse_challenger_answer("<question>Show \\boxed{3} is odd.</question>") is None
    assert parse_challenger_answer("\\boxed{5} no question") is None


def test_parse_question_is_linear_on_hostile_input():
    hostile = ["<question>" * 10_000, "</question>" * 9_091, "<question>a" * 9_000 + "</question>",
               "<question>x</question>" * 4_500, "<" * 100_000, "<question>" + "x" * 100_000 + "</question>"]
    t = time.perf_counter()
    out = [parse_question(s) for s in hostile] + [parse_challenger_answer(s) for s in hostile]
    assert time.perf_counter() - t < 1.0
    assert out[:6] == [None, None, "a" + "<question>a" * 8_999, "x", None, "x" * 100_000]


# ----------------------------------------------------------------------------- BLEU

def test_bleu_worked_examples():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat" (6 tokens each):
    #   1-grams: the x2, cat, on, mat match; sat does not        -> 5/6
    #   2-grams: "the cat", "on the", "the mat" of 5              -> 3/5
    #   3-grams: "on the mat" of 4                                -> 1/4
    #   4-grams: none of 3 -> method 1: epsilon / 3              -> 0.1/3
    #   BP = exp(1 - 6/6) = 1; BLEU = (5/6 * 3/5 * 1/4 * 1/30)^(1/4) = 240^(-1/4) = 0.254066...
    assert bleu4("the cat sat on the mat".split(), "the cat is on the mat".split()) == pytest.approx(240 ** -0.25, abs=1e-12)
    assert 240 ** -0.25 == pytest.approx(0.2540664, abs=1e-7)

    # short hypothesis "the cat sat" vs ref "the cat sat on the mat":
    #   p1 = 3/3, p2 = 2/2, p3 = 1/1, p4: no 4-gram in a 3-token hypothesis -> 0.1 / max(1, 0) = 0.1
    #   BP = exp(1 - 6/3) = e^-1; BLEU = e^-1 * 0.1^(1/4) = 0.206874...
    short, long_ = "the cat sat".split(), "the cat sat on the mat".split()
    assert bleu4(short, long_) == pytest.approx(math.exp(-1) * 0.1 ** 0.25, abs=1e-12)
    assert math.exp(-1) * 0.1 ** 0.25 == pytest.approx(0.2068738, abs=1e-7)
    # BLEU is not symmetric: with the long sentence as hypothesis there is no brevity penalty, but
    #   p1 = 3/6 ("the" clipped to 1), p2 = 2/5, p3 = 1/4, p4 = 0.1/3 -> (1/600)^(1/4) = 0.202052...
    assert bleu4(long_, short) == pytest.approx(600 ** -0.25, abs=1e-12)
    assert 600 ** -0.25 == pytest.approx(0.2020516, abs=1e-7)

    # clipping: "the" x7 against a reference with "the" x2 -> p1 = 2/7, p2..p4 all zero -> 0.1/6, 0.1/5, 0.1/4
    assert bleu4(["the"] * 7, "the cat is on the mat".split()) == pytest.approx(
        (2 / 7 * 0.1 / 6 * 0.1 / 5 * 0.1 / 4) ** 0.25, abs=1e-12)

    s = "find all primes p such that p + 2 is prime".split()
    assert bleu4(s, s) == 1.0  # identical (>= 4 tokens)
    assert bleu4("a b c d".split(), "e f g h".split()) == 0.0  # no unigram overlap
    assert bleu4([], s) == 0.0 and bleu4(s, []) == 0.0
    # NLTK quirk kept: identical 2-token sentences have p3 = p4 = 0.1, so BLEU = 0.1^(2/4) = 0.316...
    assert bleu4(["x", "y"], ["x", "y"]) == pytest.approx(0.1 ** 0.5, abs=1e-12)
    with pytest.raises(TypeError):
        bleu4("a string", "another")


def test_bleu_matrix_matches_scalar_bleu_and_directions():
    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "e", "f"]  # small vocabulary: many repeated and clipped n-grams
    sents = [[rng.choice(vocab) for _ in range(rng.randint(0, 10))] for _ in range(40)]
    S = ch.bleu_matrix(sents)
    for i in range(40):
        for j in range(40):
            if i != j:
                assert S[i, j] == pytest.approx(bleu4(sents[i], sents[j]), abs=1e-12)
    assert np.all(np.diag(S) == 1.0)
    qs = [" ".join(s) for s in sents]
    sym, code = ch.bleu_distances(qs), ch.bleu_distances(qs, symmetric=False)
    assert sym[3, 7] == pytest.approx(1 - (bleu4(sents[3], sents[7]) + bleu4(sents[7], sents[3])) / 2, abs=1e-12)
    assert code[3, 7] == code[7, 3] == pytest.approx(1 - bleu4(sents[3], sents[7]), abs=1e-12)  # lower index = hyp
    assert np.allclose(sym, sym.T) and np.all(np.diag(sym) == 0) and np.all(np.diag(code) == 0)


# ----------------------------------------------------------------------------- clustering

def same_partition(a, b):
    return len(set(zip(a, b))) == len(set(a)) == len(set(b))


def test_clusters_hand_worked():
    D = [[0, .1, .9, .8, .3],
         [.1, 0, .7, .9, .5],
         [.9, .7, 0, .2, .6],
         [.8, .9, .2, 0, .44],
         [.3, .5, .6, .44, 0]]
    # 1. merge {0,1} at 0.1. Average distances: to 2 (.9+.7)/2 = .8, to 3 (.8+.9)/2 = .85, to 4 (.3+.5)/2 = .4
    # 2. merge {2,3} at 0.2. {2,3}-{0,1} = (.9+.7+.8+.9)/4 = .825, {2,3}-4 = (.6+.44)/2 = .52
    # 3. merge {0,1,4} at 0.4. {0,1,4}-{2,3} = (.9+.8+.7+.9+.6+.44)/6 = .7233 >= .5: stop.
    # Single linkage would chain everything together through d34 = .44; complete linkage would not join 4
    # ({0,1}-4 = max(.3,.5) = .5, not < .5).
    assert average_linkage_clusters(D).tolist() == [0, 0, 1, 1, 0]
    assert average_linkage_clusters(D, cut=0.73).tolist() == [0, 0, 0, 0, 0]
    assert average_linkage_clusters(D, cut=0.1).tolist() == [0, 1, 2, 3, 4]  # 0.1 is not < 0.1


def test_cut_at_exactly_half_and_ties():
    # sklearn's distance_threshold (the authors' code): a merge at distance exactly 0.5 is not made
    assert average_linkage_clusters([[0, .5], [.5, 0]]).tolist() == [0, 1]
    assert average_linkage_clusters([[0, .5 - 1e-9], [.5 - 1e-9, 0]]).tolist() == [0, 0]
    # a chain a-b-c with d_ab = d_bc = .3 (a tie) and d_ac = .8: the tie goes to the smaller index pair (0,1);
    # then {0,1}-2 = (.8+.3)/2 = .55 > .5, so c stays alone (single linkage would take it, at .3)
    assert average_linkage_clusters([[0, .3, .8], [.3, 0, .3], [.8, .3, 0]]).tolist() == [0, 0, 1]
    # an average that lands exactly on the cut: d01 = d02 = .25 (tie -> {0,1} first), d12 = .75;
    # {0,1}-2 = (.25+.75)/2 = .5 exactly -> not merged; a cut a hair above merges it
    D = [[0, .25, .25], [.25, 0, .75], [.25, .75, 0]]
    assert average_linkage_clusters(D).tolist() == [0, 0, 1]
    assert average_linkage_clusters(D, cut=0.5 + 1e-12).tolist() == [0, 0, 0]
    # labels are numbered in order of first appearance
    assert average_linkage_clusters([[0, .9, .1], [.9, 0, .9], [.1, .9, 0]]).tolist() == [0, 1, 0]


def reference_clusters(D, cut):
    """Slow, obviously-correct average linkage: recompute every inter-cluster mean from the original matrix."""
    clusters = [[i] for i in range(len(D))]
    while len(clusters) > 1:
        best = min((np.mean([D[a][b] for a in A for b in Bc]), x, y)
                   for x, A in enumerate(clusters) for y, Bc in enumerate(clusters) if x < y)
        if not best[0] < cut:
            break
        _, x, y = best
        clusters[x] += clusters.pop(y)
    labels = [0] * len(D)
    for k, c in enumerate(clusters):
        for i in c:
            labels[i] = k
    return labels


def test_clusters_match_slow_reference():
    rs = np.random.default_rng(0)
    for _ in range(60):
        B = int(rs.integers(2, 11))
        X = rs.random((B, 2))
        D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))  # (B, B)
        cut = float(rs.uniform(0.1, 0.9))
        assert same_partition(average_linkage_clusters(D, cut), reference_clusters(D, cut))


def test_clusters_scale_to_512():
    rs = np.random.default_rng(1)
    X = rs.random((512, 2))
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))  # (512, 512)
    t = time.perf_counter()
    labels = average_linkage_clusters(D, cut=10.0)  # the whole dendrogram: 511 merges
    assert time.perf_counter() - t < 10.0  # generous: a guard against an O(B^3) rewrite, not a benchmark
    assert labels.tolist() == [0] * 512


def test_copies_are_scored_once_and_cluster_as_the_full_batch():
    """cluster_sizes scores each distinct question once, weighted by its copies: the same sizes as clustering
    every copy (the paper's definition, computed here the slow way), and fast when one long question repeats."""
    rs = random.Random(3)
    words = "what is the sum of two and three times four a prime number less than".split()
    for trial in range(30):
        pool = [" ".join(rs.choices(words, k=rs.randint(3, 12))) for _ in range(rs.randint(2, 8))]
        # copies, some differing only in whitespace (the same tokens for BLEU)
        batch = [rs.choice(pool).replace(" ", "  ", rs.randint(0, 1)) for _ in range(rs.randint(2, 30))]
        cut = rs.choice([0.3, 0.5, 0.7])
        labels = average_linkage_clusters(ch.bleu_distances(batch), cut)  # every copy a point
        assert ch.cluster_sizes(batch, cut) == np.bincount(labels)[labels].tolist(), trial
    long_q = " ".join(f"{i} * {i + 1} +" for i in range(100)) + " 7?"  # ~300 tokens
    t = time.perf_counter()
    assert ch.cluster_sizes([long_q] * 512 + ["What is 2 + 2?"]) == [512] * 512 + [1]
    assert time.perf_counter() - t < 1.0  # was 8.5 s: 512^2 BLEU pairs of 300 tokens


# ----------------------------------------------------------------------------- rewards

Q = {  # distinct problems: pairwise BLEU far below 0.5
    "half": "Find the number of positive integers n below 1000 such that n squared plus one is divisible by 13.",
    "sure": "A fair die is rolled five times; what is the probability that the sum of the rolls equals 18?",
    "dup": "Let f be a cubic polynomial with roots r, s and t where rst = 6; compute f evaluated at two.",
    "p30": "How many ways can eight rooks be placed on a chessboard so that none attacks another?",
    "mute": "Compute the area enclosed by the curve x^4 + y^4 = 1 rounded to three decimal places.",
    "p70": "What is the remainder when 7 raised to the power 2024 is divided by one hundred?",
}
ANSWERS = {  # scripted Solver responses, 10 per question
    "half": ["\\boxed{1}"] * 5 + ["\\boxed{2}"] * 5,  # p = 0.5
    "sure": ["so \\boxed{7}"] * 10,  # unanimous: p = 1
    "dup": ["\\boxed{3}"] * 5 + ["\\boxed{4}"] * 5,  # p = 0.5
    "p30": ["\\boxed{40320}"] * 3 + [f"\\boxed{{{k}}}" for k in range(7)],  # p = 0.3
    "mute": ["I do not know"] * 10,  # no boxed answer at all
    "p70": ["\\boxed{1}"] * 7 + ["\\boxed{49}"] * 3,  # p = 0.7
}
BATCH = [f"<question>{Q['half']}</question>\\boxed{{1}}", f"<question>{Q['sure']}</question>\\boxed{{7}}",
         f"<question>{Q['dup']}</question>\\boxed{{3}}", f"<question>{Q['dup']}</question>",
         "I will write a problem: what is 1+1? \\boxed{2}",  # bad format
         f"<question>{Q['p30']}</question>", f"<question>{Q['mute']}</question>", f"<question>{Q['p70']}</question>"]


def batch_votes(cfg=solver.SolverConfig()):
    """The parsed questions of BATCH and the Solver's votes on them, aligned (None for the bad format), as
    train.challenger_phase passes them."""
    by_text = {q: ANSWERS[k] for k, q in Q.items()}
    questions = [parse_question(t) for t in BATCH]
    return questions, [None if q is None else solver.vote(by_text[q], cfg) for q in questions]


def test_paper_reward_on_a_constructed_batch():
    questions, votes = batch_votes()
    assert questions == [Q["half"], Q["sure"], Q["dup"], Q["dup"], None, Q["p30"], Q["mute"], Q["p70"]]
    rewards, stats = ch.challenger_rewards(questions, votes, ChallengerConfig())
    # B = 8 (the bad-format completion stays in the denominator): singletons r_rep = 1/8, duplicates 2/8
    assert rewards == pytest.approx([1 - 1 / 8,  # p = 0.5: r_unc = 1
                                     0.0,  # unanimous: max(0, 0 - 1/8)
                                     1 - 2 / 8, 1 - 2 / 8,  # p = 0.5 but a duplicate pair
                                     0.0,  # bad format
                                     0.6 - 1 / 8,  # p = 0.3: r_unc = 1 - 2 * 0.2
                                     0.0,  # no boxed answer: no majority, p = 0
                                     0.6 - 1 / 8], abs=1e-12)  # p = 0.7
    assert [s["cluster_size"] for s in stats] == [1, 1, 2, 2, 0, 1, 1, 1]
    assert [s["valid_format"] for s in stats] == [True, True, True, True, False, True, True, True]
    assert [s["p"] for s in stats] == [0.5, 1.0, 0.5, 0.5, None, 0.3, 0.0, 0.7]
    assert [s["question"] for s in stats] == questions
    assert stats[1]["majority"] == "7" and stats[6]["majority"] is None
    assert stats[0]["r_unc"] == 1.0 and stats[0]["r_rep"] == pytest.approx(1 / 8) and stats[4]["r_rep"] == 0.0
    # the reward reads only .p and .majority of a vote
    from types import SimpleNamespace
    plain = [None if v is None else SimpleNamespace(p=v.p, majority=v.majority) for v in votes]
    assert ch.challenger_rewards(questions, plain, ChallengerConfig()) == (rewards, stats)
    assert ch.challenger_rewards([], [], ChallengerConfig()) == ([], [])


def test_reward_without_repetition_penalty_and_lambda():
    questions, votes = batch_votes()
    rewards, stats = ch.challenger_rewards(questions, votes, ChallengerConfig(repetition_penalty=False))
    assert rewards == pytest.approx([1.0, 0.0, 1.0, 1.0, 0.0, 0.6, 0.0, 0.6], abs=1e-12)  # p = 0.5 -> 1, unanimous -> 0
    assert all(s["r_rep"] == 0.0 for s in stats)
    rewards, _ = ch.challenger_rewards(questions, votes, ChallengerConfig(penalty_weight=0.5))
    assert rewards[:4] == pytest.approx([1 - 0.5 / 8, 0.0, 1 - 1 / 8, 1 - 1 / 8], abs=1e-12)
    # cluster_cut: at a cut of 0 nothing merges (the duplicates too are singletons); at 1.01 everything does
    _, stats = ch.challenger_rewards(questions, votes, ChallengerConfig(cluster_cut=0.0))
    assert [s["cluster_size"] for s in stats] == [1, 1, 1, 1, 0, 1, 1, 1]
    _, stats = ch.challenger_rewards(questions, votes, ChallengerConfig(cluster_cut=1.01))
    assert [s["cluster_size"] for s in stats] == [7, 7, 7, 7, 0, 7, 7, 7]


def test_code_variant_reward():
    # the authors' code: --reward-variant code --band code (a missing answer votes "None")
    questions, votes = batch_votes(solver.SolverConfig(band="code"))
    rewards, stats = ch.challenger_rewards(questions, votes, ChallengerConfig(reward_variant="code"))
    assert rewards == pytest.approx([0.5 - 1 / 8, 0.0 - 1 / 8, 0.5 - 2 / 8, 0.5 - 2 / 8,
                                     -1.0,  # bad format
                                     0.3 - 1 / 8,
                                     0.0 - 1 / 8,  # 10 x "None" is a unanimous answer: p = 1
                                     0.3 - 1 / 8], abs=1e-12)
    assert stats[6]["p"] == 1.0 and stats[6]["majority"] == "None"
    # the reward variant alone does not change how votes count a missing answer: that is the band's
    _, paper_band = ch.challenger_rewards(*batch_votes(), ChallengerConfig(reward_variant="code"))
    assert paper_band[6]["p"] == 0.0 and paper_band[6]["majority"] is None
    _, paper = ch.challenger_rewards(*batch_votes(), ChallengerConfig())
    for s, sp in zip(stats, paper):  # half scale: min(p, 1-p) = (1 - 2|p - 1/2|) / 2
        if s["valid_format"] and sp["p"] == s["p"]:
            assert s["r_unc"] == pytest.approx(sp["r_unc"] / 2, abs=1e-12)
    with pytest.raises(ValueError):
        ch.challenger_rewards(questions, votes, ChallengerConfig(reward_variant="nope"))


def test_validity_gate_scores_only_questions_whose_majority_is_the_challengers_answer():
    """--validity-gate: the authors' scorer until December 2025. Own answers: half 1 (= majority), sure 7 (=, but
    unanimous: 0 anyway), dup 3 (=) and none, p30 40320.0 (equivalent), mute none, p70 49 (a minority answer)."""
    questions, votes = batch_votes()
    own = [ch.parse_challenger_answer(t) for t in BATCH]
    assert own == ["1", "7", "3", None, None, None, None, None]
    own[5], own[7] = "40320.0", "49"
    rewards, stats = ch.challenger_rewards(questions, votes, ChallengerConfig(validity_gate=True), own)
    assert rewards == pytest.approx([1 - 1 / 8, 0.0, 1 - 2 / 8, 0.0, 0.0, 0.6 - 1 / 8, 0.0, 0.0], abs=1e-12)
    assert [s["gated"] for s in stats] == [False, False, False, True, False, False, True, True]
    assert [s["p"] for s in stats] == [0.5, 1.0, 0.5, 0.5, None, 0.3, 0.0, 0.7]  # the vote itself is kept
    code, _ = ch.challenger_rewards(questions, votes, ChallengerConfig(validity_gate=True, reward_variant="code"), own)
    assert code[3] == pytest.approx(-2 / 8) and code[7] == pytest.approx(-1 / 8)  # min(0, 1) - r_rep
    # off (the default), the Challenger's own answers are never read
    assert ch.challenger_rewards(questions, votes, ChallengerConfig(), own)[0] == \
        ch.challenger_rewards(questions, votes, ChallengerConfig())[0]
    # p = 0.1 (1 of 10 agrees with the Challenger) is gated too, as the authors' score > 0.1
    one = [solver.Vote("5", 0.1, [])]
    assert ch.challenger_rewards(["What?"], one, ChallengerConfig(validity_gate=True, repetition_penalty=False),
                                 ["5"])[1][0]["gated"]


def test_code_variant_takes_bleu_from_the_lower_index():
    """The code variant clusters on the code's one-direction BLEU (hypothesis = lower batch index), the paper
    variant on the mean of both directions. A sentence and its first 9 words: BLEU(long, short) = 0.513,
    BLEU(short, long) = 0.459, mean 0.486 -> only the code variant, long first, is under the 0.5 distance cut."""
    long_ = "find the sum of all positive integers n such that n squared plus one is prime"
    short = " ".join(long_.split()[:9])
    assert bleu4(long_.split(), short.split()) == pytest.approx(0.513, abs=1e-3)
    assert bleu4(short.split(), long_.split()) == pytest.approx(0.459, abs=1e-3)
    votes = [solver.Vote("1", 0.5, ["1", "2"])] * 2
    sizes = lambda qs, variant: [s["cluster_size"] for s in
                                 ch.challenger_rewards(qs, votes, ChallengerConfig(reward_variant=variant))[1]]
    assert sizes([long_, short], "code") == [2, 2] and sizes([short, long_], "code") == [1, 1]
    assert sizes([long_, short], "paper") == [1, 1] == sizes([short, long_], "paper")


def test_repetition_penalty_is_proportional_to_cluster_size():
    a, b, c = Q["half"], Q["sure"], Q["p30"]
    near_a = a.replace("1000", "2000")  # one word changed: BLEU ~ 0.85, same cluster
    assert ch.repetition_penalty([a, a, a, b]) == pytest.approx([3 / 4, 3 / 4, 3 / 4, 1 / 4])
    assert ch.repetition_penalty([a, near_a, b, c, b, b], lam=0.5) == pytest.approx(
        [0.5 * 2 / 6, 0.5 * 2 / 6, 0.5 * 3 / 6, 0.5 * 1 / 6, 0.5 * 3 / 6, 0.5 * 3 / 6])
    assert ch.repetition_penalty([]) == []


def test_uncertainty_reward():
    assert [ch.uncertainty_reward(p) for p in (0.0, 0.5, 1.0)] == [0.0, 1.0, 0.0]
    assert ch.uncertainty_reward(0.3) == pytest.approx(0.6) and ch.uncertainty_reward(0.8) == pytest.approx(0.4)


def test_challenger_prompt():
    from conftest import make_tokenizer

    tok = make_tokenizer()
    ids = ch.challenger_prompt(tok)
    assert ids == sample.chat_prompt(tok, ch.CHALLENGER_SYSTEM, ch.CHALLENGER_USER)
    for needle in ("<question>", "</question>", "\\boxed{", "high-school", "famous"):
        assert needle in ch.CHALLENGER_SYSTEM


AUTHORS_SYSTEM = (  # the authors' prompt, verbatim (their code's verl/utils/dataset.py, questioner_format)
    "You are an expert competition-math problem setter.\n"
    "FIRST, in your private scratch-pad, think step-by-step to design a brand-new, non-trivial problem. "
    "The problem could come from any field of mathematics, including but not limited to algebra, geometry, number theory, combinatorics, prealgebra, probability, statistics, and calculus. "  # noqa: E501
    "Aim for a difficulty such that fewer than 30 % of advanced high-school students could solve it. "
    "Avoid re-using textbook clichés or famous contest problems.\n"
    "THEN, without revealing any of your private thoughts, output **exactly** the following two blocks:\n\n"
    "<question>\n"
    "{The full problem statement on one or more lines}\n"
    "</question>\n\n"
    r"\boxed{final_answer}"
    "\n\n"
    "Do NOT output anything else—no explanations, no extra markup."
)
AUTHORS_USER = "Generate one new, challenging reasoning question now. Remember to format the output exactly as instructed."


def test_challenger_prompt_is_the_authors_verbatim_through_qwen3s_chat_template():
    """The real-model prompt, rendered by Qwen3's own chat template (tests/data, as shipped in Qwen3 checkpoints),
    is the authors' system and user turns character for character."""
    from conftest import QWEN3_CHAT_TEMPLATE, byte_level_tokenizer

    with open(QWEN3_CHAT_TEMPLATE) as f:
        tok = byte_level_tokenizer(f.read())
    ids = ch.challenger_prompt(tok)
    assert tok.decode(ids) == (f"<|im_start|>system\n{AUTHORS_SYSTEM}<|im_end|>\n"
                               f"<|im_start|>user\n{AUTHORS_USER}<|im_end|>\n<|im_start|>assistant\n")
    assert ch.CHALLENGER_SYSTEM == AUTHORS_SYSTEM and ch.CHALLENGER_USER == AUTHORS_USER
    # the prompt's own example parses as the format it asks for
    assert ch.parse_question(AUTHORS_SYSTEM.split("two blocks:\n\n")[1]) == "{The full problem statement on one or more lines}"
