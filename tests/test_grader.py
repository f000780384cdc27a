"""Tests for grader.py: a table of real answer formats, adversarial inputs, a seeded fuzz run, extraction, voting."""
import random
import time

import pytest

import grader
from grader import extract_boxed, extract_gsm8k, is_answer, is_equiv
from solver import majority_vote  # the vote's time bound is the grader's: checked here with it

T, F = True, False

# (pred, ref, expected); formats follow MATH-500, GSM8K, AMC, AIME, Minerva and OlympiadBench references.
CASES = [
    # integers (GSM8K, AIME, AMC)
    ("18", "18", T), ("18.00", "18", T), ("\\$18", "18", T), ("18 dollars", "18", T), ("$18$", "18", T),
    ("1,000", "1000", T), ("1{,}000", "1000", T), ("1\\,000", "1000", T), ("1000.", "1000", T),
    ("17", "18", F), ("-5", "5", F), ("025", "25", T), ("25", "250", F), ("0", "-0", T), ("3", "3.0", T),
    ("27", "27.0", T), ("-1", "-1.0", T), ("27.5", "27", F), ("1000000001", "1000000000", F),
    ("123456789012345678901234567890", "123456789012345678901234567891", F), ("10^{100}", "10^{100}+1", F),
    ("10,\\!080", "10080", T), ("11,\\! 111,\\! 111,\\! 100", "11111111100", T), ("\\$32,\\!348", "32348", T),
    ("10\\%", "10", T), ("$8 \\%$", "8", T), ("0.08", "8\\%", F), ("1,234,567", "1234567", T), ("5", "five", F),
    ("3 hours", "3", T), ("2 miles per hour", "2", T), ("5 inches", "5", T), ("12 \\text{ units}", "12", T),
    ("15\\mbox{ cm}^2", "15", T), ("15 \\text{ cm}^2", "15", T), ("10 \\mathrm{~m}", "10", T),
    ("\\text{18}", "18", T), ("{18}", "18", T), ("x = 5", "5", T), ("x=5", "x=6", F), ("k=1", "1", T),
    # fractions, decimals, mixed numbers
    ("\\frac{1}{2}", "0.5", T), ("\\frac12", "\\frac{1}{2}", T), ("\\dfrac{1}{2}", "1/2", T),
    ("\\tfrac{3}{4}", "0.75", T),
    ("1/2", "2", F), ("\\frac{2}{4}", "\\frac{1}{2}", T), ("\\frac{11}{2}", "5.5", T),
    ("\\frac{11}{2}", "5\\frac{1}{2}", T),
    ("2\\frac{1}{2}", "\\frac{5}{2}", T), ("-2\\frac{1}{2}", "-2.5", T), ("2\\frac{1}{2}", "1", F),
    ("\\frac{1}{3}", "0.333", F), ("\\frac{1}{3}", "0.3333333333", F), ("\\frac{13}{4}", "3.25", T),
    ("\\frac{17}{21}", "\\frac{21}{17}", F), ("\\frac{-1}{2}", "-\\frac{1}{2}", T),
    ("-\\frac{1}{2}", "\\frac{1}{2}", F),
    ("\\frac{33}{100}", "\\dfrac{33}{100}", T), ("0.33", "\\dfrac{33}{100}", T), ("\\frac{1}{4}", "\\frac{1}{4}.", T),
    ("\\frac{800}{3}", "266.67", F), ("\\frac{9}{2}", "4.5", T), ("\\frac{3}{2}", "1\\frac{1}{2}", T),
    ("\\frac{14}{15}", "\\frac{15}{14}", F), (".5", "0.5", T),
    ("$\\frac{2}{3}$", "\\frac23", T), ("\\frac{12}{5}", "2.4", T), ("\\frac{11}{36}", "\\frac{11}{63}", F),
    # radicals
    ("2\\sqrt{5}", "\\sqrt{20}", T), ("2 \\sqrt{5}", "2\\sqrt5", T), ("16 \\sqrt{3}", "16\\sqrt{3}", T),
    ("1+2\\sqrt{3}", "2\\sqrt{3}+1", T), ("1+2\\sqrt{3}", "1+3\\sqrt{2}", F),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", T), ("\\frac{\\sqrt{3}}{3}", "\\frac{\\sqrt{3}}{2}", F),
    ("4-2 \\sqrt{3}", "(\\sqrt{3}-1)^2", T), ("$2 \\sqrt{10}$", "\\sqrt{40}", T),
    ("\\frac{8}{\\sqrt[3]{7}}", "8 \\cdot 7^{-1/3}", T), ("\\sqrt[3]{-8}", "-2", T), ("\\sqrt{2}", "1.4142", F),
    ("3\\sqrt{2}", "\\sqrt{18}", T), ("\\sqrt{8}", "2\\sqrt{2}", T), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", T),
    ("\\sqrt{2}", "\\sqrt{3}", F), ("1\\pm\\sqrt{19}", "1 \\pm \\sqrt{19}", T),
    ("1\\pm\\sqrt{19}", "1+\\sqrt{19}", F),
    # pi, e, logs, trig
    ("\\frac{\\pi}{2}", "\\pi/2", T), ("2\\pi", "\\pi \\cdot 2", T), ("\\pi", "3.14", F), ("\\pi", "3.14159", F),
    ("6\\pi", "6 \\pi", T), ("\\frac{9\\pi}{4}", "2.25\\pi", T), ("e^2", "e\\cdot e", T), ("\\pi r^2", "r^2\\pi", T),
    ("e^{i\\pi}", "-1", T), ("\\log_2 8", "3", T), ("\\log_{10} 1000", "3", T), ("\\ln e", "1", T),
    ("\\sin^2 x + \\cos^2 x", "1", T),
    ("$\\frac{\\log 2}{\\log 2-\\log 3}$", "\\frac{\\ln 2}{\\ln(2/3)}", T), ("\\log 2", "\\log 3", F),
    ("\\arctan 1", "\\frac{\\pi}{4}", T), ("\\sin 30^\\circ", "\\sin 30", T),
    # powers and scientific notation (Minerva)
    ("2^{10}", "1024", T), ("2^{1009}", "2^{1009}", T), ("2^{2018}", "4^{1009}", T), ("2^{k}", "2^k", T),
    ("3^{-1}", "\\frac{1}{3}", T), ("10^{-3}", "0.001", T), ("4.4e7", "44000000", T), ("3e8", "3 \\times 10^{8}", T),
    ("5.3e-9", "5.3 \\times 10^{-9}", T), ("1.70e4", "17000", T), ("7.26e6", "7.62e6", F), ("5!", "120", T),
    ("\\binom{5}{2}", "10", T), ("9^{9^{9^{9}}}", "1", F), ("9^{9^{9^{9}}}", "9^{9^{9^{9}}}", T),
    # complex numbers
    ("6+9i", "9i+6", T), ("1+2i", "1-2i", F), ("1+2i", "2i+1", T), ("i^2", "-1", T), ("\\frac{1}{i}", "-i", T),
    # tuples, intervals, sets, unions
    ("(1,2)", "\\left( 1, 2 \\right)", T), ("(1,2)", "[1,2]", F), ("(1,2)", "(2,1)", F), ("[1,2)", "[1, 2)", T),
    ("[1,2)", "(1,2]", F), ("\\{1,2\\}", "\\{2,1\\}", T), ("\\{1,2\\}", "\\{1,3\\}", F),
    ("\\{1,2\\}", "\\{1,2,3\\}", F),
    ("\\left\\{ 1, 2 \\right\\}", "\\{2, 1\\}", T), ("\\{5\\}", "5", F), ("(15,-29)", "(15, -29)", T),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", T),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty, 2] \\cup [3, \\infty)", F), ("(5,\\infty)", "(5, \\infty)", T),
    ("(5,\\infty)", "[5,\\infty)", F), ("(2,12) \\cup (12,102)", "(2,12)\\cup(12,102)", T),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", T), ("(3, \\frac{\\pi}{2})", "(3, \\frac{\\pi}{3})", F),
    ("$(\\frac{1}{4}, \\frac{1}{27})$", "(0.25, \\frac{1}{27})", T),
    ("$(4, \\log _{10} 2)$", "(4, \\frac{\\ln 2}{\\ln 10})", T),
    ("$(1,1), (3,2)$", "(3,2),(1,1)", T), ("(1,1), (3,2)", "(1,1),(2,3)", F),
    ("$(-6,6)$, $(2,6)$", "(2,6), (-6,6)", T),
    ("(0,\\frac{1}{2}]", "(0, 0.5]", T), ("$(-\\infty, 0) \\cup\\{1\\}$.", "(-\\infty,0)\\cup\\{1\\}", T),
    ("$2,-\\log _{10} 250$", "-\\log_{10}250, 2", T), ("\\frac{100!}{2^{50}}", "\\frac{100!}{2^{49}}", F),
    ("(1,2,3)", "(1,2)", F),
    # bare lists of solutions
    ("-2,1", "1,-2", T), ("-2,1", "-2", F), ("$64,\\frac{1}{4}$", "\\frac14, 64", T),
    ("8,32,44,68,80", "8, 32, 44, 68, 80", T),
    ("1, 2, 3", "1, 2, 4", F), ("1,1,2", "1,2,2", F), ("3, 5", "5,3", T),
    # matrices and vectors
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}", T),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix}-1&0\\\\0&1\\end{pmatrix}", F),
    ("\\begin{pmatrix} -18 \\\\ -49 \\\\ 96 \\end{pmatrix}", "\\begin{pmatrix}-18\\\\-49\\\\96\\end{pmatrix}", T),
    ("\\begin{pmatrix} 1/2 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} \\frac{1}{2} \\\\ 3 \\end{pmatrix}", T),
    ("\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 3 \\\\ 1 \\end{pmatrix}", F),
    # equations and symbolic answers
    ("y=2x+3", "2x+3", T), ("y = 2x+3", "y=3+2x", T), ("$k=2 n-1$", "2n-1", T), ("$f(n) = 2 n+1007$", "2n+1007", T),
    ("$p(x)=\\frac{(x-1)(x-2)}{6}$", "\\frac{x^2-3x+2}{6}", T), ("$f(z)=z$", "z", T),
    ("x^5 - x^4 + x^3 - x^2 + x - 1", "x^5-x^4+x^3-x^2+x-1", T), ("x^2+2x+1", "(x+1)^2", T), ("x^2", "x^3", F),
    ("$2RC+R+C$", "R+C+2RC", T), ("2RC+R+C", "2RC+R", F), ("$\\frac{1}{2 n+2}$", "\\frac{1}{2(n+1)}", T),
    ("\\frac{1}{2n+2}", "\\frac{1}{2n+1}", F), ("$k\\left(4 k^{2}+k-1\\right) / 2$", "\\frac{4k^3+k^2-k}{2}", T),
    ("2^{k}", "2k", F), ("x", "y", F), ("2x", "2X", F), ("a_1+a_2", "a_2+a_1", T), ("a_1", "a_2", F),
    ("\\binom{2n}{n}", "\\binom{2n}{n}", T), ("$n^{2}+1$", "1+n^2", T), ("\\alpha+\\beta", "\\beta+\\alpha", T),
    ("\\left(\\frac{t^{2}}{2}-t+C\\right) e^{-t}", "(\\frac{t^2}{2}-t+C)e^{-t}", T), ("x^2-1", "(x-1)(x+1)", T),
    ("\\frac{x}{2}", "\\frac{2}{x}", F),
    # text and multiple choice
    ("\\text{(B)}", "B", T), ("(B)", "b", T), ("B", "C", F), ("\\text{Monday}", "monday", T),
    ("\\text{yes}", "No", F),
    ("\\textbf{odd}", "odd", T), ("\\text{no solution}", "No Solution", T), ("\\text{even}", "\\text{odd}", F),
    # degrees
    ("76^\\circ", "76", T), ("75^{\\circ}", "75", T), ("41.8^\\circ", "41.8", T), ("90°", "90", T),
    ("30^\\circ", "60", F),
    ("$4^{\\circ}$", "4", T),
    # other bases, infinity, empty
    ("2516_8", "2516_8", T), ("2516_8", "2516", F), ("\\infty", "\\infty", T), ("-\\infty", "\\infty", F),
    ("", "0", F), ("0", "", F), ("", "", F), ("   ", " ", F),
]


