"""Information-flow routes (LLM-TT's graph), built with tensors and emitted as two Arrow tables.

Nodes per prompt (LLM-TT's names in brackets): `embed` at layer 0 [X0], and per layer l
`resid.mid` [A_l, after attention], `mlp` [M_l, the FFN block], `resid.post` [I_l, block output].
Edges, each per position and layer l (src -> dst):
- `attn`       resid.pre[l]@u -> resid.mid[l]@t, one row per head h (u <= t); the graph edge
               between the two nodes is the sum over heads (group by prompt_id, layer, src, dst);
- `attn_resid` resid.pre[l]@t -> resid.mid[l]@t (the residual around attention);
- `mlp`        resid.mid[l]@t -> resid.post[l]@t through the FFN node (LLM-TT's A->M and M->I,
               which carry the same weight);
- `mlp_resid`  resid.mid[l]@t -> resid.post[l]@t (the residual around the MLP).
resid.pre[l] is resid.post[l-1], or `embed` for l = 0.

Thresholds (docs/routes.md): `cell` (the default) cuts each (key, head) share <= threshold before
heads are summed (LLM-TT with "renormalize" on, its default); `edge` cuts head-summed edges <=
threshold (LLM-TT with it off), where, as in LLM-TT's graph, the residual and the u = t attention
edge count as one edge. MLP shares are cut the same way; `renormalize` (default on) rescales what
is kept to sum to 1 per node. route_nodes are the nodes reachable from the chosen token's final state over kept edges,
found by a backward sweep over layers with boolean masks; route_edges are the kept edges into
reachable nodes. Only kept entries of each layer are stored (at most 1/threshold edges per
node), so memory does not grow with tokens squared across layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from ..query.context import PromptRow
from ..query.errors import TdbqlError
from ..query.plan import RoutesQuery
from . import contrib
from .arrow import ROUTE_EDGE_SCHEMA, ROUTE_NODE_SCHEMA, concat_tables, floats, ints, repeat
from .keys import causal_mask
from .runtime.batching import AddHooks, batches

# --- pure functions: thresholds and reachability --------------------------------------------------


@dataclass
class AttentionEdges:
    """Kept attention of one layer: edges (t <- u) with per-head weights, and the residual."""

    dst: torch.Tensor  # [E] query position t
    src: torch.Tensor  # [E] key position u
    heads: torch.Tensor  # [E, H] per-head weight (zero where a cell was cut)
    resid: torch.Tensor  # [n] residual weight (zero where cut)


@dataclass
class MlpEdges:
    mlp: torch.Tensor  # [n] weight through the FFN node (zero where cut)
    resid: torch.Tensor  # [n]


def threshold_attention(
    c_attn: torch.Tensor,  # [n(query), n(key), H]
    c_res: torch.Tensor,  # [n]
    threshold: float,
    *,
    mode: str = "cell",
    renormalize: bool = True,
) -> AttentionEdges:
    """Apply LLM-TT's threshold per cell or per head-summed edge; keep causal edges only."""
    n = c_attn.shape[0]
    c_attn = c_attn * causal_mask(n, c_attn.device)[..., None]
    if mode == "cell":
        cells, resid = contrib.threshold_and_renormalize(c_attn, c_res, threshold, renormalize=renormalize)
        kept = cells.sum(-1) > 0
    elif mode == "edge":
        edges = c_attn.sum(-1)  # [n, n]
        diagonal = torch.arange(n, device=c_attn.device)
        # LLM-TT sums the residual into the u = t attention edge (one networkx edge) and cuts the sum
        kept = edges.index_put((diagonal, diagonal), c_res, accumulate=True) > threshold
        cells = c_attn * kept[..., None]
        resid = c_res * kept[diagonal, diagonal]
        if renormalize:
            total = (edges * kept).sum(-1) + resid
            safe = torch.where(total > 0, total, torch.ones_like(total))
            cells, resid = cells / safe[:, None, None], resid / safe
    else:
        raise ValueError(f"threshold mode must be 'cell' or 'edge', not {mode!r}")
    dst, src = kept.nonzero(as_tuple=True)
    return AttentionEdges(dst=dst, src=src, heads=cells[dst, src], resid=resid)


def threshold_mlp(c_mlp: torch.Tensor, c_res: torch.Tensor, threshold: float, *, renormalize: bool = False) -> MlpEdges:
    kept, resid = contrib.threshold_and_renormalize(c_mlp[:, None], c_res, threshold, renormalize=renormalize)
    return MlpEdges(mlp=kept[:, 0], resid=resid)


@dataclass
class Reach:
    """Reachable nodes per layer (bool [n] each) from one token's final state."""

    embed: torch.Tensor
    mid: list[torch.Tensor] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)
    post: list[torch.Tensor] = field(default_factory=list)


def reachable(attn: Sequence[AttentionEdges], mlp: Sequence[MlpEdges], n_tokens: int, from_token: int) -> Reach:
    """Backward sweep from resid.post[L-1]@from_token over kept edges (weight > 0)."""
    n_layers = len(attn)
    device = attn[0].resid.device if n_layers else torch.device("cpu")
    post = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    post[from_token] = True
    mids, mlps, posts = [None] * n_layers, [None] * n_layers, [None] * n_layers
    for layer in reversed(range(n_layers)):
        posts[layer] = post
        mlps[layer] = post & (mlp[layer].mlp > 0)
        mid = (post & (mlp[layer].resid > 0)) | mlps[layer]
        mids[layer] = mid
        edges = attn[layer]
        pre = mid & (edges.resid > 0)
        live = mid[edges.dst] & (edges.heads.sum(-1) > 0)
        pre = pre.index_put((edges.src[live],), torch.ones_like(edges.src[live], dtype=torch.bool))
        post = pre
    return Reach(embed=post, mid=mids, mlp=mlps, post=posts)


