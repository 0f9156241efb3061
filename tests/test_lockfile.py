"""The lock files in requirements/ match pyproject.toml (refresh them with `bash requirements/lock.sh`).

Offline and cheap: no resolver runs. A lock is stale when the top-level requirements it was
compiled from (uv's `# via runops (pyproject.toml)` / `# via -r requirements/build.in`
annotations) differ from the ones pyproject names, or when a pin no longer satisfies its
specifier. Changing only a requirement's extras is not detected.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
REFRESH = "run `bash requirements/lock.sh` and commit requirements/"

FROM_PYPROJECT = "runops (pyproject.toml)"
FROM_BUILD_IN = "-r requirements/build.in"

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")


@dataclass
class Pin:
    version: str
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)


def _parse_lock(path: Path) -> dict[str, Pin]:
    """uv's requirements format: `name==version [; marker] \\`, then `--hash=` and `# via` lines."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in path.read_text().splitlines():
        if match := _PIN.match(line):
            current = pins[canonicalize_name(match["name"])] = Pin(match["version"])
        elif current is not None and line.startswith("    --hash="):
            current.hashes.append(line.split("=", 1)[1].rstrip(" \\"))
        elif current is not None and line.startswith("    #"):
            source = line.strip().removeprefix("#").strip().removeprefix("via").strip()
            if source:
                current.via.add(source)
        elif line.strip() and not line.startswith("#"):
            raise AssertionError(f"{path.name}: unexpected line {line!r}")
    return pins


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(req.name): req for req in map(Requirement, lines)}


def _runtime_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return _requirements(project["dependencies"])


def _dev_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return _requirements(project["optional-dependencies"]["dev"])


def _build_in() -> dict[str, Requirement]:
    lines = (REQUIREMENTS / "build.in").read_text().splitlines()
    return _requirements([line for line in lines if line.strip() and not line.startswith("#")])


def _assert_compiled_from(
    lock: str, expected: dict[str, Requirement], sources: tuple[str, ...]
) -> None:
    pins = _parse_lock(REQUIREMENTS / lock)
    compiled_from = {name for name, pin in pins.items() if pin.via & set(sources)}
    assert compiled_from == set(expected), (
        f"{lock} is stale: requirements only in pyproject/build.in: "
        f"{sorted(set(expected) - compiled_from)}, only in the lock: "
        f"{sorted(compiled_from - set(expected))}; {REFRESH}"
    )
    unsatisfied = [
        f"{name}=={pins[name].version} vs {req}"
        for name, req in expected.items()
        if not req.specifier.contains(pins[name].version, prereleases=True)
    ]
    assert unsatisfied == [], f"{lock} is stale: {unsatisfied}; {REFRESH}"


def test_runtime_lock_is_compiled_from_the_project_dependencies() -> None:
    _assert_compiled_from("runtime.lock", _runtime_requirements(), (FROM_PYPROJECT,))


def test_dev_lock_is_compiled_from_dependencies_dev_extras_and_build_backend() -> None:
    expected = _runtime_requirements() | _dev_requirements() | _build_in()
    _assert_compiled_from("dev.lock", expected, (FROM_PYPROJECT, FROM_BUILD_IN))


def test_build_lock_is_compiled_from_the_build_backend() -> None:
    _assert_compiled_from("build.lock", _build_in(), (FROM_BUILD_IN,))


def test_build_in_matches_the_build_system_requires() -> None:
    build_system = _pyproject()["build-system"]
    assert isinstance(build_system, dict)
    declared = {name: str(req) for name, req in _requirements(build_system["requires"]).items()}
    assert {name: str(req) for name, req in _build_in().items()} == declared


@pytest.mark.parametrize("lock", ["runtime.lock", "build.lock"])
def test_image_locks_pin_what_ci_tests(lock: str) -> None:
    """runtime.lock and build.lock are constrained by dev.lock: the image ships what CI tested."""
    dev = _parse_lock(REQUIREMENTS / "dev.lock")
    differing = {
        name: (pin.version, dev[name].version if name in dev else None)
        for name, pin in _parse_lock(REQUIREMENTS / lock).items()
        if name not in dev or dev[name].version != pin.version
    }
    assert differing == {}, f"{lock} vs dev.lock: {differing}; {REFRESH}"


@pytest.mark.parametrize("lock", ["runtime.lock", "dev.lock", "build.lock"])
def test_lock_is_hashed_and_names_no_local_source(lock: str) -> None:
    """Every pin has hashes (`pip install --require-hashes`); no index, path or file URL leaks in."""
    text = (REQUIREMENTS / lock).read_text()
    pins = _parse_lock(REQUIREMENTS / lock)
    assert pins, f"{lock} pins nothing"
    unhashed = sorted(name for name, pin in pins.items() if not pin.hashes)
    assert unhashed == [], f"{lock}: pins without hashes: {unhashed}"
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for pin in pins.values() for h in pin.hashes)
    for marker in ("--index-url", "--extra-index-url", "--find-links", "file:", "-e ", "/opt/"):
        assert marker not in text, f"{lock} names a machine-local source ({marker!r})"
