"""Sparse autoencoders and transcoders: one module for SAELens and TDB checkpoints (ReLU,
TopK, JumpReLU).

    encode(x) = act((norm(x) - b_dec) @ W_enc + b_enc)      (b_dec subtracted when the layout says so)
    decode(z) = unnorm(z @ W_dec + b_dec)                    (+ x @ W_skip.T for skip-transcoders)

`norm` is SAELens' run-time input normalisation: none, constant_norm_rescale (x · sqrt(d_in) /
‖x‖) or layer_norm ((x − mean) / (std + 1e-5)); `unnorm` undoes it on the output with the same
token's coefficient (÷ the rescale factor; · std + mean). Transcoders (site `mlp_tc`) read the
MLP's input and write its output (d_out = d_model), in place of the MLP; SAELens normalises only
their input, and so does this module.

Layouts read by `load_autoencoders(path)`:

SAELens: a folder with cfg.json and sae_weights.safetensors holding W_enc (d_in, d_sae), b_enc,
    W_dec (d_sae, d_out), b_dec, `threshold` (or `log_threshold`) for JumpReLU, W_skip (d_out,
    d_in) for skip-transcoders. cfg.json as SAELens 6 writes it (hook_name under `metadata`) or
    the older flat layout (hook_name at the top): d_in, d_sae, d_out (transcoders), architecture
    (standard | topk | jumprelu | transcoder | skip_transcoder | jumprelu_transcoder |
    jumprelu_skip_transcoder), k for topk (also read from activation_fn_kwargs) and
    rescale_acts_by_decoder_norm (folded into the weights at load), apply_b_dec_to_input,
    normalize_activations (expected_average_only_in and covariance_whitening have nothing to
    apply at inference: SAELens folds them after training and ignores them when loading), and
    hook_name, which gives the site and layer: 'blocks.L.mlp.hook_post', 'blocks.L.hook_attn_out',
    'blocks.L.hook_resid_post', 'blocks.L+1.hook_resid_pre'; for a transcoder the MLP's input,
    'blocks.L.ln2.hook_normalized' (or, in a family without pre-norms, 'blocks.L.hook_resid_mid'),
    with metadata.hook_name_out, when given, 'blocks.L.hook_mlp_out'.
TDB (openai/sparse_autoencoder): a .safetensors file with encoder.weight (n_latents, d_in),
    decoder.weight (d_in, n_latents), pre_bias (d_in,), latent_bias (n_latents,). Activation,
    k, site and layer come from the file's safetensors metadata (keys activation = ReLU | TopK,
    k, site = mlp | attn | resid, layer), else from a cfg.json beside it, else from the path
    (e.g. mlp_L3.safetensors or mlp/3.safetensors).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...query.errors import TdbqlError
from .model import hook_alias

ACTIVATIONS = ("relu", "topk", "jumprelu")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
TRANSCODER_SITE = "mlp_tc"
SAELENS_WEIGHTS = "sae_weights.safetensors"
LAYER_NORM_EPS = 1e-5  # SAELens' layer_norm normalisation


@dataclass
class Normalised:
    """One call's input normalisation: the decoder's output is divided by `divisor` (..., 1),
    then `shift` (..., 1) is added (layer_norm: the input's mean)."""

    divisor: torch.Tensor
    shift: torch.Tensor | None = None


class Autoencoder(nn.Module):
    def __init__(
        self,
        W_enc: torch.Tensor,  # (d_in, n_latents)
        b_enc: torch.Tensor,  # (n_latents,)
        W_dec: torch.Tensor,  # (n_latents, d_out); d_out = d_in except for transcoders
        b_dec: torch.Tensor,  # (d_out,)
        *,
        site: str,
        layer: int,
        activation: str = "relu",
        k: int | None = None,
        threshold: torch.Tensor | None = None,  # (n_latents,), jumprelu
        subtract_b_dec: bool = True,
        normalize: str = "none",
        W_skip: torch.Tensor | None = None,  # (d_out, d_in), skip-transcoders
        reads: str = "mlp.in",  # a transcoder's input: mlp.in, or resid.mid (families without pre-norms)
        name: str = "",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown autoencoder activation {activation!r} ({', '.join(ACTIVATIONS)})")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"input normalisation {normalize!r} is not supported ({', '.join(NORMALIZATIONS)})")
        if activation == "topk" and not k:
            raise ValueError("a topk autoencoder needs k")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("a jumprelu autoencoder needs a threshold")
        d_in, n_latents = W_enc.shape
        d_out = W_dec.shape[-1]
        transcoder = site == TRANSCODER_SITE
        if (W_dec.shape != (n_latents, d_out) or b_enc.shape != (n_latents,) or b_dec.shape != (d_out,)
                or (d_out != d_in and (not transcoder or subtract_b_dec))):
            raise ValueError(
                f"inconsistent shapes: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}"
            )
        if W_skip is not None and (not transcoder or W_skip.shape != (d_out, d_in)):
            raise ValueError(f"a skip term W_skip {tuple(W_skip.shape)} needs a transcoder of {d_in} -> {d_out}")
        if threshold is not None and threshold.shape != (n_latents,):
            raise ValueError(f"threshold has shape {tuple(threshold.shape)}, not ({n_latents},)")
        self.W_enc = nn.Parameter(W_enc, requires_grad=False)
        self.b_enc = nn.Parameter(b_enc, requires_grad=False)
        self.W_dec = nn.Parameter(W_dec, requires_grad=False)
        self.b_dec = nn.Parameter(b_dec, requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold, requires_grad=False)
        self.W_skip = None if W_skip is None else nn.Parameter(W_skip, requires_grad=False)
        self.site, self.layer, self.activation, self.k = site, layer, activation, k
        self.subtract_b_dec, self.normalize, self.reads = subtract_b_dec, normalize, reads
        self.name = name

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    @property
    def transcoder(self) -> bool:
        return self.site == TRANSCODER_SITE

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, Normalised | None]:
        """The encoder's input and, where the output is un-normalised, the coefficients."""
        if self.normalize == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
            return x * coeff, Normalised(coeff)
        if self.normalize == "layer_norm":
            mean = x.mean(-1, keepdim=True)
            std = (x - mean).std(-1, keepdim=True)
            return (x - mean) / (std + LAYER_NORM_EPS), Normalised(1 / std, mean)
        return x, None

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., latent)
        return self._linear(self.normalise(x)[0])

    def pre_activation_tangent(self, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """The pre-activation's derivative along dx with the normalisation's coefficients held."""
        if self.normalize == "constant_norm_rescale":
            dx = dx * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        elif self.normalize == "layer_norm":
            dx = (dx - dx.mean(-1, keepdim=True)) / ((x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
                                                     + LAYER_NORM_EPS)
        return dx @ self.W_enc

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.subtract_b_dec:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)  # topk: keep the k largest, then ReLU them
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activation(x))

    def decode(self, z: torch.Tensor, norm: Normalised | None = None) -> torch.Tensor:
        """(..., latent) -> (..., d_out); `norm`: the coefficients of the input z was encoded from
        (a transcoder's output is never un-normalised, as in SAELens)."""
        out = z @ self.W_dec + self.b_dec
        if norm is not None and not self.transcoder:
            out = out / norm.divisor
            if norm.shift is not None:
                out = out + norm.shift
        return out

    def skip(self, x: torch.Tensor) -> torch.Tensor | float:
        """A skip-transcoder's linear term x @ W_skip.T (0 without one)."""
        return 0.0 if self.W_skip is None else x @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in, norm = self.normalise(x)
        return self.decode(self.activate(self._linear(x_in)), norm) + self.skip(x)

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


