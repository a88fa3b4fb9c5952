"""The docs cannot drift from the code: the generated configuration reference is up to date,
every DKMCallback argument is documented, the package's import graph is the one
docs/architecture.md describes, and every figure and link in docs/ exists."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from lightning_dkm import DKMCallback

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "lightning_dkm"


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", ROOT / "scripts" / "gen_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _init_parameters() -> list[str]:
    return [p for p in inspect.signature(DKMCallback.__init__).parameters if p != "self"]


# -- configuration reference ------------------------------------------------------------------
def test_configuration_md_is_what_the_generator_writes():
    committed = (DOCS / "configuration.md").read_text()
    assert committed == gen.render(), (
        "docs/configuration.md is out of date; run: python scripts/gen_config_reference.py"
    )


def test_every_init_parameter_is_documented_in_the_docstring():
    documented = gen.parse_args_section(inspect.getdoc(DKMCallback))
    params = _init_parameters()
    assert [p for p in params if p not in documented] == []
    assert [d for d in documented if d not in params] == []
    assert all(text.strip() for text in documented.values())


def test_every_init_parameter_has_a_section_in_configuration_md():
    text = (DOCS / "configuration.md").read_text()
    for name in _init_parameters():
        assert f"\n## `{name}`\n" in text, name


def test_parser_joins_continuation_lines_and_stops_at_the_next_section():
    doc = inspect.cleandoc(
        """Summary.

        Args:
            alpha: first line
                continued.
            beta: one line.

        Returns:
            nothing.
        """
    )
    assert gen.parse_args_section(doc) == {"alpha": "first line continued.", "beta": "one line."}


def test_parser_rejects_a_docstring_without_args():
    with pytest.raises(gen.DocstringError, match="no 'Args:'"):
        gen.parse_args_section("Summary only.")


# -- architecture: the documented import graph is the real one --------------------------------
def _module_name(path) -> str:
    """``engine/layout`` for ``lightning_dkm/engine/layout.py``; ``command`` at the top."""
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def _resolve(importer: str, level: int, module: str | None) -> list[str]:
    """The package modules a relative ``from <level dots><module> import ...`` names."""
    package = importer.split("/")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ["/".join([*base, *module.split(".")])] if module else []


def _type_checking_only(node: ast.AST, tree: ast.Module) -> bool:
    """An import under a top-level ``if TYPE_CHECKING:``: for annotations, not run."""
    return any(isinstance(top, ast.If) and isinstance(top.test, ast.Name)
               and top.test.id == "TYPE_CHECKING" and node in top.body for top in tree.body)


def _actual_imports() -> dict[str, set[str]]:
    """``{module: {package modules it imports}}`` from the source (relative imports, including
    those inside functions), for every module but the ``__init__`` files."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem == "__init__":
            continue
        name = _module_name(path)
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if _type_checking_only(node, tree):
                continue
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                found = _resolve(name, node.level, node.module)
                if not node.module or found[0] not in modules:  # from . import module
                    base = _resolve(name, node.level, node.module or "x")[0].rpartition("/")[0]
                    prefix = base + "/" if node.module is None and base else (
                        found[0] + "/" if found else "")
                    found = [prefix + alias.name for alias in node.names]
                deps.update(d for d in found if d in modules)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "lightning_dkm."
            ):
                deps.add(node.module.removeprefix("lightning_dkm.").replace(".", "/"))
        graph[name] = deps
    return graph


def _documented_imports() -> dict[str, set[str]]:
    text = (DOCS / "architecture.md").read_text()
    table = text.split("<!-- import-table -->")[1]
    graph: dict[str, set[str]] = {}
    for line in table.splitlines():
        match = re.match(r"\|\s*`([\w/]+)\.py`\s*\|([^|]*)\|", line)
        if match:
            graph[match.group(1)] = set(re.findall(r"`([\w/]+)`", match.group(2)))
    return graph


def test_architecture_md_lists_every_module_with_its_real_imports():
    assert _documented_imports() == _actual_imports()


