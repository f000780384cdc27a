"""The toy world: a tiny tokenizer and a 0.4M-parameter Qwen3 base model (hidden 128, 2 layers) that `python train.py`
runs R-Zero on, on a CPU. It ships in toy_world/ (`--model toy`), the same on every machine (pretraining is chaotic:
a world rebuilt by `python toy.py` is this machine's own), pretrained on synthetic arithmetic in R-Zero's two formats:
challenger_prompt + `<question>What is 379 * 4?</question>\\boxed{1516}`, solver_prompt(problem) +
`300*4=1200 70*4=280 9*4=36 1200+0280=1480 1480+0036=1516 \\boxed{1516}`, saved as an ordinary Hugging Face folder.

Why this world (README, "The method"): the Solver step only sharpens a model toward its own majority vote, so the
base Solver must gain from voting: long worked chains, where one slip at temperature 1 ruins a sample and the vote
recovers the answer. 4 levels give the Challenger a range to aim in; its documents are mostly easy (32:8:2:1; the
Solver's are even), so the run depends on the Challenger learning to aim (with 8:4:2:1 an untrained Challenger did
nearly as well). 2 layers and 1000 steps: the shipped build was chosen among candidates by measurement (README).

The checker (`solve`, `check_answer`, `difficulty`, `heldout_problems`) never evals and is for MEASUREMENT ONLY: no
training signal uses it. Held-out problems (a hash rule) are never pretraining documents; a Challenger may write one.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import time
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import challenger
import engine
import sample
import solver
from model import ModelConfig, Transformer
from runtime import atomic, read_json, read_jsonl, resolve_model, write_text

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # PAD, turn start, EOS (Qwen's names)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LEVELS = {  # level -> (lo, hi) ranges of its product terms: a k-digit number times a digit, worked by place value
    1: [[(10, 99), (2, 9)]],         # 47 * 6       40*6=240 7*6=42 240+042=282                       3 steps
    2: [[(100, 999), (2, 9)]],       # 379 * 4      300*4=1200 70*4=280 9*4=36 1200+0280=1480 ...     5
    3: [[(1000, 9999), (2, 9)]],     # 5379 * 4                                                       7
    4: [[(10000, 99999), (2, 9)]],   # 25379 * 4                                                      9
}
HELDOUT_MOD = 4  # a problem is held out iff crc32(its expression) % HELDOUT_MOD == 0
WORLD_SHA256 = "ed2ed6b149fe8e01800f08ec44a890838164ebc9e805393c68389c3851fd973e"  # toy_world/model.safetensors
BUILD_VERSION = 2  # in the cache key: bump when a change to model.py alters what pretraining computes


@dataclass
class ToyConfig:
    seed: int = 1                   # the shipped world's (README, "The toy world")
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    steps: int = 1000               # pretraining optimizer steps
    batch_size: int = 12            # rows of packed documents per step
    seq_len: int = 256              # tokens per row
    lr: float = 3e-3                # peak, linear warmup then cosine to lr / 10
    warmup: int = 50
    challenger_frac: float = 0.15   # share of Challenger documents; the rest are Solver documents
    levels: tuple = (1, 1, 1, 1)    # sampling weight of each level in Solver documents
    challenger_levels: tuple = (32, 8, 2, 1)  # ... and in Challenger documents: mostly easy (see the docstring)


def render(terms: list[list[int]]) -> str:
    return "What is " + " + ".join(" * ".join(map(str, t)) for t in terms) + "?"


def parse(problem: str) -> list[list[int]] | None:
    """'What is 52 + 379 * 4?' (or a bare '52+379*4') -> [[52], [379, 4]]; None if not a toy problem."""
    if not isinstance(problem, str) or len(problem) > 120:
        return None
    m = re.fullmatch(r"\s*(?:what is\s+)?([0-9+*\s]+?)\s*\??\s*", problem, flags=re.IGNORECASE)
    if not m or not re.fullmatch(r"\d+(\s*[+*]\s*\d+)*", m.group(1)):
        return None
    terms = [[n.strip() for n in t.split("*")] for t in m.group(1).split("+")]
    nums = [n for t in terms for n in t]
    if len(nums) > 8 or any(len(n) > 6 or (n[0] == "0" and n != "0") for n in nums):
        return None  # bounded by construction: the checker can never be slow
    return [[int(n) for n in t] for t in terms]


def _multiply(x: int, y: int) -> tuple[list[str], int]:
    """x * y by place value of the longer factor: 379*4 -> 300*4=1200 70*4=280 9*4=36 1200+280=1480 ..."""
    if len(str(y)) > len(str(x)):
        x, y = y, x
    s = str(x)
    parts = [int(d) * 10 ** (len(s) - 1 - i) for i, d in enumerate(s) if d != "0"] or [0]
    steps = [f"{p}*{y}={p * y}" for p in parts]
    acc = parts[0] * y
    for p in parts[1:]:
        steps.append(_add(acc, p * y))
        acc += p * y
    return steps, acc


def _add(a: int, b: int) -> str:
    """'4500+0450=4950': zeros line up the digits as in a column sum (unaligned sums a tiny model learns slowest)."""
    w = max(len(str(a)), len(str(b)))
    return f"{a:0{w}d}+{b:0{w}d}={a + b}"


def worked_solution(problem: str) -> str | None:
    """The canonical worked answer the Solver documents teach: one step per partial product or sum."""
    terms = parse(problem)
    if terms is None:
        return None
    steps, values = [], []
    for t in terms:
        acc = t[0]
        for f in t[1:]:
            s, acc = _multiply(acc, f)
            steps += s
        values.append(acc)
    acc = values[0]
    for v in values[1:]:
        steps.append(_add(acc, v))
        acc += v
    return " ".join(steps + [f"\\boxed{{{acc}}}"])


def solve(problem: str) -> int | None:
    terms = parse(problem)
    if terms is None:
        return None
    return sum(math.prod(t) for t in terms)


def difficulty(problem: str) -> int | None:
    """Number of worked steps of the canonical solution (1 for '47 + 38' .. 9 for '379 * 4 + 83 * 7')."""
    w = worked_solution(problem)
    return None if w is None else w.count("=")


def _last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    j = text.find("}", i)
    return text[i + 7:j].strip() if i >= 0 and j >= 0 else None


def check_answer(problem: str, answer_text: str) -> bool:
    """Ground truth: is the answer (a bare number, or a response whose last \\boxed{} holds it) right?"""
    truth = solve(problem)
    if truth is None or not isinstance(answer_text, str):
        return False
    ans = _last_boxed(answer_text) if "\\boxed{" in answer_text else answer_text
    ans = (ans or "").strip().replace(",", "").removesuffix(".0")
    return re.fullmatch(r"[+-]?\d{1,12}", ans) is not None and int(ans) == truth


def is_heldout(problem: str) -> bool:
    terms = parse(problem)
    return terms is not None and zlib.crc32(render(terms).encode()) % HELDOUT_MOD == 0


def sample_problem(level: int, rng: random.Random) -> str:
    return render([[rng.randint(lo, hi) for lo, hi in term] for term in LEVELS[level]])


def distinct_problems(n: int, seed: int, keep) -> list[str]:
    """n distinct problems for which keep(problem) holds, an equal share from each level (measurement only)."""
    rng, out, seen = random.Random(seed), [], set()
    for i in range(n):
        level = list(LEVELS)[i % len(LEVELS)]
        for _ in range(100_000):
            p = sample_problem(level, rng)
            if keep(p) and p not in seen:
                break
        else:
            raise ValueError(f"level {level} has too few such problems for n={n}")
        seen.add(p)
        out.append(p)
    return out


def heldout_problems(n: int = 512, seed: int = 1234) -> list[str]:
    return distinct_problems(n, seed, is_heldout)


def write_problems(path: str, n: int, seed: int = 99) -> None:
    """n distinct problems, not held out, the levels in turn, as JSON Lines {"problem": ...}: for --ttrl."""
    problems = distinct_problems(n, seed, lambda p: not is_heldout(p))
    write_text(path, "".join(json.dumps(dict(problem=p)) + "\n" for p in problems))


def build_tokenizer():
    """One token per character (digits read one by one make arithmetic learnable for a tiny model), but the chat
    roles, the fixed prompts and the format tags are single tokens: short documents pretrain faster."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + ["<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")  # "." matches any character but newline
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL_TOKENS])
    words = ["system", "user", "assistant", solver.SOLVER_SYSTEM, challenger.CHALLENGER_SYSTEM,
             challenger.CHALLENGER_USER, "<question>", "</question>", "\\boxed{", "What is "]
    tok.add_tokens([AddedToken(w, normalized=False) for w in words])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    t.chat_template = CHAT_TEMPLATE
    return t


