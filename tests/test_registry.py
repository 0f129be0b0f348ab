"""The method registry is the only source of a method's family and its post-processing defaults."""

from __future__ import annotations

import pytest

from workflows.report.sections import label as report_label
from xrcam import explain, metrics, scoring


@pytest.fixture
def registry():
    before = dict(explain._METHODS)
    yield
    explain._METHODS.clear()
    explain._METHODS.update(before)


def test_family_defaults_come_from_the_registry():
    assert [m for m in explain.list_methods() if explain.default_relu(m)] == explain.list_methods("gradient")
    assert explain.method_family("xrelevancecam").score == "contrastive"
    assert explain.method_family("random") is None and not explain.default_relu("random")
    assert not explain.default_relu("inverted_gradcam")
    assert explain.method_title("gradcampp") == "GradCAM++" and explain.method_title("random") == "random"


def test_a_new_relevance_method_is_one_registered_function(registry):
    @explain.register_method("meanrelevance", family="relevance", title="MeanRelevanceCAM")
    def _mean(r, a):
        return r.mean(dim=(2, 3))

    assert "meanrelevance" in explain.list_methods("relevance")
    assert explain.method_title("meanrelevance") == "MeanRelevanceCAM"
    assert report_label("meanrelevance") == "MeanRelevanceCAM"  # the report reads the registered title
    assert report_label("inverted_meanrelevance") == "MeanRelevanceCAM inverted (sign check)"
    assert explain.default_relu("meanrelevance") is False
    assert scoring.default_relu("meanrelevance") is False
    assert metrics.score_function("meanrelevance") is metrics.contrastive_score

    @explain.register_method("meangradient", family="gradient")
    def _grad(g, a):
        return g.mean(dim=(2, 3))

    assert scoring.default_relu("meangradient") is True
    assert metrics.score_function("meangradient") is metrics.logit_score
