"""The documentation (README.md and docs/*.md) points at things that exist: every relative link
names a file (and, with an anchor into a Markdown page, one of its headings), and every command
shown that runs a tool (``python tools/<name>.py ...``, also through ``python3``,
``.venv/bin/python``, ``torchrun`` or ``srun``) names a tool whose ``--help`` lists each option the
command uses; the study commands shown pass ``--dry-run``.

Commands are read from fenced code blocks and inline code. A command holding a placeholder
(``<...>``, ``$VAR``, ``[...]``, ``...``, ``/path/to/``) has its options checked but is not run.
"""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from tool_process import run_tool

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
TOOL = re.compile(r"^(?:\./)?tools/([\w-]+)\.py$")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
PLACEHOLDER = re.compile(r"[<>$\[\]|…]|\.\.\.|/path/to/")
LAUNCHERS = {"python", "python3", "torchrun", "srun"}
SEPARATORS = {"&&", "||", ";"}
# Study commands with one of these are not run (--dry-run excludes them): only their options are checked.
NOT_DRY_RUN = {"--status", "--report"}


@dataclass(frozen=True)
class Command:
    page: str
    text: str  # as shown (continuations joined)
    tool: str  # the name in tools/<name>.py
    args: tuple[str, ...]  # what follows tools/<name>.py
    launched: bool  # run through python, torchrun or srun (else a bare ``tools/<name>.py --option`` in the prose)

    @property
    def options(self) -> list[str]:
        return [option for arg in self.args for option in OPTION.findall(arg)]

    @property
    def has_placeholder(self) -> bool:
        return any(PLACEHOLDER.search(arg) for arg in self.args)


def split_page(text: str) -> tuple[str, list[str]]:
    """The page's prose (fenced code blocks left out) and the lines of its code blocks."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            prose.append(line)
        else:
            code.append(line)
    return "\n".join(prose), code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation but hyphens and
    underscores dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(page: Path) -> frozenset[str]:
    prose, _ = split_page(page.read_text())
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(page: Path) -> list[str]:
    prose, _ = split_page(page.read_text())
    prose = INLINE_CODE.sub("code", prose)
    return LINK.findall(prose) + REFERENCE.findall(prose) + HTML_LINK.findall(prose)


def broken_link(page: Path, target: str) -> str | None:
    """Why ``target``, linked from ``page``, leads nowhere; None when it is fine."""
    if SCHEME.match(target):
        return None  # https:, mailto: ...: not this repository's
    path, _, anchor = target.partition("#")
    destination = (page.parent / unquote(path)).resolve() if path else page
    if not destination.exists():
        shown = destination.relative_to(ROOT) if destination.is_relative_to(ROOT) else destination
        return f"{target}: {shown} does not exist"
    if anchor and destination.suffix == ".md" and unquote(anchor) not in anchors(destination):
        return f"{target}: no heading with the anchor #{anchor} in {destination.relative_to(ROOT)}"
    return None


def shell_lines(page: Path) -> list[str]:
    """Candidate command lines: code block lines (continuations joined) and inline code spans."""
    prose, code = split_page(page.read_text())
    lines, pending = [], ""
    for line in code:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    lines += [" ".join(span.split()) for _, span in INLINE_CODE.findall(prose)]
    return lines


def is_launcher(word: str) -> bool:
    name = Path(word).name
    return name in LAUNCHERS or re.fullmatch(r"python3(\.\d+)?", name) is not None


def segments(words: list[str]) -> list[list[str]]:
    """``words`` cut at ``&&``, ``||``, ``;`` and at a pipe (a ``|`` not followed by an option,
    which is the synopsis' ``[--dry-run | --status]``)."""
    cut, current = [], []
    for index, word in enumerate(words):
        following = words[index + 1] if index + 1 < len(words) else ""
        if word in SEPARATORS or (word == "|" and not following.startswith("-")):
            cut.append(current)
            current = []
        else:
            current.append(word)
    return [*cut, current]


def commands_in(page: Path) -> list[Command]:
    found = []
    for line in shell_lines(page):
        if "tools/" not in line:
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: read it word by word
            words = line.split("#", 1)[0].split()
        for words in segments(words):
            at = next((index for index, word in enumerate(words) if TOOL.match(word)), None)
            if at is None or not (is_launcher(words[0]) or (at == 0 and len(words) > 1)):
                continue
            found.append(Command(page.relative_to(ROOT).as_posix(), line.strip(), TOOL.match(words[at]).group(1),
                                 tuple(words[at + 1:]), launched=at > 0))
    return found


COMMANDS = [command for page in PAGES for command in commands_in(page)]
TOOLS = sorted({command.tool for command in COMMANDS})
STUDY_RUNS = sorted({command.args if "--dry-run" in command.args else ("--dry-run", *command.args)
                     for command in COMMANDS
                     if command.tool == "study" and command.launched and not command.has_placeholder
                     and not NOT_DRY_RUN.intersection(command.args)})


@functools.cache
def tool_help(tool: str) -> subprocess.CompletedProcess:
    return run_tool(f"tools/{tool}.py", "--help")


def test_the_pages_show_links_and_the_tools_commands():
    """The parsing finds what the pages hold (an empty finding would pass every test below)."""
    assert (ROOT / "README.md") in PAGES and len(PAGES) > 1
    assert sum(len(links(page)) for page in PAGES) > 20
    assert {"pretrain_net", "convert_to_d2", "train_net", "compare", "study"} <= set(TOOLS)
    assert any(args == ("--dry-run", "--config-file", "configs/study/demo.yaml") for args in STUDY_RUNS)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_somewhere(page):
    broken = [reason for target in links(page) if (reason := broken_link(page, target))]
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_shown_exists_with_the_options_shown(tool):
    shown = [command for command in COMMANDS if command.tool == tool]
    assert (ROOT / "tools" / f"{tool}.py").is_file(), \
        f"tools/{tool}.py does not exist; shown in: " + "; ".join(f"{c.page}: {c.text}" for c in shown)
    result = tool_help(tool)
    assert result.returncode == 0, f"tools/{tool}.py --help failed:\n{result.stderr}"
    unknown = [f"{command.page}: {option} in `{command.text}`" for command in shown for option in command.options
               if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout)]
    assert not unknown, f"options that tools/{tool}.py --help does not list:\n" + "\n".join(unknown)


@pytest.mark.parametrize("args", STUDY_RUNS, ids=" ".join)
def test_every_study_command_shown_passes_a_dry_run(args):
    result = run_tool("tools/study.py", *args)
    status, output = result.returncode, (result.stdout + result.stderr)[-3000:]
    shown = sorted({f"{c.page}: {c.text}" for c in COMMANDS if c.tool == "study"
                    and args in (c.args, ("--dry-run", *c.args))})
    assert status == 0, f"python tools/study.py {' '.join(args)} exited {status}; shown in:\n" + \
        "\n".join(shown) + f"\n{output}"
