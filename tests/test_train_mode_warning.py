"""DKMCallback warns at train start when clustered tensors are in eval mode: there a clustered
weight is snapped instead of trained by DKM, and Lightning keeps each submodule's own mode
(a model from ``from_pretrained()`` comes in eval mode)."""

from __future__ import annotations

import warnings

import pytest

from lightning_dkm import DKMCallback
from tests.lightning_helpers import TinyNet, trainer

MESSAGE = "clustered tensors are in eval mode at the start of training"


def _fit(tmp_path, model: TinyNet) -> list[str]:
    dkm = DKMCallback(bits=2, verbose=False, log_histograms=False, finalize=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[dkm]).fit(model)
    return [str(w.message) for w in caught]


def test_a_model_left_in_eval_mode_is_named_with_the_fix(tmp_path):
    model = TinyNet()
    model.body.eval()  # as from_pretrained() leaves a model
    messages = [m for m in _fit(tmp_path, model) if MESSAGE in m]
    assert len(messages) == 1
    assert "2 of 2 clustered tensors" in messages[0]
    assert "body.0.weight" in messages[0] and "call .train()" in messages[0]


def test_a_model_in_train_mode_fits_without_the_warning(tmp_path):
    assert not [m for m in _fit(tmp_path, TinyNet()) if MESSAGE in m]


@pytest.mark.parametrize("layer", [0, 2])
def test_one_layer_in_eval_mode_is_the_one_named(tmp_path, layer):
    model = TinyNet()
    model.body[layer].eval()
    (message,) = [m for m in _fit(tmp_path, model) if MESSAGE in m]
    assert f"1 of 2 clustered tensors are in eval mode at the start of training (body.{layer}" \
        in message
