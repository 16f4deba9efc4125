"""`.html` pages for the embedded model's IOI prompt: what the page builders put on the page
(pure, no browser), the meta-command and `--html`, and the live pages in headless Chromium
(skipped, saying so, where no Chromium is installed). Each live test writes a screenshot to its
tmp dir; TDBQL_DOCS_SCREENSHOTS=1 also rewrites docs/routes-graph.png."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tdbql.query.errors import TdbqlError
from tdbql.shell.display import rows_of
from tdbql.shell.meta import ShellState, run_script
from tdbql.shell.pages import choose_page, graph, route_graph_of, write_html
from tdbql.shell.pages.page import PLOTLY_MISSING
from tdbql.shell.pages.sources import read_table
from tdbql.shell.plot import draw
from tdbql.shell.session import Session

IOI = "When Mary and John went to the store, John gave a drink to"
SETUP = f"""prompt "{IOI}"
target " Mary" vs " John"
routes threshold 0.04
logit_lens topk 3 as lens
select act of attn where layer = 1 as pattern
topk 8 direct_effect of head where token = -1 as heads
"""


@pytest.fixture(scope="module")
def model_name(tiny_model_dir) -> str:
    from tdbql.executor.runtime.loading import DEFAULT_MODEL_DIR

    return "default" if (DEFAULT_MODEL_DIR / "config.json").exists() else str(tiny_model_dir)


@pytest.fixture(scope="module")
def session(model_name):
    session = Session(model=model_name)
    session.execute(SETUP)
    yield session
    session.close()


def sql(session: Session, text: str) -> list[tuple]:
    return session.con.sql(text).fetchall()


def test_each_table_gets_its_page(session):
    kinds = {name: choose_page(read_table(session, name))
             for name in ("route_edges", "route_nodes", "pattern", "heads", "lens", "tokens")}
    assert kinds == {"route_edges": "graph", "route_nodes": "graph", "pattern": "attention", "heads": "ranked",
                     "lens": "ranked", "tokens": "ranked"}


def test_the_graph_has_a_node_per_route_node_and_a_line_per_route_edge(session):
    drawn = route_graph_of(session, "route_edges", read_table(session, "route_edges"))
    assert {(n.layer, n.kind, n.position) for n in drawn.nodes} == set(
        sql(session, "SELECT layer, kind, position FROM route_nodes"))
    assert sorted((e.layer, e.kind, e.head, e.src, e.dst) for e in drawn.edges) == sorted(
        sql(session, "SELECT layer, kind, head, src_position, dst_position FROM route_edges"))
    assert drawn.threshold == 0.04 and min(e.weight for e in drawn.edges) > 0.04
    at = {(n.layer, n.kind, n.position): (n.x, n.y) for n in drawn.nodes}
    for edge, row in zip(drawn.edges, sorted(rows_of(read_table(session, "route_edges")), key=lambda r: -r["weight"])):
        first, *_, last = graph.endpoints(row)
        assert (edge.xs[0], edge.ys[0]) == pytest.approx(at[first]) and (edge.xs[-1], edge.ys[-1]) == pytest.approx(
            at[last])
    tokens = dict(sql(session, "SELECT position, token FROM tokens"))
    assert all(n.token == tokens[n.position] for n in drawn.nodes)


def test_a_node_shows_what_the_lens_says_it_promotes(session):
    drawn = route_graph_of(session, "route_edges", read_table(session, "route_edges"))
    top = dict(((layer, position), tokens) for layer, position, tokens in sql(
        session, "SELECT layer, position, list(token ORDER BY rank) FROM lens WHERE prompt_id = 0 GROUP BY ALL"))
    outs = [n for n in drawn.nodes if n.kind == "resid.post"]
    assert outs and all(n.top == tuple(top[(n.layer, n.position)]) for n in outs)
    assert all(n.top == () for n in drawn.nodes if n.kind == "mlp")
    assert "promotes" in graph.node_text(outs[0])


def test_a_head_edge_carries_the_heads_attention_row(session):
    drawn = route_graph_of(session, "route_edges", read_table(session, "route_edges"))
    heads = {(e.layer, e.head, e.dst) for e in drawn.edges if e.kind == "attn"}
    assert set(drawn.attention) == {f"{layer},{head},{query}" for layer, head, query in heads}
    layer, head, query = max(heads)
    row = drawn.attention[f"{layer},{head},{query}"]
    session.execute(f"select act of attn where layer = {layer} and head = {head} and token = {query} as one_row")
    assert row == pytest.approx([a for (a,) in sql(session, "SELECT act FROM one_row ORDER BY attended")], abs=1e-6)
    assert sum(row) == pytest.approx(1.0, abs=1e-5)


def test_the_attention_page_has_a_heatmap_per_head(session, tmp_path):
    from tdbql.shell.pages import attention

    data = attention.page_data(read_table(session, "pattern"), {})
    info = session.loaded.info()
    n = len(session.loaded.encode(IOI))
    assert [h["label"] for h in data["heads"]] == [f"layer 1 head {h}" for h in range(info.n_heads)]
    for head in data["heads"]:
        assert (head["y"], head["x"]) == (list(range(n)), list(range(n)))
        assert all(sum(v for v in row if v is not None) == pytest.approx(1.0, abs=1e-5) for row in head["z"])
        assert all(row[k] is None for q, row in enumerate(head["z"]) for k in range(q + 1, n))  # causal


SWAPPED = "When Tom and Anna went to the park, Anna gave a ball to"


@pytest.fixture(scope="module")
def two_prompts(model_name):
    session = Session(model=model_name)
    session.execute(f"create table two_prompts as select * from (values ('{IOI}'), ('{SWAPPED}')) t(prompt);\n"
                    'prompts from (select prompt from two_prompts)\ntarget " Mary" vs " John"\n'
                    "routes threshold 0.04 as two")
    yield session
    session.close()


def test_a_page_holds_each_prompts_graph(two_prompts, tmp_path):
    from tdbql.shell.pages import graph_page

    text, note = graph_page(two_prompts, "two_edges", read_table(two_prompts, "two_edges"))
    assert note.startswith("2 prompts (pick one); threshold 0.04; prompt 0 first:")
    assert '<select id="prompt">' in text
    for prompt_id in (0, 1):
        drawn = route_graph_of(two_prompts, "two_edges", read_table(two_prompts, "two_edges"), prompt_id)
        assert drawn.prompt_id == prompt_id
        assert sorted((e.layer, e.kind, e.head, e.src, e.dst) for e in drawn.edges) == sorted(sql(
            two_prompts, f"SELECT layer, kind, head, src_position, dst_position FROM two_edges WHERE prompt_id = {prompt_id}"))
        tokens = dict(sql(two_prompts, f"SELECT position, token FROM tokens WHERE prompt_id = {prompt_id}"))
        assert all(n.token == tokens[n.position] for n in drawn.nodes)


def test_pages_are_self_contained(session, tmp_path):
    for name in ("route_edges", "pattern", "heads"):
        text = (tmp_path / f"{name}.html").read_text() if write_html(session, name, tmp_path / f"{name}.html") \
            else ""
        assert "<script src" not in text and "<link" not in text and "</script>" in text
    assert "Plotly" in (tmp_path / "route_edges.html").read_text()
    assert "Plotly" not in (tmp_path / "heads.html").read_text()  # a table needs no plotting library


def test_the_meta_command_writes_the_page_and_says_what(session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = ShellState(session=session)
    shown = list(run_script(state, ".html route_edges\n.html pattern page.html\n.html heads\n.html last.htm\n.html"))
    statuses = shown
    assert statuses[0].startswith("wrote route_edges.html (graph: prompt 0; threshold 0.04;")
    assert statuses[1].startswith("wrote page.html (attention:")
    assert statuses[2] == "wrote heads.html (ranked: 8 rows)"
    assert statuses[3].startswith("wrote last.htm (") and statuses[4].startswith("wrote last.html (")  # `_`
    assert all((tmp_path / f).stat().st_size > 0 for f in ("route_edges.html", "page.html", "last.htm", "last.html"))


def test_the_repl_opens_a_page_without_a_file_in_the_browser(session, tmp_path, monkeypatch):
    import webbrowser

    monkeypatch.chdir(tmp_path)
    opened = []

    class Browser(webbrowser.BackgroundBrowser):
        def open(self, url, new=0, autoraise=True):
            opened.append(url)
            return True

    monkeypatch.setattr(webbrowser, "get", lambda: Browser("x"))
    state = ShellState(session=session, open_pages=True)
    [with_browser, with_file] = [s for s in run_script(state, ".html heads\n.html heads h.html")]
    assert with_browser.endswith("; opened in the browser") and opened == [(tmp_path / "heads.html").as_uri()]
    assert not with_file.endswith("browser") and len(opened) == 1
    monkeypatch.setattr(webbrowser, "get", lambda: webbrowser.GenericBrowser("lynx"))  # a console browser
    [without] = [s for s in run_script(state, ".html heads")]
    assert without == "wrote heads.html (ranked: 8 rows)" and len(opened) == 1


@pytest.mark.parametrize(("script", "message"), [
    (".html nowhere", "no table 'nowhere' to draw"),
    (".html a b c", "too many arguments; usage: .html [TABLE] [FILE.html]"),
    (".html heads /no/such/folder/p.html", "cannot write '/no/such/folder/p.html': No such file or directory"),
    ("create table empty_t as select 1 as x where false;\n.html empty_t", "nothing to draw: table 'empty_t' is empty"),
])
def test_bad_input_is_refused_clearly(session, script, message):
    with pytest.raises(TdbqlError) as err:
        list(run_script(ShellState(session=session), script))
    assert err.value.message == message


def test_safe_mode_refuses_html(model_name):
    session = Session(model=model_name, safe=True)
    with pytest.raises(TdbqlError, match=r"\.html is disabled in --safe mode"):
        list(run_script(ShellState(session=session), ".html"))
    session.close()


def test_without_plotly_the_error_says_how_to_install_it(session, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly.offline", None)
    with pytest.raises(TdbqlError) as err:
        write_html(session, "route_edges", tmp_path / "g.html")
    assert err.value.message == PLOTLY_MISSING and "pip install -e '.[html]'" in PLOTLY_MISSING
    assert write_html(session, "heads", tmp_path / "t.html") == "ranked: 8 rows"  # tables need no plotly


def test_plot_kind_graph_draws_the_same_graph(session):
    edges = read_table(session, "route_edges")
    tokens = {(p, t): tok for p, t, tok in sql(session, "SELECT prompt_id, position, token FROM tokens")}
    picture = draw(edges, kind="graph", title="route_edges", input_tokens=tokens)
    [ax] = picture.figure.axes
    assert len(ax.lines) == edges.num_rows
    assert len(ax.collections[0].get_offsets()) == sql(session, "SELECT count(*) FROM route_nodes")[0][0]
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == ["embed", "L0 after attn", "L0 out"]
    with pytest.raises(TdbqlError, match="routes edges table"):
        draw(read_table(session, "heads"), kind="graph")


def test_the_cli_writes_the_last_result_with_html(model_name, tdbql_bin, cli_env, tmp_path):
    program = f'prompt "{IOI}"\nroutes threshold 0.04'
    proc = subprocess.run([tdbql_bin, "--model", model_name, "-c", program, "--html", "g.html"], cwd=tmp_path,
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote g.html (graph: prompt 0; threshold 0.04;" in proc.stdout
    assert "Plotly.newPlot" in (tmp_path / "g.html").read_text()
    safe = subprocess.run([tdbql_bin, "--safe", "--model", model_name, "-c", program, "--html", "s.html"],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    assert safe.returncode == 1 and "disabled in --safe mode" in safe.stderr and not (tmp_path / "s.html").exists()


# --- the live pages, in headless Chromium ------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def browser():
    executable = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if executable is None:
        pytest.skip(f"no Chromium to test the pages in (none of {', '.join(CHROMIUM_NAMES)} on PATH; .ci/run "
                    "installs Debian's chromium with apt-get where it can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser, session, tmp_path):
    """Write table `name`'s page, open it, and check afterwards that the console had no errors and
    that the page asked for nothing but its own file."""
    pages, errors, requests = [], [], []

    def opened(name: str):
        path = tmp_path / f"{name}.html"
        write_html(session, name, path)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: None if request.url.startswith("file:") else requests.append(request.url))
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready=yes]", timeout=15000)
        pages.append(page)
        return page

    yield opened
    for page in pages:
        page.close()
    assert errors == [] and requests == []


def data_point(page, plot: str, x: float, y: float) -> tuple[float, float]:
    """Where plot coordinates (x, y) are on the screen."""
    return tuple(page.evaluate("""([id, x, y]) => {
        const gd = document.getElementById(id), size = gd._fullLayout._size;
        const box = gd.getBoundingClientRect();
        return [box.left + size.l + gd._fullLayout.xaxis.d2p(x), box.top + size.t + gd._fullLayout.yaxis.d2p(y)];
    }""", [plot, x, y]))


def hover_lines(page, plot: str, x: float, y: float) -> list[str]:
    """Move the mouse onto plot coordinates (x, y) and read the hover label's lines."""
    page.mouse.move(*data_point(page, plot, x, y))
    label = page.wait_for_selector(f"#{plot} .hoverlayer .hovertext", timeout=5000)
    return label.evaluate("""(label) => { const lines = [...label.querySelectorAll("tspan.line")];
        return lines.length ? lines.map((line) => line.textContent) : [label.textContent]; }""")