@pytest.mark.parametrize("pred,ref,expected", CASES)
def test_is_equiv_table(pred, ref, expected):
    assert is_equiv(pred, ref) is expected
    assert is_equiv(ref, pred) is expected


def test_table_is_large():
    assert len(CASES) >= 150
    assert sum(e for _, _, e in CASES) > 50 and sum(not e for _, _, e in CASES) > 50


def test_distinct_variables_never_coincide():
    letters = [c for c in "abcdfghjklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]  # not e or i: constants
    assert not any(is_equiv(f"2{a}", f"2{b}") for a in letters for b in letters if a != b)
    assert all(is_equiv(f"2{a}", f"{a}+{a}") for a in letters)


def test_non_strings_are_never_equivalent():
    assert not is_equiv(None, "1") and not is_equiv("1", None) and not is_equiv(1, 1)


def _cpu_ms(fn, *args):  # this thread's CPU time: idle torch threads spinning after a test do not count
    grader._key.cache_clear()  # time the uncached work
    start = time.thread_time()
    out = fn(*args)
    return out, (time.thread_time() - start) * 1e3


ADVERSARIAL = [
    "9^{9^{9^{9}}}", "10^{10^{10}}", "2^{10000}", "(10^{300})^{300}", "10^{999}\\cdot10^{999}", "1e999", "9" * 999,
    "\\boxed{" * 10_000, "{" * 10_000, "}" * 10_000, "(" * 2000 + ")" * 2000, "(" * 150 + "1" + ")" * 150,
    "\\sqrt" * 300 + "{2}", "2^" * 190 + "2", "-" * 399 + "1", "\\frac" * 80, "1+" * 199 + "1", "x" * 399 + "1",
    "\\pi" * 130, "1/0", "0^{-1}", "\\log 0", "\\tan(\\pi/2)", "400!", "1000!", "(400!)!", "\\binom{1000}{500}",
    "\\binom{10^{9}}{5}", "\\sqrt[10000]{2}", "\\sqrt[0]{2}", "e^{1000}", "\\exp(1000)", "\\sin(10^{300}i)",
    "x_{" + "a" * 300, "1," * 2500, "\\{" * 1000 + "\\}" * 1000, "\\left(" * 1000, "\\text{" * 2000 + "}" * 2000,
    "a\x00b", "\x00" * 1000, "\ud800", "\udfff\ud800x^2", "1" * 100_000, " " * 100_000, "$" * 100_000,
    ("\\frac{" * 50 + "1" + "}{2}" * 50), "(" + ",".join(["(x,y)"] * 60) + ")", ",".join(["x"] * 200),
    ",".join(["\\{1,2\\}"] * 40), "\\begin{pmatrix}" + "1&" * 150 + "\\end{pmatrix}", "0.5" * 1000,
    "1" + "^{1}" * 120, "\\sqrt[3]{" * 40 + "1" + "}" * 40, "e" * 300 + "5", "1e5" * 100, "x!" * 100, "5!!!!!!!!",
]


@pytest.mark.parametrize("i", range(len(ADVERSARIAL)))
def test_adversarial_inputs_are_fast_and_safe(i):
    s = ADVERSARIAL[i]
    for other in ("1", s, s[:-1] + "2", "\\frac12"):
        out, ms = _cpu_ms(is_equiv, s, other)
        assert isinstance(out, bool) and ms < 50, (s[:40], other[:40], ms)
    out, ms = _cpu_ms(extract_boxed, s)
    assert (out is None or isinstance(out, str)) and ms < 50
    out, ms = _cpu_ms(extract_gsm8k, s)
    assert (out is None or isinstance(out, str)) and ms < 50
    vote, ms = _cpu_ms(majority_vote, [s, s, "1", None])
    assert 0.0 <= vote.p <= 1.0 and ms < 50


def test_adversarial_values():
    assert not is_equiv("9^{9^{9^{9}}}", "9^{9^{9^{8}}}")
    assert is_equiv("9^{9^{9^{9}}}", "9^{9^{9^{9}}}")  # equal strings, never evaluated
    assert extract_boxed("\\boxed{" * 10_000) is None
    assert extract_boxed("\\boxed{" * 10_000 + "7" + "}") == "7"  # the innermost (last) box
    assert not is_equiv("1" * 100_000, "1" * 99_999)
    assert is_equiv("1" * 100_000, "1" * 100_000)
    assert is_equiv("400!", "400!") and is_equiv("5!", "120")


FUZZ_PIECES = [
    "\\frac", "\\dfrac", "\\sqrt", "{", "}", "(", ")", "[", "]", "^", "_", "\\left", "\\right", "\\{", "\\}", ",", ".",
    "-", "+", "*", "/", "!", "\\pi", "e", "i", "x", "y", "0", "1", "2", "3", "9", "\\text{", "\\boxed{", "$", "\\%",
    "^\\circ", " ", "\\infty", "\\cup", "&", "\\\\", "\\begin{pmatrix}", "\\end{pmatrix}", "=", "\\log", "\\sin",
    "\\binom", "\\cdot", "e5", "1e300", "\x00", "\ud800", "é", "°", "####", "\\fbox", "\\sqrt[", "10^{", "cm", "\n",
]


def test_fuzz():
    rng = random.Random(0)
    strings = ["".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randrange(0, 40))) for _ in range(2000)]
    strings += [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60))).decode("utf-8", "surrogateescape")
                for _ in range(300)]
    worst = 0.0
    for s in strings:
        t = rng.choice(strings)
        took = []  # CPU seconds of each try. A case over the bound is timed once more, from cold caches again: a
        # pathological input is slow every time, a stall of the machine once (in the full suite a case read 0.19 s)
        while not took or (took[-1] >= 0.05 and len(took) < 2):
            grader._key.cache_clear()
            start = time.thread_time()
            same, forth, back = is_equiv(s, s), is_equiv(s, t), is_equiv(t, s)
            boxed, gsm = extract_boxed(s), extract_gsm8k(s)
            vote = majority_vote([s, t, None, s])
            took.append(time.thread_time() - start)
        majority, p = vote.majority, vote.p
        worst = max(worst, min(took))
        assert same == bool(grader._key(s)[0]) == is_answer(s)  # reflexive unless the answer normalises to nothing
        assert forth == back
        assert boxed is None or isinstance(boxed, str)
        assert gsm is None or isinstance(gsm, str)
        assert 0.0 <= p <= 1.0 and (majority is None) == (p == 0.0)
    assert worst < 0.05


