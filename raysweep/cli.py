"""``raysweep COMMAND …``: the console script; each command is also ``python -m raysweep.COMMAND``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "tune": "raysweep.tune",
    "unlearn": "raysweep.unlearn",
    "prepare": "raysweep.prepare",
    "evaluate": "raysweep.evaluate",
    "report": "raysweep.report",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")  # help asked for: stdout, 0; else an error
        print("usage: raysweep {" + ",".join(COMMANDS) + "} [ARGS…]  (each command has --help)",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
