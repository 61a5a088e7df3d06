"""The package layout of docs/architecture.md holds: imports run only down the stages (record and
data and nn below train, train below visualize, the shared modules below all), no two modules
import each other (even inside functions), and the config schemas import nothing heavy."""

import ast
import pathlib
import subprocess
import sys

import pytest

SAEV = pathlib.Path(__file__).resolve().parents[1] / "saev"

# What each top-level part of saev/ may import from saev (besides itself).
ALLOWED = {
    "cli": set(),
    "shards": set(),
    "synthetic": {"shards"},
    "demo": set(),
    "export": {"cli", "shards", "nn"},
    "record": {"cli", "shards"},
    "data": {"shards"},
    "nn": set(),
    "train": {"cli", "shards", "data", "nn"},
    "visualize": {"cli", "shards", "data", "nn", "train", "record"},
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SAEV.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> set[str]:
    """saev modules imported anywhere in the file (inside functions too), except under
    `if TYPE_CHECKING:`, which never runs."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("saev")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("saev"):
            for a in node.names:  # `from saev.x import y`: y may be a module of x
                sub = f"{node.module}.{a.name}"
                known = (SAEV.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                found.add(
                    sub if known or (SAEV.parent / sub.replace(".", "/")).is_dir() else node.module
                )
    return found


MODULES = {module_name(p): imports(p) for p in sorted(SAEV.rglob("*.py"))}


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_part_is_listed():
    assert {part(m) for m in MODULES if m != "saev"} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_stages(module):
    if module == "saev":
        return
    mine = part(module)
    for imported in MODULES[module]:
        other = part(imported)
        assert other == mine or other in ALLOWED[mine], f"{module} imports {imported}"


def test_no_import_cycle():
    graph = {m: {i for i in deps if i in MODULES and i != m} for m, deps in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_config_schemas_import_nothing_heavy():
    code = (
        "import sys\n"
        "import saev.record.config, saev.train.config, saev.visualize.config, saev.cli\n"
        "import saev.train.sweep, saev.shards\n"
        "heavy = ('torch', 'lightning', 'timm', 'open_clip', 'wandb')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_no_source_file_is_ignored_by_git():
    """A file that .gitignore hides (`shards/` once hid saev/shards/__init__.py) is missing from
    every fresh clone, while the checkout it was written in still works."""
    root = SAEV.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(root)) for p in [*SAEV.rglob("*.py"), *root.glob("conf/**/*.yaml")]]
    res = subprocess.run(["git", "check-ignore", *files], cwd=root, capture_output=True, text=True)
    assert res.stdout.split() == [], "ignored by .gitignore"
