r"""Answer grader: pull the final answer out of a response and decide whether two answers are equivalent (the
majority vote, the Solver's reward `is_equiv(boxed, pseudo_label)`, evaluation).

How `is_equiv` decides:
  1. Normalise both: LaTeX spacing and sizing, $ wrappers, \text{} \mathrm{} \mbox{}, trailing unit words, degrees,
     %, \$, thousands separators, `x =` / `f(x) =` prefixes, \dfrac, \frac12, trailing dots. Equal strings are equal.
  2. Structure: tuples and intervals compare element by element with the same brackets ((1,2) is not [1,2]); sets
     \{...\} and bare lists ("-2, 1") ignore order; \cup unions and matrices part by part.
  3. A recursive-descent evaluator reads each element: rationals stay exact (0.5 == \frac12, 27.0 == 27, but
     0.333 != 1/3), irrational values are complex floats within relative tolerance 1e-9, variables take 3 fixed
     pseudo-random values (x^2+2x+1 == (x+1)^2).
  4. Otherwise compare as text, ignoring case for single words: \text{(B)} == b.

Departure from the authors' code: their math_verify / sympy can hang (9^{9^{9^9}}). This grader, with no sympy and
no eval/exec, is bounded in time by construction (the MAX_* limits below; what overflows is compared as text).
"""
import cmath
import math
import re
import zlib
from fractions import Fraction
from functools import lru_cache

MAX_INPUT = 5000  # longer raw answers are compared as stripped strings only
MAX_LEN = 400  # longer normalised answers are never parsed (the longest benchmark answer is ~180)
MAX_DEPTH = 32  # nesting the evaluator accepts (each level costs ~5 Python frames)
MAX_EXP = 10_000  # largest |exponent| or root index
MAX_BITS = 3400  # exact rationals past this (about 1e1000) become floats
REL_TOL, ABS_TOL = 1e-9, 1e-12
N_POINTS = 3  # evaluation points for answers with variables


_BOX = re.compile(r"\\(?:boxed|fbox) *")
_BRACE = re.compile(r"[{}]")


