"""Sparse autoencoders: one module for SAELens and TDB checkpoints (ReLU, TopK, JumpReLU).

    encode(x) = act((x - b_dec) @ W_enc + b_enc)      (b_dec subtracted when the layout says so)
    decode(z) = z @ W_dec + b_dec

Layouts read by `load_autoencoder(path)`:

SAELens: a folder with cfg.json and sae_weights.safetensors holding W_enc (d_in, d_sae), b_enc,
    W_dec (d_sae, d_in), b_dec, and `threshold` (or `log_threshold`) for JumpReLU. cfg.json gives
    d_in, d_sae, architecture (standard | topk | jumprelu), k for topk (also read from
    activation_fn_kwargs), apply_b_dec_to_input, and hook_name ('blocks.L.mlp.hook_post',
    'blocks.L.hook_attn_out', 'blocks.L.hook_resid_post', 'blocks.L+1.hook_resid_pre'), which
    gives the site and layer.
TDB (openai/sparse_autoencoder): a .safetensors file with encoder.weight (n_latents, d_in),
    decoder.weight (d_in, n_latents), pre_bias (d_in,), latent_bias (n_latents,). Activation,
    k, site and layer come from the file's safetensors metadata (keys activation = ReLU | TopK,
    k, site = mlp | attn | resid, layer), else from a cfg.json beside it, else from the path
    (e.g. mlp_L3.safetensors or mlp/3.safetensors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...query.errors import TdbqlError
from .model import hook_alias

ACTIVATIONS = ("relu", "topk", "jumprelu")
SAELENS_WEIGHTS = "sae_weights.safetensors"


class Autoencoder(nn.Module):
    def __init__(
        self,
        W_enc: torch.Tensor,  # (d_in, n_latents)
        b_enc: torch.Tensor,  # (n_latents,)
        W_dec: torch.Tensor,  # (n_latents, d_in)
        b_dec: torch.Tensor,  # (d_in,)
        *,
        site: str,
        layer: int,
        activation: str = "relu",
        k: int | None = None,
        threshold: torch.Tensor | None = None,  # (n_latents,), jumprelu
        subtract_b_dec: bool = True,
        name: str = "",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown autoencoder activation {activation!r} ({', '.join(ACTIVATIONS)})")
        if activation == "topk" and not k:
            raise ValueError("a topk autoencoder needs k")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("a jumprelu autoencoder needs a threshold")
        d_in, n_latents = W_enc.shape
        if W_dec.shape != (n_latents, d_in) or b_enc.shape != (n_latents,) or b_dec.shape != (d_in,):
            raise ValueError(
                f"inconsistent shapes: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}"
            )
        self.W_enc = nn.Parameter(W_enc, requires_grad=False)
        self.b_enc = nn.Parameter(b_enc, requires_grad=False)
        self.W_dec = nn.Parameter(W_dec, requires_grad=False)
        self.b_dec = nn.Parameter(b_dec, requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold, requires_grad=False)
        self.site, self.layer, self.activation, self.k = site, layer, activation, k
        self.subtract_b_dec = subtract_b_dec
        self.name = name

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., latent)
        if self.subtract_b_dec:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)  # topk: keep the k largest, then ReLU them
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # (..., latent) -> (..., d_in)
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return f"site={self.site}, layer={self.layer}, d_in={self.d_in}, n_latents={self.n_latents}, {self.activation}{k}"


# --- site and layer from a hook name -------------------------------------------------------------


def site_from_hook_name(hook_name: str) -> tuple[str, int]:
    """'blocks.3.mlp.hook_post' -> ('mlp', 3); resid_pre of layer L is resid_post of L-1."""
    try:
        location, layer = hook_alias(hook_name)
    except ValueError as err:
        raise TdbqlError(f"autoencoder hook {hook_name!r}: {err}") from None
    if location == "resid.pre" and layer:
        return "resid", layer - 1
    sites = {"mlp.post": "mlp", "attn.out": "attn", "resid.post": "resid"}
    if location not in sites or layer is None:
        raise TdbqlError(
            f"autoencoder hook {hook_name!r} is not a supported site "
            "(mlp.hook_post, hook_attn_out, hook_resid_post, hook_resid_pre of layer > 0)"
        )
    return sites[location], layer


# --- loading ------------------------------------------------------------------------------------------


def load_autoencoders(path: str | Path) -> list[Autoencoder]:
    """Every autoencoder at `path`: a SAELens folder, a TDB file, or a folder of either."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TdbqlError(f"autoencoder path {str(path)!r} not found")
    if path.is_file():
        return [_checked(_load_tdb, path)]
    if (path / SAELENS_WEIGHTS).exists():
        return [_checked(_load_saelens, path)]
    found = [_checked(_load_saelens, p) for p in sorted(path.iterdir()) if (p / SAELENS_WEIGHTS).exists()]
    found += [_checked(_load_tdb, p) for p in sorted(path.glob("*.safetensors"))]
    if not found:
        raise TdbqlError(f"no autoencoder in {path} (SAELens cfg.json + {SAELENS_WEIGHTS}, or TDB *.safetensors)")
    keys = [(ae.site, ae.layer) for ae in found]
    if len(set(keys)) != len(keys):
        raise TdbqlError(f"{path} holds two autoencoders for the same site and layer")
    return sorted(found, key=lambda ae: (ae.site, ae.layer))


