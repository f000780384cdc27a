"""
The R-Zero lab: the paper's ablations and R-Zero's siblings as arms of train.py flags, run over seeds, summarised
with their spread in one table and one picture.

    python sweep.py                                   # every arm x seeds 0 1 2 on the toy world -> runs/sweep
    python sweep.py --arms full untrained-challenger --seeds 0 1 --jobs 2
    python sweep.py --table-only                      # the table and the picture from the runs already there
    python sweep.py --out runs/lr --arms full -- --lr 1e-4    # flags after -- go to every run

Each (arm, seed) is one process, `python train.py --seed S --out-dir OUT/ARM/seedS FLAGS` (log.txt beside), --jobs
at once; a sweep killed and re-run resumes every unfinished run. OUT/results.md, results.json and results.svg hold
the toy world's checker's numbers per arm and iteration over seeds (a real model: each run's own table).
"""
import argparse
import fcntl
import json
import os
import subprocess
import sys
import time

import torch

import report
import toy
import train
from runtime import read_json, read_jsonl, write_text

ROOT = os.path.dirname(os.path.abspath(__file__))
ARMS = {  # name -> train.py flags: one switch each, the rest the preset's
    "full": ["--iterations", "5"],  # the full method, 5 iterations: does it collapse, and when?
    "untrained-challenger": ["--challenger-steps", "0"],  # did the gain need a trained Challenger at all?
    "no-repetition-penalty": ["--no-repetition-penalty"],
    "no-filter": ["--no-filter"],
    "shared-model": ["--shared-model"],  # one set of weights plays both roles
    "oracle-labels": ["--labels", "oracle"],  # the ceiling: the checker's answers instead of the majority vote
    "ttrl": ["--ttrl"],  # + a file (--ttrl-data): no Challenger, the Solver step on its unlabelled problems
    "validity-gate": ["--validity-gate"],  # the Challenger scores only where the Solver's majority = its answer
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), help=f"of: {', '.join(ARMS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once (default: one per core)")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--ttrl-data", help="the TTRL arm's problems (JSON Lines); toy world: OUT/ttrl_problems.jsonl, "
                    "one dataset phase's problems it writes (not held out)")
    ap.add_argument("--table-only", action="store_true", help="summarise the runs already there; run nothing")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if unknown := [x for x in a.arms if x not in ARMS]:
        ap.error(f"unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
    if a.jobs < 1 or not a.seeds:
        ap.error("--jobs must be >= 1 and --seeds must name at least one seed")
    return a, extra


def runs_of(a, extra):
    out = []
    for arm in a.arms:
        flags = ARMS[arm] + ([a.ttrl_data] if arm == "ttrl" else [])
        for seed in a.seeds:
            folder = os.path.join(a.out, arm, f"seed{seed}")
            out.append((arm, seed, folder, ["--seed", str(seed), "--out-dir", folder, *flags, *extra]))
    return out


def results_of(folder):
    """base and per-iteration numbers of one run folder: what train.py's held-out measuring wrote."""
    res = {"base": read_json(p)} if os.path.isfile(p := os.path.join(folder, "base_measure.json")) else {}
    rows = read_jsonl(os.path.join(folder, "metrics.jsonl")) or []
    kept = {r["iteration"]: r["kept"] for r in rows if r["phase"] == "dataset"}
    it = 1
    while os.path.isfile(p := os.path.join(folder, f"iter{it}", "measure.json")):
        res[it] = read_json(p) | dict(kept=kept.get(it))
        it += 1
    return res


def stopped(folder):
    """The run's last words if a dataset phase kept no problem (a result: the method ran dry), else None."""
    if os.path.isfile(log := os.path.join(folder, "log.txt")):
        with open(log) as f:
            last = f.read().rstrip().rpartition("\n")[2]
        if "nothing to train the Solver on" in last:
            return last.removeprefix("error: ").partition(":")[0]  # "iteration 3"


def finished(folder, args):
    return os.path.isdir(os.path.join(folder, f"iter{train.parse_config(args).iterations}", "solver")) or \
        stopped(folder) is not None


def run_all(todo, jobs):
    """Runs train.py for each (arm, seed, folder, args), `jobs` at a time. Returns the runs that failed."""
    threads, gpus = str(max(1, (os.cpu_count() or 1) // jobs)), torch.cuda.device_count()
    running, failed, started = {}, [], 0
    try:
        while todo or running:
            while todo and len(running) < jobs:
                arm, seed, folder, args = todo.pop(0)
                os.makedirs(folder, exist_ok=True)
                log = open(os.path.join(folder, "log.txt"), "a")
                try:  # held while the run lives: another sweep on the same folder skips it
                    fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"{arm} seed {seed}: running in another sweep, skipped", flush=True)
                    failed.append((arm, seed, folder))
                    continue
                env = dict(os.environ, OMP_NUM_THREADS=threads)
                if gpus:  # a GPU each, in turn (each run would start on cuda:0); the toy preset's runs use the CPU
                    env["CUDA_VISIBLE_DEVICES"], started = str(started % gpus), started + 1
                p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
                running[p] = (arm, seed, folder, log, time.time())
                print(f"started {arm} seed {seed} ({len(todo)} waiting)", flush=True)
            time.sleep(1)
            for p in [p for p in running if p.poll() is not None]:
                arm, seed, folder, log, t0 = running.pop(p)
                log.close()
                spent = os.path.join(folder, "sweep_seconds.json")  # wall seconds over every attempt
                write_text(spent, json.dumps(time.time() - t0 + (read_json(spent) if os.path.isfile(spent) else 0.0)))
                ran_dry = p.returncode == 2 and stopped(folder)
                status = ("done" if p.returncode == 0 else f"stopped: {ran_dry} kept no problem" if ran_dry else
                          f"FAILED (exit {p.returncode}, see {folder}/log.txt)")
                print(f"{arm} seed {seed}: {status}, {time.time() - t0:.0f}s", flush=True)
                if p.returncode != 0 and not ran_dry:
                    failed.append((arm, seed, folder))
    finally:
        for p in running:  # an interrupted sweep stops its runs; the next one resumes them
            p.terminate()
            p.wait()
    return failed


# ------------------------------------------------------------------------------------------- the table

def stats(xs):
    xs = [x for x in xs if x is not None]
    return dict(mean=sum(xs) / len(xs), min=min(xs), max=max(xs), n=len(xs)) if xs else None


def summarise(a, runs):
    """{arm: {iteration: {metric: stats over seeds}}}, the base's numbers, the machine time of the runs."""
    table, per_seed, base, seconds = {}, {}, None, 0.0
    for arm, seed, folder, _ in runs:
        res = results_of(folder)
        base = base or res.get("base")
        if os.path.isfile(s := os.path.join(folder, "sweep_seconds.json")):
            seconds += read_json(s)
        for it, r in res.items():
            if it != "base":
                kept = int(r["kept"]) if r.get("kept") is not None else None
                for key, v in dict(mean_at_k=r["mean_at_k"], greedy=r["greedy"], pseudo_acc=r.get("pseudo_acc"),
                                   kept=kept, difficulty=r.get("difficulty")).items():
                    table.setdefault(arm, {}).setdefault(it, {}).setdefault(key, []).append(v)
                per_seed.setdefault(arm, {}).setdefault(it, {})[seed] = r["mean_at_k"]
    table = {arm: {it: {k: stats(v) for k, v in m.items()} for it, m in sorted(its.items())}
             for arm, its in table.items()}
    return table, per_seed, base, seconds


def markdown(table, per_seed, base, seeds, wall, machine, dry=()):
    pct = lambda s: "-" if s is None else f"{100 * s['mean']:.1f}"
    b = 100 * base["mean_at_k"] if base else float("nan")
    n_it = max((max(its) for its in table.values()), default=0)
    head = "| arm | " + " | ".join(f"iter {i}" for i in range(1, n_it + 1)) + " |"
    lines = [f"Held-out mean@4 (%), mean over seeds {', '.join(map(str, seeds))} [min, max] (a cell of fewer "
             f"seeds says n); base {b:.1f}.", "",
             head, "|---" * (n_it + 1) + "|"]
    for arm, its in table.items():
        cells = [f"{pct(m)} [{100 * m['min']:.1f}, {100 * m['max']:.1f}]"
                 + (f" n={m['n']}" if m["n"] < len(seeds) else "")
                 if (m := its.get(i, {}).get("mean_at_k")) else "" for i in range(1, n_it + 1)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Per arm and iteration, means over seeds: held-out mean@4 and its gain over the base (points), "
              "greedy accuracy, pseudo-label accuracy of the kept problems, problems kept (of those generated), mean "
              "difficulty of the questions, the seeds' mean@4.", "",
              "| arm | iter | mean@4 | gain | greedy | pseudo acc | kept | difficulty | seeds' mean@4 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arm, its in table.items():
        for i, m in its.items():
            seeds_ = ", ".join(f"{s}: {100 * x:.1f}" for s, x in per_seed[arm][i].items())
            gain = 100 * m["mean_at_k"]["mean"] - b
            kept = "-" if m["kept"] is None else f"{m['kept']['mean']:.0f}"
            diff = "-" if m["difficulty"] is None else f"{m['difficulty']['mean']:.2f}"
            lines.append(f"| {arm} | {i} | {pct(m['mean_at_k'])} | {gain:+.1f} | {pct(m['greedy'])} | "
                         f"{pct(m['pseudo_acc'])} | {kept} | {diff} | {seeds_} |")
    lines += [""] + [f"{arm} seed {seed} stopped at {it}: its dataset phase kept no problem (every question outside "
                     "the band), so there was nothing to train the Solver on." for arm, seed, it in dry]
    lines += ["", f"{machine}: {wall / 60:.0f} min of machine time over the runs (each run's wall time summed)."]
    return "\n".join(lines) + "\n"


def svg(table, base, path):
    panels = []
    for key, title in (("mean_at_k", "held-out mean@4 (%)"), ("pseudo_acc", "pseudo-label accuracy (%)")):
        series = {arm: [(i, m[key]["mean"], m[key]["min"], m[key]["max"]) for i, m in its.items() if m[key]]
                  for arm, its in table.items()}
        panels.append((title, "iteration", series, {"base": base["mean_at_k"]} if key == "mean_at_k" and base else {}))
    report.svg_chart(panels, path, spread=3)


def main(argv=None):
    a, extra = parse_args(argv)
    try:
        on_toy = train.parse_config(extra).model == "toy"
    except ValueError as e:  # a bad flag after --: train.py's own sentence
        sys.exit(f"error: {e}")
    if "ttrl" in a.arms and not a.ttrl_data:
        if not on_toy:
            sys.exit("error: the ttrl arm needs --ttrl-data FILE (problems of your model's domain)")
        a.ttrl_data = os.path.join(a.out, "ttrl_problems.jsonl")
        if not a.table_only and not os.path.isfile(a.ttrl_data):
            # unlabelled, not held out, as many as one dataset phase writes
            toy.write_problems(a.ttrl_data, n=train.PRESETS["toy"]["n_problems"])
    runs = runs_of(a, extra)
    t0 = time.time()
    if not a.table_only:
        try:
            todo = [r for r in runs if not finished(r[2], r[3])]
        except ValueError as e:  # an arm's switch that the flags after -- contradict
            sys.exit(f"error: {e}")
        print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished; {a.jobs} at a time -> {a.out}")
        if failed := run_all(todo, a.jobs):
            names = ", ".join(f"{arm} seed {s}" for arm, s, _ in failed)
            sys.exit(f"error: {len(failed)} run(s) did not finish: {names}")
    table, per_seed, base, seconds = summarise(a, runs)
    if not table:
        sys.exit(f"error: no held-out measures under {a.out} (not run yet, or a real model: its runs' benchmarks.md)")
    machine = f"{os.cpu_count()} cores, {a.jobs} run{'s' * (a.jobs > 1)} at a time"
    dry = [(arm, seed, it) for arm, seed, folder, _ in runs if (it := stopped(folder))]
    md = markdown(table, per_seed, base, a.seeds, seconds, machine, dry)
    if not a.table_only:
        md += f"This invocation: {(time.time() - t0) / 60:.0f} min wall.\n"
    write_text(os.path.join(a.out, "results.md"), md)
    write_text(os.path.join(a.out, "results.json"), json.dumps(dict(arms={arm: ARMS[arm] for arm in table}, extra=extra,
               seeds=a.seeds, base=base, table=table, per_seed=per_seed, machine_seconds=seconds), indent=1))
    svg(table, base, os.path.join(a.out, "results.svg"))
    print("\n" + md + f"\n{a.out}/results.md, results.json, results.svg")


if __name__ == "__main__":
    main()
