"""The direction of imports between the packages, read from the source (every import
statement, also those inside functions): the model knows nothing of training, data or
launching; the data pipelines know nothing of the model or training; training knows the
model and the data, never the launchers; the launchers start jobs by module name only."""

import ast
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
        if module.split(".")[0] in OURS - {package} - ALLOWED[package]
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


def test_a_wrong_way_import_is_found(tmp_path):
    package = tmp_path / "looplm"
    package.mkdir()
    (package / "bad.py").write_text("def f():\n    from train.config import PretrainConfig\n")
    assert wrong_way("looplm", tmp_path) == ["looplm/bad.py:2 imports train.config"]
