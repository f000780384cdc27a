"""What an R-Zero run measures, checks and prints, beside the method itself (train.py): the checks before it starts,
where its time goes (Clock), metrics.jsonl, what the Challenger asks at every step and why a step had no signal,
the held-out measuring of a world that knows the answers (the toy world) and of benchmark files (eval.py), the
tables at the end, and the run's picture (run.svg). Nothing here changes what the run computes.
"""
import json
import os
import time
from contextlib import contextmanager, nullcontext, suppress

import challenger
import eval
import memory
from memory import Phase
from model import check_folder
from runtime import (append_row, device_and_dtype, gather, on_rank0, print0, rank, read_json, read_jsonl, resolve_model,
                     world, write_text)


def preflight(c):
    """Everything a run needs, checked before it writes anything -> (base folder, tokenizer, device, dtype)."""
    from transformers import AutoTokenizer

    base = resolve_model(c.model)
    check_folder(base)
    try:
        tok = AutoTokenizer.from_pretrained(base)
    except Exception:
        raise ValueError(f"model folder {base!r} has no loadable tokenizer") from None
    device, dtype = device_and_dtype(c.device, c.dtype)
    if c.labels == "oracle" and not toy_world(base):
        raise ValueError(f"--labels oracle needs a world that knows the answers (the toy world); {base!r} is not one")
    if c.ttrl and not eval.read_problems(c.ttrl):  # a missing or unreadable file ends here, in one sentence
        raise ValueError(f"--ttrl file {c.ttrl!r} holds no problems")
    for p in eval.benchmark_paths([c.eval_data]) if c.eval_data else []:
        eval.load_benchmark(p, eval.EvalConfig(limit=c.eval_limit))
    if too_big := memory.check(c, base, world(), device, len(challenger.challenger_prompt(tok))):
        raise ValueError(f"the run does not fit: {too_big} (python train.py ... --plan prints the plan)")  # not an hour in
    return base, tok, device, dtype


class Clock:
    """Seconds and tokens sampled per phase (memory.Phase's names) and, with --profile, its peak tensor bytes."""

    def __init__(self, device, profile=False):
        self.device, self.profile, self.t0 = device, profile, time.time()
        self.seconds, self.tokens, self.peaks, self.current = {}, {}, {}, ""

    @contextmanager
    def __call__(self, name):
        t0, outer, self.current = time.time(), self.current, name
        with memory.peak_memory(self.device) if self.profile else nullcontext() as m:
            yield
        self.current = outer
        self.add(name, time.time() - t0)
        if m is not None:  # (allocated, reserved) bytes
            self.peaks[name] = tuple(max(a, b) for a, b in zip(self.peaks.get(name, (0, 0)), (m.bytes, m.reserved)))

    def add(self, name, seconds):
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def log(run, row):
    append_row(run.path("metrics.jsonl"), row, key=lambda r: (r["iteration"], r["phase"], r.get("step")))


def histogram(ps, bins=10):  # bin k holds p in [k/bins, (k+1)/bins); the last, p = 1
    return [sum(min(bins, int(p * bins + 1e-9)) == k for p in ps) for k in range(bins + 1)]


# ------------------------------------------------------------------------------------------ during the loop

def no_signal(c, n, parsed, cut, votes, votes_cut, zero_var):
    """Why a Challenger step has little or no signal, in one line naming the likely setting; "" if it has signal."""
    answers = [a for v in votes if v is not None for a in v.answers]
    none = sum(a is None for a in answers)
    why = []
    if parsed < n / 2:
        why.append(f"only {parsed} of {n} Challenger outputs held a <question>...</question> ({cut} stopped at "
                   f"--challenger-max-new-tokens {c.challenger_max_new_tokens}): the token budget, or the format")
    if answers and none > len(answers) / 2:
        why.append(f"{none} of {len(answers)} Solver answers had no \\boxed{{}} answer ({votes_cut} stopped at "
                   f"--answer-max-new-tokens {c.answer_max_new_tokens}): the token budget, or the prompt")
    if zero_var:
        why.append("every group's rewards were equal, so GRPO had nothing to learn from")
    return "; ".join(why)


