"""Every archive under ``reports/`` that the docs cite is in the repository, and tracked.

The eighth session's archive (``reports/train-h200-2026-11-30/``) was cited by the docs but never
committed: ``.gitignore`` then ignored all of ``reports/`` except a list of names. CI runs on a
clean clone, so a cited file that git ignores is missing there and this test fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the commands write under reports/ by default: scratch, git-ignored, never an archive.
OUTPUT_DIRS = ("bench", "train", "train-logs", "studies")
OUTPUT_NAMES = (*OUTPUT_DIRS, "junit.xml")
# A path ends at the first character that cannot be part of one; a brace or angle bracket starts
# a pattern (`{a,b}`, `<run>`), so the path is cut before it.
CITED_PATH = re.compile(r"reports/[A-Za-z0-9_.=/-]+")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "reports").rglob("README.md")),
            *sorted((ROOT / "scripts" / "gpu" / "plans").glob("*.json"))]


def cited_archive_paths(text: str) -> set[str]:
    """``reports/...`` paths in ``text`` outside the commands' default output folders."""
    paths = set()
    for match in CITED_PATH.finditer(text):
        path = match.group(0).rstrip(".").rstrip("/")
        top = path.split("/")[1] if "/" in path else ""
        if not top or top in OUTPUT_NAMES or top.startswith("run="):
            continue
        paths.add(path)
    return paths


def all_cited() -> dict[str, list[str]]:
    cited: dict[str, list[str]] = {}
    for doc in documents():
        for path in cited_archive_paths(doc.read_text()):
            cited.setdefault(path, []).append(str(doc.relative_to(ROOT)))
    return cited


def test_the_parser_finds_archives_and_skips_outputs_and_patterns():
    text = ("see `reports/arch-1/run/x.pt`, reports/arch-2/, `reports/arch-3/{a,b}`, reports/train/x, "
            "reports/run=<id>/results.parquet, reports/bench/run=<id>/prefill.parquet and reports/arch-4.")
    assert cited_archive_paths(text) == {"reports/arch-1/run/x.pt", "reports/arch-2", "reports/arch-3",
                                         "reports/arch-4"}


def test_every_cited_archive_path_exists():
    cited = all_cited()
    assert cited, "the docs cite no archive: the pattern no longer matches them"
    missing = {path: docs for path, docs in cited.items() if not (ROOT / path).exists()}
    assert not missing, f"cited in the docs but not in the repository: {missing}"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_no_cited_archive_path_is_git_ignored():
    paths = sorted(all_cited())
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    ignored = result.stdout.split()
    assert result.returncode in (0, 1), result.stderr
    assert not ignored, f"cited in the docs but ignored by git (they would never be committed): {ignored}"


@pytest.mark.parametrize("name", ["run=20261128T115242.123Z-ab12/results.parquet", "junit.xml",
                                  *(f"{folder}/run=x/table.parquet" for folder in OUTPUT_DIRS)])
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_default_outputs_are_git_ignored(name):
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", f"reports/{name}"], cwd=ROOT,
                            check=False)
    assert result.returncode == 0, f"reports/{name} is a command's default output and should be git-ignored"
