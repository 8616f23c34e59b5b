"""The versions we rely on are both installed and declared: MLflow >= 3.10, Ray >= 2.52, torch >= 2.10.

Why these floors: MLflow 3.10+ for the server security middleware and the SQLite default;
Ray 2.52+ for token authentication (`RAY_AUTH_MODE=token`, KubeRay `authOptions`); torch 2.10+
for the training stack pinned beside torchvision. A declared floor must not admit an older
version, so `pip install` on a fresh machine cannot resolve to one.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOORS = {"mlflow": Version("3.10"), "ray": Version("2.52"), "torch": Version("2.10")}


def declared_requirements(pyproject: dict) -> dict[str, list[Requirement]]:
    """Every requirement in [project] dependencies and optional-dependencies, by package name."""
    project = pyproject.get("project", {})
    texts = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        texts += extra
    found: dict[str, list[Requirement]] = {}
    for text in texts:
        req = Requirement(text)
        found.setdefault(canonicalize_name(req.name), []).append(req)
    return found


def lowest_admitted(req: Requirement) -> Version | None:
    """The lower bound a requirement's specifiers put on versions (None: no lower bound)."""
    bounds = [Version(s.version.rstrip(".*")) for s in req.specifier if s.operator in (">=", ">", "==", "~=", "===")]
    return max(bounds) if bounds else None


def floor_problems(pyproject: dict, floors: dict[str, Version]) -> list[str]:
    problems = []
    declared = declared_requirements(pyproject)
    for name, floor in floors.items():
        reqs = declared.get(name, [])
        if not reqs:
            problems.append(f"{name} is not declared in pyproject.toml")
        for req in reqs:
            low = lowest_admitted(req)
            if low is None or low < floor:
                problems.append(f"{req} admits versions below {floor}")
    return problems


def installed_problems(installed: dict[str, str], floors: dict[str, Version]) -> list[str]:
    return [f"{name} {installed[name]} is installed; need >= {floor}"
            for name, floor in floors.items() if Version(installed[name]) < floor]


def test_pyproject_declares_floors_that_admit_no_older_version():
    pyproject = tomllib.loads(PYPROJECT.read_text())
    assert floor_problems(pyproject, FLOORS) == []


def test_installed_versions_meet_the_floors():
    installed = {name: metadata.version(name) for name in FLOORS}
    assert installed_problems(installed, FLOORS) == []


def test_installed_versions_satisfy_what_pyproject_declares():
    declared = declared_requirements(tomllib.loads(PYPROJECT.read_text()))
    for name in FLOORS:
        for req in declared[name]:
            assert req.specifier.contains(metadata.version(name), prereleases=True), (req, metadata.version(name))


@pytest.mark.parametrize(
    "dependencies, expected",
    [
        (["mlflow>=2.0,<4", "ray[default]>=2.52", "torch>=2.10"], "admits versions below 3.10"),
        (["mlflow>=3.10", "ray[default]", "torch>=2.10"], "ray[default] admits versions below 2.52"),
        (["mlflow>=3.10", "ray>=2.52", "torch<3"], "torch<3 admits versions below 2.10"),
        (["mlflow>=3.10", "ray>=2.52"], "torch is not declared"),
        (["mlflow~=3.9", "ray>=2.52", "torch>=2.10"], "admits versions below 3.10"),
    ],
)
def test_floor_check_rejects_declarations_that_admit_older_versions(dependencies, expected):
    problems = floor_problems({"project": {"dependencies": dependencies}}, FLOORS)
    assert any(expected in p for p in problems), problems


def test_floor_check_sees_older_floors_hidden_in_extras():
    pyproject = {"project": {"dependencies": ["mlflow>=3.10", "ray>=2.52", "torch>=2.10"],
                             "optional-dependencies": {"gpu": ["torch>=2.0"]}}}
    assert floor_problems(pyproject, FLOORS) == ["torch>=2.0 admits versions below 2.10"]


def test_installed_check_rejects_old_versions():
    old = {"mlflow": "3.9.2", "ray": "2.51.1", "torch": "2.9.1+cu128"}
    assert len(installed_problems(old, FLOORS)) == 3
    assert installed_problems({"mlflow": "3.10.0", "ray": "2.52.0", "torch": "2.10.0+cpu"}, FLOORS) == []
