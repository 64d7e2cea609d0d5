"""Render docs/cli.md from the `lowbit` argparse parser: every subcommand's --help, verbatim.

    python docs/gen_cli.py            # rewrite docs/cli.md
    python docs/gen_cli.py --check    # exit 1 if docs/cli.md is out of date (tests/docs runs this)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

OUT = Path(__file__).with_name("cli.md")
WIDTH = "100"  # argparse wraps to $COLUMNS: fix it so the text does not depend on the terminal

HEADER = """# `lowbit` command-line reference

Generated from the argparse parser by `python docs/gen_cli.py`; do not edit by hand
(`tests/docs/test_docs.py` fails when this file and `--help` disagree). The `bench` and `chat`
commands are present because their modules are installed with lowbit.
"""


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the parser and every subparser below it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def render() -> str:
    os.environ["COLUMNS"] = WIDTH
    from lowbit.cli import build_parser

    parts = [HEADER]
    for path, parser in walk(build_parser()):
        title = " ".join(("lowbit",) + path)
        help_text = parser.format_help().rstrip()
        parts.append(f"## `{title}`\n\n```text\n$ {title} --help\n{help_text}\n```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with docs/cli.md instead of writing it")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date; run: python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
