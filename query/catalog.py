"""The catalog: every name the language knows and what it means, in one place.

Scalars (which components each applies to, their parameters, their help text, what they need),
components (the kinds of node a row describes), node references, `where` fields, group keys,
reductions, dtypes, switches, settings and the TransformerLens hook names tdbql accepts. The
grammar, the binder, the executor's derivers, completion, highlighting, `.scalars`, `explain` and
the docs table all read it here (tests hold each of them to it). This module imports nothing of
ours.

Adding a scalar is one `ScalarDef` below and one deriver in executor/scalars.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- components: the kinds of node a result row describes (its `component` column) -----------------


@dataclass(frozen=True)
class ComponentDef:
    """A kind of node. `unit` names what the row's `unit` column counts (None: one node per
    token); `keys` rows are per (query token, key token); `site` is an autoencoder's site;
    `error` is, for a latent component, the component of its reconstruction error's rows."""

    name: str
    words: str
    unit: str | None
    keys: bool = False
    site: str | None = None
    error: str | None = None

    @property
    def layered(self) -> bool:
        return self.name != "embed"


_COMPONENT_LIST = (
    ComponentDef("embed", "token embeddings", None),
    ComponentDef("attn", "attention heads", "head", keys=True),
    ComponentDef("head", "attention heads (summed over keys)", "head"),
    ComponentDef("mlp", "MLP neurons", "neuron"),
    ComponentDef("attn_sae", "attention autoencoder latents", "latent", site="attn", error="attn_sae_error"),
    ComponentDef("attn_sae_error", "attention autoencoder reconstruction errors", None, site="attn"),
    ComponentDef("mlp_sae", "MLP autoencoder latents", "latent", site="mlp", error="mlp_sae_error"),
    ComponentDef("mlp_sae_error", "MLP autoencoder reconstruction errors", None, site="mlp"),
    ComponentDef("resid_sae", "residual autoencoder latents", "latent", site="resid", error="resid_sae_error"),
    ComponentDef("resid_sae_error", "residual autoencoder reconstruction errors", None, site="resid"),
    ComponentDef("mlp_tc", "transcoder latents (in place of the MLP)", "latent", site="mlp_tc", error="mlp_tc_error"),
    ComponentDef("mlp_tc_error", "transcoder errors (the MLP's write minus the transcoder's)", None, site="mlp_tc"),
)
COMPONENTS: dict[str, ComponentDef] = {c.name: c for c in _COMPONENT_LIST}
COMPONENT_NAMES: tuple[str, ...] = tuple(COMPONENTS)
# where an autoencoder is spliced: mlp.post, attn.out, resid.post; mlp_tc, a transcoder, in place of the MLP
SAE_SITES: tuple[str, ...] = ("mlp", "attn", "resid", "mlp_tc")
_LATENT_OF_SITE = {c.site: c.name for c in _COMPONENT_LIST if c.unit == "latent"}
LATENTS: tuple[str, ...] = tuple(_LATENT_OF_SITE[site] for site in SAE_SITES)
SAE_ERRORS: tuple[str, ...] = tuple(COMPONENTS[c].error for c in LATENTS)
# `sae` in `of` stands for every loaded autoencoder's latents; the binder expands it
SAE_WORD = "sae"
WRITTEN_COMPONENTS: tuple[str, ...] = ("mlp", "attn", "head", SAE_WORD, *LATENTS, "embed", *SAE_ERRORS)
# a node query without `of`: these, plus every loaded autoencoder's latents
DEFAULT_COMPONENTS: tuple[str, ...] = ("mlp", "attn")


def latent_component(site: str) -> str:
    return _LATENT_OF_SITE[site]


# --- node references: mlp[L,N], attn[L,H]@t:u, sae[L,I], resid[L], block[L] --------------------------

# how each reference takes an index: "required", "optional" (the whole sublayer's write when left
# out; only `upvoted` takes that) or "none" (a layer only)
NODE_REFS: dict[str, str] = {
    "mlp": "optional",
    "attn": "optional",
    SAE_WORD: "required",
    **{name: "required" for name in LATENTS},
    "resid": "none",  # resid[L] = resid.post[L]
    "resid.pre": "none",
    "resid.mid": "none",
    "block": "none",
}
RESIDUALS: tuple[str, ...] = ("resid.pre", "resid.mid", "resid")  # residual-vector node kinds


