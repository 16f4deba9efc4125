"""The Hugging Face checkpoint format, per family: config.json -> ModelConfig, and each weight's
name and layout -> ours. A new family is a config reader and a weight map here, and switches in
model.py's ModelConfig (not a copy of the model).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...query.errors import TdbqlError
from .model import ModelConfig

# --- config.json -> ModelConfig ---------------------------------------------------------------------


def config_from_hf(hf: dict, *, where: Path | str = "config.json") -> ModelConfig:
    arch = hf.get("model_type")
    parse = {"gpt2": _gpt2_config, "gpt_neox": _neox_config, "llama": _llama_config,
             "mistral": _llama_config, "qwen2": _llama_config}.get(arch)
    if parse is None:
        raise TdbqlError(f"{where}: unsupported model_type {arch!r} (gpt2, gpt_neox, llama, mistral, qwen2)")
    try:
        cfg = parse(hf)
        _validate(cfg)
    except KeyError as err:
        raise TdbqlError(f"{where}: cannot read {arch} config (no {err.args[0]!r})") from None
    except (ValueError, TypeError, ZeroDivisionError, AttributeError) as err:
        raise TdbqlError(f"{where}: cannot read {arch} config ({err})") from None
    return cfg


# the config fields that size tensors: positive integers (JSON may hold anything)
_COUNTS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_mlp", "n_ctx")


def _validate(cfg: ModelConfig) -> None:
    for name in _COUNTS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{_HF_NAMES.get((cfg.arch, name), name)} must be a positive integer, not {value!r}")
    for name in ("norm_eps", "rope_theta"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive number, not {value!r}")
    if not 0 <= cfg.rotary_dim <= cfg.d_head or cfg.rotary_dim % 2:
        raise ValueError(f"the rotary dimension {cfg.rotary_dim} must be even and at most d_head {cfg.d_head}")


_HF_NAMES = {("gpt2", "d_model"): "n_embd", ("gpt2", "n_layers"): "n_layer", ("gpt2", "n_heads"): "n_head",
             ("gpt2", "n_ctx"): "n_positions", ("gpt2", "d_mlp"): "n_inner"}


def _heads(hf: dict, d_model_key: str, heads_key: str) -> tuple[int, int, int]:
    """(d_model, n_heads, d_head) for families whose heads split d_model evenly."""
    d_model, n_heads = hf[d_model_key], hf[heads_key]
    for key, value in ((d_model_key, d_model), (heads_key, n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, not {value!r}")
    if d_model % n_heads:
        raise ValueError(f"{d_model_key} {d_model} is not a multiple of {heads_key} {n_heads}")
    return d_model, n_heads, d_model // n_heads


def _gpt2_config(hf: dict) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("only GPT-2 attention scaled by 1/sqrt(d_head) is supported")
    d_model, n_heads, d_head = _heads(hf, "n_embd", "n_head")
    return ModelConfig(
        arch="gpt2",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["n_layer"],
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=hf.get("n_inner") or 4 * d_model,
        n_ctx=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        act=hf.get("activation_function", "gelu_new"),
        tied_embeddings=hf.get("tie_word_embeddings", True),
    )


def _rope(hf: dict) -> tuple[float, dict, float]:
    """(rope_theta, scaling, partial_rotary_factor) from transformers 4.x or 5.x config keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    for key in ("rope_theta", "partial_rotary_factor", "type"):
        scaling.pop(key, None)
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")
    scaling["rope_type"] = kind
    return float(theta), scaling, float(partial)


def _neox_config(hf: dict) -> ModelConfig:
    d_model, n_heads, d_head = _heads(hf, "hidden_size", "num_attention_heads")
    theta, scaling, partial = _rope(hf)
    bias = hf.get("attention_bias", True)
    return ModelConfig(
        arch="gpt_neox",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=hf["intermediate_size"],
        n_ctx=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        act=hf.get("hidden_act", "gelu"),
        positions="rotary",
        rotary_dim=int(d_head * partial),
        rope_theta=theta,
        rope_scaling=scaling,
        parallel_residual=hf.get("use_parallel_residual", True),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=True,
        tied_embeddings=hf.get("tie_word_embeddings", False),
    )


