"""Vocabulary projections: the logit lens and upvoted (scored) tokens.

logit_lens: unembed(ln_f(x)) (or unembed(x) with `ln_f off`) of a residual state x at
resid.pre / resid.mid / resid.post of each layer; the top k tokens per (prompt, position,
layer), with their rank change against the residual state just before x in the stream
(resid.post[l] <- resid.mid[l] <- resid.pre[l] = resid.post[l-1]), as LLM-TT's "Top Tokens".
Ranks are 1-based over the whole vocabulary; rank_change = previous rank - rank (positive: rose).

upvoted: a node's write w to the residual stream scored as w @ (W_U * gamma_f) minus the mean
over the vocabulary (TDB's "scored tokens", docs/scalars.md; gamma_f = the final norm's weight, no bias).
Nodes: a neuron mlp[L,N] (activation-scaled write, or the raw W_out row with `raw`), a head
attn[L,H] (its output at the token, or one key's share with @t:u; `raw` with a key: v[u] W_O[h]
without the attention weight), an autoencoder latent (z * decoder row, or the raw row), and
whole-block updates: mlp[L] / attn[L] (index omitted: the sublayer's write, biases included) and
block[L] (resid.post - resid.pre of layer L).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import torch

from ..query.catalog import COMPONENTS
from ..query.context import PromptRow
from ..query.errors import TdbqlError
from ..query.plan import LogitLensQuery, NodeRef, UpvotedQuery
from .arrow import LENS_SCHEMA, UPVOTED_SCHEMA, concat_tables, floats, ints, repeat, token_strings
from .conditions import ids_kept, positions_kept
from .runtime.batching import DEFAULT_TOKEN_BUDGET, AddHooks, batch_hooks, batches, forward_no_grad
from .runtime.hooks import NO_HOOKS

# --- unembedding helpers --------------------------------------------------------------------------


def unembed(model, x: torch.Tensor, *, use_ln_f: bool = True) -> torch.Tensor:
    """Logits of residual states x [..., d_model], through the final norm or not (soft-capped
    as the model's own where the family caps them: Gemma 2)."""
    if use_ln_f:
        x = model.ln_f(x, NO_HOOKS, "ln_f.scale", None)
    logits = x.to(model.W_U.dtype) @ model.W_U
    if model.b_U is not None:
        logits = logits + model.b_U
    return model.cap_logits(logits).float()


def ranks_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """1-based rank of ids [..., k] within logits [..., V] (1 + how many are strictly larger)."""
    chosen = logits.gather(-1, ids)
    return 1 + (logits[..., None, :] > chosen[..., :, None]).sum(-1)


def scored_tokens_matrix(model) -> torch.Tensor:
    """W_U * gamma_f: [d_model, vocab], the write-to-score map of TDB's upvoted tokens."""
    return (model.W_U * model.final_norm_weight[:, None]).float()


def score_writes(model, writes: torch.Tensor) -> torch.Tensor:
    """writes [..., d_model] -> scores [..., vocab], vocab mean removed."""
    scores = writes.float() @ scored_tokens_matrix(model)
    return scores - scores.mean(-1, keepdim=True)


# --- logit lens -------------------------------------------------------------------------------------


_PREVIOUS = {"resid.post": "resid.mid", "resid.mid": "resid.pre", "resid.pre": None}


def logit_lens(
    loaded,
    query: LogitLensQuery,
    prompts: Sequence[PromptRow],
    *,
    add_hooks: AddHooks | None = None,
) -> pa.Table:
    """Top-k lens rows per (prompt, position, layer) at `query.at` of a bound query; `add_hooks`
    installs the query's ablations (the engine passes them)."""
    layers = ids_kept(query.where, "layer", torch.arange(loaded.config.n_layers)).tolist()
    prompt_ids = set(ids_kept(query.where, "prompt", torch.tensor([p.prompt_id for p in prompts])).tolist())
    chosen = [p for p in prompts if p.prompt_id in prompt_ids]
    parts: list[pa.Table] = []
    k = min(query.k, loaded.config.vocab_size)
    for batch in batches(loaded, chosen, token_budget=DEFAULT_TOKEN_BUDGET):
        states = _capture_residuals(loaded, batch, layers, query.at, add_hooks)
        for row, n in enumerate(batch.lengths.tolist()):
            positions = positions_kept(query.where, "token", n)
            if len(positions) == 0:
                continue
            for layer in layers:
                parts.append(_lens_rows(loaded, batch, row, layer, positions, states, query, k))
    return concat_tables(parts, LENS_SCHEMA)


def _capture_residuals(loaded, batch, layers, at, add_hooks) -> dict[tuple[str, int], torch.Tensor]:
    """Residual states at `at` and their predecessors, for the chosen layers."""
    wanted: set[tuple[str, int]] = set()
    for layer in layers:
        wanted.add((at, layer))
        prev = _previous_location(at, layer)
        if prev is not None:
            wanted.add(prev)
    states: dict[tuple[str, int], torch.Tensor] = {}
    hooks = batch_hooks(batch, add_hooks)
    for loc, layer in sorted(wanted, key=lambda x: (x[1], x[0])):
        hooks.add(loc, layer, _store(states, (loc, layer)))
    forward_no_grad(loaded, batch, hooks)
    return states


def _store(states: dict, key) -> Callable[[torch.Tensor], None]:
    def save(x: torch.Tensor) -> None:
        states[key] = x.detach()

    return save


def _previous_location(at: str, layer: int) -> tuple[str, int] | None:
    """The residual state just before (at, layer): resid.pre[l] = resid.post[l-1], preceded by resid.mid[l-1]."""
    prev = _PREVIOUS[at]
    if prev is not None:
        return (prev, layer)
    return ("resid.mid", layer - 1) if layer > 0 else None


def _lens_rows(loaded, batch, row, layer, positions, states, query: LogitLensQuery, k: int) -> pa.Table:
    model = loaded.model
    x = states[(query.at, layer)][row, positions]  # [P, d]
    logits = unembed(model, x, use_ln_f=query.use_ln_f)  # [P, V]
    top_logits, top_ids = logits.topk(k, dim=-1)  # [P, k]
    probs = logits.softmax(-1).gather(-1, top_ids)
    ranks = ranks_of(logits, top_ids)
    prev_key = _previous_location(query.at, layer)
    if prev_key is None:
        change = None
    else:
        prev_logits = unembed(model, states[prev_key][row, positions], use_ln_f=query.use_ln_f)
        change = (ranks_of(prev_logits, top_ids) - ranks).reshape(-1)
    n_rows = top_ids.numel()
    ids = top_ids.reshape(-1)
    return pa.table(
        {
            "prompt_id": repeat(batch.prompt_id(row), n_rows, "prompt_id"),
            "position": ints(positions[:, None].expand(-1, k).reshape(-1)),
            "layer": repeat(layer, n_rows, "layer"),
            "vocab_id": ints(ids),
            "token": token_strings(ids, loaded.token_str),
            "logit": floats(top_logits.reshape(-1)),
            "prob": floats(probs.reshape(-1)),
            "rank": ints(ranks.reshape(-1)),
            "rank_change": ints(change, n_rows),
        },
        schema=LENS_SCHEMA,
    )


# --- upvoted tokens ---------------------------------------------------------------------------------


def upvoted(
    loaded,
    query: UpvotedQuery,
    prompts: Sequence[PromptRow],
    *,
    add_hooks: AddHooks | None = None,
) -> pa.Table:
    """Top (or bottom, `query.bottom`) k tokens that a node's write promotes, per prompt and position.

    A raw neuron or latent row does not depend on the prompt: one set of rows, prompt_id and
    position NULL."""
    node = query.node
    k = min(query.k, loaded.config.vocab_size)
    if query.raw and node.component != "attn":
        writes = _raw_write(loaded, node)[None]  # [1, d]
        return _upvoted_rows(loaded, query, None, None, None, writes, k)
    parts = []
    for batch in batches(loaded, prompts, token_budget=DEFAULT_TOKEN_BUDGET):
        saved = _capture_node(loaded, batch, node, add_hooks)
        for row, n in enumerate(batch.lengths.tolist()):
            prompt_id = batch.prompt_id(row)
            if node.token is None:
                positions = torch.arange(n)
            else:
                positions = torch.tensor([_position(node.token, n, prompt_id)])
            key = None if node.key is None else _key_position(node.key, int(positions[0]), n, prompt_id)
            writes = _node_writes(loaded, node, saved, row, positions, key, query.raw)  # [P, d]
            parts.append(_upvoted_rows(loaded, query, prompt_id, positions, key, writes, k))
    return concat_tables(parts, UPVOTED_SCHEMA)


def _position(token: int, n: int, prompt_id: int) -> int:
    position = token + n if token < 0 else token
    if not 0 <= position < n:
        raise TdbqlError(f"token {token} is outside prompt {prompt_id}, which has {n} tokens")
    return position


def _key_position(key: int, query_position: int, n: int, prompt_id: int) -> int:
    position = _position(key, n, prompt_id)
    if position > query_position:
        raise TdbqlError(f"key token {key} comes after query token {query_position} in prompt {prompt_id}: not attended")
    return position


def _raw_write(loaded, node: NodeRef) -> torch.Tensor:
    if node.component == "mlp":
        return loaded.model.W_out(node.layer)[node.index].detach()
    return loaded.decoder_in_resid(COMPONENTS[node.component].site, node.layer)[node.index].detach()


def _capture_node(loaded, batch, node: NodeRef, add_hooks) -> dict[str, torch.Tensor]:
    """The activations a node's write needs, from one forward pass."""
    needs = {
        "mlp": ["mlp.post"] if node.index is not None else ["mlp.out"],
        "attn": ["attn.probs", "attn.v", "attn.z"] if node.index is not None else ["attn.out"],
        "block": ["resid.pre", "resid.post"],
    }
    if node.component not in needs:  # a latent
        needs[node.component] = [f"sae.{COMPONENTS[node.component].site}.latent"]
    locations = needs[node.component] + _write_scales(loaded, node)
    saved: dict[str, torch.Tensor] = {}
    hooks = batch_hooks(batch, add_hooks)
    for loc in locations:
        hooks.add(loc, node.layer, _store(saved, loc))
    forward_no_grad(loaded, batch, hooks)
    return saved


def _write_scales(loaded, node: NodeRef) -> list[str]:
    """What divides a unit's write: in post-norm families the post-norm's scale (neurons, heads,
    MLP latents); for a latent of an autoencoder that normalises its input, its output divisor."""
    if node.index is None or node.component == "block":
        return []
    site = "attn" if node.component == "attn" else "mlp" if node.component in ("mlp", "mlp_sae") else None
    post = None if site is None else loaded.model.write_scale_location(site)
    scales = [] if post is None else [post]
    ae = loaded.saes.get((COMPONENTS[node.component].site, node.layer)) if node.component not in ("mlp", "attn") else None
    if ae is not None and ae.normalize != "none" and not ae.transcoder:
        scales.append(f"sae.{ae.site}.scale")
    return scales


def _node_writes(loaded, node: NodeRef, saved, row, positions, key, raw) -> torch.Tensor:
    """The node's write to the residual stream at each position: [P, d_model] (in post-norm
    families divided by the post-norm's scale at the position; `raw` key writes included)."""
    writes = _unscaled_writes(loaded, node, saved, row, positions, key, raw)
    for scale in _write_scales(loaded, node):
        writes = writes / saved[scale][row, positions]
    return writes


def _unscaled_writes(loaded, node: NodeRef, saved, row, positions, key, raw) -> torch.Tensor:
    model, layer, idx = loaded.model, node.layer, node.index
    if node.component == "block":
        return saved["resid.post"][row, positions] - saved["resid.pre"][row, positions]
    if node.component == "mlp":
        if idx is None:
            return saved["mlp.out"][row, positions]
        return saved["mlp.post"][row, positions, idx, None] * model.W_out(layer)[idx][None]
    if node.component == "attn":
        if idx is None:
            return saved["attn.out"][row, positions]
        return _head_write(loaded, node, saved, row, positions, key, raw)
    site = COMPONENTS[node.component].site
    latent = saved[f"sae.{site}.latent"][row, positions, idx]
    return latent[:, None] * loaded.decoder_in_resid(site, layer)[idx][None]


def _head_write(loaded, node: NodeRef, saved, row, positions, key, raw) -> torch.Tensor:
    """Head h's output at the query (z @ W_O[h]), or one key's share A[t,u] v[u] W_O[h] (raw: without A)."""
    W_O = loaded.model.W_O(node.layer)[node.index]  # [d_head, d_model]
    if key is None:
        return saved["attn.z"][row, positions, node.index] @ W_O
    group = loaded.config.n_heads // loaded.config.n_kv_heads
    per_unit = saved["attn.v"][row, key, node.index // group] @ W_O  # [d_model]
    if raw:
        return per_unit[None].expand(len(positions), -1)
    prob = saved["attn.probs"][row, node.index, positions, key]  # [P]
    return prob[:, None] * per_unit[None]


def _upvoted_rows(loaded, query: UpvotedQuery, prompt_id, positions, key, writes: torch.Tensor, k: int) -> pa.Table:
    node = query.node
    scores = score_writes(loaded.model, writes)  # [P, V]
    top_scores, top_ids = (-scores if query.bottom else scores).topk(k, dim=-1)
    top_scores = -top_scores if query.bottom else top_scores
    n_pos, n_rows = writes.shape[0], top_ids.numel()
    ids = top_ids.reshape(-1)
    return pa.table(
        {
            "prompt_id": repeat(prompt_id, n_rows, "prompt_id"),
            "layer": repeat(node.layer, n_rows, "layer"),
            "component": repeat(node.component, n_rows, "component"),
            "unit": repeat(node.index, n_rows, "unit"),
            "position": ints(None if positions is None else positions[:, None].expand(-1, k).reshape(-1), n_rows),
            "attended": repeat(key, n_rows, "attended"),
            "vocab_id": ints(ids),
            "token": token_strings(ids, loaded.token_str),
            "score": floats(top_scores.reshape(-1)),
            "rank": ints(torch.arange(1, k + 1).repeat(n_pos)),
        },
        schema=UPVOTED_SCHEMA,
    )
