"""Load a Hugging Face-format checkpoint into our Transformer (safetensors only, never pickle).

`load_model(name)` accepts
- "default": the embedded model in executor/default_model/ (its autoencoders are attached too);
- a local folder with config.json, model.safetensors (or model.safetensors.index.json + shards)
  and tokenizer.json;
- a hub id ("EleutherAI/pythia-70m"), found in the local Hugging Face cache
  ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub), or downloaded when huggingface_hub is
  installed and the hub is reachable;
- a TransformerLens registry name from REGISTRY_NAMES ("gpt2-small", "pythia-70m", ...), which is
  just a hub id under another name.

Parameter names, Hugging Face -> ours (prefixes "transformer.", "gpt_neox.", "model." dropped):

GPT-2 (Conv1D weights are stored (in, out): transposed to Linear's (out, in))
    wte -> embed, wpe -> pos_embed, ln_f -> ln_f, lm_head -> unembed (tied to wte if absent)
    h.L.ln_1 / ln_2 -> blocks.L.ln1 / ln2
    h.L.attn.c_attn (d_model, 3*d_model) -> blocks.L.attn.q / k / v (split in thirds)
    h.L.attn.c_proj -> blocks.L.attn.o
    h.L.mlp.c_fc / c_proj -> blocks.L.mlp.fc_in / fc_out
GPT-NeoX
    embed_in -> embed, final_layer_norm -> ln_f, embed_out -> unembed
    layers.L.input_layernorm / post_attention_layernorm -> blocks.L.ln1 / ln2
    layers.L.attention.query_key_value (head, [q|k|v], d_head) interleaved -> blocks.L.attn.q / k / v
    layers.L.attention.dense -> blocks.L.attn.o
    layers.L.mlp.dense_h_to_4h / dense_4h_to_h -> blocks.L.mlp.fc_in / fc_out
Llama, Mistral, Qwen2
    embed_tokens -> embed, norm -> ln_f, lm_head -> unembed (tied to embed_tokens if configured)
    layers.L.input_layernorm / post_attention_layernorm -> blocks.L.ln1 / ln2
    layers.L.self_attn.q_proj / k_proj / v_proj / o_proj -> blocks.L.attn.q / k / v / o
    layers.L.mlp.gate_proj / up_proj / down_proj -> blocks.L.mlp.fc_in / fc_up / fc_out
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from .autoencoder import Autoencoder, load_autoencoders
from .model import ModelConfig, Transformer
from ...query.catalog import DTYPES
from ...query.context import ModelInfo
from ...query.errors import TdbqlError

DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "default_model"
DEFAULT_SAE_DIRS = (Path(__file__).parents[1] / "default_saes", DEFAULT_MODEL_DIR / "saes")

TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16)))  # the catalog's names

# TransformerLens-style names -> hub ids (the models our architectures cover).
REGISTRY_NAMES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
    **{f"pythia-{s}": f"EleutherAI/pythia-{s}" for s in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b")},
    **{f"pythia-{s}-deduped": f"EleutherAI/pythia-{s}-deduped" for s in ("70m", "160m", "410m", "1b", "1.4b")},
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2-1.5b": "Qwen/Qwen2-1.5B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
}


@dataclass
class LoadedModel:
    name: str
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    saes: dict[tuple[str, int], Autoencoder] = field(default_factory=dict)

    def info(self) -> ModelInfo:
        c = self.config
        latents = tuple(sorted((site, layer, ae.n_latents) for (site, layer), ae in self.saes.items()))
        return ModelInfo(
            name=self.name,
            arch=c.arch,
            n_layers=c.n_layers,
            n_heads=c.n_heads,
            d_model=c.d_model,
            d_mlp=c.d_mlp,
            vocab_size=c.vocab_size,
            n_ctx=c.n_ctx,
            sae_latents=latents,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids as the tokenizer's own post-processor makes them (e.g. Llama's BOS)."""
        return self.tokenizer.encode(text).ids

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)

    def attach_sae(self, site: str, layer: int, ae: Autoencoder) -> None:
        try:
            self.model.attach_sae(site, layer, ae)
        except ValueError as err:
            raise TdbqlError(f"cannot attach autoencoder at {site} layer {layer}: {err}") from None
        self.saes[(site, layer)] = ae

    def load_sae(self, path: str | Path, site: str | None = None) -> list[Autoencoder]:
        """Load the autoencoder(s) at `path` (a file, a folder, or a folder of folders) and attach
        each at its own site and layer; `site`, when given, must match."""
        aes = load_autoencoders(path)
        for ae in aes:
            if site is not None and ae.site != site:
                raise TdbqlError(f"{path}: autoencoder reads {ae.site!r}, not {site!r}")
            self.attach_sae(ae.site, ae.layer, ae)
        return aes

    def detach_saes(self) -> None:
        self.model.detach_saes()
        self.saes.clear()

    def decoder_in_resid(self, site: str, layer: int) -> torch.Tensor:
        """Decoder rows as residual-stream writes, (n_latents, d_model); mlp: W_dec @ W_out(l)."""
        ae = self.saes.get((site, layer))
        if ae is None:
            raise TdbqlError(f"no autoencoder attached at {site} layer {layer}")
        if site == "mlp":
            return ae.W_dec @ self.model.W_out(layer)
        return ae.W_dec


# --- entry point --------------------------------------------------------------------------------


