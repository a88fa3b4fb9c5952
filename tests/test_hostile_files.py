"""Small hostile files: reading one is bounded by what the file and the target model hold.

Each file here is well formed as far as safetensors goes and carries a valid digest (forged
with the format's own), so the checks behind the digest are what is tested. The files are
crafted directly and stay small (at most about 5 MB); what they *claim* is large. Each test
asserts what the user gets (a ``ValueError`` or ``OSError`` naming the file, or a correct
report) and, where the fault was one of size, the peak memory and the time it took.

Peak memory is the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) during the call: torch's allocations are invisible to tracemalloc.
Where /proc does not offer that reset (not Linux), the memory assertions are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from export_helpers import artifact_digest
from safetensors.torch import save_file
from torch import nn

from lightning_dkm import load_compressed, read_palettes, save_compressed
from lightning_dkm.command import main
from lightning_dkm.export.artifact import ReportMismatchWarning, inspect_artifact
from lightning_dkm.export.report import CompressionReport, artifact_entry

MiB = 1 << 20


# -- crafting files -----------------------------------------------------------------------------


def forge(path: Path, layout: dict | str, tensors: dict[str, torch.Tensor],
          metadata: dict[str, str] | None = None) -> Path:
    """An artifact with ``layout`` (a dict, or JSON text written as is) and ``tensors``, whose
    digest is valid, so every check after the digest is reached."""
    meta = {"lightning_dkm.format": "lightning_dkm.compressed", "lightning_dkm.version": "1",
            "lightning_dkm.layout": layout if isinstance(layout, str) else json.dumps(layout),
            **(metadata or {})}
    meta["lightning_dkm.sha256"] = artifact_digest(meta, tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


def entry(shape: tuple[int, int], bits: int = 1, cluster_dim: int = 8, **changes: Any) -> dict:
    """The layout entry of one tensor with one palette, consistent with ``shape``."""
    return {"shape": list(shape), "dtype": "float32", "bits": bits, "cluster_dim": cluster_dim,
            "group_size": None, "group_axis": 0, "vector_axis": 1,
            "count": shape[0] * shape[1] // cluster_dim, **changes}


def layout(clustered: dict | None = None, aliases: dict | None = None, **more: Any) -> dict:
    return {"lut_dtype": "float16", "clustered": clustered or {}, "aliases": aliases or {},
            "parameters": [], **more}


def a_huge_claim(path: Path, packed_bytes: int = MiB) -> Path:
    """A well-formed, consistent artifact whose ``fc.weight`` claims ``64 * packed_bytes``
    weights (bits 1, cluster_dim 8: 64 weights per stored byte): 1 MiB of indices claims a
    67M-weight (256 MiB in float32) tensor; the issue's 8 MiB claimed 537M."""
    rows = 8 * 8 * packed_bytes // 8192
    return forge(path, layout({"fc.weight": entry((rows, 8192))}), {
        "lut/fc.weight": torch.tensor([[[0.5] * 8, [-0.5] * 8]], dtype=torch.float16),
        "indices/fc.weight": torch.zeros(packed_bytes, dtype=torch.uint8),
    })


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32, bias=False)


def dense(path: Path, text: str) -> Path:
    """A file with one dense tensor and the layout JSON ``text``."""
    return forge(path, text, {"state/fc.weight": torch.zeros(32, 64)})


# -- measuring ----------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmHWM") > 0
    except OSError:
        return False


CAN_MEASURE = _can_reset_peak()


def measured(call: Callable[[], Any]) -> tuple[Any, int | None, float]:
    """``(result or the exception raised, peak memory growth in bytes or None, seconds)``."""
    if CAN_MEASURE:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set := the current one
        before = _status("VmRSS")
    start = time.perf_counter()
    try:
        result: Any = call()
    except Exception as err:  # returned, for the test to assert on
        result = err
    seconds = time.perf_counter() - start
    grown = _status("VmHWM") - before if CAN_MEASURE else None
    return result, grown, seconds


def assert_peak_below(grown: int | None, limit: int) -> None:
    if grown is not None:
        assert grown < limit, f"peak memory grew by {grown / MiB:.0f} MiB (limit {limit / MiB})"


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


READERS = {
    "load_compressed": lambda path: load_compressed(Small(), path),
    "read_palettes": read_palettes,
    "inspect_artifact": inspect_artifact,
}


