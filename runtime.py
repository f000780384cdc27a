"""Where the code runs, nothing R-Zero: the process group and this rank's share of a batch, the device, model folders,
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
import warnings
from dataclasses import MISSING, fields
from datetime import timedelta

import safetensors
import torch
import torch.distributed as dist

from model import ModelConfig, Transformer, read_config, rope_inv_freq, weight_files


# MKL (torch's CPU matrix products on x86) rounds a row's last bits by its place in the batch and by the thread count
# unless asked for reproducible results: with this, a sampled row does not depend on the rows beside it (README).
os.environ.setdefault("MKL_CBWR", "AVX2")  # read at MKL's first product, so importing this module is early enough
OBJECTS = None  # the gloo group of object collectives and barriers (init_distributed)
warnings.filterwarnings("ignore", "torch.distributed is disabled")  # torch.distributed.checkpoint in one process


def init_distributed(device, minutes=180):
    """CUDA: NCCL (gloo beside it), a group of one without torchrun, so 1 and N GPUs run the same FSDP2 code; CPU:
    gloo under torchrun. OBJECTS (gloo) waits on rank-0 work off the GPU. `minutes`: NCCL's 10 is too short."""
    global OBJECTS
    if dist.is_initialized() or (device.type == "cpu" and "RANK" not in os.environ):
        return
    timeout, alone = timedelta(minutes=minutes), "RANK" not in os.environ
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timeout,
                                **dict(store=dist.HashStore(), rank=0, world_size=1) if alone else {})
    else:
        dist.init_process_group("gloo", timeout=timeout)
    OBJECTS = dist.new_group(backend="gloo", timeout=timeout)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if world() > 1:
        dist.barrier(group=OBJECTS)


def on_rank0(fn, *args):
    """fn(*args) on rank 0, its value (or its exception) on every rank: a decision every rank takes alike."""
    if world() == 1:
        return fn(*args)
    box = [None]
    if rank() == 0:
        try:
            box[0] = (True, fn(*args))
        except Exception as e:
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0, group=OBJECTS)
    if not box[0][0]:
        raise box[0][1]
    return box[0][1]


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
        dist.all_gather_object(parts, parts[0], group=OBJECTS)
    return [x for part in parts for x in part]


def parse_settings(cls, argv=None, presets=None, known=False, **parser):
    """argv -> `cls` (known=True: and the unknown arguments): each field a flag, its help the field's comment, in
    groups of the `# --` headings; --preset NAME. A mistake raises ValueError (argparse prints its usage first)."""
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
    from huggingface_hub import snapshot_download

    get = lambda local: snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
                                          local_files_only=local)
    with contextlib.suppress(Exception):  # one download per node; a failure is every rank's, below
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            get(False)
    barrier()
    try:
        return get(True)
    except Exception as e:
        raise FileNotFoundError(f"{name!r} is not a local folder and could not be fetched from the hub "
                                f"({type(e).__name__})") from None


@contextlib.contextmanager
def atomic(path):
    """A temporary path to write at, renamed over `path` on success: a crash leaves the old or the new, never half."""
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