def challenger_completion(problem: str) -> str:
    return f"<question>{problem}</question>\\boxed{{{solve(problem)}}}"


class Corpus:
    """An endless stream of pretraining documents (token ids), none of them a held-out problem."""

    def __init__(self, tokenizer, cfg: ToyConfig):
        self.tok, self.cfg, self.rng = tokenizer, cfg, random.Random(cfg.seed)
        self.challenger_ids = challenger.challenger_prompt(tokenizer)  # the same prompt for every Challenger document

    def problem(self, weights: tuple) -> str:
        while True:
            p = sample_problem(self.rng.choices(list(LEVELS), weights)[0], self.rng)
            if not is_heldout(p):
                return p

    def document(self, kind: str) -> list[int]:
        eos = [self.tok.eos_token_id]
        p = self.problem(self.cfg.challenger_levels if kind == "challenger" else self.cfg.levels)
        if kind == "challenger":
            return self.challenger_ids + self.tok.encode(challenger_completion(p)) + eos
        return solver.solver_prompt(self.tok, p) + self.tok.encode(worked_solution(p)) + eos

    def batches(self, rows: int, seq_len: int):
        """Endless (rows, seq_len + 1) batches cut from one stream of documents: no padding, every level in each."""
        buf = []
        while True:
            while len(buf) < rows * (seq_len + 1):
                buf += self.document("challenger" if self.rng.random() < self.cfg.challenger_frac else "solver")
            x, buf = buf[:rows * (seq_len + 1)], buf[rows * (seq_len + 1):]
            yield torch.tensor(x).view(rows, seq_len + 1)