def _checked(load, path: Path) -> Autoencoder:
    """One autoencoder; a config of the wrong types or values (cfg.json is anyone's JSON) is a
    TdbqlError naming the file."""
    try:
        ae = load(path)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as err:
        raise TdbqlError(f"{path}: cannot read the autoencoder ({type(err).__name__}: {err})") from None
    if not all(p.is_floating_point() for p in ae.parameters()):
        raise TdbqlError(f"{path}: the autoencoder's tensors must hold floating-point numbers")
    if ae.k is not None and not 0 < ae.k <= ae.n_latents:
        raise TdbqlError(f"{path}: k {ae.k} must be between 1 and the {ae.n_latents} latents")
    return ae


def load_autoencoder(path: str | Path) -> Autoencoder:
    aes = load_autoencoders(path)
    if len(aes) != 1:
        raise TdbqlError(f"{path} holds {len(aes)} autoencoders; name one")
    return aes[0]


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 -- corrupt or non-safetensors file
        raise TdbqlError(f"cannot read {path} as safetensors: {err}") from None


def _need(tensors: dict[str, torch.Tensor], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise TdbqlError(f"{path}: missing tensor(s) {', '.join(missing)}")


def _load_saelens(folder: Path) -> Autoencoder:
    cfg_path = folder / "cfg.json"
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
        raise TdbqlError(f"cannot read {cfg_path}: {err}") from None
    if not isinstance(cfg, dict):
        raise TdbqlError(f"{cfg_path}: expected a JSON object")
    tensors, _ = _read_tensors(folder / SAELENS_WEIGHTS)
    _need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), folder / SAELENS_WEIGHTS)
    arch = str(cfg.get("architecture", "standard")).lower()
    activation = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(arch)
    if activation is None:
        raise TdbqlError(f"{cfg_path}: SAE architecture {arch!r} is not supported (standard, topk, jumprelu)")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize != "none" or cfg.get("hook_head_index") is not None:
        raise TdbqlError(f"{cfg_path}: normalize_activations / hook_head_index are not supported")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    threshold = tensors.get("threshold")
    if threshold is None and "log_threshold" in tensors:
        threshold = tensors["log_threshold"].exp()
    site, layer = site_from_hook_name(cfg.get("hook_name", ""))
    return _build(
        tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], cfg_path,
        site=site, layer=layer, activation=activation, k=int(k) if k else None, threshold=threshold,
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)), name=folder.name,
    )


