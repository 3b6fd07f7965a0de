"""The manual cannot drift from the code: the commands shown in README.md and docs/*.md are checked.

Commands are taken from fenced code blocks and from inline code spans of the prose:

- `make <target> VAR=value ...`: the target is in the Makefile. When the target runs a CLI command
  (`$(CLI) <command>` in its recipe), every VAR is one of that command's options (matched by its environment
  variable, `VAR` or `MAT_VAR`, so the check holds before and after the CLI reads only MAT_ variables), one of the
  app's main options (the folders SHARDS_DIR, MANIFESTS_DIR, RUNS_DIR, MODELS_DIR) or a make-level variable of the
  Makefile (PYTHON, ...); the values are parsed as the command parses them (types, plain names, registry names).
  A CLI option set as an environment variable in front of `make` is refused: only make variables reach the CLI.
- `mat-pipeline <command> --opt ...`, `python -m pipeline ...` and `torchrun ... -m pipeline ...`: parsed with the
  click command (unknown options, bad types and bad names fail); nothing is run, except `--help`, which runs
  through typer's CliRunner. `python -m pipeline.<module>`: the module exists.
- Relative links (and their #anchors) point at files and headings that exist.

`...` in a command stands for "more options" and is ignored; a value that is only a placeholder (`...`) is
checked by name, not parsed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import pipeline.commands.cli as cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAKEFILE = (ROOT / "Makefile").read_text()

GROUP = typer.main.get_command(cli.app)
COMMANDS: dict[str, Any] = dict(GROUP.commands)  # click commands (typer may vendor click)
# click's usage / bad-parameter error, from the click typer uses (typer 0.2x vendors its own copy).
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

OPERATORS = {"&&", "||", ";", "|"}
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
PLACEHOLDER = "..."


def _placeholder(value: str) -> bool:
    """`...` or `<name>`: a value the docs leave to the reader, checked by name only."""
    return value == PLACEHOLDER or re.fullmatch(r"<[^<>]*>", value) is not None


# ------------------------------------------------------------------ the Makefile and the CLI


def _makefile_targets() -> dict[str, list[str]]:
    """Each rule's target -> the CLI commands its recipe runs (`$(CLI) <command>`)."""
    targets: dict[str, list[str]] = {}
    current: list[str] = []
    for line in MAKEFILE.splitlines():
        if line.startswith("\t"):
            for target in current:
                targets[target].extend(re.findall(r"\$\(CLI\)\s+([\w-]+)", line))
            continue
        rule = re.match(r"^([\w.$()/ -]+?)\s*:(?![:=])", line)
        if rule and not line.lstrip().startswith("#"):
            current = [t for t in rule.group(1).split() if not t.startswith((".", "$"))]
            for target in current:
                targets.setdefault(target, [])
        elif line.strip() and not line.startswith("#"):
            current = []
    return targets


