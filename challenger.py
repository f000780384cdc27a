"""The Challenger side of R-Zero: its prompt, the parsing of its questions, and its reward (Sec. 3.2).

For a batch of B Challenger completions x_1..x_B (gathered across ranks: the repetition penalty is batch-wide) and
the frozen Solver's votes on them:
    p_i     = fraction of the Solver's m = 10 answers equivalent to their majority (solver.Vote)
    r_unc   = 1 - 2 |p_i - 1/2|                           1 when the Solver is split evenly, 0 when unanimous
    d_ij    = 1 - BLEU(x_i, x_j)                          BLEU-4 on whitespace tokens, NLTK smoothing method 1
    C(x_i)  = x_i's cluster under average-linkage agglomerative clustering of d, cut at distance 0.5
    r_rep   = lambda |C(x_i)| / B
    r_i     = max(0, r_unc - r_rep)                       0 when no <question>...</question> can be parsed

Where the paper is silent: BLEU is averaged over both directions (the code's one-way BLEU, which depends on batch
order, is the "code" variant); clusters merge while < 0.5, as the code's sklearn distance_threshold does (scipy's
fcluster merges at 0.5); B counts bad-format completions too, as in the code.

`reward_variant="code"` is the authors' code: r = min(p, 1-p) - r_rep, -1 for a bad format (its known fault, scoring
only when the majority equals the last character of the Challenger's answer, is not reproduced). `validity_gate`
(the authors' until December 2025): p = 0 unless the Solver's majority is equivalent to the Challenger's own boxed
answer and more than 1 in 10 answers agree; off, that answer is never read.
"""
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

import grader
import sample

# The authors' prompt, verbatim (their code's verl/utils/dataset.py, "questioner_format"): it decides what
# the base Challenger writes, so it decides every result, the untrained-Challenger baseline included.
CHALLENGER_SYSTEM = (
    "You are an expert competition-math problem setter.\n"
    "FIRST, in your private scratch-pad, think step-by-step to design a brand-new, non-trivial problem. "
    "The problem could come from any field of mathematics, including but not limited to algebra, geometry, number "
    "theory, combinatorics, prealgebra, probability, statistics, and calculus. "
    "Aim for a difficulty such that fewer than 30 % of advanced high-school students could solve it. "
    "Avoid re-using textbook clichés or famous contest problems.\n"
    "THEN, without revealing any of your private thoughts, output **exactly** the following two blocks:\n\n"
    "<question>\n{The full problem statement on one or more lines}\n</question>\n\n"
    "\\boxed{final_answer}\n\n"
    "Do NOT output anything else—no explanations, no extra markup."
)
CHALLENGER_USER = ("Generate one new, challenging reasoning question now. "
                   "Remember to format the output exactly as instructed.")

OPEN, CLOSE = "<question>", "</question>"


def challenger_prompt(tokenizer) -> list[int]:
    """The one prompt every Challenger rollout starts from: diversity comes from sampling only."""
    return sample.chat_prompt(tokenizer, CHALLENGER_SYSTEM, CHALLENGER_USER)


@dataclass
class ChallengerConfig:
    """the Challenger's reward (challenger.py)"""
    reward_variant: str = "paper"  # paper: max(0, r_unc - r_rep) | code: min(p, 1 - p) - r_rep, -1 for a bad format
    repetition_penalty: bool = True  # the penalty for questions alike (off: the paper's ablation)
    penalty_weight: float = 1.0  # lambda: r_rep = lambda |cluster| / batch
    cluster_cut: float = 0.5  # average-linkage clusters of BLEU distance are cut at this distance
    validity_gate: bool = False  # score only questions whose Solver majority equals the Challenger's own answer


# ----------------------------------------------------------------------------- parsing

def _last_question_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the last <question>(.*?)</question> as re.findall finds it, by str.find: linear time."""
    span, pos = None, 0
    # stops at the first opening tag with no closing tag after it: no later match exists
    while (s := text.find(OPEN, pos)) >= 0 and (e := text.find(CLOSE, s + len(OPEN))) >= 0:
        span, pos = (s + len(OPEN), e), e + len(CLOSE)
    return span


def parse_question(text: str) -> str | None:
    """The text inside the last <question>...</question>, stripped; None when absent or empty (bad format)."""
    span = _last_question_span(text or "")
    q = text[span[0]:span[1]].strip() if span else ""
    return q or None


def parse_challenger_answer(text: str) -> str | None:
    """The Challenger's own boxed answer after its question. For analysis only: never part of the reward."""
    span = _last_question_span(text or "")
    return grader.extract_boxed(text[span[1] + len(CLOSE):]) if span else None


