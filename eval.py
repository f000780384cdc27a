r"""Evaluation: checkpoints side by side on the paper's benchmarks, in a table like the paper's.

    python eval.py --model toy --model runs/toy/iter3/solver --data toy
    python eval.py --model Qwen3-4B-Base --model runs/q4b/iter3/solver --data benchmarks/ --limit 50
    python eval.py --model M1 --model M2 --data benchmarks/ --k 32 --k-only amc aime   # the paper's protocol
    torchrun --nproc_per_node=8 eval.py --model M1 --model M2 --data benchmarks/         # data-parallel

Rows are models; columns are benchmarks, MATH AVG and, if any, GENERAL AVG (MMLU-Pro, SuperGPQA, BBEH). --out gets
results.md, results.json and every response (<model>/<benchmark>.jsonl), written once all is evaluated.

Protocol (README, "The method"; the authors' evaluation/*.py). Math: the Solver prompt (--raw-prompt: "Question:
...\nAnswer:"), greedy pass@1 or, with --k K, mean@K (--k-only: the benchmarks that use it), graded by
grader.is_equiv. General: the authors' user turn alone through the chat template, greedy, graded on the letter in
the last \boxed{} (multiple choice) or as eval_bbeh.py matches (BBEH).

Benchmarks (README): JSON Lines files, folders of them, or `toy`, the toy world's held-out problems; the first row
sets the kind: "choice" (an options / choices list), "bbeh" (a `task`, or "bbeh" in the name) or "math".

Departures from the authors: mean@k samples for real (temperature 0.6, top-p 0.95, Qwen3's recommended settings);
no LLM judge; a choice letter must be the box's own, and a response without one is wrong (theirs: a random letter).
"""
import glob
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import torch.distributed as dist

import engine
import grader
import sample
import solver
import toy
from model import Transformer, check_folder
from runtime import (device_and_dtype, gather, init_distributed, parse_settings, print0, rank, resolve_model, world,
                     write_text)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
REASON = "Please reason step by step, and put your final answer option within \\boxed{}."  # the authors' words
CHOICE_INSTRUCTION = REASON + (" Only put the option letter in the box, e.g. \\boxed{A}."
                               " There is only one correct answer.")
RAW_STOP = "\nQuestion:"  # a base model on a raw prompt goes on to invent the next question
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EvalConfig:
    """the evaluation"""
    model: list = field(default_factory=list)  # checkpoint folders, or toy (the toy world): one row each
    data: list = field(default_factory=list)  # JSON Lines files, folders of them, or toy (its held-out problems)
    out: str = "eval_out"  # results.md, results.json and every response
    k: int = 1  # 1 = greedy pass@1; K > 1 = mean@K over K sampled responses
    k_only: list | None = None  # name substrings of the benchmarks that use --k (the rest greedy); none: all
    temperature: float = 0.6  # of the K samples (Qwen3's recommended setting)
    top_p: float = 0.95  # of the K samples
    max_new_tokens: int = 4096  # token budget of a math answer
    general_max_new_tokens: int = 8192  # ... of a multiple-choice or BBEH answer, as the authors
    raw_prompt: bool = False  # "Question: ...\nAnswer:" for base models without a chat template
    question_field: str | None = None  # the question's field, where it is neither problem nor question
    answer_field: str | None = None  # the reference answer's field, where the usual ones are absent
    limit: int = 0  # the first N problems of each benchmark (0 = all; toy: 512)
    seed: int = 0  # problem i's responses are seeded seed + i (the same on any number of ranks)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    memory_budget_gb: float = 8.0  # KV-cache pages a sampling call may allocate


@dataclass
class Benchmark:
    name: str
    kind: str  # "math" | "choice" | "bbeh" (the last two: general domain)
    questions: list  # math: the problem; general: the whole user turn (options and instruction included)
    references: list  # answer strings, or option letters


def read_jsonl(path):
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        rows = None
    if rows is None or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} is not a JSON Lines file (one JSON object a line)")
    if not rows:
        raise ValueError(f"{path} holds no problems")
    return rows


