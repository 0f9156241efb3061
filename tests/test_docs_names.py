"""Every module a docs page names exists: a page that still names a moved or renamed module
sends a newcomer to a file that is not there."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("shared/runops/*/README.md")]
)
# Code spans only: prose may say "the store" without naming a file.
SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"^(?:runops|services)(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")
PATH = re.compile(r"^(?:services|shared|tests|docker|protos)/[\w./-]*\w$")
FILE = re.compile(r"^[\w/]+\.(?:py|sql|lua)$")
# Files a user makes (the state dir's env file, compose's .env), not files of the checkout.
LOCAL_FILES = {"runops.env", "docker/.env"}
# Every file of the checkout, by its path and by its name, for spans that name a file alone.
FILES = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if ".git" not in p.parts]


def _spans(page: Path) -> list[str]:
    return [m.group(1).strip() for m in SPAN.finditer(page.read_text())]


def _dotted_exists(name: str) -> bool:
    """`runops.kit.clients.ServiceClient._call`: the longest importable prefix, then attributes;
    `runops.runstore.v1.RunStoreService`: a proto full name in the generated descriptors."""
    if _proto_name(name):
        return True
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _proto_name(name: str) -> bool:
    package, _, symbol = name.rpartition(".")
    if not package.endswith(".v1"):
        return False
    for module in importlib.import_module(package).__path__:
        for pb2 in Path(module).glob("*_pb2.py"):
            generated = importlib.import_module(f"{package}.{pb2.stem}")
            file = generated.DESCRIPTOR
            if symbol in file.services_by_name or symbol in file.message_types_by_name:
                return True
    return False


def _path_exists(span: str) -> bool:
    target = span.split(":")[0].rstrip("/")
    if PATH.match(target):
        return (ROOT / target).exists() or any(f.startswith(target) for f in FILES)
    # A bare file name (or a short relative path) must end some file of the checkout.
    return any(f == target or f.endswith("/" + target) for f in FILES)


def _exists(span: str) -> bool:
    """False only for a span that names a module, file or path the checkout lacks."""
    if span in LOCAL_FILES:
        return True
    if FILE.match(span) or PATH.match(span):
        return _path_exists(span)
    if DOTTED.match(span):
        return _dotted_exists(span)
    return True


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_module_a_page_names_exists(page: Path) -> None:
    missing = [span for span in _spans(page) if not _exists(span)]
    assert not missing, f"{page.relative_to(ROOT)} names what the code does not have: {missing}"


def test_the_architecture_page_says_where_every_spec_section_lives() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Where things live", 1)[1]
    sections = {int(m.group(1)) for m in re.finditer(r"^\| (\d) \|", table, re.MULTILINE)}
    assert sections == set(range(8))
