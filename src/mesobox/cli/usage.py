"""Help text and man pages, generated from the option table (cli/table.py).

Also the two steps every verb but run/exec/shell takes first: ``parse`` (the table's
parser, printing the help when asked) and ``subverb`` (``mesobox instance start``).
Not on the launch path: ``mesobox run`` imports this only for ``--help``.
"""

from __future__ import annotations

import sys
from typing import Any

from mesobox.cli import table
from mesobox.cli.table import FLAG, OPTIONAL, Option, Verb
from mesobox.errors import UsageError

WIDTH = 79
LEFT = 30  # where an option's help starts


def find(path: str) -> Verb:
    verb = table.find(path)
    if verb is None:
        raise UsageError(f"unknown verb {path!r}", hint="`mesobox --help` lists them")
    return verb


def parse(path: str, argv: list[str]) -> tuple[dict[str, Any], list[str]] | None:
    """The table's parse of ``mesobox PATH ARGV``; None when it printed the help instead."""
    values, args = table.parse(find(path), argv)
    if values.get("help"):
        sys.stdout.write(help_text(path))
        return None
    return values, args


def subverb(path: str, argv: list[str], noun: str = "verb") -> tuple[str, list[str]] | None:
    """``instance start ...`` → ("start", [...]); None when it printed the verb's help
    (asked for, or no subverb given: the caller's status tells which)."""
    verb = find(path)
    if not argv or argv[0] in (*table.HELP_NAMES, "help"):
        sys.stdout.write(help_text(path))
        return None
    sub = verb.subverb(argv[0])
    if sub is None:
        raise UsageError(f"unknown {path} {noun} {argv[0]!r}", hint=f"`mesobox {path} --help` lists them")
    return sub.name, argv[1:]


# --- --help ----------------------------------------------------------------------------------


def _wrap(text: str, indent: int = 0) -> list[str]:
    import textwrap

    lead = " " * indent
    return textwrap.wrap(text, WIDTH, initial_indent=lead, subsequent_indent=lead,
                         break_on_hyphens=False, break_long_words=False) or [lead]


def option_names(opt: Option) -> str:
    """``-B, --bind SRC``, ``    --writable-tmpfs[=SIZE]`` (long names line up)."""
    names = ", ".join(opt.names)
    if opt.names[0].startswith("--"):
        names = "    " + names
    if opt.kind == OPTIONAL:
        return f"{names}[={opt.metavar}]"
    return names if opt.kind == FLAG else f"{names} {opt.metavar}"


def _option_lines(options: tuple[Option, ...]) -> list[str]:
    lines = []
    for opt in options:
        left = "  " + option_names(opt)
        body = _wrap(opt.help + (" (required)" if opt.required else ""), LEFT)
        if len(left) + 2 > LEFT:
            lines += [left, *body]
        else:
            lines += [left.ljust(LEFT) + body[0][LEFT:], *body[1:]]
    return lines


HELP_OPTION = Option("-h --help", FLAG, "show this help")


def help_text(path: str) -> str:
    """What ``mesobox PATH --help`` prints."""
    verb = find(path)
    lines = [f"usage: {table.synopsis(verb)}"]
    lines += [f"       {table.synopsis(sub)}" for sub in verb.subverbs]
    lines.append("")
    if verb is table.toplevel():
        lines += ["Unprivileged containers for HPC centres.  `mesobox VERB --help` for a verb's options.", ""]
        lines += ["verbs:", *(f"  {v.name:<11} {v.summary}" for v in _available(table.verbs())), ""]
    else:
        lines += [*_wrap(_sentence(verb.summary)), ""]
    if verb.about:
        lines += [*_wrap(verb.about), ""]
    if verb.subverbs:
        width = max(len(sub.name) for sub in verb.subverbs) + 2
        lines += ["verbs:", *(f"  {sub.name:<{width}}{sub.summary}" for sub in verb.subverbs), ""]
        lines += [f"`mesobox {path} VERB --help` for a verb's options.", ""]
    lines += ["options:", *_option_lines((*verb.options, HELP_OPTION))]
    if verb.inherit is not None:
        which = "long names of the options" if verb.passes_on else "options"
        lines += ["", f"and the {which} of `mesobox {verb.inherit.path}` (mesobox {verb.inherit.path} --help)"]
    return "\n".join(lines) + "\n"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _available(verbs: tuple[Verb, ...]) -> list[Verb]:
    """The verbs whose module this installation has (a site may leave some out)."""
    from importlib.util import find_spec

    from mesobox.cli import DISPATCH

    return [v for v in verbs if v.name in DISPATCH and find_spec(DISPATCH[v.name][0]) is not None]