def transcoder_from_hook_names(hook_name: str, hook_name_out: str | None) -> tuple[int, str]:
    """A transcoder's (layer, input location) from its input and output hook names: the MLP's
    input 'blocks.L.ln2.hook_normalized' (mlp.in), or the residual before it
    'blocks.L.hook_resid_mid' / 'blocks.L.hook_mlp_in' (resid.mid: families without pre-norms)."""
    prefix = re.fullmatch(r"(blocks\.\d+\.)hook_mlp_in", hook_name)
    try:
        location, layer = hook_alias(prefix.group(1) + "hook_resid_mid" if prefix else hook_name)
        out = None if hook_name_out is None else hook_alias(hook_name_out)
    except ValueError as err:
        raise TdbqlError(f"transcoder hook: {err}") from None
    if location not in ("mlp.in", "resid.mid") or layer is None:
        raise TdbqlError(f"transcoder hook {hook_name!r} is not the MLP's input "
                         "(ln2.hook_normalized, or hook_resid_mid / hook_mlp_in without pre-norms)")
    if out is not None and out != ("mlp.out", layer):
        raise TdbqlError(f"transcoder output hook {hook_name_out!r} is not blocks.{layer}.hook_mlp_out: "
                         "tdbql splices transcoders in place of their layer's MLP")
    return layer, location


# --- loading ------------------------------------------------------------------------------------------


def load_autoencoders(path: str | Path) -> list[Autoencoder]:
    """Every autoencoder at `path`: a SAELens folder, a TDB file, or a folder of either."""
    path = Path(path).expanduser()
    if not os.path.exists(path):  # os.path: a name too long or holding NUL is simply not there
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


# SAELens architecture -> (activation, transcoder, skip)
SAELENS_ARCHITECTURES = {
    "standard": ("relu", False, False), "relu": ("relu", False, False), "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False), "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True), "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
_NO_OP_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")


