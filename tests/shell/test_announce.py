"""A slow model load is announced once it passes half a second, then timed; a fast one is silent."""

from __future__ import annotations

import re
import time

from tdbql.shell import announce as announce
from tdbql.shell.announce import announced
from tdbql.shell.session import Session


def test_a_fast_block_says_nothing():
    notes: list[str] = []
    with announced(notes.append, "loading ...", "loaded"):
        pass
    time.sleep(announce.SLOW_LOAD_S + 0.2)  # a timer left running would speak now
    assert notes == []


def test_a_slow_block_is_announced_then_timed():
    notes: list[str] = []
    with announced(notes.append, "loading ...", "loaded"):
        time.sleep(announce.SLOW_LOAD_S + 0.3)
    assert notes[0] == "loading ..." and re.fullmatch(r"loaded in \d+\.\d s", notes[1]) and len(notes) == 2


def test_the_session_announces_its_model_load(monkeypatch):
    monkeypatch.setattr(announce, "SLOW_LOAD_S", 0.0)
    notes: list[str] = []
    session = Session(model="default", notify=notes.append)
    session.execute('prompt "When Mary and John went to the store"')
    assert notes[0] == "loading model default (fp32, cpu) ..."
    assert notes[1].startswith("model default loaded in ")
    session.close()
