"""The package's structure, read with ``ast``: no import cycle inside ``lib``, no underscore
name used outside its own module, no function over 60 lines of code, no module over 500 lines,
the layers (``lib.data``, ``lib.model``, ``lib.attack`` and ``lib.analysis`` never import
``lib.run``), no run-folder file name spelt outside ``lib/run/layout.py``, no run-folder table
read outside ``lib/run/tables.py``, and no notebook read by ``lib``."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"
#: Every module of the package, by dotted name (``lib.run.layout``), subpackages included.
MODULES = {
    ".".join(path.relative_to(LIB.parent).with_suffix("").parts): path
    for path in sorted(LIB.rglob("*.py")) if path.stem != "__init__"
}
#: The subpackages; ``from lib.run import layout`` imports the module ``lib.run.layout``.
PACKAGES = {".".join(path.parent.relative_to(LIB.parent).parts)
            for path in LIB.rglob("__init__.py")}
MAX_FUNCTION_LINES = 60
#: metrics.paper_claims is being split into one function per claim elsewhere.


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _lib_imports(module: str, tree: ast.Module) -> dict[str, set[str]]:
    """``{imported lib module: names taken from it}``, at any depth (function bodies too)."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in MODULES:
                found.setdefault(node.module, set()).update(a.name for a in node.names)
            elif node.module in PACKAGES:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        found.setdefault(f"{node.module}.{alias.name}", set())
    found.pop(module, None)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: set(_lib_imports(name, _tree(path))) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from its smallest name)."""
    found = set()
    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                start = cycle.index(min(cycle))
                found.add(tuple(cycle[start:] + cycle[:start]))
            elif len(path) < len(graph):
                walk(nxt, [*path, nxt])
    for node in sorted(graph):
        walk(node, [node])
    return sorted(list(c) for c in found)


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """``{local name: lib module}`` for every ``from lib.x import module [as name]``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PACKAGES and node.level == 0:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def private_uses() -> list[str]:
    """``module: name`` for every ``_name`` of another lib module imported or used as an
    attribute of that module."""
    uses = []
    for name, path in MODULES.items():
        tree = _tree(path)
        imports = _lib_imports(name, tree)
        for other, names in imports.items():
            uses += [f"{name} imports {other}.{n}" for n in sorted(names) if n.startswith("_")]
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                uses.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(uses))


def code_lines(source: str, node: ast.AST) -> int:
    """Lines of a function's body that hold code: its signature, docstring, comments and
    blank lines are not counted."""
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        docstring = set(range(first.lineno, first.end_lineno + 1))
    else:
        docstring = set()
    lines = set()
    text = "\n".join(source.splitlines()[node.lineno - 1:node.end_lineno])
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                          tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        for line in range(token.start[0], token.end[0] + 1):
            lines.add(line + node.lineno - 1)
    return len({line for line in lines if line >= first.lineno} - docstring)


def long_functions() -> list[str]:
    found = []
    for path in MODULES.values():
        relative = path.relative_to(LIB.parent).as_posix()
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                count = code_lines(source, node)
                if count > MAX_FUNCTION_LINES:
                    found.append(f"{relative}:{node.lineno} {node.name}: {count} lines of code")
    return found


def test_no_import_cycle_inside_lib() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"lib.a": {"lib.b"}, "lib.b": {"lib.c"}, "lib.c": {"lib.a"}, "lib.d": {"lib.a"}}
    assert cycles(graph) == [["lib.a", "lib.b", "lib.c"]]


def test_no_underscore_name_is_used_outside_its_module() -> None:
    assert private_uses() == []


def test_no_lib_function_is_longer_than_60_lines_of_code() -> None:
    assert long_functions() == []


def test_code_lines_leave_out_docstrings_comments_and_blank_lines() -> None:
    source = ('def f(x):\n    """Doc.\n\n    More."""\n    # why\n\n'
              '    y = (x +\n         1)\n    return y\n')
    node = ast.parse(source).body[0]
    assert code_lines(source, node) == 3  # the two lines of y, return


def _string_constants(tree: ast.Module) -> set[str]:
    """Every string constant of the code (f-string pieces too), docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings}


#: Run-folder names as code spells them; lib/run/layout.py alone may.
RUN_FOLDER_NAMES = ("manifest.json", "train_params.json", "job.json", "results.csv", "notebooks",
                    "metrics.csv", "predictions.csv", "dataset.json", "reference.csv",
                    "run.lock")
#: Names that a module spells for a folder of its own that is not a run folder.
NOT_RUN_FOLDERS = {
    "lib/run/rerun.py": {"notebooks"},  # the scratch folder of a rerun, not a run folder
}


def test_run_folder_names_are_spelt_only_in_the_layout() -> None:
    spelt = []
    for path in MODULES.values():
        relative = path.relative_to(LIB.parent).as_posix()
        if relative == "lib/run/layout.py":
            continue
        constants = _string_constants(_tree(path))
        allowed = NOT_RUN_FOLDERS.get(relative, set())
        spelt += [f"{relative}: {name!r}" for name in RUN_FOLDER_NAMES
                  if name in constants and name not in allowed]
    assert spelt == []


# --------------------------------------------------------------------------- layers and sizes

#: The layers below the run machinery: they take and return tensors and tables, and never
#: import lib.run (only lib.run, and lib.train for the files a training run writes, know where
#: a run folder keeps its files).
LOWER_LAYERS = ("lib.data", "lib.model", "lib.attack", "lib.analysis")
MAX_MODULE_LINES = 500
#: Modules allowed above the limit, each with the reason it is not split.
LONG_MODULES: dict[str, str] = {}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``module imports lib.run.x`` for every lower-layer module that imports the run layer."""
    return sorted(f"{module} imports {other}" for module, imports in graph.items()
                  if module.startswith(LOWER_LAYERS)
                  for other in imports if other.startswith("lib.run"))