def extract_boxed(text):
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces) or `\\boxed 5`; None if absent or empty."""
    if not isinstance(text, str) or (i := max(text.rfind("\\boxed"), text.rfind("\\fbox"))) < 0:
        return None
    box = _BOX.match(text, i)
    if text.startswith("{", j := box.end()):
        depth = 0
        for m in _BRACE.finditer(text, j):
            depth += 1 if m[0] == "{" else -1
            if depth == 0:
                return text[j + 1 : m.start()].strip() or None
        return None  # unbalanced, e.g. a response cut off inside the box
    if box[0].endswith(" "):  # "\boxed 5": the answer runs to the closing $ or the end of the line
        return re.split(r"[$\n]", text[j:], maxsplit=1)[0].strip() or None
    return None


def extract_gsm8k(text):
    """The GSM8K reference answer after the last `####`, commas removed; None if absent."""
    if not isinstance(text, str) or (i := text.rfind("####")) < 0:
        return None
    return text[i + 4 :].partition("\n")[0].replace(",", "").strip().rstrip(".") or None


_SPACING = re.compile(r"\\\\|\\[,;:! ]|~|\\q?quad(?![a-zA-Z])")
_SIZING = re.compile(r"\\(?:left|right|[bB]igg?[lr]?|displaystyle)(?![a-zA-Z])")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|°")
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|boldsymbol|mbox|"
                      r"operatorname)\s*\{([^{}]*)\}")
_UNIT = re.compile(
    r"(?:units?|sq|square|cubic|per|cm|mm|km|m|meters?|metres?|inch(?:es)?|in|feet|foot|ft|yards?|miles?|mph|"
    r"seconds?|secs?|s|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|dollars?|cents?|degrees?|"
    r"pounds?|lbs?|ounces?|oz|kg|grams?|g|liters?|litres?|ml|l|cups?|gallons?)(?:\^\{?[23]\}?)?\.?", re.IGNORECASE)
_CMD_SPACE = re.compile(r"(\\[a-zA-Z]+) (?=[a-zA-Z])")  # "\pi r" must not become the command "\pir"
_PREFIX = re.compile(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?=")
_ONE_CHAR_ARG = re.compile(r"(\\frac|\\sqrt|_) ?([0-9a-zA-Z])")  # \frac12 -> \frac{1}2, \log_28 -> \log_{2}8
_SECOND_ARG = re.compile(r"(\\frac\{[^{}]*\}) ?([0-9a-zA-Z])")  # \frac{1}2 -> \frac{1}{2}
_MATRIX = re.compile(r"\\begin\{([pbvBV]?matrix)\}(.*)\\end\{\1\}", re.DOTALL)


def _normalise(s):
    s = s.replace("\\$", " ").replace("$", " ")
    s = _SPACING.sub(lambda m: m[0] if m[0] == "\\\\" else " ", s)  # "\\" is a matrix row break: keep it
    s = _SIZING.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s).replace("\\%", "").replace("%", "").replace("{,}", ",")
    for _ in range(4):  # \text{\textbf{x}} needs two passes
        s = _WRAPPER.sub(r"\1", s)
    words = s.split()
    for _ in range(4):  # "15 cm^2", "10 miles per hour": drop trailing unit words after a number
        if len(words) > 1 and _UNIT.fullmatch(words[-1]) and any(c.isdigit() for w in words[:-1] for c in w):
            words.pop()
    s = _CMD_SPACE.sub("\\1\t", " ".join(words)).replace(" ", "").replace("\t", " ").rstrip(".")
    for _ in range(3):
        if s.startswith("{") and s.endswith("}") and _split_top(s[1:-1], ",") is not None:
            s = s[1:-1]
    if (m := _PREFIX.match(s)) and s.count("=") == 1:
        s = s[m.end() :]
    if re.fullmatch(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?", s):  # thousands separators: 1,000,000
        s = s.replace(",", "")
    if m := re.fullmatch(r"\(([A-Za-z])\)", s):  # a choice: (B)
        s = m[1]
    return _SECOND_ARG.sub(r"\1{\2}", _ONE_CHAR_ARG.sub(r"\1{\2}", s))


def _split_top(s, sep):
    """Split s at separators outside any bracket; None if the brackets do not balance."""
    parts, depth, start = [], 0, 0
    for m in re.finditer(r"[(\[{]|[)\]}]|" + re.escape(sep), s):
        if m[0] in "([{":
            depth += 1
        elif m[0] in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0:
            parts.append(s[start : m.start()])
            start = m.end()
    return parts + [s[start:]] if depth == 0 else None


def _tree(s, depth=0):
    """The parsed answer: ("=", text, values) for one element, or (kind, children) with kind "()", "[)", "{}"
    (a set), ... for brackets, "L" for a bare list, "U" for a union, "M"/"R" for a matrix and its rows."""
    if depth > 4 or len(s) > MAX_LEN:
        return _leaf(s)
    if m := _MATRIX.fullmatch(s):
        rows = [r for r in m[2].split("\\\\") if r]
        return ("M", tuple(("R", tuple(_tree(c, depth + 1) for c in r.split("&"))) for r in rows))
    for sep, kind in (("\\cup", "U"), (",", "L")):
        if (parts := _split_top(s, sep)) and 1 < len(parts) <= 64:
            return (kind, tuple(_tree(p, depth + 1) for p in parts))
    if len(s) >= 4 and s.startswith("\\{") and s.endswith("\\}"):
        kind, inner = "{}", s[2:-2]
    elif len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        kind, inner = s[0] + s[-1], s[1:-1]
    else:
        return _leaf(s)
    parts = _split_top(inner, ",")  # None: the outer brackets do not enclose everything, e.g. (1)+(2)
    if parts is None or len(parts) > 64 or (kind != "{}" and len(parts) == 1):
        return _leaf(s)
    return (kind, tuple(_tree(p, depth + 1) for p in parts))


def _leaf(s):  # normalised answers over MAX_LEN are never parsed
    return ("=", s.lower() if s.isalpha() else s, _evaluate(s) if len(s) <= MAX_LEN else None)


_TOKEN = re.compile(r"\\[a-zA-Z]+|[0-9]+(?:\.[0-9]*)?(?:e[-+]?[0-9]{1,3})?|\.[0-9]+(?:e[-+]?[0-9]{1,3})?|\S")
_FUNCS = {"ln": cmath.log, "log": cmath.log, "exp": cmath.exp, "sin": cmath.sin, "cos": cmath.cos,
          "tan": cmath.tan, "arcsin": cmath.asin, "arccos": cmath.acos, "arctan": cmath.atan}
_GREEK = {"alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "phi", "rho", "sigma", "tau", "omega"}
_ATOM_CMDS = {"\\frac", "\\sqrt", "\\binom", "\\pi"} | {"\\" + n for n in (*_FUNCS, *_GREEK)}
_CONSTANTS = {"\\pi": complex(math.pi), "e": complex(math.e), "i": 1j}


def _starts_atom(t):
    return bool(t) and (t[0] in "0123456789.({" or t in _ATOM_CMDS or (t.isascii() and t.isalpha()))


class _Refuse(Exception):
    """The evaluator cannot read this expression, or it is out of bounds: compare it as text instead."""


def _require(ok):
    if not ok:
        raise _Refuse


def _num(x):
    """Keep a value bounded: an exact Fraction below 2**MAX_BITS, else a finite complex below 1e300."""
    if type(x) is Fraction and max(x.numerator.bit_length(), x.denominator.bit_length()) <= MAX_BITS:
        return x
    x = complex(x)
    _require(abs(x) < 1e300)  # also rejects inf and nan
    return x


def _is_int(x, low, high):
    return type(x) is Fraction and x.denominator == 1 and low <= x <= high


def _pow(a, b):
    _require(abs(complex(b)) <= MAX_EXP)  # 9^{9^{9^9}} stops here
    if type(a) is Fraction and _is_int(b, -MAX_EXP, MAX_EXP):
        if max(a.numerator.bit_length(), a.denominator.bit_length()) * abs(b) <= 2 * MAX_BITS:
            return _num(a ** int(b))  # exact, and at most twice MAX_BITS long before _num rounds it
    return _num(complex(a) ** complex(b))


class _Parser:
    """expr := term (+|- term)*; term := unary ((* | / | implicit) unary)*; unary := (+|-)* power;
    power := atom !* [^ arg]; arg := [-] atom. Variables take fixed values at evaluation point k."""

    def __init__(self, tokens, k):
        self.toks, self.i, self.k, self.depth, self.has_variables = tokens + [""], 0, k, 0, False

    def take(self, want=None):  # refuses the "" that ends self.toks, so self.i never runs past it
        t = self.toks[self.i]
        _require(t and (want is None or t == want))
        self.i += 1
        return t

    def accept(self, *options):  # the next token, consumed, if it is one of options, else ""
        return self.take() if self.toks[self.i] in options else ""

    def parse(self):
        v = self.expr()
        _require(not self.toks[self.i])
        return v

    def expr(self):
        v = self.term()
        while op := self.accept("+", "-"):
            v = _num(v + self.term() if op == "+" else v - self.term())
        return v

    def term(self):
        v = self.unary()
        while True:
            if self.accept("*", "\\cdot", "\\times"):
                v = _num(v * self.unary())
            elif self.accept("/", "\\div"):
                v = _num(v / self.unary())
            elif _starts_atom(self.toks[self.i]):
                v = _num(v * self.power())  # implicit product: 2\sqrt{3}, 2x, (1+i)(1-i)
            else:
                return v

    def unary(self):
        negative = False
        while op := self.accept("+", "-"):
            negative ^= op == "-"
        return -self.power() if negative else self.power()

    def power(self):
        v = self.atom()
        while self.accept("!"):
            _require(_is_int(v, 0, 400))  # 400! < 2**MAX_BITS
            v = Fraction(math.factorial(int(v)))
        return _pow(v, self.arg()) if self.accept("^") else v

    def group(self, close):  # an expression, then its closing bracket
        v = self.expr()
        self.take(close)
        return v

    def arg(self):
        return -self.atom() if self.accept("-") else self.atom()

    def atom(self):
        self.depth += 1  # every recursion passes through here, so this counter bounds the Python stack
        _require(self.depth <= MAX_DEPTH)
        v = self._atom(self.take())
        self.depth -= 1
        return v

    def _atom(self, t):
        if t[0] in "0123456789.":
            return _num(Fraction(t))
        if t in _CONSTANTS:
            return _CONSTANTS[t]
        if t in ("(", "{"):
            return self.group(")" if t == "(" else "}")
        if t == "\\frac":
            return _num(self.arg() / self.arg())
        if t == "\\sqrt":
            n = self.group("]") if self.accept("[") else Fraction(2)
            x = self.arg()
            _require(_is_int(n, 2, MAX_EXP))
            x, n = complex(x), int(n)
            if x.imag == 0 and x.real < 0 and n % 2:  # the real odd root, \sqrt[3]{-8} = -2
                return _num(-((-x.real) ** (1 / n)))
            return _num(x ** (1 / n))
        if t == "\\binom":
            n, k = self.arg(), self.arg()
            _require(_is_int(n, 0, 1000) and _is_int(k, 0, 1000))
            return _num(Fraction(math.comb(int(n), int(k))))
        if t[0] == "\\" and t[1:] in _FUNCS:  # \sin^2 x, \log_{10} 2, \ln(x)
            p = self.arg() if self.accept("^") else None
            base = self.arg() if self.accept("_") else None
            v = _FUNCS[t[1:]](complex(self.power()))
            v = _num(v if base is None else v / cmath.log(base))
            return v if p is None else _pow(v, p)
        if (len(t) == 1 and t.isascii() and t.isalpha()) or (t[0] == "\\" and t[1:] in _GREEK):
            if self.accept("_"):  # a subscripted variable: a_{1}, x_{n}
                sub = self.take()
                while sub[0] == "{" and not sub.endswith("}"):
                    sub += self.take()
                t += "_" + sub
            self.has_variables = True  # its value at point k: fixed, pseudo-random, in [0.5, 2.5]
            return complex(0.5 + zlib.crc32(f"{t}/{self.k}".encode("utf-8", "surrogatepass")) % 100_003 / 50_000)
        raise _Refuse


def _evaluate(s):
    """Values of an expression at the N_POINTS evaluation points (all equal without variables), or None."""
    if m := re.fullmatch(r"(-?)([0-9]+)\\frac\{([0-9]+)\}\{([0-9]+)\}", s):  # a mixed number: 2\frac{1}{2}
        s = f"{m[1]}({m[2]}+\\frac{{{m[3]}}}{{{m[4]}}})"
    tokens = _TOKEN.findall(s)
    try:
        first = _Parser(tokens, 0)
        value = first.parse()
        if not first.has_variables:
            return (value,) * N_POINTS
        return (value, *(_Parser(tokens, k).parse() for k in range(1, N_POINTS)))
    except (_Refuse, ArithmeticError, ValueError, TypeError):
        return None


def _close(x, y):
    if type(x) is Fraction and type(y) is Fraction:
        return x == y
    try:
        x, y = complex(x), complex(y)
        return abs(x - y) <= REL_TOL * max(abs(x), abs(y)) + ABS_TOL
    except OverflowError:  # an exact number beyond float range against a float
        return False


def _eq(a, b):
    if a[0] == b[0] == "=":
        return bool(a[1]) and (a[1] == b[1] or (None not in (a[2], b[2]) and all(map(_close, a[2], b[2]))))
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    if a[0] in ("{}", "L"):  # order-free: greedily match each element to an unused equivalent one
        rest = list(b[1])
        for x in a[1]:
            j = next((j for j, y in enumerate(rest) if _eq(x, y)), None)
            if j is None:
                return False
            del rest[j]
        return True
    return all(map(_eq, a[1], b[1]))


@lru_cache(maxsize=4096)
def _key(answer):
    """(normalised string, parsed tree); cached because a majority vote compares each answer many times."""
    if len(answer) > MAX_INPUT:
        s = answer.strip()
        return s, ("=", s, None)
    if "\\boxed" in answer or "\\fbox" in answer:  # a whole response, or a boxed answer: compare what is boxed
        answer = extract_boxed(answer) or ""
    s = _normalise(answer)
    return s, _tree(s)


def is_answer(a):
    """True iff a is a string that normalises to something (a missing or blank answer is not one)."""
    return isinstance(a, str) and bool(_key(a)[0])


def is_equiv(pred, ref):
    """True iff the two final answers are mathematically equivalent. Non-strings are never equivalent."""
    if not (isinstance(pred, str) and isinstance(ref, str)):
        return False
    a, b = _key(pred), _key(ref)
    return bool(a[0]) and (a[0] == b[0] or _eq(a[1], b[1]))
