"""
Where the code runs, nothing R-Zero: the process group and this rank's share of a batch, the device, model folders,
where a run's models live (sharded, parked in CPU memory, on the device), checkpoints, and files written whole or
not at all. `gather(f(my_share(xs))) == f(xs)` for per-item f, whatever the ranks.

Models: the trained one holds fp32 master weights (lr-1e-6 updates survive), sharded by FSDP2 under torchrun (bf16
compute, fp32 gradient reduction on GPU), as is its reference; a replica that only samples (the voting Solver, the
dataset's Challenger) waits in CPU memory on a GPU run, moved in to sample (`on_device`).
"""
import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import re
import shutil
from dataclasses import MISSING, fields

import torch
import torch.distributed as dist

from model import Transformer


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


def parse_settings(cls, argv=None, presets=None, known=False, **parser):
    """argv -> the settings dataclass `cls` (and, known=True, the arguments it does not know): each field is a flag
    --field-name (booleans also --no-field-name, lists take several values), its help the comment after the field,
    grouped under the `# --` headings of each class it inherits (before any, the class's docstring); with presets
    ({name: overrides}, the first the default), --preset NAME starts from one. A mistake raises ValueError in one
    line (argparse would print its whole usage screen first)."""
    ap = argparse.ArgumentParser(formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False, **parser)
    ap.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    names = list(presets or ())
    if presets:
        ap.add_argument("--preset", default=names[0], help=f"the settings to start from: {', '.join(names)} [{names[0]}]")
    kinds, first = {f.name: f for f in fields(cls)}, presets[names[0]] if presets else {}
    for part in cls.__mro__[:-1]:
        group = ap.add_argument_group(part.__doc__)
        for line in inspect.getsource(part).splitlines():
            if m := re.match(r"\s+# -- (.+)", line):
                group = ap.add_argument_group(m[1])
            elif (m := re.match(r"\s+(\w+): [^#]+#\s*(.+)", line)) and m[1] in kinds:
                f = kinds[m[1]]
                default = f.default_factory() if f.default is MISSING else f.default
                shown = f"{default!r}" + (f", {names[0]}: {first[f.name]!r}" if first.get(f.name, default) != default else "")
                kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))
                kw = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(
                    nargs="+", action="extend") if kind is list else dict(type=kind, metavar="X")
                group.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{m[2]} [{shown}]", **kw)
    a, rest = ap.parse_known_args(argv) if known else (ap.parse_args(argv), None)
    if presets and a.preset not in presets:
        raise ValueError(f"unknown preset {a.preset!r} (known: {', '.join(names)})")
    settings = cls(**(presets[a.preset] if presets else {}) | {k: v for k, v in vars(a).items()
                                                              if v is not None and k != "preset"})
    return (settings, rest) if known else settings


def device_and_dtype(device="auto", dtype="auto"):
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dt = getattr(torch, dtype) if dtype != "auto" else torch.bfloat16 if cuda else torch.float32
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"), dt


TOY_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_world")  # the world that ships (toy.py)


def resolve_model(name):
    """A local folder for `name`: a folder, "toy" (the toy world the project ships), or a hub id (downloaded)."""
    if name == "toy":
        return TOY_WORLD
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
        with open(path) if os.path.isfile(path) else contextlib.nullcontext([]) as f:
            rows = [line for line in f if key(json.loads(line)) != key(row)]
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        write_text(path, "".join(rows + [json.dumps(clean) + "\n"]))


# ------------------------------------------------------------------------------------------ where models live

def shard(model, dtype):
    """FSDP2 under torchrun: each block is a unit (gathered for its forward and backward only), then the root."""
    if world() > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for unit in [*model.layers, model]:
            fully_shard(unit, mp_policy=mp)
    return model


def free_memory(device):
    """Frees what finished phases left: FSDP's hooks tie models into reference cycles, which only gc frees."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trainable(path, device, dtype, checkpoint_blocks=False):
    """fp32 master weights, sharded under torchrun; checkpoint_blocks: recompute each block in backward."""
    free_memory(device)
    model = Transformer.from_pretrained(path, dtype=torch.float32, device=device)
    model.checkpoint_blocks = checkpoint_blocks
    return shard(model, dtype)


def frozen(path, device, dtype, reference=False):
    """A model without grads in the compute dtype: the reference sharded, a sampling replica parked in CPU memory."""
    free_memory(device)
    dev = device if reference or device.type == "cpu" else "cpu"
    model = Transformer.from_pretrained(path, dtype=dtype, device=dev).eval().requires_grad_(False)
    return shard(model, dtype) if reference else model


@contextlib.contextmanager
def on_device(model, device):
    """A parked replica on the GPU for the block; back in CPU memory after it. Nothing to move on a CPU run."""
    gpu = device.type == "cuda"
    try:
        yield model.to(device) if gpu else model
    finally:
        if gpu:
            model.to("cpu")
            torch.cuda.empty_cache()


def sampling_copy(model, device, dtype):
    """The trained model as a plain module to decode with: each weight cast on its shard, then gathered (no full
    fp32 copy). One process in float32 samples from the model itself."""
    if world() == 1 and dtype == torch.float32:
        return model
    tied = model.config.tie_word_embeddings
    sd = {k: v.to(dtype) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}
    plain = Transformer.from_state_dict(model.config, sd, model.hf_config, device=device)
    return plain.eval().requires_grad_(False)


def export(model, tokenizer, path):
    """The model as a Hugging Face folder with the tokenizer, written whole or not at all (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # every rank takes part in gathering an FSDP model's weights; rank 0 gets them
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        with atomic(path) as tmp:
            Transformer.save_pretrained(model, tmp, state_dict=sd)
            tokenizer.save_pretrained(tmp)
    barrier()


def save_state(path, model, opt, meta):
    """The phase in progress after a completed step: model, optimizer, meta. Atomic: a crash leaves the previous one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        with atomic(path) as tmp:
            torch.save(dict(model=msd, optim=osd, meta=meta, rng=torch.get_rng_state()), tmp)
    barrier()


def load_state(path, model, opt, meta):
    """Loads the state saved at `path` into model and opt if its meta matches `meta` (the phase) -> its meta, or None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    st = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None
    if st is None or any(st["meta"][k] != v for k, v in meta.items()):
        return None
    set_state_dict(model, opt, model_state_dict=st["model"], optim_state_dict=st["optim"],
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(st["rng"])
    return st["meta"]
