"""Evaluate tdbql's embedded default model on its three known behaviours.

Usage: python scripts/evaluate_default_model.py [--model-dir DIR] [--transformers]

- IOI: on held-out names in held-out templates, the logit of the indirect object must beat the
  logit of the subject at the last token in >= 90% of prompts;
- factual recall: top-1 accuracy on every fact (capital / language / landmark) >= 90%;
- induction: on fresh random word sequences repeated twice, the mean loss on the second repeat
  must be <= 50% of the mean loss on the first repeat.

Prints the figures and exits non-zero when one misses its bar. The model runs through
tdbql.executor.runtime.loading.load_model("default") when that works, else through transformers.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# sleep rather than spin while waiting for the other thread (the machine is shared)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_corpus  # noqa: E402

MODEL_DIR = Path(__file__).resolve().parents[1] / "executor" / "default_model"
IOI_BAR = 0.9
FACT_BAR = 0.9
INDUCTION_BAR = 0.5
EVAL_SEED = 777


@dataclass
class Backend:
    """A model seen as text -> ids and ids -> logits [T, V] (one unpadded prompt)."""

    name: str
    encode: Callable[[str], list[int]]
    logits: Callable[[list[int]], torch.Tensor]


def transformers_backend(model_dir: Path = MODEL_DIR) -> Backend:
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    @torch.no_grad()
    def logits(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids])).logits[0]

    return Backend("transformers", lambda text: tokenizer.encode(text).ids, logits)


def tdbql_backend() -> Backend:
    from tdbql.executor.runtime.loading import load_model

    loaded = load_model("default")
    loaded.model.eval()

    @torch.no_grad()
    def logits(ids: list[int]) -> torch.Tensor:
        return loaded.model(torch.tensor([ids], device=loaded.device))[0].float().cpu()

    return Backend("tdbql", loaded.encode, logits)


def single_token(backend: Backend, word: str) -> int:
    ids = backend.encode(" " + word)
    assert len(ids) == 1, f"{word!r} is not a single token: {ids}"
    return ids[0]


def ioi_examples(
    names: Sequence[str], templates: Sequence[str], n: int, seed: int = EVAL_SEED
) -> list[build_corpus.IoiExample]:
    rng = random.Random(seed)
    return [build_corpus.ioi_example(templates[i % len(templates)], list(names), rng) for i in range(n)]


def ioi_accuracy(backend: Backend, examples: Sequence[build_corpus.IoiExample]) -> float:
    """Fraction of prompts where logit(indirect object) > logit(subject) at the last token."""
    correct = 0
    for example in examples:
        last = backend.logits(backend.encode(example.prompt))[-1]
        io, subject = single_token(backend, example.io), single_token(backend, example.subject)
        correct += bool(last[io] > last[subject])
    return correct / len(examples)


def fact_accuracy(backend: Backend, prompts: Sequence[tuple[str, str]]) -> float:
    """Top-1 accuracy of the answer token after each fact prompt."""
    correct = 0
    for prompt, answer in prompts:
        last = backend.logits(backend.encode(prompt))[-1]
        correct += int(last.argmax().item() == single_token(backend, answer))
    return correct / len(prompts)


def induction_losses(
    backend: Backend, n_sequences: int = 100, length: int = 20, seed: int = EVAL_SEED
) -> tuple[float, float]:
    """Mean next-token loss on the first and on the second repeat of random word sequences.

    A sequence is `length` random single-token words followed by the same words again. The first
    token of each repeat is excluded (nothing in context predicts it).
    """
    rng = random.Random(seed)
    pool = [single_token(backend, w) for w in build_corpus.INDUCTION_POOL]
    first, second = [], []
    for _ in range(n_sequences):
        run = [rng.choice(pool) for _ in range(length)]
        ids = run + run
        log_probs = backend.logits(ids).log_softmax(-1)  # [2*length, V]
        token_loss = -log_probs[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]  # [2L-1]
        # token_loss[t] is the loss of predicting ids[t + 1]
        first.append(token_loss[: length - 1].mean().item())
        second.append(token_loss[length:].mean().item())
    return sum(first) / len(first), sum(second) / len(second)


@dataclass
class Report:
    ioi: float
    ioi_breakdown: dict[str, float]
    facts: float
    induction_first: float
    induction_second: float

    @property
    def induction_ratio(self) -> float:
        return self.induction_second / self.induction_first

    def passes(self) -> dict[str, bool]:
        return {
            "ioi": self.ioi >= IOI_BAR,
            "facts": self.facts >= FACT_BAR,
            "induction": self.induction_ratio <= INDUCTION_BAR,
        }


def evaluate(backend: Backend, n_ioi: int = 300, n_induction: int = 100) -> Report:
    bc = build_corpus
    sets = {
        "heldout names x heldout templates": (bc.HELDOUT_NAMES, bc.IOI_HELDOUT_TEMPLATES),
        "heldout names x train templates": (bc.HELDOUT_NAMES, bc.IOI_TRAIN_TEMPLATES),
        "train names x heldout templates": (bc.TRAIN_NAMES, bc.IOI_HELDOUT_TEMPLATES),
    }
    breakdown = {
        label: ioi_accuracy(backend, ioi_examples(names, templates, n_ioi))
        for label, (names, templates) in sets.items()
    }
    first, second = induction_losses(backend, n_induction)
    return Report(
        ioi=breakdown["heldout names x heldout templates"],
        ioi_breakdown=breakdown,
        facts=fact_accuracy(backend, bc.fact_eval_prompts()),
        induction_first=first,
        induction_second=second,
    )


def print_report(report: Report, backend: Backend) -> None:
    verdict = {True: "PASS", False: "FAIL"}
    passes = report.passes()
    print(f"backend: {backend.name}")
    for label, acc in report.ioi_breakdown.items():
        print(f"  IOI accuracy, {label}: {acc:.1%}")
    print(f"IOI accuracy (held-out names and templates): {report.ioi:.1%} "
          f"(bar >= {IOI_BAR:.0%}) {verdict[passes['ioi']]}")
    print(f"factual recall top-1: {report.facts:.1%} (bar >= {FACT_BAR:.0%}) {verdict[passes['facts']]}")
    print(f"induction loss: first repeat {report.induction_first:.3f}, second repeat "
          f"{report.induction_second:.3f}, ratio {report.induction_ratio:.3f} "
          f"(bar <= {INDUCTION_BAR}) {verdict[passes['induction']]}")


def make_backend(use_transformers: bool, model_dir: Path) -> Backend:
    if use_transformers or model_dir != MODEL_DIR:
        return transformers_backend(model_dir)
    try:
        return tdbql_backend()
    except Exception as error:  # the runtime may be unavailable; transformers reads the same folder
        print(f"tdbql loader unavailable ({type(error).__name__}: {error}); using transformers")
        return transformers_backend(model_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--transformers", action="store_true", help="run through transformers")
    parser.add_argument("--quick", action="store_true", help="fewer prompts (for checkpoints)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    backend = make_backend(args.transformers, args.model_dir)
    report = evaluate(backend, n_ioi=60, n_induction=20) if args.quick else evaluate(backend)
    print_report(report, backend)
    return 0 if all(report.passes().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