def _makefile_variables() -> set[str]:
    """Variables the Makefile defines or reads."""
    defined = re.findall(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*[:?+]?=", MAKEFILE, re.MULTILINE)
    used = re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", MAKEFILE)
    return set(defined) | set(used)


def _envvars(param: Any) -> list[str]:
    names = param.envvar
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def _param_for(params: list[Any], variable: str) -> tuple[Any, str] | None:
    """The parameter that reads make variable `variable`, and the environment variable it reads it from: `variable`
    itself or `MAT_<variable>` (the CLI's names before and after it reads only MAT_ variables)."""
    for param in params:
        for name in _envvars(param):
            if name in (variable, "MAT_" + variable):
                return param, name
    return None


TARGETS = _makefile_targets()
ALL_PARAMS = [p for command in COMMANDS.values() for p in command.params] + list(GROUP.params)
ALL_ENVVARS = {name for param in ALL_PARAMS for name in _envvars(param)}
# Make-level variables: the Makefile's own, which no CLI option reads (PYTHON, VENV, HF_HUB_OFFLINE, ...).
MAKE_LEVEL = {v for v in _makefile_variables() if _param_for(ALL_PARAMS, v) is None}


def _registry_names() -> dict[str, set[str]]:
    """Option variables whose values are registry names (comma-separated), and the names they accept."""
    from pipeline.attacks import ATTACKS
    from pipeline.core.executor import EXECUTORS
    from pipeline.data.sources import SOURCES
    from pipeline.train.registry import MODES
    from stages import STAGES

    stages = set(STAGES)
    return {
        "MODE": set(MODES), "STUDY_MODES": set(MODES), "DEMO_MODES": set(MODES),
        "STAGES": stages | {"base"}, "FILTER_STAGES": stages, "STUDY_STAGES": stages, "DEMO_STAGES": stages,
        "ATTACKS": set(ATTACKS), "DEMO_ATTACKS": set(ATTACKS),
        "FORMAT": set(SOURCES), "EXECUTOR": set(EXECUTORS),
    }


REGISTRY_VALUES = _registry_names()


# ------------------------------------------------------------------ extracting commands from the docs


@dataclass
class Command:
    where: str  # file:line
    text: str
    inline: bool
    tokens: list[str] = field(default_factory=list)


def _fenced_blocks(text: str) -> tuple[list[tuple[int, list[str]]], str]:
    """The fenced code blocks (first line number, lines) and the prose with them blanked out."""
    blocks: list[tuple[int, list[str]]] = []
    prose: list[str] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        opening = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and opening:
            fence = opening.group(1)
            blocks.append((number + 1, []))
            prose.append("")
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
            fence = None
            prose.append("")
        elif fence is not None:
            blocks[-1][1].append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, "an unclosed code fence"
    return blocks, "\n".join(prose)


# A shell line holding a command of ours: make, mat-pipeline, `python -m pipeline...` or torchrun, at the start of the
# line or after && || ; |, behind environment assignments.
COMMAND_START = re.compile(
    r"(?:^|[;&|]\s*)(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*"
    r"(?:make\s|\S*mat-pipeline\b|\S*python3?(?:\.\d+)?\s+-m\s+pipeline\b|torchrun\s)")


def _block_commands(path: Path, first: int, lines: list[str]) -> list[Command]:
    commands: list[Command] = []
    heredoc: str | None = None
    logical, start = "", first
    for offset, line in enumerate(lines):
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if not logical:
            start = first + offset
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        marker = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", logical)
        if marker:
            heredoc = marker.group(1)
        if COMMAND_START.search(logical.strip()):
            commands.append(Command(f"{path.name}:{start}", logical.strip(), inline=False))
        logical = ""
    return commands


def _inline_commands(path: Path, prose: str) -> list[Command]:
    commands = []
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = " ".join(match.group(1).split())
        if re.match(r"^(?:make \S|\S*mat-pipeline |\S*python3? -m pipeline)", span):
            line = prose.count("\n", 0, match.start()) + 1
            commands.append(Command(f"{path.name}:{line}", span, inline=True))
    return commands


def _doc_commands() -> list[Command]:
    commands: list[Command] = []
    for path in DOCS:
        blocks, prose = _fenced_blocks(path.read_text())
        for first, lines in blocks:
            commands.extend(_block_commands(path, first, lines))
        commands.extend(_inline_commands(path, prose))
    return commands


def _segments(tokens: list[str]) -> list[list[str]]:
    """A shell line split at && || ; | into simple commands."""
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def _split_env(segment: list[str]) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    while segment and ASSIGNMENT.match(segment[0]):
        name, value = ASSIGNMENT.match(segment[0]).groups()
        env[name] = value
        segment = segment[1:]
    return env, segment


def _cli_args(argv: list[str]) -> list[str] | None:
    """The arguments of `mat-pipeline` in a command line (None: not a command of the CLI)."""
    if not argv:
        return None
    program = Path(argv[0]).name
    if program == "mat-pipeline":
        return argv[1:]
    if re.fullmatch(r"python3?(\.\d+)?", program) or program == "torchrun":
        if "-m" in argv:
            at = argv.index("-m")
            if at + 1 < len(argv) and argv[at + 1] == "pipeline":
                return argv[at + 2:]
    return None


DOC_COMMANDS = _doc_commands()


# ------------------------------------------------------------------ checks


def _parse_values(command: Any, name: str, values: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Parse `values` (environment variable -> value) as `command` reads them; the errors."""
    for variable in ALL_ENVVARS:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)
    try:
        parent = GROUP.context_class(GROUP, info_name="mat-pipeline")
        ctx = command.make_context(name, [], parent=parent, resilient_parsing=False)
    except ClickException as error:
        return [error.format_message()]
    finally:
        for variable in values:
            monkeypatch.delenv(variable, raising=False)
    return _registry_errors(command, ctx)


def _registry_errors(command: Any, ctx: Any) -> list[str]:
    errors = []
    for param in command.params:
        value = ctx.params.get(param.name)
        if not isinstance(value, str) or not value or _placeholder(value) or value.startswith("<"):
            continue
        for envvar in _envvars(param):
            accepted = REGISTRY_VALUES.get(envvar.removeprefix("MAT_")) or REGISTRY_VALUES.get(envvar)
            if accepted:
                unknown = [v.strip() for v in value.split(",") if v.strip() and v.strip() not in accepted]
                if unknown:
                    errors.append(f"{envvar}={value}: unknown {unknown}, choose from {sorted(accepted)}")
    return errors


def _check_make(env: dict[str, str], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    errors: list[str] = []
    targets = [a for a in argv[1:] if not a.startswith("-") and not ASSIGNMENT.match(a) and a != PLACEHOLDER]
    variables = dict(ASSIGNMENT.match(a).groups() for a in argv[1:] if ASSIGNMENT.match(a))
    if not targets:
        errors.append("no make target")
    # The CLI commands the targets run; a target named after a command runs it even if its recipe changes form.
    commands = [c for t in targets for c in (TARGETS.get(t) or ([t] if t in TARGETS and t in COMMANDS else []))]
    for target in targets:
        if target not in TARGETS:
            errors.append(f"no target {target!r} in the Makefile (targets: {sorted(TARGETS)})")
    for name in env:
        if any(_param_for(list(COMMANDS[c].params), name) for c in commands if c in COMMANDS):
            errors.append(f"{name} is set in the environment of make: give it as a make variable after the target")
    for command_name in commands:
        command = COMMANDS.get(command_name)
        if command is None:
            errors.append(f"the Makefile runs `$(CLI) {command_name}`, which is not a command of the CLI")
            continue
        values: dict[str, str] = {}
        for variable, value in variables.items():
            found = _param_for(list(command.params), variable)
            if found is not None:
                if not _placeholder(value):
                    values[found[1]] = value
            elif _param_for(list(GROUP.params), variable) is None and variable not in MAKE_LEVEL:
                known = sorted(n.removeprefix("MAT_") for p in command.params for n in _envvars(p))
                errors.append(f"{variable} is not an option of `{command_name}` (its variables: {', '.join(known)})")
        errors.extend(_parse_values(command, command_name, values, monkeypatch))
    if not commands and all(t in TARGETS for t in targets):  # setup, test, tiny-models, help: the Makefile's own
        for variable in variables:
            if variable not in MAKE_LEVEL and _param_for(list(GROUP.params), variable) is None:
                errors.append(f"{variable} is not a variable of target(s) {targets}")
    return errors


def _check_cli(env: dict[str, str], args: list[str]) -> list[str]:
    args = [a for a in args if a != PLACEHOLDER]
    errors = []
    for name in env:
        if _param_for(ALL_PARAMS, name):
            errors.append(f"{name} is set in the environment: give it as an option (--...) instead")
    if args and args[0].startswith("<"):
        return errors  # `mat-pipeline <command> ...`: a pattern, not a command
    if "--help" in args:
        result = CliRunner().invoke(cli.app, args)
        if result.exit_code != 0 or "Usage" not in result.output:
            errors.append(f"`mat-pipeline {' '.join(args)}` exited {result.exit_code}: {result.output[-500:]}")
        return errors
    try:
        ctx = GROUP.make_context("mat-pipeline", list(args), resilient_parsing=False)
        rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]
        if not rest:
            return errors + ["no command"]
        if rest[0].startswith("<"):
            return errors  # `mat-pipeline <command> ...`: a pattern, not a command
        command = GROUP.get_command(ctx, rest[0])
        if command is None:
            return errors + [f"no command {rest[0]!r} (commands: {sorted(COMMANDS)})"]
        sub = command.make_context(rest[0], rest[1:], parent=ctx, resilient_parsing=False)
        errors.extend(_registry_errors(command, sub))
    except ClickException as error:
        errors.append(error.format_message())
    return errors


def _check(command: Command, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    try:
        tokens = shlex.split(command.text, comments=True)
    except ValueError as error:
        return [f"cannot split the line: {error}"]
    errors = []
    for segment in _segments(tokens):
        env, argv = _split_env(segment)
        if not argv:
            continue
        module = re.fullmatch(r"python3?(\.\d+)?", Path(argv[0]).name) and len(argv) > 2 and argv[1] == "-m" and argv[2]
        if Path(argv[0]).name == "make":
            errors.extend(_check_make(env, argv, monkeypatch))
        elif (args := _cli_args(argv)) is not None:
            errors.extend(_check_cli(env, args))
        elif module and module.startswith("pipeline."):
            if importlib.util.find_spec(module) is None:
                errors.append(f"no module {module}")
    return errors


def test_the_docs_show_commands():
    """The extraction finds what the docs show: make targets and CLI lines, fenced and inline."""
    texts = [c.text for c in DOC_COMMANDS]
    assert sum(t.startswith("make ") for t in texts) > 50
    assert any(t.startswith("make demo") for t in texts) and any(t.startswith("make test") for t in texts)
    assert any(c.inline for c in DOC_COMMANDS) and any(not c.inline for c in DOC_COMMANDS)
    assert any(_cli_args(shlex.split(t, comments=True)) is not None for t in texts)
    assert any("mat-pipeline --help" in t for t in texts), "the docs show `mat-pipeline --help`"


def test_every_command_in_the_docs_parses(monkeypatch):
    failures = []
    for command in DOC_COMMANDS:
        for error in _check(command, monkeypatch):
            failures.append(f"{command.where}: `{command.text}`\n    {error}")
    assert not failures, "commands in the docs that do not match the Makefile / CLI:\n" + "\n".join(failures)


def test_help_runs():
    """`mat-pipeline --help` and each command's --help run (the docs send readers there for every option)."""
    runner = CliRunner()
    for args in (["--help"], *([name, "--help"] for name in COMMANDS)):
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.output


def test_every_make_target_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", MAKEFILE, re.MULTILINE).group(1).split()
    missing = [t for t in phony if t != "help" and f"`make {t}" not in readme]
    assert not missing, f"make targets missing from README's command table: {missing}"


def test_no_command_hides_in_an_indented_block():
    """Commands live in fenced blocks (which this file checks), not in 4-space indented ones (which it would not)."""
    hidden = []
    for path in DOCS:
        _, prose = _fenced_blocks(path.read_text())
        for number, line in enumerate(prose.splitlines(), 1):
            if re.match(r"^( {4,}|\t)", line) and COMMAND_START.search(line.strip()):
                hidden.append(f"{path.name}:{number}: {line.strip()}")
    assert not hidden, "put these in fenced code blocks:\n" + "\n".join(hidden)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    _, prose = _fenced_blocks(path.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for line in prose.splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_links_resolve():
    broken = []
    for path in DOCS:
        _, prose = _fenced_blocks(path.read_text())
        for match in re.finditer(r"\]\(([^)\s]+)\)", prose):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{path.name}: {target} (no heading #{anchor} in {linked.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)
