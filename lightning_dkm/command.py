"""The ``lightning-dkm`` console script.

    lightning-dkm inspect FILE [--json | --markdown]
    lightning-dkm coreml FILE.mlpackage [--json]
    lightning-dkm coreai FILE.aimodel [--json]
    lightning-dkm --version

``inspect`` prints the compression report of an artifact (``model.dkm.safetensors``) from the
file alone: per clustered tensor its shape, bits, vector length, group, palettes, parameters,
fp32 and stored bytes, ratio and bits per weight, then the totals; and a ``warning:`` line when
the ``compression_report.json`` beside the file records another artifact of its name (another
run's, or a stale copy). ``coreml`` lists the LUT ops of a saved Core ML package (no Apple
runtime needed), ``coreai`` those of a Core AI package, by the tensor names
:func:`~lightning_dkm.export_coreai` recorded in it.

Exit status: 0 on success; 1 when the command fails (a missing path, a file that is not what
the command reads, a missing optional dependency), with ``lightning-dkm: error: <reason>`` on
stderr and never a traceback; 2 for a usage error (argparse's convention). Output cut short by
its reader (``lightning-dkm inspect --json FILE | head -1``) is not an error: exit 0, nothing
on stderr.

A subcommand is a function ``args -> text`` and one :class:`Subcommand` entry in
:data:`SUBCOMMANDS` (its name, help and arguments); :func:`main` builds the parser from them,
runs the one asked for, prints its text and turns any exception into the error line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__

__all__ = ["PROG", "SUBCOMMANDS", "Argument", "Subcommand", "main"]

PROG = "lightning-dkm"


@dataclass(frozen=True)
class Argument:
    """One ``parser.add_argument(*flags, **options)`` call; arguments sharing a non-empty
    ``exclusive`` name form a mutually exclusive group."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    exclusive: str = ""


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: ``run(args)`` returns the text to print or raises (the error line)."""

    name: str
    help: str
    arguments: tuple[Argument, ...]
    run: Callable[[argparse.Namespace], str]


def _existing(path: str, what: str) -> Path:
    """``path`` when it exists; the error names it and what was expected there."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path} (expected {what})")
    return Path(path)


# -- inspect ------------------------------------------------------------------------------------
def _inspect(args: argparse.Namespace) -> str:
    """The report of the file; a ``compression_report.json`` beside it that records another
    artifact of its name is a ``warning:`` line under the file name (on stderr with ``--json``
    and ``--markdown``, which keep stdout the report alone)."""
    from .export.artifact import ReportMismatchWarning, inspect_artifact

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportMismatchWarning)
        report = inspect_artifact(args.file)
    notes = []
    for w in caught:
        if issubclass(w.category, ReportMismatchWarning):
            notes.append(f"warning: {w.message}")
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if args.json or args.markdown:
        for note in notes:
            print(f"{PROG}: {note}", file=sys.stderr)
        return json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown()
    return "\n".join([args.file, *notes, "", report.to_table()])


# -- coreml / coreai ----------------------------------------------------------------------------
def _lut_listing(file: str, size: int, ops: Sequence[Any], as_json: bool) -> str:
    """The LUT ops (:class:`~lightning_dkm.export.lut_ops.LutOp`) of a package, as text (one
    line each) or JSON."""
    rows = [{"op": op.name, "indices": list(op.indices.shape), "bits": op.bits,
             "cluster_dim": int(op.lut.shape[-1]), "lut_blocks": int(op.lut[..., 0, 0].size),
             "per_channel_scale": op.scale is not None} for op in ops]
    if as_json:
        return json.dumps({"file": file, "bytes": size, "ops": rows}, indent=2)
    lines = [f"{file}: {size:,} bytes, {len(rows)} LUT ops"]
    lines += [
        f"  {r['op']}: indices {tuple(r['indices'])}, {r['bits']} bits, cluster_dim "
        f"{r['cluster_dim']}, {r['lut_blocks']} LUT block(s)"
        + (", per-channel scales" if r["per_channel_scale"] else "")
        for r in rows
    ]
    return "\n".join(lines)


