"""The lab: train.py's switches for the paper's ablations and R-Zero's siblings (oracle labels, TTRL, one shared
model, more iterations, benchmark files), and sweep.py, on a small toy world (conftest.small_toy)."""
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from safetensors.torch import load_file

import toy
from conftest import make_markov_world, train_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
LAB = ["--iterations", "1", "--challenger-steps", "1", "--challenger-prompts", "4", "--m-answers", "4",
       "--n-problems", "16", "--solver-steps", "1", "--solver-problems", "4", "--eval-problems", "8",
       "--micro-batch", "8", "--no-filter"]


def train(world, out, *extra):
    return train_here(["--model", world, "--out-dir", str(out), *LAB, *extra])


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def same(a, b):
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def world(small_toy, tmp_path):
    path = str(tmp_path / "world")  # a copy: runs write the base's numbers beside the world
    shutil.copytree(small_toy, path, ignore=shutil.ignore_patterns("measure-*"))
    return path


def test_oracle_labels_are_the_checkers_on_the_same_kept_problems(world, tmp_path):
    vote, oracle = tmp_path / "vote", tmp_path / "oracle"
    for out, extra in ((vote, []), (oracle, ["--labels", "oracle"])):
        r = train(world, out, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    by_vote, by_oracle = jsonl(vote / "iter1" / "dataset.jsonl"), jsonl(oracle / "iter1" / "dataset.jsonl")
    assert by_oracle and all(rec["pseudo_label"] == str(toy.solve(rec["problem"])) for rec in by_oracle)
    # the same run up to the labels: the problems the vote kept that the checker can solve, with the vote's p
    assert [(x["problem"], x["p"]) for x in by_oracle] == \
        [(x["problem"], x["p"]) for x in by_vote if toy.solve(x["problem"]) is not None]
    with open(oracle / "iter1" / "measure.json") as f:
        assert json.load(f)["pseudo_acc"] == 1.0
    (row,) = [m for m in jsonl(oracle / "metrics.jsonl") if m["phase"] == "dataset"]
    assert row["kept"] == len(by_oracle) and row["no_truth"] == len(by_vote) - len(by_oracle)
    # a world that knows no answers cannot give oracle labels: one sentence, nothing written
    markov = make_markov_world(tmp_path / "markov")
    r = train(markov, tmp_path / "no", "--labels", "oracle")
    assert r.returncode == 2 and "--labels oracle needs a world that knows the answers" in r.stderr
    assert r.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "no")


def test_a_default_run_never_asks_the_checker(world, tmp_path, monkeypatch, capsys):
    """Without --labels oracle no label comes from the toy world: with held-out measuring off (the only other
    reader), a full iteration runs with every checker function made to fail."""
    import train

    def leak(*a, **k):
        raise AssertionError("the checker was asked during a default run")

    for name in ("solve", "check_answer", "difficulty", "oracle_labels", "measure", "heldout_problems"):
        monkeypatch.setattr(toy, name, leak)
    with pytest.raises(SystemExit) as e:
        train.main(["--model", world, "--out-dir", str(tmp_path / "run"), *LAB, "--eval-problems", "0"])
    assert e.value.code == 0, capsys.readouterr().err[-2000:]
    assert jsonl(tmp_path / "run" / "iter1" / "dataset.jsonl")  # it trained on its own labels
    with pytest.raises(AssertionError, match="the checker was asked"):  # the oracle path does reach it
        train.main(["--model", world, "--out-dir", str(tmp_path / "oracle"), *LAB, "--eval-problems", "0",
                    "--labels", "oracle"])
    assert not os.path.exists(tmp_path / "oracle" / "iter1" / "dataset.jsonl")


