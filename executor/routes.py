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

Thresholds (LLM-TT §1): `cell` (the default) cuts each (key, head) share <= threshold before
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

from . import contrib
from .arrow import concat_tables
from .runtime.batching import DEFAULT_TOKEN_BUDGET, batches, forward_no_grad
from .runtime.hooks import HookSet
from ..query.context import PromptRow
from ..query.plan import RoutesQuery
from ..query.errors import TdbqlError

EDGE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("layer", pa.int64()),
        ("kind", pa.string()),
        ("src_position", pa.int64()),
        ("dst_position", pa.int64()),
        ("head", pa.int64()),
        ("weight", pa.float64()),
    ]
)
NODE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("layer", pa.int64()),
        ("kind", pa.string()),
        ("position", pa.int64()),
        ("token", pa.string()),
    ]
)


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
    causal = torch.ones(n, n, dtype=torch.bool, device=c_attn.device).tril()
    c_attn = c_attn * causal[..., None]
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
        raise TdbqlError(f"threshold mode must be 'cell' or 'edge', not {mode!r}")
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
) -> dict[str, pa.Table]:
    """LLM-TT's information-flow routes for every prompt: {"route_nodes", "route_edges"}."""
    if not 0 <= query.threshold < 1:
        raise TdbqlError(f"routes threshold must be in [0, 1), not {query.threshold}")
    n_layers = loaded.info().n_layers
    nodes, edges = [], []
    for batch in batches(loaded, prompts, token_budget=token_budget):
        store = _LayerStore(len(batch), n_layers, query)
        capture = contrib.ContributionCapture(
            loaded.model, batch, range(n_layers), attention=True, mlp_blocks=True, neurons=False,
            norm=query.norm, queries=None, sink=store, tile_elements=tile_elements,
        )
        contrib.run_capture(loaded, batch, capture)
        for row, n in enumerate(batch.lengths.tolist()):
            start = _from_position(query.from_token, n, batch.prompt_id(row))
            reach = reachable(store.attn[row], store.mlp[row], n, start)
            tokens = [loaded.token_str(i) for i in batch.token_ids[row]]
            nodes.append(node_table(batch.prompt_id(row), reach, tokens))
            edges.append(edge_table(batch.prompt_id(row), store.attn[row], store.mlp[row], reach))
    return {
        "route_nodes": concat_tables(nodes, NODE_SCHEMA),
        "route_edges": concat_tables(edges, EDGE_SCHEMA),
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
    columns: dict[str, list] = {name: [] for name in NODE_SCHEMA.names}

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
    return pa.table(columns, schema=NODE_SCHEMA)


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
    return concat_tables(parts, EDGE_SCHEMA)


def _edges(prompt_id, layer, kind, src, dst, head, weight) -> pa.Table:
    n = len(weight)
    return pa.table(
        {
            "prompt_id": pa.array([prompt_id] * n, pa.int64()),
            "layer": pa.array([layer] * n, pa.int64()),
            "kind": pa.array([kind] * n, pa.string()),
            "src_position": pa.array(src.cpu().numpy().astype("int64")),
            "dst_position": pa.array(dst.cpu().numpy().astype("int64")),
            "head": pa.nulls(n, pa.int64()) if head is None else pa.array(head.cpu().numpy().astype("int64")),
            "weight": pa.array(weight.detach().cpu().double().numpy()),
        },
        schema=EDGE_SCHEMA,
    )




# --- per-head maps (LLM-TT's attention and contribution heatmaps) --------------------------------

MAP_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("layer", pa.int64()),
        ("head", pa.int64()),
        ("position", pa.int64()),
        ("attended", pa.int64()),
        ("token", pa.string()),
        ("attended_token", pa.string()),
        ("prob", pa.float64()),
        ("contribution", pa.float64()),
    ]
)


def attention_map(
    loaded,
    prompts: Sequence[PromptRow],
    layer: int,
    heads: Sequence[int] | None = None,
    *,
    norm: int = 1,
    tile_elements: int = contrib.DEFAULT_TILE_ELEMENTS,
) -> pa.Table:
    """Rows (prompt, layer, head, t, u <= t): the attention probability A_h[t,u] and the
    contribution share of that (key, head) to resid.mid[t]: both heatmaps of LLM-TT's head view."""
    info = loaded.info()
    if not 0 <= layer < info.n_layers:
        raise TdbqlError(f"layer {layer} does not exist; the model has layers 0..{info.n_layers - 1}")
    heads = list(range(info.n_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < info.n_heads]
    if bad:
        raise TdbqlError(f"head {bad[0]} does not exist; the model has heads 0..{info.n_heads - 1}")
    parts = []
    for batch in batches(loaded, prompts, token_budget=DEFAULT_TOKEN_BUDGET):
        probs: dict[int, torch.Tensor] = {}
        shares: dict[int, torch.Tensor] = {}

        def keep_probs(x: torch.Tensor) -> None:
            probs["all"] = x.detach()

        def sink(res: contrib.LayerContributions) -> None:
            shares[res.prompt_index] = res.attn

        capture = contrib.ContributionCapture(
            loaded.model, batch, [layer], attention=True, mlp_blocks=False, neurons=False,
            norm=norm, queries=None, sink=sink, tile_elements=tile_elements,
        )
        hooks = HookSet()
        hooks.add("attn.probs", layer, keep_probs)
        capture.install(hooks)
        forward_no_grad(loaded, batch, hooks)
        for row, n in enumerate(batch.lengths.tolist()):
            tokens = [loaded.token_str(i) for i in batch.token_ids[row]]
            p = probs["all"][row][heads][:, :n, :n].permute(1, 2, 0)  # [t, u, h]
            c = shares[row][..., heads]  # [t, u, h]
            parts.append(_map_rows(batch.prompt_id(row), layer, heads, p, c, tokens))
    return concat_tables(parts, MAP_SCHEMA)


def _map_rows(prompt_id: int, layer: int, heads: list[int], probs, shares, tokens: list[str]) -> pa.Table:
    n = probs.shape[0]
    t, u, h = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(len(heads)), indexing="ij")
    causal = u <= t
    t, u, h = t[causal], u[causal], h[causal]
    head_ids = torch.tensor(heads)[h]
    rows = len(t)
    return pa.table(
        {
            "prompt_id": pa.array([prompt_id] * rows, pa.int64()),
            "layer": pa.array([layer] * rows, pa.int64()),
            "head": pa.array(head_ids.numpy(), pa.int64()),
            "position": pa.array(t.numpy(), pa.int64()),
            "attended": pa.array(u.numpy(), pa.int64()),
            "token": pa.array([tokens[i] for i in t.tolist()], pa.string()),
            "attended_token": pa.array([tokens[i] for i in u.tolist()], pa.string()),
            "prob": pa.array(probs.cpu()[causal].double().numpy()),
            "contribution": pa.array(shares.cpu()[causal].double().numpy()),
        },
        schema=MAP_SCHEMA,
    )
