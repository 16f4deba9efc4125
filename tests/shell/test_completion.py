"""Completion: what may come next, from the LALR parser's accepted terminals plus names."""

from __future__ import annotations

import pytest
from tdbql.shell.completion import SQL_WORDS, complete
from tdbql.shell.meta import REGISTRY

TABLES = ["prompts", "tokens", "q1"]
COLUMNS = ["layer", "act", "prompt_id"]
SCALARS = ("act", "grad", "act_times_grad", "write_norm", "direct_effect", "contribution")


def at_end(text: str, **names) -> list[str]:
    kwargs = {"scalars": SCALARS, "tables": TABLES, "columns": COLUMNS} | names
    return complete(text, len(text), **kwargs)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("to", ["topk"]),
        ("lo", ["logit_lens", "logits", "logprobs", "load"]),
        ("topk 5 ", list(SCALARS)),
        ("topk 5 act_", ["act_times_grad"]),
        ("TOPK 5 ACT_T", ["act_times_grad"]),
        ("topk 5 act ", ["ablate", "as", "by", "of", "over", "patch", "steer", "target", "trace", "verify", "where"]),
        ("topk 5 act w", ["where"]),
        ("topk 5 act, ", list(SCALARS)),
        ("topk 5 act of ", ["mlp", "attn", "head", "sae", "mlp_sae", "attn_sae", "resid_sae", "mlp_tc", "embed", "mlp_sae_error",
          "attn_sae_error", "resid_sae_error", "mlp_tc_error"]),
        ("topk 5 act of mlp, a", ["attn", "attn_sae", "attn_sae_error"]),
        ("topk 5 act of mlp ", ["ablate", "as", "by", "over", "patch", "steer", "target", "trace", "verify", "where"]),
        ("topk 5 act where la", ["layer"]),
        ("topk 5 act where layer ", ["between", "in"]),
        ("topk 5 act where layer = 1 ", ["ablate", "and", "as", "by", "of", "over", "patch", "steer", "target", "trace", "verify"]),
        ("topk 5 act where layer = 1 and t", ["token"]),
        ("topk 5 act where component = ", ["mlp", "attn", "head", "sae", "mlp_sae", "attn_sae", "resid_sae", "mlp_tc", "embed", "mlp_sae_error",
          "attn_sae_error", "resid_sae_error", "mlp_tc_error"]),
        ("topk 5 act where layer = ", []),
        ("topk 5 act by ", ["layer", "token", "prompt", "component"]),
        # only what the binder accepts there: ablate and trace take neurons, heads and latents
        ("topk 5 act ablate ", ["mlp", "attn", "sae", "mlp_sae", "attn_sae", "resid_sae", "mlp_tc"]),
        ("topk 5 act ablate mlp[1,2]=0, ", ["mlp", "attn", "sae", "mlp_sae", "attn_sae", "resid_sae", "mlp_tc"]),
        ("topk 5 act trace ", ["mlp", "attn", "sae", "mlp_sae", "attn_sae", "resid_sae", "mlp_tc"]),
        ("topk 5 act patch ", ["mlp", "attn", "sae", "mlp_sae", "attn_sae", "resid_sae", "mlp_tc", "resid", "resid.pre",
                               "resid.mid", "resid.post"]),
        ("upvoted ", ["mlp", "attn", "sae", "mlp_sae", "attn_sae", "resid_sae", "mlp_tc", "block"]),
        # steer takes residual-width sites only (query/bind_steer.py)
        ("logits steer ", ["mlp", "attn", "resid", "resid.pre", "resid.mid", "resid.post"]),
        # where: the query kind's fields and the query's own scalars, not every scalar
        ("topk 5 act where ", ["layer", "token", "attended", "head", "unit", "prompt", "component", "act"]),
        ("topk 5 act, grad where layer = 1 and ", ["layer", "token", "attended", "head", "unit", "prompt",
                                                  "component", "act", "grad"]),
        ("select contribution(norm=2) of attn where c", ["component", "contribution"]),
        ("topk 5 act_times_grad where a", ["attended", "act_times_grad"]),
        ("topk 5 act ablate mlp[1,2]=", ["mean"]),
        ("topk 5 act ablate mlp[1,2]=0 ", ["as", "by", "of", "over", "patch", "steer", "target", "trace", "verify", "where"]),
        ("logits topk 3 ", ["ablate", "as", "patch", "steer", "where"]),
        ("topk 5 act trace attn[1,2]@3 ", ["ablate", "as", "by", "of", "over", "patch", "steer", "target", "verify", "via", "where"]),
        ("topk 5 act trace attn[1,2]@3 via ", ["q", "k", "qk", "v"]),
        ("topk 5 act over ", ["prompts"]),
        ("topk 5 act over prompts ", ["mean", "sum", "max"]),
        ("topk 5 act target ", ["logprob"]),
        ("topk 5 contribution(", ["norm"]),
        ("topk 5 act as ", []),
        ("select act of ", ["mlp", "attn", "head", "sae", "mlp_sae", "attn_sae", "resid_sae", "mlp_tc", "embed", "mlp_sae_error",
          "attn_sae_error", "resid_sae_error", "mlp_tc_error"]),
        ("logits ", ["ablate", "as", "patch", "steer", "topk", "where"]),
        ("logits where ", ["token", "prompt"]),
        ("logit_lens where ", ["layer", "token", "prompt"]),
        ("logit_lens ", ["ablate", "as", "at", "ln_f", "patch", "steer", "topk", "where"]),
        ("logit_lens at ", ["resid.pre", "resid.mid", "resid.post"]),
        ("logit_lens ln_f ", ["on", "off"]),
        ("upvoted mlp[1,2] ", ["as", "bottomk", "raw", "topk"]),
        ("routes ", ["ablate", "as", "from", "mode", "norm", "patch", "renormalize", "steer", "threshold"]),
        ("routes mode ", ["cell", "edge"]),
        ("routes from ", ["token"]),
        ("model x ", ["device", "dtype"]),
        ("model x dtype=", ["fp32", "bf16", "fp16"]),
        ("sae ", ["mlp", "attn", "resid", "mlp_tc"]),
        ("sae mlp ", ["from"]),
        ("prompts ", ["from"]),
        ("target ' Mary' ", ["vs"]),
        ("explain ", ["bottomk", "generate", "logit_lens", "logits", "logprobs", "metric", "patching", "routes", "select", "topk",
                     "upvoted", "analyze", "with"]),
        ("patching of ", ["head", "attn", "mlp", "neuron", "latent", "resid.pre", "resid.mid", "resid.post"]),
        ("patching of head from ", ["clean", "corrupt"]),
        ("patching of head from clean where ", ["layer", "token", "head", "unit", "prompt"]),
        ("topk 5 act patch attn[1,2] from c", ["clean", "corrupt"]),
        ("metric ", ["ablate", "as", "by", "over", "patch", "steer", "target"]),
        ("prompt 'a' ", ["corrupt"]),
        ("explain topk 5 act o", ["of", "over"]),
    ],
)
def test_dsl_completions(text, expected):
    assert at_end(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("select * from ", TABLES),
        ("select * from q", ["q1"]),
        ("SELECT * FROM t", ["tokens"]),
        ("select * from q1 join ", TABLES),
        ("select * from q1 where l", ["layer", "limit"]),
        ("describe ", TABLES),
        ("prompts from (select * from ", TABLES),
        ("prompts from (select text as prompt from prompts where p", ["prompt_id", "prompts"]),
        ("select a", ["act", "act_times_grad", "as", "and", "avg", "asc"]),
    ],
)
def test_sql_completions(text, expected):
    assert at_end(text) == expected


