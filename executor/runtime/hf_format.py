"""The Hugging Face checkpoint format, per family: config.json -> ModelConfig, and each weight's
name and layout -> ours. A new family is a config reader and a weight map here, and switches in
model.py's ModelConfig (not a copy of the model).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...query.errors import TdbqlError
from .config import ModelConfig

# --- config.json -> ModelConfig ---------------------------------------------------------------------


def config_from_hf(hf: dict, *, where: Path | str = "config.json") -> ModelConfig:
    arch = hf.get("model_type")
    parse = _READERS.get(arch)
    if parse is None:
        raise TdbqlError(f"{where}: unsupported model_type {arch!r} (supported: {', '.join(FAMILIES)})")
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
    for name in ("norm_eps", "rope_theta", "local_rope_theta", "attn_scale", "attn_softcap", "final_softcap",
                 "embed_scale", "sliding_window"):
        value = getattr(cfg, name)
        if value is None and name not in ("norm_eps", "rope_theta", "embed_scale"):
            continue
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


def _llama_like(hf: dict, **switches) -> ModelConfig:
    """The Llama-shaped families: RMSNorm, rotary, gated MLP, grouped-query attention."""
    d_head = hf.get("head_dim") or _heads(hf, "hidden_size", "num_attention_heads")[2]
    theta, scaling, partial = switches.pop("rope", None) or _rope(hf)
    attention_bias = hf.get("attention_bias", False)
    window, window_layers = _windows(hf)
    defaults = dict(
        arch=hf["model_type"],
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
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
        qkv_bias=attention_bias,
        attn_out_bias=attention_bias,
        mlp_bias=hf.get("mlp_bias", False),
        tied_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=window,
        window_layers=window_layers,
    )
    cfg = ModelConfig(**{**defaults, **switches})
    if cfg.post_norms and (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias):
        raise ValueError("biases in a family with post-norms are not supported")
    return cfg


def _windows(hf: dict) -> tuple[int | None, tuple[int, ...] | None]:
    """(sliding window, the layers that use it; None: all) from layer_types (transformers 5)
    or the older per-family keys."""
    arch, n = hf["model_type"], hf["num_hidden_layers"]
    if arch in ("llama", "olmo2") or (arch in ("qwen2", "qwen3") and not hf.get("use_sliding_window")):
        return None, None
    window = hf.get("sliding_window")
    if window is None:
        return None, None
    types = hf.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n:
            raise ValueError(f"layer_types must list one type for each of the {n} layers")
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"layer type {sorted(unknown)[0]!r} is not supported (sliding_attention, full_attention)")
        return window, tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    if arch in ("qwen2", "qwen3"):  # layers from max_window_layers on
        return window, tuple(range(hf.get("max_window_layers", n), n))
    if arch == "gemma2":  # every other layer, the first one windowed
        return window, tuple(range(0, n, 2))
    if arch in ("gemma3_text", "gemma3"):
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return window, tuple(i for i in range(n) if (i + 1) % pattern)
    return window, None  # mistral, phi3: every layer


def _llama_config(hf: dict) -> ModelConfig:
    if hf["model_type"] == "qwen2":  # q, k, v biases, none on the output
        return _llama_like(hf, qkv_bias=True, attn_out_bias=False)
    return _llama_like(hf)


def _qwen3_config(hf: dict) -> ModelConfig:
    return _llama_like(hf, qk_norm="head")


def _phi3_config(hf: dict) -> ModelConfig:
    return _llama_like(hf, norm_eps=hf.get("rms_norm_eps", 1e-5), qkv_bias=False, attn_out_bias=False)


def _olmo2_config(hf: dict) -> ModelConfig:
    return _llama_like(hf, norm_eps=hf.get("rms_norm_eps", 1e-5), pre_norms=False, post_norms=True,
                       qk_norm="full", norm_weight_fp32=True)


def _gemma_config(hf: dict) -> ModelConfig:
    """Gemma 2 and Gemma 3 (text): (1 + w) norms before and after each sublayer, GeGLU, scaled
    embeddings, query_pre_attn_scalar, soft-capping, windowed layers (Gemma 3: with their own
    rope base, and q/k norms)."""
    gemma3 = hf["model_type"] != "gemma2"
    if hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention is not supported")
    return _llama_like(
        hf,
        rope=_gemma3_rope(hf) if gemma3 else None,
        local_rope_theta=_gemma3_local_theta(hf) if gemma3 else None,
        act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        norm_offset=1.0,
        norm_weight_fp32=True,
        post_norms=True,
        qk_norm="head" if gemma3 else "none",
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping", None if gemma3 else 50.0),
        final_softcap=hf.get("final_logit_softcapping", None if gemma3 else 30.0),
        embed_scale=float(hf["hidden_size"]) ** 0.5,
        tied_embeddings=hf.get("tie_word_embeddings", True),
    )


def _gemma3_params(hf: dict) -> dict:
    params = hf.get("rope_parameters") or {}
    return params if "full_attention" in params or "sliding_attention" in params else {}


def _gemma3_rope(hf: dict) -> tuple[float, dict, float]:
    """Global layers' rope: rope_parameters.full_attention (transformers 5), else rope_theta
    and rope_scaling."""
    full = _gemma3_params(hf).get("full_attention")
    if full is None:
        return _rope({**hf, "rope_parameters": None, "rope_theta": hf.get("rope_theta", 1_000_000.0)})
    return _rope({"rope_parameters": full})


def _gemma3_local_theta(hf: dict) -> float:
    local = _gemma3_params(hf).get("sliding_attention")
    if local is None:
        return float(hf.get("rope_local_base_freq", 10_000.0))
    if local.get("rope_type", "default") != "default":
        raise ValueError("rope scaling on windowed layers is not supported")
    return float(local.get("rope_theta", 10_000.0))


def _gemma3_multimodal(hf: dict) -> ModelConfig:
    """A Gemma 3 image-text checkpoint: its text model (the vision tower's weights are skipped)."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("a gemma3 config needs a text_config object")
    defaults = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                    sliding_window=4096)  # transformers' Gemma3TextConfig defaults (a text_config may be sparse)
    cfg = _gemma_config({**defaults, **text, "model_type": "gemma3_text"})
    cfg.arch = "gemma3"
    return cfg


