"""Train a ReLU sparse autoencoder on every MLP layer of tdbql's embedded default model.

Usage: python scripts/train_saes.py [--steps N] [--l1 COEF]
Collects MLP post-activations (the output of `mlp.act` in the transformers GPT-2, i.e. post-GELU,
d_mlp wide) from corpus rows, trains one L1-penalised ReLU autoencoder per layer and saves it in
SAELens layout to executor/default_saes/mlp_L{layer}/ (cfg.json + sae_weights.safetensors, float16).

    encode: z = relu((x - b_dec) @ W_enc + b_enc)      decode: x_hat = z @ W_dec + b_dec
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# sleep rather than spin while waiting for the other thread (the machine is shared)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_default_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAE_DIR = REPO / "executor" / "default_saes"
D_SAE = 1024
STEPS = 800
BATCH_TOKENS = 1024
LR = 1e-3
L1_COEF = 0.1
N_ROWS = 800  # corpus rows (of 128 tokens) to collect activations from
N_EVAL_TOKENS = 20_000
SEED = 0


@torch.no_grad()
def collect_mlp_activations(model: GPT2LMHeadModel, model_dir: Path, n_rows: int) -> list[torch.Tensor]:
    """MLP post-activations per layer, [tokens, d_mlp], real (unpadded) tokens only."""
    documents, _ = train_default_model.ensure_corpus()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    input_ids, labels = train_default_model.pack_rows(documents[: n_rows * 10], tokenizer)
    assert len(input_ids) >= n_rows, f"only {len(input_ids)} rows"
    input_ids, real = input_ids[:n_rows], labels[:n_rows] != train_default_model.IGNORE
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(model.config.n_layer)}
    handles = [
        block.mlp.act.register_forward_hook(lambda _m, _i, out, i=i: captured[i].append(out))
        for i, block in enumerate(model.transformer.h)
    ]
    for start in range(0, len(input_ids), 64):
        model(input_ids[start : start + 64])
    for handle in handles:
        handle.remove()
    return [torch.cat(captured[i])[real] for i in range(model.config.n_layer)]


class ReluSae(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, data_mean: torch.Tensor) -> None:
        super().__init__()
        w_dec = torch.randn(d_sae, d_in)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w_dec)  # [d_sae, d_in], unit rows
        self.W_enc = torch.nn.Parameter(w_dec.T.clone())  # [d_in, d_sae]
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(data_mean.clone())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)


def train_sae(acts: torch.Tensor, steps: int, l1_coef: float) -> ReluSae:
    """L1-penalised reconstruction; loss terms are scaled by the data's spread so l1_coef is unitless."""
    generator = torch.Generator().manual_seed(SEED)
    train_acts = acts[N_EVAL_TOKENS:]
    mean = train_acts.mean(0)
    spread = (train_acts - mean).pow(2).sum(-1).mean()  # E||x - mean||^2
    sae = ReluSae(acts.shape[1], D_SAE, mean)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    for step in range(steps):
        x = train_acts[torch.randint(len(train_acts), (BATCH_TOKENS,), generator=generator)]
        z = sae.encode(x)
        mse = (sae.decode(z) - x).pow(2).sum(-1).mean() / spread
        l1 = z.sum(-1).mean() / spread.sqrt()
        warm = min(1.0, (step + 1) / (steps // 10))  # ramp the L1 penalty in
        loss = mse + warm * l1_coef * l1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalise_decoder()
    return sae


def as_float16(sae: ReluSae) -> dict[str, torch.Tensor]:
    return {name: p.detach().to(torch.float16).contiguous() for name, p in sae.named_parameters()}


@torch.no_grad()
def sae_metrics(weights: dict[str, torch.Tensor], acts: torch.Tensor) -> tuple[float, float]:
    """Variance explained and mean L0 on held-back activations, using the saved (fp16) weights."""
    w = {k: v.float() for k, v in weights.items()}
    z = torch.relu((acts - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    recon = z @ w["W_dec"] + w["b_dec"]
    residual = (acts - recon).pow(2).sum()
    total = (acts - acts.mean(0)).pow(2).sum()
    return (1 - residual / total).item(), (z > 0).float().sum(-1).mean().item()


def save_sae(weights: dict[str, torch.Tensor], layer: int, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    d_sae, d_in = weights["W_dec"].shape
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float16",
        "device": "cpu",
        "model_name": "tdbql-default",
        "hook_name": f"blocks.{layer}.mlp.hook_post",
        "hook_layer": layer,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "context_size": train_default_model.SEQ_LEN,
        "prepend_bos": False,
    }
    (out_dir / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(weights, str(out_dir / "sae_weights.safetensors"))
    (out_dir / "sae_weights.safetensors").chmod(0o644)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--l1", type=float, default=L1_COEF)
    parser.add_argument("--out", type=Path, default=SAE_DIR)
    parser.add_argument("--model-dir", type=Path, default=train_default_model.MODEL_DIR)
    parser.add_argument("--rows", type=int, default=N_ROWS)
    parser.add_argument("--layers", type=int, nargs="*", help="only these layers (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel.from_pretrained(args.model_dir).eval()
    layer_acts = collect_mlp_activations(model, args.model_dir, args.rows)
    if args.out.exists():
        shutil.rmtree(args.out)
    for layer, acts in enumerate(layer_acts):
        if args.layers and layer not in args.layers:
            continue
        start = time.time()
        acts = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(SEED))]
        sae = train_sae(acts, args.steps, args.l1)
        weights = as_float16(sae)
        explained, l0 = sae_metrics(weights, acts[:N_EVAL_TOKENS])
        save_sae(weights, layer, args.out / f"mlp_L{layer}")
        print(f"layer {layer}: {len(acts)} tokens, variance explained {explained:.3f}, "
              f"mean L0 {l0:.1f} of {D_SAE} ({time.time() - start:.0f}s)", flush=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"saved to {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
