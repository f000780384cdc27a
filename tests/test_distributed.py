"""torchrun at scale, on the CPU with gloo: two ranks sample and train as one process does; a 2-rank run killed with
SIGKILL at random moments resumes to the same models and metrics; a checkpoint written by 2 ranks resumes on 1 and
the reverse; two node ranks on one machine, one shared folder, equal one node; saving and loading a checkpoint keep
each rank near its own shard of host memory."""
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from test_train import ENV, ROOT, metrics, train_cmd, weights, world  # noqa: F401 (world: test_train's fixture)


def port():
    with socket.socket() as s:  # a free port, so parallel runs do not collide
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cmd, nproc=2, nodes=""):
    """cmd (train_cmd's) under torchrun: nproc ranks, or with nodes="--nnodes=2 --node_rank=K --master_port=P" one
    node of several."""
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    return launch + (nodes.split() if nodes else [f"--master_port={port()}"]) + cmd[1:]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def strip(rows):
    return [(m["phase"], m.get("step"), m.get("reward"), m.get("kept")) for m in rows]


def finished(cmd, out):  # out, once cmd (one process or a torchrun job) has run to its end
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return finished(train_cmd(world, out), out)


@pytest.fixture(scope="module")
def two(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    return finished(torchrun(train_cmd(world, out)), out)


def test_two_ranks_equal_one_process(world, one, two):
    """FSDP2 over two CPU processes: sampling is seeded per item, not per rank, and each optimizer update takes the
    same global block of the batch, so two ranks draw the same batches as one process and the models after each phase
    equal the single-process run's within float tolerance (at lr 1e-2, Adam turns float noise on a few exactly-zero
    gradients into lr-sized steps; those are bounded). The update itself is exact: test_grpo.py."""
    assert [m.get("reward") for m in metrics(two)] == [m.get("reward") for m in metrics(one)]
    assert [m["phase"] for m in metrics(two)] == ["challenger"] * 2 + ["dataset"] + ["solver"] * 3
    from model import Transformer
    base = Transformer.from_pretrained(world)
    idx = torch.randint(0, base.config.vocab_size, (4, 20), generator=torch.Generator().manual_seed(0))
    for name in ("iter1/challenger", "iter1/solver"):
        a, b = Transformer.from_pretrained(str(two / name)), Transformer.from_pretrained(str(one / name))
        diffs = torch.cat([(p - q).abs().flatten() for p, q in zip(a.parameters(), b.parameters())])
        # Adam's first steps move an element by ~lr whatever its gradient's size, so float noise on a gradient
        # that is ~0 flips its direction: allow a few elements, each at most 2 lr per step (lr 1e-2, <= 3 steps)
        assert (diffs > 1e-3).float().mean() < 1e-2 and diffs.max() < 6 * 1e-2, name
        with torch.no_grad():
            moved, apart = (a(idx) - base(idx)).abs().max(), (a(idx) - b(idx)).abs().max()
        assert apart < 0.05 * moved, (name, apart, moved)


def family(pid):
    """pid and its descendants (torchrun's ranks run in sessions of their own: a process group does not hold them)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [d for k in kids for d in family(int(k))]


def kill_at(cmd, out, rows, delay):
    """Starts cmd (one process, or a torchrun job), SIGKILLs it and every rank `delay` seconds after metrics.jsonl has
    `rows` rows."""
    log = open(out.parent / f"{out.name}.rows{rows}.log", "w+")  # what the run said, if it ended by itself
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None and not (
            os.path.isfile(out / "metrics.jsonl") and len(metrics(out)) >= rows):
        time.sleep(0.05)
    time.sleep(delay)
    if p.poll() is not None:
        log.seek(0)
        raise AssertionError(f"the run ended (code {p.returncode}) before it could be killed: {log.read()[-3000:]}")
    for pid in family(p.pid)[::-1]:  # the ranks first
        os.kill(pid, signal.SIGKILL)
    p.wait()
    log.close()


def test_two_ranks_killed_at_random_moments_resume_to_the_same_models(world, two, tmp_path):
    """Killed three times (whichever write was under way: a checkpoint, an export, a metrics row), then the same
    command: the same models, bit for bit, and the same metrics as the uninterrupted 2-rank run."""
    out, rng = tmp_path / "killed", random.Random(0)
    for rows in (1, 3, 4):  # in the Challenger phase, after the dataset phase, in the Solver phase
        kill_at(torchrun(train_cmd(world, out)), out, rows, rng.uniform(0, 0.3))
    r = run(torchrun(train_cmd(world, out)))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("iter1/challenger", "iter1/solver"):
        assert weights(out / name) == weights(two / name), name
    assert strip(metrics(out)) == strip(metrics(two))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_ranks(world, tmp_path, before, after):
    out = tmp_path / "run"
    cmd = train_cmd(world, out)
    kill_at(torchrun(cmd) if before == 2 else cmd, out, 4, 0.0)  # inside the Solver phase, after its first step
    r = run(torchrun(cmd) if after == 2 else cmd)
    assert r.returncode == 0 and "resuming iteration 1 solver phase after step" in r.stdout, r.stderr[-3000:]
    assert [m["phase"] for m in metrics(out)] == ["challenger"] * 2 + ["dataset"] + ["solver"] * 3
    assert (out / "iter1/solver/model.safetensors").is_file()


def test_two_node_ranks_on_one_machine_equal_one_node(world, two, tmp_path):
    """torchrun --nnodes=2, one rank each, one shared run folder: rank 0 decides every file-system branch and both
    nodes take it; the models equal the one-node 2-rank run's bit for bit."""
    out, p = tmp_path / "nodes", port()
    nodes = [subprocess.Popen(torchrun(train_cmd(world, out), 1, f"--nnodes=2 --node_rank={k} --master_addr=127.0.0.1 "
                                                                f"--master_port={p}"), cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    results = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    for name in ("iter1/challenger", "iter1/solver"):
        assert weights(out / name) == weights(two / name), name
    assert strip(metrics(out)) == strip(metrics(two))


MEMORY = '''
import os, sys, torch
sys.path.insert(0, {root!r})
import grpo, runtime
from model import Transformer
runtime.init_distributed(torch.device("cpu"))

def hwm():  # this process's peak resident memory so far, in bytes; writing 5 to clear_refs starts it again
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

def peak(fn):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss()
    out = fn()
    return out, hwm() - before

model, load = peak(lambda: runtime.trainable({world!r}, torch.device("cpu"), torch.float32))
opt = grpo.make_optimizer(model, grpo.GRPOConfig(lr=1e-3))
for p in model.parameters():
    p.grad = torch.ones_like(p)
opt.step()
_, save = peak(lambda: runtime.save_state({out!r}, model, opt, dict(step=0)))
opt2 = grpo.make_optimizer(model, grpo.GRPOConfig(lr=1e-3))
_, restore = peak(lambda: runtime.load_state({out!r}, model, opt2, dict(step=0)))
print("MEMORY", runtime.rank(), sum(p.numel() for p in Transformer.from_pretrained({world!r}).parameters()), load, save,
      restore, flush=True)
'''


def test_saving_and_loading_keep_each_rank_near_its_own_shard(tmp_path):
    """A 74M-parameter model (fp32: 296 MB; with AdamW's moments 889 MB, 444 MB per rank) on two ranks: loading it,
    saving and restoring its checkpoint raise each rank's peak resident memory by its own share, not the whole."""
    from conftest import make_hf_model
    world = tmp_path / "big"
    make_hf_model(world, "qwen3", vocab=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, num_key_value_heads=4)
    script = tmp_path / "memory.py"
    script.write_text(MEMORY.format(root=ROOT, world=str(world), out=str(tmp_path / "state")))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port()}",
                        str(script)], cwd=ROOT, env=dict(ENV, MALLOC_MMAP_THRESHOLD_="131072"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [list(map(int, line.split()[1:])) for line in r.stdout.splitlines() if line.startswith("MEMORY")]
    assert sorted(rank for rank, *_ in rows) == [0, 1], r.stdout
    for rank, n, load, save, restore in rows:  # measured: 0.90, 0.013 and 0.037 on each rank
        # loading: its fp32 shard (0.5) and the pages of the rows it read; the full load's: >= 2 (model and file)
        assert load < 1.2 * 4 * n, (rank, load / (4 * n))
        # the checkpoint (model and AdamW, 12 bytes a parameter): the full state gathered or read was >= 1 per rank
        assert save < 0.1 * 12 * n and restore < 0.5 * 12 * n, (rank, save / (12 * n), restore / (12 * n))

