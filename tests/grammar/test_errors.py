"""Bad inputs: each gives one TdbqlError with the right message, line, column and suggestion."""

from __future__ import annotations

import pytest
from tdbql.grammar.parse import parse
from tdbql.query.errors import TdbqlError

# (text, column, message, suggestion); all on line 1.
BAD_LINES = [
    ("topk 5 act_time_grad", 8, "unknown scalar 'act_time_grad'", "act_times_grad"),
    ("tpk 5 act", 1, "unknown statement 'tpk'", "topk"),
    ("topk act", 6, "unexpected 'act'; expected an integer", None),
    ("topk 0 act", 6, "k must be at least 1, got 0", None),
    ("topk 5 act wherex layer = 1", 12, "unexpected 'wherex'; expected 'ablate', 'as', 'by', 'of', 'over', 'patch', 'steer', 'target', 'trace', 'verify', 'where', '(', ',' or the end of the statement", "where"),
    ("topk 5 act where", 17, "unexpected end of statement; expected a field name", None),
    ("topk 5 act where layer", 23, "unexpected end of statement; expected 'between', 'in', '!=', '<', '<=', '<>', '=', '>' or '>='", None),
    ("topk 5 act where layer = ", 25, "unexpected end of statement; expected a number, a quoted string or a name", None),
    ("topk 5 act where layer in 7..3", 27, "empty range 7..3: the first bound must not exceed the second", None),
    ("topk 5 act where layer in (1, 2", 32, "unexpected end of statement; expected ')' or ','", None),
    ("topk 5 act where layer = 1 and", 31, "unexpected end of statement; expected a field name", None),
    ("topk 5 act of mlpp", 15, "unknown component 'mlpp'", "mlp"),
    ("topk 5 act of", 14, "unexpected end of statement; expected a component (mlp, attn, head, sae, embed)", None),
    ("topk 5 act,", 12, "unexpected end of statement; expected a scalar name", None),
    ("topk 5 act by layr", 15, "unknown group key 'layr'", "layer"),
    ("topk 5 act over prompts avg", 25, "unknown reduction 'avg' (one of mean, sum, max)", None),
    ("topk 5 act over mean", 17, "unexpected 'mean'; expected 'prompts'", None),
    ("topk 5 act ablate mlp[3]=0", 19, "mlp takes a layer and an index: mlp[L,I]", None),
    ("topk 5 act ablate resid[3,4]=0", 19, "resid takes a layer only: resid[L]", None),
    ("topk 5 act ablate mlp[1,2]=maen", 28, "unexpected 'maen'; expected a number or 'mean'", "mean"),
    ("topk 5 act ablate mlp[1,2]", 27, "unexpected end of statement; expected '='", None),
    ("topk 5 act ablate mlpx[1,2]=0", 19, "unknown node kind 'mlpx'", "mlp"),
    ("topk 5 act ablate mlp[1,2]@3:1=0", 19, "only attention takes a key token (@t:u), not mlp", None),
    ("topk 5 act trace mlp[1,2]@3 via q", 33, "'via q' applies to attention heads, not mlp", None),
    ("topk 5 act trace attn[1,2]@3 via z", 34, "unknown trace path 'z' (one of q, k, qk, v)", None),
    ("topk 5 act where layer = 1 where head = 2", 28, "'where' is given twice", None),
    ("topk 5 act as", 14, "unexpected end of statement; expected a table name", None),
    ("topk 5 act as t as u", 20, "'as' is given twice", None),
    ("topk 5 contribution(norm=2, norm=1)", 29, "parameter 'norm' is given twice", None),
    ("topk 5 act target", 18, "unexpected end of statement; expected a quoted string, 'logprob' or '('", None),
    ('topk 5 act target " Mary" vs', 29, "unexpected end of statement; expected a quoted string or '('", None),
    ("topk 5 act # layer", 12, "unexpected character '#'; expected 'ablate', 'as', 'by', 'of', 'over', 'patch', 'steer', 'target', 'trace', 'verify', 'where', '(', ',' or the end of the statement", None),
    ("model gpt2 dtype=fp8", 18, "unknown dtype 'fp8' (one of fp32, bf16, fp16)", None),
    ("model", 6, "unexpected end of statement; expected a model name or path or a quoted string", None),
    ("sae mlpp from 'x'", 5, "unknown autoencoder site 'mlpp'", "mlp"),
    ("sae mlp 'x'", 9, "unexpected 'x'; expected 'from'", None),
    ("prompt", 7, "unexpected end of statement; expected a quoted string or '('", None),
    ("prompt 'unterminated", 8, "unterminated string", None),
    ("prompts from ()", 14, "empty subquery: write prompts from (select ... from ...)", None),
    ("target logprob", 15, "unexpected end of statement; expected a quoted string or '('", None),
    ("set = 3", 5, "unexpected '='; expected a setting name", None),
    ("logits topk", 12, "unexpected end of statement; expected an integer", None),
    ("logits topk 3 topk 4", 20, "'topk' is given twice", None),
    ("logit_lens at resid.end", 15, "unexpected 'resid'; expected resid.pre, resid.mid or resid.post", None),
    ("logit_lens ln_f maybe", 17, "unknown ln_f setting 'maybe' (on or off)", None),
    ("upvoted mlp[1,2] topk 3 bottomk 2", 33, "give topk or bottomk, not both", None),
    ("upvoted blocks.1.mlp.hook_pots[3]", 9, "unknown hook name 'blocks.1.mlp.hook_pots'", "blocks.1.mlp.hook_post"),
    ("upvoted blocks.1.hook_resid_post[3]", 9, "blocks.1.hook_resid_post takes no index", None),
    ("upvoted blocks.1.mlp.hook_post", 9, "blocks.1.mlp.hook_post needs an index: blocks.1.mlp.hook_post[N]", None),
    ("routes threshold 1.5", 18, "threshold must be between 0 and 1, got 1.5", None),
    ("routes norm 3", 13, "norm must be 1 or 2, got 3", None),
    ("routes mode cells", 13, "unknown routes mode 'cells'", "cell"),
    ("routes from 3", 13, "unexpected '3'; expected 'token'", None),
    ("where layer = 1", 1, "'where' cannot start a statement; write the clause on the line of its query", None),
    ("upvoted block[3,1]", 9, "block takes a layer only: block[L]", None),
    ("topk 5 act trace attn[2]@1", 12, "attn takes a layer and an index: attn[L,I]", None),
    ("topk 5 act ablate blocks.1.hook_mlp_out=0", 19, "mlp takes a layer and an index: mlp[L,I]", None),
    ("topk 5 act where layer in 1..", 30, "unexpected end of statement; expected an integer", None),
    ("topk 5 act where layer in (1, x)", 31, "unexpected 'x'; expected an integer", None),
    ('prompt "a" "b"', 12, "unexpected \"b\"; expected 'corrupt', ',' or the end of the statement", None),
    ("topk 5 act of mlp attn", 19, "unexpected 'attn'; expected 'ablate', 'as', 'by', 'of', 'over', 'patch', 'steer', 'target', 'trace', 'verify', 'where', ',' or the end of the statement", None),
    ("model gpt2 dtype=bf16 dtype=fp16", 29, "'dtype' is given twice", None),
    ('topk 5 act target " a" vs " b" target " c"', 32, "'target' is given twice", None),
    ("select act of mlp where act > 0 extra", 33, "unexpected 'extra'; expected 'ablate', 'and', 'as', 'by', 'of', 'over', 'patch', 'steer', 'target', 'trace', 'verify', 'where' or the end of the statement", None),
    ("set x = ", 8, "unexpected end of statement; expected a number, a quoted string or a name", None),
    ("routes threshold", 17, "unexpected end of statement; expected a number", None),
    ("upvoted mlp[1,2] raw raw", 22, "'raw' is given twice", None),
]