TABLE_COLUMNS = {"prompts": ["prompt_id", "text", "target"], "q1": ["layer", "unit", "act"],
                 "tokens": ["prompt_id", "position", "token"]}


@pytest.mark.parametrize(
    "text, cursor, expected",
    [
        ("select * from q1 where ", None, ["layer", "unit", "act", "prompts", "q1", "tokens"]),
        ("select * from prompts where t", None, ["text", "target", "tokens"]),
        ("select t from tokens", len("select t"), ["token", "tokens"]),  # the FROM after the cursor counts
        ("select * from q1 join tokens using (p", None, ["prompt_id", "position", "prompts"]),
        ('select * from "q1" where u', None, ["unit"]),
        ("select * from nowhere where l", None, ["layer", "limit"]),  # unknown table: every column
    ],
)
def test_sql_completes_the_named_tables_own_columns(text, cursor, expected):
    got = complete(text, len(text) if cursor is None else cursor, scalars=SCALARS, table_columns=TABLE_COLUMNS)
    assert [w for w in got if w not in SQL_WORDS or w in expected] == expected


FILES = ["data/", "data/ioi.tql", "data/pairs.csv", "notes.txt"]


def meta_at_end(text: str) -> list[str]:
    return complete(text, len(text), table_columns=TABLE_COLUMNS, meta=REGISTRY,
                    files=lambda prefix: [f for f in FILES if f.startswith(prefix)])


