"""Patching, sweeps, metric and verify against hand-written transformers forwards with hooks.

The reference runs the transformers model twice per patch: once on the source prompt capturing
the activation (module hooks at the head's slice of the output projection's input, the MLP's
down projection input, the block input, the second norm's input, GPT-2's attention dropout
output), once on the prompt that runs with it written in at the end-aligned positions. The
metric is logit(" Mary") − logit(" John") at the last token. tdbql runs the same statements
through a Session on the same checkpoint folder.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from tdbql.query.errors import TdbqlError
from tdbql.shell.session import Session
from tests.executor.conftest import load_hf

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
LONGER = "When Mary and John went to the big store, Mary gave a drink to"  # one pair of unequal length
SITES = {  # mid: the second norm (its input is the residual between attention and MLP); attn: the attention module
    "gpt2": dict(blocks=lambda m: m.transformer.h, o_proj=lambda b: b.attn.c_proj, down=lambda b: b.mlp.c_proj,
                 mid=lambda b: b.ln_2, attn=lambda b: b.attn, probs=True),
    "neox": dict(blocks=lambda m: m.gpt_neox.layers, o_proj=lambda b: b.attention.dense,
                 down=lambda b: b.mlp.dense_4h_to_h, mid=None, attn=None, probs=None),
    "llama": dict(blocks=lambda m: m.model.layers, o_proj=lambda b: b.self_attn.o_proj, down=lambda b: b.mlp.down_proj,
                  mid=lambda b: b.post_attention_layernorm, attn=lambda b: b.self_attn, probs=None),
}


_PROB_EDITS: dict[int, object] = {}  # layer -> a function of the attention probabilities (batch, head, query, key)


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention, with a hook on the probabilities (registered below). A
    custom implementation is handed no mask for an unpadded batch: the causal mask is applied here."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    else:
        queries, keys = weights.shape[-2:]  # the queries are the last ones (a cache holds the rest)
        causal = torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]
        weights = weights.masked_fill(~causal, float("-inf"))
    weights = weights.softmax(-1)
    edit = _PROB_EDITS.get(module.layer_idx)
    if edit is not None:
        weights = edit(weights)
    return torch.matmul(weights, value).transpose(1, 2), weights


AttentionInterface.register("tdbql_probe", _probe_attention)


class Reference:
    """A transformers model with hand-written hooks: capture one activation, or write into it."""

    def __init__(self, folder, arch: str, encode) -> None:
        self.hf, self.arch, self.encode = load_hf(folder), arch, encode
        if SITES[arch]["probs"]:
            self.hf.set_attn_implementation("tdbql_probe")
        self.d_head = self.hf.config.hidden_size // self.hf.config.num_attention_heads
        self.mary, self.john = encode(" Mary")[0], encode(" John")[0]

    def _hook(self, site: str, layer: int, fn, *, writing: bool = False):
        sites = SITES[self.arch]
        block = sites["blocks"](self.hf)[layer]
        if site == "resid.mid" and writing:
            return self._write_mid(block, fn)
        if site == "resid.pre":
            def pre_block(module, args, kwargs):
                if args:
                    return (fn(args[0]),) + args[1:], kwargs
                return args, dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))
            return block.register_forward_pre_hook(pre_block, with_kwargs=True)
        if site == "probs":
            _PROB_EDITS[layer] = fn
            return _Handles(_Removal(lambda: _PROB_EDITS.pop(layer, None)))
        module = {"z": sites["o_proj"], "neuron": sites["down"], "resid.mid": sites["mid"]}[site](block)
        return module.register_forward_pre_hook(lambda module, args: (fn(args[0]),) + args[1:])

    def _write_mid(self, block, fn):
        """The residual carried past the second norm is the block input plus the attention output
        (transformers keeps it in a local), so writing mid means writing attention's output:
        attn_out = fn(pre + attn_out) - pre."""
        pre = {}

        def keep_pre(module, args, kwargs):
            pre["x"] = args[0] if args else kwargs["hidden_states"]

        def set_attn(module, args, out):
            attn_out, *rest = out
            return (fn(pre["x"] + attn_out) - pre["x"], *rest)

        sites = SITES[self.arch]
        return _Handles(block.register_forward_pre_hook(keep_pre, with_kwargs=True),
                        sites["attn"](block).register_forward_hook(set_attn))

    def _view(self, x: torch.Tensor, site: str, unit: int | None) -> torch.Tensor:
        """The activation's (batch, token, ...) view for one unit (the head's slice of z)."""
        if site == "z":
            return x[..., unit * self.d_head:(unit + 1) * self.d_head]
        if site == "neuron" and unit is not None:
            return x[..., unit]
        if site == "probs":
            return x[:, unit]  # (batch, query, key)
        return x

    def run(self, text: str, *, capture=(), writes=(), zero=()) -> tuple[float, dict]:
        """The metric of `text`; `capture` (site, layer, unit) keeps activations; `writes`
        (site, layer, unit, positions, key, values) overwrite them; `zero` (site, layer, unit, t)
        sets one to 0 (an ablation)."""
        kept, handles = {}, []

        def keep(key):
            def fn(x):
                kept[key] = x.detach().clone()
                return x
            return fn

        def write(site, unit, positions, key, values):
            def fn(x):
                x = x.clone()
                view = self._view(x, site, unit)
                for t, value in zip(positions, values):
                    if key is None:
                        view[0, t] = value
                    else:
                        view[0, t, key] = value
                return x
            return fn

        for site, layer, unit in capture:
            handles.append(self._hook(site, layer, keep((site, layer, unit))))
        for site, layer, unit, t in zero:
            handles.append(self._hook(site, layer, write(site, unit, [t], None, [0.0]), writing=True))
        for site, layer, unit, positions, key, values in writes:
            handles.append(self._hook(site, layer, write(site, unit, positions, key, values), writing=True))
        try:
            with torch.no_grad():
                logits = self.hf(torch.tensor([self.encode(text)])).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        return float(logits[self.mary] - logits[self.john]), kept

    def patched(self, run_text: str, source_text: str, site: str, layer: int, unit: int | None = None,
                token: int | None = None, key: int | None = None, zero=()) -> float:
        """The metric of `run_text` with (site, layer, unit) at `token` (None: every aligned
        position) taken from `source_text`, positions aligned from the end."""
        _, kept = self.run(source_text, capture=[(site, layer, unit)])
        source = self._view(kept[(site, layer, unit)], site, unit)[0]
        n_run, n_source = len(self.encode(run_text)), len(self.encode(source_text))
        shift = n_source - n_run
        positions = list(range(max(0, -shift), n_run)) if token is None else [token % n_run]
        source_key = None if key is None else key % n_run + shift
        values = [source[t + shift] if key is None else source[t + shift, source_key] for t in positions]
        run_key = None if key is None else key % n_run
        return self.run(run_text, writes=[(site, layer, unit, positions, run_key, values)], zero=zero)[0]


class _Removal:
    def __init__(self, undo) -> None:
        self.remove = undo


class _Handles:
    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def session_for(folder, pairs=((CLEAN, CORRUPT),)) -> Session:
    session = Session(model=str(folder))
    items = ", ".join(f'"{clean}" corrupt "{corrupt}"' for clean, corrupt in pairs)
    session.execute(f'prompt {items}\ntarget " Mary" vs " John"')
    return session


def metric(session: Session, text: str) -> dict:
    return session.execute(text)[0].table.to_pylist()[0]


NODES = [  # (tdbql node, reference site, layer, unit, token, key)
    ("attn[1,2]", "z", 1, 2, None, None),
    ("attn[0,1]@-1", "z", 0, 1, -1, None),
    ("mlp[1,5]@-2", "neuron", 1, 5, -2, None),
    ("resid.pre[1]", "resid.pre", 1, None, None, None),
    ("resid.pre[0]@-3", "resid.pre", 0, None, -3, None),
    ("resid.mid[1]@-1", "resid.mid", 1, None, -1, None),
    ("attn[1,3]@-1:-4", "probs", 1, 3, -1, -4),
]


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
@pytest.mark.parametrize("source", ["clean", "corrupt"])
def test_patch_equals_a_hand_hooked_transformers_forward(make_checkpoint, arch, source):
    folder = make_checkpoint(arch)
    session = session_for(folder)
    ref = Reference(folder, arch, session.loaded.encode)
    run_text, source_text = (CORRUPT, CLEAN) if source == "clean" else (CLEAN, CORRUPT)
    baseline = metric(session, "metric")
    assert baseline["metric_clean"] == pytest.approx(ref.run(CLEAN)[0], abs=1e-4)
    assert baseline["metric_corrupt"] == pytest.approx(ref.run(CORRUPT)[0], abs=1e-4)
    checked = 0
    for node, site, layer, unit, token, key in NODES:
        if site in ("resid.mid", "probs") and SITES[arch][{"resid.mid": "mid", "probs": "probs"}[site]] is None:
            continue  # no module boundary at that point in this transformers model
        got = metric(session, f"metric patch {node} from {source}")["metric"]
        want = ref.patched(run_text, source_text, site, layer, unit, token, key)
        assert got == pytest.approx(want, abs=1e-4), node
        checked += 1
    assert checked >= 5
    session.close()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_unequal_lengths_align_from_the_end(make_checkpoint, arch):
    folder = make_checkpoint(arch)
    session = session_for(folder, ((CLEAN, LONGER),))
    ref = Reference(folder, arch, session.loaded.encode)
    assert len(session.loaded.encode(LONGER)) > len(session.loaded.encode(CLEAN))
    for node, site, layer, unit, token in [("resid.pre[1]", "resid.pre", 1, None, None),
                                           ("attn[1,0]@-1", "z", 1, 0, -1), ("mlp[0,7]", "neuron", 0, 7, None)]:
        for source, run_text, source_text in [("clean", LONGER, CLEAN), ("corrupt", CLEAN, LONGER)]:
            got = metric(session, f"metric patch {node} from {source}")["metric"]
            assert got == pytest.approx(ref.patched(run_text, source_text, site, layer, unit, token), abs=1e-4)
    session.close()


def test_a_patch_beside_an_ablation(make_checkpoint):
    """The ablation applies to the prompt that runs, not to the source run."""
    folder = make_checkpoint("gpt2")
    session = session_for(folder)
    ref = Reference(folder, "gpt2", session.loaded.encode)
    got = metric(session, "metric ablate mlp[0,3]@-1=0 patch attn[1,2] from clean")["metric"]
    n = len(session.loaded.encode(CORRUPT))
    want = ref.patched(CORRUPT, CLEAN, "z", 1, 2, zero=[("neuron", 0, 3, n - 1)])
    assert got == pytest.approx(want, abs=1e-4)
    assert got != pytest.approx(ref.patched(CORRUPT, CLEAN, "z", 1, 2), abs=1e-4)
    session.close()


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_head_and_position_sweeps_equal_one_patch_at_a_time(make_checkpoint, arch):
    folder = make_checkpoint(arch)
    session = session_for(folder, ((CLEAN, CORRUPT), (CLEAN, LONGER)))
    ref = Reference(folder, arch, session.loaded.encode)
    runs = {0: (CORRUPT, CLEAN), 1: (LONGER, CLEAN)}
    heads = session.execute("patching of head from clean")[0].table.to_pylist()
    assert len(heads) == 2 * 2 * 4  # pairs x layers x heads
    for row in heads:
        run_text, source_text = runs[row["prompt_id"]]
        want = ref.patched(run_text, source_text, "z", row["layer"], row["unit"])
        assert row["metric_patched"] == pytest.approx(want, abs=1e-4)
        clean, corrupt = ref.run(source_text)[0], ref.run(run_text)[0]
        assert (row["metric_clean"], row["metric_corrupt"]) == pytest.approx((clean, corrupt), abs=1e-4)
        assert row["recovered"] == pytest.approx((want - corrupt) / (clean - corrupt), rel=1e-3, abs=1e-4)
    positions = session.execute("patching of resid.pre from clean by position where prompt = 1")[0].table.to_pylist()
    n_run, n_source = len(session.loaded.encode(LONGER)), len(session.loaded.encode(CLEAN))
    assert {r["position"] for r in positions} == set(range(n_run - n_source, n_run))  # aligned positions only
    for row in positions:
        want = ref.patched(LONGER, CLEAN, "resid.pre", row["layer"], None, row["position"])
        assert row["metric_patched"] == pytest.approx(want, abs=1e-4)
    session.close()


def test_sweep_from_corrupt_and_over_prompts(make_checkpoint):
    folder = make_checkpoint("gpt2")
    session = session_for(folder, ((CLEAN, CORRUPT), (CORRUPT, CLEAN)))
    ref = Reference(folder, "gpt2", session.loaded.encode)
    rows = session.execute("patching of mlp from corrupt")[0].table.to_pylist()
    for row in rows:
        run_text, source_text = (CLEAN, CORRUPT) if row["prompt_id"] == 0 else (CORRUPT, CLEAN)
        n = len(session.loaded.encode(run_text))
        # mlp[L] is the MLP's whole write: its down projection's output; patch it via every neuron's input
        _, kept = ref.run(source_text, capture=[("neuron", row["layer"], None)])
        want = ref.run(run_text, writes=[("neuron", row["layer"], None, range(n), None, kept[("neuron", row["layer"], None)][0])])[0]
        assert row["metric_patched"] == pytest.approx(want, abs=1e-4)
        assert row["recovered"] == pytest.approx(
            (want - row["metric_clean"]) / (row["metric_corrupt"] - row["metric_clean"]), rel=1e-3, abs=1e-4)
    mean = session.execute("patching of mlp from corrupt over prompts mean")[0].table.to_pylist()
    for layer_row in mean:
        per_pair = [r for r in rows if r["layer"] == layer_row["layer"]]
        assert layer_row["prompt_id"] is None
        assert layer_row["metric_patched"] == pytest.approx(sum(r["metric_patched"] for r in per_pair) / 2, abs=1e-6)
    session.close()


def test_sweeps_on_the_embedded_model_equal_transformers():
    from tdbql.executor.runtime.loading import DEFAULT_MODEL_DIR

    session = session_for("default")
    session.execute("set batch_size = 5")  # several variant batches per pair
    ref = Reference(DEFAULT_MODEL_DIR, "gpt2", session.loaded.encode)
    rows = session.execute("patching of head from clean where layer in 1..3")[0].table.to_pylist()
    assert len(rows) == 3 * session.loaded.config.n_heads
    for row in rows:
        want = ref.patched(CORRUPT, CLEAN, "z", row["layer"], row["unit"])
        assert row["metric_patched"] == pytest.approx(want, abs=2e-3)  # the spliced SAEs: reconstruction + error
    session.close()


def test_verify_equals_one_ablation_at_a_time(make_checkpoint):
    folder = make_checkpoint("gpt2")
    session = session_for(folder)
    [result] = session.execute("topk 6 act_times_grad of mlp, attn, head verify")
    assert result.message.startswith("verify: Spearman rank correlation")
    base = metric(session, "metric")["metric_clean"]
    for row in result.table.to_pylist():
        t, layer, unit = row["position"], row["layer"], row["unit"]
        node = {"mlp": f"mlp[{layer},{unit}]@{t}", "head": f"attn[{layer},{unit}]@{t}",
                "attn": f"attn[{layer},{unit}]@{t}:{row['attended']}"}[row["component"]]
        ablated = metric(session, f"metric ablate {node}=0")["metric"]
        assert row["actual_effect"] == pytest.approx(base - ablated, abs=1e-4), node
    [patched] = session.execute("topk 5 attrib_patch of mlp, attn verify")
    corrupt = metric(session, "metric")["metric_corrupt"]
    for row in patched.table.to_pylist():
        t, layer, unit = row["position"], row["layer"], row["unit"]
        node = f"mlp[{layer},{unit}]@{t}" if row["component"] == "mlp" else f"attn[{layer},{unit}]@{t}:{row['attended']}"
        got = metric(session, f"metric patch {node} from clean")["metric"]
        assert row["actual_effect"] == pytest.approx(got - corrupt, abs=1e-4), node
    session.close()


@pytest.mark.parametrize("text, message, column", [
    ("metric patch attn[1,0] from clean", "patching needs prompt pairs", 8),
    ("patching of head from clean", "patching needs prompt pairs", 1),
])
def test_patching_without_pairs_is_a_positioned_error(make_checkpoint, text, message, column):
    session = Session(model=str(make_checkpoint("gpt2")))
    session.execute(f'prompt "{CLEAN}"\ntarget " Mary" vs " John"')
    with pytest.raises(TdbqlError) as caught:
        session.execute(text)
    assert caught.value.message.startswith(message) and (caught.value.line, caught.value.column) == (1, column)
    assert session.execute("metric")[0].table.num_rows == 1  # the session is intact
    session.close()


def test_bad_patches_are_clean_errors(make_checkpoint):
    session = session_for(make_checkpoint("gpt2"), ((CLEAN, LONGER),))
    n_clean = len(session.loaded.encode(CLEAN))
    cases = [
        (f"metric patch resid.pre[0]@{n_clean + 5} from clean", "outside the prompt that runs"),
        ("metric patch resid.pre[0]@0 from clean", "has no counterpart in its clean prompt"),
        ("metric patch attn[7,0] from clean", "layer 7 is out of range"),
        ("metric patch block[0] from clean", "block cannot be patched"),
        ("select act of mlp verify", "verify checks a ranking"),
        ("topk 5 act over prompts mean verify", "verify runs per prompt"),
        ("patching of latent from clean", "patching of latent needs an autoencoder"),
        ("patching of head from clean by layer", "patching groups by position, prompt, not layer"),
    ]
    for text, message in cases:
        with pytest.raises(TdbqlError, match=message):
            session.execute(text)
    assert session.execute("metric")[0].table.num_rows == 1
    session.close()


def test_a_whole_residual_patch_at_layer_0_turns_the_run_into_its_source(make_checkpoint):
    """resid.pre[0] at every position is the whole input: routes and the lens of the patched
    corrupt run equal those of the clean prompt (the rows carry the corrupt prompt's tokens)."""
    session = session_for(make_checkpoint("gpt2"))
    patched = session.execute("routes patch resid.pre[0] from clean")[0].table
    lens = session.execute("logit_lens where token = -1 topk 3 patch resid.pre[0] from clean")[0].table
    session.execute(f'prompt "{CLEAN}"')
    clean = session.execute("routes")[0].table
    clean_lens = session.execute("logit_lens where token = -1 topk 3")[0].table
    assert patched.column("weight").to_pylist() == pytest.approx(clean.column("weight").to_pylist())
    assert patched.num_rows == clean.num_rows
    assert lens.column("vocab_id").to_pylist() == clean_lens.column("vocab_id").to_pylist()
    assert lens.column("logit").to_pylist() == pytest.approx(clean_lens.column("logit").to_pylist(), abs=1e-5)
    session.close()


def test_neuron_and_latent_sweeps_equal_single_patches(make_checkpoint, tmp_path):
    from tdbql.executor.runtime.autoencoder import Autoencoder, save_saelens

    session = session_for(make_checkpoint("gpt2"))
    d_mlp = session.loaded.config.d_mlp
    torch.manual_seed(0)
    ae = Autoencoder(torch.randn(d_mlp, 6) * 0.3, torch.zeros(6), torch.randn(6, d_mlp) * 0.3, torch.zeros(d_mlp),
                     site="mlp", layer=1)
    save_saelens(ae, tmp_path / "sae")
    session.execute(f"sae mlp from '{tmp_path / 'sae'}'")
    neurons = session.execute("patching of neuron from clean where layer = 1 and unit < 3")[0].table.to_pylist()
    latents = session.execute("patching of latent from clean where unit in (0, 4)")[0].table.to_pylist()
    assert [r["unit"] for r in neurons] == [0, 1, 2] and {r["component"] for r in latents} == {"mlp_sae"}
    for row in neurons:
        single = metric(session, f"metric patch mlp[1,{row['unit']}] from clean")["metric"]
        assert row["metric_patched"] == pytest.approx(single, abs=1e-5)
    for row in latents:
        single = metric(session, f"metric patch mlp_sae[1,{row['unit']}] from clean")["metric"]
        assert row["metric_patched"] == pytest.approx(single, abs=1e-5)
    session.close()