@pytest.mark.parametrize("text, column, message, suggestion", BAD_LINES)
def test_bad_input_gives_message_and_column(text, column, message, suggestion):
    with pytest.raises(TdbqlError) as caught:
        parse(text)
    err = caught.value
    assert (err.message, err.line, err.column, err.suggestion) == (message, 1, column, suggestion)


def test_there_are_at_least_30_bad_inputs():
    assert len(BAD_LINES) >= 30


# Errors later in a program: line and column are those of the whole text.
BAD_PROGRAMS = [
    ("model default\nprompt 'a'\ntopk 5 act of mlpp", 3, 15, "unknown component 'mlpp'"),
    ("topk 5 act;  topk 5 gradd", 1, 21, "unknown scalar 'gradd'"),
    ("select * from q1\n  where x > 1;\ntopk x act", 3, 6, "unexpected 'x'; expected an integer"),
    ("prompts from (\n  select text\n  from t\n) extra", 4, 3, "unexpected 'extra'; expected the end of the statement"),
    ("topk 5 act\n  where layer = 1\n  by layr", 3, 6, "unknown group key 'layr'"),
    ("-- header\n\nlogits topk 0", 3, 13, "k must be at least 1, got 0"),
    ("topk 5 act; model", 1, 18, "unexpected end of statement; expected a model name or path or a quoted string"),
    ("prompt 'a'\nprompt \"b", 2, 8, "unterminated string"),
]


@pytest.mark.parametrize("text, line, column, message", BAD_PROGRAMS)
def test_errors_in_programs_point_into_the_whole_text(text, line, column, message):
    with pytest.raises(TdbqlError) as caught:
        parse(text)
    assert (caught.value.message, caught.value.line, caught.value.column) == (message, line, column)


def test_rendered_error_shows_the_line_and_a_caret_under_the_column():
    with pytest.raises(TdbqlError) as caught:
        parse("model default\ntopk 5 act_time_grad of mlp")
    assert str(caught.value) == (
        "2:8: unknown scalar 'act_time_grad'; did you mean 'act_times_grad'?\n"
        "    topk 5 act_time_grad of mlp\n"
        "           ^"
    )


def test_error_at_end_of_input_renders_without_failing():
    with pytest.raises(TdbqlError) as caught:
        parse("topk 5 act where\n")
    assert str(caught.value).endswith("    topk 5 act where\n                    ^")


@pytest.mark.parametrize("text", ["", "   ", ";;\n;", "-- only a comment", "\n\n-- a\n;"])
def test_empty_programs_have_no_statements(text):
    assert parse(text) == []
