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
Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3, OLMo 2 (hf_format.py: _BLOCKS)
    embed_tokens -> embed, norm -> ln_f, lm_head -> unembed (tied to embed_tokens if configured)
    layers.L.input_layernorm / post_attention_layernorm -> blocks.L.ln1 / ln2
    layers.L.self_attn.q_proj / k_proj / v_proj / o_proj -> blocks.L.attn.q / k / v / o
    layers.L.self_attn.q_norm / k_norm -> blocks.L.attn.q_norm / k_norm (Qwen3, Gemma 3, OLMo 2)
    layers.L.mlp.gate_proj / up_proj / down_proj -> blocks.L.mlp.fc_in / fc_up / fc_out
    Phi-3: layers.L.self_attn.qkv_proj rows [q | k | v] -> attn.q / k / v; mlp.gate_up_proj rows
    [gate | up] -> mlp.fc_in / fc_up
    Gemma: post_attention_layernorm -> ln1_post, pre_feedforward_layernorm -> ln2,
    post_feedforward_layernorm -> ln2_post; OLMo 2: the same two post-norms and no pre-norms;
    Gemma 3 image-text checkpoints: model.language_model.* is the text model, the vision tower
    and projector are skipped
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
from .hf_format import config_from_hf, map_weights, skipped_weight
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
        """Token ids as the tokenizer's own post-processor makes them (e.g. Llama's BOS); an id
        the model has no embedding for (a tokenizer.json of another model) is a TdbqlError."""
        ids = self.tokenizer.encode(text).ids
        if ids and max(ids) >= self.config.vocab_size:
            raise TdbqlError(f"the tokenizer gives id {max(ids)} for {text[:40]!r}, beyond the model's vocabulary of "
                             f"{self.config.vocab_size}: tokenizer.json does not match the weights")
        return ids

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


def load_model(name: str = "default", *, dtype: str = "fp32", device: str = "cpu",
               offline: bool = False, local: bool = True) -> LoadedModel:
    """Load `name` (see the module docstring). `offline`: never the network (hub ids from the
    local cache only); `local` False: never a local path (--safe sets both for scripts)."""
    if dtype not in TORCH_DTYPES:
        raise TdbqlError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    torch_dtype = TORCH_DTYPES[dtype]
    torch_device = _device(device)
    folder = resolve_model_folder(name, offline=offline, local=local)
    config = config_from_hf(_read_json(folder / "config.json"), where=folder / "config.json")
    files = safetensors_files(folder)
    check_layers(config, files)
    model = build_model(config, read_state_dict(files, torch_device), dtype=torch_dtype, device=torch_device)
    tokenizer = _load_tokenizer(folder)
    loaded = LoadedModel(name, model, tokenizer, config, torch_device, torch_dtype)
    if name == "default":
        for sae_dir in DEFAULT_SAE_DIRS:
            if sae_dir.is_dir() and any(sae_dir.iterdir()):
                loaded.load_sae(sae_dir)
                break
    return loaded


DEVICE_TYPES = ("cpu", "cuda", "mps")


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise TdbqlError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TdbqlError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise TdbqlError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise TdbqlError(f"device {device!r} requested but MPS is not available")
    return dev


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; every way the file can be wrong is a TdbqlError naming it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise TdbqlError(f"missing {path.name} in {path.parent}") from None
    except OSError as err:
        raise TdbqlError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise TdbqlError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise TdbqlError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise TdbqlError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TdbqlError(f"missing tokenizer.json in {folder} (only fast tokenizers are supported)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 -- the tokenizers library raises plain Exception
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TdbqlError(f"{path}: not a readable tokenizer.json ({reason})") from None


# --- finding the folder -------------------------------------------------------------------------


HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}")  # the hub allows 96 each


