"""Session: parse -> bind -> engine -> DuckDB, on a tiny random GPT-2 (in-memory and file DBs)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import TypeAdapter
from tdbql.query.context import PromptRow
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import Statement
from tdbql.shell.prompts import read_prompt_file
from tdbql.shell.session import Session
from tdbql.shell.text import render_error, substitute_params

IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture
def session(tiny_model_dir):
    s = Session(model=str(tiny_model_dir))
    yield s
    s.close()


def rows(session: Session, sql: str) -> list[tuple]:
    return session.con.sql(sql).fetchall()


def test_prompt_fills_prompts_and_tokens_tables(session):
    [result] = session.execute(f'prompt "{IOI}", "The cat sat"')
    assert result.message == "2 prompts"
    ids = session.loaded.encode(IOI)
    assert rows(session, "SELECT prompt_id, text, n_tokens FROM prompts ORDER BY 1") == [
        (0, IOI, len(ids)), (1, "The cat sat", len(session.loaded.encode("The cat sat")))]
    tokens = rows(session, "SELECT position, token_id, token FROM tokens WHERE prompt_id = 0 ORDER BY position")
    assert [t[1] for t in tokens] == ids
    assert [t[0] for t in tokens] == list(range(len(ids)))
    assert "".join(t[2] for t in tokens) == IOI


def test_node_query_table_view_and_provenance(session):
    results = session.execute(f'prompt "{IOI}"\ntarget " Mary" vs " John"\ntopk 5 act_times_grad')
    query = results[-1]
    assert query.table_name == "q1"
    assert query.table.num_rows == 5
    stored = session.con.sql("SELECT * FROM q1").to_arrow_table()
    assert stored.equals(query.table)
    assert session.con.sql("SELECT * FROM _").to_arrow_table().equals(stored)
    assert stored.column_names[:9] == ["prompt_id", "layer", "component", "unit", "position", "attended", "token",
                                       "attended_token", "rank"]
    [(qid, text, plan_json, model, n, name)] = rows(
        session, "SELECT query_id, text, plan_json, model, rows, table_name FROM queries")
    assert (qid, text, n, name) == (1, "topk 5 act_times_grad", 5, "q1")
    assert model == session.model_name
    plan = TypeAdapter(Statement).validate_json(plan_json)
    assert plan.kind == "nodes" and plan.k == 5


def test_session_result_is_what_the_engine_computes(session):
    """The session adds nothing and loses nothing between the engine and DuckDB."""
    from tdbql.executor.engine import Engine
    from tdbql.grammar.parse import parse
    from tdbql.query.bind import bind, bind_query

    session.execute(f'prompt "{IOI}"\ntarget " Mary" vs " John"')
    text = "topk 7 act_times_grad, act of mlp where layer = 1"
    [result] = session.execute(text)
    [(stmt, span)] = parse(text)
    loaded = session.loaded
    query = bind(stmt, span, info=loaded.info(), tokenize=loaded.encode, tables=session.table_names(), source=text)
    bound = bind_query(query, span, session_loss=session.loss, prompts_have_targets=False)
    direct = Engine(loaded).run(bound, session.prompts)["result"]
    assert session.con.sql("SELECT * FROM q1").to_arrow_table().equals(direct)


def test_names_counters_and_sql(session):
    session.execute(f'prompt "{IOI}"\ntarget " Mary" vs " John"')
    session.execute("topk 3 act_times_grad as first_run\ntopk 4 act of mlp")
    assert {"first_run", "q2"} <= set(session.table_names())
    [sql] = session.execute("select count(*) as n from q2;")
    assert sql.table.to_pylist() == [{"n": 4}]
    [ddl] = session.execute("create table kept as select * from first_run;")
    assert ddl.table is None and ddl.message == "OK"
    [ins] = session.execute("insert into kept select * from first_run;")
    assert ins.message == "3 rows"
    assert rows(session, "SELECT count(*) FROM kept") == [(6,)]
    assert rows(session, "SELECT table_name FROM queries ORDER BY query_id") == [("first_run",), ("q2",)]


def test_bind_error_keeps_earlier_results_and_points_at_the_line(session):
    text = f'prompt "{IOI}"\ntopk 3 act as ok\ntopk 3 act where layer = 99\ntopk 3 act as never'
    with pytest.raises(TdbqlError) as info:
        session.execute(text, source_name="run.tql")
    err = info.value
    assert err.line == 3
    assert render_error(err).startswith("run.tql:3:")
    assert "ok" in session.table_names() and "never" not in session.table_names()


def test_syntax_error_runs_the_statements_before_it(session):
    text = f'prompt "{IOI}"\ntopk 3 act as before\ntopk three act\ntopk 3 act as after'
    with pytest.raises(TdbqlError) as info:
        session.execute(text, source_name="f.tql")
    assert info.value.line == 3
    assert render_error(info.value).startswith("f.tql:3:")
    names = session.table_names()
    assert "before" in names and "after" not in names


def test_sql_error_is_a_tdbql_error_with_position(session):
    with pytest.raises(TdbqlError) as info:
        session.execute("\n\nselect * from no_such_table;")
    assert info.value.line == 3
    assert "no_such_table" in info.value.message


def test_query_without_prompts_is_refused(session):
    with pytest.raises(TdbqlError, match="no prompts"):
        session.execute("topk 3 act")


def test_params_are_substituted(tiny_model_dir):
    s = Session(model=str(tiny_model_dir), params={"k": "4", "who": "Mary"})
    s.execute('prompt "When $who and John went"\ntopk $k act as t')
    assert rows(s, "SELECT text FROM prompts") == [("When Mary and John went",)]
    assert rows(s, "SELECT count(*) FROM t") == [(4,)]
    s.close()


def test_undefined_param_names_line_and_column():
    with pytest.raises(TdbqlError) as info:
        substitute_params("select 1;\ntopk $kk act", {"k": "3"})
    assert (info.value.line, info.value.column) == (2, 6)
    assert info.value.suggestion == "k"
    assert substitute_params("-- cost $5 $x\nselect $$a$$", {}) == "-- cost $5 $x\nselect $$a$$"


def test_set_statements(session):
    [r] = session.execute("set batch_size = 8")
    assert session.settings.batch_size == 8 and r.message == "batch_size = 8"
    with pytest.raises(TdbqlError) as info:
        session.execute("set batch_sise = 8")
    assert info.value.suggestion == "batch_size"
    with pytest.raises(TdbqlError, match="positive integer"):
        session.execute("set batch_size = 0")


def test_target_statement_sets_the_session_loss(session):
    [r] = session.execute('target " Mary" vs " John"')
    assert session.loss.targets == (" Mary",) and session.loss.distractors == (" John",)
    assert r.message == "target: logit(' Mary') - logit(' John') at the last token"


def test_explain_returns_a_plan_text(session):
    session.execute(f'prompt "{IOI}"\ntarget " Mary" vs " John"')
    [r] = session.execute("explain topk 5 act_times_grad where layer = 1")
    assert r.table is None and r.message and len(r.message.splitlines()) > 1
    assert rows(session, "SELECT count(*) FROM queries") == [(0,)]


def test_safe_mode_blocks_file_access(tiny_model_dir, tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nhello\n")
    s = Session(model=str(tiny_model_dir), safe=True)
    with pytest.raises(TdbqlError, match="file system operations are disabled"):
        s.execute(f"select * from read_csv('{tmp_path / 'p.csv'}');")
    with pytest.raises(TdbqlError):
        s.execute("SET enable_external_access = true;")
    with pytest.raises(TdbqlError, match="--safe"):
        s.execute(f"prompts from '{tmp_path / 'p.csv'}'")
    s.close()


def test_file_database_persists_tables_prompts_and_counter(tiny_model_dir, tmp_path):
    db = str(tmp_path / "runs.duckdb")
    s = Session(model=str(tiny_model_dir), db=db)
    s.execute(f'prompt "{IOI}"\ntopk 3 act')
    first = s.con.sql("SELECT * FROM q1").to_arrow_table()
    s.close()
    again = Session(model=str(tiny_model_dir), db=db)
    assert [p.text for p in again.prompts] == [IOI]
    assert again.con.sql("SELECT * FROM q1").to_arrow_table().equals(first)
    [r] = again.execute("topk 3 act")
    assert r.table_name == "q2"
    assert rows(again, "SELECT query_id, table_name FROM queries ORDER BY 1") == [(1, "q1"), (2, "q2")]
    again.close()


def test_prompts_from_files_and_sql(session, tmp_path):
    records = [{"prompt": IOI, "target": " Mary", "distractor": " John"}, {"prompt": "The cat sat"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "p.csv").write_text(f'prompt,target,distractor\n"{IOI}", Mary, John\nThe cat sat,,\n')
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
    (tmp_path / "p.txt").write_text(f"{IOI}\n\nThe cat sat\n")
    expected = [PromptRow(prompt_id=0, text=IOI, target=" Mary", distractor=" John"),
                PromptRow(prompt_id=1, text="The cat sat")]
    for suffix in ("jsonl", "csv", "parquet"):
        assert read_prompt_file(tmp_path / f"p.{suffix}") == expected, suffix
    assert [p.text for p in read_prompt_file(tmp_path / "p.txt")] == [IOI, "The cat sat"]
    [r] = session.execute(f"prompts from '{tmp_path / 'p.jsonl'}'")
    assert r.message == "2 prompts"
    assert rows(session, "SELECT target, distractor FROM prompts ORDER BY prompt_id") == [
        (" Mary", " John"), (None, None)]
    session.execute("create table src as select 'a b' as text union all select 'c d';")
    session.execute("prompts from (select text from src order by text)")
    assert [p.text for p in session.prompts] == ["a b", "c d"]


def test_bad_prompt_sources(session, tmp_path):
    with pytest.raises(TdbqlError, match="not found"):
        session.execute("prompts from 'missing.jsonl'")
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(TdbqlError, match="no 'prompt' or 'text' column"):
        session.execute(f"prompts from '{tmp_path / 'bad.jsonl'}'")


def test_relative_paths_resolve_beside_the_query_file(session, tmp_path):
    (tmp_path / "p.txt").write_text("hello there\n")
    session.execute("prompts from 'p.txt'", source_name=str(tmp_path / "q.tql"))
    assert [p.text for p in session.prompts] == ["hello there"]


def test_model_statement_loads_a_folder(tmp_path, tiny_model_dir):
    s = Session(model="no-such-model")
    [r] = s.execute(f"model '{tiny_model_dir}'")
    assert "4 layers, 4 heads" in r.message
    assert s.model_name == str(tiny_model_dir)
    s.close()


def test_routes_give_two_tables(session):
    session.execute(f'prompt "{IOI}"')
    [r] = session.execute("routes threshold 0.04")
    assert {"route_nodes", "route_edges"} <= set(session.table_names())
    assert r.table_name == "route_edges"
    assert rows(session, "SELECT table_name FROM queries") == [("route_nodes,route_edges",)]
    session.execute("routes threshold 0.1 as g")
    assert {"g_nodes", "g_edges"} <= set(session.table_names())


def test_interrupt_is_not_swallowed(session, monkeypatch):
    session.execute(f'prompt "{IOI}"')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "_engine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        session.execute("topk 3 act")
    assert session.execute("select 1 as one;")[0].table.to_pylist() == [{"one": 1}]


def test_unexpected_failure_becomes_one_line_error(session, monkeypatch):
    session.execute(f'prompt "{IOI}"')

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Session, "_engine", broken)
    with pytest.raises(TdbqlError, match="internal error: RuntimeError: boom") as info:
        session.execute("topk 3 act")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_session_tables_cannot_be_overwritten_by_results(session):
    session.execute(f'prompt "{IOI}"')
    for name in ("queries", "prompts", "tokens", "_"):
        with pytest.raises(TdbqlError, match="session table"):
            session.execute(f"topk 3 act as {name}")
    assert rows(session, "SELECT count(*) FROM queries") == [(0,)]
    assert session.execute("topk 3 act as mine")[0].table_name == "mine"


def test_set_dtype_reloads_the_model(session):
    import torch

    session.execute(f'prompt "{IOI}"')
    assert session.loaded.dtype == torch.float32
    session.execute("set dtype = bf16")
    assert session.loaded.dtype == torch.bfloat16
    with pytest.raises(TdbqlError, match="dtype must be one of"):
        session.execute("set dtype = fp8")
    session.execute("set freeze_ln_f = off")
    assert session.settings.freeze_ln_f is False


def write_saelens_sae(folder, *, layer: int, d_in: int, d_sae: int, seed: int = 0):
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.zeros(d_sae),
               "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.zeros(d_in)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": "standard",
                                                 "hook_name": f"blocks.{layer}.mlp.hook_post"}))


def test_sae_statement_attaches_autoencoders_for_queries(session, tmp_path):
    for layer in (0, 1):
        write_saelens_sae(tmp_path / "saes" / f"mlp_L{layer}", layer=layer, d_in=64, d_sae=16, seed=layer)
    session.execute(f'prompt "{IOI}"\ntarget " Mary" vs " John"')
    [r] = session.execute("sae mlp from 'saes'", source_name=str(tmp_path / "q.tql"))
    assert r.message == "attached 2 autoencoder(s): mlp[0] (16 latents), mlp[1] (16 latents)"
    assert session.loaded.info().sae_latents == (("mlp", 0, 16), ("mlp", 1, 16))
    [q] = session.execute("topk 5 act_times_grad of mlp_sae")
    assert set(q.table.column("component").to_pylist()) == {"mlp_sae"}
    with pytest.raises(TdbqlError, match="attn"):
        session.execute(f"sae attn from '{tmp_path / 'saes'}'")


def test_logit_lens_with_ablation_equals_a_hand_hooked_transformers_forward(session, tiny_model_dir):
    """`logit_lens ... ablate attn[0,1]=0` through the session: head 1 of layer 0 removed (its
    probabilities zero, so its slice of the merged heads is zero), then resid.post[1] read through
    ln_f and the unembedding of a transformers GPT-2 with a hand-written hook."""
    import torch
    import transformers

    session.execute(f'prompt "{IOI}"')
    [result] = session.execute("logit_lens where token = -1 and layer = 1 topk 5 ablate attn[0,1]=0")
    plain = session.execute("logit_lens where token = -1 and layer = 1 topk 5")[0].table
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    d_head = hf.config.n_embd // hf.config.n_head

    def drop_head(module, args):
        z = args[0].clone()
        z[..., 1 * d_head:2 * d_head] = 0
        return (z,)

    hf.transformer.h[0].attn.c_proj.register_forward_pre_hook(drop_head)
    ids = torch.tensor([session.loaded.encode(IOI)])
    with torch.no_grad():
        resid_post_1 = hf(ids, output_hidden_states=True).hidden_states[2][0, -1]
        logits = hf.lm_head(hf.transformer.ln_f(resid_post_1))
    top = logits.topk(5)
    rows = result.table.to_pylist()
    assert [r["vocab_id"] for r in rows] == top.indices.tolist()
    assert [r["logit"] for r in rows] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [r["prob"] for r in rows] == pytest.approx(logits.softmax(-1)[top.indices].tolist(), abs=1e-5)
    assert [r["logit"] for r in rows] != pytest.approx(plain.column("logit").to_pylist(), abs=1e-4)


def test_prompt_pairs_from_files_and_sql(session, tmp_path):
    """A `corrupt` column in JSONL, CSV and Parquet files and in a SQL result makes pairs."""
    corrupt = IOI.replace("John gave", "Mary gave")
    records = [{"prompt": IOI, "target": " Mary", "distractor": " John", "corrupt": corrupt},
            {"prompt": IOI, "target": " Mary", "distractor": " John", "corrupt": IOI}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.Table.from_pylist(records), tmp_path / "pairs.csv")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pairs.parquet")
    for name in ("pairs.jsonl", "pairs.csv", "pairs.parquet"):
        [result] = session.execute(f"prompts from '{tmp_path / name}'")
        assert result.message == "2 prompts (2 with a corrupted prompt)"
        assert [p.corrupt for p in session.prompts] == [corrupt, IOI]
        table = session.execute("metric")[0].table.to_pylist()
        assert table[1]["metric_corrupt"] == pytest.approx(table[1]["metric_clean"], abs=1e-5)  # its own prompt
        assert table[0]["metric_corrupt"] != pytest.approx(table[0]["metric_clean"], abs=1e-3)
    assert rows(session, "SELECT corrupt, corrupt_n_tokens FROM prompts ORDER BY prompt_id") == [
        (corrupt, len(session.loaded.encode(corrupt))), (IOI, len(session.loaded.encode(IOI)))]
    assert rows(session, "SELECT count(*) FROM corrupt_tokens")[0][0] == 2 * len(session.loaded.encode(IOI))
    session.execute(f"create table my_pairs as select * from read_parquet('{tmp_path / 'pairs.parquet'}');")
    [result] = session.execute("prompts from (select prompt, corrupt, target, distractor from my_pairs)")
    assert result.message == "2 prompts (2 with a corrupted prompt)"
    [plain] = session.execute(f'prompt "{IOI}"')
    assert plain.message == "1 prompt" and rows(session, "SELECT count(*) FROM corrupt_tokens")[0][0] == 0
