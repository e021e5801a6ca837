"""Dockerfile parsing: text → global ARGs + stages of instructions (Docker's grammar).

- Parser directives (``# escape=`` and ``# syntax=``, the latter ignored) only before
  the first comment, blank line or instruction, as Docker reads them.
- A line ending in the escape character (``\\`` or, with ``# escape=```, a backtick)
  continues on the next; comment lines and blank lines inside a continuation are dropped.
- ``RUN``/``CMD``/``ENTRYPOINT``/``SHELL``/``COPY``/``ADD``/``VOLUME`` take a JSON array
  (exec form) or plain text (shell form); ``SHELL`` only the array.
- Words (``words``) split on blanks outside quotes and expand ``$VAR``, ``${VAR}``,
  ``${VAR:-default}``, ``${VAR:+alt}`` (and ``-``/``+`` without the colon) outside single
  quotes; the escape character keeps the next character as it is.
- Every error is a DockerfileError naming the file and line: one line from the CLI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from mesobox.errors import UsageError

KEYWORDS = ("FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
            "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL")
JSON_FORMS = ("RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME")
# The --flags each instruction takes; anything else is refused with its line.
FLAGS = {"FROM": ("platform",), "COPY": ("from", "chown", "chmod", "link"), "ADD": ("chown", "chmod", "link"),
         "RUN": (), "HEALTHCHECK": ("interval", "timeout", "start-period", "start-interval", "retries")}
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(.*?)\s*$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STAGE_NAME = re.compile(r"^[a-z][a-z0-9._-]*$")


class DockerfileError(UsageError):
    """A Dockerfile that cannot be built as written (exit 2)."""


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the text after the keyword and its flags, continuations joined
    line: int  # where it starts (1-based)
    flags: tuple[tuple[str, str], ...] = ()  # (name, value) of --name=value, in order
    exec_form: tuple[str, ...] | None = None  # the JSON array, when given as one

    def flag(self, name: str) -> str | None:
        return next((value for key, value in reversed(self.flags) if key == name), None)

    @property
    def text(self) -> str:
        """The instruction as one normalised line (cache keys, progress lines)."""
        flags = "".join(f"--{k}={v} " for k, v in self.flags)
        body = json.dumps(list(self.exec_form)) if self.exec_form is not None else self.args
        return f"{self.keyword} {flags}{body}".rstrip()


@dataclass
class Stage:
    index: int
    base: str  # FROM's image text, before substitution
    name: str | None  # FROM … AS name
    line: int
    platform: str | None = None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: str  # as given, for messages
    escape: str
    global_args: list[Instruction]
    stages: list[Stage]

    def error(self, line: int, message: str, hint: str | None = None) -> DockerfileError:
        return DockerfileError(f"{self.path}:{line}: {message}", hint=hint)


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """The whole file, checked: stages, their instructions, flags and forms."""
    lines = text.splitlines()
    escape, first = _directives(lines, path)
    df = Dockerfile(path=path, escape=escape, global_args=[], stages=[])
    for number, raw in _logical_lines(lines, first, escape, path):
        keyword, _, rest = raw.strip().partition(" ")
        if "\t" in keyword:
            keyword, _, more = keyword.partition("\t")
            rest = more + " " + rest
        upper = keyword.upper()
        if upper not in KEYWORDS:
            raise df.error(number, f"unknown instruction {keyword[:40]!r}",
                           hint="instructions: " + ", ".join(KEYWORDS))
        instruction = _instruction(df, upper, rest.strip(), number)
        _place(df, instruction)
    if not df.stages:
        raise DockerfileError(f"{path}: no FROM instruction", hint="a Dockerfile starts with FROM IMAGE (after ARGs)")
    return df


def _directives(lines: list[str], path: str) -> tuple[str, int]:
    """(escape character, index of the first line after the directives)."""
    escape, seen = "\\", set()
    for index, line in enumerate(lines):
        match = _DIRECTIVE.match(line.strip()) if line.strip() else None
        if match is None:
            return escape, index
        name, value = match.group(1).lower(), match.group(2)
        if name not in ("escape", "syntax", "check"):
            return escape, index  # an ordinary comment: directives end here
        if name in seen:
            raise DockerfileError(f"{path}:{index + 1}: the {name} directive is given twice")
        seen.add(name)
        if name == "escape":
            if value not in ("\\", "`"):
                raise DockerfileError(f"{path}:{index + 1}: invalid escape character {value!r}",
                                      hint="use # escape=\\ or # escape=`")
            escape = value
    return escape, len(lines)


def _logical_lines(lines: list[str], first: int, escape: str, path: str) -> list[tuple[int, str]]:
    """(starting line number, text) of each instruction, continuations joined."""
    out: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for index in range(first, len(lines)):
        line = lines[index]
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and current):
            continue  # comments, and blank lines inside a continuation, are dropped
        if not stripped:
            continue
        if not current:
            start = index + 1
        body = line.rstrip()
        if body.endswith(escape):  # Docker's rule: the escape character, then only blanks
            current.append(body[:-1])
            continue
        current.append(line)
        out.append((start, "".join(current)))
        current = []
    if current:
        text = "".join(current).strip()
        if text:
            out.append((start, text))  # a continuation at the end of the file: Docker accepts it
    return out


def _instruction(df: Dockerfile, keyword: str, rest: str, line: int) -> Instruction:
    flags: list[tuple[str, str]] = []
    if keyword in FLAGS:
        rest, flags = _flags(df, keyword, rest, line)
    exec_form = None
    if keyword in JSON_FORMS and rest.startswith("["):
        try:
            value = json.loads(rest)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            exec_form = tuple(value)
    if keyword == "SHELL" and exec_form is None:
        raise df.error(line, "SHELL needs a JSON array", hint='SHELL ["/bin/bash", "-c"]')
    if not rest and keyword not in ("CMD", "ENTRYPOINT"):
        raise df.error(line, f"{keyword} needs arguments")
    return Instruction(keyword=keyword, args=rest, line=line, flags=tuple(flags), exec_form=exec_form)


def _flags(df: Dockerfile, keyword: str, rest: str, line: int) -> tuple[str, list[tuple[str, str]]]:
    flags = []
    while rest.startswith("--"):
        word, _, tail = rest.partition(" ")
        name, eq, value = word[2:].partition("=")
        if name not in FLAGS[keyword]:
            allowed = ", ".join("--" + f for f in FLAGS[keyword]) or "none"
            raise df.error(line, f"{keyword} --{name[:30]} is not supported", hint=f"{keyword} takes: {allowed}")
        if not eq and name != "link":
            raise df.error(line, f"{keyword} --{name} needs a value (--{name}=VALUE)")
        flags.append((name, value if eq else "true"))
        rest = tail.lstrip()
    return rest, flags


def _place(df: Dockerfile, instruction: Instruction) -> None:
    line = instruction.line
    if instruction.keyword == "FROM":
        parts = instruction.args.split()
        name = None
        if len(parts) == 3 and parts[1].upper() == "AS":
            name = parts[2].lower()
            if not STAGE_NAME.match(name):
                raise df.error(line, f"invalid stage name {parts[2][:40]!r}",
                               hint="a stage name starts with a letter: letters, digits, '.', '_', '-'")
            if any(s.name == name for s in df.stages):
                raise df.error(line, f"stage name {name!r} is used twice")
        elif len(parts) != 1:
            raise df.error(line, "FROM takes one image and an optional AS NAME", hint="FROM IMAGE [AS NAME]")
        df.stages.append(Stage(index=len(df.stages), base=parts[0], name=name, line=line,
                               platform=instruction.flag("platform")))
    elif not df.stages:
        if instruction.keyword != "ARG":
            raise df.error(line, f"{instruction.keyword} before the first FROM",
                           hint="only ARG may come before FROM")
        df.global_args.append(instruction)
    else:
        df.stages[-1].instructions.append(instruction)


# --- words and variables -------------------------------------------------------------------


def words(text: str, env: dict[str, str], escape: str = "\\", where: str = "") -> list[str]:
    """``text`` split into words as Docker's shell-word lexer does, variables expanded
    and quotes removed."""
    out: list[str] = []
    word: list[str] = []
    quoted = False  # "" and '' are words; an unquoted expansion to nothing is none, as in sh
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in " \t\r\n":
            if any(word) or quoted:
                out.append("".join(word))
                word, quoted = [], False
            i += 1
            continue
        quoted = quoted or ch in "'\""
        if ch == escape and i + 1 < len(text):
            word.append(text[i + 1])
            i += 2
        elif ch == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise UsageError(f"{where}unterminated single quote")
            word.append(text[i + 1:end])
            i = end + 1
        elif ch == '"':
            i = _double_quoted(text, i + 1, env, escape, word, where)
        elif ch == "$":
            value, i = _variable(text, i, env, escape, where)
            pieces = re.split(r"[ \t\r\n]+", value)  # split after expansion, as Docker does
            word.append(pieces[0])
            for piece in pieces[1:]:
                if any(word) or quoted:
                    out.append("".join(word))
                word, quoted = [piece], False
        else:
            word.append(ch)
            i += 1
    if any(word) or quoted:
        out.append("".join(word))
    return out


def substitute(text: str, env: dict[str, str], escape: str = "\\", where: str = "") -> str:
    """``text`` with its variables expanded, quotes kept, as one string."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == escape and i + 1 < len(text) and text[i + 1] == "$":
            out.append("$")
            i += 2
        elif ch == "$":
            value, i = _variable(text, i, env, escape, where)
            out.append(value)
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _double_quoted(text: str, i: int, env: dict[str, str], escape: str, word: list[str], where: str) -> int:
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return i + 1
        if ch == escape and i + 1 < len(text) and text[i + 1] in ('"', "$", escape):
            word.append(text[i + 1])
            i += 2
        elif ch == "$":
            value, i = _variable(text, i, env, escape, where)
            word.append(value)
        else:
            word.append(ch)
            i += 1
    raise UsageError(f"{where}unterminated double quote")