def pick(row, names, override, what, where):
    names = [override] if override else names
    for name in names:
        if row.get(name) not in (None, "", []):
            return name
    raise ValueError(f"{where} has no {what} field (looked for {', '.join(names)}; set --{what}-field)")


def math_reference(value, name):
    if isinstance(value, list):
        return ", ".join(map(str, value))  # OlympiadBench: one answer in parts; the grader ignores their order
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # AMC23's 27.0; the grader reads it as 27
    if not isinstance(value, str):
        return None
    if "####" in value:
        return grader.extract_gsm8k(value)
    return grader.extract_boxed(value) if name == "solution" or "\\boxed" in value else value.strip()


def choice_reference(value, options):
    if isinstance(value, int) and not isinstance(value, bool):
        return LETTERS[value] if 0 <= value < len(options) else None
    if isinstance(value, str) and (m := re.fullmatch(r"\s*\(?([A-Z])\)?\s*", value)):
        return m[1]
    return LETTERS[options.index(value)] if value in options else None  # SuperGPQA: the option's text


def load_benchmark(path, cfg: EvalConfig) -> Benchmark:
    if path == "toy":
        problems = toy.heldout_problems(cfg.limit or 512)
        return Benchmark("toy", "math", problems, [str(toy.solve(p)) for p in problems])
    rows = read_jsonl(path)[: cfg.limit or None]
    name = re.sub(r"(\.test)?\.jsonl$", "", os.path.basename(path))
    kind = ("choice" if any(isinstance(rows[0].get(f), list) for f in ("options", "choices")) else
            "bbeh" if "bbeh" in name.lower() or "task" in rows[0] else "math")
    bench = Benchmark(name, kind, [], [])
    say = CHOICE_INSTRUCTION.replace("option letter", "letter") if "supergpqa" in name.lower() else CHOICE_INSTRUCTION
    for i, row in enumerate(rows, 1):
        where = f"{path} line {i}"
        q = row[pick(row, ("problem", "question"), cfg.question_field, "question", where)]
        if kind == "choice":  # the authors' form_options, then their instruction
            options = row[pick(row, ("options", "choices"), None, "options", where)]
            a = pick(row, ("answer_letter", "answer_index", "answer"), cfg.answer_field, "answer", where)
            ref = choice_reference(row[a], options)
            q = f"{q}\nOptions are:\n" + "".join(f"({L}): {o}\n" for L, o in zip(LETTERS, options)) + f"\n\n{say}"
        elif kind == "bbeh":
            a = pick(row, ("answer",), cfg.answer_field, "answer", where)
            ref = str(row[a]).strip() if isinstance(row[a], (str, int, float)) else None
            q = f"{q}\n\n{REASON}"
        else:
            a = pick(row, ("answer", "final_answer", "solution"), cfg.answer_field, "answer", where)
            ref = math_reference(row[a], a)
        if not ref or not isinstance(q, str):
            raise ValueError(f"{where}: cannot read a question and a reference answer (field {a!r})")
        bench.questions.append(q)
        bench.references.append(ref)
    return bench


def read_problems(path):
    """The problems of a JSON Lines file (its problem or question field), never an answer: train.py --ttrl."""
    out = []
    for i, r in enumerate(read_jsonl(path), 1):
        q = r[pick(r, ("problem", "question"), None, "question", f"{path} line {i}")]
        if not isinstance(q, str) or "options" in r or "choices" in r:
            raise ValueError(f"{path} line {i}: --ttrl takes free-answer problems (a text problem, no options)")
        out.append(q.strip())
    return out


def benchmark_paths(data):
    paths = []
    for d in data:
        if os.path.isdir(d):
            if not (found := sorted(glob.glob(os.path.join(d, "*.jsonl")))):
                raise ValueError(f"folder {d!r} holds no *.jsonl benchmark")
            paths += found
        elif d == "toy" or os.path.isfile(d):
            paths.append(d)
        else:
            raise FileNotFoundError(f"benchmark {d!r} does not exist")
    return paths


def extract_choice(text):
    """The option letter of the last \\boxed{}: B, (B), \\text{B}, B. text, B) text; None if there is none."""
    if (box := grader.extract_boxed(text)) is None:
        return None
    box = re.sub(r"\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", box).replace("$", "").strip()
    m = re.match(r"\(?([A-Z])\)?(?=$|[.):\s])", box) or re.fullmatch(r"\(?([a-z])\)?", box)
    return m[1].upper() if m else None


