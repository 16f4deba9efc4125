"""The binder's checks of the parts statements share: where an error points in the text, ranges
(layers, heads, neurons, latents, tokens, vocabulary), node references in ablations, traces and
patches, losses (single-token targets) and the tables of a SQL subquery. bind.py visits the
statements; this is the only other place that checks names and ranges.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

from . import catalog
from .catalog import COMPONENTS, LATENTS, SCALARS
from .context import ModelInfo
from .errors import TdbqlError, nearest
from .plan import Ablation, Condition, Loss, ModelStmt, Node, NodeRef, Patch, Range, SetStmt, Span, Trace

INT64 = (-(2**63), 2**63 - 1)  # what the executor's counts, ids and positions are held in
# the largest finite value of each model dtype (torch.finfo(...).max; query/ does not import torch)
FINITE_MAX = {"fp32": 3.4028234663852886e38, "bf16": 3.3895313892515355e38, "fp16": 65504.0}
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d{1,3})?|mps")
DEVICES = "cpu, cuda, cuda:N or mps"
# a number literal, alone or as a bound of a range `lo..hi` (not the 5 of 1.5)
ALONE_BEFORE, ALONE_AFTER = r"(?:(?<![\w.])|(?<=\.\.))", r"(?:(?![\w.])|(?=\.\.))"
NUMBER = re.compile(ALONE_BEFORE + r"-?(?:\d+\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+)" + ALONE_AFTER)
SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b|bytes)?\s*", re.IGNORECASE)


class Checks:
    def __init__(self, info: ModelInfo | None, tokenize: Callable[[str], list[int]] | None,
                 tables: Collection[str], span: Span | None, source: str | None):
        self.info, self.tokenize, self.span, self.source = info, tokenize, span, source
        self.tables = {name.lower() for name in tables}
        self.sae_layers: dict[str, dict[int, int]] = {}
        for site, layer, n_latents in info.sae_latents if info else ():
            self.sae_layers.setdefault(catalog.latent_component(site), {})[layer] = n_latents

    # --- errors, placed at the text they are about when the source is known ---

    def fail(self, message: str, near: str | None = None, suggestion: str | None = None) -> TdbqlError:
        pos = self._locate(near) if near else None
        if pos is None:
            line, column = (self.span.line, self.span.column) if self.span else (None, None)
        else:
            line = self.source.count("\n", 0, pos) + 1
            column = pos - (self.source.rfind("\n", 0, pos) + 1) + 1
        return TdbqlError(message, line=line, column=column, source=self.source, suggestion=suggestion)

    def _locate(self, pattern: str) -> int | None:
        if self.source is None or self.span is None:
            return None
        body = self.source[self.span.start_pos : self.span.end_pos]
        match = re.search(pattern, body, flags=re.IGNORECASE | re.DOTALL)
        if match is None:
            return None
        return self.span.start_pos + (match.start("at") if "at" in match.re.groupindex else match.start())

    def fail_at(self, pos: int, message: str) -> TdbqlError:
        """An error at offset `pos` of the source (the statement's start when it is unknown)."""
        if self.source is None or not 0 <= pos < len(self.source):
            return self.fail(message)
        line = self.source.count("\n", 0, pos) + 1
        column = pos - (self.source.rfind("\n", 0, pos) + 1) + 1
        return TdbqlError(message, line=line, column=column, source=self.source)

    def loaded_latents(self) -> tuple[str, ...]:
        return tuple(c for c in LATENTS if c in self.sae_layers)

    # --- ranges ---

    def in_range(self, value: int, limit: int, what: str, why: str, near: str | None) -> None:
        if not 0 <= value < limit:
            raise self.fail(f"{what} is out of range: {why} (0..{limit - 1})", near)

    def layer(self, layer: int, near: str | None) -> None:
        n = self.info.n_layers
        self.in_range(layer, n, f"layer {layer}", f"the model has {n} layers", near)

    def token(self, token: int, what: str, near: str | None) -> None:
        n_ctx = self.info.n_ctx
        if not -n_ctx <= token < n_ctx:
            raise self.fail(
                f"{what} {token} is out of range: the model reads at most {n_ctx} tokens "
                f"({-n_ctx}..{n_ctx - 1}, negative counts from the end)", near,
            )

    def vocab_k(self, k: int) -> int:
        if k > self.info.vocab_size:
            raise self.fail(f"topk {k} is more than the vocabulary ({self.info.vocab_size} tokens)", r"\btopk\b")
        return k

    def positions(self, where: Collection[Condition], lengths: Collection[int], n_prompts: int) -> None:
        """A `token` or `attended` condition that no position of any prompt passes (`lengths`:
        the prompts' token counts), or a `prompt` condition no prompt id passes, is an error, as
        `ablate mlp[1,2]@50` is; one that some prompts pass filters the others silently."""
        for cond in where:
            if cond.field in ("token", "attended") and lengths and not any(_selects(cond, n) for n in set(lengths)):
                n = max(lengths)
                raise self.fail(f"{cond.field} {_shown(cond)} selects no position: the longest prompt has {n} tokens "
                                f"(positions 0..{n - 1}, or {-n}..-1 from the end)",
                                rf"\bwhere\b.*?(?P<at>\b{cond.field}\b)")
            if cond.field == "prompt" and n_prompts and not _selects(cond, n_prompts, relative=False):
                ids = f"{n_prompts} prompts (ids 0..{n_prompts - 1})" if n_prompts > 1 else "one prompt (id 0)"
                raise self.fail(f"prompt {_shown(cond)} selects no prompt: the prompt set has {ids}",
                                r"\bwhere\b.*?(?P<at>\bprompt\b)")

    # --- node references, ablations, traces ---

    def node_ref(self, node: NodeRef) -> NodeRef:
        near = rf"(\b{re.escape(node.component)}|blocks\.{node.layer}\.)"
        component = node.component
        if component == catalog.SAE_WORD:
            component = self.resolve_sae(node, near)
        self.layer(node.layer, near)
        if node.index is None:  # resid[L], block[L], or a whole sublayer write mlp[L] / attn[L]
            pass
        elif component == "mlp":
            limit = self.info.d_mlp
            self.in_range(node.index, limit, f"neuron {node.index}", f"MLP layers have {limit} neurons", near)
        elif component == "attn":
            self.in_range(node.index, self.info.n_heads, f"head {node.index}", f"the model has {self.info.n_heads} heads", near)
        elif component in LATENTS:
            self.latent(component, node, near)
        for token in (node.token, node.key):
            if token is not None:
                self.token(token, "token", near)
        if node.token is not None and node.key is not None and (node.token < 0) == (node.key < 0) and node.key > node.token:
            raise self.fail(f"key token {node.key} comes after query token {node.token}; attention only looks back", near)
        return node if component == node.component else node.model_copy(update={"component": component})

    def resolve_sae(self, node: NodeRef, near: str) -> str:
        loaded = [c for c in self.loaded_latents() if node.layer in self.sae_layers[c]]
        if len(loaded) == 1:
            return loaded[0]
        if not loaded:
            raise self.fail(f"no autoencoder is loaded at layer {node.layer}: load one with `sae mlp from 'path'`", near)
        written = " or ".join(f"{c}[{node.layer},{node.index}]" for c in loaded)
        raise self.fail(f"sae[{node.layer},{node.index}] is ambiguous: write {written}", near)

    def latent(self, component: str, node: NodeRef, near: str) -> None:
        site = COMPONENTS[component].site
        layers = self.sae_layers.get(component, {})
        if node.layer not in layers:
            have = f" (loaded at layers {', '.join(map(str, sorted(layers)))})" if layers else ""
            raise self.fail(f"no {site} autoencoder is loaded at layer {node.layer}{have}", near)
        n = layers[node.layer]
        self.in_range(node.index, n, f"latent {node.index}", f"the {site} autoencoder at layer {node.layer} has {n} latents", near)

    def ablation(self, ablation: Ablation) -> Ablation:
        if catalog.NODE_REFS[ablation.node.component] == "none":
            kind = ablation.node.component
            raise self.fail(f"{kind} cannot be ablated: ablate MLP neurons, attention heads or latents", rf"\b{kind}\b")
        return ablation.model_copy(update={"node": self.node_ref(ablation.node)})

    def patch(self, patch: Patch | None) -> Patch | None:
        if patch is None:
            return None
        for node in patch.nodes:
            if node.component == "block":
                raise self.fail("block cannot be patched: patch heads, neurons, latents, a sublayer's write "
                                "(mlp[L], attn[L]) or the residual (resid.pre[L], resid.mid[L], resid[L])",
                                r"\bpatch\b.*?(?P<at>\bblock\b)")
        return patch.model_copy(update={"nodes": tuple(self.node_ref(node) for node in patch.nodes)})

    def trace(self, trace: Trace) -> Trace:
        node = trace.node
        if catalog.NODE_REFS[node.component] == "none":
            raise self.fail(f"trace takes an MLP neuron, an attention head or a latent, not {node.component}", r"\btrace\b")
        if node.token is None:
            written = f"{node.component}[{node.layer},{node.index}]@t"
            raise self.fail(f"trace needs a token position: write {written}", r"\btrace\b")
        if node.component == "attn" and node.key is None and trace.via != "v":
            raise self.fail(f"trace of an attention head needs a key token: attn[{node.layer},{node.index}]@t:u "
                            "(or `via v` for its whole write)", r"\btrace\b")
        return trace.model_copy(update={"node": self.node_ref(node)})

    # --- losses and SQL ---

    def loss(self, loss: Loss) -> Loss:
        for role, texts in (("target", loss.targets), ("distractor", loss.distractors)):
            for text in texts:
                self.single_token(text, role)
        return loss

    def single_token(self, text: str, role: str) -> None:
        ids = self.tokenize(text)
        if len(ids) != 1:
            count = "empty" if not ids else f"{len(ids)} tokens"
            near = rf"([\"']){re.escape(text)}\1"
            raise self.fail(f"{role} {text!r} is {count}; {role}s must be single tokens", near)

    def check_tables(self, sql: str) -> None:
        ctes = {m.group(1).lower() for m in re.finditer(r"(?:\bwith|,)\s+([A-Za-z_]\w*)\s+as\s*\(", sql, re.IGNORECASE)}
        scrubbed = re.sub(r"'(?:[^']|'')*'", "''", sql)
        for match in re.finditer(r"\b(?:from|join)\s+([A-Za-z_][\w.]*)(\s*\()?", scrubbed, re.IGNORECASE):
            if match.group(2):  # a table function such as read_parquet(...)
                continue
            name = match.group(1).split(".")[-1].lower()
            if name not in self.tables and name not in ctes:
                known = sorted(self.tables)
                listed = f" (tables: {', '.join(known)})" if known and len(known) <= 12 else ""
                raise self.fail(
                    f"unknown table '{match.group(1)}'{listed}", rf"\b{re.escape(match.group(1))}\b",
                    nearest(name, known),
                )


def parse_size(value: object) -> int | None:
    """Bytes of a memory size: a number of bytes, or '8GB', '512 MiB', '1.5g' (KB, MB, GB, TB are
    powers of 1000, KiB ... TiB of 1024); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value) if 0 < value < 2**63 else None
    match = SIZE.fullmatch(str(value))
    if match is None:
        return None
    unit = (match.group(2) or "").lower()
    scale = 1 if unit in ("", "b", "bytes") else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
    size = int(float(match.group(1)) * scale)
    return size if 0 < size < 2**63 else None


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in `text` (what bytes that are not UTF-8 decode to with
    Python's surrogateescape, e.g. from a Latin-1 command line), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _selects(cond: Condition, n: int, relative: bool = True) -> bool:
    """Whether some index 0..n-1 passes `cond` (a negative bound counts from the end when
    `relative`, as conditions.py compares positions)."""

    def at(v: int) -> int:
        return n + v if relative and v < 0 else v

    def some(lo: int, hi: int) -> bool:
        return max(lo, 0) <= min(hi, n - 1)

    value = cond.value
    if isinstance(value, Range):
        return some(at(value.lo), at(value.hi))
    if isinstance(value, tuple):
        return any(some(at(v), at(v)) for v in value)
    if not isinstance(value, int):
        return True
    v = at(value)
    spans = {"=": [(v, v)], "in": [(v, v)], "<": [(0, v - 1)], "<=": [(0, v)], ">": [(v + 1, n - 1)],
             ">=": [(v, n - 1)], "!=": [(0, v - 1), (v + 1, n - 1)]}[cond.op]
    return any(some(lo, hi) for lo, hi in spans)


def _shown(cond: Condition) -> str:
    value = cond.value
    if isinstance(value, Range):
        return f"in {value.lo}..{value.hi}"
    if isinstance(value, tuple):
        return f"in ({', '.join(map(str, value))})"
    return f"{cond.op} {value}"


def int_values(value: object) -> tuple[object, ...]:
    if isinstance(value, Range):
        return (value.lo, value.hi)
    if isinstance(value, tuple):
        return value
    return (value,)


class ValueChecks:
    """Mixed into the binder (needs `fail`, `fail_at`, `span`, `source`): every number of a
    statement is one the executor can hold, and every string is text it can encode."""

    dtype: str = "fp32"

    # --- text: strings that are not UTF-8, devices ---

    def text_values(self, stmt: Node) -> None:
        for what, text in _strings(stmt):
            at = lone_surrogate(text)
            if at is not None:
                raise self._bad_text(what, text, at)
        device = stmt.device if isinstance(stmt, ModelStmt) else (
            stmt.value if isinstance(stmt, SetStmt) and stmt.name.lower() == "device" else None)
        if device is not None and not DEVICE_PATTERN.fullmatch(str(device)):
            raise self.fail(f"device {str(device)!r} is not supported: use {DEVICES}", r"\bdevice\b")
        if isinstance(stmt, SetStmt) and stmt.name.lower() == "memory_limit":
            if str(stmt.value).lower() != "auto" and parse_size(stmt.value) is None:
                raise self.fail(f"memory_limit is a size such as '8GB' or '512MiB', a number of bytes, or auto, "
                                f"not {stmt.value!r}", r"\bmemory_limit\b")

    def _bad_text(self, what: str, text: str, at: int) -> TdbqlError:
        char = text[at]
        byte = f" (byte 0x{ord(char) - 0xDC00:02X} of input that is not UTF-8)" if ord(char) >= 0xDC80 else ""
        message = f"{what} holds an invalid character U+{ord(char):04X}{byte}; write the text in UTF-8"
        pos = self.source.find(char) if self.source is not None else -1
        return self.fail_at(pos, message) if pos >= 0 else self.fail(message)

    # --- numbers: int64 for counts, ids and positions; the model dtype's finite range for values ---

    def numbers(self, stmt: Node) -> Node:
        """`stmt` with every number checked; an integer compared with a scalar beyond int64
        becomes a float (the executor compares scalars as floats)."""
        return self._number_node(stmt)

    def _number_node(self, node: Node) -> Node:
        updates = {}
        for name, value in node:
            checked = self._number(value, name, node)
            if checked is not value:
                updates[name] = checked
        return node.model_copy(update=updates) if updates else node

    def _number(self, value, name: str, parent: Node):
        if isinstance(value, Node):
            return self._number_node(value)
        if isinstance(value, tuple):
            items = tuple(self._number(v, name, parent) for v in value)
            return items if any(a is not b for a, b in zip(items, value)) else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        if isinstance(parent, Ablation):
            return self._model_value(value, "an ablation")
        if isinstance(parent, Condition) and parent.field in SCALARS:
            return self._model_value(value, f"a comparison with {parent.field}")
        what = _number_name(name, parent)
        if isinstance(value, float):
            return self._finite(value, what)
        if not INT64[0] <= value <= INT64[1]:
            raise self.fail(f"{what} {value} is out of range: integers here are {INT64[0]}..{INT64[1]} (int64)",
                            self._number_at(value))
        return value

    def _model_value(self, value: int | float, what: str) -> float | int:
        limit = FINITE_MAX.get(self.dtype, FINITE_MAX["fp32"])
        if not -limit <= value <= limit:
            raise self.fail(f"{self._written(value)} is out of range for {what} in the model's {self.dtype}: "
                            f"values are finite, {-limit:.7g}..{limit:.7g}", self._number_at(value))
        return float(value) if isinstance(value, int) and not INT64[0] <= value <= INT64[1] else value

    def _finite(self, value: float, what: str) -> float:
        if value != value or value in (float("inf"), float("-inf")):
            raise self.fail(f"{what} {self._written(value)} is not a finite number (at most "
                            f"{FINITE_MAX['fp32']:.7g} in magnitude)", self._number_at(value))
        return value

    def _literal(self, value: int | float) -> str | None:
        """The number as written in the statement, when it can be found."""
        if self.source is None or self.span is None:
            return None
        body = self.source[self.span.start_pos:self.span.end_pos]
        for match in NUMBER.finditer(body):
            text = match.group(0)
            if text == str(value) or ("." in text or "e" in text.lower()) and float(text) == value:
                return text
        return None

    def _written(self, value) -> str:
        return self._literal(value) or str(value)

    def _number_at(self, value) -> str | None:
        text = self._literal(value)
        return ALONE_BEFORE + re.escape(text) + ALONE_AFTER if text else None


_NUMBER_NAMES = {"k": "K", "index": "index", "key": "key token", "n": "count", "from_token": "token",
                 "lo": "bound", "hi": "bound"}


def _number_name(name: str, parent: Node) -> str:
    """How a number is called in a message: its `where` field, `K` of topk, `index` of a node, ..."""
    if isinstance(parent, Condition):
        return parent.field
    return _NUMBER_NAMES.get(name, name)


def _strings(node: Node) -> list[tuple[str, str]]:
    """(what, text) of every string a statement holds, nested ones included."""
    out = []
    for field, value in node:
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Node):
                out += _strings(item)
            elif isinstance(item, str):
                out.append((_STRING_NAMES.get(field, field), item))
    return out


_STRING_NAMES = {"texts": "prompt", "corrupts": "corrupt prompt", "targets": "target", "distractors": "distractor",
                 "text": "statement", "sql": "the query", "name": "name", "path": "path", "token": "token"}