def assert_every_reader_refuses(path: Path, match: str, limit: int = 8000) -> None:
    """``load_compressed``, ``read_palettes`` and ``inspect_artifact`` each raise a
    ``ValueError`` that starts with the file's path, matches ``match`` and is at most ``limit``
    characters long."""
    for reader, read in READERS.items():
        with pytest.raises(ValueError, match=match) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(str(path)), (reader, message[:300])
        assert len(message) <= limit, (reader, len(message))


# -- sizes claimed by the layout ----------------------------------------------------------------


def test_a_layout_claiming_a_larger_tensor_than_the_model_has_is_refused_before_decoding(
    tmp_path,
) -> None:
    """Was: the 256 MiB weight (and its int64 indices) built, 455 MiB peak, then refused."""
    path = a_huge_claim(tmp_path / "huge.safetensors")
    model = Small()
    before = model.fc.weight.detach().clone()
    err, grown, seconds = measured(lambda: load_compressed(model, path))
    assert isinstance(err, ValueError)
    assert str(err).startswith(f"{path}: 'fc.weight' is torch.float32 (8192, 8192) in the file")
    assert "(32, 64) in the model" in str(err)
    assert torch.equal(model.fc.weight, before)
    assert_peak_below(grown, 16 * MiB)
    assert seconds < 2


def test_inspect_reports_the_claimed_sizes_without_decoding_a_weight(tmp_path) -> None:
    """Was: every weight built to report its size (455 MiB peak for this 1 MiB file)."""
    path = a_huge_claim(tmp_path / "huge.safetensors")
    report, grown, seconds = measured(lambda: inspect_artifact(path))
    assert_peak_below(grown, 16 * MiB)
    assert seconds < 2
    (layer,) = report.layers
    assert layer.parameters == 8192 * 8192 and layer.index_bytes == MiB
    assert layer.dtype == "float32"  # the saved model's dtype, as the training run reports it
    assert report.total_bytes == MiB + 2 * 8 * 2


# -- counts: aliases and parameter names --------------------------------------------------------


def test_many_aliases_are_inspected_in_time_and_memory_linear_in_the_file(tmp_path) -> None:
    """Was: a module built per alias, 16 s and 875 MiB for these 150k aliases (a 6.6 MB file),
    now 0.2 s and 37 MiB; 1.5M aliases (48 MB) take 1.8 s and 340 MiB."""
    aliases = {f"layer{i}.block.weight": "fc.weight" for i in range(150_000)}
    path = forge(tmp_path / "aliases.safetensors", layout(aliases=aliases),
                 {"state/fc.weight": torch.zeros(32, 64)})
    report, grown, seconds = measured(lambda: inspect_artifact(path))
    assert [t.name for t in report.unclustered] == ["fc.weight"]  # an alias is counted once
    assert_peak_below(grown, 12 * path.stat().st_size)
    assert seconds < 3


def test_parameter_names_the_file_does_not_hold_are_refused(tmp_path) -> None:
    """The ``parameters`` list may name only tensors the file stores."""
    names = [f"ghost{i}.weight" for i in range(1000)]
    path = dense(tmp_path / "ghosts.safetensors", json.dumps(layout(parameters=names)))
    assert_every_reader_refuses(path, r"parameters names tensors the file does not hold: "
                                      r"\['ghost0\.weight', .* and 990 more\]", limit=1000)


# -- the layout JSON ----------------------------------------------------------------------------


def test_deeply_nested_layout_json_is_a_value_error_naming_the_file(tmp_path) -> None:
    """Was: ``RecursionError`` from json, without the file."""
    depth = 100_000
    text = json.dumps(layout()).replace('"aliases": {}', '"aliases": {}, "parameters": '
                                        + "[" * depth + "]" * depth)
    path = dense(tmp_path / "deep.safetensors", text)
    assert_every_reader_refuses(path, "lightning_dkm.layout nests deeper than 16 levels")


def test_a_layout_nested_just_below_the_limit_is_refused_by_its_shape_not_its_depth(
    tmp_path,
) -> None:
    text = json.dumps(layout(parameters=[[[[[[["x"]]]]]]]))  # 9 levels
    path = dense(tmp_path / "nested.safetensors", text)
    assert_every_reader_refuses(path, "parameters must be a list of names")


