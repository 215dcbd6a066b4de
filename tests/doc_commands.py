"""Commands quoted in the documentation, and the flags each script's parser accepts.

The docs test uses this to check every shell command in README.md and docs/*.md against the real parsers, so a
renamed or removed flag breaks the test instead of the reader. Parsers are read in a separate process
(`python tests/doc_commands.py --probe ...`): each script's __main__ runs until it builds its parser and calls
parse_args, which is intercepted before any work is done.
"""
from __future__ import annotations

import argparse
import json
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
LAUNCHERS = {"torch.distributed.run"}  # `python -m torch.distributed.run ... script.py --flags`


@dataclass(frozen=True)
class Command:
    """One command found in a document: the script (a .py path) or module (`python -m`), and its --flags."""
    source: str  # "file:line"
    script: str  # repo-relative .py path, or "" when `module` is set
    module: str
    flags: tuple[str, ...]


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of each fenced code block whose language is a shell (or none)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        if m.group(1).lower() in SHELL_LANGS:
            blocks.append((i + 2, "\n".join(lines[i + 1:j])))
        i = j + 1
    return blocks


def _strip_comment(line: str) -> str:
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
        lexer.whitespace_split, lexer.commenters = True, "#"
        return " ".join(shlex.quote(t) for t in lexer)
    except ValueError:
        return line.split(" #")[0]


def _logical_lines(body: str, first: int) -> list[tuple[int, str]]:
    out, buf, start = [], "", first
    for n, raw in enumerate(body.splitlines(), first):
        line = raw.rstrip()
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    return out


def _command(tokens: list[str], source: str) -> Command | None:
    tokens = [t.strip("[]") for t in tokens]
    for i, tok in enumerate(tokens):
        if tok.endswith(".py") and not tok.startswith("-"):
            return Command(source, tok, "", tuple(_flags(tokens[i + 1:])))
        if tok == "-m" and i + 1 < len(tokens) and i > 0 and tokens[i - 1].startswith("python"):
            mod = tokens[i + 1]
            if mod in LAUNCHERS:
                continue  # the launched script comes later on the line
            return Command(source, "", mod, tuple(_flags(tokens[i + 2:])))
    return None


def _flags(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--") and len(t) > 2]


def commands_in(path: Path, text: str | None = None) -> list[Command]:
    """Every python script / module invocation in the shell blocks of a markdown file."""
    text = path.read_text() if text is None else text
    found = []
    for first, body in shell_blocks(text):
        for n, line in _logical_lines(body, first):
            line = _strip_comment(line)
            for part in re.split(r"&&|\|\||;|\|", line):
                try:
                    tokens = shlex.split(part)
                except ValueError:
                    tokens = part.split()
                cmd = _command(tokens, f"{path.name}:{n}")
                if cmd:
                    found.append(cmd)
    return found


class _Parsed(BaseException):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _intercept(self, *args, **kwargs):
    raise _Parsed(self)


def probe(targets: list[str]) -> dict[str, list[str] | str]:
    """Option strings of each target's parser ("path.py" or "module"), or an error text."""
    argparse.ArgumentParser.parse_args = _intercept  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = _intercept  # type: ignore[method-assign]
    sys.path.insert(0, str(ROOT))
    out: dict[str, list[str] | str] = {}
    for t in targets:
        sys.argv = [t]
        try:
            if t.endswith(".py"):
                sys.path.insert(0, str((ROOT / t).parent))
                runpy.run_path(str(ROOT / t), run_name="__main__")
            else:
                runpy.run_module(t, run_name="__main__", alter_sys=True)
            out[t] = "ran without parsing arguments"
        except _Parsed as p:
            out[t] = sorted(s for a in p.parser._actions for s in a.option_strings)
        except BaseException as e:  # noqa: BLE001 - reported to the test, which fails with it
            out[t] = f"{type(e).__name__}: {e}"
    return out


def parsers(targets: set[str]) -> dict[str, list[str] | str]:
    from helpers import limit  # here, not at the top: the probe process (this file as a script) needs none of it
    r = subprocess.run([sys.executable, str(Path(__file__)), "--probe", *sorted(targets)], cwd=ROOT,
                       capture_output=True, text=True, timeout=limit(600))
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def problems(cmds: list[Command], known: dict[str, list[str] | str]) -> list[str]:
    """What is wrong with each command: a missing script or module, or a flag its parser does not accept."""
    bad = []
    for c in cmds:
        target = c.script or c.module
        if c.script and not (ROOT / c.script).is_file():
            bad.append(f"{c.source}: {c.script} does not exist")
            continue
        opts = known.get(target)
        if isinstance(opts, str):
            bad.append(f"{c.source}: {target}: {opts}")
            continue
        bad += [f"{c.source}: {target} does not accept {f}" for f in c.flags if f not in (opts or [])]
    return bad


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    result = probe(sys.argv[2:])
    print(json.dumps(result))
    sys.stdout.flush()
