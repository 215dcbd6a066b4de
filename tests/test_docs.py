"""The documentation cannot rot: its commands run the scripts and flags that exist, its links resolve."""
from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from doc_commands import ROOT, Command, commands_in, parsers, problems

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _is_repo_module(mod: str) -> bool:
    base = ROOT.joinpath(*mod.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@pytest.fixture(scope="module")
def doc_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands_in(doc)]


@pytest.fixture(scope="module")
def known_parsers(doc_commands) -> dict:
    targets = {c.script for c in doc_commands if c.script and (ROOT / c.script).is_file()}
    targets |= {c.module for c in doc_commands if c.module and _is_repo_module(c.module)}
    return parsers(targets)


def test_docs_exist_and_readme_is_a_front_page():
    assert len(DOCS) >= 10
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_commands_are_found(doc_commands):
    scripts = {c.script for c in doc_commands}
    modules = {c.module for c in doc_commands}
    # the extractor must see the main scripts, continuation lines and launcher-prefixed commands
    assert {"train_dual.py", "val_dual.py", "detect_dual.py", "export.py"} <= scripts
    assert "utils.convert" in modules
    launched = [c for c in doc_commands if c.source.startswith("distributed.md") and c.script == "train_dual.py"]
    assert any("--rdzv-id" not in c.flags and "--batch-size" in c.flags for c in launched)


def test_every_documented_command_and_flag_exists(doc_commands, known_parsers):
    repo = [c for c in doc_commands if c.script or _is_repo_module(c.module)]
    assert not problems(repo, known_parsers), "\n".join(problems(repo, known_parsers))


def test_every_python_m_module_exists(doc_commands):
    missing = sorted({f"{c.source}: {c.module}" for c in doc_commands
                      if c.module and importlib.util.find_spec(c.module) is None})
    assert not missing, missing


def test_checker_catches_a_renamed_flag_and_a_missing_script(tmp_path, known_parsers):
    doc = tmp_path / "x.md"
    doc.write_text("```bash\npython train_dual.py --data my.yaml --epochs-count 3\n"
                   "python no_such_script.py --x 1\n"
                   "torchrun --nproc_per_node 2 val_dual.py --weigths a.pt   # typo\n```\n")
    bad = problems(commands_in(doc), known_parsers)
    assert any("--epochs-count" in b for b in bad)
    assert any("no_such_script.py does not exist" in b for b in bad)
    assert any("--weigths" in b for b in bad)
    assert not any("--data" in b or "--nproc_per_node" in b for b in bad)


LINK = re.compile(r"\]\(([^)\s]+)\)")
RESULT = re.compile(r"benchmarks/results/[\w./-]+\.\w+")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_and_results_exist(doc):
    text = doc.read_text()
    missing = []
    for target in LINK.findall(text):
        if re.match(r"(https?|mailto):", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    missing += [r for r in RESULT.findall(text) if not (ROOT / r).exists()]
    assert not missing, f"{doc.name}: {missing}"


def test_no_issue_numbers_in_code_or_docs():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    pattern = re.compile(r"\bissues?[\s#_-]*\d+\b", re.IGNORECASE)
    hits = []
    for f in files:
        if Path(f).suffix in (".py", ".md", ".sh", ".yaml", ".txt", ".ini", ".cfg") and (ROOT / f).is_file():
            for n, line in enumerate((ROOT / f).read_text(errors="ignore").splitlines(), 1):
                if pattern.search(line) and f != "tests/test_docs.py":
                    hits.append(f"{f}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_files_the_docs_generate_stay_out_of_git():
    """Outputs that documented commands write (a generated video) land in git-ignored places, so following the
    README never leaves untracked files in the clone."""
    outputs = [m for doc in DOCS for m in re.findall(r"--video\s+([^\s`]+)", doc.read_text())]
    assert outputs
    for out in outputs:
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", out], cwd=ROOT)
        assert r.returncode == 0, f"{out}: written by a documented command but not ignored by git"
