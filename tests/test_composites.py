"""LRP composites as data: named (module types, rule) lists, first match wins, registered like methods;
presets validate their own parameters; architecture specifics live in the canonizers only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from explain_helpers import images, random_model
from torch import nn

from xrcam.errors import XrcamConfigError
from xrcam.explain import stage_signals
from xrcam.lrp import composites, list_composites, make_composite, register_composite
from xrcam.lrp.rules import Epsilon, PassThrough, Proportional, ZPlus


@pytest.fixture
def registry():
    """Registrations made by a test are removed afterwards."""
    before = dict(composites._COMPOSITES)
    yield
    composites._COMPOSITES.clear()
    composites._COMPOSITES.update(before)


def test_the_built_in_composites_and_their_first_matching_entries():
    assert list_composites()[:3] == ["reference", "epsilon", "alphabeta"]
    ref = make_composite("reference")
    conv, bn, pool = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1)
    assert isinstance(ref.rule_for(conv), ZPlus) and ref.rule_for(conv, signed_input=True).signed_input
    assert isinstance(ref.rule_for(bn), PassThrough) and isinstance(ref.rule_for(pool), Proportional)
    assert ref.rule_for(nn.Flatten()) is None
    eps = make_composite("epsilon", epsilon=0.5)
    assert isinstance(eps.rule_for(nn.Linear(2, 2)), Epsilon) and eps.rule_for(nn.Linear(2, 2)).epsilon == 0.5
    assert eps.params == {"epsilon": 0.5}
    assert make_composite("alphabeta").params == {"alpha": 2.0, "beta": 1.0}


def test_presets_validate_their_own_parameters():
    with pytest.raises(XrcamConfigError, match="alpha - beta = 1"):
        make_composite("alphabeta", alpha=3.0)
    with pytest.raises(XrcamConfigError, match="takes no parameter"):
        make_composite("reference", epsilon=1.0)
    with pytest.raises(XrcamConfigError, match="unknown LRP rule preset 'gamma'; choose one of reference"):
        make_composite("gamma")


def test_a_new_composite_is_one_registered_function(registry):
    @register_composite("zplus-copy")
    def _copy(scale: float = 1.0):
        if scale != 1.0:
            raise XrcamConfigError("zplus-copy: scale must be 1")
        return [
            ((nn.Conv2d, nn.Linear), lambda m, signed: ZPlus(m, signed_input=signed)),
            *composites._COMMON,
        ]

    assert "zplus-copy" in list_composites()
    with pytest.raises(XrcamConfigError, match="scale must be 1"):
        make_composite("zplus-copy", scale=2.0)
    model, x = random_model("resnet18", 2), images()
    ref = stage_signals(model, x.clone().requires_grad_(True), gradients=False)
    same = stage_signals(model, x.clone().requires_grad_(True), gradients=False, composite="zplus-copy")
    for layer in ref.relevance:  # the same entries give bit-identical relevance
        assert torch.equal(same.relevance[layer], ref.relevance[layer])


def test_first_match_wins(registry):
    @register_composite("eps-head")
    def _eps_head():
        return [
            ((nn.Linear,), lambda m, signed: Epsilon(m, epsilon=0.25)),
            ((nn.Conv2d, nn.Linear), lambda m, signed: ZPlus(m, signed_input=signed)),
            *composites._COMMON,
        ]

    head = make_composite("eps-head")
    assert isinstance(head.rule_for(nn.Linear(2, 2)), Epsilon)
    assert isinstance(head.rule_for(nn.Conv2d(1, 1, 1)), ZPlus)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
    return names


def test_timm_is_named_in_the_canonizers_only():
    lrp = Path(composites.__file__).parent
    assert "timm" in _imports(lrp / "canonizers.py")
    for name in ("composites.py", "rules.py", "__init__.py"):
        assert "timm" not in _imports(lrp / name), name
