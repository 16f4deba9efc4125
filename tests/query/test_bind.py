"""Binding: names and ranges checked against the model, defaults filled, errors placed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from tdbql.grammar.parse import parse
from tdbql.query.bind import bind
from tdbql.query.context import ModelInfo
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import NodeQuery, SqlStmt, Statement

SINGLE_TOKENS = {"Mary", "John", "Anna", "Paris"}


def tokenize(text: str) -> list[int]:
    """Known names (with a leading space) are one token; other words split every 3 characters."""
    ids: list[int] = []
    for piece in re.findall(r"\s?\w+|\s|[^\w\s]", text):
        ids += [1] if piece.strip() in SINGLE_TOKENS else [0] * ((len(piece) + 2) // 3)
    return ids


def model(saes=(("mlp", 0, 1024), ("mlp", 1, 1024), ("mlp", 2, 1024), ("mlp", 3, 1024))) -> ModelInfo:
    return ModelInfo(
        name="tiny", arch="gpt2", n_layers=4, n_heads=4, d_model=64, d_mlp=512,
        vocab_size=1000, n_ctx=128, sae_latents=tuple(saes),
    )


def bound(text: str, info: ModelInfo | None = None, tables=("prompts", "q1")):
    results = [
        bind(stmt, span, info=info or model(), tokenize=tokenize, tables=tables, source=text)
        for stmt, span in parse(text)
    ]
    return results[0] if len(results) == 1 else results


def error(text: str, info: ModelInfo | None = None, tables=("prompts", "q1")) -> TdbqlError:
    with pytest.raises(TdbqlError) as caught:
        bound(text, info, tables)
    return caught.value


# --- defaults and normalisation ---


def test_default_components_are_mlp_attn_and_loaded_autoencoders():
    assert bound("topk 5 act").components == ("mlp", "attn", "mlp_sae")
    assert bound("topk 5 act", model(saes=())).components == ("mlp", "attn")


def test_default_components_follow_what_the_scalars_apply_to():
    assert bound("topk 5 contribution").components == ("mlp", "attn")
    assert bound("topk 5 token_attribution").components == ("embed",)
    assert bound("topk 5 sae_error").components == ("mlp_sae", "mlp_sae_error")


def test_sae_component_expands_to_the_loaded_sites():
    info = model(saes=(("mlp", 1, 8), ("resid", 2, 16)))
    assert bound("topk 5 act of mlp, sae", info).components == ("mlp", "mlp_sae", "resid_sae")


def test_sae_node_reference_resolves_to_the_one_loaded_site():
    query = bound("topk 5 act ablate sae[1,7]=0")
    assert query.ablations[0].node.component == "mlp_sae"


def test_binding_is_idempotent():
    text = "topk 5 act of sae ablate sae[1,7]=0 trace mlp[1,2]@3 target ' Mary' vs ' John'"
    once = bound(text)
    assert once.components == ("mlp_sae",) and once.ablations[0].node.component == "mlp_sae"
    span = parse(text)[0][1]
    assert bind(once, span, info=model(), tokenize=tokenize, source=text) == once


def test_statements_without_model_names_pass_through():
    for text in ("model gpt2-small", "sae mlp from 'x'", "prompt 'a'", "set batch_size = 1", "prompts from 'x.jsonl'"):
        assert bound(text) == parse(text)[0][0]
    assert bound("select * from nowhere") == SqlStmt(text="select * from nowhere")


def test_explain_binds_its_query():
    assert bound("explain topk 5 act").query.components == ("mlp", "attn", "mlp_sae")
    assert error("explain topk 5 act where layer = 9").message.startswith("layer 9 is out of range")


# --- errors: (text, message, column) ---

BIND_ERRORS = [
    ("topk 5 act where layer = 99", "layer 99 is out of range: the model has 4 layers (0..3)", 18),
    ("topk 5 act where layer in 2..4", "layer 4 is out of range: the model has 4 layers (0..3)", 18),
    ("topk 5 act of attn where head in (1, 7)", "head 7 is out of range: the model has 4 heads (0..3)", 26),
    ("topk 5 act where token = 128", "token 128 is out of range: the model reads at most 128 tokens (-128..127, negative counts from the end)", 18),
    ("topk 5 act where prompt = -1", "prompt ids count from 0, got -1", 18),
    ("topk 5 act of mlp where unit = 512", "unit 512 is out of range: the largest component here has 512 units (0..511)", 25),
    ("topk 5 act where layer = 'x'", "layer takes integers, got 'x'", 18),
    ("topk 5 act where layr = 1", "unknown field 'layr' (fields: layer, token, attended, head, unit, prompt, component, act)", 18),
    ("topk 5 act where grad > 0", "unknown field 'grad' (fields: layer, token, attended, head, unit, prompt, component, act)", 18),
    ("topk 5 act where act in 1..2", "act is compared with a number, e.g. act > 0", 18),
    ("topk 5 act of mlp where component = attn", "component 'attn' is not in this query (components: mlp)", 25),
    ("topk 5 act where component > mlp", "component is compared with = or != and a name, e.g. component = mlp", 18),
    ("topk 5 contribution of sae", "contribution is not defined for mlp_sae (MLP autoencoder latents); it applies to mlp, attn, head", 24),
    ("topk 5 token_attribution of mlp", "token_attribution is not defined for mlp (MLP neurons); it applies to embed", 29),
    ("topk 5 act of attn_sae", "no autoencoder is loaded at attn: load one with `sae attn from 'path'`", 15),
    ("topk 5 contribution(norm=3)", "contribution(norm=3): norm must be 1 or 2", 21),
    ("topk 5 contribution(nrm=2)", "unknown parameter 'nrm' for contribution (it takes norm)", 21),
    ("topk 5 act(norm=2)", "unknown parameter 'norm' for act (it takes none)", 12),
    ("topk 5 in_edge", "in_edge needs a traced node: add `trace mlp[L,N]@t`", 8),
    ("topk 5 act ablate mlp[3,512]=0", "neuron 512 is out of range: MLP layers have 512 neurons (0..511)", 19),
    ("topk 5 act ablate attn[3,4]=0", "head 4 is out of range: the model has 4 heads (0..3)", 19),
    ("topk 5 act ablate mlp[4,1]=0", "layer 4 is out of range: the model has 4 layers (0..3)", 19),
    ("topk 5 act ablate sae[1,1024]=0", "latent 1024 is out of range: the mlp autoencoder at layer 1 has 1024 latents (0..1023)", 19),
    ("topk 5 act ablate attn_sae[1,1]=0", "no attn autoencoder is loaded at layer 1", 19),
    ("topk 5 act ablate resid[1]=0", "resid cannot be ablated: ablate MLP neurons, attention heads or latents", 19),
    ("topk 5 act ablate attn[1,2]@3:5=0", "key token 5 comes after query token 3; attention only looks back", 19),
    ("topk 5 act ablate mlp[1,1]@200=0", "token 200 is out of range: the model reads at most 128 tokens (-128..127, negative counts from the end)", 19),
    ("topk 5 act trace mlp[1,2]", "trace needs a token position: write mlp[1,2]@t", 12),
    ("topk 5 act trace resid[1]@2", "trace takes an MLP neuron, an attention head or a latent, not resid", 12),
    ('target " Maryanne" vs " John"', "target ' Maryanne' is 3 tokens; targets must be single tokens", 8),
    ('target " Mary" vs " Johnny"', "distractor ' Johnny' is 3 tokens; distractors must be single tokens", 19),
    ('target ""', "target '' is empty; targets must be single tokens", 8),
    ('topk 5 act target logprob " Parisian"', "target ' Parisian' is 3 tokens; targets must be single tokens", 27),
    ("logits where layer = 1", "unknown field 'layer' (fields: token, prompt)", 14),
    ("logits topk 1001", "topk 1001 is more than the vocabulary (1000 tokens)", 8),
    ("logit_lens where layer = 4", "layer 4 is out of range: the model has 4 layers (0..3)", 18),
    ("upvoted mlp[7,1]", "layer 7 is out of range: the model has 4 layers (0..3)", 9),
    ("upvoted block[9]", "layer 9 is out of range: the model has 4 layers (0..3)", 9),
    ("routes from token 500", "token 500 is out of range: the model reads at most 128 tokens (-128..127, negative counts from the end)", 8),
    ("prompts from (select text as prompt from promts)", "unknown table 'promts' (tables: prompts, q1)", 42),
    ("prompts from (select p.text as prompt from prompts p join notes n on true)", "unknown table 'notes' (tables: prompts, q1)", 59),
]


@pytest.mark.parametrize("text, message, column", BIND_ERRORS)
def test_bind_error_message_and_column(text, message, column):
    err = error(text)
    assert (err.message, err.line, err.column) == (message, 1, column)


def test_misspelt_field_and_table_get_suggestions():
    assert error("topk 5 act where layr = 1").suggestion == "layer"
    assert error("prompts from (select text as prompt from promts)").suggestion == "prompts"
    assert error("topk 5 act of mlp where component = mpl").suggestion == "mlp"


def test_sae_errors_depend_on_what_is_loaded():
    assert error("topk 5 sae_error", model(saes=())).message == (
        "sae_error needs an autoencoder: load one with `sae mlp from 'path'`"
    )
    assert error("topk 5 act of sae", model(saes=())).message == (
        "no autoencoder is loaded: load one with `sae mlp from 'path'`"
    )
    both = model(saes=(("mlp", 1, 8), ("attn", 1, 8)))
    assert error("upvoted sae[1,2]", both).message == "sae[1,2] is ambiguous: write mlp_sae[1,2] or attn_sae[1,2]"
    assert error("upvoted sae[0,2]", both).message.startswith("no autoencoder is loaded at layer 0")
    assert bound("upvoted attn_sae[1,2]", both).node.component == "attn_sae"


def test_errors_carry_the_line_of_their_statement():
    err = error("model default\n\ntopk 5 act\n  where layer = 9")
    assert (err.line, err.column) == (4, 9)
    stmt, span = parse("prompt 'a'\ntopk 5 act where layer = 9")[1]
    without_source = pytest.raises(TdbqlError, bind, stmt, span, info=model(), tokenize=tokenize)
    assert (without_source.value.line, without_source.value.column) == (2, 1)


def test_sql_subquery_tables_are_matched_case_insensitively_and_ctes_and_functions_are_fine():
    ok = [
        "prompts from (select text as prompt from PROMPTS)",
        "prompts from (with t as (select 1) select text as prompt from t, prompts)",
        "prompts from (select prompt from read_parquet('x.parquet'))",
        "prompts from (select prompt from main.q1)",
        "prompts from (select 'from nowhere' as prompt from q1)",
    ]
    for text in ok:
        assert bound(text).kind == "prompts_sql"


def test_valid_ranges_bind():
    query = bound(
        "topk 5 act of attn where layer in 0..3 and head = 3 and token = -128 "
        "ablate attn[3,3]@-1:-2=0, mlp[0,511]=mean, sae[3,1023]=0 trace attn[0,0]@5:5 via k"
    )
    assert isinstance(query, NodeQuery) and len(query.ablations) == 3
    assert bound("upvoted mlp[3]@-1").node.index is None
    assert bound("logit_lens where layer in 0..3 topk 1000").k == 1000


# --- bound-plan fixtures (tests/fixtures/plans/bound.txt): text -> plan after bind ---

BOUND_FIXTURE = Path(__file__).parents[1] / "fixtures" / "plans" / "bound.txt"


def bound_pairs() -> list[tuple[str, str]]:
    lines = [line for line in BOUND_FIXTURE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return list(zip(lines[::2], lines[1::2]))


@pytest.mark.parametrize("text, expected", bound_pairs())
def test_bound_fixture(text, expected):
    assert bound(text) == TypeAdapter(Statement).validate_python(json.loads(expected))
