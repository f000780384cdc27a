"""The decoder-only transformer that R-Zero trains, written out by hand, loading Hugging Face checkpoints.

One module covers Qwen3 (Qwen3-4B/8B-Base: RMSNorm on each head of q and k, explicit head_dim), Qwen2 / Qwen2.5
(bias on q, k and v) and Llama 3 (OctoThinker-3B/8B: "llama3" RoPE scaling): grouped-query attention, RMSNorm,
SwiGLU, rotate-half RoPE (the checkpoints' own convention: no weight permutation), tied or untied embeddings. A module
built on the meta device loads with `load_state_dict(strict=True, assign=True)`: no random init, no second copy.

The training and decode forwards are one function; the KV cache is an argument that does the attention read (KVCache
here; engine.PagedKVCache over pages). Batches without a cache are right-padded and need no mask (a real token never
attends to a later pad). Left out on purpose: sliding-window attention (off in every checkpoint we target), RoPE
other than default/llama3, dropout.
"""
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import safetensors  # safetensors.safe_open and .torch.save_file are looked up at each call: tests wrap them
import safetensors.torch
from torch.utils.checkpoint import checkpoint

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}  # supported


@dataclass
class ModelConfig:
    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v projections carry a bias, and o too except in Qwen2
    qk_norm: bool = True  # Qwen3's per-head RMSNorm on q and k

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":  # transformers 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters)
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            raise ValueError(f"model_type {mt!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"RoPE type {rope_type!r} is not supported (supported: default, llama3)")
        heads = d["num_attention_heads"]
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=rope if rope_type == "llama3" else None,
            tie_word_embeddings=d.get("tie_word_embeddings", False), qk_norm=mt == "qwen3",
            attention_bias=True if mt == "qwen2" else d.get("attention_bias", False))


    def to_hf(self) -> dict:  # a config.json for a model built from a ModelConfig, not loaded from a checkpoint
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rope_scaling", "qk_norm")}
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d["rope_parameters"] = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        return d


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    # op for op as transformers computes it: float32, on the CPU, then moved; so it equals theirs bit for bit (float64
    # then cast is an ulp off here and there, and a GPU's pow may be: a phase error that grows with the position)
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    if cfg.rope_scaling:  # llama3: stretch low frequencies by `factor`, keep high ones, interpolate between
        s = cfg.rope_scaling
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq.to(device or torch.get_default_device())


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd); cos, sin: (B, 1, T, hd). Rotate-half: pairs are (i, i + hd/2), as in the checkpoints.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # the mean square in float32, as the reference does, then back to the input dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Keys and values pre-allocated, (n_layer, rows, n_kv, max_len, hd), as gpt-fast. Slot = position: rows of
    different lengths need no left padding, a query at position p reads its row's slots 0..p in place (each head's
    slots adjacent: a CPU's attention over them is ~1.3x faster than over (rows, max_len, n_kv, hd), same bits)."""

    def __init__(self, cfg: ModelConfig, rows, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def token_bytes(cfg: ModelConfig, dtype) -> int:  # keys + values of one token in every layer
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize

    def write(self, layer, rows, k, v, input_pos):  # k, v: (B, n_kv, T, hd) into (rows[b], slot input_pos[b, t])
        rows = torch.as_tensor(rows, device=k.device)[:, None]  # (B, 1)
        self.k[layer][rows, :, input_pos] = k.transpose(1, 2)  # indexed view is (B, T, n_kv, hd)
        self.v[layer][rows, :, input_pos] = v.transpose(1, 2)

    def attend(self, layer, q, k, v, input_pos, kv_len):  # batch row b is cache row b; -> (B, nh, T, hd)
        B = len(input_pos)
        self.write(layer, torch.arange(B, device=q.device), k, v, input_pos)  # (a range would be copied int by int)
        k, v = (c[layer][:B, :, :kv_len] for c in (self.k, self.v))  # (B, n_kv, kv_len, hd), in place
        return masked_attention(q, k, v, input_pos)

    def copy_rows(self, rows, src, length):  # slots 0..length-1 of row src (or of each of rows src) into `rows`
        src = [src] if isinstance(src, int) else src
        for layer in (*self.k, *self.v):  # a layer at a time, so the copy's temporary is one layer's
            layer[rows, :, :length] = layer[src, :, :length]

    def keep_rows(self, rows, length):
        """Keep `rows` (the others dropped) as rows 0..len(rows)-1: a kept row past the end moves its first `length`
        slots into a dropped row's place (a copy per dropped row, not per kept row) -> the old row of each row."""
        n, kept, movers = len(rows), set(rows), iter(r for r in rows if r >= len(rows))
        order = [r if r in kept else next(movers) for r in range(n)]
        moved = [i for i in range(n) if order[i] != i]
        if moved:
            self.copy_rows(moved, [order[i] for i in moved], length)
        self.k, self.v = self.k[:, :n], self.v[:, :n]
        return order


def masked_attention(q, k, v, input_pos, fold=None):
    """q (B, nh, T, hd) at positions input_pos (B, T) attends to k, v (B, n_kv, S, hd) up to its position."""
    B, nh, T, hd = q.shape
    S = k.size(2)
    mask = (torch.arange(S, device=q.device) <= input_pos[..., None]).unsqueeze(1)  # (B, 1, T, S)
    if not (q.is_cuda if fold is None else fold):  # CPU: the default run's arithmetic (folding changes rounding)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # each group's query heads folded into the query length: fused CUDA kernels take this mask, not with enable_gqa
    g = nh // k.size(1)
    mask = mask.unsqueeze(2).expand(B, 1, g, T, S).reshape(B, 1, g * T, S)
    return F.scaled_dot_product_attention(q.reshape(B, -1, g * T, hd), k, v, attn_mask=mask).reshape(B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size,
                                bias=cfg.attention_bias and cfg.model_type != "qwen2")
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, input_pos=None, kv_len=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh or nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = cache.attend(self.layer, q, k, v, input_pos, kv_len)  # the cache decides how attention reads it
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, input_pos=None, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, input_pos, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, hf_config: dict | None = None):
        super().__init__()
        self.config, self.hf_config = cfg, hf_config or {}  # hf_config: written back verbatim by save_pretrained
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing: keep each block's input, recompute it in backward

    def forward(self, idx, cache=None, input_pos=None, kv_len=None, return_hidden=False):
        """idx: (B, T) token ids. Without a cache: positions 0..T-1, causal. With a cache: input_pos (B, T)
        gives each token's position (= its cache slot); kv_len (default max position + 1) bounds the slots read."""
        B, T = idx.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device).expand(B, T)
        if cache is not None and kv_len is None:
            kv_len = int(input_pos.max()) + 1
        freqs = input_pos[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, hd)
        x = self.embed_tokens(idx)  # (B, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.layers:
            if self.checkpoint_blocks and torch.is_grad_enabled():  # training forward: O(layers) saved tensors
                x = checkpoint(block, x, cos, sin, cache, input_pos, kv_len, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, input_pos, kv_len)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)  # (B, T, D) or (B, T, vocab)

    def new_cache(self, batch, max_len):
        return KVCache(self.config, batch, max_len, self.embed_tokens.weight.dtype, self.inv_freq.device)

    @staticmethod
    def hf_name(name):  # ours are the checkpoints' names without the leading "model."
        return name if name.startswith("lm_head.") else "model." + name

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder {path!r} does not exist")
        hf = read_config(path)
        cfg = ModelConfig.from_hf(hf)
        files = sorted(set(weight_files(path).values()))
        if dtype is None:
            name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
            dtype = getattr(torch, name) if name in ("float32", "bfloat16", "float16") else torch.float32
        device = torch.device(device or "cpu")
        sd = {}
        for file in files:
            try:
                with safetensors.safe_open(file, framework="pt", device=str(device)) as f:
                    sd |= {key.removeprefix("model."): f.get_tensor(key).to(dtype) for key in f.keys()
                           if not (cfg.tie_word_embeddings and key == "lm_head.weight")}  # tied: never read twice
            except Exception as e:  # safetensors raises its own error type on a truncated or corrupt file
                raise ValueError(f"cannot read weights file {file!r}: {e}") from None
        try:
            return cls.from_state_dict(cfg, sd, hf, dtype, device)
        except ValueError as e:
            raise ValueError(f"checkpoint {path!r}: {e}") from None

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state_dict, hf_config=None, dtype=None, device=None):
        """A model holding state_dict's tensors (used, not copied, where no cast or move is asked), built on meta."""
        with torch.device("meta"):
            model = cls(cfg, hf_config)
        sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
        if cfg.tie_word_embeddings and "embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        names = model.state_dict().keys()
        missing, extra = [sorted(map(cls.hf_name, ks))[:5] for ks in (names - sd.keys(), sd.keys() - names)]
        if missing or extra:
            raise ValueError(f"weights do not match a {cfg.model_type} model: missing {missing}, unexpected {extra}")
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg, model.embed_tokens.weight.device)
        return model

    def save_pretrained(self, path, write=True, max_shard_bytes=5 * 10**9):
        """config.json and the weights as transformers writes them, an FSDP2 model's gathered one at a time (every
        rank calls this; those with `write` write). Not atomic: callers write a temporary folder and rename it."""
        sd = {k: v for k, v in self.state_dict().items() if not (self.config.tie_word_embeddings and k == "lm_head.weight")}
        shards, size = [[]], 0  # a tied head is the embedding's tensor: safetensors refuses aliases
        for k, v in sd.items():
            if shards[-1] and size + v.numel() * v.element_size() > max_shard_bytes:
                shards, size = shards + [[]], 0
            shards[-1].append(k)
            size += v.numel() * v.element_size()
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        names = names if len(shards) > 1 else ["model.safetensors"]
        for name, keys in zip(names, shards):
            full = {self.hf_name(k): sd[k].full_tensor() if hasattr(sd[k], "full_tensor") else sd[k] for k in keys}
            if write:
                save_file({k: v.detach().contiguous().cpu() for k, v in full.items()}, os.path.join(path, name))
        if not write:
            return
        if len(shards) > 1:
            weight_map = {self.hf_name(k): name for name, keys in zip(names, shards) for k in keys}
            total = sum(v.numel() * v.element_size() for v in sd.values())
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f, indent=2)
        hf = dict(self.hf_config) or self.config.to_hf()
        hf["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        hf.pop("torch_dtype", None)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() lists a tied weight once


UMASK = os.umask(0o022)  # the umask files get: safetensors writes 0600 whatever it is (a temporary file, renamed)
os.umask(UMASK)


def save_file(tensors, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~UMASK)


def weight_files(path) -> dict:
    """{checkpoint key: its file} of a model folder: model.safetensors.index.json's map, or one model.safetensors."""
    index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    if not os.path.isfile(single):
        raise FileNotFoundError(f"model folder {path!r} has no model.safetensors or model.safetensors.index.json")
    return dict.fromkeys(weight_names(single), single)


def weight_names(file) -> list:
    try:
        with safetensors.safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type on a truncated or corrupt file
        raise ValueError(f"cannot read weights file {file!r}: {e}") from None


def read_config(path) -> dict:  # a model folder's config.json
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model folder {path!r} has no config.json")
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def check_folder(path):
    """One clear error, before a run touches anything, for a folder we cannot load: config, weights, tokenizer."""
    ModelConfig.from_hf(read_config(path))
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {path!r} has no *.safetensors weights")
    for file in files:
        weight_names(os.path.join(path, file))
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"model folder {path!r} has no tokenizer.json, tokenizer.model or vocab.json")
