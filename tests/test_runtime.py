"""runtime.py on one process: whole-or-nothing writes, this rank's share of a batch, devices, model folders."""
import os
import re

import pytest
import torch

import runtime


# ------------------------------------------------------------------------------------------- atomic writes

def test_atomic_keeps_the_old_file_when_the_body_raises(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    runtime.write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with runtime.atomic(path) as tmp:
            with open(tmp, "w") as f:
                f.write("new, half writ")
            raise RuntimeError("crash in the middle of a write")
    assert open(path).read() == "old\n"
    with runtime.atomic(path) as tmp:  # the next write replaces it whole
        assert tmp != path
        with open(tmp, "w") as f:
            f.write("new\n")
        assert open(path).read() == "old\n"  # nothing is visible at `path` before the body ends
    assert open(path).read() == "new\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_atomic_replaces_a_folder_and_drops_a_stale_temporary(tmp_path):
    path = str(tmp_path / "iter1" / "solver")
    os.makedirs(path)
    open(os.path.join(path, "old.safetensors"), "w").close()
    os.makedirs(path + ".tmp")  # a crashed export left a half-written temporary folder
    open(os.path.join(path + ".tmp", "half.safetensors"), "w").close()
    with runtime.atomic(path) as tmp:
        assert not os.path.exists(tmp)  # the stale temporary is gone before the body writes
        os.makedirs(tmp)
        for name in ("config.json", "model.safetensors"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
        assert os.listdir(path) == ["old.safetensors"]  # the old folder stays whole until the body ends
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]  # the old folder's files are gone
    assert open(os.path.join(path, "config.json")).read() == "config.json"
    assert sorted(os.listdir(tmp_path / "iter1")) == ["solver"]
    with runtime.atomic(str(tmp_path / "new") + "/") as tmp:  # a new folder; a trailing slash is the same path
        os.makedirs(tmp)
    assert os.path.isdir(tmp_path / "new") and not os.path.exists(str(tmp_path / "new") + ".tmp")


def test_atomic_folder_body_that_raises_leaves_the_old_folder(tmp_path):
    path = str(tmp_path / "solver")
    os.makedirs(path)
    open(os.path.join(path, "model.safetensors"), "w").close()
    with pytest.raises(KeyboardInterrupt):
        with runtime.atomic(path) as tmp:
            os.makedirs(tmp)
            raise KeyboardInterrupt
    assert os.listdir(path) == ["model.safetensors"]


def test_write_text_creates_parent_folders_and_overwrites(tmp_path, monkeypatch):
    path = str(tmp_path / "a" / "b" / "results.md")
    runtime.write_text(path, "é\n")
    assert open(path, encoding="utf-8").read() == "é\n"
    runtime.write_text(path, "second")
    assert open(path, encoding="utf-8").read() == "second"
    assert os.listdir(tmp_path / "a" / "b") == ["results.md"]
    monkeypatch.chdir(tmp_path / "a")
    runtime.write_text("config.json", "x")  # a bare file name (no folder part) works too
    assert open(tmp_path / "a" / "config.json").read() == "x"


# ------------------------------------------------------------------------------------------- ranks

def test_one_process_does_everything():
    assert (runtime.rank(), runtime.world()) == (0, 1)
    assert runtime.share(7) == range(0, 7) and runtime.share(0) == range(0, 0)
    items = list("abcde")
    assert runtime.my_share(items) == items and runtime.gather(runtime.my_share(items)) == items
    assert runtime.gather(x for x in "ab") == ["a", "b"]  # any iterable, returned as a list
    runtime.barrier()  # no process group: a no-op


@pytest.mark.parametrize("world", [2, 3, 8])
def test_shares_tile_the_batch_in_rank_order(monkeypatch, world):
    """share(n) of every rank, as each rank computes it: contiguous, in rank order, covering 0..n-1 once,
    sizes within one of each other (equal when world divides n)."""
    monkeypatch.setattr(runtime, "world", lambda: world)
    for n in (0, 1, 5, 16, 17):
        shares = []
        for r in range(world):
            monkeypatch.setattr(runtime, "rank", lambda r=r: r)
            shares.append(runtime.share(n))
            assert runtime.my_share(list(range(100, 100 + n))) == [100 + i for i in shares[-1]]
        assert [i for s in shares for i in s] == list(range(n))
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1 and (n % world or len(set(sizes)) == 1)


def test_print0_prints_on_rank_0_only(monkeypatch, capsys):
    runtime.print0("hello", 1)
    monkeypatch.setattr(runtime, "rank", lambda: 1)
    runtime.print0("not me")
    assert capsys.readouterr().out == "hello 1\n"


def test_device_and_dtype():
    assert runtime.device_and_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert runtime.device_and_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    dev, dt = runtime.device_and_dtype()
    if torch.cuda.is_available():
        assert dev.type == "cuda" and dt == torch.bfloat16
    else:
        assert (dev, dt) == (torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------------- model folders

def test_resolve_model(tmp_path):
    assert runtime.resolve_model(str(tmp_path)) == str(tmp_path)  # a local folder is itself
    for missing in (str(tmp_path / "nope"), "./nope", "../nope/x", "~/nope", "nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            runtime.resolve_model(missing)


# ------------------------------------------------------------------------------------------- a run folder

def test_open_run_folder_creates_then_checks_the_settings(tmp_path):
    import json

    out = str(tmp_path / "runs" / "a")
    runtime.open_run_folder(out, dict(seed=0, lr=0.1, out_dir=out))
    assert json.loads(open(os.path.join(out, "config.json")).read()) == dict(seed=0, lr=0.1, out_dir=out)
    assert open(os.path.join(out, "metrics.jsonl")).read() == ""
    open(os.path.join(out, "metrics.jsonl"), "w").write("{}\n")
    runtime.open_run_folder(out, dict(seed=0, lr=0.1, out_dir="elsewhere"), may_differ=("out_dir",))  # resume
    assert open(os.path.join(out, "metrics.jsonl")).read() == "{}\n"  # an existing run folder is left alone
    for other, named in ((dict(seed=1, lr=0.1, out_dir=out), "(seed)"), (dict(seed=0, out_dir=out), "(lr)"),
                         (dict(seed=2, lr=0.1, new=1, out_dir=out), "(new, seed)")):
        with pytest.raises(ValueError, match="other settings " + re.escape(named)):
            runtime.open_run_folder(out, other)
    assert json.loads(open(os.path.join(out, "config.json")).read())["seed"] == 0


def test_append_row_replaces_the_row_with_the_same_key(tmp_path):
    import json

    path = str(tmp_path / "metrics.jsonl")
    open(path, "w").close()
    key = lambda r: (r["phase"], r.get("step"))
    for row in (dict(phase="a", step=0, x=1.0), dict(phase="a", step=1, x=float("nan")), dict(phase="b", x=2),
                dict(phase="a", step=1, x=float("-inf"), y=3)):
        runtime.append_row(path, row, key)
    rows = [json.loads(line) for line in open(path)]
    assert rows == [dict(phase="a", step=0, x=1.0), dict(phase="b", x=2), dict(phase="a", step=1, x=None, y=3)]


def test_no_import_circle_among_the_projects_modules():
    """Each file's imports of the project's modules (also those inside functions) form no cycle."""
    import ast

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    graph = {}
    for m in mods:
        with open(os.path.join(root, m + ".py")) as f:
            tree = ast.parse(f.read())
        graph[m] = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
            n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] &= mods - {m}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph[a])

    assert "toy" not in graph["runtime"] and not [m for m in mods if reaches(m, m)]
