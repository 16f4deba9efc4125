"""The catalog and the derivers agree: every scalar the catalog defines on a component has a
deriver there whose parts exist (this would have caught `in_edge` binding for `head` and then
failing at run time), and the planner reaches a deriver for every (scalar, component) the binder
accepts."""

from __future__ import annotations

import pytest

from tdbql.executor.scalars import DERIVERS, RECIPES, deriver
from tdbql.query import catalog

PAIRS = [(name, kind) for name, scalar in catalog.SCALARS.items() for kind in scalar.applies_to]


def test_every_catalog_scalar_has_one_recipe():
    assert set(RECIPES) == set(catalog.SCALARS)


@pytest.mark.parametrize("scalar, kind", PAIRS, ids=[f"{s}-{k}" for s, k in PAIRS])
def test_every_scalar_has_a_deriver_for_every_component_it_applies_to(scalar, kind):
    found = deriver(scalar, kind)
    assert found is not None and found.scalar == scalar
    assert found.missing_parts(kind) == []


def test_no_deriver_outside_the_catalog():
    assert set(DERIVERS) == set(PAIRS)
    assert deriver("in_edge", "head") is None and deriver("contribution", "mlp_sae") is None


def test_downstream_variants_exist_where_a_node_can_be_downstream_of_a_trace():
    for kind in ("mlp", "attn", *catalog.LATENTS):
        below = deriver("in_edge", kind, downstream=True)
        assert below.parts == ("jvp_pre",) and below.missing_parts(kind) == []
    assert deriver("in_edge", "embed", downstream=True) is deriver("in_edge", "embed")  # never downstream


def test_catalog_names_are_consistent():
    for scalar in catalog.SCALARS.values():
        assert scalar.help and set(scalar.applies_to) <= set(catalog.COMPONENTS)
        for param in scalar.params:
            assert param.default in param.choices
    for latent in catalog.LATENTS:
        assert catalog.COMPONENTS[latent].error in catalog.SAE_ERRORS
    assert set(catalog.WRITTEN_COMPONENTS) == set(catalog.COMPONENTS) | {catalog.SAE_WORD}
    assert catalog.row_components(("sae_error",), ("mlp_sae",)) == ("mlp_sae", "mlp_sae_error")
    assert catalog.row_components(("act",), ("mlp_sae",)) == ("mlp_sae",)
