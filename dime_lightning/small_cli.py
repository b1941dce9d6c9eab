"""The small command lines (``compare``, ``reproduce``, ``tracking_queue``) on jsonargparse, like the fit CLI:
options spelled with underscores as there (``--tracking_uri``, ``--group_by``, ``--slurm_partition``), a
``--config`` YAML file of the options, and ``--print_config``.

The hyphenated spellings of earlier releases (``--tracking-uri``, ``--dry-run``, ``--slurm-time``, …) are accepted
until the next release, each with a deprecation note on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace


class _Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, keeping the layout of the description's examples."""


def make_parser(prog: str, description: str | None) -> ArgumentParser:
    """A parser for ``python -m <prog>`` with ``--config`` (a YAML file of its options).

    prog: the module run with ``python -m``.
    description: the help text above the options (a module docstring)."""
    parser = ArgumentParser(prog=f"python -m {prog}", description=description, formatter_class=_Formatter)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    return parser


def respell(argv: Sequence[str], renamed: Sequence[str], prog: str) -> list[str]:
    """``argv`` with the hyphenated spelling of each option in ``renamed`` (``--tracking-uri``) in today's
    (``--tracking_uri``), with a deprecation note for each; arguments after ``--`` are left as they are.

    argv: the command-line arguments.
    renamed: today's spellings of the options that had hyphens in earlier releases.
    prog: the command, for the note."""
    old = {flag.replace("_", "-"): flag for flag in renamed}
    out = list(argv)
    for index, arg in enumerate(out):
        if arg == "--":
            break
        flag, equals, value = arg.partition("=")
        if flag in old:
            sys.stderr.write(f"{prog}: note: {flag} is deprecated, use {old[flag]} (the old spelling is accepted "
                             "until the next release)\n")
            out[index] = old[flag] + equals + value
    return out


def parse(parser: ArgumentParser, argv: Sequence[str] | None, renamed: Sequence[str] = ()) -> Namespace:
    """Parse ``argv`` (default: ``sys.argv[1:]``) after ``respell``; exits 2 with a message on bad input.

    parser: from ``make_parser``.
    argv: the command-line arguments.
    renamed: as for ``respell``."""
    return parser.parse_args(respell(sys.argv[1:] if argv is None else argv, renamed, parser.prog))