def residual_kind(location: str) -> str:
    """The node kind of a residual location word: resid.post is `resid`."""
    return "resid" if location == "resid.post" else location

# --- scalars ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A scalar parameter: `contribution(norm=2)`."""

    name: str
    choices: tuple[int | float | str, ...]
    default: int | float | str


@dataclass(frozen=True)
class ScalarDef:
    """A scalar: its meaning in one line, the components it is defined for, its parameters.

    `gradient`: it reads a gradient of the objective (the loss, or a traced node), so a query
    without a trace needs a loss. `needs_trace`: defined only under `trace`. `pairs`: reads the
    prompt set as (clean, corrupted) pairs."""

    name: str
    help: str
    applies_to: tuple[str, ...]
    params: tuple[Param, ...] = ()
    gradient: bool = False
    needs_trace: bool = False
    pairs: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_NODES = ("mlp", "attn", "head", *LATENTS)
_EVERY = (*_NODES, "embed", *SAE_ERRORS)

_SCALAR_LIST = (
    ScalarDef("act", "activation: MLP post-activation, attention probability, autoencoder latent (1 for "
              "vector nodes)", _EVERY),
    ScalarDef("grad", "gradient of the loss with respect to the activation", _EVERY, gradient=True),
    ScalarDef("act_times_grad", "activation x gradient (first-order attribution)", _EVERY, gradient=True),
    ScalarDef("write_norm", "activation x norm of what the node writes to the residual stream", _EVERY),
    ScalarDef("direct_effect", "activation x (write . loss gradient at the final residual, ln_f frozen)", _EVERY,
              gradient=True),
    ScalarDef("contribution", "LLM-TT proximity share of a node in the residual update", ("mlp", "attn", "head"),
              params=(Param("norm", (1, 2), 1),)),
    ScalarDef("token_attribution", "embedding x gradient, per input token", ("embed",), gradient=True),
    ScalarDef("sae_error", "norm of an autoencoder's reconstruction error, one row per token", SAE_ERRORS),
    ScalarDef("in_edge", "effect of a node's write on the traced node (upstream) or of the traced node's "
              "write on a node (downstream)", ("mlp", "attn", *LATENTS, "embed"), gradient=True,
              needs_trace=True),
    ScalarDef("attrib_patch", "(clean - corrupted activation) x corrupted gradient, over prompt pairs", _EVERY,
              gradient=True, pairs=True),
)
SCALARS: dict[str, ScalarDef] = {s.name: s for s in _SCALAR_LIST}
SCALAR_NAMES: tuple[str, ...] = tuple(SCALARS)


def applies(scalar: str, component: str) -> bool:
    """Whether `scalar` is defined for rows of `component`, or for its reconstruction error's rows
    (`sae_error of mlp_sae` reports the mlp_sae_error rows)."""
    applies_to = SCALARS[scalar].applies_to
    error = COMPONENTS[component].error
    return component in applies_to or (error is not None and error in applies_to)


def row_components(scalars: tuple[str, ...], components: tuple[str, ...]) -> tuple[str, ...]:
    """The components whose rows a query computes: the named ones, plus a latent component's
    error rows when a scalar is defined on those and not on the latents (sae_error)."""
    rows = list(components)
    for component in components:
        error = COMPONENTS[component].error
        if error and any(error in SCALARS[s].applies_to and component not in SCALARS[s].applies_to
                         for s in scalars):
            rows.append(error)
    return tuple(dict.fromkeys(rows))


# the docs' table of which scalar is defined for which component (docs/language.md holds its output)
_TABLE_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mlp", ("mlp",)), ("attn", ("attn",)), ("head", ("head",)), ("mlp_sae, attn_sae, resid_sae, mlp_tc", LATENTS),
    ("embed", ("embed",)), ("*_sae_error, mlp_tc_error", SAE_ERRORS),
)


