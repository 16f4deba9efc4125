"""Programs: statement boundaries, spans, SQL passthrough and the select rule."""

from __future__ import annotations

import pytest
from tdbql.grammar.parse import parse
from tdbql.grammar.split import split_statements
from tdbql.query.plan import NodeQuery, SqlStmt


def kinds(text: str) -> list[str]:
    return [stmt.kind for stmt, _ in parse(text)]


def test_newlines_and_semicolons_separate_statements():
    assert kinds("model default\nprompt 'a'; target ' b'\n\ntopk 5 act") == ["model", "prompt", "target", "nodes"]


def test_spans_give_line_column_and_offsets_of_each_statement():
    text = "model default\n  topk 5 act -- note\nlogits"
    spans = [span for _, span in parse(text)]
    assert [(s.line, s.column, s.end_line, s.end_column) for s in spans] == [(1, 1, 1, 14), (2, 3, 2, 13), (3, 1, 3, 7)]
    assert [text[s.start_pos : s.end_pos] for s in spans] == ["model default", "topk 5 act", "logits"]


def test_sql_runs_to_the_next_semicolon_across_lines():
    text = "select layer,\n  count(*)\nfrom q1\ngroup by layer;\ntopk 5 act"
    (sql, _), (query, _) = parse(text)
    assert sql == SqlStmt(text="select layer,\n  count(*)\nfrom q1\ngroup by layer")
    assert isinstance(query, NodeQuery)


def test_sql_without_semicolon_runs_to_the_end_of_input():
    text = "select * from q1\ntopk 5 act"
    assert parse(text)[0][0] == SqlStmt(text=text)


def test_semicolons_and_comment_markers_inside_sql_strings_do_not_split():
    text = "select ';' as a, '--' as b, \"x;y\" from q1 -- trailing; comment\n; logits"
    (sql, _), (logits, _) = parse(text)
    assert sql.text == "select ';' as a, '--' as b, \"x;y\" from q1"
    assert logits.kind == "logits"


def test_sql_block_comments_may_hold_semicolons():
    assert parse("select 1 /* a; b */ + 1; logits")[0][0] == SqlStmt(text="select 1 /* a; b */ + 1")


@pytest.mark.parametrize(
    "text, is_tdbql",
    [
        ("select act of attn where layer = 1", True),
        ("select act", True),
        ("select act, grad where layer = 2", True),
        ("SELECT Act_Times_Grad OF mlp", True),
        ("select act_time_grad of mlp", True),  # a misspelt scalar stays tdbql (and fails there)
        ("select * from q1", False),
        ("select act from q1", False),
        ("select act\n  from q1", False),
        ("select act,\n  grad\nfrom q1", False),
        ("select layer, act from q1 where act > 0", False),
        ("select 42", False),
        ("select now()", False),
        ("select q1.act from q1", False),
        ("select count(*) from q1", False),
    ],
)
def test_the_select_rule(text, is_tdbql):
    if is_tdbql and "act_time_grad" in text:
        with pytest.raises(Exception, match="did you mean 'act_times_grad'"):
            parse(text)
        return
    (stmt, _), *_ = parse(text)
    assert isinstance(stmt, NodeQuery) is is_tdbql
    assert isinstance(stmt, SqlStmt) is not is_tdbql


def test_a_tdbql_select_ends_at_a_line_that_starts_another_statement():
    assert kinds("select act of mlp\nselect * from q1") == ["nodes", "sql"]
    assert kinds("select act of mlp\n\nfrom q1 select layer") == ["sql"]  # `from` continues SQL


def test_explain_is_tdbql_before_a_tdbql_query_and_sql_otherwise():
    assert kinds("explain topk 5 act") == ["explain"]
    assert kinds("explain select act of mlp") == ["explain"]
    assert kinds("explain select * from q1") == ["sql"]
    assert kinds("explain analyze select 1") == ["sql"]


def test_clause_lines_continue_a_tdbql_query():
    text = "topk 5 act_times_grad\n  of mlp\n  where layer = 1\n  and token = -1\n  as t\nlogits"
    (query, span), (logits, _) = parse(text)
    assert query.components == ("mlp",) and len(query.where) == 2 and query.name == "t"
    assert (span.line, span.end_line) == (1, 5)
    assert logits.kind == "logits"


def test_parenthesised_subquery_spans_lines():
    (stmt, span), = parse("prompts from (\n  select text as prompt\n  from t\n)")
    assert stmt.sql == "select text as prompt\n  from t"
    assert span.end_line == 4


def test_statement_may_be_followed_by_a_comment_with_quotes():
    (stmt, _), = parse("topk 5 act -- don't split here")
    assert stmt.scalars[0].name == "act"


def test_dsl_strings_keep_semicolons_and_comment_markers():
    (stmt, _), = parse("prompt 'a; b -- c'")
    assert stmt.texts == ("a; b -- c",)


def test_a_patch_clauses_from_does_not_make_select_sql():
    assert [c.is_sql for c in split_statements("select act of attn patch attn[0,1] from clean")] == [False]
    assert [c.is_sql for c in split_statements("select act of attn patch mlp[1,2] from corrupt")] == [False]
    assert [c.is_sql for c in split_statements("select act from clean")] == [True]  # a table named clean
