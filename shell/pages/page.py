"""One self-contained HTML file: the page's style, its data as JSON, its script and, for the
pages that draw with plotly, plotly's whole offline bundle inlined, so the file opens from disk
with no network (an air-gapped lab, a CI artifact).

The scripts and the style live beside this module (`*.js`, `page.css`) and are read when a page
is written.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ...query.errors import TdbqlError

HERE = Path(__file__).parent
PLOTLY_MISSING = "the .html pages draw with plotly, which is not installed: pip install -e '.[html]'"


def plotly_js() -> str:
    """plotly.js, from the plotly package's offline bundle."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError as exc:
        raise TdbqlError(PLOTLY_MISSING) from exc
    return get_plotlyjs()


def finite(data: object) -> object:
    """NaN and infinities as null: JSON has no such numbers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def script_json(data: object) -> str:
    """JSON that can sit inside <script>: no `</` can close the element early."""
    return json.dumps(finite(data), allow_nan=False).replace("</", "<\\/")


def asset(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def html_page(title: str, body: str, data: object, script: str, *, plotly: bool) -> str:
    """The page: `body` (HTML) with `data` as the global PAGE_DATA, then `script` (a file beside
    this module) run after plotly when `plotly` is set."""
    library = f"<script>{plotly_js()}</script>\n" if plotly else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{asset('page.css')}</style>\n</head>\n<body>\n"
            f"{body}\n{library}<script>const PAGE_DATA = {script_json(data)};</script>\n"
            f"<script>{asset(script)}</script>\n</body>\n</html>\n")


def write_page(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise TdbqlError(f"cannot write '{path}': {exc.strerror or exc}") from exc
