"""The README stays a front door and the docs cannot drift from the code or point nowhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from moe_balance import docgen

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A folder of one machine: an interpreter, a home or a scratch folder. Built from parts so this file passes.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:" + "|".join(["ro" + "ot", "ho" + "me", "wo" + "rk", "t" + "mp",
                                                       "Us" + "ers"]) + r")/")


def test_generated_blocks_match_the_code():
    stale = [str(path.relative_to(ROOT)) for path in docgen.stale(ROOT)]
    assert not stale, f"generated tables are out of date in {stale}: run `{docgen.COMMAND}` and commit the result"


def test_every_generated_block_is_filled():
    for path in PAGES:
        for match in docgen.BLOCK.finditer(path.read_text()):
            assert match.group(3).strip(), f"{path.name}: empty generated block {match.group(2)!r}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move depth to docs/ (at most 250)"
    # .ci/run runs the README's test command: it must stay at the top, as written.
    top = "\n".join(lines[:15])
    assert "pip install torch==2.13.0 && pip install -e '.[all]' && python -m pytest -q" in top
    assert "pip install torch==2.13.0 && pip install -e '.[all]' && python examples/quickstart.py" in top


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", path.read_text())
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)} links to missing files or headings: {broken}"


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in names.splitlines():
        path = ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_no_path_of_one_machine_in_the_repository():
    found = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, ("paths of one machine (use relative paths, `python`, or tempfile in code):\n"
                       + "\n".join(found))


def test_machine_path_pattern():
    assert MACHINE_PATH.search("run /" + "root/.pyenv/versions/3.12.1/bin/python")
    assert MACHINE_PATH.search("cd /" + "tmp/axo")
    assert not MACHINE_PATH.search("examples/axolotl/qwen3_moe_tiny.yml and runs/tmp/x")
    assert not MACHINE_PATH.search("tempfile.mkdtemp()")


@pytest.mark.parametrize("option, values", [("aux_loss", "AUX_LOSSES"), ("bias_update", "BIAS_UPDATES")])
def test_methods_tables_name_every_choice(option, values):
    """The methods tables explain each choice in prose, so they are checked rather than generated."""
    import moe_balance.config as config
    text = (ROOT / "docs" / "methods.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith(f"| `{option}` |"))
    rows = text.split(header, 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`(\w+)`", "\n".join(row.split("|")[1] for row in rows.splitlines()[2:])))
    expected = set(getattr(config, values)) - {"none"}
    assert expected <= named, f"docs/methods.md's `{option}` table misses {sorted(expected - named)}"
    assert named - expected <= {"z_loss_coef"}, f"docs/methods.md names unknown {option}: {named - expected}"
