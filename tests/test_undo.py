"""`peftkit.undo`: a failed call gives the model back; a parameter that can be rebuilt is not held meanwhile."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from peftkit.undo import rebuild_on_failure, restore_on_failure


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def test_a_failure_puts_back_parameters_modules_and_flags() -> None:
    model = _model()
    first, weight = model[0], model[0].weight
    with pytest.raises(RuntimeError, match="late"), restore_on_failure(model):
        model[0] = nn.Identity()
        model[1].weight = nn.Parameter(torch.zeros(2, 4))
        model[1].flag = True
        weight.requires_grad_(False)
        raise RuntimeError("late")
    assert model[0] is first and model[0].weight is weight and weight.requires_grad
    assert model[1].weight.abs().sum() > 0 and not hasattr(model[1], "flag")


def test_a_rebuildable_parameter_is_released_and_rebuilt_only_on_failure() -> None:
    model = _model()
    saved = model[0].weight.detach().clone()
    calls: list[str] = []

    def put_back() -> None:
        calls.append("put back")
        model[0].weight = nn.Parameter(saved.clone())

    with restore_on_failure(model), restore_on_failure(model):  # nested: both snapshots let it go
        old = weakref.ref(model[0].weight)
        rebuild_on_failure(model, model[0], "weight", put_back)
        model[0].weight = nn.Parameter(torch.zeros(4, 4))
        gc.collect()
        assert old() is None  # no snapshot holds the replaced parameter
    assert calls == [] and model[0].weight.abs().sum() == 0  # success: the new one stays, nothing rebuilt

    with pytest.raises(RuntimeError), restore_on_failure(model):
        rebuild_on_failure(model, model[0], "weight", put_back)
        model[0].weight = nn.Parameter(torch.ones(4, 4))
        raise RuntimeError("late")
    assert calls == ["put back"]
    torch.testing.assert_close(model[0].weight, saved, rtol=0, atol=0)
    assert model[1].weight.abs().sum() > 0  # the others as they were


def test_outside_a_snapshot_nothing_is_recorded() -> None:
    model = _model()
    rebuild_on_failure(model, model[0], "weight", lambda: None)  # no open snapshot: a no-op
    with pytest.raises(RuntimeError), restore_on_failure(model):
        model[0].weight = nn.Parameter(torch.ones(4, 4))
        raise RuntimeError("late")
    assert model[0].weight.abs().sum() != 16
