"""The contenders of the act_times_grad benchmark, and the workloads they run.

Every contender answers the same question for a batch of prompts: the `k` largest values of
activation x gradient of the logit difference (target minus distractor at each prompt's last
token, summed over prompts), over every MLP neuron (post-activation, per token) and every
attention probability (per query token, key token and head, as TDB ranks attention), with the
final layer norm's scale frozen in the backward pass (tdbql's default, TDB's convention). Either
over the whole prompt set (`by_prompt=False`) or per prompt (`by_prompt=True`).

A node key is `(prompt_id, layer, kind, unit, position, attended)`: kind "mlp" (unit = neuron,
attended = -1) or "attn" (unit = head, attended = key position).

Contenders
- `floor`: plain transformers GPT2LMHeadModel (eager attention so the probabilities exist as
  tensors), weights frozen, autograd entered at the input embeddings, forward hooks on the MLP
  activation modules, `output_attentions=True` for the probabilities, one
  `torch.autograd.grad` for all of them. The least work any hook-based tool can do.
- `tl`: TransformerLens 4.x `TransformerBridge.boot_transformers` over the same HF module
  (HookedTransformer was removed in TransformerLens 4.0), `add_caching_hooks(names_filter,
  incl_bwd=True)` on `blocks.L.mlp.hook_post` and `blocks.L.attn.hook_pattern`, a
  `ln_final.hook_scale` hook returning the scale detached, `loss.backward()`.
- `tl_all`: the same without a names filter: the whole cache, forward and backward
  (`run_with_cache(incl_bwd=True)`, what most notebooks do).
- `tdbql`: `Engine.run` of `topk 20 act_times_grad [by prompt]` parsed and bound from text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tdbql.executor.runtime.loading import TORCH_DTYPES

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".data" / "bench"
TARGET, DISTRACTOR = 100, 200  # token ids of the loss: logit(t100) - logit(t200)
FIRST_PROMPT_TOKEN = 300  # prompts draw token ids from [300, vocab)

Key = tuple[int, int, str, int, int, int]  # prompt_id, layer, kind, unit, position, attended

# --- models -----------------------------------------------------------------------------------------

MODEL_SHAPES = {
    # GPT-2 small's shape with random weights (never downloaded).
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024),
    # For CI: two layers, d_model 64.
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_inner=256, vocab_size=512, n_positions=256),
}


def token_name(i: int) -> str:
    return f"t{i}"


def make_checkpoint(shape: str, seed: int = 0, root: Path = DATA) -> Path:
    """A random GPT-2-architecture checkpoint saved by transformers, with a word-level tokenizer
    (`t0 t1 ...`, one token per whitespace-separated word) so texts map to exact token ids."""
    folder = root / f"{shape}-seed{seed}"
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    dims = MODEL_SHAPES[shape]
    config = tf.GPT2Config(**dims, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(config)  # transformers' own GPT-2 initialisation (std 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {token_name(i): i for i in range(dims["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=token_name(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# --- workloads ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """`n_prompts` prompts of `min_tokens..max_tokens` tokens, in batches of `batch_size`."""

    name: str
    n_prompts: int
    min_tokens: int
    max_tokens: int
    batch_size: int
    by_prompt: bool = False
    end_to_end: bool = False  # from text to a DuckDB table, one prompt (W1)
    k: int = 20

    @property
    def shape(self) -> str:
        if self.min_tokens == self.max_tokens:
            return f"{self.n_prompts}x{self.max_tokens}"
        return f"{self.n_prompts}x{self.min_tokens}-{self.max_tokens}"

    def query(self) -> str:
        return f"topk {self.k} act_times_grad" + (" by prompt" if self.by_prompt else "")


def parse_shape(text: str) -> tuple[int, int, int]:
    """`32x128` -> (32, 128, 128); `100x16-64` -> (100, 16, 64)."""
    n, _, tokens = text.partition("x")
    lo, _, hi = tokens.partition("-")
    return int(n), int(lo), int(hi or lo)


def workload(name: str, shape: str | None = None, batch_size: int | None = None) -> Workload:
    defaults = {
        "W1": ("1x64", 1, dict(end_to_end=True)),
        "W2": ("32x128", 32, {}),
        "W3": ("8x1024", 8, {}),
        "W4": ("10000x16-64", 64, dict(by_prompt=True)),
    }
    default_shape, default_batch, extra = defaults[name]
    n, lo, hi = parse_shape(shape or default_shape)
    return Workload(name, n, lo, hi, batch_size or min(default_batch, n), **extra)


@dataclass
class PromptSet:
    token_ids: list[list[int]]

    @property
    def texts(self) -> list[str]:
        return [" ".join(token_name(i) for i in ids) for ids in self.token_ids]

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


def make_prompts(w: Workload, vocab_size: int, seed: int = 0) -> PromptSet:
    rng = random.Random(seed)
    prompts = []
    for _ in range(w.n_prompts):
        n = rng.randint(w.min_tokens, w.max_tokens)
        prompts.append([rng.randrange(FIRST_PROMPT_TOKEN, vocab_size) for _ in range(n)])
    return PromptSet(prompts)


def batches(prompts: PromptSet, batch_size: int, device) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first prompt id, input_ids (batch, token) right-padded, lengths (batch,)) per batch."""
    out = []
    for start in range(0, len(prompts.token_ids), batch_size):
        chunk = prompts.token_ids[start: start + batch_size]
        T = max(len(ids) for ids in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, row in enumerate(chunk):
            ids[b, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(row) for row in chunk])
        out.append((start, ids.to(device), lengths.to(device)))
    return out


