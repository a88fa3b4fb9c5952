"""Every DKMCallback argument a config can get wrong is refused when the callback is built,
naming the argument, the value and what is allowed: never silently ignored or coerced, never
after epochs of training."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from extras import need

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


# -- epsilon: the early-stop tolerance is a finite number >= 0 ---------------------------------
@pytest.mark.parametrize("epsilon",
                         [float("inf"), float("-inf"), float("nan"), -1e-4, "1e-4", True])
def test_epsilon_must_be_a_finite_number_at_least_zero(epsilon):
    # Before: inf was accepted and stopped every DKM loop after its first iteration (every
    # centroid moves less than inf), so max_iter was silently ignored.
    with pytest.raises(ValueError, match=rf"epsilon must be a finite number >= 0 .*got "
                                         rf"{re.escape(repr(epsilon))}"):
        DKMCallback(epsilon=epsilon)


def test_epsilon_zero_is_allowed():
    assert DKMCallback(epsilon=0).epsilon == 0.0


# -- seed -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1.7, True, "x", None])
def test_seed_must_be_an_int(seed):
    # Before: 1.7 became 1 and True became 1 silently; "x" failed in int() without naming seed.
    with pytest.raises(ValueError, match=rf"seed must be an int; got {seed!r}"):
        DKMCallback(seed=seed)


# -- the plain switches and save_dir ----------------------------------------------------------
@pytest.mark.parametrize("name", ["finalize", "save_artifact", "log_histograms", "verbose"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_a_switch_must_be_true_or_false(name, value):
    # Before: "false" (truthy) finalized / saved / printed; export_coreml and export_coreai
    # were already checked so.
    with pytest.raises(ValueError, match=rf"{name} must be True or False; got {value!r}"):
        DKMCallback(**{name: value})


@pytest.mark.parametrize("save_dir", [5, "", ["out"]])
def test_save_dir_must_be_a_path_or_none(save_dir):
    with pytest.raises(ValueError, match=r"save_dir must be None .* or a non-empty path"):
        DKMCallback(save_dir=save_dir)


def test_save_dir_takes_a_string_or_a_path(tmp_path):
    assert DKMCallback(save_dir=str(tmp_path)).save_dir == str(tmp_path)
    assert DKMCallback(save_dir=tmp_path).save_dir == tmp_path


# -- Deep k-Means' options are not silently ignored by the other methods -----------------------
@pytest.mark.parametrize("method", ["dkm", "hard"])
@pytest.mark.parametrize(
    "options", [{"regularization": 0.5}, {"refresh_every": 7}],
    ids=["regularization", "refresh_every"],
)
def test_deep_kmeans_options_with_another_method_are_refused(method, options):
    # Before: accepted and ignored (hard_epoch with a method that ignores it is refused).
    (name, value), = options.items()
    with pytest.raises(ValueError, match=rf"{name}={value!r} only applies to "
                                         rf"method='deep_kmeans'; got method='{method}'"):
        DKMCallback(method=method, **options)


def test_deep_kmeans_options_configure_deep_kmeans():
    method = DKMCallback(method="deep_kmeans", regularization=0.5, refresh_every=7).method
    assert (method.regularization, method.refresh_every) == (0.5, 7)


# -- temperature entropies are finite ---------------------------------------------------------
@pytest.mark.parametrize("end_entropy", [float("inf"), float("nan")])
def test_an_infinite_end_entropy_is_refused(end_entropy):
    # Before: inf was accepted (and silently became half of log2 k at calibration).
    with pytest.raises(ValueError, match=r"end_entropy must be a number of bits > 0; "
                                         r"got (inf|nan) \(it must be finite\)"):
        DKMCallback(temperature={"end_entropy": end_entropy})


# -- the main job's own argument --------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def digits_main():
    """The ``examples/digits_main.py`` module (the examples folder is no package)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import digits_main
    finally:
        sys.path.remove(str(EXAMPLES))
    return digits_main


def test_the_main_job_refuses_a_negative_pretrain_epochs():
    # Before: --pretrain_epochs -1 became Trainer(max_epochs=-1): fp32 training without end.
    main = digits_main()
    with pytest.raises(SystemExit) as exit_:
        main.DigitsCLI(main.DigitsCNN, main.DigitsDataModule, run=False,
                       args=["--config", str(EXAMPLES / "digits_dkm.yaml"),
                             "--pretrain_epochs", "-1"])
    assert exit_.value.code == 2


def test_the_main_job_without_an_artifact_reports_and_skips_the_artifact_check(tmp_path, capsys):
    # Before: save_artifact: false trained, printed the report, then crashed in
    # load_compressed(fresh, None) (TypeError) reading the artifact path that was not written.
    need("sklearn")  # the digits data
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
seed_everything: 0
pretrain_epochs: 0
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  limit_test_batches: 1
  default_root_dir: {tmp_path}
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_dkm.DKMCallback
      init_args:
        bits: 2
        save_dir: {tmp_path / "dkm"}
        save_artifact: false
        log_histograms: false
data:
  batch_size: 32
""")
    results = digits_main().main(["--config", str(config)])
    printed = capsys.readouterr().out
    assert "DKM-compressed:" in printed and "report:" in printed
    assert "no artifact was written (save_artifact: false)" in printed
    assert results["loaded_test_acc"] is None and results["artifact_bytes"] is None
    assert results["dkm_test_acc"] is not None
    assert not (tmp_path / "dkm" / "model.dkm.safetensors").exists()
