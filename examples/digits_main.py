"""The main job: train the digits CNN in fp32, compress it with DKMCallback through LightningCLI,
and print accuracy before and after with the compression report.

    python examples/digits_main.py --config examples/digits_dkm.yaml [--trainer.max_epochs 3 ...]

TensorBoard logs go to ``outputs/digits/tensorboard`` (``tensorboard --logdir outputs/digits``);
the report (JSON + Markdown) to ``outputs/digits/dkm``. With ``save_artifact: false`` no
artifact is written, and the check that the model loaded from it matches is skipped (said so).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.cli import LightningCLI

from lightning_dkm import DKMCallback, load_compressed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsCNN, DigitsDataModule


class DigitsCLI(LightningCLI):
    """LightningCLI plus ``--pretrain_epochs``: fp32 epochs before the DKM fine-tuning."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--pretrain_epochs", type=NonNegativeInt, default=5,
                            help="fp32 epochs first")


def test_accuracy(trainer: pl.Trainer, model: pl.LightningModule, data) -> float:
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"])


def main(args: list[str] | None = None) -> dict[str, float | None]:
    cli = DigitsCLI(DigitsCNN, DigitsDataModule, run=False, args=args)
    model, data = cli.model, cli.datamodule

    pretrain = pl.Trainer(
        max_epochs=cli.config["pretrain_epochs"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    pretrain.fit(model, datamodule=data)
    before = test_accuracy(pretrain, model, data)

    cli.trainer.fit(model, datamodule=data)  # DKMCallback finalizes and prints the report
    after = test_accuracy(cli.trainer, model, data)

    dkm = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DKMCallback))
    if dkm.report is None:  # nothing finalized: there is nothing to report or compare
        raise SystemExit("DKMCallback wrote no report: finalize is false, or fit ended before "
                         "its start_epoch (its warning says so)")
    # The artifact DKMCallback wrote, loaded into a fresh model of the same architecture; with
    # save_artifact: false there is none, and only that check is skipped.
    loaded: float | None = None
    size: int | None = None
    if dkm.artifact_path is not None:
        fresh = DigitsCNN(**{k: v for k, v in model.hparams.items() if not k.startswith("_")})
        load_compressed(fresh, dkm.artifact_path)
        loaded = test_accuracy(cli.trainer, fresh, data)
        size = dkm.artifact_path.stat().st_size

    print(f"\ntest accuracy  fp32: {before:.4f}   DKM-compressed: {after:.4f}"
          + ("" if loaded is None else f"   loaded from artifact: {loaded:.4f}"))
    sizes = (f"report: {dkm.report.total_bytes:,} bytes + header; "
             f"fp32 model: {dkm.report.fp32_bytes:,} bytes")
    if dkm.artifact_path is None:
        print(f"no artifact was written (save_artifact: false), so the check that the model "
              f"loaded from it matches the finalized model is skipped ({sizes})")
    else:
        print(f"artifact {dkm.artifact_path}: {size:,} bytes on disk ({sizes})")
    coreml = dkm.output_paths.get("coreml")
    if coreml is not None:  # export_coreml: true in the YAML (needs the coreml extra)
        from lightning_dkm.export.coreml import package_bytes, read_coreml_palettes

        print(f"Core ML package {coreml}: {package_bytes(coreml):,} bytes, "
              f"{len(read_coreml_palettes(coreml))} LUT-palettized tensors "
              "(runs on macOS / iOS 18+)")
    coreai = dkm.report.exports.get("coreai")
    if coreai is not None:  # export_coreai: true in the YAML (needs the coreai extra)
        print(f"Core AI package {coreai['path']}: {coreai['package_bytes']:,} bytes, "
              f"{coreai['lut_ops']} LUT ops; run in coreai-core's runtime: max |runtime - "
              f"PyTorch| = {coreai['max_abs_difference']:.2g} (allowed "
              f"{coreai['tolerance']:.2g}; runs on iOS / macOS 27+)")
    if loaded is not None and loaded != after:
        raise SystemExit("the model loaded from the artifact does not match the finalized model")
    return {"fp32_test_acc": before, "dkm_test_acc": after, "loaded_test_acc": loaded,
            "artifact_bytes": size,
            "coreml_bytes": None if coreml is None else package_bytes(coreml),
            "coreai_bytes": None if coreai is None else coreai["package_bytes"],
            "coreai_max_abs_difference": None if coreai is None else coreai[
                "max_abs_difference"]}


if __name__ == "__main__":
    main()
