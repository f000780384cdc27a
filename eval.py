"""
Evaluation: checkpoints side by side on the paper's benchmarks, in a table like the paper's.

    python eval.py --model toy --model runs/toy/iter3/solver --data toy
    python eval.py --model Qwen3-4B-Base --model runs/q4b/iter3/solver --data benchmarks/ --limit 50
    python eval.py --model M1 --model M2 --data benchmarks/ --k 32 --k-only amc aime   # the paper's protocol
    torchrun --nproc_per_node=8 eval.py --model M1 --model M2 --data benchmarks/         # data-parallel

Rows are models, columns are benchmarks and MATH AVG (the mean over the math benchmarks). Under --out:
results.md, results.json and <model>/<benchmark>.jsonl (per problem: prompt, responses, extracted answers,
reference, per-sample correctness), written through temporary files once everything is evaluated, so a
failed run overwrites nothing.

Protocol (RZERO.md, "Evaluation"): the Solver prompt through the chat template (solver.solver_prompt; raw
"Question: ...\\nAnswer:" text with --raw-prompt), up to 4096 new tokens, greedy pass@1; `--k K` reports mean@K,
the fraction correct over K sampled responses (the paper reports AMC and AIME as mean@32, the rest greedy:
--k-only). One batched sample.generate call per benchmark; under torchrun each rank answers its slice.

Benchmarks: JSON Lines files (a folder = its *.jsonl; name = file name less .test.jsonl) or `toy`, the toy
world's held-out problems (toy.heldout_problems, reference toy.solve). Fields (override: --question-field,
--answer-field): question = problem | question; reference = answer (a string, a number like AMC23's 27.0,
or a GSM8K solution ending `#### 18`) | final_answer (OlympiadBench's list: one answer in parts, joined by
", ") | the last \\boxed{} of solution (Minerva). Multiple choice (MMLU-Pro, SuperGPQA) is detected by an
options / choices list: the prompt lists "A. ...", the reference is answer_letter | answer_index | answer
(a letter, or the option's text), the response's letter is read from its last \\boxed{} (B, (B), \\text{B}, B. x).

Departures from the authors' evaluation: mean@k samples for real (temperature 0.6, top-p 0.95: Qwen3's
recommended settings; their "mean@32" repeated greedy decoding); answers are checked by grader.is_equiv
alone, no LLM judge; a response without a choice letter is wrong and counted as "no answer", never given a
random letter.
"""
import argparse
import glob
import json
import os
import re
import string
import sys
from dataclasses import asdict, dataclass, field

import torch.distributed as dist

import grader
import sample
import solver
from model import Transformer, check_folder
from runtime import device_and_dtype, gather, init_distributed, rank, resolve_model, share, write_text

LETTERS = string.ascii_uppercase
CHOICE_INSTRUCTION = "Answer with the letter of the correct option."
RAW_STOP = "\nQuestion:"  # a base model on a raw prompt goes on to invent the next question


@dataclass
class EvalConfig:
    model: list = field(default_factory=list)  # checkpoint folders, or "toy"
    data: list = field(default_factory=list)  # JSON Lines files, folders of them, or "toy"
    out: str = "eval_out"
    k: int = 1  # 1 = greedy pass@1; K > 1 = mean@K over K sampled responses
    k_only: list | None = None  # name substrings of the benchmarks that use --k (the rest greedy); None = all
    temperature: float = 0.6  # used when k > 1
    top_p: float = 0.95
    max_new_tokens: int = 4096
    raw_prompt: bool = False  # "Question: ...\nAnswer:" for base models without a chat template
    question_field: str | None = None
    answer_field: str | None = None
    limit: int = 0  # first N problems of each benchmark (0 = all; toy: 512)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    memory_budget_gb: float = 8.0  # KV cache a sampling call may allocate


@dataclass
class Benchmark:
    name: str
    kind: str  # "math" | "choice"
    questions: list  # the user turn shown to the model (options included)
    references: list  # answer strings, or option letters


# ------------------------------------------------------------------------------------------- data

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
    """The first of the fields `names` (or the --{what}-field override) that row has."""
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
        import toy
        problems = toy.heldout_problems(cfg.limit or 512)
        return Benchmark("toy", "math", problems, [str(toy.solve(p)) for p in problems])
    rows = read_jsonl(path)[: cfg.limit or None]
    kind = "choice" if any(isinstance(rows[0].get(f), list) for f in ("options", "choices")) else "math"
    bench = Benchmark(re.sub(r"(\.test)?\.jsonl$", "", os.path.basename(path)), kind, [], [])
    for i, row in enumerate(rows, 1):
        where = f"{path} line {i}"
        q = row[pick(row, ("problem", "question"), cfg.question_field, "question", where)]
        if kind == "choice":
            options = row[pick(row, ("options", "choices"), None, "options", where)]
            a = pick(row, ("answer_letter", "answer_index", "answer"), cfg.answer_field, "answer", where)
            ref = choice_reference(row[a], options)
            q = f"{q}\n\n" + "".join(f"{L}. {o}\n" for L, o in zip(LETTERS, options)) + CHOICE_INSTRUCTION
        else:
            a = pick(row, ("answer", "final_answer", "solution"), cfg.answer_field, "answer", where)
            ref = math_reference(row[a], a)
        if not ref or not isinstance(q, str):
            raise ValueError(f"{where}: cannot read a question and a reference answer (field {a!r})")
        bench.questions.append(q)
        bench.references.append(ref)
    return bench


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


# ------------------------------------------------------------------------------------------- grading

_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{([^{}]*)\}")