# ----------------------------------------------------------------------------- BLEU

def _ngrams(tokens, n) -> Counter:
    return Counter(tuple(tokens[k:k + n]) for k in range(len(tokens) - n + 1))


def bleu4(hyp: list[str], ref: list[str]) -> float:
    """NLTK's sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method1): the slow, sure path."""
    if isinstance(hyp, str) or isinstance(ref, str):
        raise TypeError("bleu4 takes token lists (e.g. text.split()), not strings")
    log_p = 0.0
    for n in range(1, 5):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        match = sum(min(c, r[g]) for g, c in h.items())
        if n == 1 and match == 0:
            return 0.0
        log_p += math.log((match or 0.1) / max(1, len(hyp) - n + 1)) / 4
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(log_p)


def bleu_matrix(sentences: list[list[str]]) -> np.ndarray:
    """S[i, j] = bleu4(sentences[i], sentences[j]), diagonal 1; the symmetric match counts from an inverted index."""
    B = len(sentences)
    L = np.array([len(s) for s in sentences], dtype=np.float64)  # (B,)
    log_p = np.zeros((B, B))
    for n in range(1, 5):
        postings = {}  # n-gram -> [(sentence id, count)]
        for i, s in enumerate(sentences):
            for g, c in _ngrams(s, n).items():
                postings.setdefault(g, []).append((i, c))
        match = np.zeros((B, B))  # (B, B) clipped n-gram matches, symmetric
        for pairs in postings.values():
            if len(pairs) > 1:
                ix, c = np.array([i for i, _ in pairs]), np.array([k for _, k in pairs], dtype=np.float64)
                match[np.ix_(ix, ix)] += np.minimum.outer(c, c)
        if n == 1:
            unigram_match = match
        total = np.maximum(L - n + 1, 1.0)[:, None]  # (B, 1) hypothesis n-grams
        log_p += np.log(np.where(match > 0, match, 0.1) / total) / 4
    with np.errstate(divide="ignore", invalid="ignore"):  # |hyp| = 0 rows are zeroed below (no unigram match)
        bp = np.where(L[:, None] > L[None, :], 1.0, np.exp(1 - L[None, :] / L[:, None]))  # (B, B)
    S = np.where(unigram_match > 0, bp * np.exp(log_p), 0.0)  # (B, B)
    np.fill_diagonal(S, 1.0)
    return S


def bleu_distances(questions: list[str], symmetric: bool = True) -> np.ndarray:
    """d_ij = 1 - BLEU on whitespace tokens, both directions averaged (symmetric=False: the code's, mirrored)."""
    S = bleu_matrix([q.split() for q in questions])  # (B, B)
    S = (S + S.T) / 2 if symmetric else np.triu(S) + np.triu(S, 1).T
    return 1.0 - S


# ----------------------------------------------------------------------------- clustering

def average_linkage_clusters(dist, cut: float = 0.5, weights=None) -> np.ndarray:
    """Labels (B,) of average-linkage (UPGMA) clustering, merging while the closest pair is < cut (as sklearn's
    distance_threshold; UPGMA is monotone, so this is the dendrogram's cut). weights[i]: point i is that many copies.
    Each row keeps its nearest neighbour (ties: the smallest index), so a merge costs O(B) plus a rescan."""
    D = np.array(dist, dtype=np.float64)  # (B, B) copy, becomes the cluster-to-cluster distance matrix
    B = D.shape[0]
    rep = np.arange(B)  # cluster row of each point
    size = np.ones(B) if weights is None else np.asarray(weights, dtype=np.float64)
    alive = np.ones(B, dtype=bool)  # rows that still hold a cluster
    np.fill_diagonal(D, np.inf)
    nn = D.argmin(1) if B else np.zeros(0, dtype=np.int64)  # (B,) nearest neighbour of each row
    nn_d = D[np.arange(B), nn]  # (B,) its distance; inf for dead rows
    for _ in range(B - 1):
        i = int(nn_d.argmin())
        if not nn_d[i] < cut:
            break
        j = int(nn[i])  # j > i: row j would otherwise hold the same minimum at a smaller index
        row = (size[i] * D[i] + size[j] * D[j]) / (size[i] + size[j])  # (B,) Lance-Williams, average linkage
        D[i], D[:, i] = row, row
        D[j], D[:, j] = np.inf, np.inf
        D[i, i] = np.inf
        size[i] += size[j]
        rep[rep == j] = i
        alive[j], nn_d[j] = False, np.inf
        stale = alive & ((nn == i) | (nn == j))  # rows whose nearest neighbour moved or died: rescan
        stale[i] = True
        closer = alive & ~stale & ((row < nn_d) | ((row == nn_d) & (i < nn)))
        nn[closer], nn_d[closer] = i, row[closer]
        nn[stale] = D[stale].argmin(1)
        nn_d[stale] = D[stale, nn[stale]]
    return np.unique(rep, return_inverse=True)[1]  # rep is each cluster's smallest member: first-appearance order


