"""Every document the repository cites is in the repository (a user's clone has nothing beside it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".txt", ".json", ".html", ".jinja"}
# A path-like mention of a Markdown file: optional ./ or ../ steps, folders, a file name ending in .md.
MENTION = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)*(?:[\w-]+/)*[\w-]+\.md)\b")
# The project's documents once lived outside the repository under these names: a bare mention is ambiguous.
RETIRED = {"TIDPO.md": "docs/ALGORITHM.md", "DEPENDENCIES.md": "docs/DEPENDENCIES.md"}


def _repo_files() -> list[Path]:
    """Tracked files and untracked ones git does not ignore (what the next commit can hold)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # a source tree without git
        skip = {".git", "outputs", "mlruns", "build", "dist", "__pycache__", ".venv"}
        files = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return [p for p in files if p.suffix in SUFFIXES and p.is_file() and p != Path(__file__).resolve()]


def doc_problems(path: Path, text: str, root: Path, md_names: set[str]) -> list[str]:
    """One line per cited .md document of ``text`` (from ``path``) that the repository at ``root`` lacks.

    A mention with a folder resolves from the repository root or from the citing file's folder and must stay
    inside the repository; ``../shared/docs/X.md`` does not. A bare ``X.md`` must be the name of a Markdown
    file in the repository, and the retired names (``RETIRED``) must be cited by their ``docs/`` path.
    """
    problems = []
    rel = path.relative_to(root)
    for number, line in enumerate(text.splitlines(), 1):
        for mention in MENTION.findall(line):
            where = f"{rel}:{number}: {mention}"
            if "/" not in mention:
                if mention in RETIRED:
                    problems.append(f"{where} (cite {RETIRED[mention]})")
                elif mention not in md_names:
                    problems.append(f"{where} (no such file in the repository)")
                continue
            first = mention.split("/")[0]
            if first not in {".", ".."} and not (root / first).exists() and first != "docs":
                continue  # another project's path (a folder this repository does not have)
            candidates = [(root / mention).resolve(), (path.parent / mention).resolve()]
            inside = [c for c in candidates if c.is_relative_to(root.resolve())]
            if not any(c.is_file() for c in inside):
                problems.append(f"{where} (not in the repository)")
    return problems


def test_every_cited_doc_exists_in_the_repository():
    files = _repo_files()
    md_names = {p.name for p in files if p.suffix == ".md"}
    problems = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        problems += doc_problems(path, text, ROOT, md_names)
    assert problems == [], "cited documents missing from the repository:\n" + "\n".join(problems)


def test_the_checker_catches_outside_and_retired_docs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ALGORITHM.md").write_text("# A\n")
    src = tmp_path / "mod.py"
    text = "\n".join(
        [
            "see docs/ALGORITHM.md section 3 and ./docs/ALGORITHM.md",  # fine
            "see ../shared/docs/TIDPO.md",  # outside the repository
            "see TIDPO.md section 4 and DEPENDENCIES.md",  # retired bare names
            "see docs/MISSING.md",  # not written
            "see ALGORITHM.md and README.md",  # bare names: one exists, README.md does not here
        ]
    )
    problems = doc_problems(src, text, tmp_path, {"ALGORITHM.md"})
    assert [p.split(": ", 1)[1] for p in problems] == [
        "../shared/docs/TIDPO.md (not in the repository)",
        "TIDPO.md (cite docs/ALGORITHM.md)",
        "DEPENDENCIES.md (cite docs/DEPENDENCIES.md)",
        "docs/MISSING.md (not in the repository)",
        "README.md (no such file in the repository)",
    ]


def test_algorithm_doc_sections_cited_in_code_exist():
    """``docs/ALGORITHM.md section N`` citations name a section the document has."""
    headings = re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "ALGORITHM.md").read_text(), re.M)
    sections = {int(h) for h in headings}
    cited = re.compile(r"docs/ALGORITHM\.md,? (?:sections? )?(\d+)(?:-(\d+))?")
    bad = []
    for path in _repo_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for first, last in cited.findall(line):
                wanted = range(int(first), int(last or first) + 1)
                if not set(wanted) <= sections:
                    bad.append(f"{path.relative_to(ROOT)}:{number}: section {first}{'-' + last if last else ''}")
    assert bad == [], f"sections not in docs/ALGORITHM.md ({sorted(sections)}):\n" + "\n".join(bad)