def _variable(text: str, i: int, env: dict[str, str], escape: str, where: str) -> tuple[str, int]:
    """The value of the variable at text[i] == "$", and the index after it."""
    if i + 1 < len(text) and text[i + 1] == "{":
        end = _closing_brace(text, i + 2)
        if end < 0:
            raise UsageError(f"{where}missing '}}' in {text[i:i + 40]!r}")
        inner = text[i + 2:end]
        match = _NAME.match(inner)
        if match is None:
            raise UsageError(f"{where}bad substitution {text[i:end + 1]!r}")
        name, rest = match.group(0), inner[match.end():]
        value = env.get(name)
        if not rest:
            return value or "", end + 1
        for op in (":-", ":+", ":?", "-", "+", "?"):
            if rest.startswith(op):
                word = substitute(rest[len(op):], env, escape, where)
                unset = value is None or (op.startswith(":") and value == "")
                if op.endswith("-"):
                    return (word if unset else value or ""), end + 1
                if op.endswith("+"):
                    return ("" if unset else word), end + 1
                if unset:
                    raise UsageError(f"{where}{name}: {word or 'is not set'}")
                return value or "", end + 1
        raise UsageError(f"{where}unsupported modifier in {text[i:end + 1]!r}",
                         hint="supported: ${VAR}, ${VAR:-default}, ${VAR:+alt}, ${VAR-default}, ${VAR+alt}")
    match = _NAME.match(text, i + 1)
    if match is None:
        return "$", i + 1
    return env.get(match.group(0), ""), match.end()