def new_model(cfg: ToyConfig, tokenizer):
    mc = ModelConfig(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                     head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, tie_word_embeddings=True)
    hf = {**mc.to_hf(), "max_position_embeddings": 1024, "eos_token_id": tokenizer.eos_token_id,
          "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    model = Transformer(mc, hf)
    for name, p in model.named_parameters():  # GPT-2 style init; norms stay at 1
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return model


def pretrain(model, corpus: Corpus, cfg: ToyConfig, log_every: int = 100) -> list[float]:
    matrices = [p for p in model.parameters() if p.dim() == 2]  # no decay on norm gains: they set attention sharpness
    gains = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": gains, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    losses, t0, batches = [], time.time(), corpus.batches(cfg.batch_size, cfg.seq_len)
    model.train()
    for step in range(cfg.steps):
        warm = min(1.0, (step + 1) / cfg.warmup)
        cos = 0.5 * (1 + torch.cos(torch.tensor(step / max(1, cfg.steps) * torch.pi))).item()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warm * (0.1 + 0.9 * cos)
        x = next(batches)  # (B, T+1)
        logits = model(x[:, :-1])  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"pretrain step {step + 1}/{cfg.steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"({time.time() - t0:.0f}s, cpu {time.process_time():.0f}s)", flush=True)
    model.eval()
    return losses


def build_toy(out_dir: str, cfg: ToyConfig = ToyConfig(), log_every: int = 100) -> dict:
    """Tokenizer + pretrained base model into out_dir (written atomically). Returns build stats."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = new_model(cfg, tokenizer)
    losses = pretrain(model, Corpus(tokenizer, cfg), cfg, log_every)
    stats = {"config": asdict(cfg), "params": model.num_params(), "final_loss": sum(losses[-50:]) / len(losses[-50:]),
             "build_seconds": round(time.time() - t0, 1)}
    with atomic(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "toy.json"), "w") as f:
            json.dump(stats, f, indent=2)
    return stats


def cache_key(cfg: ToyConfig) -> str:
    """Changes with the settings, the prompts and the document formats, so any of them rebuilds the world."""
    p = "What is 379 * 4 + 83 * 7?"
    key = [BUILD_VERSION, asdict(cfg), challenger.CHALLENGER_SYSTEM, challenger.CHALLENGER_USER, solver.SOLVER_SYSTEM,
           CHAT_TEMPLATE, str(LEVELS), challenger_completion(p), worked_solution(p)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


def toy_path(rebuild: bool = False, cfg: ToyConfig = ToyConfig()) -> str:
    """A world built on this machine from cfg, cached by its settings (a few minutes on 2 cores)."""
    root = os.environ.get("RZERO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rzero"))
    path = os.path.join(root, f"toy-{cache_key(cfg)}")
    if rebuild or not os.path.isfile(os.path.join(path, "toy.json")):
        print(f"building a toy world into {path} (a few minutes) ...", flush=True)
        build_toy(path, cfg)
    return path


def heldout_accuracy(model, tokenizer, problems: list[str], k: int = 4, max_new_tokens: int = 192) -> dict:
    """A Solver's true greedy, mean@k and maj@k (at T = 1), overall and by difficulty: one call per mode."""
    prompts = [solver.solver_prompt(tokenizer, p) for p in problems]
    kw = dict(max_new_tokens=max_new_tokens, eos_ids=sample.eos_ids_of(tokenizer), tokenizer=tokenizer)
    greedy = engine.generate(model, prompts, n=1, temperature=0.0, **kw)
    sampled = engine.generate(model, prompts, n=k, temperature=1.0, seed=0, **kw)
    rows = []
    for p, g, s in zip(problems, greedy, sampled):
        answers = [_last_boxed(c.text or "") or None for c in s]
        maj = solver.majority_vote(answers).majority  # the method's vote: ties go to the answer seen first
        rows.append((difficulty(p), check_answer(p, g[0].text or ""),
                     sum(check_answer(p, a or "") for a in answers) / k, check_answer(p, maj or "")))

    def summary(rs):
        n = max(1, len(rs))
        return {"n": len(rs), "greedy": sum(r[1] for r in rs) / n, "mean_at_k": sum(r[2] for r in rs) / n,
                "maj_at_k": sum(r[3] for r in rs) / n}

    by_difficulty = {d: summary([r for r in rows if r[0] == d]) for d in sorted({r[0] for r in rows})}
    return summary(rows) | {"by_difficulty": by_difficulty}


def oracle_labels(records: list[dict]) -> list[dict]:
    """train.py --labels oracle (a ceiling, never the default): the kept problems labelled by the checker."""
    return [r | dict(pseudo_label=str(t)) for r in records if (t := solve(r["problem"])) is not None]


def question_stats(questions: list[str | None]) -> dict:
    """What a Challenger writes: the valid share, their difficulty (mean, histogram), the distinct share."""
    valid = [q for q in questions if q is not None and solve(q) is not None]
    diffs = [difficulty(q) for q in valid]
    hist = {d: diffs.count(d) for d in sorted(set(diffs))}
    return {"n": len(questions), "valid": len(valid) / max(1, len(questions)),
            "mean_difficulty": sum(diffs) / max(1, len(diffs)), "difficulty_hist": hist,
            "distinct": len(set(valid)) / max(1, len(valid))}


def measure(solver_path, iteration_dir=None, problems=512, k=4, max_new_tokens=192, device="cpu",
            dtype=torch.float32) -> dict:
    """The checker on what a run wrote: held-out accuracy, and for an iteration pseudo-label accuracy and questions."""
    from transformers import AutoTokenizer

    model = Transformer.from_pretrained(solver_path, dtype=dtype, device=device).eval().requires_grad_(False)
    res = heldout_accuracy(model, AutoTokenizer.from_pretrained(solver_path), heldout_problems(problems), k=k,
                           max_new_tokens=max_new_tokens)
    if iteration_dir:
        q = question_stats(read_json(os.path.join(iteration_dir, "questions.json")))
        kept = read_jsonl(os.path.join(iteration_dir, "dataset.jsonl"))
        right = [check_answer(r["problem"], r["pseudo_label"]) for r in kept]
        res |= dict(questions=q, difficulty=q["mean_difficulty"], distinct=q["distinct"],
                    pseudo_acc=sum(right) / max(1, len(right)))
    return res


def columns(k: int) -> list:
    """measure's numbers in train.py's summary table: (title, width, key, format)."""
    return [("pseudo acc", 11, "pseudo_acc", "{:.3f}"), ("q difficulty", 13, "difficulty", "{:.2f}"),
            ("q distinct", 11, "distinct", "{:.3f}"), ("greedy", 9, "greedy", "{:.3f}"),
            (f"mean@{k}", 9, "mean_at_k", "{:.3f}")]


def main():
    """Rebuild a toy world from scratch (this machine's own) and measure its base model, or measure a world folder."""
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--seed", type=int, default=ToyConfig.seed, help="pretraining seed (the shipped world's: default)")
    ap.add_argument("--measure", help="measure this world folder (toy: the shipped one) instead of rebuilding")
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    a = ap.parse_args()
    path = resolve_model(a.measure) if a.measure else toy_path(rebuild=True, cfg=ToyConfig(seed=a.seed))
    print(f"{path}: {read_json(os.path.join(path, 'toy.json'))}")
    if not a.measure:  # pretraining is chaotic: the CPU's float kernels decide which model comes out
        print(f"This world is this machine's own; `--model toy` is the shipped one everywhere (sha256 "
              f"{WORLD_SHA256[:12]}...). R-Zero on this one: python train.py --model {path}")
    tok, model = AutoTokenizer.from_pretrained(path), Transformer.from_pretrained(path).eval()
    t0 = time.time()
    res = heldout_accuracy(model, tok, heldout_problems(a.problems), k=a.k)
    print(f"held-out Solver ({time.time() - t0:.0f}s): greedy / mean@{a.k} / maj@{a.k} (T=1)")
    for d, r in [("all", res)] + list(res["by_difficulty"].items()):
        print(f"  difficulty {d:>3}: n={r['n']:4d}  {r['greedy']:.3f} / {r['mean_at_k']:.3f} / {r['maj_at_k']:.3f}")
    t0 = time.time()
    outs = engine.generate(model, [challenger.challenger_prompt(tok)], n=512, max_new_tokens=48, temperature=1.0,
                           top_p=0.99, eos_ids=sample.eos_ids_of(tok), tokenizer=tok, seed=0)
    qs = [challenger.parse_question(c.text) for c in outs[0]]
    st = question_stats(qs)
    print(f"base Challenger ({time.time() - t0:.0f}s): parsable {sum(q is not None for q in qs) / len(qs):.3f}, "
          f"valid {st['valid']:.3f}, distinct {st['distinct']:.3f}, mean difficulty {st['mean_difficulty']:.2f}, "
          f"difficulty histogram {st['difficulty_hist']}")


if __name__ == "__main__":
    main()
