"""`generate N`: continue each prompt token by token under the statement's interventions.

Each prompt runs alone (a batch of one: positions stay each prompt's own): one forward over the
prompt fills a KV cache under every intervention of the statement, then each step runs the one
new token against the cache. Ablations and steers that name no position apply at every step;
those at a prompt position, and patches (their source has no continuation), apply where that
position exists: in the prompt's forward. Greedy at temperature 0 (ties: the lower token id),
else sampling from softmax(logits / temperature) with a generator seeded by `seed`. The model
generates exactly N tokens (an end-of-text token is a token like any other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import torch

from ..query.context import PromptRow
from ..query.errors import TdbqlError
from ..query.plan import GenerateQuery
from .arrow import GENERATE_SCHEMA, floats, ints, repeat, token_strings
from .interventions import Interventions
from .runtime.batching import encode_prompts, pad
from .runtime.hooks import HookSet
from .runtime.model import KVCache


def generate_table(loaded, query: GenerateQuery, rows: Sequence[PromptRow], edits: Interventions,
                   progress: Callable[[int, int], None] | None = None) -> pa.Table:
    generator = None if query.seed is None else torch.Generator(device=loaded.device).manual_seed(query.seed)
    parts = []
    for i, row in enumerate(rows):
        ids, logprobs = continuation(loaded, row, query.n, query.temperature, generator, edits)
        n = len(ids)
        parts.append(pa.table({
            "prompt_id": repeat(row.prompt_id, n, "prompt_id"),
            "step": ints(range(n)),
            "token_id": ints(ids),
            "token": token_strings(ids, loaded.token_str),
            "logprob": floats(logprobs),
        }, schema=GENERATE_SCHEMA))
        if progress:
            progress(i + 1, len(rows))
    return pa.concat_tables(parts).combine_chunks() if parts else GENERATE_SCHEMA.empty_table()


def continuation(loaded, row: PromptRow, n: int, temperature: float, generator, edits: Interventions,
                 *, use_cache: bool = True) -> tuple[list[int], list[float]]:
    """The next `n` token ids of `row` and their log-probabilities (under the edits).
    `use_cache=False` reruns the whole sequence each step instead (no edits: the benchmark's
    baseline for the cache)."""
    if not use_cache and edits:
        raise ValueError("the cacheless loop takes no interventions")
    prompt = pad([row], encode_prompts(loaded, [row]), 0, loaded.device)
    length = int(prompt.lengths[0])
    if length + n > loaded.config.n_ctx:
        raise TdbqlError(f"generate {n} after prompt {row.prompt_id} ({length} tokens) is beyond the model's "
                         f"context of {loaded.config.n_ctx} tokens")
    decode = edits.decoding()
    cache = KVCache() if use_cache else None
    sequence = list(prompt.token_ids[0])
    logits = _forward(loaded, sequence, edits, decode, cache, first=True)
    ids, logprobs = [], []
    for step in range(n):
        token, logprob = _choose(logits, temperature, generator)
        ids.append(token)
        logprobs.append(logprob)
        sequence.append(token)
        if step < n - 1:
            logits = _forward(loaded, sequence, edits, decode, cache, first=False)
    return ids, logprobs


def _forward(loaded, sequence: list[int], edits: Interventions, decode: Interventions, cache: KVCache | None,
             *, first: bool) -> torch.Tensor:
    """The last position's logits (vocab,). The first forward covers the prompt under every edit;
    later ones the new token only (with a cache, under the position-free edits) or the whole
    sequence (without a cache, and without edits)."""
    whole = pad([PromptRow(prompt_id=0, text="")], [sequence], 0, loaded.device)
    hooks = HookSet()
    if first:
        edits.add(hooks, whole)
        input_ids = whole.input_ids
    elif cache is None:
        input_ids = whole.input_ids
    else:
        decode.add(hooks, whole)  # position-free edits: they act on whatever tokens run
        input_ids = whole.input_ids[:, -1:]
    with torch.no_grad():
        return loaded.model(input_ids, None, hooks, cache=cache,
                            logit_positions=torch.tensor([input_ids.shape[1] - 1], device=loaded.device))[0, 0]


def _choose(logits: torch.Tensor, temperature: float, generator) -> tuple[int, float]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if temperature == 0:
        token = int(torch.argmax(logprobs))  # the first maximum: the lower id on a tie
    else:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
