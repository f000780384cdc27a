"""The GPU checks, run by `python -m pytest -m cuda tests` on a CUDA machine (.ci/gpu runs them and bench.py --preset
gpu); skipped elsewhere: the toy world on CUDA within its memory plan, a bf16 FSDP2 update (policy and reference equal
before it) and a checkpoint round trip, the attention kernel decoding runs on, and bench.py's GPU preset."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_model
from test_train import ROOT

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def test_the_toy_run_on_cuda_stays_within_its_memory_plan(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--device", "cuda", "--profile", "--iterations",
                        "1", "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "profile.json") as f:
        phases = json.load(f)["phases"]
    assert phases and all(t["peak"] <= 1.15 * t["plan"] and t["reserved"] >= t["peak"] for t in phases.values()), phases


def test_a_bf16_fsdp2_update_and_a_checkpoint_round_trip(tmp_path):
    import grpo
    import runtime

    world, dev = str(tmp_path / "qwen3"), torch.device("cuda", 0)
    make_hf_model(world, "qwen3")
    runtime.init_distributed(dev)  # a group of one: the FSDP2 code that N GPUs run
    model, ref = runtime.trainable(world, dev, torch.bfloat16), runtime.frozen(world, dev, torch.bfloat16, True)
    cfg = grpo.GRPOConfig(lr=1e-3, micro_batch=2)
    ids = torch.randint(0, 128, (4, 24), device=dev, generator=torch.Generator(dev).manual_seed(0))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 8:] = True
    with torch.no_grad():  # the policy (fp32 masters in bf16) and the reference compute alike before any update
        assert torch.equal(grpo.token_logprobs(model, ids, mask, 1.0), grpo.token_logprobs(ref, ids, mask, 1.0))
    rollout = grpo.Rollout(ids, mask, torch.tensor([1.0, -1.0, 0.5, -0.5], device=dev))
    opt = grpo.make_optimizer(model, cfg)
    stats = grpo.train_step(model, opt, rollout, ref, cfg, updates=2)
    assert stats["skipped"] == 0 and all(p.to_local().dtype == torch.float32 for p in model.parameters())
    runtime.save_state(str(tmp_path / "state"), model, opt, dict(step=0))
    again = runtime.trainable(world, dev, torch.bfloat16)
    opt2 = grpo.make_optimizer(again, cfg)
    assert runtime.load_state(str(tmp_path / "state"), again, opt2, dict(step=0)) == dict(step=0)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), name
    grpo.train_step(model, opt, rollout, ref, cfg, updates=2)
    grpo.train_step(again, opt2, rollout, ref, cfg, updates=2)
    assert all(torch.equal(p.full_tensor(), q.full_tensor()) for p, q in zip(model.parameters(), again.parameters()))


def test_decoding_runs_on_a_fused_attention_kernel(tmp_path):
    """A decode step as the engine makes it (bf16, grouped-query heads, a mask over the cache) with the math kernel
    ruled out: it fails if only the math kernel, which repeats keys and values per head group, would run."""
    import engine
    from model import Transformer
    from torch.nn.attention import SDPBackend, sdpa_kernel

    make_hf_model(tmp_path / "qwen3", "qwen3")
    model = Transformer.from_pretrained(str(tmp_path / "qwen3"), dtype=torch.bfloat16, device="cuda").eval()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        outs = engine.generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], n=3, max_new_tokens=8, seed=0)
    assert all(len(c.tokens) == 8 for row in outs for c in row)


def test_bench_gpu_preset():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--preset", "gpu", "--repeats", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=3600)
    print(r.stdout)  # the table (python -m pytest -s -m cuda tests shows it)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollout: ours / transformers" in r.stdout and "training: ours / transformers" in r.stdout