def load_model(name: str = "default", *, dtype: str = "fp32", device: str = "cpu") -> LoadedModel:
    if dtype not in TORCH_DTYPES:
        raise TdbqlError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    torch_dtype = TORCH_DTYPES[dtype]
    torch_device = _device(device)
    folder = resolve_model_folder(name)
    config = config_from_hf(_read_json(folder / "config.json"), where=folder)
    model = build_model(config, read_state_dict(folder, torch_device), dtype=torch_dtype, device=torch_device)
    tokenizer = _load_tokenizer(folder)
    loaded = LoadedModel(name, model, tokenizer, config, torch_device, torch_dtype)
    if name == "default":
        for sae_dir in DEFAULT_SAE_DIRS:
            if sae_dir.is_dir() and any(sae_dir.iterdir()):
                loaded.load_sae(sae_dir)
                break
    return loaded


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TdbqlError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TdbqlError(f"device {device!r} requested but CUDA is not available")
    return dev


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TdbqlError(f"missing {path.name} in {path.parent}") from None
    except json.JSONDecodeError as err:
        raise TdbqlError(f"{path}: invalid JSON ({err})") from None


def _load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise TdbqlError(f"missing tokenizer.json in {folder} (only fast tokenizers are supported)")
    return Tokenizer.from_file(str(path))


# --- finding the folder -------------------------------------------------------------------------


def resolve_model_folder(name: str) -> Path:
    if name == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise TdbqlError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}")
        return DEFAULT_MODEL_DIR
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name in REGISTRY_NAMES:
        return hub_snapshot(REGISTRY_NAMES[name])
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not path.exists():
        return hub_snapshot(name)
    if path.exists() or "/" in name or name.startswith("."):
        raise TdbqlError(f"model folder {name!r} not found (or not a folder)")
    raise TdbqlError(f"unknown model {name!r}: not a folder, a hub id (org/name) or a registry name")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot folder for `repo_id`, downloading it if the hub is reachable."""
    cache = hf_cache_dir()
    found = _cached_snapshot(cache, repo_id)
    if found is not None:
        return found
    if _hub_reachable():
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            pass
        else:
            try:
                patterns = ["*.json", "*.safetensors", "tokenizer.model"]
                return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
            except Exception as err:  # noqa: BLE001 -- any hub failure becomes one line
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise TdbqlError(f"could not download {repo_id!r} into {cache}: {reason}") from None
    raise TdbqlError(f"model {repo_id!r} is not in the Hugging Face cache {cache} and the hub is not reachable")


def _cached_snapshot(cache: Path, repo_id: str) -> Path | None:
    ids = [repo_id] + (["openai-community/" + repo_id] if "/" not in repo_id else [])
    if repo_id.startswith("openai-community/"):
        ids.append(repo_id.split("/", 1)[1])  # old un-namespaced gpt2 repos
    for rid in ids:
        repo = cache / ("models--" + rid.replace("/", "--"))
        ref = repo / "refs" / "main"
        if ref.exists():
            snap = repo / "snapshots" / ref.read_text().strip()
            if (snap / "config.json").exists():
                return snap
        snaps = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if snaps:
            return snaps[-1].parent
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


# --- config.json -> ModelConfig ---------------------------------------------------------------------


def config_from_hf(hf: dict, *, where: Path | str = "config.json") -> ModelConfig:
    arch = hf.get("model_type")
    parse = {"gpt2": _gpt2_config, "gpt_neox": _neox_config, "llama": _llama_config,
             "mistral": _llama_config, "qwen2": _llama_config}.get(arch)
    if parse is None:
        raise TdbqlError(f"{where}: unsupported model_type {arch!r} (gpt2, gpt_neox, llama, mistral, qwen2)")
    try:
        return parse(hf)
    except (KeyError, ValueError) as err:
        raise TdbqlError(f"{where}: cannot read {arch} config ({err})") from None


def _gpt2_config(hf: dict) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("only GPT-2 attention scaled by 1/sqrt(d_head) is supported")
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        arch="gpt2",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["n_layer"],
        n_heads=n_heads,
        d_head=d_model // n_heads,
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
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = d_model // n_heads
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
    d_head = hf.get("head_dim") or d_model // n_heads
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


# --- weights ------------------------------------------------------------------------------------


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise TdbqlError(f"{folder} has only pickle weights (*.bin/*.pt); tdbql loads safetensors only")
    raise TdbqlError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")


def read_state_dict(folder: Path, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, read one at a time from memory-mapped safetensors files straight
    onto `device` (so a GPU load never holds the whole model in host memory)."""
    for path in safetensors_files(folder):
        if not path.exists():
            raise TdbqlError(f"missing weight shard {path.name} in {folder}")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


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


def build_model(cfg: ModelConfig, hf_weights, *, dtype: torch.dtype, device: torch.device) -> Transformer:
    """A Transformer with HF weights assigned (no random init, no copies beyond dtype/device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for hf_name, tensor in hf_weights:
        for ours, value in map_weights(cfg, hf_name, tensor):
            if cfg.tied_embeddings and ours == "unembed.weight":
                continue  # tied: the embedding is the unembedding
            if ours not in params:
                raise TdbqlError(f"unexpected weight {hf_name!r} for a {cfg.arch} model")
            if tuple(value.shape) != tuple(params[ours].shape):
                raise TdbqlError(f"weight {hf_name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(params[ours].shape)} from config.json")
            _assign(model, ours, value.to(device=device, dtype=dtype).contiguous())
            loaded.add(ours)
    if cfg.tied_embeddings:
        model.unembed.weight = model.embed.weight
        loaded.add("unembed.weight")
    missing = sorted(set(params) - loaded)
    if missing == ["unembed.weight"] and "embed.weight" in loaded:
        # no lm_head saved although not declared tied: transformers ties it in that case too
        model.unembed.weight = model.embed.weight
        cfg.tied_embeddings = True
    elif missing:
        raise TdbqlError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]!r}")
    model.requires_grad_(False)
    return model.eval()


def _assign(model: Transformer, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
