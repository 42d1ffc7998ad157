"""DeepSpeed hostfiles: one `hostname slots=N` line per node, `#` comments, blank lines."""

from __future__ import annotations

import re
from pathlib import Path

_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


class HostfileError(ValueError):
    """A hostfile that is missing or does not parse; `problems` lists every one."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """The hosts of a hostfile, in file order, with their slots (GPUs).

    Raises HostfileError naming every bad line, a repeated host, or a missing or empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise HostfileError([f"no hostfile at {path}"])
    hosts: dict[str, int] = {}
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            problems.append(f"{path}:{number}: expected 'hostname slots=N', got {line!r}")
        elif match[1] in hosts:
            problems.append(f"{path}:{number}: host {match[1]} is listed twice")
        elif int(match[2]) < 1:
            problems.append(f"{path}:{number}: host {match[1]} has no slots")
        else:
            hosts[match[1]] = int(match[2])
    if not hosts and not problems:
        problems.append(f"{path}: lists no hosts")
    if problems:
        raise HostfileError(problems)
    return hosts