def cluster_sizes(questions: list[str], cut: float = 0.5, symmetric: bool = True) -> list[int]:
    """|C(x_i)| for each question. Copies of a question of 4+ tokens (BLEU 1: they merge first; a shorter copy's
    smoothed BLEU is below 1) are one point of their count: 512 copies cost one BLEU pair, with the same clusters."""
    if not questions:
        return []
    dedupe = symmetric and cut > 0  # only then do copies merge before anything else
    first, reps, point = {}, [], []  # distinct question -> its point; each point's text; each question's point
    for i, q in enumerate(questions):
        key = tuple(t) if dedupe and len(t := q.split()) >= 4 else i  # else a point of its own
        if key not in first:
            first[key] = len(reps)
            reps.append(q)
        point.append(first[key])
    counts = np.bincount(point)
    labels = average_linkage_clusters(bleu_distances(reps, symmetric), cut, counts)
    sizes = np.bincount(labels, weights=counts).astype(int)  # points per cluster, copies counted
    return sizes[labels[point]].tolist()


def repetition_penalty(questions: list[str], lam: float = 1.0, cut: float = 0.5, symmetric: bool = True) -> list[float]:
    """r_rep(x_i) = lam * |C(x_i)| / B over this batch of B questions."""
    return [lam * s / len(questions) for s in cluster_sizes(questions, cut, symmetric)]


# ----------------------------------------------------------------------------- the reward

def uncertainty_reward(p: float) -> float:
    return 1.0 - 2.0 * abs(p - 0.5)


def challenger_rewards(questions: list[str | None], votes: list, cfg: ChallengerConfig,
                       own_answers: list | None = None) -> tuple[list[float], list[dict]]:
    """Rewards and stats of B completions (every rank's): questions[i] (None: bad format), its Vote, its own answer."""
    if cfg.reward_variant not in ("paper", "code"):
        raise ValueError(f"reward_variant must be 'paper' or 'code', got {cfg.reward_variant!r}")
    code = cfg.reward_variant == "code"
    B = len(questions)
    valid = [i for i, q in enumerate(questions) if q is not None]  # bad formats are neither scored nor clustered
    valid_q = [questions[i] for i in valid]
    sizes = cluster_sizes(valid_q, cfg.cluster_cut, symmetric=not code) if cfg.repetition_penalty else [0] * len(valid)

    rewards = [-1.0 if code else 0.0] * B
    stats = [dict(question=None, valid_format=False, p=None, majority=None, cluster_size=0, r_unc=0.0, r_rep=0.0,
                  gated=False) for _ in questions]
    for i, size in zip(valid, sizes):
        v, r_rep = votes[i], cfg.penalty_weight * size / B
        own = own_answers[i] if cfg.validity_gate else None
        agree = own and v.majority and v.p > 0.1 and grader.is_equiv(v.majority, own)
        gated = cfg.validity_gate and not agree
        p = 0.0 if gated else v.p  # the authors' gated score: as if the Solver were sure
        r_unc = min(p, 1.0 - p) if code else uncertainty_reward(p)
        rewards[i] = r_unc - r_rep if code else max(0.0, r_unc - r_rep)
        stats[i].update(question=questions[i], valid_format=True, p=v.p, majority=v.majority, cluster_size=size,
                        r_unc=r_unc, r_rep=r_rep, gated=gated)
    return rewards, stats
