"""The code base stays ruff clean (the configuration lives in pyproject.toml) and its functions stay readable."""

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from conftest import REPO

LONGEST_FUNCTION = 120  # lines; a longer one is several jobs that want names of their own


def test_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]


def test_no_function_is_longer_than_the_limit() -> None:
    too_long = []
    for path in sorted([*(REPO / "twist_core").rglob("*.py"), *(REPO / "app").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, "split these functions: " + ", ".join(too_long)


def imported_modules(path: Path) -> list[str]:
    """Every module an import statement of ``path`` names (``from a import b`` names ``a`` and ``a.b``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def test_the_core_never_imports_the_app() -> None:
    offenders = [f"{path.relative_to(REPO)}: {name}" for path in sorted((REPO / "twist_core").rglob("*.py"))
                 for name in imported_modules(path) if name == "app" or name.startswith("app.")]
    assert not offenders, "the app registers itself (pyproject entry points); the core must not name it: " + \
        ", ".join(offenders)


VIEW_CORE_NAMES = {"twist_core.curate.curation.EXCLUDED", "twist_core.curate.curation.Record",
                   "twist_core.curate.curation.CurationError", "twist_core.index.metadata.IndexUserError"}


def test_app_views_only_render() -> None:
    """A view takes its data from the workspace: from the core it may name only a constant, a record type and
    the errors it turns into messages, never code that opens index files or computes (issue 38)."""
    offenders = []
    for path in sorted((REPO / "app" / "views").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                named = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in named
                          if name.startswith("twist_core") and name not in VIEW_CORE_NAMES]
    assert not offenders, "move this behind app/workspace.py: " + ", ".join(offenders)


STAGE_ORDER = ["data", "model", "deploy", "evaluation", "train", "label", "index", "curate"]  # docs/architecture.md


def stage_imports() -> tuple[dict[str, set[str]], list[str]]:
    """Which stages each stage package imports, and the imports of a command from inside a stage."""
    core = REPO / "twist_core"
    stages = {path.parent.name for path in core.glob("*/__init__.py")} - {"commands"}
    graph: dict[str, set[str]] = {stage: set() for stage in stages}
    upward = []
    for stage in stages:
        for path in (core / stage).rglob("*.py"):
            for name in imported_modules(path):
                parts = name.split(".")
                if parts[0] != "twist_core" or len(parts) < 2:
                    continue
                if parts[1] in stages and parts[1] != stage:
                    graph[stage].add(parts[1])
                if parts[1] in ("commands", "cli", "demo") and path.name != "__main__.py":
                    upward.append(f"{path.relative_to(REPO)}: {name}")
    return graph, upward


def test_stage_packages_depend_one_way() -> None:
    """The stage packages (data, model, ...) form a pipeline: no two stages import each other, even through a
    third, and no stage imports the commands above them (only a package's ``__main__`` runs its command)."""
    graph, upward = stage_imports()
    assert not upward, "a stage imports a command: " + ", ".join(upward)
    try:
        TopologicalSorter(graph).static_order()
    except CycleError as error:
        raise AssertionError(f"stage packages import each other in a cycle: {error.args[1]}") from None


def test_stages_import_only_the_stages_before_them_in_the_declared_order() -> None:
    """A cycle test passes for any order; this one holds the code to the order docs/architecture.md states."""
    graph, _ = stage_imports()
    assert set(graph) == set(STAGE_ORDER), "declare a new stage in STAGE_ORDER and docs/architecture.md"
    assert ", ".join(STAGE_ORDER) in " ".join((REPO / "docs" / "architecture.md").read_text().split())
    upward = [f"{stage} imports {other}" for stage, others in graph.items() for other in sorted(others)
              if STAGE_ORDER.index(other) > STAGE_ORDER.index(stage)]
    assert not upward, "a stage imports one after it: " + ", ".join(upward)


def architecture_tree() -> dict[str, str]:
    """docs/architecture.md's tree of twist_core/: each package's lines (``""``: the top-level modules' lines)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("```\ntwist_core/\n", 1)[1].split("```", 1)[0]
    lines: dict[str, str] = {}
    package = ""
    for line in block.splitlines():
        head = line[2:].split(" ", 1)[0] if line.startswith("  ") and not line.startswith("   ") else None
        if head is not None:
            package = head.rstrip("/") if head.endswith("/") else ""
        lines[package] = lines.get(package, "") + line + "\n"
    return lines


def test_architecture_names_every_module_of_the_core() -> None:
    """docs/architecture.md is where a newcomer finds each thing: every module is named in its package's lines of
    the tree (a core command by its name in backticks), so a module it leaves out is one nobody finds."""
    text = (REPO / "docs" / "architecture.md").read_text()
    tree = architecture_tree()
    core = REPO / "twist_core"
    missing = []
    for path in sorted(core.rglob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        parts = path.relative_to(core).parts
        if parts[0] == "commands":
            found = f"`{path.stem}`" in text
        else:
            found = path.name in tree.get(parts[0] if len(parts) > 1 else "", "")
        if not found:
            missing.append(str(path.relative_to(REPO)))
    assert not missing, "docs/architecture.md's tree does not name: " + ", ".join(missing)
