"""Numbers and text the executor cannot hold are binding errors that name the allowed range
(query/checks.py ValueChecks), placed at the number or character they are about."""

from __future__ import annotations

import pytest
import torch
from tdbql.grammar.parse import parse
from tdbql.query.bind import bind
from tdbql.query.checks import FINITE_MAX, lone_surrogate, parse_size
from tdbql.query.errors import TdbqlError

from .test_bind import model, tokenize

BIG = 2**64


def bound(text: str, dtype: str = "fp32"):
    stmts = [bind(stmt, span, info=model(), tokenize=tokenize, tables=("prompts",), source=text, dtype=dtype)
             for stmt, span in parse(text)]
    return stmts[-1]


def error(text: str, dtype: str = "fp32") -> TdbqlError:
    with pytest.raises(TdbqlError) as caught:
        bound(text, dtype)
    return caught.value


def test_finite_max_is_torchs():
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert FINITE_MAX[name] == torch.finfo(dtype).max


@pytest.mark.parametrize("text, column, named", [
    (f"topk {BIG} act", 6, "K"),
    (f"topk 5 act where prompt = {BIG}", 27, "prompt"),
    (f"topk 5 act where prompt in (1, {BIG})", 32, "prompt"),
    (f"topk 5 act where prompt in 0..{BIG}", 31, "bound"),
    (f"logits where prompt = {BIG}", 23, "prompt"),
])
def test_integers_beyond_int64_name_the_range(text, column, named):
    err = error(text)
    assert err.message.startswith(f"{named} ")
    assert "-9223372036854775808..9223372036854775807 (int64)" in err.message
    assert (err.line, err.column) == (1, column)


def test_int64_limits_themselves_bind():
    assert bound(f"topk {2**63 - 1} act").k == 2**63 - 1
    assert bound(f"topk 5 act where prompt = {2**63 - 1}").where[0].value == 2**63 - 1


@pytest.mark.parametrize("text, written", [
    ("topk 5 act ablate mlp[1,1]=1e39", "1e39"),
    ("topk 5 act ablate mlp[1,1]=-1e400", "-1e400"),  # parsed as -inf
    ("topk 5 act where act > 1e400", "1e400"),
    ("topk 5 act where act > " + "1" + "0" * 40, "1" + "0" * 40),
])
def test_values_beyond_the_dtype_range_are_refused(text, written):
    err = error(text)
    assert err.message.startswith(f"{written} is out of range for ")
    assert "fp32: values are finite, -3.402823e+38..3.402823e+38" in err.message
    assert err.column == text.index(written) + 1


def test_the_range_is_the_model_dtypes():
    assert bound("topk 5 act ablate mlp[1,1]=60000", "fp16").ablations[0].value == 60000
    err = error("topk 5 act where act > 70000", "fp16")
    assert "a comparison with act in the model's fp16: values are finite, -65504..65504" in err.message
    assert bound("topk 5 act where act > 70000", "bf16").where[0].value == 70000


def test_a_scalar_compared_with_an_integer_beyond_int64_becomes_a_float():
    value = bound(f"topk 5 act where act > {10**20}").where[0].value
    assert isinstance(value, float) and value == 1e20
    assert bound("topk 5 act where act > 3").where[0].value == 3  # small integers stay as written


def test_non_finite_floats_elsewhere_are_refused():
    err = error("topk 5 contribution(norm=1) ablate attn[1,1]=1e400")
    assert "1e400 is out of range" in err.message


@pytest.mark.parametrize("text, column, what", [
    ('prompt "caf\udce9"', 12, "prompt"),
    ('prompt "ok" corrupt "\udcff"', 22, "corrupt prompt"),
    ('target " Mary" vs " J\udce9"', 22, "distractor"),
    ("select 'caf\udce9'", 12, "statement"),
    ("model 'caf\udce9'", 11, "name"),
])
def test_a_lone_surrogate_is_an_error_at_its_character(text, column, what):
    err = error(text)
    assert err.message.startswith(f"{what} holds an invalid character U+")
    assert "not UTF-8" in err.message and "write the text in UTF-8" in err.message
    assert err.column == column


def test_lone_surrogate_finds_the_first():
    assert lone_surrogate("abc") is None
    assert lone_surrogate("a\ud800b\udce9") == 1
    assert lone_surrogate("\U0001F600") is None  # a real astral character is not a surrogate


@pytest.mark.parametrize("device", ["meta", "xla", "cuda:x", "cpu:0:1", "CUDA"])
def test_unsupported_devices_are_refused(device):
    for text in (f"set device = '{device}'", f"model default device = '{device}'"):
        assert f"device '{device}' is not supported: use cpu, cuda, cuda:N or mps" in error(text).message


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_supported_devices_bind(device):
    assert bound(f"set device = '{device}'").value == device


@pytest.mark.parametrize("text, size", [
    ("8GB", 8 * 10**9), ("512 MiB", 512 * 2**20), ("1.5g", 15 * 10**8), ("2TiB", 2 * 2**40), ("100", 100),
    (4096, 4096), (1e9, 10**9), ("7 bytes", 7), ("1kb", 1000),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "8 XB", "1e400", True, 0, -5, 2.0**70, "8 GB GB"])
def test_parse_size_refuses(text):
    assert parse_size(text) is None
