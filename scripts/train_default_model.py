"""Train tdbql's embedded default model: a small GPT-2 on the corpus of scripts/build_corpus.py.

Usage: python scripts/train_default_model.py [--steps N] [--out DIR]
Builds the corpus and tokenizer in .data/ if missing, trains on CPU (2 threads, fixed seeds) and
writes config.json, model.safetensors and tokenizer.json to executor/default_model/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

# Threads sleep instead of spinning while waiting: on a shared 2-core machine spinning OpenMP
# threads made each step several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "executor" / "default_model"
SEQ_LEN = 128
BATCH_SIZE = 16
STEPS = 4400
PEAK_LR = 3e-3
CHECKPOINT_EVERY = 200
WARMUP_STEPS = 50
WEIGHT_DECAY = 0.05
IGNORE = -100


def model_config(vocab_size: int, eos_id: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=SEQ_LEN,
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )


def ensure_corpus() -> tuple[list[str], Tokenizer]:
    corpus_path = build_corpus.DATA_DIR / "corpus.txt"
    tokenizer_path = build_corpus.DATA_DIR / "tokenizer.json"
    if not (corpus_path.exists() and tokenizer_path.exists()):
        build_corpus.build()
    documents = corpus_path.read_text().splitlines()
    return documents, Tokenizer.from_file(str(tokenizer_path))


def pack_rows(documents: list[str], tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole documents (EOS-separated) into rows that each start at a document start.

    Returns input_ids [rows, SEQ_LEN] and labels [rows, SEQ_LEN] (IGNORE on padding).
    """
    eos = tokenizer.token_to_id(build_corpus.EOS)
    encoded = [e.ids + [eos] for e in tokenizer.encode_batch(documents)]
    rows: list[list[int]] = []
    current: list[int] = []
    for ids in encoded:
        if current and len(current) + len(ids) > SEQ_LEN:
            rows.append(current)
            current = []
        current += ids[:SEQ_LEN]
    rows.append(current)
    input_ids = torch.full((len(rows), SEQ_LEN), eos, dtype=torch.long)
    labels = torch.full((len(rows), SEQ_LEN), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return input_ids, labels


def sinusoidal_positions(n_positions: int, d_model: int, rms: float = 0.02) -> torch.Tensor:
    """Sinusoidal table [n_positions, d_model] scaled to `rms`, used to initialise GPT-2's learned
    position embeddings: relative offsets (previous token) are then a linear map away, which
    shortens the plateau before previous-token and induction heads form."""
    position = torch.arange(n_positions)[:, None].float()
    frequency = torch.exp(-math.log(10_000.0) * torch.arange(0, d_model, 2).float() / d_model)
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table * (rms / table.pow(2).mean().sqrt())


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: GPT2LMHeadModel) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


def train(
    steps: int, device: str = "cpu", checkpoint_dir: Path | None = None
) -> tuple[GPT2LMHeadModel, Tokenizer, float]:
    torch.manual_seed(0)
    documents, tokenizer = ensure_corpus()
    input_ids, labels = pack_rows(documents, tokenizer)
    eos = tokenizer.token_to_id(build_corpus.EOS)
    model = GPT2LMHeadModel(model_config(tokenizer.get_vocab_size(), eos))
    with torch.no_grad():
        model.transformer.wpe.weight.copy_(sinusoidal_positions(SEQ_LEN, model.config.n_embd))
    model = model.to(device)
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(input_ids), generator=generator)
    print(f"{len(input_ids)} rows of {SEQ_LEN}; {model.num_parameters()} parameters; {steps} steps")
    start = time.time()
    for step in range(steps):
        batch = order[(step * BATCH_SIZE) % len(order) :][:BATCH_SIZE]
        if len(batch) < BATCH_SIZE:
            order = torch.randperm(len(input_ids), generator=generator)
            batch = order[:BATCH_SIZE]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        loss = model(input_ids=input_ids[batch].to(device), labels=labels[batch].to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} lr {lr_at(step, steps):.2e} "
                  f"elapsed {time.time() - start:7.1f}s", flush=True)
        if checkpoint_dir and step % CHECKPOINT_EVERY == 0 and step:
            save(model, tokenizer, checkpoint_dir, time.time() - start)
    return model.cpu(), tokenizer, time.time() - start


def save(model: GPT2LMHeadModel, tokenizer: Tokenizer, out_dir: Path, seconds: float) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for extra in out_dir.iterdir():
        if extra.name not in {"config.json", "model.safetensors"}:
            extra.unlink()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"saved to {out_dir} ({size / 1e6:.2f} MB) after {seconds / 60:.1f} min", flush=True)
    (build_corpus.DATA_DIR / f"{out_dir.name}.json").write_text(json.dumps({"seconds": seconds, "bytes": size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    checkpoint_dir = build_corpus.DATA_DIR / "checkpoint"
    model, tokenizer, seconds = train(args.steps, args.device, checkpoint_dir)
    save(model, tokenizer, args.out, seconds)


if __name__ == "__main__":
    main()