def drawn_edges(page) -> int:
    return page.locator("#graph .scatterlayer path.js-line").count()


def test_the_route_graph_page_live(session, open_page, tmp_path):
    page = open_page("route_edges")
    [(n_nodes,)] = sql(session, "SELECT count(*) FROM route_nodes")
    weights = [w for (w,) in sql(session, "SELECT weight FROM route_edges ORDER BY weight")]
    assert page.locator("#graph path.point").count() == n_nodes
    assert drawn_edges(page) == sum(w > 0.04 for w in weights) == len(weights)
    assert "threshold 0.04" in page.inner_text("#note")
    page.screenshot(path=tmp_path / "route_graph.png", full_page=True)
    if os.environ.get("TDBQL_DOCS_SCREENSHOTS"):  # docs/routes-graph.png, the picture in docs/routes.md
        page.screenshot(path=DOCS / "routes-graph.png", full_page=True)

    middle = weights[len(weights) // 2]
    page.evaluate("""(value) => { const slider = document.getElementById("threshold");
        slider.value = value; slider.dispatchEvent(new Event("input")); }""", middle)
    kept = sum(w >= middle for w in weights)
    assert drawn_edges(page) == kept < len(weights)
    assert page.inner_text("#edge-count") == f"{kept} of {len(weights)} edges"
    page.screenshot(path=tmp_path / "route_graph_cut.png", full_page=True)

    assert hover_lines(page, "graph", 1.0, 0.0)[:2] == ["embed at position 1", "token ' Mary'"]


def test_the_prompt_picker_draws_each_prompts_graph(two_prompts, browser, tmp_path):
    path = tmp_path / "two.html"
    write_html(two_prompts, "two_edges", path)
    page, errors = browser.new_page(viewport={"width": 1280, "height": 900}), []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready=yes]", timeout=15000)
    counts = dict(sql(two_prompts, "SELECT prompt_id, count(*) FROM two_edges GROUP BY ALL"))
    assert drawn_edges(page) == counts[0]
    page.select_option("#prompt", "1")
    page.wait_for_selector("body[data-ready=yes]", timeout=15000)
    assert drawn_edges(page) == counts[1] and page.inner_text("#edge-count") == f"{counts[1]} of {counts[1]} edges"
    hovered = " ".join(hover_lines(page, "graph", 1.0, 0.0))  # the node at position 1 or an edge leaving it
    assert "' Tom'" in hovered and "' Mary'" not in hovered
    page.screenshot(path=tmp_path / "second_prompt.png", full_page=True)
    page.close()
    assert errors == []