def extract_free(text):
    """BBEH's answer as eval_bbeh.py reads it: the last \\boxed{}, else the answer line, normalised; None if none."""
    lines = re.findall(r"Final Answer:([^\n]*)", text) or re.findall(r"The answer is:([^\n]*)", text)
    ans = (grader.extract_boxed(text) or (lines[-1] if lines else "")).strip()
    for prefix in ("The answer is:", "The final answer is ", "The final answer is: ", "The answer is "):
        ans = ans.split(prefix)[-1].strip()
    ans = ans.removesuffix(".")
    ans = ans[1:-1] if ans[:1] == ans[-1:] == "$" else ans
    for wrapper in ("boxed{", "text{", "texttt{"):
        if wrapper in ans and ans.endswith("}"):
            ans = ans[:-1].split(wrapper)[1]
    ans = ans.lower().replace(", ", ",").replace("**", "").split("\n")[0].removesuffix(".")
    return ans or None


def fuzzy_match(pred, ref):
    """eval_bbeh.py's match: equal; (a) vs a; equal numbers; equal without quotes; [x] vs x; a trailing "?"."""
    for a, b in ((pred, ref), (ref, pred)):
        if a != b and len(a) == 3 and a[0] + a[-1] == "()":  # (a) vs a: decides alone
            return a[1] == b
    try:
        number = float(pred) == float(ref)
    except ValueError:
        number = False
    return (pred == ref or number or pred.replace("'", "") == ref.replace("'", "") or f"[{ref}]" == pred
            or f"[{pred}]" == ref or pred.endswith("?") and pred[:-1] == ref)


def grade(kind, response, reference):
    """(extracted answer, correct)."""
    if kind == "choice":
        letter = extract_choice(response)
        return letter, letter == reference
    if kind == "bbeh":
        ans = extract_free(response)
        return ans, ans is not None and fuzzy_match(ans, reference.strip().lower().replace(", ", ","))
    ans = grader.extract_boxed(response)
    return ans, ans is not None and grader.is_equiv(ans, reference)


def k_of(bench, cfg):
    return cfg.k if cfg.k_only is None or any(s in bench.name for s in cfg.k_only) else 1


def prompt_ids(tokenizer, kind, question, raw=False):
    """Math: the Solver prompt. General: the authors' user turn alone, via the chat template, else "user: ..."."""
    if kind == "math":
        raw_text = f"Question: {question}\n{solver.SOLVER_SYSTEM}\nAnswer:"
        return tokenizer.encode(raw_text) if raw else solver.solver_prompt(tokenizer, question)
    text = "user: " + question
    if getattr(tokenizer, "chat_template", None) and not raw:
        msgs = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def evaluate(model, tokenizer, bench: Benchmark, cfg: EvalConfig) -> list[dict]:
    """Every problem's record, on every rank: problems are dealt out in turn (files are ordered by difficulty)."""
    k, r = k_of(bench, cfg), rank()
    mine = range(r, len(bench.questions), world())
    prompts = [prompt_ids(tokenizer, bench.kind, bench.questions[i], cfg.raw_prompt) for i in mine]
    math = bench.kind == "math"
    outs = engine.generate(
        model, prompts, n=k, max_new_tokens=cfg.max_new_tokens if math else cfg.general_max_new_tokens,
        temperature=cfg.temperature if k > 1 else 0.0, top_p=cfg.top_p if k > 1 else 1.0, tokenizer=tokenizer,
        eos_ids=sample.eos_ids_of(tokenizer), stop_strings=(RAW_STOP,) if cfg.raw_prompt and math else (),
        seed=[cfg.seed + i for i in mine], memory_budget=int(cfg.memory_budget_gb * 2**30), progress=r == 0) if prompts else []
    records = []
    for i, p, row in zip(mine, prompts, outs):
        responses = [c.text for c in row]
        answers, correct = map(list, zip(*(grade(bench.kind, t, bench.references[i]) for t in responses)))
        records.append(dict(id=i, prompt=tokenizer.decode(p), reference=bench.references[i], responses=responses,
                            answers=answers, correct=correct, score=sum(correct) / k))
    return sorted(gather(records), key=lambda rec: rec["id"])