_PREFIXES = ("transformer.", "gpt_neox.", "model.language_model.", "language_model.model.", "model.")
# causal-mask and rotary buffers some checkpoints carry: we rebuild them
_IGNORED = re.compile(r".*\.(attn|attention)\.(masked_)?bias$|.*rotary_emb\.inv_freq$")
# the image side of an image-text checkpoint (Gemma 3): its text model is what is loaded
_OTHER_TOWERS = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def skipped_weight(cfg: ModelConfig, hf_name: str) -> bool:
    """Whether a checkpoint tensor belongs to no part of the text model (a vision tower)."""
    return cfg.arch == "gemma3" and bool(_OTHER_TOWERS.match(hf_name))


def map_weights(cfg: ModelConfig, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One HF tensor -> our (name, tensor) pairs (a fused qkv gives three). [] for buffers."""
    if skipped_weight(cfg, hf_name):
        return []
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
_ATTN = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
         "self_attn.o_proj": "attn.o"}
_QK_NORMS = {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
_GLU = {"mlp.gate_proj": "mlp.fc_in", "mlp.up_proj": "mlp.fc_up", "mlp.down_proj": "mlp.fc_out"}
_LLAMA_BLOCK = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2", **_ATTN, **_GLU}
_GEMMA_BLOCK = {"input_layernorm": "ln1", "post_attention_layernorm": "ln1_post", "pre_feedforward_layernorm": "ln2",
                "post_feedforward_layernorm": "ln2_post", **_ATTN, **_QK_NORMS, **_GLU}
# per family (the rest: _LLAMA_BLOCK). Note post_attention_layernorm: the norm before the MLP in
# Llama and Phi-3, the norm of attention's output in Gemma and OLMo 2.
_BLOCKS = {
    "qwen3": {**_LLAMA_BLOCK, **_QK_NORMS},
    "gemma2": _GEMMA_BLOCK,
    "gemma3_text": _GEMMA_BLOCK,
    "gemma3": _GEMMA_BLOCK,
    "olmo2": {"post_attention_layernorm": "ln1_post", "post_feedforward_layernorm": "ln2_post", **_ATTN, **_QK_NORMS,
              **_GLU},
    "phi3": {"input_layernorm": "ln1", "post_attention_layernorm": "ln2", "self_attn.o_proj": "attn.o",
             "mlp.down_proj": "mlp.fc_out"},
}


def _map_llama(cfg: ModelConfig, name: str, t: torch.Tensor):
    if name in _LLAMA_GLOBAL:
        return [(_LLAMA_GLOBAL[name], t)]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        return None
    layer, module, kind = m.groups()
    base = f"blocks.{layer}."
    if cfg.arch == "phi3" and module == "self_attn.qkv_proj":  # rows: [q (heads) | k (kv heads) | v]
        sizes = [cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head]
        if t.shape[0] != sum(sizes):
            raise ValueError(f"qkv_proj has {t.shape[0]} rows, not {sum(sizes)}")
        return [(base + f"attn.{p}.{kind}", x) for p, x in zip("qkv", t.split(sizes, dim=0))]
    if cfg.arch == "phi3" and module == "mlp.gate_up_proj":  # rows: [gate | up]
        if t.shape[0] != 2 * cfg.d_mlp:
            raise ValueError(f"gate_up_proj has {t.shape[0]} rows, not {2 * cfg.d_mlp}")
        gate, up = t.split(cfg.d_mlp, dim=0)
        return [(base + f"mlp.fc_in.{kind}", gate), (base + f"mlp.fc_up.{kind}", up)]
    block = _BLOCKS.get(cfg.arch, _LLAMA_BLOCK)
    if module not in block:
        return None
    return [(base + f"{block[module]}.{kind}", t)]


# model_type -> config reader; the one list of supported families (errors name them from here)
_READERS = {
    "gpt2": _gpt2_config, "gpt_neox": _neox_config, "llama": _llama_config, "mistral": _llama_config,
    "qwen2": _llama_config, "qwen3": _qwen3_config, "phi3": _phi3_config, "gemma2": _gemma_config,
    "gemma3_text": _gemma_config, "gemma3": _gemma3_multimodal, "olmo2": _olmo2_config,
}
FAMILIES: tuple[str, ...] = tuple(_READERS)
