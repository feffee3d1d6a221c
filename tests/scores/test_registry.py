"""The one list of score methods (qpsa.scores.registry) that baseline, score and the study use."""

from __future__ import annotations

import inspect

import pytest

from qpsa.errors import QpsaError
from qpsa.scores.registry import METHODS, find_method, method_names


def test_every_registered_method_takes_the_common_signature():
    for m in METHODS.values():
        params = list(inspect.signature(m.compute()).parameters)
        assert params[:4] == ["loaded", "tokens", "settings", "advance"], m.name
        assert m.command in ("baseline", "score")


def test_registry_lookups():
    assert method_names("baseline") == ["layer_ablation", "weight_norm", "random", "block_influence",
                                        "angular_distance", "fisher"]
    assert method_names("score") == ["qpsa"] and "qpsa" in method_names()
    assert find_method("fisher").name == "fisher"
    with pytest.raises(QpsaError, match="unknown method 'qpsa'; known: layer_ablation, weight_norm"):
        find_method("qpsa", "baseline")
