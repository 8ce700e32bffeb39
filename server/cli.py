"""The `liveavatar` command. Each subcommand lives in its own module, imported only when chosen.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`; its top level must
import nothing heavy (torch, aiortc) so that `liveavatar --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.serve_cmd", "run the streaming avatar server"),
    "generate": ("liveavatar.offline.generate", "render an MP4 from a portrait (or multi-role script) and audio"),
    "batch": ("liveavatar.offline.batch", "run many generate jobs from a manifest or folder (resumable)"),
    "bench": ("liveavatar.bench", "stream a fixed number of blocks and report fps and ms per stage (1 or N GPUs)"),
    "engines": ("engines.cli", "build, export and list accelerated engines (ONNX, TensorRT)"),
}


DEFAULTS: dict[str, dict[str, str]] = {
    # engines/ is generic; the application tells it which graphs to export.
    "engines": {"default_targets": "liveavatar.acceleration.export:export_targets"},
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default, except where there is none to show (None, off) or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liveavatar", description="Real-time streaming talking avatars.")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(_module=module, **DEFAULTS.get(name, {}))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
