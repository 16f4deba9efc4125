"""The binder's checks of the parts statements share: where an error points in the text, ranges
(layers, heads, neurons, latents, tokens, vocabulary), node references in ablations, traces and
patches, losses (single-token targets) and the tables of a SQL subquery. bind.py visits the
statements; this is the only other place that checks names and ranges.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

from . import catalog
from .catalog import COMPONENTS, LATENTS
from .context import ModelInfo
from .errors import TdbqlError, nearest
from .plan import Ablation, Loss, NodeRef, Patch, Range, Span, Trace


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


def int_values(value: object) -> tuple[object, ...]:
    if isinstance(value, Range):
        return (value.lo, value.hi)
    if isinstance(value, tuple):
        return value
    return (value,)
