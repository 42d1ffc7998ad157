"""The direction of imports between the packages, read from the source (every import
statement, also those inside functions): the model knows nothing of training, data or
launching; the data pipelines know nothing of the model or training (they share only
`looplm.files`, the standard-library helpers every output is written through); training
knows the model and the data, never the launchers; the launchers start jobs by module name
only."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = {"looplm", "data_pipelines", "train", "launch", "scripts", "tests"}
ALLOWED = {
    "looplm": set(),
    "data_pipelines": set(),
    "train": {"looplm", "data_pipelines"},
    "launch": set(),
}
SHARED = {"looplm.files"}
"""Modules any package may import: they import nothing but the standard library."""
DISTRIBUTED = ("torch.distributed", "deepspeed")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def wrong_way(package: str, root: Path = REPO) -> list[str]:
    return [
        f"{path.relative_to(root)}:{line} imports {module}"
        for path in sorted((root / package).rglob("*.py"))
        for line, module in imports(path)
        if module.split(".")[0] in OURS - {package} - ALLOWED[package] and module not in SHARED
    ]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    assert wrong_way(package) == []


def test_the_model_has_no_distributed_code():
    found = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((REPO / "looplm").rglob("*.py"))
        for line, module in imports(path)
        if module.startswith(DISTRIBUTED)
    ]
    assert found == []


def test_the_shared_modules_import_only_the_standard_library():
    for module in SHARED:
        path = REPO / (module.replace(".", "/") + ".py")
        found = [
            name for _, name in imports(path) if name.split(".")[0] not in sys.stdlib_module_names
        ]
        assert found == [], module


def test_a_wrong_way_import_is_found(tmp_path):
    package = tmp_path / "looplm"
    package.mkdir()
    (package / "bad.py").write_text("def f():\n    from train.config import PretrainConfig\n")
    assert wrong_way("looplm", tmp_path) == ["looplm/bad.py:2 imports train.config"]


def module_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports when it is imported (module-level statements,
    not those under `if TYPE_CHECKING` or inside functions); `from package import name`
    names the submodule when there is one."""
    graph = {}
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            graph[name] = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [
                        f"{node.module}.{alias.name}"
                        if (root / node.module.replace(".", "/") / f"{alias.name}.py").is_file()
                        else node.module
                        for alias in node.names
                    ]
                else:
                    continue
                graph[name] |= {t for t in targets if t.split(".")[0] in ALLOWED}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`, one path each."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_itself_through_others():
    assert cycles(module_graph()) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def job_modules(root: Path = REPO) -> set[str]:
    """The modules that are Hydra apps (`@hydra.main`): the jobs."""
    return {
        ".".join(path.relative_to(root).with_suffix("").parts)
        for path in (root / "train").rglob("*.py")
        if "@hydra.main(" in path.read_text()
    }


def test_no_job_is_imported_by_another_module_or_script():
    jobs = job_modules()
    assert {"train.pretrain", "train.sft", "train.gate_tuning", "train.evaluate"} <= jobs
    found = [
        f"{path.relative_to(REPO)}:{line} imports the job {module}"
        for package in [*ALLOWED, "scripts"]
        for path in sorted((REPO / package).rglob("*.py"))
        for line, module in imports(path)
        if module in jobs and ".".join(path.relative_to(REPO).with_suffix("").parts) != module
    ]
    assert found == []
