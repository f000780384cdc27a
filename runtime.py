"""
Where the code runs, nothing R-Zero: process group, this rank's share of a batch, device, model folders, files
written whole or not at all, memory. `gather(f(my_share(xs))) == f(xs)` for per-item f, whatever the ranks.
"""
import contextlib
import gc
import json
import math
import os
import shutil
import warnings
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


def init_distributed():
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*a):
    if rank() == 0:
        print(*a, flush=True)


def share(n):
    """The global indices of this rank's contiguous share of n items (equal shares when n % world == 0)."""
    return range(rank() * n // world(), (rank() + 1) * n // world())


def my_share(items):
    return [items[i] for i in share(len(items))]


def gather(items):
    parts = [list(items)] * world()
    if world() > 1:
        dist.all_gather_object(parts, parts[0])
    return [x for part in parts for x in part]


def device_and_dtype(device="auto", dtype="auto"):
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dt = getattr(torch, dtype) if dtype != "auto" else torch.bfloat16 if cuda else torch.float32
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"), dt


def resolve_model(name):
    """A local folder for `name`: a folder, "toy" (the toy world, built on first use by rank 0) or a hub id."""
    if name == "toy":
        import toy
        if rank() == 0:
            toy.toy_path()
        barrier()
        return toy.toy_path()
    if os.path.isdir(name):
        return name
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        raise FileNotFoundError(f"{name!r} is not a local folder and could not be fetched from the hub "
                                f"({type(e).__name__})") from None


@contextlib.contextmanager
def atomic(path):
    """Yields a temporary path to write a file or a folder at; on success it replaces `path` in one rename, so
    a crash (even SIGKILL) leaves the old `path` or the new one, never half of one."""
    tmp = path.rstrip("/") + ".tmp"
    if os.path.isdir(tmp):  # left by a crash
        shutil.rmtree(tmp)
    elif os.path.lexists(tmp):
        os.remove(tmp)
    os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
    yield tmp
    if os.path.isdir(tmp) and os.path.isdir(path):
        shutil.rmtree(path)  # a folder cannot be renamed over another: the one moment without either
    os.replace(tmp, path)


def write_text(path, text):
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def open_run_folder(out_dir, settings: dict, may_differ=()):
    """New: write config.json and an empty metrics.jsonl. Existing (a resume): same settings but for `may_differ`."""
    cfg_file = os.path.join(out_dir, "config.json")
    exists = os.path.isfile(cfg_file)
    barrier()  # every rank looks before rank 0 writes, so all take the same branch (and reach the same barriers)
    if exists:
        with open(cfg_file) as f:
            theirs = json.load(f)
        diff = sorted(k for k in settings | theirs if k not in may_differ and settings.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"run folder {out_dir!r} holds a run with other settings ({', '.join(diff)}); "
                             f"use another --out-dir")
        return
    if rank() == 0:
        write_text(cfg_file, json.dumps(settings, indent=2))
        open(os.path.join(out_dir, "metrics.jsonl"), "a").close()
    barrier()


def append_row(path, row: dict, key):
    """Rank 0 appends a JSON row to a JSON Lines file, replacing any row with the same key(row) (one that a run
    killed before its checkpoint left behind: the resumed step writes it again). NaN and inf become null."""
    if rank() == 0:
        with open(path) as f:
            rows = [line for line in f if key(json.loads(line)) != key(row)]
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        write_text(path, "".join(rows + [json.dumps(clean) + "\n"]))


def _storages(objs):
    """The distinct storages under the tensors in objs (a DTensor's: its local shard's)."""
    out = {}
    for o in objs:
        if isinstance(o, torch.Tensor) and not o.is_meta:
            with contextlib.suppress(Exception):  # tensor subclasses without a storage of their own raise
                st = getattr(o, "_local_tensor", o).untyped_storage()
                out[id(st)] = st
    return out.values()


def _census():
    """Every tensor storage the interpreter can reach (silencing deprecated attributes that warn when looked at)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _storages(gc.get_objects())


def live_tensor_bytes():
    return sum(st.nbytes() for st in _census())


class peak_memory(TorchDispatchMode):
    """`with peak_memory(device) as m:` -> m.bytes, the peak of live tensor bytes in the block (all alive counted).
    CUDA: max_memory_allocated. CPU: a census, then each storage an op creates counts until its Python handle (which
    lives as long as it) is finalized, on any thread (torch.profiler misses gloo's frees); FSDP resizes too. Slow."""

    def __init__(self, device):
        super().__init__()
        self.cuda, self.bytes = torch.device(device).type == "cuda", 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.live, self.sizes = 0, {}
        self._track(_census())
        self.bytes, resize = self.live, torch.UntypedStorage.resize_

        def resize_(st, n):  # FSDP2 frees and re-allocates gathered weights by resizing their storage
            if id(st) in self.sizes:
                self._set(id(st), n)
            return resize(st, n)
        self._resize, torch.UntypedStorage.resize_ = resize, resize_
        return super().__enter__()

    def _set(self, key, n):  # storage `key` now holds n bytes
        self.live += n - self.sizes.get(key, 0)
        self.sizes[key] = n
        self.bytes = max(self.bytes, self.live)

    def _track(self, storages):
        for st in storages:
            if id(st) not in self.sizes:
                self._set(id(st), st.nbytes())
                weakref.finalize(st, self._free, id(st))

    def _free(self, key):
        self.live -= self.sizes.pop(key, 0)  # 0: freed after the block ended

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._track(_storages(torch.utils._pytree.tree_leaves(out)))
        return out

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
            return False
        torch.UntypedStorage.resize_ = self._resize
        self.sizes = {}  # finalizers still pending find nothing to subtract
        return super().__exit__(*exc)
