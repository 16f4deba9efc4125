"""The grammar itself: built once, strict LALR, names in sync with the plan IR."""

from __future__ import annotations

import typing

from tdbql.grammar import transform
from tdbql.grammar.parse import KEYWORDS, TOKEN_TYPES, parse, parser
from tdbql.query import plan
from tdbql.query.errors import TdbqlError


def literal_values(annotation) -> set[str]:
    return set(typing.get_args(annotation))


def test_parser_is_built_once_per_process():
    assert parser() is parser()


def test_parser_is_strict_lalr_with_positions():
    options = parser().options
    assert (options.parser, options.strict, options.propagate_positions) == ("lalr", True, True)


def test_every_terminal_has_a_token_type():
    assert {t.name for t in parser().terminals} <= set(TOKEN_TYPES)
    assert set(TOKEN_TYPES.values()) <= {"keyword", "punctuation", "name", "number", "string", "sql", "comment", "whitespace"}


def test_keywords_are_lowercase_words_of_the_grammar():
    assert {"topk", "bottomk", "select", "of", "where", "by", "ablate", "trace", "over", "as", "explain"} <= KEYWORDS
    assert all(word == word.lower() and word.replace("_", "").isalpha() for word in KEYWORDS)
    assert "act" not in KEYWORDS and "mlp" not in KEYWORDS  # open-class names are not keywords


def test_name_lists_match_the_plan_literals():
    components = literal_values(plan.Component)
    assert set(transform.QUERY_COMPONENTS) == components - {"resid"}
    ref_field = plan.NodeRef.model_fields["component"].annotation
    assert set(transform.REF_COMPONENTS) == literal_values(ref_field)
    assert set(transform.DTYPES) == literal_values(plan.Dtype)
    assert set(transform.REDUCTIONS) == literal_values(plan.Reduction)
    assert set(transform.SAE_SITES) == literal_values(plan.SaeSite)
    via = plan.Trace.model_fields["via"].annotation
    assert set(transform.TRACE_PATHS) == literal_values(typing.get_args(via)[0])
    assert set(transform.HOOK_ALIASES.values()) <= set(transform.REF_COMPONENTS)


def test_keywords_are_case_insensitive_but_table_names_keep_their_case():
    lower = parse("topk 5 act of mlp where layer = 1 as MyNodes")[0][0]
    upper = parse("TOPK 5 ACT OF MLP WHERE LAYER = 1 AS MyNodes")[0][0]
    assert lower == upper and upper.name == "MyNodes"


def test_a_keyword_is_a_name_where_only_a_name_fits():
    (stmt, _), = parse("topk 5 act where token = -1 as where_tokens")
    assert stmt.where[0].field == "token" and stmt.name == "where_tokens"


def test_a_failure_inside_the_transformer_becomes_a_tdbql_error(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(transform.ToPlan, "scalar", broken)
    try:
        parse("topk 5 act")
    except TdbqlError as err:
        assert err.message == "invalid statement: boom" and (err.line, err.column) == (1, 1)
    else:
        raise AssertionError("expected TdbqlError")