def read_jsonl(path):
    """The rows of a JSON Lines file, or None if there is no such file."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def open_run_folder(out_dir, settings: dict, may_differ=()):
    """New: write config.json and an empty metrics.jsonl. Existing (a resume): same settings but for `may_differ`."""
    cfg_file = os.path.join(out_dir, "config.json")
    theirs = on_rank0(lambda: read_json(cfg_file) if os.path.isfile(cfg_file) else None)  # every rank: one branch
    if theirs is not None:
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
    """Rank 0 appends `row`, replacing one of the same key (a killed run's: the resumed step writes it again)."""
    if rank() == 0:
        with open(path) if os.path.isfile(path) else contextlib.nullcontext([]) as f:
            rows = [line for line in f if key(json.loads(line)) != key(row)]
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        write_text(path, "".join(rows + [json.dumps(clean) + "\n"]))


# ------------------------------------------------------------------------------------------ where models live

def shard(model, dtype):
    """FSDP2 where there is a process group: each block a unit, then the root (grpo.train_step frees a reference's)."""
    if dist.is_initialized():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for unit in [*model.layers, model]:
            fully_shard(unit, mp_policy=mp)
    return model


def load_sharded(path, device, param_dtype, dtype):
    """Built on meta, sharded, each rank reading its own rows of the checkpoint: no rank holds the whole model."""
    from torch.distributed.tensor import Shard

    hf = read_config(path)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(hf), hf).to(param_dtype)
    shard(model, dtype).to_empty(device=device)  # each rank allocates its shards only
    files, names = weight_files(path), dict(model.named_parameters())  # lists a tied weight once
    if missing := sorted(set(map(Transformer.hf_name, names)) - set(files))[:5]:
        raise ValueError(f"checkpoint {path!r}: weights do not match a {model.config.model_type} model: missing {missing}")
    with torch.no_grad():
        for name, p in names.items():
            n, start = Shard.local_shard_size_and_offset(p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank())
            with safetensors.safe_open(files[Transformer.hf_name(name)], framework="pt") as f:
                p.to_local().copy_(f.get_slice(Transformer.hf_name(name))[start:start + n])
    model.inv_freq = rope_inv_freq(model.config, device)  # a buffer to_empty left unset
    return model


def free_memory(device):
    """Frees what finished phases left: FSDP's hooks tie models into reference cycles, which only gc frees."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trainable(path, device, dtype, checkpoint_blocks=False):
    free_memory(device)
    model = load_sharded(path, device, torch.float32, dtype) if dist.is_initialized() else \
        Transformer.from_pretrained(path, dtype=torch.float32, device=device)
    model.checkpoint_blocks = checkpoint_blocks
    return model


def frozen(path, device, dtype, reference=False):
    """A model without grads in the compute dtype: the reference sharded, a sampling replica parked in CPU memory."""
    free_memory(device)
    if reference and dist.is_initialized():
        return load_sharded(path, device, dtype, dtype).eval().requires_grad_(False)
    model = Transformer.from_pretrained(path, dtype=dtype, device=device if device.type == "cpu" else "cpu")
    return model.eval().requires_grad_(False)


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
    """The trained model as a plain module to decode with, each weight cast on its shard, then gathered."""
    if not dist.is_initialized() and dtype == torch.float32:
        return model
    tied = model.config.tie_word_embeddings
    sd = {k: v.to(dtype) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}
    plain = Transformer.from_state_dict(model.config, sd, model.hf_config, device=device)
    return plain.eval().requires_grad_(False)


def export(model, tokenizer, path):
    """The model and tokenizer as a Hugging Face folder, written whole or not at all (by rank 0)."""
    with atomic(path) if rank() == 0 else contextlib.nullcontext() as tmp:
        Transformer.save_pretrained(model, tmp, write=rank() == 0)
        if rank() == 0:
            tokenizer.save_pretrained(tmp)
    barrier()


def save_state(path, model, opt, meta):
    """The phase in progress, a torch.distributed.checkpoint folder (each rank's shards; N ranks' loads on M)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    with atomic(path) if rank() == 0 else contextlib.nullcontext(path + ".tmp") as tmp:
        barrier()  # rank 0 has cleared what a crash left at tmp
        dcp.save(dict(model=msd, optim=osd), checkpoint_id=tmp, process_group=OBJECTS, no_dist=world() == 1)
        if rank() == 0:
            write_text(os.path.join(tmp, "meta.json"), json.dumps(meta | dict(rng=torch.get_rng_state().tolist())))
    barrier()


def load_state(path, model, opt, meta):
    """Loads the state saved at `path` into model and opt if it is of phase `meta` -> its meta, or None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved = on_rank0(lambda: read_json(os.path.join(path, "meta.json")) if os.path.isdir(path) else None)
    if saved is None or any(saved[k] != v for k, v in meta.items()):
        return None
    msd, osd = get_state_dict(model, opt)  # (a fresh AdamW's state is made here: only ever call it to load into)
    sd = dict(model=msd, optim=osd)
    dcp.load(sd, checkpoint_id=path, process_group=OBJECTS, no_dist=world() == 1)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    torch.set_rng_state(torch.tensor(saved.pop("rng"), dtype=torch.uint8))
    return saved