def extract_choice(text):
    """The option letter of the last \\boxed{}: B, (B), \\text{B}, B. text, B) text; None if there is none."""
    box = grader.extract_boxed(text)
    if box is None:
        return None
    box = _WRAP.sub(r"\1", box).replace("$", "").strip()
    m = re.match(r"\(?([A-Z])\)?(?=$|[.):\s])", box) or re.fullmatch(r"\(?([a-z])\)?", box)
    return m[1].upper() if m else None


def grade(kind, response, reference):
    """(extracted answer, correct)."""
    if kind == "choice":
        letter = extract_choice(response)
        return letter, letter == reference
    ans = grader.extract_boxed(response)
    return ans, ans is not None and grader.is_equiv(ans, reference)


# ------------------------------------------------------------------------------------------- evaluation

def k_of(bench, cfg):
    return cfg.k if cfg.k_only is None or any(s in bench.name for s in cfg.k_only) else 1


def evaluate(model, tokenizer, bench: Benchmark, cfg: EvalConfig) -> list[dict]:
    """Per-problem records of one model on one benchmark (every rank returns all of them)."""
    k, r = k_of(bench, cfg), rank()
    mine = share(len(bench.questions))  # this rank's slice of the problems
    prompts = [tokenizer.encode(f"Question: {bench.questions[i]}\n{solver.SOLVER_SYSTEM}\nAnswer:") if cfg.raw_prompt
               else solver.solver_prompt(tokenizer, bench.questions[i]) for i in mine]
    outs = sample.generate(
        model, prompts, n=k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature if k > 1 else 0.0,
        top_p=cfg.top_p if k > 1 else 1.0, eos_ids=sample.eos_ids_of(tokenizer),
        stop_strings=(RAW_STOP,) if cfg.raw_prompt else (), tokenizer=tokenizer, seed=cfg.seed + 1000 * r,
        memory_budget=int(cfg.memory_budget_gb * 2**30), progress=r == 0) if prompts else []
    records = []
    for i, p, row in zip(mine, prompts, outs):
        responses = [c.text for c in row]
        graded = [grade(bench.kind, t, bench.references[i]) for t in responses]
        records.append(dict(id=i, prompt=tokenizer.decode(p), reference=bench.references[i], responses=responses,
                            answers=[a for a, _ in graded], correct=[c for _, c in graded],
                            score=sum(c for _, c in graded) / k))
    return gather(records)


def summarise(records, k):
    return dict(score=100 * sum(r["score"] for r in records) / len(records), n=len(records), k=k,
                no_answer=sum(a is None for r in records for a in r["answers"]))


def table(results, benches, cfg, cell, avg=False):
    """Markdown: a row per model, a column per benchmark (and MATH AVG)."""
    cols = [b.name + (f" (mean@{k_of(b, cfg)})" if k_of(b, cfg) > 1 else "") for b in benches] + ["MATH AVG"] * avg
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, res in results.items():
        row = [cell(res[b.name]) for b in benches] + [f"{res['MATH AVG']:.2f}"] * avg
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main

def parse_config(argv=None) -> EvalConfig:
    d = EvalConfig()
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--model", action="extend", nargs="+", required=True, help="checkpoint folder(s), or toy")
    ap.add_argument("--data", action="extend", nargs="+", required=True, help="JSONL file(s), folder(s), or toy")
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--k", type=int, default=d.k, help="1 = greedy pass@1, K > 1 = mean@K (sampled)")
    ap.add_argument("--k-only", nargs="+", help="only benchmarks whose name contains one of these use --k")
    ap.add_argument("--temperature", type=float, default=d.temperature, help="for k > 1")
    ap.add_argument("--top-p", type=float, default=d.top_p, help="for k > 1")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--raw-prompt", action="store_true", help="'Question: ...' text instead of the chat template")
    ap.add_argument("--question-field")
    ap.add_argument("--answer-field")
    ap.add_argument("--limit", type=int, default=d.limit, help="the first N problems of each benchmark")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--memory-budget-gb", type=float, default=d.memory_budget_gb)
    cfg = EvalConfig(**vars(ap.parse_args(argv)))
    if cfg.k < 1 or cfg.max_new_tokens < 1 or cfg.limit < 0 or cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise ValueError("need --k >= 1, --max-new-tokens >= 1, --limit >= 0, --temperature > 0, 0 < --top-p <= 1")
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
    math = [b.name for b in benches if b.kind == "math"]
    results, records = {}, {}
    for name, path, tok in zip(names, paths, tokenizers):
        model = Transformer.from_pretrained(path, dtype=dtype, device=device).eval()
        results[name] = {}
        for b in benches:
            records[name, b.name] = evaluate(model, tok, b, cfg)
            results[name][b.name] = s = summarise(records[name, b.name], k_of(b, cfg))
            if rank() == 0:
                print(f"{name} on {b.name}: {s['score']:.2f} (n={s['n']}, k={s['k']}, no answer {s['no_answer']})")
        results[name]["MATH AVG"] = sum(results[name][b]["score"] for b in math) / len(math) if math else None
        del model
    if rank() != 0:
        return
    md = table(results, benches, cfg, lambda r: f"{r['score']:.2f}", avg=bool(math))
    md += "\n\nResponses without an extracted answer (counted wrong):\n\n"
    md += table(results, benches, cfg, lambda r: f"{r['no_answer']}/{r['n'] * r['k']}")
    print("\n" + md)
    for (name, bench), recs in records.items():
        write_text(os.path.join(cfg.out, name.replace("/", "_"), bench + ".jsonl"),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    write_text(os.path.join(cfg.out, "results.json"), json.dumps(dict(config=asdict(cfg), results=results), indent=2))
    write_text(os.path.join(cfg.out, "results.md"), md + "\n")


def main(argv=None):
    init_distributed()
    try:
        run(parse_config(argv))
    except (ValueError, FileNotFoundError) as e:
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