# --- running the model ----------------------------------------------------------------------------


class _LayerStore:
    """Per prompt of a batch: the kept edges of every layer (the sink of ContributionCapture)."""

    def __init__(self, n_prompts: int, n_layers: int, query: RoutesQuery) -> None:
        self.query = query
        self.attn: list[list[AttentionEdges | None]] = [[None] * n_layers for _ in range(n_prompts)]
        self.mlp: list[list[MlpEdges | None]] = [[None] * n_layers for _ in range(n_prompts)]

    def __call__(self, res: contrib.LayerContributions) -> None:
        q = self.query
        if res.attn is not None:
            kept = threshold_attention(res.attn, res.attn_resid, q.threshold, mode=q.threshold_mode, renormalize=q.renormalize)
            self.attn[res.prompt_index][res.layer] = kept
        if res.mlp is not None:
            self.mlp[res.prompt_index][res.layer] = threshold_mlp(res.mlp, res.mlp_resid, q.threshold, renormalize=q.renormalize)


def routes(
    loaded,
    query: RoutesQuery,
    prompts: Sequence[PromptRow],
    *,
    token_budget: int = 2048,
    tile_elements: int = contrib.DEFAULT_TILE_ELEMENTS,
    add_hooks: AddHooks | None = None,
) -> dict[str, pa.Table]:
    """LLM-TT's information-flow routes for every prompt of a bound query: {"route_nodes", "route_edges"}."""
    n_layers = loaded.config.n_layers
    nodes, edges = [], []
    for batch in batches(loaded, prompts, token_budget=token_budget):
        store = _LayerStore(len(batch), n_layers, query)
        capture = contrib.ContributionCapture(
            loaded.model, batch, range(n_layers), attention=True, mlp_blocks=True, neurons=False,
            norm=query.norm, queries=None, sink=store, tile_elements=tile_elements,
        )
        contrib.run_capture(loaded, batch, capture, add_hooks=add_hooks)
        for row, n in enumerate(batch.lengths.tolist()):
            start = _from_position(query.from_token, n, batch.prompt_id(row))
            reach = reachable(store.attn[row], store.mlp[row], n, start)
            tokens = [loaded.token_str(i) for i in batch.token_ids[row]]
            nodes.append(node_table(batch.prompt_id(row), reach, tokens))
            edges.append(edge_table(batch.prompt_id(row), store.attn[row], store.mlp[row], reach))
    return {
        "route_nodes": concat_tables(nodes, ROUTE_NODE_SCHEMA),
        "route_edges": concat_tables(edges, ROUTE_EDGE_SCHEMA),
    }


def _from_position(from_token: int | None, n: int, prompt_id: int) -> int:
    if from_token is None:
        return n - 1
    position = from_token + n if from_token < 0 else from_token
    if not 0 <= position < n:
        raise TdbqlError(f"routes from token {from_token} is outside prompt {prompt_id}, which has {n} tokens")
    return position


# --- Arrow output ---------------------------------------------------------------------------------


def node_table(prompt_id: int, reach: Reach, tokens: list[str]) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in ROUTE_NODE_SCHEMA.names}

    def add(layer: int, kind: str, mask: torch.Tensor) -> None:
        positions = mask.nonzero(as_tuple=True)[0].tolist()
        columns["prompt_id"] += [prompt_id] * len(positions)
        columns["layer"] += [layer] * len(positions)
        columns["kind"] += [kind] * len(positions)
        columns["position"] += positions
        columns["token"] += [tokens[p] for p in positions]

    add(0, "embed", reach.embed)
    for layer in range(len(reach.mid)):
        add(layer, "resid.mid", reach.mid[layer])
        add(layer, "mlp", reach.mlp[layer])
        add(layer, "resid.post", reach.post[layer])
    return pa.table(columns, schema=ROUTE_NODE_SCHEMA)


def edge_table(prompt_id: int, attn: Sequence[AttentionEdges], mlp: Sequence[MlpEdges], reach: Reach) -> pa.Table:
    parts = []
    for layer, (a, m) in enumerate(zip(attn, mlp)):
        into_mid = reach.mid[layer]
        live = into_mid[a.dst]
        dst, src, heads = a.dst[live], a.src[live], a.heads[live]  # [E'], [E'], [E', H]
        e, h = (heads > 0).nonzero(as_tuple=True)
        parts.append(_edges(prompt_id, layer, "attn", src[e], dst[e], h, heads[e, h]))
        for kind, weight, target in (
            ("attn_resid", a.resid, into_mid),
            ("mlp", m.mlp, reach.post[layer]),
            ("mlp_resid", m.resid, reach.post[layer]),
        ):
            pos = (target & (weight > 0)).nonzero(as_tuple=True)[0]
            parts.append(_edges(prompt_id, layer, kind, pos, pos, None, weight[pos]))
    return concat_tables(parts, ROUTE_EDGE_SCHEMA)


def _edges(prompt_id, layer, kind, src, dst, head, weight) -> pa.Table:
    n = len(weight)
    return pa.table(
        {
            "prompt_id": repeat(prompt_id, n, "prompt_id"),
            "layer": repeat(layer, n, "layer"),
            "kind": repeat(kind, n, "kind"),
            "src_position": ints(src),
            "dst_position": ints(dst),
            "head": ints(head, n),
            "weight": floats(weight),
        },
        schema=ROUTE_EDGE_SCHEMA,
    )
