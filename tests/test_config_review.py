"""Every DKMCallback argument a config can get wrong is refused when the callback is built,
naming the argument, the value and what is allowed: never silently ignored or coerced, never
after epochs of training."""

from __future__ import annotations

import pytest

from lightning_dkm import DKMCallback


# -- temperature: a mapping's schedule is built (and so checked) at construction ----------------
@pytest.mark.parametrize(
    ("temperature", "message"),
    [
        ({"schedule": "step", "start": 1e-2, "gamma": 0.5}, r"temperature.*step_size"),
        ({"schedule": "step", "start": 1e-2, "step_size": 2}, r"temperature.*gamma"),
        ({"schedule": "step", "start": 1e-2, "step_size": 0, "gamma": 0.5},
         r"temperature.*step_size must be an int >= 1, got 0"),
        ({"schedule": "step", "start": 1e-2, "step_size": 2, "gamma": -1.0},
         r"temperature.*gamma must be a finite number > 0, got -1.0"),
        ({"schedule": "exponential", "start": 1e-1, "end": 1e-3, "gamma": 0.5},
         r"temperature.*\['gamma'\].*only 'step' takes"),
        ({"schedule": "linear", "step_size": 3}, r"temperature.*\['step_size'\].*only 'step'"),
        ({"schedule": "no_such_package.module.tau"}, r"temperature.*no_such_package"),
    ],
    ids=["step-without-step_size", "step-without-gamma", "step_size-0", "negative-gamma",
         "gamma-on-exponential", "step_size-on-linear", "unimportable-import-path"],
)
def test_a_temperature_mapping_that_cannot_build_its_schedule_fails_at_construction(
    temperature, message
):
    # Before: accepted here, refused only when the first soft step set tau (with
    # start_epoch > 0, after whole epochs of training).
    with pytest.raises(ValueError, match=message):
        DKMCallback(temperature=temperature, start_epoch=3)


def test_a_temperature_mapping_with_an_import_path_still_builds():
    callback = DKMCallback(temperature={"schedule": "lightning_helpers.tau_of_unit",
                                        "interval": "epoch"})
    assert callback.temperature.schedule == "lightning_helpers.tau_of_unit"