def challenger_step(run, it, step, texts, cut, stats, rewards, votes, votes_cut, upd, times):
    """A Challenger step's metrics row, its questions (iter{i}/challenger_questions.jsonl) and its line."""
    t0, t1, t2, t3, tokens = times
    ps = [s["p"] for s in stats if s["p"] is not None]
    row = dict(iteration=it, phase="challenger", step=step, reward=sum(rewards) / len(rewards),
               valid_format=sum(s["valid_format"] for s in stats) / len(stats), p_hist=histogram(ps),
               mean_p=sum(ps) / max(1, len(ps)), gated=sum(s["gated"] for s in stats) / len(stats),
               sample_s=t1 - t0, reward_s=t2 - t1, update_s=t3 - t2,
               tokens_per_s=tokens / max(1e-9, t1 - t0), **upd)
    asked = [dict(question=s["question"], p=s["p"], majority=s["majority"], reward=r, penalty=s["r_rep"])
             | ({} if s["valid_format"] else dict(text=t)) for t, s, r in zip(texts, stats, rewards)]
    append_row(run.path(f"iter{it}", "challenger_questions.jsonl"), dict(step=step, questions=asked),
               key=lambda r: r["step"])
    log(run, row)  # after the checkpoint: a logged step is a saved step
    why = no_signal(run.c, len(texts), len(ps), cut, votes, votes_cut, upd["zero_var_groups"] == 1)
    print0(f"iter {it} challenger step {step + 1}/{run.c.challenger_steps}: reward {row['reward']:.3f}, "
           f"mean p {row['mean_p']:.2f}, {time.time() - t0:.1f}s" + (f"\n  no signal: {why}" if why else ""))


def dataset(run, it, counts, records, seconds):
    log(run, dict(iteration=it, phase="dataset", **counts, p_hist=histogram([r["p"] for r in records]),
                  seconds=seconds))
    print0(f"iter {it} dataset: kept {counts['kept']} of {counts['generated']} problems {counts}")


def solver_step(run, it, step, rewards, upd, times):
    t0, t1, t2, tokens = times
    every = gather(rewards)
    log(run, dict(iteration=it, phase="solver", step=step, reward=sum(every) / len(every), sample_s=t1 - t0,
                  update_s=t2 - t1, tokens_per_s=tokens / max(1e-9, t1 - t0), **upd))
    print0(f"iter {it} solver step {step + 1}/{run.c.solver_steps}: reward {sum(every) / len(every):.3f}, "
           f"{time.time() - t0:.1f}s")


# ------------------------------------------------------------------------------------------ held-out measuring

def toy_world(folder):
    """The seam to a world that knows the answers (toy.py: its checker measures, and labels), or None."""
    if os.path.isfile(os.path.join(folder, "toy.json")):
        import toy
        return toy


def measure(run, name, solver_path):
    """toy.measure of the base or an iteration, once (rank 0's, kept in the run folder); {} without a toy world."""
    if not (toy := toy_world(run.base)) or run.c.eval_problems == 0:
        return {}
    out = run.path(name, "measure.json") if name != "base" else run.path("base_measure.json")
    # the base model's numbers are the world's: kept beside it, so the next run on this world reuses them
    key = (run.c.eval_problems, run.c.eval_k, run.c.solver_max_new_tokens, run.device.type, run.dtype)
    kept = os.path.join(run.base, "measure-" + "-".join(str(x).removeprefix("torch.") for x in key) + ".json")

    def once():
        if os.path.isfile(out):
            return read_json(out)
        if name == "base" and os.path.isfile(kept):
            res = read_json(kept)
        else:
            with run.clock("held-out measuring"):
                res = toy.measure(solver_path, None if name == "base" else run.path(name), run.c.eval_problems,
                                  run.c.eval_k, run.c.solver_max_new_tokens, run.device, run.dtype)
            if name == "base":  # runs of a sweep may write it at once: each through a temporary file of its own
                with suppress(OSError):  # a read-only model folder: measured again next time
                    write_text(f"{kept}.{os.getpid()}", json.dumps(res))
                    os.replace(f"{kept}.{os.getpid()}", kept)
        write_text(out, json.dumps(res))
        return res
    return on_rank0(once)


def benchmarks(run, name, solver_path):
    """eval.py's greedy pass@1 of the base or an iteration's Solver on --eval-data, once (kept in the run folder)."""
    c = run.c
    if not c.eval_data:
        return None
    out = run.path("base_eval") if name == "base" else run.path(name, "eval")
    done = os.path.join(out, "results.json")
    asked = on_rank0(lambda: read_json(done)["config"] if os.path.isfile(done) else None)
    if asked is None or (asked["data"], asked["limit"]) != ([c.eval_data], c.eval_limit):
        cfg = eval.EvalConfig(model=[solver_path], data=[c.eval_data], out=out, limit=c.eval_limit, device=c.device,
                              dtype=c.dtype, general_max_new_tokens=2 * c.solver_max_new_tokens,
                              max_new_tokens=c.solver_max_new_tokens, memory_budget_gb=c.memory_budget_gb)
        with run.clock("benchmarks"):
            eval.run(cfg)
    (res,) = on_rank0(read_json, done)["results"].values()
    return res


def measured(run, name, solver_path):
    if name == "base":
        run.clock.t0 = time.time()
        print0(f"R-Zero: {run.c.iterations} iterations from {run.base} on {world()} x {run.device} -> {run.c.out_dir}")
    return measure(run, name, solver_path), benchmarks(run, name, solver_path)