@pytest.mark.parametrize(
    "text, expected",
    [
        (".ta", [".tables"]),
        (".o", [".once", ".open", ".output"]),  # the alias .o is the word itself; .open is .attach
        ("\\", ["\\?", "\\d", "\\dt", "\\i", "\\o", "\\q", "\\x"]),
        ("he", ["help"]),
        (".schema ", ["prompts", "q1", "tokens"]),
        (".schema q", ["q1"]),
        ("\\d t", ["tokens"]),
        (".read ", FILES),
        (".read data/", ["data/ioi.tql", "data/pairs.csv"]),
        ("\\i n", ["notes.txt"]),
        (".read 'data/i", ["'data/ioi.tql"]),
        (".output data/p", ["data/pairs.csv"]),
        (".mode ", ["table", "line", "csv", "json", "jsonl", "markdown", "parquet"]),
        (".mode j", ["json", "jsonl"]),
        (".timer ", ["on", "off"]),
        ("\\x ", ["on", "off", "auto"]),
        (".help pl", ["plot"]),
        (".help .pl", [".plot"]),
        (".plot ", ["prompts", "q1", "tokens", "--kind", "--value", "--to"]),
        (".plot q1 ", ["--kind", "--value", "--to"]),
        (".plot q1 --kind ", ["lens", "heads", "attention", "patching", "layers", "routes", "bars", "graph"]),
        (".plot q1 --value ", ["layer", "unit", "act"]),
        (".plot q1 --to ", FILES),
        (".plot q1 --kind bars --to n", ["notes.txt"]),
        (".tables ", []),
        ("select 1;\n.sch", [".schema"]),
        ("  .ti", [".timer"]),
    ],
)
def test_meta_command_completions(text, expected):
    assert meta_at_end(text) == expected


def test_a_dot_inside_sql_is_not_a_meta_command():
    assert not any(word.startswith(".") for word in meta_at_end("select *\n  ."))
    assert meta_at_end("select '\n.ta") == []  # inside a string


def test_statement_start_offers_tdbql_and_sql_keywords():
    words = at_end("")
    assert {"topk", "select", "logits", "model", "with", "create", "describe"} <= set(words)
    assert words.index("topk") < words.index("create")  # tdbql words first


def test_completion_uses_only_the_current_statement():
    assert at_end("model default; topk 5 act ") == at_end("topk 5 act ")
    assert at_end("select * from q1;\ntopk 3 g") == ["grad"]
    assert at_end("topk 5 act\n  where la") == ["layer"]


def test_cursor_in_the_middle_completes_the_word_before_it():
    text = "topk 5 act_ of mlp"
    assert complete(text, len("topk 5 act_"), scalars=SCALARS, tables=(), columns=()) == ["act_times_grad"]


def test_names_come_from_the_providers():
    assert at_end("topk 5 ", scalars=("my_scalar",)) == ["my_scalar"]
    assert at_end("select * from ", tables=["runs"]) == ["runs"]
    assert at_end("topk 5 act of ", components=("mlp", "attn")) == ["mlp", "attn"]


def test_exact_word_is_not_offered_again():
    assert at_end("topk 5 act where layer") == []


@pytest.mark.parametrize("text", ["topk 5", "prompt 'abc", "topk 5 act where layer = 'x", "topk ((", "topk 5 act ]] ", "@@@"])
def test_nothing_to_offer_gives_an_empty_list(text):
    assert at_end(text) == []