def _llama_config(hf: dict) -> ModelConfig:
    arch = hf["model_type"]
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf.get("head_dim") or _heads(hf, "hidden_size", "num_attention_heads")[2]
    theta, scaling, partial = _rope(hf)
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention is not supported")
    window = hf.get("sliding_window") if arch == "mistral" else None
    attention_bias = hf.get("attention_bias", False)
    return ModelConfig(
        arch=arch,
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=d_head,
        d_mlp=hf["intermediate_size"],
        n_ctx=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        act=hf.get("hidden_act", "silu"),
        gated_mlp=True,
        positions="rotary",
        rotary_dim=int(d_head * partial),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=True if arch == "qwen2" else attention_bias,
        attn_out_bias=False if arch == "qwen2" else attention_bias,
        mlp_bias=hf.get("mlp_bias", False),
        tied_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=window,
    )


_PREFIXES = ("transformer.", "gpt_neox.", "model.")
# causal-mask and rotary buffers some checkpoints carry: we rebuild them
_IGNORED = re.compile(r".*\.(attn|attention)\.(masked_)?bias$|.*rotary_emb\.inv_freq$")


def map_weights(cfg: ModelConfig, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One HF tensor -> our (name, tensor) pairs (a fused qkv gives three). [] for buffers."""
    name = hf_name
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if _IGNORED.match(name):
        return []
    mapper = {"gpt2": _map_gpt2, "gpt_neox": _map_neox}.get(cfg.arch, _map_llama)
    out = mapper(cfg, name, tensor)
    if out is None:
        raise TdbqlError(f"unexpected weight {hf_name!r} for a {cfg.arch} model")
    return out


_GPT2_GLOBAL = {"wte.weight": "embed.weight", "wpe.weight": "pos_embed.weight", "ln_f.weight": "ln_f.weight",
                "ln_f.bias": "ln_f.bias", "lm_head.weight": "unembed.weight"}
_GPT2_BLOCK = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_proj": "attn.o", "mlp.c_fc": "mlp.fc_in",
               "mlp.c_proj": "mlp.fc_out"}


def _map_gpt2(cfg: ModelConfig, name: str, t: torch.Tensor):
    if name in _GPT2_GLOBAL:
        return [(_GPT2_GLOBAL[name], t)]
    m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        return None
    layer, module, kind = m.groups()
    conv1d = kind == "weight" and module != "ln_1" and module != "ln_2"
    t = t.T if conv1d else t  # Conv1D (in, out) -> Linear (out, in)
    base = f"blocks.{layer}."
    if module == "attn.c_attn":
        q, k, v = t.split(cfg.d_model, dim=0)
        return [(base + f"attn.{p}.{kind}", x) for p, x in zip("qkv", (q, k, v))]
    if module not in _GPT2_BLOCK:
        return None
    return [(base + f"{_GPT2_BLOCK[module]}.{kind}", t)]


_NEOX_GLOBAL = {"embed_in.weight": "embed.weight", "embed_out.weight": "unembed.weight",
                "final_layer_norm.weight": "ln_f.weight", "final_layer_norm.bias": "ln_f.bias"}
_NEOX_BLOCK = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2", "attention.dense": "attn.o",
               "mlp.dense_h_to_4h": "mlp.fc_in", "mlp.dense_4h_to_h": "mlp.fc_out"}


def _map_neox(cfg: ModelConfig, name: str, t: torch.Tensor):
    if name in _NEOX_GLOBAL:
        return [(_NEOX_GLOBAL[name], t)]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        return None
    layer, module, kind = m.groups()
    base = f"blocks.{layer}."
    if module == "attention.query_key_value":
        # rows are (head, [q|k|v], d_head): de-interleave into three (head * d_head) blocks
        per_head = t.reshape(cfg.n_heads, 3, cfg.d_head, *t.shape[1:])
        parts = [per_head[:, i].reshape(cfg.n_heads * cfg.d_head, *t.shape[1:]) for i in range(3)]
        return [(base + f"attn.{p}.{kind}", x) for p, x in zip("qkv", parts)]
    if module not in _NEOX_BLOCK:
        return None
    return [(base + f"{_NEOX_BLOCK[module]}.{kind}", t)]


_LLAMA_GLOBAL = {"embed_tokens.weight": "embed.weight", "norm.weight": "ln_f.weight",
                 "lm_head.weight": "unembed.weight"}
_LLAMA_BLOCK = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2",
                "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
                "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.fc_in", "mlp.up_proj": "mlp.fc_up",
                "mlp.down_proj": "mlp.fc_out"}


def _map_llama(cfg: ModelConfig, name: str, t: torch.Tensor):
    if name in _LLAMA_GLOBAL:
        return [(_LLAMA_GLOBAL[name], t)]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m or m.group(2) not in _LLAMA_BLOCK:
        return None
    layer, module, kind = m.groups()
    return [(f"blocks.{layer}.{_LLAMA_BLOCK[module]}.{kind}", t)]