def test_a_click_on_a_head_edge_shows_its_attention_row(session, open_page, tmp_path):
    page = open_page("route_edges")
    drawn = route_graph_of(session, "route_edges", read_table(session, "route_edges"))
    edge = max((e for e in drawn.edges if e.kind == "attn"), key=lambda e: e.weight)
    middle = len(edge.xs) // 2
    page.mouse.click(*data_point(page, "graph", edge.xs[middle], edge.ys[middle]))
    page.wait_for_selector("#head-row .main-svg", timeout=5000)
    assert page.inner_text("#panel-title").startswith(f"layer {edge.layer} head {edge.head}, query ")
    assert page.locator("#head-row .bars .point").count() == edge.dst + 1
    page.screenshot(path=tmp_path / "head_row.png", full_page=True)


def test_the_attention_page_live(session, open_page, tmp_path):
    page = open_page("pattern")
    info = session.loaded.info()
    assert page.locator("#head option").count() == info.n_heads
    assert page.text_content("#heatmap .gtitle") == "layer 1 head 0"
    head = info.n_heads - 1
    page.select_option("#head", str(head))
    page.wait_for_selector("body[data-ready=yes]")
    assert page.text_content("#heatmap .gtitle") == f"layer 1 head {head}"
    last = len(session.loaded.encode(IOI)) - 1
    [(act,)] = sql(session, f"SELECT act FROM pattern WHERE unit = {head} AND position = {last} AND attended = 1")
    lines = hover_lines(page, "heatmap", 1, last)
    assert lines[0] == f"layer 1 head {head}" and "key ' Mary' 1" in lines and f"act {act!r}" in lines
    page.screenshot(path=tmp_path / "attention.png", full_page=True)


def test_the_ranked_page_live(session, open_page, tmp_path):
    page = open_page("heads")
    effects = [e for (e,) in sql(session, "SELECT direct_effect FROM heads ORDER BY rank")]
    assert page.locator("#ranked tbody tr").count() == len(effects)
    assert page.locator("#ranked tbody td.value .bar").count() >= len(effects)
    header = page.locator("#ranked th", has_text="direct_effect")
    header.click()
    header.click()  # descending, then ascending
    first = page.locator("#ranked tbody tr").first.locator("td.value .number").last.inner_text()
    assert float(first) == pytest.approx(min(effects), rel=1e-3)
    page.locator("#ranked tbody tr").first.hover()
    assert page.is_visible("#context") and page.inner_text("#context mark") == " to"
    page.screenshot(path=tmp_path / "ranked.png", full_page=True)
