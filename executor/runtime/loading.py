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

from ...query.catalog import DTYPES, REGISTRY_NAMES
from ...query.context import ModelInfo
from ...query.errors import TdbqlError
from .autoencoder import Autoencoder, load_autoencoders
from .hf_format import config_from_hf, map_weights
from .model import ModelConfig, Transformer

DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "default_model"
DEFAULT_SAE_DIRS = (Path(__file__).parents[1] / "default_saes", DEFAULT_MODEL_DIR / "saes")

TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16)))  # the catalog's names



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