def _load_tdb(path: Path) -> Autoencoder:
    tensors, meta = _read_tensors(path)
    _need(tensors, ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias"), path)
    side = path.parent / "cfg.json"
    if not meta.get("site") and side.exists():
        try:
            extra = json.loads(side.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise TdbqlError(f"cannot read {side}: {err}") from None
        meta = {**{k: str(v) for k, v in extra.items()}, **meta}
    activation = meta.get("activation", "ReLU").lower()
    if activation not in ("relu", "topk"):
        raise TdbqlError(f"{path}: TDB activation {meta.get('activation')!r} is not supported (ReLU, TopK)")
    site, layer = _tdb_site_layer(path, meta)
    return _build(
        tensors["encoder.weight"].T, tensors["latent_bias"], tensors["decoder.weight"].T, tensors["pre_bias"], path,
        site=site, layer=layer, activation=activation, k=int(meta["k"]) if meta.get("k") else None,
        subtract_b_dec=True, name=path.stem,
    )


def _tdb_site_layer(path: Path, meta: dict[str, str]) -> tuple[str, int]:
    text = f"{path.parent.name}/{path.stem}".lower()
    if not meta.get("site") and "resid_delta_mlp" in text:
        raise TdbqlError(f"{path}: autoencoders of the MLP output (resid_delta_mlp) are not supported; "
                         "sites are mlp (post-activations), attn (attention output), resid")
    site = meta.get("site") or next((s for s in ("mlp", "attn", "resid") if s in text), None)
    numbers = re.findall(r"\d+", path.stem) or re.findall(r"\d+", path.parent.name)
    layer = meta.get("layer") or (numbers[-1] if numbers else None)
    if site not in ("mlp", "attn", "resid") or layer is None:
        raise TdbqlError(f"{path}: cannot tell the autoencoder's site and layer; "
                         "add safetensors metadata site=, layer=")
    return site, int(layer)


def _build(W_enc, b_enc, W_dec, b_dec, where: Path, **kwargs) -> Autoencoder:
    try:
        return Autoencoder(W_enc.contiguous(), b_enc, W_dec.contiguous(), b_dec, **kwargs)
    except ValueError as err:
        raise TdbqlError(f"{where}: {err}") from None


# --- saving (training scripts and tests) --------------------------------------------------------------

_HOOK_NAMES = {
    "mlp": "blocks.{}.mlp.hook_post",
    "attn": "blocks.{}.hook_attn_out",
    "resid": "blocks.{}.hook_resid_post",
}


def save_saelens(ae: Autoencoder, folder: str | Path) -> Path:
    """Write `ae` as a SAELens folder (cfg.json + sae_weights.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": ae.W_enc, "b_enc": ae.b_enc, "W_dec": ae.W_dec, "b_dec": ae.b_dec}
    if ae.threshold is not None:
        tensors["threshold"] = ae.threshold
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    cfg = {
        "d_in": ae.d_in,
        "d_sae": ae.n_latents,
        "architecture": {"relu": "standard"}.get(ae.activation, ae.activation),
        "hook_name": _HOOK_NAMES[ae.site].format(ae.layer),
        "apply_b_dec_to_input": ae.subtract_b_dec,
        "normalize_activations": "none",
        **({"k": ae.k} if ae.k else {}),
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


def save_tdb(ae: Autoencoder, path: str | Path) -> Path:
    """Write `ae` in TDB's layout (one safetensors file with site/layer/activation metadata)."""
    if not ae.subtract_b_dec or ae.activation == "jumprelu":
        raise ValueError("TDB's layout holds ReLU/TopK autoencoders that subtract the pre-bias")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": ae.W_enc.T, "decoder.weight": ae.W_dec.T,  # TDB: (latents, in), (in, latents)
               "pre_bias": ae.b_dec, "latent_bias": ae.b_enc}
    meta = {"activation": "TopK" if ae.activation == "topk" else "ReLU", "site": ae.site, "layer": str(ae.layer)}
    if ae.k:
        meta["k"] = str(ae.k)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path
