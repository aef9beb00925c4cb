"""What users read points at the project's own documents, never at files only its developers have."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
USER_FACING = ["README.md", "srpo_trl", "docs", "examples", "recipes", "accelerate_configs"]
FORBIDDEN = re.compile(r"\.\./shared|SPEC §|SPEC\.md|\bSPEC section")


def _files():
    for name in USER_FACING:
        path = ROOT / name
        yield from ([path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()))


def test_user_facing_files_cite_the_projects_own_method_page():
    offending = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _files()
        if path.suffix in (".py", ".md", ".yaml", ".ipynb", ".cfg")
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), start=1)
        if FORBIDDEN.search(line)
    ]
    assert not offending, f"cite docs/method.md instead: {offending}"


def test_method_page_has_every_section_the_code_cites():
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", (ROOT / "docs" / "method.md").read_text(), re.M)}
    cited = {
        int(number)
        for path in _files()
        if path.suffix in (".py", ".md", ".yaml")
        for number in re.findall(r"method §(\d+)", path.read_text(errors="ignore"))
    }
    assert cited and cited <= sections, sorted(cited - sections)
