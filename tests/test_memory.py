"""memory.py: the plan of the paper presets, a plan that does not fit, the start-up check, and the plan against
the peaks a real run measures (train.py --profile) under torchrun with two gloo ranks."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import make_markov_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
SMALL = ["--iterations", "1", "--challenger-steps", "2", "--challenger-prompts", "8", "--m-answers", "4",
         "--n-problems", "16", "--solver-steps", "2", "--solver-problems", "8", "--challenger-updates", "2",
         "--solver-updates", "2", "--challenger-max-new-tokens", "24", "--answer-max-new-tokens", "16",
         "--solver-max-new-tokens", "24", "--micro-batch", "4", "--memory-budget-gb", "0.002"]


def train(*args, torchrun=False):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *cmd[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("preset, gb", [("qwen3-4b-base", 40), ("qwen3-8b-base", 80)])
def test_paper_presets_fit_the_papers_gpus_with_64_rows_in_flight(preset, gb):
    r = train("--preset", preset, "--plan", "--gpus", "8", "--gpu-memory-gb", str(gb))
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("fits")
    rows = r.stdout.split("rows in flight: ")[1].split(" (at")[0]
    assert all(int(x.rsplit(" ", 1)[1]) >= 64 for x in rows.split(", ")), rows
    for phase in ("Challenger rollouts", "Challenger voting", "Challenger update", "dataset", "Solver rollouts",
                  "Solver update"):
        assert phase in r.stdout
    for item in ("weights", "optimizer", "reference", "sampling copy", "frozen solver", "kv cache", "activations",
                 "logprob chunk"):
        assert f"| {item} |" in r.stdout
    assert "estimated time per iteration" in r.stdout


def test_plan_that_does_not_fit_exits_2_with_one_sentence_and_a_setting_that_fits(tmp_path):
    r = train("--preset", "qwen3-8b-base", "--plan", "--gpus", "8", "--gpu-memory-gb", "40",
              "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: does not fit: the ") and "it would fit with --" in err[0]
    fix = err[0].split("it would fit with ")[1].split()
    again = train("--preset", "qwen3-8b-base", "--plan", "--gpus", "8", "--gpu-memory-gb", "40", *fix)
    assert again.returncode == 0 and again.stdout.rstrip().endswith("fits"), (fix, again.stderr)
    assert not (tmp_path / "run").exists()


def test_plan_reads_a_shape_or_a_folder_offline(tmp_path):
    shape = json.dumps(dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    r = train("--plan", "--shape", shape, "--gpus", "1", "--gpu-memory-gb", "4", "--memory-budget-gb", "0.1")
    assert r.returncode == 0 and "fits" in r.stdout, r.stderr
    r = train("--plan", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The bigram world with completions that always run to the cap (so the plan's longest rows are the real
    ones) and a model big enough that every item of the plan is visible: vocab 128, 4 layers, MLP 512."""
    return make_markov_world(tmp_path_factory.mktemp("mem"), filler=True, vocab=128, layers=4, intermediate=512,
                             heads=4, kv_heads=2, head_dim=32)


def test_run_that_cannot_fit_is_refused_before_it_writes_anything(world, tmp_path):
    r = train("--model", world, "--out-dir", str(tmp_path / "run"), *SMALL, "--gpu-memory-gb", "0.005")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: the run does not fit: the ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [[], ["--activation-checkpointing", "--expected-new-tokens", "8"]])
def test_plan_within_15_percent_of_measured_peaks_two_ranks(world, tmp_path, extra):
    out = tmp_path / "run"
    r = train("--model", world, "--out-dir", str(out), *SMALL, "--profile", *extra, torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "profile.json") as f:
        phases = json.load(f)["phases"]
    assert len(phases) == 6
    for name, p in phases.items():
        assert 0.85 <= p["peak"] / p["plan"] <= 1.15, (name, p)
