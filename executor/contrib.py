"""Contributions of the parts of a residual update to the whole (LLM-TT / Information Flow Routes).

For a whole vector y (a residual state after a block) and parts P_i that sum to it, the
proximity of a part is d_i = max(||y||_p - ||P_i - y||_p, EPS) and its contribution is
c_i = d_i / sum_j d_j, normalised jointly over every part (docs/routes.md).

- attention at query t: one part per (key u, head h), A_h[t,u] * v[u,h] @ W_O[h] (v with its
  bias), plus the incoming residual resid_pre[t]; whole = resid_mid[t]. Keys after t are zero
  parts and get the EPS floor, as in LLM-TT (counted up to the prompt's own length).
- MLP at token t: parts {mlp_out[t], resid_mid[t]}; whole = resid_post[t].
- neurons at token t: one part per neuron, post[t,n] * W_out[n], plus resid_mid[t].
- post-norm families (Gemma 2/3, OLMo 2): W_O and W_out carry the post-norm's weight and every
  part at query t is divided by the post-norm's scale there, so the parts still sum to the write.

Nothing here materialises tokens x tokens x heads x d_model. Every part is a scaled row,
s[q,j] * rows[j], so the L1 distances are computed in tiles (query block x row block), only for
rows a query can see (keys u <= t); the L2 variant needs no d-sized tile at all:
||s r - y||^2 = s^2 ||r||^2 - 2 s <r, y> + ||y||^2 (one matmul, accumulated in float64).

The first part of this module is pure tensor functions (testable without a model); then
`ContributionCapture`, hooks that compute a layer's shares inside any forward pass (the engine's
node pass for the `contribution` scalar, the routes pass); the end runs a loaded model on its own
and returns Arrow rows (`contributions`, for direct use and the LLM-TT parity tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch

from ..query.context import PromptRow
from ..query.errors import TdbqlError
from .arrow import CONTRIBUTION_SCHEMA, concat_tables, floats, ints, repeat
from .keys import keys_up_to
from .runtime.batching import DEFAULT_TOKEN_BUDGET, AddHooks, Batch, batch_hooks, batches, forward_no_grad
from .runtime.hooks import HookSet

EPS = 1e-5  # LLM-TT's floor on proximities: even a zero part keeps a tiny share
DEFAULT_TILE_ELEMENTS = 1 << 21  # elements of one (query block x row block x d_model) L1 tile


# --- pure tensor functions -----------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision activations are upcast; norms are accumulated in at least fp32."""
    return torch.promote_types(x.dtype, torch.float32)


def _vector_norm(x: torch.Tensor, norm: int) -> torch.Tensor:
    return torch.linalg.vector_norm(x, ord=norm, dim=-1)


def whole_proximity(part: torch.Tensor, whole: torch.Tensor, norm: int = 1) -> torch.Tensor:
    """max(||whole|| - ||part - whole||, EPS) along the last dim (float64 inside); part and whole broadcast."""
    part64, whole64 = part.double(), whole.double()
    dist = _vector_norm(part64 - whole64, norm)
    prox = (_vector_norm(whole64, norm) - dist).clamp_min(EPS)
    return prox.to(_compute_dtype(whole))


def scaled_part_proximity(
    scales: torch.Tensor,  # [Q, J]   part (q, j) = scales[q, j] * rows[j]
    rows: torch.Tensor,  # [J, d]
    whole: torch.Tensor,  # [Q, d]
    *,
    norm: int = 1,
    limit: torch.Tensor | None = None,  # [Q] rows j >= limit[q] are zero parts (EPS, not computed)
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
) -> torch.Tensor:
    """Proximities [Q, J] of the parts scales[q, j] * rows[j] to whole[q], without a [Q, J, d] tensor.

    Distances are accumulated in float64: a proximity is a small difference of two norms of size
    ||y||, and float32 noise of ulp(||y||) clipped at EPS would add a positive bias to each of the
    many near-zero parts (measured: 1e-5 per part at ||y||_1 = 75, so the denominator drifts)."""
    if norm not in (1, 2):
        raise TdbqlError(f"contribution norm must be 1 or 2, not {norm}")
    dtype = _compute_dtype(whole)
    if norm == 2:
        prox = _l2_proximity(scales, rows, whole, tile_elements)
    else:
        prox = _l1_proximity_tiled(scales, rows, whole, limit, tile_elements)
    if limit is not None:
        cols = torch.arange(scales.shape[1], device=scales.device)
        prox = prox.masked_fill(cols[None, :] >= limit[:, None], EPS)
    return prox.to(dtype)


