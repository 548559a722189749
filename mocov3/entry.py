"""The ``mocov3`` console command. ``--version``, ``-h`` / ``--help`` and a bare ``mocov3`` are answered from
:mod:`mocov3.commands` without importing torch (a second or more of start-up on a cold disk); every other
command line goes to :func:`mocov3.cli.main`."""
from __future__ import annotations

import sys
from typing import Optional

from .commands import COMMANDS, top_parser
from .cpus import prepare_environment


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "--version"):
        parser, sub = top_parser()
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text)
        parser.parse_args(args)  # prints the help or the version and exits; a bare call is an error (exit 2)
        return 2
    # before torch loads its OpenMP runtime, which reads the wait policy once (mocov3/cpus.py: why)
    prepare_environment()
    from .cli import main as cli_main  # the full command line: torch, the models, the data

    return cli_main(args)


__all__ = ["main"]
