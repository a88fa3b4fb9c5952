"""Step time and peak memory of DKM training vs plain training of the same model, side by side.

    python benchmarks/perf_step.py                       # the default set (several minutes)
    python benchmarks/perf_step.py --models cnn --bits 2 4 --steps 20

For every (model, bits, implementation) it builds a plain model and a DKM copy (DKM on every
Linear/Conv/Embedding weight of >= 2048 elements, cluster_dim 1, max_iter 3, Adam; the forward
runs in ``clustering_pass(model)`` as in ``DKMCallback``: the soft ``unique`` weights of the
model are clustered by one batched call, and a weight read twice in one forward is clustered
once; ``--implementations`` default ``auto``, the library's default) and times
their training steps *interleaved* (plain, DKM, plain, DKM, ...), so that load on the machine
hits both alike; it prints the medians over ``--steps`` steps after ``--warmup`` and the ratio.
Peak memory is measured in fresh subprocesses (process peak RSS on CPU, or
``torch.cuda.max_memory_allocated`` on a GPU), one for the plain and one for the DKM model, and
the ratio of the two is printed with the extra megabytes. A last table shows DKM's extra memory
for ``max_iter`` 1, 3 and 9. On CUDA (``--device cuda``, the default where CUDA exists unless
``--clock cpu`` asks for the CPU's time) every row also reports
``torch.cuda.max_memory_allocated`` over one plain and one DKM step, measured in the timing
process (with ``--no-memory`` too): the peak and how far it rose above the memory allocated
before the step.

On the digits CNN at 2 bits the same interleaved run also times coremltools'
``DKMPalettizer`` at its defaults on the same layers (``--apple`` / ``--no-apple`` to choose;
needs the ``studies`` extra) and prints how many times faster our DKM step is.

``--clock cpu`` times each step by the process's CPU time, ``--threads N`` sets torch's threads
(``benchmarks/clocks.py`` says when to use them).

``--json PATH`` writes every number for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clocks
from models import WORKLOADS

import lightning_dkm
from lightning_dkm.engine.clustering_pass import clustering_pass

#: DKM step / plain step targets (#14): <= 1.25 on every model of the default set.
TARGETS = {("cnn", 2): 1.25, ("cnn", 4): 1.25, ("resnet18", 4): 1.25, ("minilm", 4): 1.25}
#: Apple's DKMPalettizer step / our DKM step on the same model, timed in the same run (#14).
APPLE_SPEEDUP_TARGET = 8.0


def build(model_name: str, device: str):
    torch.manual_seed(0)
    return WORKLOADS[model_name].build().to(device)


def add_dkm(model, bits: int, implementation: str, max_iter: int, epsilon: float = 0.0,
            gradient: str = "unrolled"):
    """DKM on every supported weight of >= 2048 elements; by default epsilon 0, so every step
    runs ``max_iter`` iterations (the worst case)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the min_size skip warning
        targets = lightning_dkm.select_targets(model, lightning_dkm.ClusterSpec(bits=bits))
    lightning_dkm.attach(
        model, targets, implementation=implementation, max_iter=max_iter, epsilon=epsilon,
        gradient=gradient,
        temperature=1e-2,
    )
    return model


def add_apple_dkm(model, bits: int):
    """coremltools' DKMPalettizer at its defaults (only ``n_bits`` set) on the modules whose
    weights ``add_dkm`` clusters; returns ``(model, palettizer)``."""
    from apple_dkm import prepare_apple_dkm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        targets = lightning_dkm.select_targets(model, lightning_dkm.ClusterSpec(bits=bits))
    return prepare_apple_dkm(model, [t.module_name for t in targets], bits)


def make_step(model, model_name: str, device: str, after_step=None):
    workload = WORKLOADS[model_name]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x, y = (t.to(device) for t in workload.batch(g))

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = clocks.now()
        optimizer.zero_grad(set_to_none=True)
        with clustering_pass(model):  # one batched DKM call per forward, as DKMCallback does
            loss = workload.loss(model(x), y)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        if device == "cuda":
            torch.cuda.synchronize()
        return clocks.now() - start

    return step