# ------------------------------------------------------------------------------------------ at the end

def iteration_row(run, it):
    """The loop's own numbers of an iteration, read back from metrics.jsonl (so resumed runs have them)."""
    last = {m["phase"]: m for m in read_jsonl(run.path("metrics.jsonl")) if m["iteration"] == it}  # its last row
    ch, ds = last.get("challenger", {}), last.get("dataset")  # the Challenger's last step; the one dataset row
    return dict(reward=ch.get("reward"), kept=ds and f"{ds['kept']}/{ds['generated']}",
                kept_share=ds and ds["kept"] / ds["generated"])


def finish(run):
    c, total = run.c, time.time() - run.clock.t0
    its = range(1, c.iterations + 1)
    rows = [("base", measure(run, "base", run.base))]
    rows += [(f"iter {i}", on_rank0(iteration_row, run, i) | measure(run, f"iter{i}", run.path(f"iter{i}", "solver")))
             for i in its]
    measured = toy_world(run.base).columns(c.eval_k) if toy_world(run.base) and c.eval_problems else []
    summary(rows, [("chal. reward", 13, "reward", "{:.3f}"), ("kept", 12, "kept", "{}")] + measured)
    if c.eval_data:
        evals = [("base", benchmarks(run, "base", run.base))]
        evals += [(f"iter {i}", benchmarks(run, f"iter{i}", run.path(f"iter{i}", "solver"))) for i in its]
        benchmark_table(run, evals)
        rows = [(name, r | {"MATH AVG": e["MATH AVG"] and e["MATH AVG"] / 100}) for (name, r), (_, e) in zip(rows, evals)]
    time_table(run, total)
    if c.profile:
        prompts = (len(challenger.challenger_prompt(run.tok)), run.solver_prompt_tokens or 150)
        lines, out = memory.profile(c, run.base, world(), run.device.type == "cuda", prompts, run.clock.seconds,
                                    gather([run.clock.peaks]))
        print0("\n".join(lines))
        if rank() == 0:
            write_text(run.path("profile.json"), json.dumps(out, indent=1))
    if rank() == 0:
        picture(run, rows)
    print0(f"done in {total:.0f}s; models and metrics in {c.out_dir} (the run's picture: run.svg)")


def summary(rows, cols):  # cols: (title, width, key, format) per column
    print0("\n" + "=" * 96)
    print0(f"{'':10}" + "".join(f"{title:>{w}}" for title, w, _, _ in cols))
    for name, r in rows:
        print0(f"{name:10}" + "".join(f"{fmt.format(r[k]) if r.get(k) is not None else '-':>{w}}"
                                      for _, w, k, fmt in cols))
    print0("=" * 96)


def benchmark_table(run, evals):
    """The paper's table (rows: base, iterations; columns: benchmarks, MATH AVG), also as benchmarks.md."""
    cols = [k for k, v in evals[0][1].items() if v is not None]  # GENERAL AVG is None without general benchmarks
    cell = lambda v: "-" if v is None else f"{v['score'] if isinstance(v, dict) else v:.2f}"
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(res.get(k)) for k in cols) + " |" for name, res in evals]
    print0("\n" + "\n".join(lines))
    if rank() == 0:
        write_text(run.path("benchmarks.md"), "\n".join(lines) + "\n")


def time_table(run, total):
    """Where this process's time went: each phase, its kinds of work, its sampling speed (timing.json too)."""
    seconds, tokens = run.clock.seconds, run.clock.tokens
    order = [v for k, v in vars(Phase).items() if not k.startswith("_")] + ["held-out measuring", "benchmarks", "saving"]
    rows = [(k, seconds[k]) for k in order if k in seconds]
    print0(f"\n{'where the time went':34}{'seconds':>9}{'share':>7}{'sampled tok/s':>15}")
    for k, v in rows + [("other (loading models, the loop)", total - sum(v for _, v in rows))]:
        tps = f"{tokens[k] / v:15.0f}" if tokens.get(k) and v > 0 else ""
        print0(f"{k:34}{v:9.1f}{v / total:7.0%}{tps}")
        for sub in (s for s in seconds if s.startswith(k + ": ")):
            print0(f"  {sub[len(k) + 2:]:32}{seconds[sub]:9.1f}{seconds[sub] / total:7.0%}")
    if rank() == 0:
        write_text(run.path("timing.json"), json.dumps(dict(total=total, seconds=seconds, tokens=tokens)))


