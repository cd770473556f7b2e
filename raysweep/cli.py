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
        print("usage: raysweep {" + ",".join(COMMANDS) + "} [ARGS…]  (each command has --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
