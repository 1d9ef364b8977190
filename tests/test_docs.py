"""The manual against the program: every option each command's --help lists is documented in
README.md or docs/*.md, every relative link there resolves (file and #anchor), and no --help
says its default twice. In-process and fast: each command's own parser prints its help."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from dist_resnet import bench, evaluate, export, predict, summarize, train

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = {"dist-resnet-train": train.parse_args, "dist-resnet-evaluate": evaluate.parse_args,
            "dist-resnet-predict": predict.parse_args, "dist-resnet-bench": bench.parse_args,
            "dist-resnet-export": export.parse_args,
            "dist-resnet-summarize": lambda argv: summarize.build_parser().parse_args(argv)}


def help_text(parse) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        parse(["--help"])
    assert exited.value.code == 0
    return out.getvalue()


def help_entries(text: str) -> dict[str, str]:
    """Each option of a --help text (its long names: --compile and --no-compile apart) with the
    text of its entry."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-\S.*?)(?:  +(.*))?$", line)
        if match:
            names = re.findall(r"--[a-z][a-z0-9-]*", match.group(1))
            current = [n for n in names if n != "--help"]
            for name in current:
                entries[name] = match.group(2) or ""
        elif current and line.startswith("   "):
            for name in current:
                entries[name] += " " + line.strip()
        else:
            current = None
    return entries


def documented_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_documented(command):
    entries = help_entries(help_text(COMMANDS[command]))
    assert entries, f"{command}: read no options from its --help"
    text = documented_text()
    missing = [name for name in entries if not re.search(re.escape(name) + r"(?![a-z0-9-])", text)]
    assert not missing, f"{command}: options in --help but in neither README.md nor docs/*.md: {missing}"


@pytest.mark.parametrize("command", COMMANDS)
def test_no_default_said_twice(command):
    doubled = {name: entry for name, entry in help_entries(help_text(COMMANDS[command])).items()
               if len(re.findall(r"\bdefault\b(?=[ :])", entry, re.I)) > 1}
    assert not doubled, f"{command} --help says a default twice: {doubled}"


def anchors(page: Path) -> set[str]:
    """The #anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces
    as '-', a repeated heading numbered -1, -2, ..."""
    seen, found, in_code = {}, set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6} +(.*?) *#*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path):
    """(target, line number) of each Markdown link and image outside code blocks."""
    in_code = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", re.sub(r"`[^`]*`", "", line)):
            yield target, number


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target, number in links(page):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_states_what_ci_runs():
    """.ci/run installs and tests as the README says: both commands must stay in it."""
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[test]"' in readme and "python -m pytest" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in ci and "\npython -m pytest\n" in ci
    assert len(readme.splitlines()) <= 250, "README.md is the front door: the manual goes in docs/"


def test_the_options_resume_checks_are_the_ones_documented():
    from dist_resnet.config import MUST_MATCH_ON_RESUME

    page = (ROOT / "docs" / "checkpoints-and-resume.md").read_text()
    checks = page.split("- **What resume checks.**")[1].split("Every other option")[0]
    named = set(re.findall(r"`--([a-z][a-z0-9-]*)`", checks))
    assert named == {name.replace("_", "-") for name in MUST_MATCH_ON_RESUME}
