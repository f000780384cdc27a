"""train.py with one fault injected, for tests/test_reliability.py. Usage: FAULT=... python faulty_train.py ARGS

FAULT (environment):
  save_state:N      the N-th checkpoint save (torch.distributed.checkpoint.save) leaves half of its data file on
                    disk, before the folder is renamed into place, then the process SIGKILLs itself
  save_weights:N    the N-th safetensors save_file leaves half of its file on disk, then SIGKILL
  slow_rank1        RANK=1 is late (a slow node): it prepares the run folder once RANK=0 waits in a collective
  raise_on_rank1:N  as slow_rank1, and rank 1's N-th challenger.challenger_rewards call raises RuntimeError
  (empty)           no fault
Every mode audits reads: opening a *.tmp file for reading exits with code 99 (deleting a .tmp file or folder with
shutil.rmtree, which opens it read-only to look inside, is no read).
"""
import os
import shutil
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402

import challenger  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402

mode, _, n = os.environ.get("FAULT", "").partition(":")
calls = [0]


def is_tmp(path):
    path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
    return any(part.endswith(".tmp") for part in path.split(os.sep))


def die_at_nth():
    calls[0] += 1
    return calls[0] == int(n)


def kill_self(path, keep):
    os.truncate(path, keep)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def deleting():
    """True when the open being audited comes from shutil.rmtree (it opens its argument O_RDONLY, file or folder)."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename == shutil.__file__ and "rmtree" in f.f_code.co_name:
            return True
        f = f.f_back
    return False


def audit(event, args):
    if event == "open" and is_tmp(args[0]) and not os.path.isdir(args[0]) and not deleting():
        mode_, flags = args[1], args[2]
        if isinstance(mode_, str):
            reading = not any(c in mode_ for c in "wax+")
        else:
            reading = not flags & (os.O_WRONLY | os.O_RDWR)
        if reading:
            os.write(2, f"audit: a temporary file was read: {args[0]}\n".encode())
            os._exit(99)


sys.addaudithook(audit)
real_safe_open = safetensors.safe_open


def audited_safe_open(path, *a, **k):  # Rust reads files without Python's audit events
    audit("open", (path, "rb", 0))
    return real_safe_open(path, *a, **k)


safetensors.safe_open = audited_safe_open

if mode == "save_state":
    import torch.distributed.checkpoint as dcp
    real_save = dcp.save

    def save(state, *, checkpoint_id, **k):
        out = real_save(state, checkpoint_id=checkpoint_id, **k)
        if die_at_nth():
            data = os.path.join(checkpoint_id, "__0_0.distcp")
            kill_self(data, os.path.getsize(data) // 2)
        return out

    dcp.save = save
elif mode == "save_weights":
    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **k):
        real_save_file(tensors, filename, *a, **k)
        if die_at_nth():
            kill_self(filename, os.path.getsize(filename) // 2)

    safetensors.torch.save_file = save_file
elif mode == "raise_on_rank1" and os.environ.get("RANK") == "1":
    real_rewards = challenger.challenger_rewards

    def rewards(*a, **k):
        if die_at_nth():
            raise RuntimeError("injected fault on rank 1")
        return real_rewards(*a, **k)

    challenger.challenger_rewards = rewards
if mode in ("slow_rank1", "raise_on_rank1"):  # rank 1 prepares the run folder once rank 0 waits
    marker = sys.argv[sys.argv.index("--out-dir") + 1] + ".rank0-waits"
    if os.environ.get("RANK") == "0":  # its first collective is open_run_folder's on_rank0 broadcast
        real_on_rank0 = runtime.on_rank0

        def on_rank0(*a):
            open(marker, "a").close()
            return real_on_rank0(*a)

        runtime.on_rank0 = on_rank0  # runtime.open_run_folder looks it up in runtime
    elif os.environ.get("RANK") == "1":
        real_open_run_folder = train.open_run_folder

        def open_run_folder(*a, **k):  # the first step after init_process_group, which itself waits for every rank
            deadline = time.time() + 60
            while not os.path.exists(marker) and time.time() < deadline:
                time.sleep(0.05)
            assert os.path.exists(marker), "rank 0 never reached its first collective"
            time.sleep(1)  # rank 0 is in the broadcast by now
            return real_open_run_folder(*a, **k)

        train.open_run_folder = open_run_folder

train.main(sys.argv[1:])
