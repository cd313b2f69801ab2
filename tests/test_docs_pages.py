"""The docs' pages stay true to the tree: README.md is a landing page, docs/architecture.md names
every module of `rto/`, and no relative link in README.md or docs/*.md points at nothing.

Modules are named by file path from the repository root (`rto/core/rewards.py`,
`rto/stages/__init__.py`): every `.py` file under rto/, at any depth, `__init__.py` and
`__main__.py` included, must appear in docs/architecture.md as that path - so adding a module
without its line there fails here - and every such path the page names must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README_MAX_LINES = 220
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def rto_modules(root: Path = ROOT) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "rto").rglob("*.py") if "__pycache__" not in p.parts)


def test_architecture_names_every_module_of_rto():
    page = ARCHITECTURE.read_text()
    missing = [m for m in rto_modules() if m not in page]
    assert not missing, f"docs/architecture.md does not name these modules (add a line for each): {missing}"


def test_architecture_names_no_module_that_is_gone():
    named = set(re.findall(r"\brto/[\w/]+\.py\b", ARCHITECTURE.read_text()))
    gone = sorted(m for m in named if not (ROOT / m).is_file())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"


def test_readme_is_a_landing_page():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move the detail to a page under docs/ and link it"
    )


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The targets of the page's Markdown links and images that are neither URLs nor anchors
    within the page, outside fenced code blocks, without their #anchor."""
    text = _FENCE.sub("", page.read_text())
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # https:, mailto:, ...; an anchor on the same page
        out.append(target.split("#", 1)[0])
    return out


def test_every_relative_link_points_to_an_existing_file():
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in _pages()
        for target in relative_links(page)
        if not (page.parent / target).exists()
    ]
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_the_link_check_sees_links():
    """Guard against a pattern that matches nothing: the README links every page of docs/."""
    links = relative_links(ROOT / "README.md")
    for page in ("usage", "algorithm", "architecture", "results", "performance", "reliability", "testing"):
        assert f"docs/{page}.md" in links, page


def _import_graph() -> dict[str, set[str]]:
    """rto's modules and the rto modules each imports, at the top or inside a function."""
    import ast

    root = ROOT / "rto"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_circle_in_rto():
    """docs/architecture.md says dependencies point one way: no module of rto/ reaches itself
    again through its imports (those inside functions included)."""
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circle = path[path.index(target) :] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


# The rooms in the order docs/architecture.md gives them ("What imports what"): a module imports
# only from its own room or one listed before it.
ROOMS = ("core", "io", "tasks", "runtime", "lm", "rl", "stages", "experiments", "api", "cli", "__main__")


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root, which imports no module of rto


def test_no_import_runs_back_up_a_room():
    page = ARCHITECTURE.read_text()
    order = page[page.index("## What imports what") : page.index("## The modules")]
    listed = re.findall(r"^\d+\. `([\w_]+)`", order, re.M)
    assert tuple(listed[: len(ROOMS) - 2]) == ROOMS[:-2], listed  # the page and this test agree
    graph = _import_graph()
    assert {_room(m) for m in graph} - {None} <= set(ROOMS), "a room missing from ROOMS and the page"
    back = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _room(module) and _room(target) and ROOMS.index(_room(target)) > ROOMS.index(_room(module))
    ]
    assert not back, "imports that run back up a room:\n" + "\n".join(sorted(back))
    assert not graph["rto"], "rto/__init__.py imports modules of rto at import time"