def cuda_step_peak_mb(step) -> dict[str, float]:
    """``torch.cuda.max_memory_allocated`` over one ``step`` (MB), and its rise above the memory
    allocated before it (the step's activations, gradients and DKM temporaries)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20}


def time_pair(model_name, bits, implementation, steps, warmup, device, epsilon=0.0,
              gradient="unrolled", max_iter=3, apple=False):
    """Plain and DKM steps (and with ``apple`` Apple's DKMPalettizer's) interleaved."""
    plain = build(model_name, device)
    dkm = add_dkm(copy.deepcopy(plain), bits, implementation, max_iter, epsilon, gradient)
    steps_of = {"plain": make_step(plain, model_name, device),
                "dkm": make_step(dkm, model_name, device)}
    if apple:
        apple_model, palettizer = add_apple_dkm(copy.deepcopy(plain), bits)
        steps_of["apple"] = make_step(apple_model, model_name, device, palettizer.step)
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    for i in range(warmup + steps):
        for name, step in steps_of.items():
            elapsed = step()
            if i >= warmup:
                times[name].append(elapsed)
    times_plain, times_dkm = times["plain"], times["dkm"]
    step_plain, step_dkm = steps_of["plain"], steps_of["dkm"]
    params = sum(p.numel() for p in plain.parameters())
    clustered = sum(t.original.numel() for t in lightning_dkm.clustered_tensors(dkm).values())
    row = {
        "parameters": params,
        "clustered_parameters": clustered,
        "plain_ms": 1e3 * statistics.median(times_plain),
        "dkm_ms": 1e3 * statistics.median(times_dkm),
        "ratio": statistics.median(times_dkm) / statistics.median(times_plain),
    }
    if apple:
        apple_s = statistics.median(times["apple"])
        row.update(apple_ms=1e3 * apple_s, apple_ratio=apple_s / statistics.median(times_plain),
                   speedup_vs_apple=apple_s / statistics.median(times_dkm))
    if device == "cuda":
        for name, step in (("plain", step_plain), ("dkm", step_dkm)):
            peak = cuda_step_peak_mb(step)
            row[f"{name}_cuda_peak_mb"] = peak["peak_mb"]
            row[f"{name}_cuda_step_mb"] = peak["step_mb"]
    return row


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so that the
    k-means initialisation and the imports before the steps do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_child(model_name, bits, implementation, max_iter, steps, device) -> float:
    """Run in a fresh process: one warm-up step, then the peak memory (MB) over ``steps``
    training steps: process peak RSS on CPU, peak allocated tensor memory on a GPU."""
    model = build(model_name, device)
    if bits:
        add_dkm(model, bits, implementation, max_iter)
    step = make_step(model, model_name, device)
    step()  # optimizer state and allocator pools exist from here on
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    for _ in range(steps):
        step()
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mb()


def peak_memory(model_name, bits, implementation, max_iter, device) -> float:
    args = [sys.executable, __file__, "--child", model_name, str(bits or 0), implementation,
            str(max_iter), device]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _apple_available() -> bool:
    from apple_dkm import apple_dkm_unavailable

    return apple_dkm_unavailable() is None


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: the device resolved, the clock and threads applied."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18", "minilm"])
    parser.add_argument("--bits", nargs="+", type=int, default=None,
                        help="default: 2 and 4 for cnn, 4 for the others")
    parser.add_argument("--implementations", nargs="+", default=["auto"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--epsilon", type=float, default=0.0,
                        help="DKM's early-stop threshold; 0 (default) always runs max_iter=3 "
                             "iterations, the worst case the targets are stated for; the "
                             "callback's default is 1e-4")
    parser.add_argument("--gradient", default="unrolled", choices=["unrolled", "implicit"],
                        help="DKM's gradient (implicit: IDKM, computed by the 'unique' step)")
    parser.add_argument("--max-iter", type=int, default=3,
                        help="DKM iterations per step for the timing (the targets use 3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda where CUDA exists, unless --clock cpu asks for the "
                             "CPU's time (which cannot measure work on a GPU): then cpu")
    parser.add_argument("--apple", action=argparse.BooleanOptionalAction, default=None,
                        help="also time coremltools' DKMPalettizer in the same run (default: on "
                             "the cnn at 2 bits, when coremltools is installed)")
    clocks.add_arguments(parser)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and args.clock != "cpu" else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu: the CPU time does not measure work on the GPU")
    clocks.apply(parser, args)
    return args


def main() -> None:
    args = parse_arguments()
    if args.child:
        name, bits, implementation, max_iter, device = args.child
        print(peak_memory_child(name, int(bits) or None, implementation, int(max_iter), 3, device))
        return

    setup = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": clocks.cpu_model(),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "max_iter": args.max_iter,
        "epsilon": args.epsilon,
        "gradient": args.gradient,
        "cluster_dim": 1,
        "native_loops": clocks.native_build() if args.device == "cpu" else None,
    }
    print("setup:", json.dumps(setup))
    if setup["native_loops"] is not None:
        print(clocks.describe_native(setup["native_loops"]))
    rows = []
    for model_name in args.models:
        for bits in args.bits or ([2, 4] if model_name == "cnn" else [4]):
            for implementation in args.implementations:
                row = {"model": model_name, "bits": bits, "implementation": implementation}
                apple = args.apple if args.apple is not None else (
                    (model_name, bits) == ("cnn", 2) and _apple_available())
                row.update(time_pair(model_name, bits, implementation, args.steps, args.warmup,
                                     args.device, args.epsilon, args.gradient, args.max_iter,
                                     apple))
                if not args.no_memory:
                    plain_mb = peak_memory(model_name, None, implementation, 3, args.device)
                    dkm_mb = peak_memory(model_name, bits, implementation, 3, args.device)
                    row.update(plain_peak_mb=plain_mb, dkm_peak_mb=dkm_mb,
                               extra_mb=dkm_mb - plain_mb, memory_ratio=dkm_mb / plain_mb)
                target = TARGETS.get((model_name, bits))
                row["time_target"] = target
                row["time_target_met"] = None if target is None else row["ratio"] <= target
                rows.append(row)
                print(_format_row(row), flush=True)

    growth = []
    if not args.no_memory:
        plain_mb = peak_memory("cnn", None, "chunked", 3, args.device)
        for implementation in args.implementations:
            for max_iter in (1, 3, 9):
                mb = peak_memory("cnn", 4, implementation, max_iter, args.device)
                growth.append({"implementation": implementation, "max_iter": max_iter,
                               "extra_mb": mb - plain_mb})
                print(f"cnn 4 bits {implementation:8s} max_iter {max_iter}: "
                      f"extra peak memory {mb - plain_mb:7.1f} MB", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setup": setup, "rows": rows, "max_iter": growth},
                                        indent=2))


def _format_row(row: dict) -> str:
    text = (f"{row['model']:8s} {row['bits']} bits {row['implementation']:8s} "
            f"plain {row['plain_ms']:8.1f} ms  dkm {row['dkm_ms']:8.1f} ms  "
            f"time ratio {row['ratio']:5.2f}")
    if row.get("time_target") is not None:
        verdict = "met" if row["time_target_met"] else "NOT met"
        text += f" (target <= {row['time_target']}: {verdict})"
    if "apple_ms" in row:
        verdict = "met" if row["speedup_vs_apple"] >= APPLE_SPEEDUP_TARGET else "NOT met"
        text += (f"  apple DKMPalettizer {row['apple_ms']:.1f} ms ({row['apple_ratio']:.2f}x "
                 f"plain; ours {row['speedup_vs_apple']:.1f}x faster, target >= "
                 f"{APPLE_SPEEDUP_TARGET:g}x: {verdict})")
    if "dkm_cuda_peak_mb" in row:
        text += (f"  cuda max_memory_allocated {row['plain_cuda_peak_mb']:.0f} / "
                 f"{row['dkm_cuda_peak_mb']:.0f} MB (step +{row['plain_cuda_step_mb']:.0f} / "
                 f"+{row['dkm_cuda_step_mb']:.0f} MB)")
    if "memory_ratio" in row:
        text += (f"  peak {row['plain_peak_mb']:.0f} -> {row['dkm_peak_mb']:.0f} MB "
                 f"(+{row['extra_mb']:.0f} MB, ratio {row['memory_ratio']:.2f})")
    return text


if __name__ == "__main__":
    main()
