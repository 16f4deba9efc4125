"""Routes and model-level contributions against direct transcriptions and a networkx traversal.

The reference side captures a layer's tensors with hand-written hooks, materialises every
attention part (tokens x tokens x heads x d_model, tiny sizes), builds LLM-TT's graph in plain
Python with networkx and traverses it; tdbql's tiled, tensor-only version must agree.
"""

from __future__ import annotations

import itertools

import networkx as nx
import pytest
import torch
from tdbql.executor import contrib, routes
from tdbql.executor.runtime.hooks import HookSet
from tdbql.query.context import PromptRow
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import RoutesQuery

EPS = 1e-5
PROMPTS = [
    PromptRow(prompt_id=3, text="When Mary and John went to the store, John gave"),
    PromptRow(prompt_id=8, text="one two three four"),
]


# --- reference: capture, materialise, normalise ------------------------------------------------


def ref_shares(parts: torch.Tensor, whole: torch.Tensor, norm: int = 1) -> torch.Tensor:
    prox = (whole.norm(p=norm, dim=-1) - (parts - whole).norm(p=norm, dim=-1)).clamp(min=EPS)
    return prox / prox.sum(0, keepdim=True)


def capture_layers(loaded, text: str) -> list[dict[str, torch.Tensor]]:
    """Every layer's tensors for one prompt, by hand-written hooks (batch of one, no padding)."""
    ids = torch.tensor([loaded.encode(text)])
    saved = [dict() for _ in range(loaded.info().n_layers)]
    hooks = HookSet()
    for layer, loc in itertools.product(range(len(saved)), ("resid.pre", "attn.probs", "attn.v", "resid.mid", "mlp.out", "mlp.post", "resid.post")):
        hooks.add(loc, layer, lambda x, layer=layer, loc=loc: saved[layer].__setitem__(loc, x[0].detach().double()))
    with torch.no_grad():
        loaded.model(ids, hooks=hooks)
    return saved


