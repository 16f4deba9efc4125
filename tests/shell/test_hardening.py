"""Hardening of the session: its own tables survive users and crashes, positions past every
prompt are errors, and --safe reaches no network and no local path (docs/safety.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest
from tdbql.query.errors import TdbqlError
from tdbql.shell.session import Session

IOI = "When Mary and John went to the store, John gave a drink to"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def session(tiny_model_dir):
    s = Session(model=str(tiny_model_dir))
    s.execute(f'prompt "{IOI}"; target " Mary" vs " John"')
    yield s
    s.close()


def rows(session: Session, sql: str) -> list[tuple]:
    return session.con.sql(sql).fetchall()


def error(session: Session, text: str) -> TdbqlError:
    with pytest.raises(TdbqlError) as caught:
        session.execute(text)
    return caught.value


# --- the session's own tables ---


def test_a_dropped_queries_table_is_recreated(session):
    session.execute("topk 3 act; drop table queries")
    [result] = session.execute("topk 2 act")
    assert result.table.num_rows == 2
    assert rows(session, "SELECT query_id, table_name, rows FROM queries") == [(1, result.table_name, 2)]


def test_a_queries_table_of_another_shape_is_refused_until_dropped(session):
    session.execute("drop table queries; create view queries as select 1 as x")
    err = error(session, "topk 2 act")
    assert "table queries, which now holds (x INTEGER)" in err.message and "drop view queries" in err.message
    assert "q1" not in session.table_names()
    session.execute("drop view queries")
    assert session.execute("topk 2 act")[0].table.num_rows == 2


def test_dropped_prompt_tables_are_rewritten_before_the_next_query(session):
    session.execute("drop table prompts; drop table tokens")
    session.execute("topk 2 act")
    assert rows(session, "SELECT text FROM prompts") == [(IOI,)]
    assert rows(session, "SELECT count(*) FROM tokens")[0][0] == len(session.loaded.encode(IOI))


def test_a_failed_result_write_leaves_neither_table_nor_queries_row(session):
    session.execute("topk 3 act as kept; create view blocked as select 1 as x")
    error(session, "topk 2 act as blocked")  # CREATE OR REPLACE TABLE over a view fails inside the transaction
    assert rows(session, "SELECT table_name FROM queries") == [("kept",)]
    assert rows(session, "SELECT count(*) FROM _")[0][0] == 3  # `_` still over kept
    assert rows(session, "SELECT * FROM blocked") == [(1,)]


def test_inside_a_users_transaction_the_writes_join_it(session):
    session.execute("begin")
    session.execute("topk 2 act as inside")
    assert "inside" in session.table_names()
    session.execute("rollback")
    assert "inside" not in session.table_names()
    assert rows(session, "SELECT count(*) FROM queries")[0][0] == 0


def test_a_database_whose_prompts_table_is_not_a_prompt_set_still_opens(tiny_model_dir, tmp_path):
    db = str(tmp_path / "s.duckdb")
    con = duckdb.connect(db)
    con.execute("create table prompts as select 1 as x")
    con.close()
    s = Session(model=str(tiny_model_dir), db=db)
    try:
        err = error(s, "logits topk 1")
        assert "no prompts yet" in err.message and "table prompts of" in err.message
        s.execute('prompt "The cat"')
        assert s.execute("logits topk 1")[0].table.num_rows == 2
    finally:
        s.close()


# --- positions past every prompt ---


@pytest.mark.parametrize("query", [
    "logits where token = 50", "topk 5 act where token = 50", "select act of mlp where token in (40, 41)",
    "topk 5 act of attn where attended >= 30", "logit_lens where token = -40", "topk 5 act where token in 30..40",
])
def test_a_position_past_every_prompt_is_an_error_like_an_ablation_there(session, query):
    n = len(session.loaded.encode(IOI))
    err = error(session, query)
    assert f"selects no position: the longest prompt has {n} tokens (positions 0..{n - 1}, or {-n}..-1" in err.message
    assert err.column == query.index("token" if "token" in query else "attended") + 1
    assert f"outside prompt 0 ({n} tokens)" in error(session, "topk 5 act ablate mlp[1,2]@50=0").message


def test_a_position_some_prompts_have_filters_the_others(session):
    session.execute(f'prompt "{IOI}", "The cat"')
    short = len(session.loaded.encode("The cat"))
    table = session.execute(f"select act of mlp where token = {short + 1} and layer = 0")[0].table
    assert set(table.column("prompt_id").to_pylist()) == {0}
    assert session.execute("topk 3 act where token in -60..-1")[0].table.num_rows == 3


def test_a_prompt_id_past_the_set_is_an_error(session):
    assert "prompt = 3 selects no prompt: the prompt set has one prompt (id 0)" in error(
        session, "topk 3 act where prompt = 3").message
    assert session.execute("topk 3 act where prompt in (0, 7)")[0].table.num_rows == 3


# --- --safe: no network, no existence oracle, `default` is the embedded model ---


class _Hub(ThreadingHTTPServer):
    """A stand-in for the hub: records every connection and request, answers 404."""

    def __init__(self):
        self.connections = 0
        self.requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805 -- the handler's own self
                self.requests.append(handler.path)
                handler.send_error(404)

            do_HEAD = do_GET

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def verify_request(self, request, client_address) -> bool:
        self.connections += 1
        return True


@pytest.fixture
def hub(tmp_path):
    server = _Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdbql.shell.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


@pytest.fixture
def hub_env(hub, cli_env, tmp_path) -> dict:
    env = dict(cli_env)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{hub.server_address[1]}", HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf"))
    return env


def test_safe_never_contacts_the_hub(hub, hub_env, tmp_path):
    for name in ("some-org/some-model", "gpt2-small"):
        done = _cli(["--safe", "-c", f"model {name}"], hub_env, tmp_path)
        assert done.returncode == 1 and "not in the local Hugging Face cache" in done.stderr
    done = _cli(["--safe", "--model", "org/cli-model", "-c", "select 1; logits topk 1"], hub_env, tmp_path)
    assert done.returncode == 1 and "(--safe: no downloads)" in done.stderr
    assert hub.connections == 0 and hub.requests == []


def test_without_safe_the_stand_in_hub_is_asked(hub, hub_env, tmp_path):
    """The listener does see a session that may download (so the test above can fail)."""
    pytest.importorskip("huggingface_hub")
    done = _cli(["-c", "model some-org/some-model"], hub_env, tmp_path)
    assert done.returncode == 1 and "some-org/some-model" in done.stderr
    assert hub.connections >= 1


def test_safe_refuses_every_path_with_one_message(tiny_model_dir, cli_env, tmp_path):
    (tmp_path / "secret").write_text("x")
    messages = set()
    for path in ("/etc/shadow", "/nonexistent", str(tmp_path / "secret"), str(tiny_model_dir), "./nothing"):
        for statement in (f"model '{path}'", f"sae mlp from '{path}'"):
            done = _cli(["--safe", "-c", statement], cli_env, tmp_path)
            assert done.returncode == 1
            messages.add(done.stderr.replace(path, "PATH").splitlines()[0])
    assert len(messages) == 2, messages  # one for models, one for autoencoders


def test_model_default_is_the_embedded_model_beside_a_folder_named_default(cli_env, tmp_path):
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "config.json").write_text("{}")
    for args in (["--safe"], []):
        done = _cli([*args, "-c", "model default"], cli_env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("model default (gpt2: 4 layers")


# --- kill -9 between the writes of one transaction ---

_CHILD = textwrap.dedent("""
    import sys, time
    from tdbql.shell import tables
    from tdbql.shell.session import Session

    session = Session(model=sys.argv[1], db=sys.argv[2])
    session.execute('prompt "When Mary and John went to the store"; target " Mary" vs " John"; topk 3 act as old')
    store, writes = tables.store, []

    def store_then_pause(con, name, table):
        store(con, name, table)
        writes.append(name)
        if len(writes) == 1:  # the first table is written, the transaction is open
            print("paused", flush=True)
            time.sleep(60)

    tables.store = store_then_pause
    session.execute(sys.argv[3])
""")


@pytest.mark.parametrize("statement", [
    'prompt "The cat sat on the mat", "The dog sat"',  # prompts, tokens, corrupt_tokens
    "topk 5 act as new",  # the result table, `_` and the queries row
    "topk 4 act as old",  # a result table replaced
])
def test_kill_9_between_the_writes_leaves_the_previous_state(tiny_model_dir, tmp_path, statement):
    db = tmp_path / "s.duckdb"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tiny_model_dir), str(db), statement],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "paused", child.stderr.read()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    s = Session(model=str(tiny_model_dir), db=str(db))
    try:
        assert [p.text for p in s.prompts] == ["When Mary and John went to the store"]
        assert rows(s, "SELECT count(DISTINCT prompt_id) FROM tokens") == [(1,)]
        assert rows(s, "SELECT n_tokens FROM prompts")[0][0] == rows(s, "SELECT count(*) FROM tokens")[0][0]
        assert rows(s, "SELECT table_name, rows FROM queries") == [("old", 3)]
        assert rows(s, "SELECT count(*) FROM old") == [(3,)] and "new" not in s.table_names()
        assert rows(s, "SELECT count(*) FROM _") == [(3,)]
    finally:
        s.close()
