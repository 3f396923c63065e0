"""The README and docs/ as a learner meets them: short, every link and code reference real, no history."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def relative_links(text):
    """Targets of markdown links [text](target) and <img src="target">, without web addresses and in-page anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]


def reading_order_refs(text):
    """(file, name) for every `file.py:name` in the table of the README's "How to read the code" section."""
    section = re.search(r"^## How to read the code\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, 'README has no "## How to read the code" section'
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
    return [ref for row in rows for ref in re.findall(r"`([\w/]+\.py):(\w+)`", row)]


HISTORY = {
    "an issue number": r"\bissues? #?\d+",
    "an issue reference": r"(?<![\w&])#\d+\b",
    "a commit hash": r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b",
    "an earlier run": r"\bearlier (run|session|version)",
    "a first version": r"\bfirst version\b",
    "the occasion of a measurement": r"\b[Tt]ried here\b|\bother developers\b|\ba stray load\b",
}


def history(text):
    """The phrases of text that tell history rather than the current state, as (kind, match)."""
    return [(kind, m.group(0)) for kind, pattern in HISTORY.items()
            for m in re.finditer(pattern, text, re.IGNORECASE)]


def test_readme_is_short():
    n = len(read(README).splitlines())
    assert n <= 250, f"README.md has {n} lines; the entry point stays at most 250 (details go to docs/)"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    missing = [t for t in relative_links(read(path))
               if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), t)))]
    assert not missing, f"{os.path.relpath(path, ROOT)} links to files that do not exist: {missing}"


def test_link_parser_sees_links():
    text = '[a](docs/x.md) [b](https://x.org/y) [c](#anchor) [d](y.md#part) <img src="z.png" width="3">'
    assert relative_links(text) == ["docs/x.md", "y.md", "z.png"]


def missing_code(refs):
    """The (file, name) references whose file does not exist or holds no `def name` / `class name`."""
    wrong = []
    for path, name in refs:
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            wrong.append(f"{path} (no such file)")
        elif not re.search(rf"^\s*(def|class) {name}\b", read(full), re.M):
            wrong.append(f"{path}:{name} (no def or class {name})")
    return wrong


def test_reading_order_names_real_functions():
    refs = reading_order_refs(read(README))
    assert len(refs) >= 15, f"the reading order names only {len(refs)} file:function references: {refs}"
    wrong = missing_code(refs)
    assert not wrong, f"the README's reading order names code that does not exist: {wrong}"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_code_references_exist(path):
    """Every `file.py:name` anywhere in the page, not only in the reading order."""
    wrong = missing_code(re.findall(r"`([\w/]+\.py):(\w+)", read(path)))
    assert not wrong, f"{os.path.relpath(path, ROOT)} names code that does not exist: {wrong}"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_no_history(path):
    found = history(read(path))
    assert not found, f"{os.path.relpath(path, ROOT)} tells history (put it in commit messages): {found}"


def test_history_check_catches_history():
    text = ("fixed in issue 19 (#23) at 0856fd4; an earlier run gave 11.6 min, the first version 74.5%. "
            "Not history: 1e-3, 2203.02155, 1000000, a facade, defaced, [link](#anchor), 0.94M, `--seed 1338`.")
    assert sorted(kind for kind, _ in history(text)) == sorted(
        ["an issue number", "an issue reference", "a commit hash", "an earlier run", "a first version"])


def test_ci_runs_the_readme_test_command():
    ci = [line for line in read(os.path.join(ROOT, ".ci", "run")).splitlines() if "pytest" in line
          and not line.lstrip().startswith("#") and "pip" not in line]
    assert len(ci) == 1, f".ci/run should run one pytest command, found {ci}"
    readme_lines = [line.strip() for line in read(README).splitlines()]
    assert ci[0].strip() in readme_lines, f"the README does not give CI's test command {ci[0].strip()!r}"
    assert 'python -m pytest -q -m "not slow"' in readme_lines, "the README gives no fast tier"


def test_readme_split_sizes_are_the_default_worlds():
    """The README's tiny-world paragraph states the default world's split sizes as make_world deals them."""
    from nanorlhf.world import make_world

    text = " ".join(read(README).split())
    world = make_world(0, 0.1)
    n = {split: f"{len(world.prompts(split)):,}" for split in ("test", "val", "sft", "rm", "ppo")}
    assert (f"{n['test']} test, {n['val']} validation, and {n['sft']} SFT, {n['rm']} RM and {n['ppo']} PPO prompts"
            in text)
