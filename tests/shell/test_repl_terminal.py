"""The REPL as a person meets it in a real pseudo-terminal (pexpect): Enter shows errors at once,
psql aliases and `help`, `.plot` options, and node tables that fit an 80-column terminal."""

from __future__ import annotations

import re

import pexpect

IOI = "When Mary and John went to the store, John gave a drink to"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def spawn(tdbql_bin: str, args: list[str], env: dict[str, str], rows: int = 60, columns: int = 200) -> pexpect.spawn:
    env = {**env, "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(tdbql_bin, args, env=env, encoding="utf-8", dimensions=(rows, columns), timeout=120)
    child.expect("tdbql>")
    return child


def after_one_enter(child: pexpect.spawn, line: str, expected: str) -> None:
    """Type `line` and Enter once: `expected` must come before any continuation prompt."""
    child.send(line + "\r")
    assert child.expect([expected, r"\.\.\.>"]) == 0, f"{line!r} waited for more input"
    child.expect("tdbql>")


def test_enter_shows_the_error_of_a_complete_line_at_once(tdbql_bin, cli_env):
    child = spawn(tdbql_bin, ["--model", "unused"], cli_env)
    try:
        after_one_enter(child, "topk 10 act_tims_grad", "did you mean 'act_times_grad'")
        after_one_enter(child, "tpok 10 act", "unknown statement 'tpok'")
        after_one_enter(child, "of mpl", "'of' cannot start a statement")
        after_one_enter(child, "topk 5 act where layer = $nope", r"undefined parameter \$nope")
        child.send("select 41 + 1\r")  # SQL without ';' goes on
        child.expect(r"\.\.\.>")
        child.send("  as answer;\r")
        child.expect(r"answer.*42.*\(1 row\)")
        child.send(".quit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_psql_aliases_help_and_parameters(tdbql_bin, tiny_model_dir, cli_env):
    child = spawn(tdbql_bin, ["--model", str(tiny_model_dir)], cli_env)
    try:
        after_one_enter(child, f'prompt "{IOI}"', "1 prompt")
        after_one_enter(child, "\\dt", r"corrupt_tokens\s+prompts\s+queries\s+tokens")
        after_one_enter(child, "\\d prompts", r"prompts\(prompt_id BIGINT")
        after_one_enter(child, "help", r"\.tables\s+List tables")
        after_one_enter(child, "\\?", r"\.plot \[TABLE\]")
        after_one_enter(child, "help plot", r"\.plot \[TABLE\] \[--kind K\]")
        child.send(".param layer 1\r")
        child.expect(r"\$layer = 1")
        after_one_enter(child, "upvoted attn[$layer,0]@-1 topk 5", r"\(5 rows\)")
        child.send(".quit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_plot_reads_its_options_in_the_repl(tdbql_bin, tiny_model_dir, cli_env, tmp_path):
    child = spawn(tdbql_bin, ["--model", str(tiny_model_dir)], cli_env)
    out = tmp_path / "x.png"
    try:
        after_one_enter(child, f'prompt "{IOI}"', "1 prompt")
        after_one_enter(child, "logit_lens topk 1 as t", r"\(\d+ rows")
        after_one_enter(child, f".plot t --to {out} --kind bars -- a comment", re.escape(f"wrote {out} (bars: "))
        child.send(".quit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_node_table_fits_80_columns_without_the_pager(tdbql_bin, tiny_model_dir, cli_env, tmp_path):
    marker = tmp_path / "paged"
    env = {**cli_env, "PAGER": f"touch {marker}; cat"}
    env.pop("COLUMNS", None)
    child = spawn(tdbql_bin, ["--model", str(tiny_model_dir)], env, rows=24, columns=80)
    try:
        after_one_enter(child, f'prompt "{IOI}"', "1 prompt")
        after_one_enter(child, 'target " Mary" vs " John"', "target: logit")
        child.send("topk 10 act_times_grad\r")
        child.expect(r"\(10 rows\)")
        shown = ANSI.sub("", child.before).replace("\r", "")
        child.expect("tdbql>")
        child.send(".quit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    lines = shown[shown.index("node"):].rstrip("\n").splitlines()
    header, rows = lines[0], lines[2:]
    assert header.split()[:3] == ["node", "tokens", "act_times_grad"]
    assert len(rows) == 10 and all(len(line) <= 80 for line in lines)
    end = header.index("act_times_grad") + len("act_times_grad")  # numbers are right-aligned under it
    values = [float(row[:end].split()[-1]) for row in rows]
    assert values == sorted(values, reverse=True)
    assert all(re.match(r"(attn|mlp|head|mlp_sae|attn_sae|embed)\S*\[\d+,\d+\]@\d+", row) for row in rows)
    assert not marker.exists()