def _load_saelens(folder: Path) -> Autoencoder:
    cfg_path = folder / "cfg.json"
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
        raise TdbqlError(f"cannot read {cfg_path}: {err}") from None
    if not isinstance(cfg, dict):
        raise TdbqlError(f"{cfg_path}: expected a JSON object")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    tensors, _ = _read_tensors(folder / SAELENS_WEIGHTS)
    _need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), folder / SAELENS_WEIGHTS)
    arch = str(cfg.get("architecture", "standard")).lower()
    if arch not in SAELENS_ARCHITECTURES:
        raise TdbqlError(f"{cfg_path}: SAE architecture {arch!r} is not supported ({', '.join(SAELENS_ARCHITECTURES)})")
    activation, transcoder, skip = SAELENS_ARCHITECTURES[arch]
    normalize = cfg.get("normalize_activations") or "none"
    if normalize in _NO_OP_NORMALIZATIONS:
        normalize = "none"
    if meta.get("hook_head_index", cfg.get("hook_head_index")) is not None:
        raise TdbqlError(f"{cfg_path}: autoencoders of one head (hook_head_index) are not supported")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise TdbqlError(f"{cfg_path}: reshape_activations {cfg['reshape_activations']!r} (attention hook_z "
                         "autoencoders) is not supported")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    threshold = tensors.get("threshold")
    if threshold is None and "log_threshold" in tensors:
        threshold = tensors["log_threshold"].exp()
    W_enc, b_enc, W_dec = tensors["W_enc"], tensors["b_enc"], tensors["W_dec"]
    if activation == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.float().norm(dim=-1)  # topk(pre · ‖W_dec‖), decoded as z / ‖W_dec‖ @ W_dec: fold both
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    hook_name = meta.get("hook_name", cfg.get("hook_name", ""))
    hook_name_out = meta.get("hook_name_out", cfg.get("hook_name_out"))
    if not isinstance(hook_name, str) or not isinstance(hook_name_out, (str, type(None))):
        raise TypeError(f"hook_name must be text, not {hook_name!r}")
    if transcoder:
        if skip:
            _need(tensors, ("W_skip",), folder / SAELENS_WEIGHTS)
        layer, reads = transcoder_from_hook_names(hook_name, hook_name_out)
        site = TRANSCODER_SITE
    else:
        (site, layer), reads = site_from_hook_name(hook_name), "mlp.in"
    return _build(
        W_enc, b_enc, W_dec, tensors["b_dec"], cfg_path,
        site=site, layer=layer, activation=activation, k=int(k) if k else None, threshold=threshold,
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", not transcoder)), normalize=normalize,
        W_skip=tensors.get("W_skip") if skip else None, reads=reads, name=folder.name,
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
    TRANSCODER_SITE: "blocks.{}.ln2.hook_normalized",
}


def save_saelens(ae: Autoencoder, folder: str | Path, *, flat: bool = False) -> Path:
    """Write `ae` as a SAELens folder (cfg.json + sae_weights.safetensors) in the layout SAELens
    6 writes (hook names under `metadata`); `flat`: the older layout (hook_name at the top)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": ae.W_enc, "b_enc": ae.b_enc, "W_dec": ae.W_dec, "b_dec": ae.b_dec}
    for name in ("threshold", "W_skip"):
        if getattr(ae, name) is not None:
            tensors[name] = getattr(ae, name)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    hooks = {"hook_name": _HOOK_NAMES[ae.site].format(ae.layer)}
    if ae.transcoder:
        if ae.reads == "resid.mid":
            hooks["hook_name"] = f"blocks.{ae.layer}.hook_resid_mid"
        hooks["hook_name_out"] = f"blocks.{ae.layer}.hook_mlp_out"
    architecture = {"relu": "standard"}.get(ae.activation, ae.activation)
    if ae.transcoder:
        architecture = ("jumprelu_" if ae.activation == "jumprelu" else "") + (
            "skip_transcoder" if ae.W_skip is not None else "transcoder")
    cfg = {
        "d_in": ae.d_in,
        "d_sae": ae.n_latents,
        "dtype": "float32",
        "apply_b_dec_to_input": ae.subtract_b_dec,
        "normalize_activations": ae.normalize,
        "reshape_activations": "none",
        **({"d_out": ae.d_out} if ae.transcoder else {}),
        **({"k": ae.k, "rescale_acts_by_decoder_norm": False} if ae.k else {}),
        **(hooks if flat else {"metadata": hooks}),
        "architecture": architecture,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


def save_tdb(ae: Autoencoder, path: str | Path) -> Path:
    """Write `ae` in TDB's layout (one safetensors file with site/layer/activation metadata)."""
    if not ae.subtract_b_dec or ae.activation == "jumprelu" or ae.transcoder or ae.normalize != "none":
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