def _closing_brace(text: str, i: int) -> int:
    depth = 1
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def key_values(instruction: Instruction, env: dict[str, str], escape: str, where: str) -> list[tuple[str, str]]:
    """ENV/LABEL/ARG pairs: ``K=V K2="v 2"``, or ENV's and LABEL's old ``K V`` form."""
    args = instruction.args
    first = args.split(None, 1)
    lexed = words(args, env, escape, where)
    if instruction.keyword in ("ENV", "LABEL") and lexed and "=" not in lexed[0]:
        if len(first) < 2:
            raise UsageError(f"{where}{instruction.keyword} {first[0]} needs a value",
                             hint=f"{instruction.keyword} NAME=VALUE")
        return [(first[0], " ".join(words(first[1], env, escape, where)))]
    pairs = []
    for word in lexed:
        name, eq, value = word.partition("=")
        if instruction.keyword == "ARG" and not eq:
            pairs.append((name, "\0"))  # declared without a default
            continue
        if not eq or not name:
            raise UsageError(f"{where}{instruction.keyword} expects NAME=VALUE, got {word[:40]!r}")
        pairs.append((name, value))
    for name, _ in pairs:
        if instruction.keyword != "LABEL" and not _NAME.fullmatch(name):
            raise UsageError(f"{where}invalid variable name {name[:40]!r}")
    return pairs
