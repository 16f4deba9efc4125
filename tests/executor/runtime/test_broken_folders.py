"""Broken model and autoencoder folders, made here, are TdbqlErrors that name the file and say
what is wrong; a good folder beside them still loads (so each breakage is what fails)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tdbql.executor.runtime import loading
from tdbql.executor.runtime.autoencoder import Autoencoder, load_autoencoders, save_saelens
from tdbql.executor.runtime.loading import LoadedModel, load_model
from tdbql.query.errors import TdbqlError


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))

    return edit


def truncate(folder: Path) -> None:
    data = weights(folder).read_bytes()
    weights(folder).write_bytes(data[: len(data) // 2])


def truncate_data(folder: Path) -> None:
    """Header intact, tensor data cut short: the header says more bytes than the file holds."""
    data = weights(folder).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    weights(folder).write_bytes(data[: 8 + header_len + 16])


def flip_header_length(folder: Path) -> None:
    data = bytearray(weights(folder).read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    weights(folder).write_bytes(bytes(data))


def garble_header(folder: Path) -> None:
    data = bytearray(weights(folder).read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + header_len] = b"{" * header_len
    weights(folder).write_bytes(bytes(data))


def integer_embedding(folder: Path) -> None:
    tensors = load_file(str(weights(folder)))
    tensors["transformer.wte.weight"] = torch.zeros(tensors["transformer.wte.weight"].shape, dtype=torch.int64)
    save_file(tensors, str(weights(folder)))


def shard_index(weight_map) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, **weight_map}))

    return write


def small_tokenizer_vocab_beyond_model(folder: Path) -> None:
    edit_config(vocab_size=50)(folder)
    tensors = load_file(str(weights(folder)))
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:50].contiguous()
    save_file(tensors, str(weights(folder)))


BROKEN = {
    "truncated": (truncate, "model.safetensors: not a readable safetensors file"),
    "truncated data": (truncate_data, "model.safetensors: not a readable safetensors file"),
    "random bytes": (lambda f: weights(f).write_bytes(os.urandom(4096)), "model.safetensors: not a readable"),
    "empty weights": (lambda f: weights(f).write_bytes(b""), "model.safetensors: not a readable safetensors"),
    "flipped header length": (flip_header_length, "model.safetensors: not a readable safetensors file"),
    "garbled header": (garble_header, "model.safetensors: not a readable safetensors file"),
    "weights a folder": (lambda f: (weights(f).unlink(), weights(f).mkdir()), "model.safetensors: not a readable"),
    "integer weights": (integer_embedding, "'transformer.wte.weight' holds torch.int64, not floating-point"),
    "n_embd 48": (edit_config(n_embd=48), "has shape (96,), which does not fit config.json (d_model 48"),
    "n_embd 64": (edit_config(n_embd=64), "which does not fit config.json (d_model 64, 4 heads of 16)"),
    "n_head 0": (edit_config(n_head=0), "config.json: cannot read gpt2 config (n_head must be a positive integer, not 0)"),
    "n_head 3": (edit_config(n_head=3), "config.json: cannot read gpt2 config (n_embd 32 is not a multiple of n_head 3)"),
    "n_head text": (edit_config(n_head="4"), "n_head must be a positive integer, not '4'"),
    "n_inner float": (edit_config(n_inner=64.5), "n_inner must be a positive integer, not 64.5"),
    "n_positions -1": (edit_config(n_positions=-1), "n_positions must be a positive integer, not -1"),
    "n_positions huge": (edit_config(n_positions=10**12), "'transformer.wpe.weight' has shape (64, 32), expected"),
    "d_model 2**40": (edit_config(n_embd=2**40, n_head=1), "config.json describes a model that cannot be built"),
    "eps text": (edit_config(layer_norm_epsilon="x"), "norm_eps must be a positive number, not 'x'"),
    "a billion layers": (edit_config(n_layer=10**9), "config.json says 1000000000 layers but the weights hold 2"),
    "one layer": (edit_config(n_layer=1), "config.json says 1 layers but the weights hold 2 (layers 0..1)"),
    "config a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{bad"), "config.json: invalid JSON"),
    "config not UTF-8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{"), "config.json: not UTF-8 text"),
    "config deep": (lambda f: (f / "config.json").write_text("[" * 100000), "config.json: invalid JSON"),
    "index without weight_map": (shard_index({}), "model.safetensors.index.json: no weight_map"),
    "weight_map a list": (shard_index({"weight_map": [1]}), "model.safetensors.index.json: no weight_map"),
    "shard outside": (shard_index({"weight_map": {"a": "../../etc/passwd"}}), "shard '../../etc/passwd' is not a file"),
    "shard missing": (shard_index({"weight_map": {"a": "gone.safetensors"}}), "missing weight shard gone.safetensors"),
    "tokenizer corrupt": (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": 5}'),
                          "tokenizer.json: not a readable tokenizer.json"),
    "tokenizer random": (lambda f: (f / "tokenizer.json").write_bytes(os.urandom(300)),
                         "tokenizer.json: not a readable tokenizer.json"),
    "tokenizer missing": (lambda f: (f / "tokenizer.json").unlink(), "missing tokenizer.json in"),
}


@pytest.fixture(scope="module")
def good(make_checkpoint) -> Path:
    return make_checkpoint("gpt2")


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_folder_is_an_error_naming_the_file(name, good, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    load_model(str(folder))  # the copy loads before it is broken
    breakage, message = BROKEN[name]
    breakage(folder)
    with pytest.raises(TdbqlError) as caught:
        load_model(str(folder))
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_a_tokenizer_with_ids_beyond_the_vocabulary_fails_when_it_meets_them(good, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    small_tokenizer_vocab_beyond_model(folder)
    loaded = load_model(str(folder))
    with pytest.raises(TdbqlError, match="beyond the model's vocabulary of 50: tokenizer.json does not match"):
        loaded.encode("When Mary and John went to the store")


@pytest.mark.parametrize("device, message", [
    ("meta", "device 'meta' is not supported: use cpu, cuda, cuda:N or mps"),
    ("xla", "device 'xla' is not supported"),
    ("nonsense", "device 'nonsense' is not supported"),
])
def test_devices_other_than_cpu_cuda_mps_are_refused(device, message, good):
    with pytest.raises(TdbqlError, match=message):
        load_model(str(good), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_refused(good):
    with pytest.raises(TdbqlError, match="CUDA is not available"):
        load_model(str(good), device="cuda:0")


def test_names_resolve_without_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("the hub was consulted"))
    (tmp_path / "a_file").write_text("x")
    for name, message in (("./no_such_folder", "no such folder: './no_such_folder'"),
                          ("../no/such", "no such folder"), ("/no/such/folder", "no such folder"),
                          ("a_file", "is a file, not a folder"), ("plainword", "unknown model 'plainword'")):
        with pytest.raises(TdbqlError, match=message):
            load_model(name)


def test_offline_or_not_local_never_looks_at_the_disk_or_the_hub(good, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("the hub was consulted"))
    refused = []
    for name in (str(good), "/etc/shadow", "/nonexistent", "./x", "~/y"):
        with pytest.raises(TdbqlError) as caught:
            load_model(name, offline=True, local=False)
        refused.append(caught.value.message.replace(repr(name), "NAME"))
    assert len(set(refused)) == 1 and "disabled in --safe mode" in refused[0]
    with pytest.raises(TdbqlError, match=r"not in the local Hugging Face cache .* \(--safe: no downloads\)"):
        load_model("some-org/some-model", offline=True, local=False)
    assert load_model("default", offline=True, local=False).name == "default"


# --- autoencoders ---


def _sae(folder: Path, layer: int = 0, d_in: int = 128, n: int = 16) -> Path:
    g = torch.Generator().manual_seed(layer)
    ae = Autoencoder(torch.randn(d_in, n, generator=g), torch.zeros(n), torch.randn(n, d_in, generator=g),
                     torch.zeros(d_in), site="mlp", layer=layer)
    return save_saelens(ae, folder, flat=True)  # the older layout: the edits below are top-level keys


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


SAE_BROKEN = {
    "cfg a list": (lambda f: (f / "cfg.json").write_text("[]"), "cfg.json: expected a JSON object"),
    "cfg not UTF-8": (lambda f: (f / "cfg.json").write_bytes(b"\xff{"), "cannot read"),
    "weights truncated": (lambda f: (f / "sae_weights.safetensors").write_bytes(b"\x08" * 12), "as safetensors"),
    "k text": (lambda f: _edit_cfg(f, architecture="topk", k="many"), "cannot read the autoencoder"),
    "k beyond latents": (lambda f: _edit_cfg(f, architecture="topk", k=99), "k 99 must be between 1 and the 16"),
    "k negative": (lambda f: _edit_cfg(f, architecture="topk", k=-3), "k -3 must be between 1 and the 16"),
    "hook not text": (lambda f: _edit_cfg(f, hook_name=5), "cannot read the autoencoder"),
    "hook unknown": (lambda f: _edit_cfg(f, hook_name="blocks.x.nothing"), "autoencoder hook"),
}


@pytest.mark.parametrize("name", SAE_BROKEN)
def test_a_broken_autoencoder_is_an_error_naming_the_file(name, tmp_path):
    folder = _sae(tmp_path / "sae")
    assert load_autoencoders(folder)[0].n_latents == 16
    breakage, message = SAE_BROKEN[name]
    breakage(folder)
    with pytest.raises(TdbqlError) as caught:
        load_autoencoders(folder)
    assert message in caught.value.message and "\n" not in caught.value.message


def test_an_autoencoder_that_does_not_fit_the_model_is_refused_at_attach(tmp_path):
    loaded: LoadedModel = load_model("default")
    loaded.detach_saes()
    for folder, message in ((_sae(tmp_path / "wide", d_in=64), "cannot attach autoencoder at mlp layer 0"),
                            (_sae(tmp_path / "deep", layer=9), "cannot attach autoencoder at mlp layer 9")):
        with pytest.raises(TdbqlError, match=message):
            loaded.load_sae(folder)
