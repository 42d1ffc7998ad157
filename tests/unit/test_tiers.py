"""The folder is the tier: the unit tier (`-m "not distributed"`) is every test outside
tests/distributed, and none inside it."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_unit_tier_is_every_test_outside_tests_distributed():
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(
        [*command, "-m", "not distributed", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    folders = {line.split("/")[1] for line in out.splitlines() if "::" in line}
    assert folders == {"unit", "gpu"}
    deselected = int(re.search(r"(\d+) deselected", out).group(1))
    on_disk = sum(
        len(re.findall(r"^def test_", path.read_text(), re.MULTILINE))
        for path in (REPO / "tests/distributed").glob("test_*.py")
    )
    assert deselected >= on_disk > 40  # parametrized tests count once per case