def applicability_table() -> str:
    """A markdown table: one row per set of scalars defined for the same components."""
    groups: dict[tuple[bool, ...], list[str]] = {}
    for scalar in SCALARS.values():
        marks = tuple(all(c in scalar.applies_to for c in members) for _, members in _TABLE_COLUMNS)
        note = " (needs `trace`)" if scalar.needs_trace else ""
        groups.setdefault(marks, []).append(scalar.name + note)
    def row(cells) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    lines = [row(["scalar", *(name for name, _ in _TABLE_COLUMNS)]), "|---" * (len(_TABLE_COLUMNS) + 1) + "|"]
    lines += [row([", ".join(names), *("yes" if m else "" for m in marks)]) for marks, names in groups.items()]
    return "\n".join(lines)


# --- interventions: prompt pairs, patches, patching sweeps -----------------------------------------

# `patch ... from clean`: the activations come from the clean prompt of each pair and the corrupt
# prompt runs (denoising); `from corrupt`: the other way round (noising)
SOURCES: tuple[str, ...] = ("clean", "corrupt")


@dataclass(frozen=True)
class SweepDef:
    """`patching of NAME`: what one patched variant replaces. `unit`: what the `unit` column
    counts (None: the whole vector of a layer)."""

    name: str
    location: str
    unit: str | None
    words: str


_SWEEP_LIST = (
    SweepDef("head", "attn.z", "head", "each head's output (its slice of the attention output projection's input)"),
    SweepDef("attn", "attn.out", None, "each attention layer's output"),
    SweepDef("mlp", "mlp.out", None, "each MLP layer's output"),
    SweepDef("neuron", "mlp.post", "neuron", "each MLP neuron's post-activation"),
    SweepDef("resid.pre", "resid.pre", None, "the residual stream before each layer"),
    SweepDef("resid.mid", "resid.mid", None, "the residual stream between attention and MLP"),
    SweepDef("resid.post", "resid.post", None, "the residual stream after each layer"),
    SweepDef("latent", "sae.latent", "latent", "each latent of every loaded autoencoder"),
)
SWEEPS: dict[str, SweepDef] = {s.name: s for s in _SWEEP_LIST}


# --- where fields, grouping, reductions ------------------------------------------------------------

NODE_FIELDS: tuple[str, ...] = ("layer", "token", "attended", "head", "unit", "prompt", "component")
# the fields each query kind's `where` may test (node queries: also any scalar of the query)
QUERY_FIELDS: dict[str, tuple[str, ...]] = {
    "nodes": NODE_FIELDS,
    "logits": ("token", "prompt"),
    "logit_lens": ("layer", "token", "prompt"),
    "patching": ("layer", "token", "head", "unit", "prompt"),
}
GROUP_KEYS: tuple[str, ...] = ("layer", "token", "prompt", "component")
POSITION_WORDS: tuple[str, ...] = ("position",)  # `by position` is `by token`
# the `by` keys each query kind takes besides the node queries' GROUP_KEYS
QUERY_GROUP_KEYS: dict[str, tuple[str, ...]] = {"metric": ("prompt",), "patching": ("token", "prompt")}
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "max")
TRACE_PATHS: tuple[str, ...] = ("q", "k", "qk", "v")
ROUTE_MODES: tuple[str, ...] = ("cell", "edge")
ROUTE_NORMS: tuple[int, ...] = (1, 2)
RESIDUAL_LOCATIONS: tuple[str, ...] = ("resid.pre", "resid.mid", "resid.post")  # logit_lens `at`

# --- models by name ----------------------------------------------------------------------------------

# `model NAME`: TransformerLens-style names -> Hugging Face hub ids (the architectures tdbql runs)
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

# --- dtypes, switches, settings ----------------------------------------------------------------------

DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")

SWITCHES: dict[str, bool] = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False,
                             "1": True, "0": False}


def switch_value(word: object) -> bool | None:
    """on/off (true/false, yes/no, 1/0) as a bool; None when `word` is none of them."""
    if isinstance(word, bool):
        return word
    return SWITCHES.get(str(word).lower())


@dataclass(frozen=True)
class SettingDef:
    """`set NAME = VALUE`. kind: "switch" (on/off), "choice" (one of `choices`), "count" (a
    positive integer or `auto`, stored as None), "text"."""

    name: str
    kind: str
    help: str
    choices: tuple[str, ...] = ()


