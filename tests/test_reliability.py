"""Reliability (issue 9): a SIGKILL in a checkpoint write loses nothing, bad input gets one line and leaves an
earlier run alone, hostile model output cannot hang or crash the parsers, a non-finite update is skipped and
counted, a run with nothing to train on stops, a rank that raises under torchrun ends the job. Faults come from
tests/helpers/faulty_train.py (a wrapper of train.main) or monkeypatching, never from hooks in production code.
Only what needs a process of its own is one (each costs ~5 s of imports); the rest calls train.main here."""
import builtins
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import safetensors
import torch
from safetensors.torch import load_file

import challenger
import grader
import grpo
import solver
import train
from conftest import main_code, make_markov_world
from test_train import ENV, ROOT, metrics, train_cmd, weights

HELPER = os.path.join(ROOT, "tests", "helpers", "faulty_train.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_markov_world(tmp_path_factory.mktemp("markov"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main_code(train_cmd(world, out)[2:]) == 0
    return out


def faulty(world, out, fault):
    return subprocess.run([sys.executable, HELPER, *train_cmd(world, out)[2:]], cwd=ROOT, env=dict(ENV, FAULT=fault),
                          capture_output=True, text=True, timeout=300)


def state_meta(out):
    """The phase and step of a run's checkpoint (its meta.json, less the RNG)."""
    with open(out / "state" / "meta.json") as f:
        return {k: v for k, v in json.load(f).items() if k != "rng"}


def state_tensors(out):
    """Every tensor of a run's checkpoint folder, read back with torch.distributed.checkpoint (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(out / "state", out / "state_copy.pt")
    flat = torch.load(out / "state_copy.pt", weights_only=False)
    os.remove(out / "state_copy.pt")
    tensors = lambda x: [t for v in x.values() for t in tensors(v)] if isinstance(x, dict) else [x] \
        if isinstance(x, torch.Tensor) else []
    return {i: t for i, t in enumerate(tensors(flat)) if t.is_floating_point()}


def is_tmp(path):
    return any(part.endswith(".tmp") for part in os.fsdecode(path).split(os.sep))


def test_sigkill_during_checkpoint_writes_loses_nothing(world, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # 1. killed with half of state.tmp's data on disk, in the Challenger phase (the 2nd save: step 1)
    r = faulty(world, out, "save_state:2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    torn, whole = out / "state.tmp" / "__0_0.distcp", out / "state" / "__0_0.distcp"
    assert torn.stat().st_size < 0.6 * whole.stat().st_size  # the torn file really is torn
    assert state_meta(out) == dict(iteration=1, phase="challenger", step=0)
    # 2. resumes; killed with half of the Solver's model.safetensors on disk (the Challenger's export is the 1st):
    # the export writes a temporary folder and renames it whole, so iter1/solver does not exist half-written
    r = faulty(world, out, "save_weights:2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "resuming iteration 1 challenger phase after step 1" in r.stdout
    torn = out / "iter1/solver.tmp/model.safetensors"
    assert torn.is_file() and not (out / "iter1/solver").exists()
    with pytest.raises(Exception):  # the torn file really is torn
        load_file(torn)
    assert (out / "iter1/challenger/model.safetensors").is_file()  # the finished export is whole
    assert state_meta(out) == dict(iteration=1, phase="solver", step=2)
    # 3. the plain command, with every file it opens for reading recorded
    opened, real_open, real_safe_open = [], builtins.open, safetensors.safe_open

    def open_(f, mode="r", *a, **k):  # the checkpoint's meta.json is read through builtins.open
        opened.append((f, mode))
        return real_open(f, mode, *a, **k)

    def safe_open(f, *a, **k):  # model.py imports it at call time
        opened.append((f, "rb"))
        return real_safe_open(f, *a, **k)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(safetensors, "safe_open", safe_open)
    assert main_code(train_cmd(world, out)[2:]) == 0
    monkeypatch.undo()
    assert not [f for f, mode in opened if isinstance(f, (str, os.PathLike)) and "r" in mode and is_tmp(f)]
    assert any(str(f).endswith(os.path.join("state", "meta.json")) for f, _ in opened)  # it resumed from the last
    for name in ("iter1/challenger", "iter1/solver"):
        assert weights(out / name) == weights(reference / name), name
    strip = lambda rows: [(m["phase"], m.get("step"), m.get("reward"), m.get("kept")) for m in rows]
    assert strip(metrics(out)) == strip(metrics(reference))
    assert not [p for p in out.rglob("*") if is_tmp(p)]


# ------------------------------------------------------------------------------------------- bad input

def _drop(*prefixes):
    return lambda m: [os.remove(m / f) for f in os.listdir(m) if f.startswith(prefixes)]


BAD_CASES = {  # name: (what breaks a copy of the model, extra flags, what the one line on stderr must name)
    "model_missing": (shutil.rmtree, [], "does not exist"),
    "no_config_json": (_drop("config.json"), [], "config.json"),
    "unsupported_model_type": (lambda m: _edit(m / "config.json", model_type="gemma2"), [], "gemma2"),
    "truncated_safetensors": (lambda m: os.truncate(m / "model.safetensors", 3 * 1024), [], "model.safetensors"),
    "no_tokenizer": (_drop("tokenizer", "chat_template", "vocab", "merges", "special_tokens"), [], "tokenizer"),
    "flag_of_wrong_type": (None, ["--solver-steps", "1.5"], "--solver-steps"),
    "delta_out_of_range": (None, ["--delta", "0.6"], "--delta"),
    "m_out_of_range": (None, ["--m-answers", "0"], "--m-answers"),
    "folder_of_another_config": (None, ["--seed", "1"], "other settings (seed)"),
}


def _edit(config_file, **changes):
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | changes))


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_and_earlier_run_untouched(world, reference, tmp_path, capfd, case):
    """Re-run in a copy of the finished reference run: with a model folder that broke since, or unfitting flags."""
    breaker, flags, names = BAD_CASES[case]
    out, model = tmp_path / "run", world
    shutil.copytree(reference, out)
    if breaker:
        model = tmp_path / "model"
        shutil.copytree(world, model)
        breaker(model)
        _edit(out / "config.json", model=str(model))  # as if the good run had used this copy
    before = snapshot(out)
    capfd.readouterr()
    code = main_code(train_cmd(str(model), out, *flags)[2:])  # an exception here would be a traceback for the user
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and names in lines[0], (code, lines[-40:])
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------- hostile model output

PIECES = ["<question>", "</question>", "<question", "question>", "</", "\\boxed{", "\\boxed ", "\\fbox{", "{", "}",
          "\\{", "\\}", "\\frac", "\\sqrt", "^", "_", "9^{9^{9^{9}}}", "\\left(", "\\right)", "$", "\x00", "\n", " ",
          "1", "7", "x", "=", ",", "\\text{", "####", "é", "\U0001f600", "\u202e", "\ufeff", "\ud800", "\\\\", "&"]


def fuzzed(n, seed=0):
    rng, out = random.Random(seed), []
    for k in range(n):
        size = rng.randrange(0, 40)
        if k % 4 < 2:  # LaTeX-ish fragments and tags
            out.append("".join(rng.choice(PIECES) for _ in range(size)))
        elif k % 4 == 2:  # any code point: NUL, lone surrogates, the astral planes
            out.append("".join(chr(rng.choice([0, rng.randrange(32, 127), rng.randrange(0xD800, 0xE000),
                                               rng.randrange(0x110000)])) for _ in range(size)))
        else:  # invalid UTF-8 after decoding, inside tags
            text = bytes(rng.randrange(256) for _ in range(size)).decode("utf-8", rng.choice(["surrogateescape",
                                                                                              "replace"]))
            out.append(rng.choice(PIECES[:4]) + text + rng.choice(PIECES[:8]) + text)
    return out


NASTY = [
    "{" * 100_000, "}" * 100_000, "\\boxed{" + "{" * 100_000, "\\boxed{" * 10_000,
    "\\boxed{" * 10_000 + "7" + "}" * 10_000,
    "\\boxed{9^{9^{9^{9}}}}", "<question>9^{9^{9^{9}}}</question>\\boxed{9^{9^{9^{9}}}}", "x" * 100_000,
    "<question>" + "a " * 50_000 + "</question>\\boxed{" + "1" * 50_000 + "}", "<question>" * 10_000 + "</question>",
    "</question>" * 10_000 + "<question>", "\x00" * 100_000, "<question>\x00</question>\\boxed{\x00}",
    "\\boxed " + "1" * 100_000, "\\boxed{" + "\\frac{" * 5_000 + "}" * 10_000, "\\boxed{" + "(" * 50_000 + "}",
    "\\boxed{" + "1," * 2_499 + "1}", "\\boxed{" + "x^" * 2_000 + "2}", "\\boxed{" + "\\sqrt" * 1000 + "{2}}",
    bytes(range(256)).decode("utf-8", "replace") * 400, bytes(range(256)).decode("utf-8", "surrogateescape") * 400,
    (b"\xff\xfe<question>\xc3(\xa0\xa1</question>\\boxed{\xed\xa0\x80}" * 2_000).decode("utf-8", "surrogateescape"),
]


def _every_parser(s, other):
    """Each parser and grader entry point on s; returns the slowest call's CPU seconds."""
    slowest = 0.0
    grader._key.cache_clear()  # s is graded from scratch (then cached across these calls, as in a majority vote)

    def call(fn, *args):
        nonlocal slowest
        t = time.thread_time()
        out = fn(*args)
        slowest = max(slowest, time.thread_time() - t)
        return out

    q, a = call(challenger.parse_question, s), call(challenger.parse_challenger_answer, s)
    b = call(grader.extract_boxed, s)
    assert q is None or (q == q.strip() and q in s and "<question>" in s)
    assert (a is None or a in s) and (b is None or b in s)
    assert isinstance(call(grader.is_equiv, s, other), bool)
    for none_is_answer in (False, True):
        v = call(solver.majority_vote, [s, other, b, s, None], none_is_answer)
        assert 0.0 <= v.p <= 1.0 and (v.majority is None or isinstance(v.majority, str))
    v = call(solver.vote, [s, other, None, s], solver.SolverConfig())
    assert 0.0 <= v.p <= 1.0 and len(v.answers) == 4
    assert call(solver.solver_reward, s, other) in (0.0, 1.0)
    return slowest


@pytest.mark.parametrize("strings, bound_s", [(fuzzed(10_000), 0.05), (NASTY, 0.2)], ids=["fuzz", "nasty"])
def test_parsers_and_grader_survive_hostile_output(strings, bound_s):
    rng = random.Random(1)
    worst = max((_every_parser(s, rng.choice(strings)), s[:60]) for s in strings)
    assert worst[0] < bound_s, worst


def test_repetition_penalty_on_hostile_questions():
    qs = [challenger.parse_question(s) or "?" for s in NASTY] + fuzzed(200, seed=2) + ["", " ", "\x00"]
    qs += ["a " * 50_000] * 3
    t = time.thread_time()
    pen = challenger.repetition_penalty(qs)
    assert time.thread_time() - t < 3.0
    assert len(pen) == len(qs) and all(1 / len(qs) - 1e-12 <= x <= 1.0 for x in pen)
    assert pen[-1] >= 3 / len(qs)  # the three copies share a cluster
    assert all(0.0 <= challenger.bleu4(h.split(), r.split()) <= 1.0 + 1e-12 for h in qs[::7] for r in qs[::11])


# ------------------------------------------------------------------------------------------- numerical faults

def test_non_finite_update_is_skipped_and_counted(world, tmp_path, monkeypatch):
    """The first Solver update's log-probs become NaN (so its loss and gradient): that update must be skipped."""
    real_logprobs, real_phase, seen = grpo.token_logprobs, train.solver_phase, dict(solver=False, calls=0)

    def token_logprobs(*a, **k):
        logp = real_logprobs(*a, **k)
        if seen["solver"] and torch.is_grad_enabled():  # an update, not the no-grad rollout log-probs
            seen["calls"] += 1
            return logp * float("nan") if seen["calls"] == 1 else logp
        return logp

    monkeypatch.setattr(train, "solver_phase", lambda *a, **k: seen.update(solver=True) or real_phase(*a, **k))
    monkeypatch.setattr(grpo, "token_logprobs", token_logprobs)
    out = tmp_path / "run"
    assert main_code(train_cmd(world, out)[2:]) == 0
    assert [(m["phase"], m.get("step"), m.get("skipped")) for m in metrics(out)] == [
        ("challenger", 0, 0), ("challenger", 1, 0), ("dataset", None, None), ("solver", 0, 1), ("solver", 1, 0),
        ("solver", 2, 0)]
    assert all(torch.isfinite(t).all() for t in load_file(out / "iter1/solver/model.safetensors").values())
    st = state_tensors(out)  # the model and AdamW state of the checkpoint
    assert st and all(torch.isfinite(t).all() for t in st.values())
    assert weights(out / "iter1/solver") != weights(world)  # the other updates did train


def test_run_with_every_question_filtered_out_stops_cleanly(world, tmp_path, capsys):
    """One new token cannot hold <question>...</question>: all 16 problems are unparsable."""
    out = tmp_path / "run"
    code = main_code(train_cmd(world, out, "--challenger-steps", "0", "--challenger-max-new-tokens", "1")[2:])
    err = capsys.readouterr().err
    assert code != 0 and "filtered out" in err.replace("\r", "\n").strip().splitlines()[-1], err[-2000:]
    assert [(m["kept"], m["unparsable"]) for m in metrics(out) if m["phase"] == "dataset"] == [(0, 16)]
    assert not (out / "iter1/solver").exists() and not (out / "iter1/dataset.jsonl").exists()


# ------------------------------------------------------------------------------------------- distributed faults

def test_torchrun_rank_that_raises_ends_the_job(world, tmp_path):
    """Rank 1 is late (a slow node: it prepares the run folder once rank 0 waits in a barrier) and raises in its
    2nd Challenger reward call while rank 0 waits for it in a collective: the job must exit non-zero, in bounded
    time."""
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", HELPER,
           *train_cmd(world, out)[2:]]
    t0 = time.time()
    with open(tmp_path / "stderr", "w+") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, FAULT="raise_on_rank1:2"), stdout=subprocess.DEVNULL,
                             stderr=f)
        try:
            p.wait(timeout=180)
        except subprocess.TimeoutExpired:
            p.terminate()  # torchrun stops its ranks on SIGTERM (they run in sessions of their own)
            p.wait(timeout=60)
        f.seek(0)
        err = f.read()
    assert time.time() - t0 < 180, "the job hung: " + err[-3000:]
    assert p.returncode != 0 and "injected fault on rank 1" in err, err[-3000:]
    assert state_meta(out) == dict(iteration=1, phase="challenger", step=0)
    assert not (out / "iter1/challenger").exists()
