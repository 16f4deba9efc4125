"""Rotary position embeddings: inverse frequencies (with linear and Llama 3 scaling), the cos/sin
tables for a range of positions, and the rotation of the leading rotary_dim dims of each head."""

from __future__ import annotations

import math

import torch


def rotary_inv_freq(cfg, local: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,), with the configured rope scaling; `local`: those of
    windowed layers where the config gives them their own base (Gemma 3: no scaling there)."""
    dim = cfg.rotary_dim
    local = local and cfg.local_rope_theta is not None
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = {} if local else cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rotary_cos_sin(cfg, n_tokens: int, device: torch.device, dtype: torch.dtype, offset: int = 0,
                   local: bool = False):
    """cos, sin of shape (token, rotary_dim) for positions offset..offset+n_tokens-1, computed in
    float32 then cast (`local`: a windowed layer's, see rotary_inv_freq)."""
    inv_freq = rotary_inv_freq(cfg, local).to(device)
    positions = torch.arange(offset, offset + n_tokens, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (token, rotary_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head. x: (batch, token, head, d_head)."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated_half = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, token, 1, rotary_dim)
    return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)
