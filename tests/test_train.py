"""train.py end to end on a hand-set bigram world (conftest.make_markov_world): outputs, transformers
round trip, torchrun with two ranks, kill-and-resume, and user mistakes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_markov_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--iterations", "1", "--challenger-steps", "2", "--challenger-prompts", "4", "--m-answers", "4",
        "--n-problems", "16", "--solver-steps", "3", "--solver-problems", "4", "--updates-per-step", "2",
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
    for p in ["config.json", "metrics.jsonl", "iter1/dataset.jsonl", "iter1/challenger/config.json",
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
    r = run(train_cmd(world, out))
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
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_torchrun_two_ranks_equals_one_process(world, tmp_path):
    """gloo, FSDP2 over two CPU processes: sampling is seeded per item, not per rank, and each optimizer
    update takes the same global block of the batch, so two ranks draw the same batches as one process and
    the Challenger and the Solver after one step equal the single-process run's within float tolerance (at
    lr 1e-2, Adam turns float noise on a few exactly-zero gradients into lr-sized steps; those are bounded).
    The update itself is exact: test_grpo.py::test_fsdp_two_ranks_equal_one_process."""
    one = tmp_path / "one"
    r = run(train_cmd(world, one, "--solver-steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "ddp"
    with socket.socket() as s:  # a free port, so parallel runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           *train_cmd(world, out, "--solver-steps", "1")[1:]]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert [m["phase"] for m in rows] == ["challenger"] * 2 + ["dataset", "solver"]
    assert [m.get("reward") for m in rows] == [m.get("reward") for m in metrics(one)]
    from model import Transformer
    base = Transformer.from_pretrained(world)
    idx = torch.randint(0, base.config.vocab_size, (4, 20), generator=torch.Generator().manual_seed(0))
    for name in ("iter1/challenger", "iter1/solver"):
        a, b = Transformer.from_pretrained(str(out / name)), Transformer.from_pretrained(str(one / name))
        diffs = torch.cat([(p - q).abs().flatten() for p, q in zip(a.parameters(), b.parameters())])
        # Adam turns float noise on an exactly-zero gradient into an lr-sized step: allow a handful of elements
        assert (diffs > 1e-3).float().mean() < 1e-3, name
        with torch.no_grad():
            moved, apart = (a(idx) - base(idx)).abs().max(), (a(idx) - b(idx)).abs().max()
        assert apart < 0.05 * moved, (name, apart, moved)


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset"),
    (["--delta", "0.7"], "--delta"),
    (["--solver-group", "1"], "at least 2"),
    (["--iterations", "two"], "invalid int"),
    (["--model", "/no/such/folder"], "does not exist"),
])
def test_bad_settings_exit_cleanly(world, tmp_path, args, message):
    out = tmp_path / "bad"
    cmd = train_cmd(world, out) + args
    r = run(cmd)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_run_folder_with_other_settings_is_refused(full_run, world):
    out, _ = full_run
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in ("config.json", "metrics.jsonl")}
    r = run(train_cmd(world, out, "--delta", "0.1"))
    assert r.returncode == 2 and "other settings (delta)" in r.stderr and "Traceback" not in r.stderr
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in before}
