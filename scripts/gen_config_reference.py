"""Write docs/configuration.md from DKMCallback's docstring and signature.

    python scripts/gen_config_reference.py           # (re)write docs/configuration.md
    python scripts/gen_config_reference.py --check   # exit 1 if the file is out of date

The argument descriptions come from the ``Args:`` section of ``DKMCallback``'s docstring; types
and defaults come from ``inspect.signature(DKMCallback.__init__)``; the temperature schedules
from the docstrings of the classes in :mod:`lightning_dkm.lightning.schedules`.
``tests/test_docs.py``
regenerates the text in memory and compares it with the committed file, so the reference cannot
drift from the code.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/gen_config_reference.py"

_ARG = re.compile(r"^(\*{0,2}\w+)(?:\s*\(([^)]*)\))?:\s*(.*)$")


class DocstringError(ValueError):
    """The docstring does not have the layout the generator parses."""


def parse_args_section(doc: str) -> dict[str, str]:
    """``{argument: description}`` from the ``Args:`` section of a Google-style docstring.

    ``doc`` is a cleaned docstring (``inspect.getdoc``): the section header at column 0, each
    argument on a line indented once (``name: text``), continuation lines indented deeper.
    Continuation lines are joined with single spaces.
    """
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        raise DocstringError("the docstring has no 'Args:' section") from None
    header_indent = len(lines[start]) - len(lines[start].lstrip())
    args: dict[str, str] = {}
    arg_indent: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:  # the next section (or the end of the docstring)
            break
        if arg_indent is None:
            arg_indent = indent
        if indent == arg_indent:
            match = _ARG.match(line.strip())
            if match is None:
                raise DocstringError(f"cannot parse argument line {line.strip()!r}")
            current = match.group(1)
            if current in args:
                raise DocstringError(f"argument {current!r} is documented twice")
            args[current] = match.group(3).strip()
        elif indent > arg_indent and current is not None:
            args[current] = f"{args[current]} {line.strip()}".strip()
        else:
            raise DocstringError(f"unexpected indentation in the Args section: {line!r}")
    if not args:
        raise DocstringError("the 'Args:' section is empty")
    return args


def rst_to_markdown(text: str) -> str:
    """The reST inline markup used in the docstrings, as Markdown."""
    text = re.sub(r":(?:mod|func|class|meth|attr|data):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return text


def _default_text(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "(required)"
    return f"`{value!r}`"


def _annotation_text(annotation: Any, namespace: dict[str, Any] | None = None) -> str:
    """The annotation as written in the source; a bare alias of a ``Literal`` defined in
    ``namespace`` (e.g. ``MethodName``) is spelled out, since its values are the options."""
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    alias = (namespace or {}).get(text) if re.fullmatch(r"\w+", text) else None
    if alias is not None and typing.get_origin(alias) is typing.Literal:
        text = f"Literal[{', '.join(repr(a) for a in typing.get_args(alias))}]"
    return f"`{text}`"


def _sentence(text: str) -> str:
    """Docstring argument text starts lower-case; a paragraph of its own starts upper-case."""
    return text[:1].upper() + text[1:]


def _summary(doc: str) -> list[str]:
    """The docstring's paragraphs before ``Args:``."""
    head = doc.split("\nArgs:", 1)[0].strip()
    return [rst_to_markdown(" ".join(p.split())) for p in head.split("\n\n")]


def _schedule_rows() -> list[tuple[str, str]]:
    from lightning_dkm.lightning import schedules

    rows = []
    for name, cls in (
        ("constant", schedules.ConstantSchedule),
        ("linear", schedules.LinearSchedule),
        ("exponential", schedules.ExponentialSchedule),
        ("cosine", schedules.CosineSchedule),
        ("step", schedules.StepSchedule),
        ("`package.module.function`", schedules.CallableSchedule),
    ):
        first = (inspect.getdoc(cls) or "").split("\n\n", 1)[0]
        rows.append((name, rst_to_markdown(" ".join(first.split()))))
    known = set(schedules.SCHEDULE_NAMES)
    listed = {name for name, _ in rows if not name.startswith("`")}
    if known != listed:
        raise DocstringError(f"schedules changed: {sorted(known)} vs documented {sorted(listed)}")
    return rows


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in value.items()) + "}"
    return str(value)


def render() -> str:
    """The full text of docs/configuration.md."""
    from lightning_dkm import DKMCallback

    doc = inspect.getdoc(DKMCallback) or ""
    described = parse_args_section(doc)
    params = [
        p for p in inspect.signature(DKMCallback.__init__).parameters.values() if p.name != "self"
    ]
    names = [p.name for p in params]
    missing = [n for n in names if n not in described]
    extra = [n for n in described if n not in names]
    if missing or extra:
        raise DocstringError(
            f"DKMCallback's docstring and signature disagree: undocumented {missing}, "
            f"documented but not in the signature {extra}"
        )
    effective = DKMCallback(verbose=False)
    namespace = vars(sys.modules[DKMCallback.__module__])

    out = [
        "# Configuration reference: `DKMCallback`",
        "",
        f"<!-- Generated by `{COMMAND}` from the docstring and signature of",
        "     lightning_dkm.DKMCallback. Do not edit by hand: tests/test_docs.py fails when this",
        "     file differs from what the script writes. -->",
        "",
        *[line for paragraph in _summary(doc) for line in (paragraph, "")],
        "Every argument is a keyword of `DKMCallback(...)` and a key of its `init_args` in a "
        "LightningCLI config (see [the example](#example-lightningcli-config)).",
        "",
        "| argument | type | default |",
        "| :--- | :--- | :--- |",
    ]
    for p in params:
        annotation = _annotation_text(p.annotation, namespace).replace("|", "\\|")  # GFM cell
        out.append(f"| [`{p.name}`](#{p.name}) | {annotation} | {_default_text(p.default)} |")
    out.append("")
    for p in params:
        annotation = _annotation_text(p.annotation, namespace)
        out += [
            f"## `{p.name}`",
            "",
            f"Type {annotation}; default {_default_text(p.default)}.",
            "",
            _sentence(rst_to_markdown(described[p.name])),
            "",
        ]
        if p.name == "temperature":
            out += [
                f"`temperature=None` means `{_yaml_scalar(effective.temperature.to_dict())}`.",
                "",
                "Schedules (a unit `t` is an optimizer step, or an epoch with `interval: epoch`, "
                "counted from the first soft one at `start_epoch`; `T` is the number of soft "
                "units, up to `hard_epoch` or the end of fit):",
                "",
                "| `schedule` | tau at soft unit `t` |",
                "| :--- | :--- |",
                *[f"| {name} | {text} |" for name, text in _schedule_rows()],
                "",
            ]
    out += [
        "## Example: LightningCLI config",
        "",
        "Every argument at its default (`temperature` written out as its effective value); "
        "it runs as it is (`tests/test_cli.py`):",
        "",
        "```yaml",
        "trainer:",
        "  callbacks:",
        "    - class_path: lightning_dkm.DKMCallback",
        "      init_args:",
    ]
    for p in params:
        value = effective.temperature.to_dict() if p.name == "temperature" else p.default
        out.append(f"        {p.name}: {_yaml_scalar(value)}")
    out += ["```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; run: {COMMAND}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