def _l1_proximity_tiled(
    scales: torch.Tensor, rows: torch.Tensor, whole: torch.Tensor, limit: torch.Tensor | None, tile_elements: int
) -> torch.Tensor:
    n_queries, n_rows = scales.shape
    d = rows.shape[1]
    prox = torch.full((n_queries, n_rows), EPS, dtype=_compute_dtype(whole), device=whole.device)
    rows64, neg_whole64 = rows.double(), -whole.double()
    whole_norm = _vector_norm(neg_whole64, 1)  # [Q]
    row_block = max(1, min(n_rows, tile_elements // d))
    query_block = max(1, min(n_queries, tile_elements // (row_block * d)))
    for q0 in range(0, n_queries, query_block):
        q1 = min(n_queries, q0 + query_block)
        visible = n_rows if limit is None else int(limit[q0:q1].max())
        for j0 in range(0, visible, row_block):
            j1 = min(visible, j0 + row_block)
            # tile [qb, jb, d] = s * r - y, reduced over d at once
            s = scales[q0:q1, j0:j1, None].double()
            tile = torch.addcmul(neg_whole64[q0:q1, None, :], s, rows64[None, j0:j1, :])
            dist = _vector_norm(tile, 1)
            prox[q0:q1, j0:j1] = (whole_norm[q0:q1, None] - dist).clamp_min(EPS)
    return prox


def _l2_proximity(scales: torch.Tensor, rows: torch.Tensor, whole: torch.Tensor, tile_elements: int) -> torch.Tensor:
    """||s r - y||^2 = s^2 ||r||^2 - 2 s <r, y> + ||y||^2, in float64, a block of queries at a time."""
    r = rows.double()
    row_sq = (r * r).sum(-1)  # [J]
    prox = torch.empty(scales.shape, dtype=_compute_dtype(whole), device=whole.device)
    query_block = max(1, tile_elements // max(1, scales.shape[1]))
    for q0 in range(0, scales.shape[0], query_block):
        q1 = min(scales.shape[0], q0 + query_block)
        s, y = scales[q0:q1].double(), whole[q0:q1].double()
        whole_sq = (y * y).sum(-1)  # [q]
        dist_sq = s * s * row_sq[None, :] - 2 * s * (y @ r.T) + whole_sq[:, None]
        prox[q0:q1] = (whole_sq.sqrt()[:, None] - dist_sq.clamp_min(0).sqrt()).clamp_min(EPS)
    return prox


def normalise_with_residual(part_prox: torch.Tensor, residual_prox: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint normalisation: parts [Q, ...] and residual [Q] -> shares summing to 1 per query."""
    flat = part_prox.reshape(part_prox.shape[0], -1)
    total = (flat.sum(-1, dtype=torch.float64) + residual_prox).to(part_prox.dtype)  # [Q]
    shape = (-1,) + (1,) * (part_prox.dim() - 1)
    return part_prox / total.reshape(shape), residual_prox / total


def per_key_head_writes(v: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """u[k, h, :] = v[k, kv(h)] @ W_O[h]: what head h writes per unit of attention on key k.

    v: [T, kv_heads, d_head] (with its bias); W_O: [heads, d_head, d_model] -> [T, heads, d_model].
    Key/value heads are shared by consecutive query heads (grouped-query attention)."""
    n_heads, n_kv = W_O.shape[0], v.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} heads do not divide into {n_kv} key/value heads")
    v_per_head = v.repeat_interleave(n_heads // n_kv, dim=1)  # [T, H, d_head]
    dtype = _compute_dtype(v)
    return torch.einsum("khe,hed->khd", v_per_head.to(dtype), W_O.to(dtype))


def attention_contributions(
    resid_pre: torch.Tensor,  # [T, d]
    resid_mid: torch.Tensor,  # [T, d]
    probs: torch.Tensor,  # [H, T, T] (query, key)
    writes: torch.Tensor,  # [T, H, d] from per_key_head_writes
    *,
    norm: int = 1,
    queries: torch.Tensor | None = None,  # [Q] query positions; default all
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_attn [Q, T(key), H] and c_res [Q]; per query, sum over (key, head) + residual = 1."""
    n_tokens, n_heads, d = writes.shape
    if queries is None:
        queries = torch.arange(n_tokens, device=resid_mid.device)
    whole = resid_mid[queries]  # [Q, d]
    scales = probs[:, queries, :].permute(1, 2, 0).reshape(len(queries), n_tokens * n_heads)  # [Q, (key head)]
    rows = writes.reshape(n_tokens * n_heads, d)  # [(key head), d]
    visible = (queries + 1) * n_heads  # keys u <= t
    part_prox = scaled_part_proximity(scales, rows, whole, norm=norm, limit=visible, tile_elements=tile_elements)
    dtype = _compute_dtype(whole)
    residual_prox = whole_proximity(resid_pre[queries].to(dtype), whole.to(dtype), norm)
    c_attn, c_res = normalise_with_residual(part_prox.reshape(len(queries), n_tokens, n_heads), residual_prox)
    return c_attn, c_res


def mlp_contributions(
    resid_mid: torch.Tensor, mlp_out: torch.Tensor, resid_post: torch.Tensor, *, norm: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_mlp [T], c_res [T]): the MLP's write and the residual, as shares of resid_post."""
    dtype = _compute_dtype(resid_post)
    whole = resid_post.to(dtype)
    prox_mlp = whole_proximity(mlp_out.to(dtype), whole, norm)
    prox_res = whole_proximity(resid_mid.to(dtype), whole, norm)
    total = prox_mlp + prox_res
    return prox_mlp / total, prox_res / total


def neuron_contributions(
    resid_mid: torch.Tensor,  # [T, d]
    resid_post: torch.Tensor,  # [T, d]
    post: torch.Tensor,  # [T, d_mlp] what W_out reads
    W_out: torch.Tensor,  # [d_mlp, d]
    *,
    norm: int = 1,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_neuron [T, d_mlp], c_res [T]): parts post[t,n] * W_out[n] plus resid_mid[t] (b_out in no part)."""
    dtype = _compute_dtype(resid_post)
    whole = resid_post.to(dtype)
    part_prox = scaled_part_proximity(post, W_out, whole, norm=norm, tile_elements=tile_elements)
    residual_prox = whole_proximity(resid_mid.to(dtype), whole, norm)
    return normalise_with_residual(part_prox, residual_prox)


def threshold_and_renormalize(
    blocks: torch.Tensor, residual: torch.Tensor, threshold: float, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero shares <= threshold (blocks [Q, ...] and residual [Q]); optionally rescale the rest to sum 1.

    Unlike LLM-TT, a query whose shares are all cut keeps zeros instead of dividing by zero."""
    kept_blocks = blocks * (blocks > threshold)
    kept_residual = residual * (residual > threshold)
    if not renormalize:
        return kept_blocks, kept_residual
    total = kept_blocks.reshape(blocks.shape[0], -1).sum(-1) + kept_residual
    safe = torch.where(total > 0, total, torch.ones_like(total))
    shape = (-1,) + (1,) * (blocks.dim() - 1)
    return kept_blocks / safe.reshape(shape), kept_residual / safe


# --- running a model: capture one layer at a time ------------------------------------------------


@dataclass
class LayerContributions:
    """One layer's contributions for one prompt (length n); any field may be None if not asked."""

    prompt_index: int  # row in the batch
    layer: int
    queries: torch.Tensor  # [Q] positions the attention/neuron rows are for
    attn: torch.Tensor | None = None  # [Q, n(key), H]
    attn_resid: torch.Tensor | None = None  # [Q]
    mlp: torch.Tensor | None = None  # [n]
    mlp_resid: torch.Tensor | None = None  # [n]
    neurons: torch.Tensor | None = None  # [Q, d_mlp]
    neurons_resid: torch.Tensor | None = None  # [Q]


class ContributionCapture:
    """Hooks that compute a layer's contributions as soon as its tensors exist, then drop them.

    Attention shares are computed at the layer's resid.mid hook (so the attention probabilities
    of one layer at a time are alive), MLP shares at resid.post. `sink` receives each result."""

    def __init__(
        self,
        model,
        batch: Batch,
        layers: Sequence[int],
        *,
        attention: bool,
        mlp_blocks: bool,
        neurons: bool,
        norm: int,
        queries: Callable[[int], torch.Tensor] | None,
        sink: Callable[[LayerContributions], None],
        tile_elements: int = DEFAULT_TILE_ELEMENTS,
    ) -> None:
        self.model = model
        self.batch = batch
        self.want_attention, self.want_mlp, self.want_neurons = attention, mlp_blocks, neurons
        self.norm = norm
        self.queries = queries
        self.sink = sink
        self.tile_elements = tile_elements
        self.layers = list(layers)
        self.saved: dict[str, torch.Tensor] = {}

    def install(self, hooks: HookSet) -> HookSet:
        # post-norm families: parts are divided by the post-norm's scale at the query token
        self.attn_scale, self.mlp_scale = self.model.write_scale_location("attn"), self.model.write_scale_location("mlp")
        for layer in self.layers:
            if self.want_attention:
                for loc in ("resid.pre", "attn.probs", "attn.v", self.attn_scale):
                    if loc is not None:
                        hooks.add(loc, layer, self._saver(loc))
                hooks.add("resid.mid", layer, self._on_resid_mid(layer))
            if self.want_mlp or self.want_neurons:
                hooks.add("resid.mid", layer, self._saver("resid.mid"))
                if self.want_mlp:
                    hooks.add("mlp.out", layer, self._saver("mlp.out"))
                if self.want_neurons:
                    for loc in ("mlp.post", self.mlp_scale):
                        if loc is not None:
                            hooks.add(loc, layer, self._saver(loc))
                hooks.add("resid.post", layer, self._on_resid_post(layer))
        return hooks

    def _per_write(self, location: str | None, row: int, n: int) -> torch.Tensor | float:
        """(n, 1): 1 / the post-norm scale at each token of a prompt (1 without post-norms)."""
        return 1.0 if location is None else 1.0 / self.saved[location][row, :n]

    def _saver(self, loc: str) -> Callable[[torch.Tensor], None]:
        def save(x: torch.Tensor) -> None:
            self.saved[loc] = x.detach()

        return save

    def _query_positions(self, row: int) -> torch.Tensor:
        n = self.batch.length(row)
        device = self.batch.input_ids.device
        if self.queries is None:
            return torch.arange(n, device=device)
        return self.queries(n).to(device)

    def _on_resid_mid(self, layer: int) -> Callable[[torch.Tensor], None]:
        def compute(resid_mid: torch.Tensor) -> None:
            W_O = self.model.W_O(layer).detach()
            for row, n in enumerate(self.batch.lengths.tolist()):
                writes = per_key_head_writes(self.saved["attn.v"][row, :n], W_O)
                queries = self._query_positions(row)
                c_attn, c_res = attention_contributions(
                    self.saved["resid.pre"][row, :n],
                    resid_mid[row, :n].detach(),
                    self.saved["attn.probs"][row, :, :n, :n] * self._per_write(self.attn_scale, row, n),
                    writes,
                    norm=self.norm,
                    queries=queries,
                    tile_elements=self.tile_elements,
                )
                self.sink(LayerContributions(row, layer, queries, attn=c_attn, attn_resid=c_res))
            for loc in ("resid.pre", "attn.probs", "attn.v", self.attn_scale):
                self.saved.pop(loc, None)

        return compute

    def _on_resid_post(self, layer: int) -> Callable[[torch.Tensor], None]:
        def compute(resid_post: torch.Tensor) -> None:
            for row, n in enumerate(self.batch.lengths.tolist()):
                mid, post_state = self.saved["resid.mid"][row, :n], resid_post[row, :n].detach()
                result = LayerContributions(row, layer, self._query_positions(row))
                if self.want_mlp:
                    mlp_out = self.saved["mlp.out"][row, :n]
                    result.mlp, result.mlp_resid = mlp_contributions(mid, mlp_out, post_state, norm=self.norm)
                if self.want_neurons:
                    q = result.queries
                    post = self.saved["mlp.post"][row, :n] * self._per_write(self.mlp_scale, row, n)
                    result.neurons, result.neurons_resid = neuron_contributions(
                        mid[q], post_state[q], post[q], self.model.W_out(layer).detach(),
                        norm=self.norm, tile_elements=self.tile_elements,
                    )
                self.sink(result)
            for loc in ("resid.mid", "mlp.out", "mlp.post", self.mlp_scale):
                self.saved.pop(loc, None)

        return compute


def run_capture(
    loaded,
    batch: Batch,
    capture: ContributionCapture,
    *,
    add_hooks: AddHooks | None = None,
) -> None:
    """One forward pass of `batch` with the capture hooks (after any hooks `add_hooks` registers)."""
    hooks = batch_hooks(batch, add_hooks)
    capture.install(hooks)
    forward_no_grad(loaded, batch, hooks)


def contributions(
    loaded,
    prompts: Sequence[PromptRow],
    *,
    components: Sequence[str] = ("attn", "mlp"),
    layers: Sequence[int] | None = None,
    positions: Callable[[int], torch.Tensor] | None = None,
    norm: int = 1,
    add_hooks: AddHooks | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
) -> pa.Table:
    """Rows for the `contribution` scalar (LLM-TT proximity shares).

    components: 'attn' -> one row per (t, u <= t, h) with unit = h, attended = u;
    'head' -> the attention shares summed over keys, per (t, h) (attended NULL);
    'mlp' -> one row per (t, neuron n) with unit = n (the per-neuron split, jointly
    normalised with the residual; 'neuron_resid' is that residual's share); 'attn_resid' -> the
    residual's share against the attention parts; 'mlp_block' / 'mlp_resid' -> LLM-TT's two-part
    MLP split: the whole MLP's and the residual's shares of resid_post (unit NULL).
    positions: n_tokens -> LongTensor of query positions to compute (default all).
    add_hooks(hooks, batch): registers other hooks first (e.g. the engine's ablations), so captures see their effect.
    """
    known = {"attn", "head", "mlp", "neuron_resid", "attn_resid", "mlp_resid", "mlp_block"}
    unknown = set(components) - known
    if unknown:
        raise TdbqlError(f"contribution is not defined for {', '.join(sorted(unknown))}; it covers {', '.join(sorted(known))}")
    n_layers = loaded.config.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    builder = _RowBuilder()
    for batch in batches(loaded, prompts, token_budget=token_budget):
        def sink(res: LayerContributions, batch=batch) -> None:
            builder.add(batch.prompt_id(res.prompt_index), res, components)

        capture = ContributionCapture(
            loaded.model,
            batch,
            layers,
            attention=bool({"attn", "head", "attn_resid"} & set(components)),
            mlp_blocks=bool({"mlp_block", "mlp_resid"} & set(components)),
            neurons=bool({"mlp", "neuron_resid"} & set(components)),
            norm=norm,
            queries=positions,
            sink=sink,
            tile_elements=tile_elements,
        )
        run_capture(loaded, batch, capture, add_hooks=add_hooks)
    return builder.table()


class _RowBuilder:
    """Accumulates columns as numpy chunks; one Arrow table at the end."""

    def __init__(self) -> None:
        self.chunks: list[pa.Table] = []

    def add(self, prompt_id: int, res: LayerContributions, components: Sequence[str]) -> None:
        q = res.queries.cpu()
        if res.attn is not None:
            if "attn" in components:
                self._attn_rows(prompt_id, res.layer, q, res.attn)
            if "head" in components:
                heads = (res.attn * keys_up_to(res.queries, res.attn.shape[1])[..., None]).sum(1)  # [Q, H], u <= t
                t, h = _grid(q, heads.shape[1])
                self._emit(prompt_id, res.layer, "head", h, t, None, heads.reshape(-1))
            if "attn_resid" in components:
                self._emit(prompt_id, res.layer, "attn_resid", None, q, None, res.attn_resid)
        if res.mlp is not None:
            every = torch.arange(len(res.mlp))
            if "mlp_block" in components:
                self._emit(prompt_id, res.layer, "mlp_block", None, every, None, res.mlp)
            if "mlp_resid" in components:
                self._emit(prompt_id, res.layer, "mlp_resid", None, every, None, res.mlp_resid)
        if res.neurons is not None:
            if "mlp" in components:
                t, n = _grid(q, res.neurons.shape[1])
                self._emit(prompt_id, res.layer, "mlp", n, t, None, res.neurons.reshape(-1))
            if "neuron_resid" in components:
                self._emit(prompt_id, res.layer, "neuron_resid", None, q, None, res.neurons_resid)

    def _attn_rows(self, prompt_id: int, layer: int, q: torch.Tensor, c_attn: torch.Tensor) -> None:
        n_q, n_keys, n_heads = c_attn.shape
        t = q[:, None, None].expand(n_q, n_keys, n_heads)
        u = torch.arange(n_keys)[None, :, None].expand(n_q, n_keys, n_heads)
        h = torch.arange(n_heads)[None, None, :].expand(n_q, n_keys, n_heads)
        causal = u <= t
        self._emit(prompt_id, layer, "attn", h[causal], t[causal], u[causal], c_attn.cpu()[causal])

    def _emit(self, prompt_id, layer, component, unit, position, attended, values) -> None:
        n = len(values)
        self.chunks.append(
            pa.table(
                {
                    "prompt_id": repeat(prompt_id, n, "prompt_id"),
                    "layer": repeat(layer, n, "layer"),
                    "component": repeat(component, n, "component"),
                    "unit": ints(unit, n),
                    "position": ints(position, n),
                    "attended": ints(attended, n),
                    "contribution": floats(values),
                },
                schema=CONTRIBUTION_SCHEMA,
            )
        )

    def table(self) -> pa.Table:
        return concat_tables(self.chunks, CONTRIBUTION_SCHEMA)


def _grid(queries: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, index) flattened in row-major order for a [Q, width] tensor."""
    t = queries[:, None].expand(len(queries), width).reshape(-1)
    i = torch.arange(width)[None, :].expand(len(queries), width).reshape(-1)
    return t, i

