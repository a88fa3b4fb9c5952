"""The clock the performance scripts time with, and their ``--clock`` / ``--threads`` options.

``--clock cpu`` times by the process's CPU time (``time.process_time``) instead of the wall
clock: on a machine loaded by other processes the wall clock measures the scheduler as much as
the work, the CPU time only the work itself (use with ``--threads 1``, so that no thread spins
waiting for a descheduled one). ``--threads N`` sets ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import json
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


def result(args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """A script's result: ``fields`` with the clock and the threads it was timed with, written
    as JSON to ``args.json`` where given (the scripts' common ending)."""
    out = {"clock": args.clock, "threads": torch.get_num_threads(), **fields}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out
