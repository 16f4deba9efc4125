"""`.plot` picks the picture by the table's kind: checked on the matplotlib Figure (kind, axes,
labels, the numbers in the cells) for real query tables of the tiny random GPT-2."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from tdbql.query.errors import TdbqlError
from tdbql.shell.plot import choose_kind, draw, plot_table
from tdbql.shell.plot_kinds import color_scale
from tdbql.shell.session import Session

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
OTHER = "When John and Mary went to the park, Mary gave a ball to"


@pytest.fixture(scope="module")
def session(tiny_model_dir):
    session = Session(model=str(tiny_model_dir))
    session.execute(f'prompt "{CLEAN}" corrupt "{CORRUPT}", "{OTHER}" corrupt "{CLEAN}"\ntarget " Mary" vs " John"')
    yield session
    session.close()


def table(session: Session, text: str, name: str) -> pa.Table:
    session.execute(text)
    return session.con.sql(f'SELECT * FROM "{name}"').to_arrow_table()


def input_tokens(session: Session) -> dict[tuple[int, int], str]:
    return {(p, t): tok for p, t, tok in session.con.sql("SELECT prompt_id, position, token FROM tokens").fetchall()}


def labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


def short(token: str) -> str:
    """A token as the axes write it: stripped (quoted when blank), at most 8 characters."""
    text = token.strip() or repr(token)
    return text if len(text) <= 8 else text[:7] + "…"


def cell_values(ax) -> np.ndarray:
    return np.ma.filled(ax.images[0].get_array().astype(float), np.nan)


def test_a_logit_lens_is_a_layer_by_position_grid_of_top_tokens(session):
    lens = table(session, "logit_lens topk 3 as lens", "lens")
    assert choose_kind(lens) == "lens"
    picture = draw(lens, title="lens", input_tokens=input_tokens(session))
    [ax, _colorbar] = picture.figure.axes
    assert (picture.kind, ax.get_xlabel(), ax.get_ylabel()) == ("lens", "position (input token)", "layer")
    tokens = session.con.sql("SELECT position, token FROM tokens WHERE prompt_id = 0 ORDER BY position").fetchall()
    assert labels(ax.get_xticklabels()) == [f"{p}: {short(t)}" for p, t in tokens]
    assert labels(ax.get_yticklabels()) == ["0", "1", "2", "3"]
    top = session.con.sql("SELECT layer, position, token, prob FROM lens WHERE prompt_id = 0 AND rank = 1 "
                          "ORDER BY layer, position").fetchall()
    assert sorted(t.get_text() for t in ax.texts) == sorted(short(tok) for _, _, tok, _ in top)
    grid = cell_values(ax)
    for layer, position, _, prob in top:
        assert grid[layer, position] == pytest.approx(prob)
    assert "1 of 2 prompts" in picture.note and "prompt 0" in ax.get_title()


def test_a_table_of_heads_is_a_layer_by_head_grid(session):
    heads = table(session, "topk 6 direct_effect of head where token = -1 by prompt as heads", "heads")
    assert choose_kind(heads) == "heads"
    picture = draw(heads, title="heads")
    ax = picture.figure.axes[0]
    assert (picture.kind, ax.get_xlabel(), ax.get_ylabel()) == ("heads", "head", "layer")
    assert labels(ax.get_xticklabels()) == ["0", "1", "2", "3"]
    grid = cell_values(ax)
    rows = session.con.sql("SELECT layer, unit, direct_effect FROM heads WHERE prompt_id = 0").fetchall()
    layers = sorted({layer for layer, _, _ in rows})
    assert np.isfinite(grid).sum() == len(rows)
    for layer, unit, value in rows:
        assert grid[layers.index(layer), unit] == pytest.approx(value)


def test_attention_draws_one_panel_per_head_and_names_layer_head_and_prompt(session):
    pattern = table(session, "select act of attn where layer = 1 as pattern", "pattern")
    assert choose_kind(pattern) == "attention"
    picture = draw(pattern, title="pattern")
    panels = [ax for ax in picture.figure.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"layer 1 head {h}, prompt 0" for h in range(4)]
    assert all((ax.get_xlabel(), ax.get_ylabel()) == ("key position", "query position") for ax in panels)
    assert "1 of 2 prompts" in picture.note and "4 heads" in picture.note
    assert "prompt 0 (1 of 2 prompts" in picture.figure.get_suptitle()
    n = len(session.loaded.encode(CLEAN))
    assert panels[0].images[0].get_array().shape == (n, n)


def test_attention_at_one_query_is_heads_by_keys(session):
    last = table(session, "select act of attn where token = -1 as last_attention", "last_attention")
    picture = draw(last, title="last")
    ax = picture.figure.axes[0]
    assert picture.kind == "attention" and (ax.get_xlabel(), ax.get_ylabel()) == ("key position", "head")
    assert labels(ax.get_yticklabels()) == [f"L{layer}H{head}" for layer in range(4) for head in range(4)]
    assert np.nansum(cell_values(ax), axis=1) == pytest.approx(np.ones(16), abs=1e-4)


def test_a_mixed_node_table_is_bars_with_compact_node_labels(session):
    mixed = table(session, "topk 10 act_times_grad as mixed", "mixed")
    assert choose_kind(mixed) == "bars"
    picture = draw(mixed, title="mixed")
    ax = picture.figure.axes[0]
    assert ax.get_xlabel() == "act_times_grad"
    expected = []
    for component, layer, unit, position, attended in session.con.sql(
            "SELECT component, layer, unit, position, attended FROM mixed ORDER BY rank").fetchall():
        arrow = f"→{attended}" if attended is not None else ""
        expected.append(f"{component}[{layer},{unit}]@{position}{arrow}")
    assert labels(ax.get_yticklabels()) == expected
    assert [p.get_width() for p in ax.patches] == pytest.approx(
        [v for (v,) in session.con.sql("SELECT act_times_grad FROM mixed ORDER BY rank").fetchall()])


def test_a_patching_table_is_a_layer_by_position_heatmap_of_recovered(session):
    patched = table(session, "patching of resid.pre from clean by position as rp", "rp")
    assert choose_kind(patched) == "patching"
    picture = draw(patched, title="rp", input_tokens=input_tokens(session))
    ax = picture.figure.axes[0]
    assert (picture.kind, ax.get_xlabel(), ax.get_ylabel()) == ("patching", "position (input token)", "layer")
    assert "recovered" in ax.get_title() and picture.figure.axes[1].get_ylabel() == "recovered"
    grid = cell_values(ax)
    for layer, position, recovered in session.con.sql(
            "SELECT layer, position, recovered FROM rp WHERE prompt_id = 0").fetchall():
        assert grid[layer, position] == pytest.approx(recovered)
    heads = table(session, "patching of head from clean as hp", "hp")
    assert choose_kind(heads) == "heads"
    assert "colour recovered" in draw(heads).note


def test_route_edges_are_the_route_graph_or_asked_for_bars_of_weight(session):
    edges = table(session, "routes", "route_edges")
    assert choose_kind(edges) == "graph"
    assert draw(edges, title="route_edges", input_tokens=input_tokens(session)).kind == "graph"
    picture = draw(edges, kind="routes", title="route_edges", input_tokens=input_tokens(session))
    ax = picture.figure.axes[0]
    assert picture.kind == "routes" and ax.get_xlabel() == "weight"
    widths = [p.get_width() for p in ax.patches]
    assert widths == sorted(widths, reverse=True)
    top = session.con.sql("SELECT max(weight) FROM route_edges WHERE prompt_id = 0").fetchall()[0][0]
    assert widths[0] == pytest.approx(top)
    assert all("→" in label and label.startswith("L") for label in labels(ax.get_yticklabels()))


def test_logits_are_bars_of_tokens(session):
    logits = table(session, "logits topk 3 where token = -1 as lg", "lg")
    assert choose_kind(logits) == "bars"
    ax = draw(logits).figure.axes[0]
    assert ax.get_xlabel() == "prob" and all(label.endswith("@13") for label in labels(ax.get_yticklabels()))


@pytest.mark.parametrize("values, diverging", [([-1.0, 2.0], True), ([-0.001, 1.0], False), ([0.1, 1.0], False),
                                               ([-3.0, -1.0], False)])
def test_diverging_colours_only_when_values_take_both_signs(values, diverging):
    cmap, norm = color_scale(np.array(values))
    assert isinstance(norm, TwoSlopeNorm) is diverging
    if diverging:
        assert (cmap, norm.vcenter, norm.vmin, norm.vmax) == ("RdBu_r", 0.0, -2.0, 2.0)
    else:
        strongest = colormaps["viridis"](1.0)  # the largest size gets viridis' bright end
        assert colormaps[cmap](norm(max(values, key=abs))) == pytest.approx(strongest)


def test_bad_requests_are_errors(tmp_path):
    with pytest.raises(TdbqlError, match="empty"):
        draw(pa.table({"x": pa.array([], pa.float64())}))
    with pytest.raises(TdbqlError, match="unknown plot kind 'pie'"):
        draw(pa.table({"x": [1.0]}), kind="pie")
    with pytest.raises(TdbqlError, match="no numeric value"):
        draw(pa.table({"x": ["a"]}))
    with pytest.raises(TdbqlError, match="cannot write"):
        plot_table(pa.table({"x": [1.0]}), tmp_path / "no" / "dir.png")
    path = tmp_path / "ok.png"
    assert plot_table(pa.table({"x": [1.0, -2.0]}), path) == "bars: 2 rows"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