def table(results, benches, cfg, cell, avgs=()):
    cols = [b.name + (f" (mean@{k_of(b, cfg)})" if k_of(b, cfg) > 1 else "") for b in benches] + list(avgs)
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, res in results.items():
        row = [cell(res[b.name]) for b in benches] + [f"{res[a]:.2f}" for a in avgs]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_config(argv=None) -> EvalConfig:
    cfg = parse_settings(EvalConfig, argv, description=__doc__.strip().split("\n\n")[0])
    if not cfg.model or not cfg.data or min(cfg.k, cfg.max_new_tokens, cfg.general_max_new_tokens) < 1 \
            or cfg.limit < 0 or cfg.temperature <= 0 or not 0 < cfg.top_p <= 1 or cfg.dtype not in DTYPES:
        raise ValueError("need --model and --data, --k, --max-new-tokens, --general-max-new-tokens >= 1, --limit >= 0,"
                         f" --temperature > 0, 0 < --top-p <= 1, --dtype one of {', '.join(DTYPES)}")
    return cfg


def model_names(paths):
    """The shortest path suffixes that tell the models apart, e.g. iter1/solver and iter2/solver."""
    parts = [os.path.normpath(p).split(os.sep) for p in paths]
    for d in range(1, max(map(len, parts)) + 1):
        if len(set(names := ["/".join(p[-d:]) for p in parts])) == len(names):
            return names
    raise ValueError("the same --model is given twice")


def run(cfg: EvalConfig):
    from transformers import AutoTokenizer

    benches = [load_benchmark(p, cfg) for p in benchmark_paths(cfg.data)]  # every input is checked before any work
    if len({b.name for b in benches}) < len(benches):
        raise ValueError("two benchmarks have the same name: " + ", ".join(b.name for b in benches))
    paths, names = [resolve_model(m) for m in cfg.model], model_names(cfg.model)
    for p in paths:
        check_folder(p)
    try:
        tokenizers = [AutoTokenizer.from_pretrained(p) for p in paths]
    except Exception:
        raise ValueError(f"a model folder of {', '.join(paths)} has no loadable tokenizer") from None
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    groups = {"MATH AVG": [b.name for b in benches if b.kind == "math"],  # general benchmarks never enter it
              "GENERAL AVG": [b.name for b in benches if b.kind != "math"]}
    avgs = [avg for avg, members in groups.items() if members]
    results, records = {}, {}
    for name, path, tok in zip(names, paths, tokenizers):
        model = Transformer.from_pretrained(path, dtype=dtype, device=device).eval()
        res = results[name] = {}
        for b in benches:
            recs = records[name, b.name] = evaluate(model, tok, b, cfg)
            res[b.name] = s = dict(score=100 * sum(r["score"] for r in recs) / len(recs), n=len(recs), k=k_of(b, cfg),
                                   no_answer=sum(a is None for r in recs for a in r["answers"]))
            print0(f"{name} on {b.name}: {s['score']:.2f} (n={s['n']}, k={s['k']}, no answer {s['no_answer']})")
        for avg, members in groups.items():
            res[avg] = sum(res[b]["score"] for b in members) / len(members) if members else None
        del model
    if rank() != 0:
        return
    md = table(results, benches, cfg, lambda r: f"{r['score']:.2f}", avgs)
    md += "\n\nResponses without an extracted answer (counted wrong):\n\n"
    md += table(results, benches, cfg, lambda r: f"{r['no_answer']}/{r['n'] * r['k']}")
    print("\n" + md)
    for (name, bench), recs in records.items():
        write_text(os.path.join(cfg.out, name.replace("/", "_"), bench + ".jsonl"),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    write_text(os.path.join(cfg.out, "results.json"), json.dumps(dict(config=asdict(cfg), results=results), indent=2))
    write_text(os.path.join(cfg.out, "results.md"), md + "\n")


def main(argv=None):
    try:
        cfg = parse_config(argv)
        init_distributed(device_and_dtype(cfg.device, cfg.dtype)[0])
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
