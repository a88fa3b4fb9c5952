"""The ``lightning-dkm`` console script.

    lightning-dkm inspect FILE [--json | --markdown]
    lightning-dkm coreml FILE.mlpackage [--json]

``inspect`` prints the compression report of an artifact (``model.dkm.safetensors``) from the
file alone: per clustered tensor its shape, bits, vector length, group, palettes, parameters,
fp32 and stored bytes, ratio and bits per weight, then the totals. ``coreml`` lists the LUT ops
of a saved Core ML package (no Apple runtime needed). Exit status 0 on success, 1 when the file
is missing or invalid (the reason on stderr), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]

PROG = "lightning-dkm"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect lightning_dkm artifacts and Core ML packages."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect", help="the compression report of an artifact, from the file alone"
    )
    inspect.add_argument("file", help="a model.dkm.safetensors written by save_compressed")
    form = inspect.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="the report as JSON")
    form.add_argument("--markdown", action="store_true", help="the report as Markdown")
    coreml = commands.add_parser("coreml", help="the LUT ops of a saved .mlpackage")
    coreml.add_argument("file", help="a .mlpackage written by export_coreml")
    coreml.add_argument("--json", action="store_true", help="one JSON object per op")
    return parser


def _inspect(args: argparse.Namespace) -> str:
    from .export.artifact import inspect_artifact

    report = inspect_artifact(args.file)
    if args.json:
        return json.dumps(report.to_dict(), indent=2)
    if args.markdown:
        return report.to_markdown()
    return f"{args.file}\n\n{report.to_table()}"


def _coreml(args: argparse.Namespace) -> str:
    from .export.coreml import package_bytes, read_coreml_palettes

    ops = read_coreml_palettes(args.file)
    rows = [
        {
            "op": name,
            "indices": list(op.indices.shape),
            "bits": int(op.lut.shape[-2]).bit_length() - 1,
            "cluster_dim": int(op.lut.shape[-1]),
            "lut_blocks": int(op.lut[..., 0, 0].size),
            "per_channel_scale": op.scale is not None,
        }
        for name, op in ops.items()
    ]
    if args.json:
        return json.dumps({"file": args.file, "bytes": package_bytes(args.file), "ops": rows},
                          indent=2)
    lines = [f"{args.file}: {package_bytes(args.file):,} bytes, {len(rows)} LUT ops"]
    lines += [
        f"  {r['op']}: indices {tuple(r['indices'])}, {r['bits']} bits, cluster_dim "
        f"{r['cluster_dim']}, {r['lut_blocks']} LUT block(s)"
        + (", per-channel scales" if r["per_channel_scale"] else "")
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        text = _inspect(args) if args.command == "inspect" else _coreml(args)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError,
            ImportError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