_SETTING_LIST = (
    SettingDef("batch_size", "count", "prompts per batch (auto: what the memory budget allows)"),
    SettingDef("compile", "switch", "run plain node queries through torch.compile"),
    SettingDef("device", "text", "torch device of the model (cpu, cuda, cuda:1)"),
    SettingDef("dtype", "choice", "the model's dtype", DTYPES),
    SettingDef("freeze_ln_f", "switch", "detach the final norm's scale in backward passes (TDB's choice)"),
    SettingDef("memory_limit", "text", "memory a query may use beyond what the session holds ('8GB'; auto: what is left)"),
)
SETTINGS: dict[str, SettingDef] = {s.name: s for s in _SETTING_LIST}

# --- TransformerLens / SAELens hook names ------------------------------------------------------------

# `blocks.{L}.<suffix>` -> tdbql's hook location (ours are after rotary, like TL's hook_rot_q/k)
TL_BLOCK_HOOKS: dict[str, str] = {
    "hook_resid_pre": "resid.pre",
    "hook_resid_mid": "resid.mid",
    "hook_resid_post": "resid.post",
    "hook_attn_out": "attn.out",
    "hook_mlp_out": "mlp.out",
    "ln1.hook_scale": "ln1.scale",
    "ln2.hook_scale": "ln2.scale",
    "ln2.hook_normalized": "mlp.in",
    "ln1_post.hook_scale": "ln1_post.scale",
    "ln2_post.hook_scale": "ln2_post.scale",
    "attn.hook_q": "attn.q",
    "attn.hook_k": "attn.k",
    "attn.hook_rot_q": "attn.q",
    "attn.hook_rot_k": "attn.k",
    "attn.hook_v": "attn.v",
    "attn.hook_attn_scores": "attn.logits",
    "attn.hook_pattern": "attn.probs",
    "attn.hook_z": "attn.z",
    "mlp.hook_pre": "mlp.pre",
    "mlp.hook_post": "mlp.post",
}
TL_GLOBAL_HOOKS: dict[str, str] = {
    "hook_embed": "resid.embed",
    "hook_pos_embed": "resid.embed",
    "ln_final.hook_scale": "ln_f.scale",
    "unembed.hook_out": "logits",
    "logits": "logits",
}
# hook locations a node reference may name, and the node they index; "whole" ones are a whole
# sublayer's write (no index)
LOCATION_NODES: dict[str, tuple[str, bool]] = {
    "mlp.post": ("mlp", False),
    "attn.probs": ("attn", False),
    "attn.z": ("attn", False),
    "mlp.out": ("mlp", True),
    "attn.out": ("attn", True),
    "resid.pre": ("resid.pre", True),
    "resid.mid": ("resid.mid", True),
    "resid.post": ("resid", True),
}
# SAELens names an autoencoder's latents `<hook it reads>.hook_sae_acts_post`
SAE_ACTS_SUFFIX = ".hook_sae_acts_post"
LOCATION_SAE_SITES: dict[str, str] = {"mlp.post": "mlp", "mlp.out": "mlp", "attn.z": "attn", "attn.out": "attn",
                                      "resid.post": "resid"}


def hook_node(suffix: str) -> tuple[str, bool] | None:
    """`mlp.hook_post` -> ("mlp", False); `hook_mlp_out` -> ("mlp", True) (a whole write);
    `hook_resid_post.hook_sae_acts_post` -> ("resid_sae", False); None for other names."""
    suffix = suffix.lower()
    if suffix.endswith(SAE_ACTS_SUFFIX):
        site = LOCATION_SAE_SITES.get(TL_BLOCK_HOOKS.get(suffix.removesuffix(SAE_ACTS_SUFFIX), ""))
        return (latent_component(site), False) if site else None
    return LOCATION_NODES.get(TL_BLOCK_HOOKS.get(suffix, ""))


def node_hook_names() -> tuple[str, ...]:
    """Every hook suffix `hook_node` accepts (for "did you mean")."""
    plain = [s for s, loc in TL_BLOCK_HOOKS.items() if loc in LOCATION_NODES]
    saes = [s + SAE_ACTS_SUFFIX for s, loc in TL_BLOCK_HOOKS.items() if loc in LOCATION_SAE_SITES]
    return (*plain, *saes)