# --- running top-k of the captured tensors (floor and TransformerLens) --------------------------------


def logit_diff(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum over prompts of logit(target) - logit(distractor) at the last real token."""
    b = torch.arange(logits.shape[0], device=logits.device)
    last = logits[b, lengths - 1].float()  # (batch, vocab)
    return (last[:, TARGET] - last[:, DISTRACTOR]).sum()


def valid_masks(lengths: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, token) real tokens; (batch, 1, token, key) causal pairs of real tokens."""
    t = torch.arange(T, device=lengths.device)
    tokens = t[None, :] < lengths[:, None]
    pairs = tokens[:, None, :, None] & (t[None, None, None, :] <= t[None, None, :, None])
    return tokens, pairs


class TopK:
    """Running top-k of node scores, over everything or per prompt.

    Per batch, each (layer, kind) block offers its own k best per group (torch.topk on the device);
    `end_batch` keeps the k best of those candidates and merges them into Python lists."""

    KINDS = ("mlp", "attn")

    def __init__(self, k: int, by_prompt: bool) -> None:
        self.k, self.by_prompt = k, by_prompt
        self.best: dict[int, list[tuple[float, Key]]] = {}  # group (prompt id or 0) -> [(value, key)]
        self.pending: list[torch.Tensor] = []  # per block: (groups, k', 7) float64 rows

    def add_mlp(self, layer: int, scores: torch.Tensor, tokens: torch.Tensor) -> None:
        """scores (batch, token, neuron); tokens (batch, token) valid."""
        scores = scores.float().masked_fill(~tokens[:, :, None], float("-inf"))
        N = scores.shape[2]  # flat index per prompt = token * N + neuron
        self._add(layer, 0, scores, lambda flat: (flat // N, flat % N, torch.full_like(flat, -1)))

    def add_attn(self, layer: int, scores: torch.Tensor, pairs: torch.Tensor) -> None:
        """scores (batch, head, token, key); pairs (batch, 1, token, key) valid."""
        scores = scores.float().masked_fill(~pairs, float("-inf"))
        T, U = scores.shape[2:]  # flat index per prompt = head * T * U + token * U + key
        self._add(layer, 1, scores, lambda flat: ((flat % (T * U)) // U, flat // (T * U), flat % U))

    def _add(self, layer: int, kind: int, scores: torch.Tensor, locate) -> None:
        B = scores.shape[0]
        view = scores.reshape(B, -1) if self.by_prompt else scores.reshape(1, -1)
        top = view.topk(min(self.k, view.shape[1]), dim=1)  # (groups, k')
        per_prompt = scores[0].numel()
        flat = top.indices
        b = torch.arange(B, device=flat.device)[:, None].expand_as(flat) if self.by_prompt else flat // per_prompt
        position, unit, attended = locate(flat % per_prompt)
        fields = [top.values.double(), b, torch.full_like(flat, layer), torch.full_like(flat, kind), unit, position,
                  attended]
        self.pending.append(torch.stack([f.double() for f in fields], dim=-1))

    def end_batch(self, first: int) -> None:
        """Keep the k best candidates of this batch per group and merge them into `best`."""
        rows = torch.cat(self.pending, dim=1)  # (groups, candidates, 7)
        self.pending.clear()
        order = rows[..., 0].topk(min(self.k, rows.shape[1]), dim=1).indices
        rows = rows.gather(1, order[..., None].expand(-1, -1, rows.shape[2])).cpu().tolist()
        for group_rows in rows:
            for value, b, layer, kind, unit, position, attended in group_rows:
                if value == float("-inf"):
                    continue
                prompt = first + int(b)
                key = (prompt, int(layer), self.KINDS[int(kind)], int(unit), int(position), int(attended))
                self.best.setdefault(prompt if self.by_prompt else 0, []).append((value, key))
        for group in ({first + i for i in range(len(rows))} if self.by_prompt else {0}) & self.best.keys():
            self.best[group].sort(key=lambda item: -item[0])
            del self.best[group][self.k:]

    def result(self) -> dict[Key, float]:
        return {key: value for items in self.best.values() for value, key in items}


# --- contenders --------------------------------------------------------------------------------------



class FrozenScaleLayerNorm(torch.nn.Module):
    """The final LayerNorm with its scale detached (fp32 statistics, like tdbql's Norm)."""

    def __init__(self, ln: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        centred = xf - xf.mean(-1, keepdim=True)
        scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps).detach()
        return (centred / scale).to(x.dtype) * self.weight + self.bias


def load_hf(folder: Path, dtype: str, device: str):
    import transformers as tf

    model = tf.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=TORCH_DTYPES[dtype])
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Floor:
    """Plain transformers: hooks on the MLP activations, attention probabilities from
    `output_attentions`, one input-only backward."""

    name = "floor"

    def __init__(self, folder: Path, dtype: str, device: str) -> None:
        self.device = device
        self.model = load_hf(folder, dtype, device)
        self.model.transformer.ln_f = FrozenScaleLayerNorm(self.model.transformer.ln_f)
        self.posts: list[torch.Tensor] = []
        for block in self.model.transformer.h:
            block.mlp.act.register_forward_hook(lambda module, args, out: self.posts.append(out))

    def run(self, prompts: PromptSet, w: Workload) -> dict[Key, float]:
        top = TopK(w.k, w.by_prompt)
        for first, ids, lengths in batches(prompts, w.batch_size, self.device):
            self.batch(first, ids, lengths, top)
        return top.result()

    def batch(self, first: int, ids: torch.Tensor, lengths: torch.Tensor, top: TopK) -> None:
        tokens, pairs = valid_masks(lengths, ids.shape[1])
        embeds = self.model.transformer.wte(ids).requires_grad_()  # autograd starts here
        self.posts.clear()
        with torch.enable_grad():
            out = self.model(inputs_embeds=embeds, attention_mask=tokens.long(), output_attentions=True)
            acts = list(self.posts) + list(out.attentions)
            grads = torch.autograd.grad(logit_diff(out.logits, lengths), acts)
        self.posts.clear()
        n = len(self.model.transformer.h)
        with torch.no_grad():
            for layer in range(n):
                top.add_mlp(layer, acts[layer] * grads[layer], tokens)
                top.add_attn(layer, acts[n + layer] * grads[n + layer], pairs)
            top.end_batch(first)


class TransformerLensBridge:
    """TransformerLens 4.x: TransformerBridge over the HF module, caching hooks with gradients."""

    name = "tl"
    names_filter = staticmethod(lambda name: name.endswith("mlp.hook_post") or name.endswith("attn.hook_pattern"))

    def __init__(self, folder: Path, dtype: str, device: str) -> None:
        import transformers as tf
        from transformer_lens.model_bridge import TransformerBridge

        self.device = device
        hf = load_hf(folder, dtype, device)
        tokenizer = tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        self.bridge = TransformerBridge.boot_transformers(
            str(folder), hf_model=hf, tokenizer=tokenizer, device=device, dtype=TORCH_DTYPES[dtype])
        for p in self.bridge.parameters():
            p.requires_grad_(False)
        self.n_layers = self.bridge.cfg.n_layers

    def run(self, prompts: PromptSet, w: Workload) -> dict[Key, float]:
        top = TopK(w.k, w.by_prompt)
        for first, ids, lengths in batches(prompts, w.batch_size, self.device):
            self.batch(first, ids, lengths, top)
        return top.result()

    def _filter(self):
        return self.names_filter

    def _cached_name(self, alias: str) -> str:
        """The cache holds aliases only when a names filter asked for them."""
        return alias if self._filter() is not None else self.bridge.hook_dict[alias].name

    def batch(self, first: int, ids: torch.Tensor, lengths: torch.Tensor, top: TopK) -> None:
        tokens, pairs = valid_masks(lengths, ids.shape[1])
        self.bridge.reset_hooks()
        self.bridge.add_hook("blocks.0.hook_resid_pre", lambda x, hook: x.detach().requires_grad_())
        self.bridge.add_hook("ln_final.hook_scale", lambda s, hook: s.detach())
        cache = self.bridge.add_caching_hooks(self._filter(), incl_bwd=True)
        with torch.enable_grad():
            logits = self.bridge(ids, attention_mask=tokens.long())
            logit_diff(logits, lengths).backward()
        self.bridge.reset_hooks()
        with torch.no_grad():
            for layer in range(self.n_layers):
                post, pattern = (self._cached_name(f"blocks.{layer}.{n}") for n in ("mlp.hook_post", "attn.hook_pattern"))
                top.add_mlp(layer, cache[post] * cache[post + "_grad"], tokens)
                top.add_attn(layer, cache[pattern] * cache[pattern + "_grad"], pairs)
            top.end_batch(first)
        cache.clear()


class TransformerLensCacheAll(TransformerLensBridge):
    """TransformerLens caching every hook point forward and backward (no names filter)."""

    name = "tl_all"

    def _filter(self):
        return None


class Tdbql:
    """tdbql's engine, the query parsed and bound from text."""

    name = "tdbql"
    compile = False

    def __init__(self, folder: Path, dtype: str, device: str) -> None:
        from tdbql.executor.runtime.loading import load_model

        self.loaded = load_model(str(folder), dtype=dtype, device=device)

    def statement(self, text: str):
        from tdbql.grammar.parse import parse
        from tdbql.query.bind import bind

        (stmt, span), = parse(text)
        return bind(stmt, span, info=self.loaded.info(), tokenize=self.loaded.encode, source=text)

    def loss(self):
        return self.statement(f'target " {token_name(TARGET)}" vs " {token_name(DISTRACTOR)}"').loss

    def run(self, prompts: PromptSet, w: Workload) -> dict[Key, float]:
        table = self.table(prompts, w)
        return table_keys(table)

    def table(self, prompts: PromptSet, w: Workload):
        from tdbql.executor.engine import Engine
        from tdbql.query.bind import bind_query
        from tdbql.query.context import PromptRow

        rows = [PromptRow(prompt_id=i, text=text) for i, text in enumerate(prompts.texts)]
        engine = Engine(self.loaded, batch_size=w.batch_size, compile=self.compile)
        bound = bind_query(self.statement(w.query()), None, session_loss=self.loss(), prompts_have_targets=False)
        return engine.run(bound, rows)["result"]


class TdbqlCompiled(Tdbql):
    """tdbql with `set compile = on` (torch.compile; the warm-up runs compile)."""

    name = "tdbql_compiled"
    compile = True


def table_keys(table) -> dict[Key, float]:
    """Node keys of a tdbql result table (the ranking column is act_times_grad)."""
    cols = table.to_pydict()
    keys = {}
    for i in range(table.num_rows):
        attended = cols["attended"][i]
        key = (cols["prompt_id"][i], cols["layer"][i], cols["component"][i], cols["unit"][i],
               cols["position"][i], -1 if attended is None else attended)
        keys[key] = cols["act_times_grad"][i]
    return keys


CONTENDERS = {c.name: c for c in (Floor, TransformerLensBridge, TransformerLensCacheAll, Tdbql, TdbqlCompiled)}


# --- agreement ---------------------------------------------------------------------------------------


def compare(reference: dict[Key, float], other: dict[Key, float]) -> dict:
    """Set equality of the keys; for mismatches, how far from the k-th value they are."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    kth = min(reference.values()) if reference else 0.0
    out = {"equal": not missing and not extra, "n_reference": len(reference), "n_other": len(other),
           "missing": [list(k) for k in missing], "extra": [list(k) for k in extra]}
    if missing or extra:
        out["missing_values"] = [reference[k] for k in missing]
        out["extra_values"] = [other[k] for k in extra]
        out["reference_kth_value"] = kth
    common = set(reference) & set(other)
    if common:
        out["max_abs_value_diff"] = max(abs(reference[k] - other[k]) for k in common)
    return out


def keys_json(keys: dict[Key, float]) -> list:
    return [[*k, v] for k, v in sorted(keys.items(), key=lambda kv: -kv[1])]


def keys_from_json(rows: Sequence) -> dict[Key, float]:
    return {tuple(r[:6]): r[6] for r in rows}


def describe_checkpoint(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    return {k: cfg[k] for k in ("n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions")}