def test_extract_boxed():
    assert extract_boxed("The answer is \\boxed{5}.") == "5"
    assert extract_boxed("$\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed{a} \\fbox{b}") == "b" and extract_boxed("\\fbox{b} \\boxed{a}") == "a"
    assert extract_boxed("so $\\boxed 5$.") == "5"
    assert extract_boxed("\\boxed 12\nmore text") == "12"
    assert extract_boxed("\\boxed {12}") == "12"
    assert extract_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_boxed("\\boxed{\\text{(B)}}") == "\\text{(B)}"
    assert extract_boxed("\\boxed{\\boxed{3}}") == "3"
    assert extract_boxed("s=\\boxed{4.4e7} ferrets") == "4.4e7"
    assert extract_boxed("\\boxed{ \\left( 3, \\frac{\\pi}{2} \\right) }") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_boxed("{" * 100_000 + "\\boxed{1}") == "1"
    missing = ["no box here", "\\boxed{", "\\boxed{}", "\\boxed{  }", "\\boxed{1", "\\boxedx", "", "\\boxed", None, 5]
    for text in missing:
        assert extract_boxed(text) is None, text


def test_extract_gsm8k():
    assert extract_gsm8k("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert extract_gsm8k("#### 1,000") == "1000"
    assert extract_gsm8k("####  -3 ") == "-3"
    assert extract_gsm8k("a #### 1\nb #### 2") == "2"
    assert extract_gsm8k("#### 5.\n") == "5"
    for text in ["no answer", "#### ", "####", None]:
        assert extract_gsm8k(text) is None
    assert is_equiv("18.0", extract_gsm8k("#### 18"))


def test_is_answer():
    for a in ["5", "0", "\\frac{1}{2}", "x", "\\text{(B)}", " 7 "]:
        assert is_answer(a), a
    for a in [None, "", "   ", "$ $", "\\text{}", "\\,", 5, ["5"]]:  # missing, blank, or nothing left after normalising
        assert not is_answer(a), a


def test_a_raw_response_is_compared_by_what_it_boxes():
    assert is_equiv("\\boxed{7}", "7") and is_equiv("7", "\\boxed{7}")
    assert is_equiv("so the answer is $\\boxed{\\frac{1}{2}}$.", "0.5")
    assert not is_equiv("\\boxed{8}", "7") and not is_equiv("\\boxed{}", "7")
    assert is_equiv("first \\boxed{3}, then \\boxed{7}", "7")  # the last box, as extract_boxed reads it
