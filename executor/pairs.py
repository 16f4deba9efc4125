"""Prompt pairs: each prompt and its `corrupt` version, as rows the executor runs."""

from __future__ import annotations

from collections.abc import Sequence

from ..query.context import PromptRow


def side(prompts: Sequence[PromptRow], which: str) -> list[PromptRow]:
    """The clean prompts, or the corrupt prompt of each pair as a row of its own (same id and target)."""
    if which == "clean":
        return list(prompts)
    return [p.model_copy(update={"text": p.corrupt, "corrupt": None}) for p in prompts]


def other(source: str) -> str:
    return "corrupt" if source == "clean" else "clean"
