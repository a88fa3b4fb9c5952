"""in_eval_mode: eval inside, every module's own training flag back afterwards."""

import pytest
from torch import nn

from lightning_dkm.model.eval_mode import in_eval_mode


def _model_with_a_frozen_norm() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # fine-tuned as a fixed layer
    return model


def test_every_module_is_in_eval_mode_inside():
    model = _model_with_a_frozen_norm()
    with in_eval_mode(model) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())


def test_each_flag_is_restored_as_it_was_not_by_train():
    model = _model_with_a_frozen_norm()
    with in_eval_mode(model):
        pass
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_flags_are_restored_after_an_exception():
    model = _model_with_a_frozen_norm()
    with pytest.raises(RuntimeError, match="boom"), in_eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]