def test_lower_layers_never_import_the_run_machinery() -> None:
    assert layer_violations(import_graph()) == []


def test_the_layer_rule_finds_a_violation() -> None:
    graph = {"lib.attack.plan": {"lib.run.layout", "lib.attack.selection"},
             "lib.run.tables": {"lib.attack.results"}, "lib.train.loop": {"lib.run.ranks"}}
    assert layer_violations(graph) == ["lib.attack.plan imports lib.run.layout"]


def test_no_module_is_longer_than_500_lines() -> None:
    lengths = {path.relative_to(LIB.parent).as_posix(): len(path.read_text().splitlines())
               for path in MODULES.values()}
    assert {name: n for name, n in lengths.items()
            if n > MAX_MODULE_LINES and name not in LONG_MODULES} == {}
    # an exemption that no longer needs to be one is removed
    assert all(lengths[name] > MAX_MODULE_LINES for name in LONG_MODULES)


# --------------------------------------------------------------------------- one owner per file

ROOT = LIB.parent
#: Calls that read a file of tables, records or arrays.
FILE_READS = re.compile(r"read_csv\(|read_json\(|json\.load\(|read_npz\(|np\.load\("
                        r"|json\.loads\(.*read_text\(")
#: The modules that may: the file primitives, the run folder's tables, and two files that are
#: not run-folder tables.
FILE_READERS = {
    "lib/io.py": "the primitives",
    "lib/run/tables.py": "every table and record of the run folder",
    "lib/data/cache.py": "the frame cache's own files, outside the run folder",
    "lib/run/lock.py": "run.lock's holder record, read while another process holds it",
}


def file_reads() -> list[str]:
    """``path:line`` of every file read outside :data:`FILE_READERS` in lib, the notebooks
    and the benchmarks."""
    found = []
    paths = [*LIB.rglob("*.py"), *(ROOT / "notebooks").glob("*.py"),
             *(ROOT / "benchmarks").glob("*.py")]
    for path in sorted(paths):
        relative = path.relative_to(ROOT).as_posix()
        if relative in FILE_READERS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FILE_READS.search(code) and not code.lstrip().startswith(("``", "\"", "'")):
                found.append(f"{relative}:{number}: {line.strip()}")
    return found


def test_run_folder_files_are_read_only_through_the_tables_module() -> None:
    assert file_reads() == []


def test_the_file_read_finder_finds_a_read() -> None:
    assert FILE_READS.search('table = pd.read_csv(path, dtype={"image_id": str})')
    assert FILE_READS.search("holder = json.loads(lock_file(run_dir).read_text())")
    assert not FILE_READS.search("probe = json.loads(output.strip())")


def test_lib_reads_no_notebook() -> None:
    # jupytext reads a notebook; lib only converts one to execute it (the stage command)
    readers = sorted(name for name, path in MODULES.items()
                     if re.search(r"^\s*import jupytext|jupytext\.", path.read_text(), re.M))
    assert readers == ["lib.run.pipeline"]
    pipeline = MODULES["lib.run.pipeline"].read_text()
    assert "jupytext.read(" in pipeline and pipeline.count("jupytext.read(") == 1


# --------------------------------------------------------------------------- self-contained

#: Documents this repository does not hold; the code and the book cite the book's chapters.
ABSENT_DOCUMENTS = tuple(f"{name}.md" for name in
                         ("METHOD", "TOOLCHAIN", "STATISTICS", "ARCHITECTURE", "STYLE"))
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".cfg", ".toml", ".sh", ".txt", ".bib", ".ini"}
SKIPPED_FOLDERS = {".git", ".venv", "data", "_build", ".pytest_cache", ".ruff_cache",
                   "__pycache__", "executed"}


def test_no_file_names_a_document_the_repository_does_not_hold() -> None:
    found = []
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if (SKIPPED_FOLDERS & set(relative.parts) or not path.is_file()
                or (path.suffix not in TEXT_SUFFIXES and path.name != "Makefile")):
            continue
        text = path.read_text(errors="replace")
        found += [f"{relative}: {name}" for name in ABSENT_DOCUMENTS if name in text]
    assert found == []
