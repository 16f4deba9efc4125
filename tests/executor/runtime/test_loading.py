"""Loading checkpoints: folders, shards, dtypes, devices, the hub cache, and clean errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tdbql.executor.runtime import loading
from tdbql.executor.runtime.autoencoder import Autoencoder, save_saelens
from tdbql.executor.runtime.hf_format import config_from_hf
from tdbql.executor.runtime.loading import load_model
from tdbql.query.context import ModelInfo
from tdbql.query.errors import TdbqlError

from tests.executor.conftest import hf_config

TEXT = "When Mary and John went to the store"


def logits_of(loaded, text=TEXT):
    with torch.no_grad():
        return loaded.model(torch.tensor([loaded.encode(text)], device=loaded.device)).float().cpu()


def test_sharded_checkpoint_loads_the_same_weights(make_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    single = make_checkpoint("llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(single / "tokenizer.json", sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    assert torch.equal(logits_of(load_model(str(sharded))), logits_of(load_model(str(single))))


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_loads_and_stays_close(dtype, torch_dtype, make_checkpoint):
    folder = make_checkpoint("gpt2")
    half, full = load_model(str(folder), dtype=dtype), load_model(str(folder))
    assert half.dtype == torch_dtype
    assert all(p.dtype == torch_dtype for p in half.model.parameters())
    ours, ref = logits_of(half), logits_of(full)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(ours, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_matches_cpu(arch, make_checkpoint):
    folder = make_checkpoint(arch)
    gpu, cpu = load_model(str(folder), device="cuda"), load_model(str(folder))
    assert gpu.model.W_E.device.type == "cuda"
    torch.testing.assert_close(logits_of(gpu), logits_of(cpu), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_without_cuda_is_a_clean_error(make_checkpoint):
    with pytest.raises(TdbqlError, match="CUDA is not available"):
        load_model(str(make_checkpoint("gpt2")), device="cuda")


def test_info_describes_the_model(tiny_model):
    loaded = tiny_model("llama")
    assert loaded.info() == ModelInfo(name=loaded.name, arch="llama", n_layers=2, n_heads=4, d_model=32,
                                      d_mlp=48, vocab_size=320, n_ctx=64)
    assert loaded.token_str(loaded.encode(" Mary")[0]) == " Mary"


def _fake_hub_cache(tmp_path, monkeypatch, repo_id, folder):
    home = tmp_path / "hf"
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home / "hub"


def test_hub_id_is_found_in_the_local_cache(make_checkpoint, tmp_path, monkeypatch):
    folder = make_checkpoint("neox")
    _fake_hub_cache(tmp_path, monkeypatch, "EleutherAI/pythia-70m", folder)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("must not touch the network"))
    by_id, by_registry_name = load_model("EleutherAI/pythia-70m"), load_model("pythia-70m")
    assert torch.equal(logits_of(by_id), logits_of(load_model(str(folder))))
    assert torch.equal(logits_of(by_registry_name), logits_of(by_id))


def test_hub_id_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TdbqlError) as err:
        load_model("some-org/some-model")
    message = str(err.value)
    assert "\n" not in message
    assert "'some-org/some-model'" in message and str(tmp_path / "hf" / "hub") in message


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)

    def refuse(repo_id, **kwargs):
        raise OSError(f"404 Client Error for {repo_id}\nmore details\nand more")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(TdbqlError) as err:
        load_model("some-org/missing")
    assert "\n" not in str(err.value)
    assert "'some-org/missing'" in str(err.value) and "404" in str(err.value)


def test_default_model_loads_with_its_autoencoders(make_checkpoint, tmp_path, monkeypatch):
    folder = make_checkpoint("gpt2")
    sae_dir = tmp_path / "default_saes"
    d_mlp = 128
    for layer in (0, 1):
        g = torch.Generator().manual_seed(layer)
        ae = Autoencoder(torch.randn(d_mlp, 16, generator=g), torch.zeros(16), torch.randn(16, d_mlp, generator=g),
                         torch.zeros(d_mlp), site="mlp", layer=layer)
        save_saelens(ae, sae_dir / f"mlp_L{layer}")
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", folder)
    monkeypatch.setattr(loading, "DEFAULT_SAE_DIRS", (sae_dir,))
    loaded = load_model()
    assert loaded.name == "default"
    assert loaded.info().sae_latents == (("mlp", 0, 16), ("mlp", 1, 16))
    assert loaded.decoder_in_resid("mlp", 1).shape == (16, 32)


def test_missing_default_model_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(TdbqlError, match="embedded default model is missing"):
        load_model("default")


def test_pickle_only_checkpoint_is_refused(make_checkpoint, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(make_checkpoint("gpt2"), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(TdbqlError, match="safetensors only"):
        load_model(str(folder))


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-model-anywhere", "unknown model"),
        ("./no/such/folder", "no such folder"),
    ],
)
def test_bad_names_are_clean_errors(name, message):
    with pytest.raises(TdbqlError, match=message):
        load_model(name)


def test_bad_dtype_and_unsupported_architecture(make_checkpoint, tmp_path):
    with pytest.raises(TdbqlError, match="unknown dtype"):
        load_model(str(make_checkpoint("gpt2")), dtype="fp8")
    folder = tmp_path / "bert"
    shutil.copytree(make_checkpoint("gpt2"), folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TdbqlError, match="unsupported model_type 'bert'"):
        load_model(str(folder))


def test_weight_shape_mismatch_names_the_weight(make_checkpoint, tmp_path):
    folder = tmp_path / "wrong"
    shutil.copytree(make_checkpoint("gpt2"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_inner"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TdbqlError, match="c_fc"):
        load_model(str(folder))


def test_transformers_4_config_keys_read_like_5():
    """rope_theta / rope_scaling / rotary_pct (transformers 4) equal rope_parameters (5)."""
    v5 = hf_config("llama_linear").to_dict()
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=v5["rope_parameters"]["rope_theta"], rope_scaling={"type": "linear", "factor": 2.0})
    assert config_from_hf(v4) == config_from_hf(v5)
    neox5 = hf_config("neox_serial").to_dict()
    neox4 = {k: v for k, v in neox5.items() if k != "rope_parameters"}
    neox4.update(rotary_pct=0.25, rotary_emb_base=500.0)
    assert config_from_hf(neox4) == config_from_hf(neox5)
    assert config_from_hf(neox4).rotary_dim == 2


def test_unsupported_rope_scaling_is_a_clean_error():
    cfg = hf_config("llama").to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(TdbqlError, match="rope scaling 'yarn' is not supported"):
        config_from_hf(cfg)


def test_unsupported_activation_is_a_clean_error():
    cfg = hf_config("gpt2").to_dict()
    cfg["activation_function"] = "quick_gelu"
    with pytest.raises(TdbqlError, match="activation 'quick_gelu' is not supported"):
        config_from_hf(cfg)


def test_old_style_checkpoint_with_mask_buffers_and_no_prefix(make_checkpoint, tmp_path):
    """Older GPT-2 files: no 'transformer.' prefix, causal-mask buffers saved as weights."""
    from safetensors.torch import load_file, save_file

    source = make_checkpoint("gpt2")
    folder = tmp_path / "old"
    shutil.copytree(source, folder)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    for layer in range(2):
        weights[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        weights[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, folder / "model.safetensors")
    assert torch.equal(logits_of(load_model(str(folder))), logits_of(load_model(str(source))))
