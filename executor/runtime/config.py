"""The one transformer's configuration: every family is the same network with different switches.

| switch                 | GPT-2   | GPT-NeoX         | Llama / Mistral / Qwen2 | Qwen3    | Phi-3         | Gemma 2           | Gemma 3            | OLMo 2        |
|------------------------|---------|------------------|-------------------------|----------|---------------|-------------------|--------------------|---------------|
| norm                   | LN      | LN               | RMS                     | RMS      | RMS           | RMS, 1 + w        | RMS, 1 + w         | RMS           |
| pre_norms / post_norms | yes/no  | yes/no           | yes/no                  | yes/no   | yes/no        | yes/yes           | yes/yes            | no/yes        |
| qk_norm                | none    | none             | none                    | head     | none          | none              | head               | full          |
| positions              | learned | rotary (partial) | rotary (theta, scaling) | rotary   | rotary        | rotary            | rotary, local base | rotary        |
| gated_mlp (act)        | no      | no               | SwiGLU                  | SwiGLU   | SwiGLU        | GeGLU (tanh)      | GeGLU (tanh)       | SwiGLU        |
| parallel_residual      | no      | config           | no                      | no       | no            | no                | no                 | no            |
| n_kv_heads             | = heads | = heads          | grouped-query           | GQA      | config        | GQA               | GQA                | config        |
| sliding window         | no      | no               | Mistral: every layer    | no       | every layer   | window_layers     | window_layers      | no            |
| softcaps               | no      | no               | no                      | no       | no            | attention, final  | config             | no            |
| embed_scale, attn_scale| 1, -    | 1, -             | 1, -                    | 1, -     | 1, -          | sqrt(d), q_p_a_s  | sqrt(d), q_p_a_s   | 1, -          |

(q_p_a_s: the query is scaled by query_pre_attn_scalar^-1/2 instead of d_head^-1/2.) Fused
checkpoints (GPT-2's c_attn, NeoX's query_key_value, Phi-3's qkv_proj and gate_up_proj) are
split at load time (hf_format.py), so the model always has separate q, k, v, gate and up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")


@dataclass
class ModelConfig:
    arch: str  # the family's model_type (hf_format.FAMILIES)
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    n_kv_heads: int | None = None  # None: = n_heads
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # Gemma: a norm multiplies by (offset + weight) = (1 + w)
    norm_weight_fp32: bool = False  # Gemma, OLMo 2: multiply by the weight before casting back
    pre_norms: bool = True  # a norm before attention and before the MLP (OLMo 2: none)
    post_norms: bool = False  # Gemma 2/3, OLMo 2: a norm on each sublayer's output before the add
    qk_norm: Literal["none", "head", "full"] = "none"  # RMSNorm of q and k: per head, or over all heads
    act: str = "gelu_new"  # gelu_new | gelu | relu | silu
    gated_mlp: bool = False  # GLU: down(act(gate(x)) * up(x))
    positions: Literal["learned", "rotary"] = "learned"
    rotary_dim: int = 0  # leading dims of each head that rotate (partial rotary)
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "linear"|"llama3", ...}
    local_rope_theta: float | None = None  # Gemma 3: the rope base of windowed layers (unscaled)
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    tied_embeddings: bool = False
    sliding_window: int | None = None  # key u visible from query t iff t - u < window
    window_layers: tuple[int, ...] | None = None  # layers with the window (None: all of them)
    attn_scale: float | None = None  # the logits' scale; None: 1/sqrt(d_head)
    attn_softcap: float | None = None  # logits -> cap * tanh(logits / cap) before the softmax
    final_softcap: float | None = None  # the same on the output logits
    embed_scale: float = 1.0  # Gemma: token embeddings times sqrt(d_model)

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"activation {self.act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.window_layers is not None:
            self.window_layers = tuple(self.window_layers)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to every earlier token)."""
        if self.sliding_window is None or (self.window_layers is not None and layer not in self.window_layers):
            return None
        return self.sliding_window

    @property
    def logit_scale(self) -> float:
        """What q·k is multiplied by."""
        return self.attn_scale if self.attn_scale is not None else self.d_head ** -0.5