@pytest.mark.parametrize(
    ("number", "message"),
    [
        pytest.param("9" * 5001, "an integer of 5,001 digits", id="5001-digit integer"),
        pytest.param("NaN", "NaN, which is not standard JSON", id="NaN"),
        pytest.param("-Infinity", "-Infinity, which is not standard JSON", id="-Infinity"),
        pytest.param("8192.0", "the number '8192.0', where only integers belong", id="float"),
        pytest.param("1" * 5000 + "e1", r"the number '1111.*\(5,004 characters\)", id="long"),
    ],
)
def test_a_number_the_format_never_holds_is_a_value_error_naming_the_file(
    tmp_path, number, message
) -> None:
    """Was: a 5,001-digit integer raised Python's int-conversion ``ValueError`` without the
    file name."""
    text = json.dumps(layout({"fc.weight": entry((32, 64), count=0)}))
    text = text.replace('"count": 0', f'"count": {number}')
    path = dense(tmp_path / "number.safetensors", text)
    assert_every_reader_refuses(path, message, limit=500)


def test_an_error_quotes_only_the_start_of_a_long_name_or_entry(tmp_path) -> None:
    """Was: the whole 1 MB name and entry repeated in the message (and on the terminal)."""
    name = "x" * MiB
    text = json.dumps(layout({name: {**entry((32, 64)), "shape": "32x64"}}))
    path = dense(tmp_path / "long.safetensors", text)
    assert_every_reader_refuses(path, r"layout of 'xxx.*\(1,048,578 characters\) has malformed",
                                limit=600)


# -- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [["a", "a.b"], ["a..b"], ["a."], ["."], [""], ["x." * 10_000 + "w"]],
    ids=["a leaf and a module of one name", "an empty part", "a trailing dot", "only a dot",
         "empty", "10,000 dots"],
)
def test_odd_tensor_names_are_inspected_as_they_are(tmp_path, names) -> None:
    """Was: ``KeyError`` ("attribute 'a' already exists", "module name can't be empty") from
    building a module tree out of the names."""
    path = forge(tmp_path / "odd.safetensors", layout(parameters=names),
                 {"state/" + name: torch.zeros(2) for name in names})
    report = inspect_artifact(path)
    assert sorted(t.name for t in report.unclustered) == sorted(names)
    assert {t.kind for t in report.unclustered} == {"parameter"}
    with pytest.raises(ValueError, match="does not match the model") as err:
        load_compressed(Small(), path)
    assert str(err.value).startswith(f"{path}: ")


# -- what a path is -----------------------------------------------------------------------------


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "pipe")
    return tmp_path / "pipe"


def _socket(tmp_path: Path) -> Path:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    server.close()  # the socket file stays
    return tmp_path / "sock"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
@pytest.mark.parametrize(
    ("make", "kind"),
    [
        pytest.param(_fifo, "a FIFO (named pipe)", id="fifo"),
        pytest.param(lambda tmp: Path(os.devnull), "a character device", id="device"),
        pytest.param(_socket, "a socket", id="socket"),
    ],
)
def test_a_special_file_is_named_for_what_it_is_without_opening_it(tmp_path, make, kind) -> None:
    """Was: "no such file" for a FIFO that exists."""
    path = make(tmp_path)
    for read in READERS.values():
        with deadline(10), pytest.raises(ValueError) as err:
            read(path)
        assert str(err.value) == f"{path} is {kind}, not a file; pass the artifact file itself"


def test_a_file_that_cannot_be_read_is_a_permission_error_naming_it(tmp_path) -> None:
    """Was: "not a readable safetensors file ... truncated", for a file the user may not read."""
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = save_compressed(Small(), tmp_path / "m.safetensors", {})
    path.chmod(0)
    with pytest.raises(PermissionError, match=re.escape(str(path))):
        inspect_artifact(path)


# -- the command line ---------------------------------------------------------------------------


