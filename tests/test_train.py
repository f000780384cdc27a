"""train.py end to end on a hand-set bigram world (conftest.make_markov_world): outputs, transformers
round trip, torchrun with two ranks, kill-and-resume, and user mistakes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_markov_world, train_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--iterations", "1", "--challenger-steps", "2", "--challenger-prompts", "4", "--m-answers", "4",
        "--n-problems", "16", "--solver-steps", "3", "--solver-problems", "4", "--challenger-updates", "2", "--solver-updates", "2",
        "--challenger-max-new-tokens", "16", "--answer-max-new-tokens", "16", "--solver-max-new-tokens", "16",
        "--lr", "1e-2", "--micro-batch", "4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def train_cmd(model, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--model", model, "--out-dir", str(out), *TINY, *extra]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_markov_world(tmp_path_factory.mktemp("markov"))


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    r = run(train_cmd(world, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_full_iteration_writes_every_output(full_run, world):
    out, r = full_run
    for p in ["config.json", "metrics.jsonl", "iter1/questions.json", "iter1/dataset.jsonl",
              "iter1/challenger/config.json",
              "iter1/challenger/model.safetensors", "iter1/challenger/tokenizer.json",
              "iter1/solver/model.safetensors", "iter1/solver/tokenizer.json"]:
        assert os.path.isfile(os.path.join(out, p)), p
    rows = metrics(out)
    assert [(m["phase"], m.get("step")) for m in rows] == [
        ("challenger", 0), ("challenger", 1), ("dataset", None), ("solver", 0), ("solver", 1), ("solver", 2)]
    chal = rows[0]
    assert 0 < chal["valid_format"] < 1 and sum(chal["p_hist"]) > 0 and chal["tokens"] > 0
    ds = rows[2]
    assert ds["generated"] == 16 and ds["kept"] + ds["unparsable"] + ds["no_majority"] + ds["out_of_band"] == 16
    with open(os.path.join(out, "iter1/dataset.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == ds["kept"] > 0
    assert all(abs(r["p"] - 0.5) <= 0.25 + 1e-9 and r["pseudo_label"] in "789" for r in records)
    assert weights(os.path.join(out, "iter1/solver")) != weights(world)  # the Solver was trained
    assert weights(os.path.join(out, "iter1/challenger")) != weights(world)
    assert "chal. reward" in r.stdout  # the summary table
    with open(os.path.join(out, "iter1/questions.json")) as f:
        questions = json.load(f)
    assert len(questions) == 16 and sum(q is None for q in questions) == ds["unparsable"]
    assert {r["problem"] for r in records} <= set(questions)
    # no world that knows the answers (no toy.json): nothing is measured
    assert not os.path.exists(os.path.join(out, "base_measure.json")) and not os.path.exists(
        os.path.join(out, "iter1/measure.json"))


def test_a_run_keeps_what_the_challenger_asked_and_draws_itself(full_run):
    """Every Challenger step's questions with their p, reward and penalty; run.svg plots every step's reward."""
    import xml.etree.ElementTree as ET

    out, _ = full_run
    with open(os.path.join(out, "iter1/challenger_questions.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    chal = [m for m in metrics(out) if m["phase"] == "challenger"]
    assert [s["step"] for s in steps] == [0, 1] and all(len(s["questions"]) == 4 * 4 for s in steps)  # prompts x G
    for s, m in zip(steps, chal):
        qs = s["questions"]
        assert abs(sum(q["reward"] for q in qs) / len(qs) - m["reward"]) < 1e-9
        assert sum(q["question"] is not None for q in qs) / len(qs) == m["valid_format"]
        assert all(("text" in q) == (q["question"] is None) and 0 <= q["penalty"] <= 1 for q in qs)
        assert all(q["p"] is not None and 0 < q["p"] <= 1 for q in qs if q["question"] is not None)
    svg = ET.parse(os.path.join(out, "run.svg")).getroot()
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "Challenger reward" in texts and "Solver reward" in texts and "kept share" in texts
    points = [p.get("points").split() for p in svg.iter("{http://www.w3.org/2000/svg}polyline")]
    assert sorted(map(len, points)) == [1, 2, 3]  # kept share (1 iteration), Challenger (2 steps), Solver (3 steps)


def test_a_step_without_signal_says_why_in_one_line():
    """6 of 16 outputs parsed and every vote without a boxed answer: the line names both token budgets."""
    import report
    import solver
    import train

    c = train.TrainConfig(challenger_max_new_tokens=256, answer_max_new_tokens=128)
    votes = [solver.vote(["no box"] * 4, c) for _ in range(6)] + [None] * 10
    why = report.no_signal(c, 16, 6, 9, votes, 24, zero_var=True)
    assert "only 6 of 16 Challenger outputs held a <question>" in why and "9 stopped at --challenger-max-new-tokens 256" in why
    assert "24 of 24 Solver answers had no \\boxed{} answer (24 stopped at --answer-max-new-tokens 128)" in why
    assert "GRPO had nothing to learn from" in why and "\n" not in why
    assert report.no_signal(c, 16, 16, 0, [solver.vote(["\\boxed{1}"] * 4, c)] * 16, 0, False) == ""


def test_exported_solver_loads_in_transformers(full_run):
    from transformers import AutoModelForCausalLM

    from model import Transformer

    path = os.path.join(full_run[0], "iter1/solver")
    ours = Transformer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() < 1e-4


def test_rerun_of_finished_run_changes_nothing(full_run, world):
    out, _ = full_run
    before = weights(os.path.join(out, "iter1/solver")), len(metrics(out))
    r = train_here(train_cmd(world, out)[2:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (weights(os.path.join(out, "iter1/solver")), len(metrics(out))) == before


def test_kill_and_resume_gives_the_same_models(full_run, world, tmp_path):
    """SIGKILL inside the Challenger phase, right after the dataset phase and inside the Solver phase; each
    time re-run the same command. The final models must be bit-identical to the uninterrupted run's."""
    out = tmp_path / "killed"
    for lines in (1, 3, 4):
        p = subprocess.Popen(train_cmd(world, out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if os.path.isfile(out / "metrics.jsonl") and len(metrics(out)) >= lines:
                break
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = run(train_cmd(world, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming iteration 1 solver phase after step" in r.stdout
    for name in ("iter1/challenger", "iter1/solver"):
        assert weights(out / name) == weights(full_run[0] / name), name
    strip = lambda rows: [(m["phase"], m.get("step"), m.get("reward"), m.get("kept")) for m in rows]
    assert strip(metrics(out)) == strip(metrics(full_run[0]))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset"),
    (["--delta", "0.7"], "--delta"),
    (["--solver-group", "1"], "at least 2"),
    (["--iterations", "two"], "invalid int"),
    (["--model", "/no/such/folder"], "does not exist"),
])
def test_bad_settings_exit_cleanly(world, tmp_path, args, message):
    out = tmp_path / "bad"
    r = train_here(train_cmd(world, out)[2:] + args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_run_folder_with_other_settings_is_refused(full_run, world):
    out, _ = full_run
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in ("config.json", "metrics.jsonl")}
    r = train_here(train_cmd(world, out, "--delta", "0.1")[2:])
    assert r.returncode == 2 and "other settings (delta)" in r.stderr and "Traceback" not in r.stderr
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in before}


# ------------------------------------------------------------------------------------------- settings

def test_train_config_is_the_concepts_settings_plus_the_loops(capsys):
    """One name per knob: the concept configs share no field name (a clash would silently keep one default),
    and every field of TrainConfig is a flag of the same name, booleans as --x / --no-x."""
    import dataclasses

    import challenger
    import grpo
    import solver
    import train

    parts = [solver.SolverConfig, challenger.ChallengerConfig, grpo.GRPOConfig]
    assert all(issubclass(train.TrainConfig, p) for p in parts)
    names = [f.name for p in parts for f in dataclasses.fields(p)]
    own = [n for n in (f.name for f in dataclasses.fields(train.TrainConfig)) if n not in names]
    assert len(set(names)) == len(names) and len(names) + len(own) == len(dataclasses.fields(train.TrainConfig))
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(train.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text and (f.type is not bool or "--no-" + f.name.replace("_", "-") in help_text), flag
    # every flag explains itself: a meaning and its default, grouped by concept
    flat = " ".join(help_text.split())
    entries = {e.split()[0].rstrip(","): " ".join(e.split("\n\n")[0].split()) for e in help_text.split("\n  --")[1:]}
    for f in dataclasses.fields(train.TrainConfig):
        said = entries[f.name.replace("_", "-")]  # the flag's entry: its name, then its help
        assert len(said) > 20 and said.endswith("]") and "[" in said, (f.name, said)
    assert "--lr X AdamW learning rate, constant [1e-06, toy: 5e-05]" in flat
    assert "--n-problems X N: problems the Challenger writes per iteration [8000, toy: 238]" in flat
    for group in ("GRPO", "the Challenger phase", "the Challenger's reward", "the dataset phase", "the Solver phase",
                  "voting and the Solver dataset", "the loop", "the machine", "the lab"):
        assert "\n" + group in help_text, group
    c = train.parse_config(["--no-filter", "--band", "code", "--reward-variant", "code", "--no-repetition-penalty",
                            "--penalty-weight", "0.5", "--cluster-cut", "0.4", "--beta1", "0.8", "--beta2", "0.95",
                            "--dual-clip", "0", "--m-answers", "9", "--vote-top-k", "40"])
    assert (c.filter, c.band, c.reward_variant, c.repetition_penalty, c.penalty_weight, c.cluster_cut) == (
        False, "code", "code", False, 0.5, 0.4)
    assert (c.beta1, c.beta2, c.dual_clip, c.m_answers, c.vote_top_k) == (0.8, 0.95, 0.0, 9, 40)
    assert train.parse_config(["--filter"]).filter is True
    d = train.parse_config([])  # the toy preset over the defaults
    assert (d.model, d.n_problems, d.solver_steps, d.filter, d.band) == ("toy", 238, 7, True, "paper")
    assert train.parse_config(["--preset", "qwen3-4b-base"]).solver_steps == 15


@pytest.mark.parametrize("over, message", [
    (dict(delta=0.7), "--delta"), (dict(band="nope"), "--band"), (dict(reward_variant="x"), "--reward-variant"),
    (dict(m_answers=0), "--m-answers"), (dict(solver_group=1), "at least 2"), (dict(dtype="float16"), "--dtype"),
    (dict(device="tpu"), "--device"), (dict(challenger_prompts=6, challenger_updates=4), "multiple"),
    (dict(dual_clip=1.2), "dual_clip"), (dict(loss_agg="sum"), "loss_agg"), (dict(lr=0.0), "--lr"),
])
def test_train_config_validates_itself(over, message):
    import train

    with pytest.raises(ValueError, match=message) as e:
        train.TrainConfig(**over)
    assert "\n" not in str(e.value)  # one line for the user
    train.TrainConfig(dual_clip=0.0)  # 0 = dual-clip off is valid


# ------------------------------------------------------------------------------------------- sampling and voting

Q_A, Q_B = "what is 1 + 1 ?", "hello world"  # words of conftest's tokenizer, so their prompts differ
CHALLENGER_TEXTS = [f"<question>{Q_A}</question>\\boxed{{2}}", "garbage", f"<question> {Q_B} </question>"]
SOLVER_ANSWERS = {Q_A: ["\\boxed{2}", "so \\boxed{2.0}", "\\boxed{3}", "none"],  # p = 0.5: in the band
                  Q_B: ["\\boxed{7}"] * 4}  # unanimous: out of the band


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A train.Run on conftest's tokenizer, and engine.generate replaced by scripted Challenger and Solver text:
    returns (run, calls, script): calls records every generate call, script["challenger"] the Challenger's texts."""
    import engine
    import sample
    import solver
    import train
    from conftest import make_tokenizer

    tok = make_tokenizer()
    c = train.TrainConfig(out_dir=str(tmp_path / "run"), m_answers=4, n_problems=6, vote_top_k=40,
                          answer_max_new_tokens=24, challenger_max_new_tokens=12, problem_top_p=0.9, temperature=0.7)
    os.makedirs(c.out_dir)
    open(os.path.join(c.out_dir, "metrics.jsonl"), "w").close()
    by_prompt = {tuple(solver.solver_prompt(tok, q)): a for q, a in SOLVER_ANSWERS.items()}
    chal_prompt = train.challenger.challenger_prompt(tok)
    calls, script = [], dict(challenger=CHALLENGER_TEXTS)

    def fake_generate(model, prompts, n=1, **kw):
        calls.append(dict(model=model, prompts=prompts, n=n, **kw))
        if prompts and prompts[0] == chal_prompt:
            texts = script["challenger"]
            return [[sample.Completion([], [], "eos", texts[i % len(texts)])] for i in range(len(prompts))]
        return [[sample.Completion([], [], "eos", t) for t in by_prompt[tuple(p)][:n]] for p in prompts]

    monkeypatch.setattr(engine, "generate", fake_generate)
    monkeypatch.setattr(train, "frozen", lambda path, device, dtype: ("frozen", path))  # the fake needs no model
    return train.Run(c, "base", tok, torch.device("cpu"), torch.float32), calls, script


def test_vote_is_one_batched_untruncated_call(fake_run):
    import solver
    import train

    run, calls, _ = fake_run
    votes, cut = train.vote(run, "solver model", [Q_A, None, Q_B, Q_A], seed=100)
    (call,) = calls  # one call, the unparsable question never reaches the Solver
    assert call["model"] == "solver model" and call["n"] == 4
    assert call["prompts"] == [solver.solver_prompt(run.tok, q) for q in (Q_A, Q_B, Q_A)]
    assert call["seed"] == [100, 101, 102]  # question k of the valid ones is seeded seed + k
    assert (call["temperature"], call["top_p"], call["top_k"], call["max_new_tokens"]) == (0.7, 1.0, 40, 24)
    assert votes[1] is None and votes[0] == votes[3] == solver.vote(SOLVER_ANSWERS[Q_A], run.c)
    assert (votes[0].majority, votes[0].p, votes[2].majority, votes[2].p) == ("2", 0.5, "7", 1.0)
    assert cut == 0  # no answer stopped at the token budget
    assert train.vote(run, "solver model", [None, None], seed=0) == ([None, None], 0) and len(calls) == 1


def test_dataset_phase_writes_questions_and_dataset_once(fake_run):
    import train

    run, calls, _ = fake_run
    records = train.dataset_phase(run, 1, "iter1/challenger", "frozen solver")
    chal, answers = calls
    assert chal["model"] == ("frozen", "iter1/challenger") and chal["n"] == 1
    assert chal["prompts"] == [train.challenger.challenger_prompt(run.tok)] * 6  # one sample per problem
    assert chal["seed"] == [train.step_seed(run.c, 1, 3, 0) + k for k in range(6)] and chal["top_p"] == 0.9
    assert chal["max_new_tokens"] == 12 and chal["temperature"] == 0.7
    assert answers["model"] == ("frozen", "frozen solver") and answers["seed"][0] == train.step_seed(run.c, 1, 4, 0)
    assert len(answers["prompts"]) == 4  # the 4 parsable questions
    assert records == [dict(problem=Q_A, pseudo_label="2", p=0.5)] * 2
    with open(run.path("iter1", "questions.json")) as f:
        assert json.load(f) == [Q_A, None, Q_B] * 2  # all N questions, parsed and stripped
    with open(run.path("iter1", "dataset.jsonl")) as f:
        assert [json.loads(line) for line in f] == records
    (row,) = metrics(run.c.out_dir)
    assert {k: row[k] for k in ("iteration", "phase", "generated", "unparsable", "no_majority", "out_of_band",
                                "kept")} == dict(iteration=1, phase="dataset", generated=6, unparsable=2,
                                                 no_majority=0, out_of_band=2, kept=2)
    assert row["p_hist"][5] == 2 and sum(row["p_hist"]) == 2
    assert train.dataset_phase(run, 1, "iter1/challenger", "frozen solver") == records  # a re-run reads it back
    assert len(calls) == 2 and len(metrics(run.c.out_dir)) == 1


def test_dataset_phase_that_keeps_nothing_writes_no_dataset(fake_run):
    import train

    run, _, script = fake_run
    script["challenger"] = ["garbage", f"<question>{Q_B}</question>"]  # unparsable, or unanimous: out of the band
    with pytest.raises(train.NothingToTrain, match="filtered out"):
        train.dataset_phase(run, 1, "iter1/challenger", "frozen solver")
    assert not os.path.exists(run.path("iter1", "dataset.jsonl"))
    assert [(m["kept"], m["unparsable"], m["out_of_band"]) for m in metrics(run.c.out_dir)] == [(0, 3, 3)]


def test_log_replaces_a_row_of_the_same_step(fake_run):
    """A run killed between its log row and its checkpoint re-runs that step: the row is replaced, not doubled."""
    import report

    run, _, _ = fake_run
    for row in (dict(iteration=1, phase="challenger", step=0, reward=0.5),
                dict(iteration=1, phase="challenger", step=1, reward=float("nan")),  # JSON has no NaN: null
                dict(iteration=1, phase="dataset", kept=3),
                dict(iteration=1, phase="challenger", step=1, reward=0.25)):
        report.log(run, row)
    assert [(m["phase"], m.get("step"), m.get("reward")) for m in metrics(run.c.out_dir)] == [
        ("challenger", 0, 0.5), ("dataset", None, None), ("challenger", 1, 0.25)]
    report.log(run, dict(iteration=1, phase="solver", step=0, loss=float("inf")))
    assert metrics(run.c.out_dir)[-1]["loss"] is None


# ------------------------------------------------------------------------------------------- presets

REAL_HUB_IDS = {  # checked by hand on the hub (the Qwen3 and OctoThinker model cards); no download here
    "Qwen/Qwen3-4B-Base", "Qwen/Qwen3-8B-Base",
    "OctoThinker/OctoThinker-3B-Hybrid-Base", "OctoThinker/OctoThinker-8B-Hybrid-Base",
}


@pytest.mark.parametrize("preset", ["qwen3-4b-base", "qwen3-8b-base", "octothinker-3b", "octothinker-8b"])
def test_paper_presets_name_real_models_and_the_papers_numbers(preset):
    import train

    c = train.parse_config(["--preset", preset])
    assert c.model in REAL_HUB_IDS
    assert (c.iterations, c.challenger_steps, c.solver_steps, c.lr) == (3, 5, 15, 1e-6)
    assert (c.challenger_prompts, c.challenger_group, c.solver_problems, c.solver_group) == (512, 4, 512, 5)
    assert (c.m_answers, c.n_problems, c.delta, c.kl_coef) == (10, 8000, 0.25, 0.01)
    assert (c.challenger_updates, c.solver_updates) == (4, 4)  # the paper's batch 128; the authors' Challenger ran 32
    assert train.parse_config(["--preset", preset, "--challenger-updates", "32"]).challenger_updates == 32


def test_solver_problems_are_reshuffled_every_epoch_and_a_short_set_warns(tmp_path, monkeypatch, capsys):
    """A kept set smaller than the steps' demand is cycled through in a fresh order every pass (EasyR1's
    sampler), each pass a permutation, the same on every run; and the user is told the set is short."""
    import train

    records = [dict(problem=f"q{i}", pseudo_label="1") for i in range(6)]
    picked = []
    for name in ("trainable", "frozen", "sampling_copy", "export", "save_state", "load_state"):
        monkeypatch.setattr(train, name, lambda *a, **kw: None)
    monkeypatch.setattr(train.grpo, "make_optimizer", lambda *a: None)
    monkeypatch.setattr(train.solver, "solver_prompt", lambda tok, q: picked.append(q) or [0])
    monkeypatch.setattr(train, "generate", lambda run, model, prompts, n, *a, **kw: [
        [train.sample.Completion([1], [0.0], "eos", "\\boxed{1}")] * n for _ in prompts])
    monkeypatch.setattr(train, "train_on", lambda *a: ({}, 1))
    monkeypatch.setattr(train.report, "solver_step", lambda *a: None)
    c = train.TrainConfig(out_dir=str(tmp_path), solver_steps=3, solver_problems=8, solver_updates=2)
    run = train.Run(c, "base", None, torch.device("cpu"), torch.float32)
    train.solver_phase(run, 1, "base", records)
    assert "kept 6 problems, fewer than one Solver step's 8" in capsys.readouterr().out
    assert len(picked) == 24  # 3 steps x 8 problems = 4 passes over the 6
    passes = [picked[k:k + 6] for k in range(0, 24, 6)]
    assert all(sorted(p) == sorted(r["problem"] for r in records) for p in passes)  # each pass a permutation
    assert len({tuple(p) for p in passes}) > 1  # reshuffled
    again = list(picked)
    picked.clear()
    train.solver_phase(run, 1, "base", records)
    assert picked == again  # deterministic
