"""The grammar itself: built once, strict LALR, names in sync with the plan IR."""

from __future__ import annotations

import typing

from tdbql.grammar import transform
from tdbql.grammar.parse import KEYWORDS, TOKEN_TYPES, parse, parser
from tdbql.query import catalog
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


def test_the_grammar_accepts_every_catalog_name():
    for component in catalog.WRITTEN_COMPONENTS:
        (stmt, _), = parse(f"topk 5 act of {component}")
        assert stmt.components == (component,)
    for scalar in catalog.SCALAR_NAMES:
        assert parse(f"topk 5 {scalar}")[0][0].scalars[0].name == scalar
    for reduction in catalog.REDUCTIONS:
        assert parse(f"topk 5 act over prompts {reduction}")[0][0].over_prompts == reduction
    for dtype in catalog.DTYPES:
        assert parse(f"model default dtype = {dtype}")[0][0].dtype == dtype
    for site in catalog.SAE_SITES:
        assert parse(f"sae {site} from 'x'")[0][0].site == site
    for path in catalog.TRACE_PATHS:
        assert parse(f"topk 5 act trace attn[1,2]@3:1 via {path}")[0][0].trace.via == path


def test_every_catalog_hook_name_is_a_node_reference():
    for suffix in catalog.node_hook_names():
        component, whole = catalog.hook_node(suffix)
        text = f"upvoted blocks.1.{suffix}" + ("" if whole else "[2]")
        node = parse(text)[0][0].node
        assert (node.component, node.layer, node.index) == (component, 1, None if whole else 2)


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
