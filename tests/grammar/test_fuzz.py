"""Property: any input gives plans or one TdbqlError, never another exception.

10,000 generated inputs: random text, token soup built from the grammar's own words, mutations
of valid statements (fixture inputs and documentation examples), and valid statements with their
numbers and names replaced. Whatever parses is
also bound against a small model, which must likewise return a plan or raise TdbqlError.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tdbql.grammar.parse import KEYWORDS, parse
from tdbql.query.bind import bind
from tdbql.query.catalog import SCALAR_NAMES as SCALARS
from tdbql.query.errors import TdbqlError

from tests.grammar.lang_helpers import fake_tokenize, tiny_model_info

ROOT = Path(__file__).parents[2]
INFO = tiny_model_info()


def valid_statements() -> list[str]:
    fixture_inputs = [
        line
        for path in sorted((ROOT / "tests" / "fixtures" / "plans").glob("*.txt"))
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "{", "["))
    ]
    doc = (ROOT / "docs" / "language.md").read_text()
    examples = [block for block in re.findall(r"```tql\n(.*?)```", doc, flags=re.DOTALL)]
    return fixture_inputs + examples


VALID = valid_statements()
WORDS = sorted(KEYWORDS) + list(SCALARS) + [
    "mlp", "attn", "head", "sae", "mlp_sae", "embed", "resid", "block", "layer", "token", "prompt",
    "mlp[1,2]", "attn[0,3]@-1:0", "sae[2,5]@3", "resid[1]", "blocks.1.mlp.hook_post[7]", "resid.mid",
    "0", "1", "-1", "99", "0.5", "1e3", "3..7", "(", ")", ",", "=", "!=", "<=", "@", ":", "[", "]",
    "'x'", '" Mary"', '" Maryanne"', "--", ";", "\n", "on", "off", "mean", "q", "from", "q1",
]
ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_ABC0123456789 \t\n[](),;:@=<>!.-'\"*/#\\$%é"))

random_text = st.text(ALPHABET, max_size=60)
token_soup = st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join)


@st.composite
def mutated(draw) -> str:
    text = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 3))):
        if not text:
            break
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["delete", "insert", "word", "cut", "swap"]))
        if kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 4)) :]
        elif kind == "insert":
            text = text[:at] + draw(st.text(ALPHABET, min_size=1, max_size=3)) + text[at:]
        elif kind == "word":
            text = text[:at] + " " + draw(st.sampled_from(WORDS)) + " " + text[at:]
        elif kind == "cut":
            text = text[:at]
        else:
            words = text.split(" ")
            i, j = draw(st.integers(0, len(words) - 1)), draw(st.integers(0, len(words) - 1))
            words[i], words[j] = words[j], words[i]
            text = " ".join(words)
    return text


@st.composite
def renumbered(draw) -> str:
    """A valid statement with its numbers and names replaced: reaches the binder's range checks."""
    text = draw(st.sampled_from(VALID))
    numbers = st.integers(-300, 2000).map(str)
    text = re.sub(r"(?<![\w.])-?\d+(?![\w.])", lambda m: draw(numbers) if draw(st.booleans()) else m[0], text)
    names = st.sampled_from(WORDS[: len(KEYWORDS) + len(SCALARS) + 11])
    return re.sub(r"\b(act\w*|mlp|attn|layer|head|token)\b", lambda m: draw(names) if draw(st.booleans()) else m[0], text)


def check(text: str) -> None:
    try:
        statements = parse(text)
    except TdbqlError as err:
        assert err.line is None or 1 <= err.line <= text.count("\n") + 1
        str(err)  # renders
        return
    for stmt, span in statements:
        assert 0 <= span.start_pos <= span.end_pos <= len(text)
        try:
            bind(stmt, span, info=INFO, tokenize=fake_tokenize, tables=("prompts", "q1"), source=text)
        except TdbqlError as err:
            str(err)


@settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.one_of(random_text, token_soup, mutated(), renumbered()))
def test_any_input_gives_plans_or_a_tdbql_error(text):
    check(text)


def test_the_mutation_corpus_is_valid_to_start_with():
    assert len(VALID) >= 100
    for text in VALID:
        parse(text)
