"""Which Hessian estimate allocates widths better on a ReLU network (#24).

``average_bits`` weighs each tensor's clustering error by Hutchinson's Hessian diagonal. The
double backward (``post_training.hessian_diagonal``) gives a ReLU a second derivative of 0; the
finite difference (``post_training.hessian_diagonal_fd``) also sees the gradient's jumps across
the kinks its step crosses. On GELU models (the accuracy study's MiniLM and char-LM) both chose
the same widths (``benchmarks/hessian_fd.py``); on ReLU networks they differ. This measures
what that difference does to a trained, clustered ReLU network, end to end through
``DKMCallback``:

for each seed, the digits CNN of the README's main job (``examples/digits.py``: three ReLU
convolutions with max-pooling and two Linear layers, scikit-learn's digits) is trained in fp32
for ``--pretrain-epochs``, then fine-tuned with ``DKMCallback(average_bits=B,
min_size=2048)`` for ``--epochs`` from the same weights, once with each estimate (the callback
as it is, with the estimate it calls swapped), and once with uniform widths
(``bits=2, average_bits=None``) beside them. Each fit ends with the callback's snap to the palettes;
the rows give the held-out accuracy and cross-entropy of the snapped model, its clustered
bytes and the widths chosen. Writes ``benchmarks/results/hessian_fd_relu.json``.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hessian_fd_relu.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from digits import DigitsCNN, DigitsDataModule  # noqa: E402

from lightning_dkm import DKMCallback  # noqa: E402
from lightning_dkm.model import post_training  # noqa: E402

ESTIMATES = {"double_backward": post_training.hessian_diagonal,
             "finite_difference": post_training.hessian_diagonal_fd}


@contextlib.contextmanager
def estimate(name: str):
    """Within: the callback's allocation calls the estimate ``name`` (the Hessian it calls
    first, ``post_training.hessian_diagonal``, swapped); yields the list its calls are
    counted in, so that a run can show that the swap took effect."""
    original, chosen, calls = post_training.hessian_diagonal, ESTIMATES[name], []

    def counted(*args, **kwargs):
        calls.append(name)
        return chosen(*args, **kwargs)

    post_training.hessian_diagonal = counted
    try:
        yield calls
    finally:
        post_training.hessian_diagonal = original


def _trainer(epochs: int, callbacks: list[pl.Callback], limit_batches: int | None,
             root: str) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, limit_train_batches=limit_batches, logger=False,
                      default_root_dir=root, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu",
                      devices=1, callbacks=callbacks, deterministic=True)


@torch.no_grad()
def held_out(model: DigitsCNN, data: DigitsDataModule) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on the test split."""
    model.eval()
    correct, loss, count = 0, 0.0, 0
    for x, y in data.test_dataloader():
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        count += y.numel()
    return correct / count, loss / count


def run(seeds: list[int], budgets: list[float], pretrain_epochs: int, epochs: int, log,
        limit_batches: int | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as root:  # the reports and artifacts fits write
        return _runs(seeds, budgets, pretrain_epochs, epochs, log, limit_batches, root)


def _runs(seeds: list[int], budgets: list[float], pretrain_epochs: int, epochs: int, log,
          limit_batches: int | None, root: str) -> list[dict]:
    rows = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        data = DigitsDataModule(batch_size=64, seed=seed)
        data.setup()
        pretrained = DigitsCNN()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer(pretrain_epochs, [], limit_batches, root).fit(pretrained, data)
        acc, ce = held_out(pretrained, data)
        rows.append({"seed": seed, "method": "fp32", "accuracy": acc, "cross_entropy": ce})
        log(f"seed {seed} fp32: accuracy {acc:.4f}, cross-entropy {ce:.4f}")
        runs = [(b, way) for b in budgets for way in ESTIMATES] + [(None, "uniform")]
        for budget, way in runs:
            # train mode: held_out() left the pretrained model in eval mode, and Lightning
            # keeps submodules' modes, where DKM would snap instead of training
            model = copy.deepcopy(pretrained).train()
            callback = DKMCallback(bits=2 if budget is None else None, average_bits=budget,
                                   min_size=2048,
                                   verbose=False, log_histograms=False)
            pl.seed_everything(seed, verbose=False)
            start = time.process_time()
            with (estimate(way) if way in ESTIMATES else contextlib.nullcontext([])) as calls, \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _trainer(epochs, [callback], limit_batches, root).fit(model, data)
            if way in ESTIMATES and not calls:
                raise RuntimeError(f"the allocation did not call the {way} estimate")
            seconds = time.process_time() - start
            acc, ce = held_out(model, data)
            allocation = callback.bit_allocation
            row = {"seed": seed, "method": way, "average_bits": budget, "accuracy": acc,
                   "cross_entropy": ce, "fit_cpu_seconds": round(seconds, 2),
                   "estimate_calls": len(calls),
                   "clustered_bytes": callback.report.clustered_bytes,
                   "widths": None if allocation is None else allocation.bits}
            rows.append(row)
            log(f"seed {seed} {way} average_bits={budget}: accuracy {acc:.4f}, cross-entropy "
                f"{ce:.4f}, {row['clustered_bytes']:,} clustered bytes, widths "
                f"{row['widths']}")
    return rows


def summary(rows: list[dict], log) -> dict:
    """Mean and standard deviation over seeds per method and budget."""
    out = {}
    keys = sorted({(r["method"], r.get("average_bits")) for r in rows},
                  key=lambda k: (str(k[1]), k[0]))
    for method, budget in keys:
        mine = [r for r in rows if r["method"] == method and r.get("average_bits") == budget]
        entry = {}
        for metric in ("accuracy", "cross_entropy"):
            values = [r[metric] for r in mine]
            entry[metric] = {"mean": statistics.mean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        out[f"{method}@{budget}"] = entry
        log(f"{method:>18} average_bits={budget}: accuracy "
            f"{entry['accuracy']['mean']:.4f} +- {entry['accuracy']['std']:.4f}, cross-entropy "
            f"{entry['cross_entropy']['mean']:.4f} +- {entry['cross_entropy']['std']:.4f}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--limit-batches", type=int, default=None,
                        help="training batches per epoch (default: all 17)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "hessian_fd_relu.json")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    def log(message: str) -> None:
        print(message, flush=True)

    load = os.getloadavg()
    rows = run(args.seeds, args.budgets, args.pretrain_epochs, args.epochs, log,
               args.limit_batches)
    result = {"command": "python benchmarks/hessian_fd_relu.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "load_average_before": load,
              "load_average_after": os.getloadavg(), "rows": rows,
              "summary": summary(rows, log)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
