"""The test tree's own rules: pytest imports test files by basename (no packages), so two files of one name in two
tiers stop the whole collection ("import file mismatch") before any test runs."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_basenames_are_unique_across_tiers():
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