# ------------------------------------------------------------------------------------------ pictures

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def svg_chart(panels, path, spread=0.0):
    """Plain SVG: panels side by side, each (title, x label, {series: [(x, y, low, high)]}, {label: y} dashed); a
    title ending in "(%)" shows y x 100; spread: pixels between series at the same x, so bars do not hide."""
    names = list(dict.fromkeys(s for _, _, series, _ in panels for s in series))
    colour = dict(zip(names, COLOURS * 9))
    W, H, L, T, PW, PH, GAP = 60 + len(panels) * 440 + 120, 380, 60, 40, 330, 260, 110
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>']
    for k, (title, xlabel, series, refs) in enumerate(panels):
        x0 = L + k * (PW + GAP)
        pts = [p for s in series.values() for p in s]
        ys = [v for x, y, lo, hi in pts for v in (y, lo, hi) if v is not None] + list(refs.values()) or [0, 1]
        xs = [x for x, *_ in pts] or [1]
        lo, hi = min(ys) - 0.02 - (max(ys) - min(ys)) * 0.05, max(ys) + 0.02 + (max(ys) - min(ys)) * 0.05
        xlo, xhi = min(xs) - 0.3, max(xs) + 0.3
        X = lambda x: x0 + PW * (x - xlo) / (xhi - xlo)
        Y = lambda v: T + PH * (hi - v) / (hi - lo)
        out.append(f'<text x="{x0 + PW / 2}" y="{T - 14}" text-anchor="middle" font-size="14">{title}</text>')
        out.append(f'<rect x="{x0}" y="{T}" width="{PW}" height="{PH}" fill="none" stroke="#444"/>')
        for j in range(5):
            v = lo + (hi - lo) * (j + 0.5) / 5
            tick = f"{100 * v:.0f}" if title.endswith("(%)") else f"{v:.2f}"
            out.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#ddd"/>'
                       f'<text x="{x0 - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{tick}</text>')
        for i in range(int(xlo) + 1, int(xhi) + 1):
            out.append(f'<text x="{X(i):.1f}" y="{T + PH + 16}" text-anchor="middle">{i}</text>')
        out.append(f'<text x="{x0 + PW / 2}" y="{T + PH + 34}" text-anchor="middle">{xlabel}</text>')
        for label, y in refs.items():
            out.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="#000" '
                       f'stroke-dasharray="5,4"/><text x="{x0 + 4}" y="{Y(y) - 4:.1f}">{label}</text>')
        for j, (name, ps) in enumerate((name, ps) for name, ps in series.items() if ps):
            ps = [(X(x) + spread * (j - len(series) / 2), y, lo_, hi_) for x, y, lo_, hi_ in ps]
            out.append(f'<polyline fill="none" stroke="{colour[name]}" stroke-width="2" points="'
                       + " ".join(f"{x:.1f},{Y(y):.1f}" for x, y, _, _ in ps) + '"/>')
            for x, y, lo_, hi_ in ps:
                if lo_ is not None:
                    out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y(lo_):.1f}" y2="{Y(hi_):.1f}" '
                               f'stroke="{colour[name]}" opacity="0.5"/>')
                out.append(f'<circle cx="{x:.1f}" cy="{Y(y):.1f}" r="3" fill="{colour[name]}"/>')
    for k, name in enumerate(names):  # the legend, right of the panels
        y, x = T + 8 + 18 * k, L + len(panels) * (PW + GAP) - GAP + 20
        out.append(f'<line x1="{x}" x2="{x + 20}" y1="{y}" y2="{y}" stroke="{colour[name]}" stroke-width="3"/>'
                   f'<text x="{x + 25}" y="{y + 4}">{name}</text>')
    write_text(path, "\n".join(out + ["</svg>"]) + "\n")


def picture(run, rows):
    """run.svg: the reward of every step, and per iteration the kept share and the measured accuracies."""
    steps, rewards, per_it, refs = {"challenger": run.c.challenger_steps, "solver": run.c.solver_steps}, {}, {}, {}
    for m in (m for m in read_jsonl(run.path("metrics.jsonl")) if m["phase"] in steps):
        x = m["iteration"] - 1 + (m["step"] + 1) / steps[m["phase"]]
        rewards.setdefault(f"{m['phase'].capitalize()} reward", []).append((x, m["reward"], None, None))
    labels = {"mean_at_k": f"held-out mean@{run.c.eval_k}", "greedy": "held-out greedy", "MATH AVG": "MATH AVG",
              "pseudo_acc": "pseudo-label accuracy", "kept_share": "kept share"}
    for i, (_, r) in enumerate(rows):
        for key, label in labels.items():
            if r.get(key) is not None and i:
                per_it.setdefault(label, []).append((i, r[key], None, None))
            elif r.get(key) is not None and key in ("mean_at_k", "MATH AVG"):
                refs[f"base {label}"] = r[key]
    svg_chart([("reward per step", "iteration", rewards, {}), ("per iteration (%)", "iteration", per_it, refs)],
              run.path("run.svg"))