def test_ttrl_trains_the_solver_on_a_benchmark_shaped_file(world, tmp_path):
    problems = ["What is 47 * 6?", "What is 381 * 7?", "What is 52 * 3?", "What is 4072 * 9?", "What is 96 * 4?"]
    data = tmp_path / "bench.jsonl"  # benchmark-shaped: question, answer, id; the answers must never be read
    data.write_text("".join(json.dumps(dict(id=k, question=q, answer="WRONG")) + "\n" for k, q in enumerate(problems)))
    out = tmp_path / "ttrl"
    r = train(world, out, "--ttrl", str(data), "--iterations", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(m["iteration"], m["phase"]) for m in jsonl(out / "metrics.jsonl")] == \
        [(1, "dataset"), (1, "solver"), (2, "dataset"), (2, "solver")]  # no Challenger phase
    assert not os.path.exists(out / "iter1" / "challenger")
    for it in (1, 2):
        with open(out / f"iter{it}" / "questions.json") as f:
            assert json.load(f) == problems  # the same file every iteration
        records = jsonl(out / f"iter{it}" / "dataset.jsonl")
        assert records and all(x["problem"] in problems and x["pseudo_label"] != "WRONG" for x in records)
    # mistakes end in one sentence before anything is written
    for extra, message in [(["--ttrl", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
                           (["--ttrl", str(data), "--shared-model"], "--shared-model needs a Challenger")]:
        r = train(world, tmp_path / "bad", *extra)
        assert r.returncode == 2 and message in r.stderr and not os.path.exists(tmp_path / "bad"), r.stderr


def test_shared_model_trains_one_set_of_weights(world, tmp_path):
    # the Solver phase trains the Challenger just trained: with no Solver steps, the Solver is the Challenger
    one = tmp_path / "one"
    assert train(world, one, "--shared-model", "--solver-steps", "0").returncode == 0
    assert same(one / "iter1" / "solver", one / "iter1" / "challenger")
    assert not same(one / "iter1" / "solver", world)
    # the next Challenger phase trains the Solver just trained: with no Challenger steps, it is that Solver
    two = tmp_path / "two"
    assert train(world, two, "--shared-model", "--challenger-steps", "0", "--iterations", "2").returncode == 0
    assert same(two / "iter2" / "challenger", two / "iter1" / "solver")
    assert not same(two / "iter2" / "challenger", world)
    # two models (the default): the Challenger's chain never sees the Solver's weights
    pair = tmp_path / "pair"
    assert train(world, pair, "--challenger-steps", "0", "--iterations", "2").returncode == 0
    assert same(pair / "iter2" / "challenger", world) and not same(pair / "iter1" / "solver", world)


def test_more_iterations_continue_a_finished_run(world, tmp_path):
    out = tmp_path / "run"
    assert train(world, out).returncode == 0
    before = {f: open(out / "iter1" / f, "rb").read() for f in ("dataset.jsonl", "measure.json")}
    solver1 = weights(out / "iter1" / "solver")
    r = train(world, out, "--iterations", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f: open(out / "iter1" / f, "rb").read() for f in before} == before
    assert all(torch.equal(v, weights(out / "iter1" / "solver")[k]) for k, v in solver1.items())
    assert [m["iteration"] for m in jsonl(out / "metrics.jsonl")].count(2) == 3  # challenger, dataset, solver
    # the same as two iterations asked at once
    assert train(world, tmp_path / "straight", "--iterations", "2").returncode == 0
    assert same(out / "iter2" / "solver", tmp_path / "straight" / "iter2" / "solver")
    assert open(out / "iter2" / "measure.json").read() == open(tmp_path / "straight" / "iter2" / "measure.json").read()


def test_eval_data_gives_the_papers_table_for_the_base_and_every_iteration(world, tmp_path):
    problems = toy.heldout_problems(6, seed=5)
    data = tmp_path / "bench"
    data.mkdir()
    (data / "toymath.jsonl").write_text("".join(json.dumps(dict(problem=p, answer=str(toy.solve(p)))) + "\n"
                                                for p in problems))
    out = tmp_path / "run"
    r = train(world, out, "--eval-data", str(data), "--eval-limit", "4", "--solver-max-new-tokens", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    table = (out / "benchmarks.md").read_text().splitlines()
    assert table[0] == "| | toymath | MATH AVG |" and [row.split(" | ")[0] for row in table[2:]] == ["| base", "| iter 1"]
    assert "| toymath | MATH AVG |" in r.stdout
    with open(out / "base_eval" / "results.json") as f:
        base = json.load(f)["results"]
    # the same numbers as eval.py on the base model with the same settings
    e = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", world, "--data", str(data),
                        "--limit", "4", "--max-new-tokens", "64", "--out", str(tmp_path / "ev")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr[-2000:]
    with open(tmp_path / "ev" / "results.json") as f:
        assert list(json.load(f)["results"].values()) == list(base.values())
    score = list(base.values())[0]["toymath"]["score"]
    assert table[2] == f"| base | {score:.2f} | {score:.2f} |"
    r = train(world, tmp_path / "bad", "--eval-data", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "nowhere" in r.stderr and not os.path.exists(tmp_path / "bad")


def test_sweep_runs_arms_by_seeds_resumably_and_tabulates_with_spread(world, tmp_path):
    data = tmp_path / "problems.jsonl"
    toy.write_problems(str(data), n=6)
    assert all(not toy.is_heldout(x["problem"]) for x in jsonl(data)) and len(jsonl(data)) == 6
    out = tmp_path / "sweep"
    cmd = [sys.executable, os.path.join(ROOT, "sweep.py"), "--out", str(out), "--arms", "full", "ttrl",
           "--seeds", "0", "1", "--jobs", "2", "--ttrl-data", str(data), "--", "--model", world, *LAB]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert list(res["table"]) == ["full", "ttrl"] and res["seeds"] == [0, 1]
    for arm in ("full", "ttrl"):
        runs = [json.load(open(out / arm / f"seed{s}" / "iter1" / "measure.json")) for s in (0, 1)]
        m = res["table"][arm]["1"]["mean_at_k"]
        assert m["n"] == 2 and m["mean"] == pytest.approx(sum(x["mean_at_k"] for x in runs) / 2)
        assert (m["min"], m["max"]) == (min(x["mean_at_k"] for x in runs), max(x["mean_at_k"] for x in runs))
        assert res["per_seed"][arm]["1"] == {"0": runs[0]["mean_at_k"], "1": runs[1]["mean_at_k"]}
    assert res["table"]["ttrl"]["1"]["difficulty"]["mean"] == pytest.approx(
        sum(toy.difficulty(x["problem"]) for x in jsonl(data)) / 6)
    md = (out / "results.md").read_text()
    assert "| full | 1 |" in md and "| ttrl | 1 |" in md and md.splitlines()[2] in r.stdout
    svg = ET.parse(out / "results.svg").getroot()
    assert svg.tag.endswith("svg") and len([e for e in svg.iter() if e.tag.endswith("circle")]) == 2 * 2  # arms x panels
    # the same command again: every run is finished, nothing runs, the same table
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 runs, 4 already finished" in again.stdout
    assert json.load(open(out / "results.json"))["table"] == res["table"]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), "--arms", "nope"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown arm 'nope'" in bad.stderr


def test_validity_gate_in_a_run_zeroes_what_the_solver_does_not_confirm(tmp_path):
    """On the bigram world the Challenger boxes 7, 8 or 9 after its question and the Solver's majority is one of
    them: with the gate, questions whose majority differs from the Challenger's own answer score 0."""
    markov = make_markov_world(tmp_path / "markov")
    rows = {}
    for name, extra in (("plain", []), ("gate", ["--validity-gate"])):
        r = train(markov, tmp_path / name, *extra, "--eval-problems", "0", "--challenger-prompts", "16")
        assert r.returncode == 0, r.stderr[-3000:]
        rows[name] = [m for m in jsonl(tmp_path / name / "metrics.jsonl") if m["phase"] == "challenger"]
    assert all(m["gated"] == 0 for m in rows["plain"]) and any(m["gated"] > 0 for m in rows["gate"])
    # the same rollouts (same seeds, same starting model) score less once gated
    gate, plain = rows["gate"][0], rows["plain"][0]
    assert gate["mean_p"] == plain["mean_p"] and gate["reward"] < plain["reward"]


def test_torchrun_two_ranks_run_the_lab_switches_as_one_process(world, tmp_path):
    """TTRL with oracle labels and --eval-data, under torchrun (gloo, 2 ranks): the first dataset phase and the
    base's benchmark numbers come from the base model alone, so they equal one process's exactly; a shared-model
    run under torchrun still trains one set of weights."""
    import socket

    data, bench = tmp_path / "problems.jsonl", tmp_path / "bench"
    toy.write_problems(str(data), n=8)
    bench.mkdir()
    problems = toy.heldout_problems(4, seed=2)
    (bench / "toymath.jsonl").write_text("".join(json.dumps(dict(problem=p, answer=str(toy.solve(p)))) + "\n"
                                                 for p in problems))
    args = ["--ttrl", str(data), "--labels", "oracle", "--eval-data", str(bench), "--solver-max-new-tokens", "64"]

    def torchrun(out, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={port}", os.path.join(ROOT, "train.py"), "--model", world,
                               "--out-dir", str(out), *LAB, *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300)

    assert train(world, tmp_path / "one", *args).returncode == 0
    r = torchrun(tmp_path / "two", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("iter1/dataset.jsonl", "iter1/questions.json"):
        assert (tmp_path / "two" / f).read_text() == (tmp_path / "one" / f).read_text(), f
    assert all(x["pseudo_label"] == str(toy.solve(x["problem"])) for x in jsonl(tmp_path / "two/iter1/dataset.jsonl"))
    results = lambda out: json.load(open(out / "base_eval" / "results.json"))["results"]
    assert list(results(tmp_path / "two").values()) == list(results(tmp_path / "one").values())
    assert (tmp_path / "two" / "benchmarks.md").read_text().splitlines()[:3] == \
        (tmp_path / "one" / "benchmarks.md").read_text().splitlines()[:3]
    r = torchrun(tmp_path / "shared", "--shared-model", "--solver-steps", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert same(tmp_path / "shared" / "iter1" / "solver", tmp_path / "shared" / "iter1" / "challenger")
