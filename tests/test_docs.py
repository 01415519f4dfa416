"""Every document the code cites is in docs/, and every cited section exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITING = ["src", "conf", "tests", "benchmarks", "experiments", "Makefile", "pyproject.toml", "README.md"]
SUFFIXES = {".py", ".yaml", ".md", ".toml", ".sh", ""}
CITE = re.compile(r"docs/([\w-]+\.md)(?:\s*§\s*([\d.]+)(?:\s*-\s*([\d.]+))?)?")
OUTSIDE = re.compile(r"paper-spec|style\.md|peers\.md|released-code-reading|shared/docs")


def _files():
    for name in CITING:
        path = ROOT / name
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in paths:
            if p.suffix in SUFFIXES and "__pycache__" not in p.parts and p.name != "test_docs.py":
                yield p


def _sections(page: Path) -> set[str]:
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#+\s+([\d.]+)\s", page.read_text(), re.M)}


def test_citations_point_into_docs_and_sections_exist():
    cited, missing = 0, []
    for path in _files():
        text = path.read_text(errors="ignore")
        assert not OUTSIDE.search(text), f"{path.relative_to(ROOT)} cites a document outside the repository"
        for match in CITE.finditer(text):
            cited += 1
            page = ROOT / "docs" / match.group(1)
            if not page.is_file():
                missing.append(f"{path.relative_to(ROOT)}: {match.group(0)} (no such page)")
                continue
            for section in filter(None, match.group(2, 3)):
                if section.rstrip(".") not in _sections(page):
                    missing.append(f"{path.relative_to(ROOT)}: {match.group(0)} (no section {section})")
    assert cited >= 20, cited
    assert not missing, missing


def test_differences_table_has_its_columns():
    text = (ROOT / "docs" / "released-differences.md").read_text()
    assert "| aspect | released | ours | why |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 12