def ref_layer(loaded, layer: int, s: dict[str, torch.Tensor], norm: int = 1):
    """(c_attn [t,u,h], c_attn_res [t], c_mlp [t], c_mlp_res [t], c_neuron [t,n], c_neuron_res [t])."""
    W_O = loaded.model.W_O(layer).detach().double()
    H = W_O.shape[0]
    v = s["attn.v"].repeat_interleave(H // s["attn.v"].shape[1], dim=1)
    decomposed = torch.einsum("htu,uhe,hed->tuhd", s["attn.probs"], v, W_O)  # the big tensor
    T = decomposed.shape[0]
    parts = torch.cat([decomposed.permute(1, 2, 0, 3).reshape(T * H, T, -1), s["resid.pre"][None]])
    shares = ref_shares(parts, s["resid.mid"], norm)
    c_attn = shares[:-1].reshape(T, H, T).permute(2, 0, 1)
    block = ref_shares(torch.stack([s["mlp.out"], s["resid.mid"]]), s["resid.post"], norm)
    W_out = loaded.model.W_out(layer).detach().double()
    neuron_parts = s["mlp.post"].T[..., None] * W_out[:, None, :]
    neurons = ref_shares(torch.cat([neuron_parts, s["resid.mid"][None]]), s["resid.post"], norm)
    return c_attn, shares[-1], block[0], block[1], neurons[:-1].T, neurons[-1]


# --- contributions(loaded, ...) --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_model_contributions_match_direct_transcription(tiny_model, arch):
    loaded = tiny_model(arch)
    table = contrib.contributions(
        loaded, PROMPTS, components=("attn", "head", "attn_resid", "mlp", "neuron_resid", "mlp_block", "mlp_resid"), tile_elements=64
    )
    rows = table.to_pylist()
    for prompt in PROMPTS:
        captured = capture_layers(loaded, prompt.text)
        for layer, s in enumerate(captured):
            c_attn, c_res, c_mlp, c_mlp_res, c_n, c_n_res = ref_layer(loaded, layer, s)
            got = [r for r in rows if r["prompt_id"] == prompt.prompt_id and r["layer"] == layer]
            _check_rows(got, "attn", lambda r: c_attn[r["position"], r["attended"], r["unit"]], n=len(c_res))
            _check_rows(got, "head", lambda r: c_attn[r["position"], : r["position"] + 1, r["unit"]].sum())
            _check_rows(got, "attn_resid", lambda r: c_res[r["position"]])
            _check_rows(got, "mlp_block", lambda r: c_mlp[r["position"]])
            _check_rows(got, "mlp", lambda r: c_n[r["position"], r["unit"]])
            _check_rows(got, "neuron_resid", lambda r: c_n_res[r["position"]])
            _check_rows(got, "mlp_resid", lambda r: c_mlp_res[r["position"]])


def _check_rows(rows, component, want, n=None):
    picked = [r for r in rows if r["component"] == component]
    assert picked, component
    for r in picked:
        assert r["contribution"] == pytest.approx(float(want(r)), abs=1e-5), (component, r)
    if n is not None:  # every causal (t, u <= t, h) cell is there exactly once
        keys = {(r["position"], r["attended"], r["unit"]) for r in picked}
        assert len(keys) == len(picked) and all(u <= t for t, u, _ in keys)


def test_position_filter_and_norm2(tiny_model):
    loaded = tiny_model("gpt2")
    last = contrib.contributions(loaded, PROMPTS[:1], components=("attn",), positions=lambda n: torch.tensor([n - 1]), norm=2)
    s = capture_layers(loaded, PROMPTS[0].text)
    for layer in range(2):
        c_attn = ref_layer(loaded, layer, s[layer], norm=2)[0]
        rows = [r for r in last.to_pylist() if r["layer"] == layer]
        T = c_attn.shape[0]
        assert {r["position"] for r in rows} == {T - 1}
        for r in rows:
            assert r["contribution"] == pytest.approx(float(c_attn[T - 1, r["attended"], r["unit"]]), abs=1e-5)


def test_unknown_component_is_a_user_error(tiny_model):
    with pytest.raises(TdbqlError, match="contribution"):
        contrib.contributions(tiny_model("gpt2"), PROMPTS, components=("sae",))


# --- routes against networkx --------------------------------------------------------------------


def reference_graph(loaded, text: str, query: RoutesQuery) -> tuple[nx.MultiDiGraph, str]:
    """LLM-TT's graph with kept edges only, built cell by cell in Python; returns (graph, target node)."""
    captured = capture_layers(loaded, text)
    g = nx.MultiDiGraph()
    tau = query.threshold
    for layer, s in enumerate(captured):
        c_attn, c_res, c_mlp, c_mlp_res, _, _ = ref_layer(loaded, layer, s, query.norm)
        T, _, H = c_attn.shape
        pre = (lambda u: f"X0_{u}") if layer == 0 else (lambda u, l=layer: f"I{l - 1}_{u}")
        for t in range(T):
            cells = {(u, h): float(c_attn[t, u, h]) for u in range(t + 1) for h in range(H)}
            res = float(c_res[t])
            if query.threshold_mode == "cell":
                cells = {k: c for k, c in cells.items() if c > tau}
                res = res if res > tau else 0.0
            else:  # one networkx edge per (u, t), the residual summed into u = t, as LLM-TT builds it
                kept_u = {u for u in range(t + 1) if sum(cells[(u, h)] for h in range(H)) + (res if u == t else 0) > tau}
                cells = {k: c for k, c in cells.items() if k[0] in kept_u}
                res = res if t in kept_u else 0.0
            if query.renormalize:
                total = sum(cells.values()) + res
                cells = {k: c / total for k, c in cells.items()}
                res = res / total if total else 0.0
            for (u, h), c in cells.items():
                g.add_edge(pre(u), f"A{layer}_{t}", key=("attn", h), layer=layer, kind="attn", src=u, dst=t, head=h, weight=c)
            if res > 0:
                g.add_edge(pre(t), f"A{layer}_{t}", key=("attn_resid", None), layer=layer, kind="attn_resid", src=t, dst=t, head=None, weight=res)
            m, mr = float(c_mlp[t]), float(c_mlp_res[t])
            m, mr = (m if m > tau else 0.0), (mr if mr > tau else 0.0)
            if query.renormalize and m + mr > 0:
                m, mr = m / (m + mr), mr / (m + mr)
            if m > 0:
                g.add_edge(f"A{layer}_{t}", f"M{layer}_{t}", key=("mlp_in", None), weight=m)
                g.add_edge(f"M{layer}_{t}", f"I{layer}_{t}", key=("mlp", None), layer=layer, kind="mlp", src=t, dst=t, head=None, weight=m)
            if mr > 0:
                g.add_edge(f"A{layer}_{t}", f"I{layer}_{t}", key=("mlp_resid", None), layer=layer, kind="mlp_resid", src=t, dst=t, head=None, weight=mr)
    n_layers, T = len(captured), captured[0]["resid.pre"].shape[0]
    start = T - 1 if query.from_token is None else query.from_token % T
    return g, f"I{n_layers - 1}_{start}"


NODE_NAMES = {"embed": "X0_{p}", "resid.mid": "A{l}_{p}", "mlp": "M{l}_{p}", "resid.post": "I{l}_{p}"}


@pytest.mark.parametrize(
    "mode,renormalize,threshold,from_token",
    [("edge", False, 0.04, None), ("edge", True, 0.04, None), ("cell", True, 0.04, None),
     ("cell", False, 0.02, -3), ("edge", False, 0.08, 2), ("cell", True, 0.0, None)],
)
def test_routes_match_networkx_on_the_direct_transcription(tiny_model, mode, renormalize, threshold, from_token):
    loaded = tiny_model("gpt2")
    query = RoutesQuery(threshold=threshold, renormalize=renormalize, threshold_mode=mode, from_token=from_token)
    out = routes.routes(loaded, query, PROMPTS, tile_elements=100)
    for prompt in PROMPTS:
        g, target = reference_graph(loaded, prompt.text, query)
        want_nodes = nx.ancestors(g, target) | {target} if target in g else {target}
        got_nodes = {
            NODE_NAMES[r["kind"]].format(l=r["layer"], p=r["position"])
            for r in out["route_nodes"].to_pylist() if r["prompt_id"] == prompt.prompt_id
        }
        assert got_nodes == want_nodes
        want_edges = {
            (d["layer"], d["kind"], d["src"], d["dst"], d["head"]): d["weight"]
            for _, v, d in g.edges(data=True) if v in want_nodes and "kind" in d
        }
        got_edges = {
            (r["layer"], r["kind"], r["src_position"], r["dst_position"], r["head"]): r["weight"]
            for r in out["route_edges"].to_pylist() if r["prompt_id"] == prompt.prompt_id
        }
        assert len(want_edges) > 3 and len(want_nodes) > 4  # a real route, not just the target
        assert got_edges.keys() == want_edges.keys()
        for key, weight in want_edges.items():
            assert got_edges[key] == pytest.approx(weight, abs=1e-5), key


def test_routes_are_the_same_batched_or_alone(tiny_model):
    loaded = tiny_model("llama")
    together = routes.routes(loaded, RoutesQuery(threshold=0.03), PROMPTS)
    alone = [routes.routes(loaded, RoutesQuery(threshold=0.03), [p]) for p in PROMPTS]
    for name in ("route_nodes", "route_edges"):
        joined = [r for part in alone for r in part[name].to_pylist()]
        rows = together[name].to_pylist()
        assert len(rows) == len(joined)
        for a, b in zip(rows, joined):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == (pytest.approx(b[k], abs=1e-6) if k == "weight" else b[k])


def test_route_tables_have_the_design_columns(tiny_model):
    out = routes.routes(tiny_model("gpt2"), RoutesQuery(), PROMPTS[:1])
    assert out["route_edges"].column_names == ["prompt_id", "layer", "kind", "src_position", "dst_position", "head", "weight"]
    assert out["route_nodes"].column_names == ["prompt_id", "layer", "kind", "position", "token"]
    kinds = set(out["route_nodes"].column("kind").to_pylist())
    assert "resid.post" in kinds and out["route_edges"].num_rows > 0


def test_from_token_outside_the_prompt_is_a_user_error(tiny_model):
    with pytest.raises(TdbqlError, match="outside prompt 8"):
        routes.routes(tiny_model("gpt2"), RoutesQuery(from_token=40), PROMPTS[1:])


# --- the tensor sweep against networkx on random graphs ------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_reachable_matches_networkx_on_random_graphs(seed):
    g = torch.Generator().manual_seed(seed)
    n, n_layers, H = 6, 3, 2
    mode = "cell" if seed % 2 else "edge"
    attn, mlp = [], []
    for _ in range(n_layers):
        raw = torch.rand(n, n, H, generator=g) ** 4 * torch.ones(n, n).tril()[..., None]
        res = torch.rand(n, generator=g) ** 3  # often cut, so the residual edges matter
        total = raw.sum((1, 2)) + res
        attn.append(routes.threshold_attention(raw / total[:, None, None], res / total, 0.1, mode=mode))
        m = torch.rand(n, generator=g)
        mlp.append(routes.threshold_mlp(m, 1 - m, 0.3))
    start = int(torch.randint(n, (1,), generator=g))
    reach = routes.reachable(attn, mlp, n, start)

    G = nx.DiGraph()
    for l in range(n_layers):
        pre = (lambda u: ("X", u)) if l == 0 else (lambda u, l=l: ("I", l - 1, u))
        for t, u in zip(attn[l].dst.tolist(), attn[l].src.tolist()):
            G.add_edge(pre(u), ("A", l, t))
        for t in range(n):
            if attn[l].resid[t] > 0:
                G.add_edge(pre(t), ("A", l, t))
            if mlp[l].mlp[t] > 0:
                G.add_edge(("A", l, t), ("M", l, t))
                G.add_edge(("M", l, t), ("I", l, t))
            if mlp[l].resid[t] > 0:
                G.add_edge(("A", l, t), ("I", l, t))
    target = ("I", n_layers - 1, start)
    want = (nx.ancestors(G, target) if target in G else set()) | {target}
    got = {("X", p) for p in reach.embed.nonzero().flatten().tolist()}
    for l in range(n_layers):
        got |= {("A", l, p) for p in reach.mid[l].nonzero().flatten().tolist()}
        got |= {("M", l, p) for p in reach.mlp[l].nonzero().flatten().tolist()}
        got |= {("I", l, p) for p in reach.post[l].nonzero().flatten().tolist()}
    assert got == want


# --- per-head maps ------------------------------------------------------------------------------------


def test_contributions_see_the_hooks_the_engine_adds(tiny_model):
    """Head 1 of layer 0 ablated (probabilities zero at every query): its parts are zero, so each of
    its cells keeps exactly the EPS floor, EPS / denominator."""
    loaded = tiny_model("gpt2")

    def ablate_head(hooks: HookSet, batch) -> None:
        def zero_head(probs):
            probs = probs.clone()
            probs[:, 1] = 0
            return probs

        hooks.add("attn.probs", 0, zero_head)

    rows = contrib.contributions(loaded, PROMPTS[:1], components=("attn", "attn_resid"), layers=[0], add_hooks=ablate_head).to_pylist()
    for t in {r["position"] for r in rows}:
        res = next(r["contribution"] for r in rows if r["component"] == "attn_resid" and r["position"] == t)
        head1 = [r["contribution"] for r in rows if r["component"] == "attn" and r["position"] == t and r["unit"] == 1]
        others = [r["contribution"] for r in rows if r["component"] == "attn" and r["position"] == t and r["unit"] != 1]
        assert len(head1) == t + 1 and max(head1) == pytest.approx(min(head1), rel=1e-6)
        assert head1[0] <= min(others + [res]) * (1 + 1e-6)  # the floor is the smallest share
        assert max(others + [res]) > 1000 * head1[0]


def test_edge_mode_cuts_the_residual_and_the_self_edge_together_as_llmtt_does():
    # query 1: key 0 takes 0.95; the self edge (0.03 over two heads) and the residual (0.02) are each
    # under the threshold, but LLM-TT's graph holds them as one edge of 0.05, which is kept
    c_attn = torch.tensor([[[0.5, 0.4], [0.0, 0.0]], [[0.5, 0.45], [0.01, 0.02]]])  # [query, key, head]
    c_res = torch.tensor([0.1, 0.02])
    kept = routes.threshold_attention(c_attn, c_res, 0.04, mode="edge", renormalize=False)
    assert sorted(zip(kept.dst.tolist(), kept.src.tolist())) == [(0, 0), (1, 0), (1, 1)]
    assert kept.resid.tolist() == pytest.approx([0.1, 0.02])
    cut = routes.threshold_attention(c_attn, c_res, 0.06, mode="edge", renormalize=False)
    assert (1, 1) not in set(zip(cut.dst.tolist(), cut.src.tolist())) and cut.resid[1] == 0
    per_cell = routes.threshold_attention(c_attn, c_res, 0.04)  # the default: per cell, renormalized
    assert per_cell.resid[1] == 0 and per_cell.heads.sum() + per_cell.resid.sum() == pytest.approx(2.0)