def resolve_model_folder(name: str, *, offline: bool = False, local: bool = True) -> Path:
    """The folder of `name`: "default", a local folder, a registry name or a hub id (downloaded
    unless `offline`). Without `local`, a name that is not the embedded model, a registry name
    or a hub id is refused with one message, without looking at the disk (no existence oracle)."""
    if name == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise TdbqlError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}")
        return DEFAULT_MODEL_DIR
    repo_id = REGISTRY_NAMES.get(name) or (name if HUB_ID.fullmatch(name) else None)
    if not local:
        if repo_id is None:
            raise TdbqlError(f"model {name!r}: loading a model from a local path is disabled in --safe mode (it "
                             "loads `default`, the embedded model, or a hub id already in the local cache)")
        return hub_snapshot(repo_id, offline=offline)
    path = Path(name).expanduser()
    if os.path.isdir(path):  # os.path: a name too long or holding NUL is simply not there
        return path
    if repo_id is not None and not os.path.exists(path):
        return hub_snapshot(repo_id, offline=offline)
    if os.path.exists(path):
        raise TdbqlError(f"model {name!r} is a file, not a folder (config.json, *.safetensors, tokenizer.json)")
    if "/" in name or name.startswith((".", "~")):
        raise TdbqlError(f"no such folder: {name!r}")
    raise TdbqlError(f"unknown model {name!r}: not a folder, a hub id (org/name) or a registry name")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str, *, offline: bool = False) -> Path:
    """The cached snapshot folder for `repo_id`, downloading it if the hub is reachable and not
    `offline`."""
    cache = hf_cache_dir()
    found = _cached_snapshot(cache, repo_id)
    if found is not None:
        return found
    if offline:
        raise TdbqlError(f"model {repo_id!r} is not in the local Hugging Face cache {cache} "
                         "(--safe: no downloads)")
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
        return _shards(folder, index)
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise TdbqlError(f"{folder} has only pickle weights (*.bin/*.pt); tdbql loads safetensors only")
    raise TdbqlError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")


def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files an index names: plain file names in `folder`, each present."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TdbqlError(f"{index}: no weight_map (an object of weight name -> shard file)")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise TdbqlError(f"{index}: shard {shard!r} is not a file name in {folder}")
        if not (folder / shard).is_file():
            raise TdbqlError(f"missing weight shard {shard} in {folder} (named by {index.name})")
    return [folder / s for s in shards]


def _open(path: Path, device: torch.device | str = "cpu"):
    """safe_open, with a corrupt file (truncated, random, empty, a bad header) a TdbqlError."""
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own SafetensorError and OSError
        raise TdbqlError(f"{path}: not a readable safetensors file ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def check_layers(cfg: ModelConfig, files: list[Path]) -> None:
    """config.json's layer count against the layers the weights hold (read from the headers, so
    that a config claiming a billion layers fails before a model is built)."""
    layers = set()
    for path in files:
        with _open(path) as f:
            layers.update(int(m.group(1)) for key in f.keys()
                          if not skipped_weight(cfg, key) and (m := LAYER_KEY.search(key)))
    if layers and (max(layers) + 1 != cfg.n_layers or len(layers) != cfg.n_layers):
        raise TdbqlError(f"{files[0].parent / 'config.json'} says {cfg.n_layers} layers but the weights hold "
                         f"{len(layers)} (layers {min(layers)}..{max(layers)})")


LAYER_KEY = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")


def read_state_dict(files: list[Path], device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, read one at a time from memory-mapped safetensors files straight
    onto `device` (so a GPU load never holds the whole model in host memory)."""
    for path in files:
        with _open(path, device) as f:
            for key in f.keys():
                try:
                    tensor = f.get_tensor(key)
                except Exception as err:  # noqa: BLE001 -- data past the end of a truncated file
                    raise TdbqlError(f"{path}: cannot read tensor {key!r} ({_reason(err)})") from None
                yield key, tensor


def build_model(cfg: ModelConfig, hf_weights, *, dtype: torch.dtype, device: torch.device) -> Transformer:
    """A Transformer with HF weights assigned (no random init, no copies beyond dtype/device)."""
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
    except (RuntimeError, ValueError, OverflowError) as err:
        raise TdbqlError(f"config.json describes a model that cannot be built ({_reason(err)})") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for hf_name, tensor in hf_weights:
        for ours, value in _mapped(cfg, hf_name, tensor):
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


def _mapped(cfg: ModelConfig, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """map_weights, with a tensor whose shape cannot be split as config.json says a TdbqlError."""
    if not (tensor.is_floating_point() or tensor.dtype == torch.bool):
        raise TdbqlError(f"weight {hf_name!r} holds {tensor.dtype}, not floating-point numbers")
    try:
        return map_weights(cfg, hf_name, tensor)
    except (ValueError, RuntimeError) as err:
        raise TdbqlError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, which does not fit config.json "
                         f"(d_model {cfg.d_model}, {cfg.n_heads} heads of {cfg.d_head})") from err


def _assign(model: Transformer, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