def _coreml(args: argparse.Namespace) -> str:
    from .export.coreml import package_bytes, read_coreml_palettes, require_coremltools

    path = _existing(args.file, "a .mlpackage written by export_coreml")
    require_coremltools()  # its own error (how to install it), not "cannot read"
    try:
        ops = read_coreml_palettes(path)
    except Exception as err:  # coremltools raises RuntimeError, ValueError, ... for a bad file
        raise ValueError(f"{args.file}: not a readable Core ML package ({err})") from err
    return _lut_listing(args.file, package_bytes(path), list(ops.values()), args.json)


def _coreai(args: argparse.Namespace) -> str:
    """The ops under the tensor names :func:`~lightning_dkm.export_coreai` recorded, when it
    recorded one per op."""
    from .export.coreai import lut_op_names, package_bytes, read_coreai_palettes, require_coreai

    path = _existing(args.file, "a .aimodel written by export_coreai")
    require_coreai()  # its own error (how to install it), not "cannot read"
    try:
        ops = read_coreai_palettes(path)
        names = lut_op_names(path)
    except Exception as err:  # coreai-core raises RuntimeError, ValueError, ... for a bad file
        raise ValueError(f"{args.file}: not a readable Core AI package ({err})") from err
    if len(names) == len(ops):
        ops = [replace(op, name=name or op.name) for op, name in zip(ops, names, strict=True)]
    return _lut_listing(args.file, package_bytes(path), ops, args.json)


#: Every subcommand, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "inspect", "the compression report of an artifact, from the file alone",
        (Argument(("file",), {"help": "a model.dkm.safetensors written by save_compressed"}),
         Argument(("--json",), {"action": "store_true", "help": "the report as JSON"},
                  exclusive="form"),
         Argument(("--markdown",), {"action": "store_true", "help": "the report as Markdown"},
                  exclusive="form")),
        _inspect,
    ),
    Subcommand(
        "coreml", "the LUT ops of a saved .mlpackage",
        (Argument(("file",), {"help": "a .mlpackage written by export_coreml"}),
         Argument(("--json",), {"action": "store_true", "help": "one JSON object per op"})),
        _coreml,
    ),
    Subcommand(
        "coreai", "the LUT ops of a saved .aimodel",
        (Argument(("file",), {"help": "a .aimodel written by export_coreai"}),
         Argument(("--json",), {"action": "store_true", "help": "one JSON object per op"})),
        _coreai,
    ),
)


def _parser() -> argparse.ArgumentParser:
    """The parser of :data:`SUBCOMMANDS`, each run by ``args.run``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect lightning_dkm artifacts and exported packages."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for sub in SUBCOMMANDS:
        sub_parser = commands.add_parser(sub.name, help=sub.help)
        sub_parser.set_defaults(run=sub.run)
        groups: dict[str, Any] = {}
        for argument in sub.arguments:
            target = sub_parser
            if argument.exclusive:
                if argument.exclusive not in groups:
                    groups[argument.exclusive] = sub_parser.add_mutually_exclusive_group()
                target = groups[argument.exclusive]
            target.add_argument(*argument.flags, **argument.options)
    return parser


def _error(err: BaseException) -> str:
    """The reason of ``err``, for the error line: its message, or its type when it has none."""
    text = str(err) if not isinstance(err, KeyError) or not err.args else repr(err.args[0])
    return text or type(err).__name__


def _print(text: str) -> int:
    """Print ``text``; a reader that closed the pipe early (``| head``) is not an error.

    Python's recipe (the ``signal`` module's note on SIGPIPE): on ``BrokenPipeError`` point
    stdout at devnull, so the interpreter's last flush does not fail again. The recipe exits 1;
    this exits 0, as ``head`` users expect: the reader got what it asked for, and a pipeline
    under ``set -o pipefail`` must not fail because ``head`` stopped reading.
    """
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        text = args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line on stderr, never a traceback
        print(f"{PROG}: error: {_error(err)}", file=sys.stderr)
        return 1
    return _print(text)


if __name__ == "__main__":
    sys.exit(main())
