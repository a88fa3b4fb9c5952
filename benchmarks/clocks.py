"""The clock the performance scripts time with, and their ``--clock`` / ``--threads`` options.

``--clock cpu`` times by the process's CPU time (``time.process_time``) instead of the wall
clock: on a machine loaded by other processes the wall clock measures the scheduler as much as
the work, the CPU time only the work itself (use with ``--threads 1``, so that no thread spins
waiting for a descheduled one). ``--threads N`` sets ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_chosen = [CLOCKS["wall"]]


def now() -> float:
    """The chosen clock's reading, in seconds."""
    return _chosen[0]()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--clock {wall,cpu}`` and ``--threads N``."""
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time by the wall clock (default) or by the process's CPU time "
                             "(robust to other load on the machine; use with --threads 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own)")


def apply(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Choose ``args.clock`` and set ``args.threads`` (an error naming it if below 1)."""
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    _chosen[0] = CLOCKS[args.clock]


def cpu_model() -> str:
    """The processor's name (Linux's ``/proc/cpuinfo`` "model name", else what ``platform``
    says): ratios of DKM to plain steps differ between processors by more than between runs,
    so every result names the one it was measured on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def result(args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """A script's result: ``fields`` with the clock and the threads it was timed with and the
    processor, written as JSON to ``args.json`` where given (the scripts' common ending)."""
    out = {"clock": args.clock, "threads": torch.get_num_threads(), "cpu": cpu_model(),
           **fields}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


def native_build() -> dict[str, Any]:
    """Builds the native loops of the ``"unique"`` step (``lightning_dkm.engine.native``) in an
    empty cache directory and times it (wall clock): the one-time cost a machine pays before
    its first fit. Returns ``{"used", "build_s", "why_not"}``; afterwards the process uses the
    loops as a fit would (or the PyTorch ops where they cannot be built)."""
    from lightning_dkm.engine import native

    saved = os.environ.get("LIGHTNING_DKM_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LIGHTNING_DKM_CACHE"] = cache
        native.forget()  # as on a machine that has not built them
        start = time.perf_counter()
        try:
            loops = native.loops_for()
        finally:
            if saved is None:
                del os.environ["LIGHTNING_DKM_CACHE"]
            else:
                os.environ["LIGHTNING_DKM_CACHE"] = saved
        seconds = time.perf_counter() - start
    return {"used": loops is not None, "build_s": seconds, "why_not": native.build_failure()}


def describe_native(build: dict[str, Any]) -> str:
    """One line for a script's header: whether the loops are used, and what building cost."""
    if not build["used"]:
        return f"native loops: not used ({build['why_not']}): the passes run as PyTorch ops"
    return (f"native loops: built and checked in {build['build_s']:.2f} s (once per machine, "
            f"outside the timed batches)")