def main_help(argv: list[str], config: object = None) -> int:
    """``mesobox help [VERB [SUBVERB]]``: the same text as ``mesobox VERB --help``."""
    parsed = parse("help", argv)
    if parsed is not None:
        sys.stdout.write(help_text(" ".join(parsed[1])))
    return 0


# --- man pages -------------------------------------------------------------------------------


def _roff(text: str) -> str:
    """Plain text for a man(7) line: backslashes and minus signs escaped, and no line
    that could be taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _roff_synopsis(verb: Verb) -> str:
    """The synopsis, the command in bold."""
    command = " ".join(["mesobox", *verb.path.split()])
    rest = table.synopsis(verb)[len(command):].strip()
    return f"\\fB{_roff(command)}\\fR {_roff(rest)}".rstrip()


def _roff_options(options: tuple[Option, ...]) -> list[str]:
    lines = []
    for opt in options:
        names = ", ".join(f"\\fB{_roff(n)}\\fR" for n in opt.names)
        if opt.kind == OPTIONAL:
            names += f"[=\\fI{_roff(opt.metavar)}\\fR]"
        elif opt.kind != FLAG:
            names += f" \\fI{_roff(opt.metavar)}\\fR"
        lines += [".TP", names, _roff(opt.help + (" (required)" if opt.required else ""))]
    return lines


def _roff_inherited(verb: Verb) -> list[str]:
    if verb.inherit is None:
        return []
    which = "the long names of the options" if verb.passes_on else "the options"
    page = f"\\fBmesobox\\-{_roff(verb.inherit.path)}\\fR(1)"
    return [".PP", f"{_roff(f'And {which} of mesobox {verb.inherit.path}; see')} {page}."]


def manpage(path: str) -> str:
    """mesobox(1) for "", else mesobox-VERB(1): subverbs are sections of their verb's page."""
    from mesobox import __version__

    verb = find(path)
    title = "-".join(["mesobox", *path.split()])
    lines = [f'.TH {_roff(title.upper())} 1 "" "mesobox {_roff(__version__)}" "User Commands"', ".SH NAME",
             f"{_roff(title)} \\- {_roff(verb.summary if verb.path else 'unprivileged containers for HPC centres')}",
             ".SH SYNOPSIS", _roff_synopsis(verb), ".SH DESCRIPTION", _roff(_sentence(verb.summary))]
    if verb.about:
        lines += [".PP", _roff(verb.about)]
    if verb is table.toplevel():
        lines += [".SH VERBS"]
        for v in table.verbs():
            lines += [".TP", f"\\fB{_roff(v.name)}\\fR", _roff(v.summary)]
    lines += [".SH OPTIONS", *_roff_options((*verb.options, HELP_OPTION))]
    lines += _roff_inherited(verb)
    for sub in verb.subverbs:
        lines += [f".SH {_roff(sub.path.upper())}", _roff_synopsis(sub), ".PP", _roff(_sentence(sub.summary))]
        if sub.about:
            lines += [".PP", _roff(sub.about)]
        lines += [*_roff_options(sub.options), *_roff_inherited(sub)]
    lines.append(".SH SEE ALSO")
    pages = [f"mesobox-{v.name}" for v in table.verbs()] if verb is table.toplevel() else ["mesobox"]
    lines.append(",\n".join(f".BR {_roff(p)} (1)" for p in pages))
    return "\n".join(lines) + "\n"


def main_manpage(argv: list[str], config: object) -> int:
    parsed = parse("manpage", argv)
    if parsed is None:
        return 0
    values, args = parsed
    if values.get("list"):
        sys.stdout.write("".join(f"{v.name}\n" for v in table.verbs()))
        return 0
    sys.stdout.write(manpage(" ".join(args)))
    return 0
