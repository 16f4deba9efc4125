"""The interactive shell: the real `tdbql` console script in a pseudo-terminal (pexpect), plus the
pure pieces (Enter rule, completion adapter, history location)."""

from __future__ import annotations

import time

import pexpect
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from pygments.token import Comment, Keyword, Name, Number, String
from tdbql.shell.lexer import TdbqlLexer
from tdbql.shell.meta import REGISTRY
from tdbql.shell.repl import (
    TdbqlCompleter,
    history_path,
    last_significant_char,
    open_parens,
    should_submit,
    toolbar_text,
)

IOI = "When Mary and John went to the store, John gave a drink to"


def spawn(tdbql_bin: str, args: list[str], env: dict[str, str]) -> pexpect.spawn:
    env = {**env, "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(tdbql_bin, args, env=env, encoding="utf-8", dimensions=(60, 200), timeout=120)
    child.expect("tdbql>")
    return child


def test_repl_end_to_end(tdbql_bin, tiny_model_dir, cli_env, tmp_path):
    child = spawn(tdbql_bin, ["--model", str(tiny_model_dir)], cli_env)
    try:
        child.send(f'prompt "{IOI}"\r')
        child.expect("1 prompt")
        child.send('target " Mary" vs " John"\r')
        child.expect("target: logit")
        child.send("topk 4 act_ti")
        child.send("\t")  # completes the scalar name
        child.send(" of mlp\r")
        child.expect(r"act_times_grad.*\(4 rows\)")
        child.send("select count(*) as n\r")  # SQL waits for ';' on a new line
        child.send("from q1;\r")
        child.expect(r"\(1 row\)")
        child.send("topk 3 act where layer = 99\r")  # an error keeps the session
        child.expect("layer")
        child.send(".tables\r")
        child.expect("prompts")
        child.expect("q1")
        child.send(".quit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    history = (tmp_path / "config" / "tdbql" / "history").read_text()
    assert "+topk 4 act_times_grad of mlp\n" in history
    assert "+select count(*) as n\n+from q1;\n" in history
    assert "+.tables\n" in history


def cancel_a_long_query(child, tries: int = 3) -> float | None:
    """Start minutes of DuckDB work (a scan DuckDB checks for Python signals only between tasks),
    then Ctrl-C; the seconds until "cancelled". On a loaded machine the Ctrl-C can reach the
    prompt before Enter was handled (that only clears the input), so try again a few times."""
    for _ in range(tries):
        child.send("select count(*) from range(100000000000) a;\r")
        time.sleep(2.0)
        started = time.perf_counter()
        child.sendintr()
        if child.expect(["cancelled", pexpect.TIMEOUT], timeout=15) == 0:
            return time.perf_counter() - started
    return None


def test_ctrl_c_cancels_input_and_sql_and_ctrl_d_quits(tdbql_bin, cli_env):
    child = spawn(tdbql_bin, ["--model", "unused"], cli_env)
    try:
        child.send("select 1 as half_typed")
        child.sendintr()
        child.expect("tdbql>")
        for _ in range(2):  # twice: a cancelled statement leaves nothing behind for the next one
            seconds = cancel_a_long_query(child)
            assert seconds is not None, "Ctrl-C never cancelled a running query"
            assert seconds < 2.5, f"cancelling took {seconds:.1f} s"
            child.expect("tdbql>")
            child.send("select 2 as two;\r")
            child.expect(r"two.*\(1 row\)")
            child.expect("tdbql>")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_bottom_toolbar_shows_the_session(tdbql_bin, tiny_model_dir, cli_env, tmp_path):
    """The toolbar needs the terminal's answer to a cursor-position request, so give one."""
    env = {k: v for k, v in cli_env.items() if k != "PROMPT_TOOLKIT_NO_CPR"}
    db = tmp_path / "t.duckdb"
    child = pexpect.spawn(tdbql_bin, ["--model", str(tiny_model_dir), "--db", str(db)], env=env, encoding="utf-8",
                          dimensions=(30, 200), timeout=120)
    try:
        child.expect(r"\x1b\[6n")
        child.send("\x1b[5;1R")
        child.expect_exact(f"model: {tiny_model_dir} (not loaded) | device: cpu | prompts: 0 | db: {db}")
        child.send(".quit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()


@pytest.mark.parametrize(
    "text, submit",
    [
        ("", True),
        (".tables", True),
        ("\\dt", True),
        ("  \\x auto", True),
        ("help", True),
        ("quit", True),
        ("topk 5 act", True),
        # complete but wrong: a tdbql statement ends with its line, so Enter shows the error
        ("topk 5 act of", True),
        ("topk 10 act_tims_grad", True),
        ("tpok 10 act", True),
        ("of mpl", True),
        ('prompt "open', True),  # a tdbql string cannot span lines
        ("topk 5 act\nwhere layer = 1", True),
        ("upvoted attn[$layer,0]@-1 topk 5", True),
        ("topk 5 act where layer = $nope", True),  # an undefined parameter is an error to show
        # unfinished: what a next line can finish
        ("select count(*) from q1", False),  # SQL waits for ';'
        ("select ';' as x", False),
        ("select 'it''s\n", False),  # an open SQL string
        ("select 1 /* still", False),
        ("prompts from (select text as prompt", False),  # an open parenthesis
        ("topk 5 contribution(", False),
        ("select count(*)\nfrom q1;", True),
        ("select 1; -- done", True),
        ('prompt "a;b"', True),
        ("select 1;\ntopk 10 act_tims_grad", True),
    ],
)
def test_enter_rule(text, submit):
    assert should_submit(text, {"layer": "1"}) is submit


def test_parameters_are_filled_before_the_enter_rule():
    assert should_submit("select $x", {"x": "1;"}) is True
    assert should_submit("select $x", {"x": "1"}) is False


def test_open_parens():
    assert open_parens("prompts from (select '(' ") == 1
    assert open_parens("f(a, (b))") == 0


def test_last_significant_char():
    assert last_significant_char("select 1; -- c") == ";"
    assert last_significant_char("select ';'") == "'"
    assert last_significant_char("select 'open") == ""


def test_completer_replaces_the_partial_word():
    names = {"scalars": ("act", "act_times_grad", "grad"), "table_columns": {"q1": ["layer"], "queries": ["text"]},
             "meta": REGISTRY, "files": lambda prefix: [p for p in ("data/ioi.tql", "data/x.csv") if p.startswith(prefix)]}
    completer = TdbqlCompleter(lambda: names)

    def completions(text: str) -> list[tuple[str, int]]:
        doc = Document(text, cursor_position=len(text))
        return [(c.text, c.start_position) for c in completer.get_completions(doc, CompleteEvent())]

    assert completions("topk 5 act_ti") == [("act_times_grad", -6)]
    assert {"q1", "queries"} <= {text for text, _ in completions("select * from q")}
    assert completions(".read data/i") == [("data/ioi.tql", -len("data/i"))]
    assert completions("\\d") == [("\\dt", -2)]  # the exact word is not offered again
    assert completions(".sch") == [(".schema", -4)]


def test_history_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert history_path() == tmp_path / "tdbql" / "history"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert history_path() == tmp_path / "home" / ".config" / "tdbql" / "history"


def lexed(text: str) -> dict[str, object]:
    return {value: token for token, value in TdbqlLexer().get_tokens(text) if value.strip()}


def test_lexer_covers_dsl_sql_meta_and_params():
    tokens = lexed('topk 5 act_times_grad of mlp where layer = $k ablate mlp[3,1024]@-1=0 -- note')
    assert tokens["topk"] in Keyword and tokens["where"] in Keyword and tokens["ablate"] in Keyword
    assert tokens["act_times_grad"] in Name.Function
    assert tokens["mlp"] in Name.Class
    assert tokens["$k"] in Name.Variable
    assert tokens["5"] in Number
    assert tokens["-- note"] in Comment
    sql = lexed("SELECT token FROM q1 WHERE text = 'a b'")
    assert sql["SELECT"] in Keyword and sql["FROM"] in Keyword and sql["'a b'"] in String
    assert lexed(".tables")[".tables"] in Keyword.Pseudo
    assert lexed("\\dt")["\\dt"] in Keyword.Pseudo and lexed("help")["help"] in Keyword.Pseudo
    assert lexed('target " Mary" vs " John"')['" Mary"'] in String


def test_lexer_keywords_come_from_the_grammar():
    from tdbql.grammar.parse import KEYWORDS

    for word in KEYWORDS:
        [(token, value)] = [(t, v) for t, v in TdbqlLexer().get_tokens(word) if v.strip()]
        assert token in Keyword, word


def test_toolbar_names_model_device_compile_prompts_and_db():
    from tdbql.shell.session import Session

    session = Session(model="default")
    assert toolbar_text(session) == " model: default (not loaded) | device: cpu | prompts: 0 | db: memory | .help "
    session.execute("set compile = on")
    assert "device: cpu (compile on) |" in toolbar_text(session)
    session.close()
