"""The README stays a first screen and the manual in docs/ stays reachable: README.md under 200 lines; every relative
link in README.md and docs/*.md points at a file that exists, without an anchor (headings move, files are checked);
every docs/*.md page is linked from README.md or docs/README.md; the README's test command is the line .ci/run runs,
and it installs the versions of constraints.txt.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted([README, *DOCS.glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def links(page: Path) -> list[str]:
    """The link targets of ``page``, outside fenced code blocks."""
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I)  # http:, https:, mailto: ...


def bash_blocks(page: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_fits_on_a_few_screens():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < 200, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_without_an_anchor(page):
    bad = []
    for target in links(page):
        if not relative(target):
            continue
        if "#" in target:
            bad.append(f"{target} (anchor: link the file)")
        elif not (page.parent / target).exists():
            bad.append(f"{target} (no such file)")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index():
    linked = set()
    for page in (README, DOCS / "README.md"):
        linked |= {(page.parent / t).resolve() for t in links(page) if relative(t) and "#" not in t}
    orphans = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.resolve() not in linked]
    assert not orphans, f"docs pages linked from neither README.md nor docs/README.md: {orphans}"
    assert (DOCS / "README.md").resolve() in linked


def test_the_readme_commands_are_the_ones_ci_runs():
    """The README's two fenced setup commands: the test one is, character for character, the line .ci/run runs."""
    commands = [b.strip() for b in bash_blocks(README) if b.strip().startswith("python3 -m venv .venv")]
    assert len(commands) == 2, commands
    run, test = sorted(commands, key=lambda c: "pytest" in c)
    assert run.endswith("suite run task=cifar averager=lawa,ema,swa out=runs/quickstart"), run
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip().startswith("python3 -m venv")]
    assert ci == [test], f".ci/run runs {ci}, the README says {test!r}"


def test_ci_installs_the_versions_it_was_tested_with():
    """The install of the test command is constrained by constraints.txt, which pins every dependency of the
    package and its test extra to one version (``name==version``; a file URL would not install elsewhere)."""
    test = next(b.strip() for b in bash_blocks(README) if "pytest" in b and b.strip().startswith("python3 -m venv"))
    assert 'pip install -q -e ".[test]" -c constraints.txt' in test, test
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and "@" not in line, f"constraints.txt: {line!r} is not name==version"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    needed = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", spec).group()).lower() for spec in needed}
    assert not names - pins.keys(), f"constraints.txt pins no version of {sorted(names - pins.keys())}"
