"""Command line: `dpface train|eval|plan|kernels|export-head|export-onnx|convert|cluster`
(also `python -m dpface`). The commands live in dpface/commands/; this assembles them."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from dpface.commands import ORDER
from dpface.commands.errors import error_message


def build_parser() -> argparse.ArgumentParser:
    from dpface import __version__

    p = argparse.ArgumentParser(prog="dpface", description=__doc__)
    p.add_argument("--version", action="version", version=f"dpface {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also: environment DPFACE_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ORDER:
        importlib.import_module(f"dpface.commands.{name}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand on both sides of an option (`a=1 --resume auto b=2`): argparse
    # fills a positional list once, so the later ones come back as extras.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    debug = args.debug or os.environ.get("DPFACE_DEBUG", "") not in ("", "0")
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 — expected failures become one line; bugs keep a traceback
        found = error_message(e)
        if found is None:
            raise
        if debug:
            import traceback

            traceback.print_exc()
        print(f"dpface: error: {found[0]}", file=sys.stderr)
        return found[1]


if __name__ == "__main__":
    sys.exit(main())