def test_the_import_graph_has_no_cycle():
    graph = _actual_imports()
    state: dict[str, int] = {}

    def visit(node: str, path: tuple[str, ...]) -> None:
        if state.get(node) == 1:
            raise AssertionError(f"import cycle: {' -> '.join((*path, node))}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in graph.get(node, ()):
            visit(dep, (*path, node))
        state[node] = 2

    for module in graph:
        visit(module, ())


# -- figures and links --------------------------------------------------------------------------
_LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_links_and_images_resolve(page):
    text = (DOCS / page).read_text()
    for _, target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        assert (DOCS / target).exists(), f"{page}: broken link {target}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_figure_states_the_command_that_made_it(page):
    lines = (DOCS / page).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("!["):
            nearby = "\n".join(lines[max(0, i - 6) : i + 7])
            assert re.search(r"python (scripts|benchmarks)/\w+\.py", nearby), (
                f"{page}:{i + 1}: a figure without the command that made it next to it"
            )


def test_every_figure_file_is_used_by_a_page():
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    for figure in (DOCS / "figures").glob("*.png"):
        assert f"figures/{figure.name}" in text, f"{figure.name} is not shown in any page"


def test_architecture_layers_hold():
    """The layer diagram: every module is listed once and imports only from lower layers."""
    text = (DOCS / "architecture.md").read_text()
    block = text.split("Layers (")[1].split("```")[1]
    layer_of: dict[str, int] = {}
    for line in block.strip().splitlines():
        number, *rest = line.split()
        for module in re.findall(r"([\w/]+)\.py", " ".join(rest)):
            assert module not in layer_of, f"{module} listed twice"
            layer_of[module] = int(number)
    graph = _actual_imports()
    assert set(layer_of) == set(graph)
    for module, deps in graph.items():
        for dep in deps:
            assert layer_of[dep] < layer_of[module], f"{module} imports {dep} from its layer or up"


#: Each subpackage and the subpackages it may import from (its own layer and those below).
_SUBPACKAGE_MAY_USE = {
    "engine": {"engine"},
    "model": {"engine", "model"},
    "export": {"engine", "model", "export"},
    "lightning": {"engine", "model", "export", "lightning"},
    # third-party tools that run our engine (coreai-opt's plugin): never imported by the layers
    "integrations": {"engine", "model", "export", "integrations"},
    "": {"engine", "model", "export", "lightning"},  # command.py, the console script
}


def test_subpackages_import_only_their_own_layer_and_those_below():
    """The tree shows the data flow: engine <- model <- export <- lightning, never upwards."""
    for module, deps in _actual_imports().items():
        layer = module.rpartition("/")[0]
        for dep in deps:
            assert dep.rpartition("/")[0] in _SUBPACKAGE_MAY_USE[layer], (
                f"{module} imports {dep}, a layer above its own"
            )


def test_only_the_lightning_layer_imports_lightning():
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path).startswith("lightning/") or (path.stem == "__init__" and (
            path.parent.name == "lightning"
        )):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in ("lightning", "pytorch_lightning"), (
                    f"{_module_name(path)} imports {name}: only lightning_dkm/lightning/ may"
                )


# -- every Python snippet runs ------------------------------------------------------------------
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_SKIP = re.compile(r"<!--\s*snippet:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
#: The pages whose snippets run: the README and every page in docs/.
SNIPPET_PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _snippets() -> list:
    """``(page, line, code)`` of every ```python block; a block right after
    ``<!-- snippet: skip (reason) -->`` is reported as skipped, with the reason."""
    found = []
    for page in SNIPPET_PAGES:
        text = page.read_text()
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
            skip = _SKIP.fullmatch(before.strip())
            marks = [pytest.mark.skip(reason=skip["reason"])] if skip else []
            found.append(pytest.param(page.name, line, match.group(1), marks=marks,
                                      id=f"{page.name}:{line}"))
    return found


@pytest.fixture(scope="module")
def snippet_files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("snippet_files")


@pytest.mark.parametrize(("page", "line", "code"), _snippets())
def test_every_python_snippet_runs(page, line, code, tmp_path, monkeypatch, snippet_files):
    """Each snippet in a fresh namespace (tests/doc_fixtures.py: the names a page leaves to
    the reader) with a fresh working directory holding the files the pages name."""
    import warnings

    from doc_fixtures import snippet_namespace
    from extras import missing_extra_behind, need

    monkeypatch.chdir(tmp_path)
    # The pages' Trainers name no accelerator: pin Lightning's "auto" to the CPU, so that a
    # snippet's devices=2 means two CPU processes on a machine with one GPU too.
    monkeypatch.setenv("PL_TRAINER_ACCELERATOR", "cpu")
    namespace = snippet_namespace(tmp_path, snippet_files)
    source = "\n" * (line) + code  # tracebacks name the page's own line numbers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exec(compile(source, f"{ROOT.name}/{page}", "exec"), namespace)
        except Exception as error:
            module = missing_extra_behind(error)
            if module is None:
                raise
            need(module)  # skips (or fails under LIGHTNING_DKM_REQUIRE_EXTRAS=1)
            raise


def test_the_snippet_collector_finds_blocks_and_skip_markers(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n<!-- snippet: skip (needs macOS) -->\n"
                    "```python\nimport coremltools\n```\n\n```yaml\nb: 2\n```\n")
    monkeypatch.setitem(globals(), "SNIPPET_PAGES", [page])
    params = _snippets()
    assert [(p.values[1], p.values[2]) for p in params] == [(3, "a = 1\n"),
                                                            (8, "import coremltools\n")]
    assert [m.kwargs.get("reason") for m in params[1].marks] == ["needs macOS"]
    assert not params[0].marks


def _named_object(dotted: str) -> object:
    """The object ``lightning_dkm.a.b.c`` names: the longest importable module, then
    attributes."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("page", [p.name for p in SNIPPET_PAGES])
def test_every_call_written_in_a_page_names_a_function(page):
    """``lightning_dkm.model.post_training(model, bits=2)`` named a module, not a function;
    any ``lightning_dkm.<dotted name>(`` in a page must name something callable."""
    path = ROOT / page if page == "README.md" else DOCS / page
    for dotted in sorted(set(re.findall(r"\b(lightning_dkm(?:\.\w+)+)\(", path.read_text()))):
        obj = _named_object(dotted)
        assert callable(obj) and not inspect.ismodule(obj), f"{page}: {dotted} is not callable"