HOSTILE = {
    "deep": (lambda tmp: dense(tmp / "deep.safetensors", '{"parameters": ' + "[" * 50_000
                               + "]" * 50_000 + "}"), "nests deeper than 16 levels"),
    "long integer": (lambda tmp: dense(tmp / "int.safetensors",
                                       '{"lut_dtype": ' + "7" * 5001 + "}"), "5,001 digits"),
    "fifo": (_fifo, r"is a FIFO \(named pipe\), not a file"),
    "directory": (lambda tmp: tmp, "is a directory"),
    "parameters": (lambda tmp: dense(tmp / "p.safetensors", json.dumps(layout(parameters=["z"]))),
                   "parameters names tensors the file does not hold"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_the_cli_names_the_file_in_one_error_line_without_a_traceback(tmp_path, capsys, case):
    make, reason = HOSTILE[case]
    path = make(tmp_path)
    with deadline(20):
        assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err[:500]
    assert re.match(rf"lightning-dkm: error: {re.escape(str(path))}:? .*{reason}", err), err[:500]


def test_the_cli_inspects_odd_names_and_a_huge_claim(tmp_path, capsys) -> None:
    path = forge(tmp_path / "odd.safetensors", layout(), {"state/a": torch.zeros(1),
                                                          "state/a.b": torch.zeros(1)})
    assert main(["inspect", str(path)]) == 0
    assert main(["inspect", "--json", str(a_huge_claim(tmp_path / "huge.safetensors"))]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert '"parameters": 67108864' in captured.out


# -- the report beside the artifact -------------------------------------------------------------


def an_artifact(tmp_path: Path) -> Path:
    return save_compressed(Small(), tmp_path / "model.dkm.safetensors", {})


def write_report(tmp_path: Path, entry: Any) -> None:
    """A ``compression_report.json`` beside the artifact with that ``artifact`` entry, written
    by hand as the fit writes it (file name, size, SHA-256 of the file's bytes)."""
    (tmp_path / "compression_report.json").write_text(json.dumps(
        {"format": "lightning_dkm.compression_report", "layers": [], "unclustered": [],
         "lut_dtype": "float16", "artifact": entry}))


def own_entry(path: Path, **changes: Any) -> dict:
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            **changes}


@pytest.mark.parametrize(
    ("change", "found"),
    [
        pytest.param({"sha256": "0" * 64}, f"sha256 '{'0' * 64}', but the file's is '",
                     id="another digest"),
        pytest.param({"bytes": 3104}, "3,104 bytes, but the file has ", id="another size"),
    ],
)
def test_load_compressed_warns_when_the_report_beside_it_records_another_artifact(
    tmp_path, change, found
) -> None:
    path = an_artifact(tmp_path)
    write_report(tmp_path, own_entry(path, **change))
    with pytest.warns(ReportMismatchWarning) as record:
        load_compressed(Small(), path)
    (warning,) = record
    message = str(warning.message)
    assert message.startswith(f"{tmp_path / 'compression_report.json'} does not describe the "
                              f"artifact {path} beside it")
    assert found in message
    assert warning.filename == __file__  # points at the caller's line


def test_inspect_says_when_the_report_beside_it_records_another_artifact(tmp_path, capsys):
    path = an_artifact(tmp_path)
    write_report(tmp_path, own_entry(path, sha256="f" * 64))
    with pytest.warns(ReportMismatchWarning, match="does not describe the artifact"):
        inspect_artifact(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == str(path)
    assert lines[1].startswith(f"warning: {tmp_path / 'compression_report.json'} does not "
                               "describe the artifact")
    assert out.err == ""
    assert main(["inspect", "--json", str(path)]) == 0  # stdout stays the JSON report
    out = capsys.readouterr()
    json.loads(out.out)
    assert out.err.startswith("lightning-dkm: warning: ") and out.err.count("\n") == 1


@pytest.mark.parametrize(
    "entry",
    ["matching", "no report", None, "another file name", "null", "not an object",
     "unreadable report"],
)
def test_a_matching_report_or_none_to_compare_is_silent(tmp_path, capsys, entry) -> None:
    path = an_artifact(tmp_path)
    report = tmp_path / "compression_report.json"
    if entry == "matching":
        write_report(tmp_path, own_entry(path))
    elif entry is None:
        report.write_text(json.dumps({"layers": []}))
    elif entry == "another file name":
        write_report(tmp_path, own_entry(path, file="other.safetensors", bytes=1))
    elif entry == "null":
        write_report(tmp_path, None)
    elif entry == "not an object":
        write_report(tmp_path, "model.dkm.safetensors")
    elif entry == "unreadable report":
        report.write_text('{"artifact": ' + "[" * 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_compressed(Small(), path)
        inspect_artifact(path)
    assert main(["inspect", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_the_report_the_fit_writes_belongs_to_its_artifact_until_another_replaces_it(tmp_path):
    """With the writer's own entry (``CompressionReport.artifact = artifact_entry(path)``):
    silent; after another run's artifact of the same name and size took its place: a warning."""
    model = Small()
    path = an_artifact(tmp_path)
    report = CompressionReport.build(model, {})
    report.artifact = artifact_entry(path)
    report.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_compressed(Small(), path)
    save_compressed(Small(), path, {})  # other weights, the same size
    assert path.stat().st_size == report.artifact["bytes"]
    with pytest.warns(ReportMismatchWarning, match="records sha256 '[0-9a-f]{64}', but the "):
        load_compressed(Small(), path)
