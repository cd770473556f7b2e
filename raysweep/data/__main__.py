"""``python -m raysweep.data fetch {real_world,idk,tofu} [--to DIR]``: fetch the seed's data files.

Without ``--to`` the files go to the cache ``data.source: seed`` reads
(``$RAYSWEEP_CACHE/seed/<commit>/data/...``); with ``--to DIR`` to ``DIR/data/...``, for a machine
that will run offline later (there: ``RAYSWEEP_SEED_BASE_URL=file://DIR``). Exit 2 with one line
naming the file and URL when a download fails or a checksum does not match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysweep.data.fetch import BASE_URL_ENV, BUNDLES, SEED_COMMIT, SEED_REPO, FetchError, base_url, fetch_bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.data",
                                     description=f"Fetch data files of {SEED_REPO}@{SEED_COMMIT[:7]}.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and checksum a bundle of seed data files")
    fetch.add_argument("bundle", choices=sorted(BUNDLES), help="real_world, idk (idontknow.jsonl) or tofu")
    fetch.add_argument("--to", type=Path, default=None, help="directory to write DIR/data/... (default: the cache)")
    args = parser.parse_args(argv)
    try:
        files = fetch_bundle(args.bundle, args.to)
    except FetchError as err:
        print(err.one_line(), file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --to: {args.to}: {err.strerror or err}", file=sys.stderr)
        return 2
    for file in files:
        print(file)
    print(f"{len(files)} file(s) of {args.bundle} checked (sha256) from {base_url()}", file=sys.stderr)
    if args.to is not None:
        print(f"offline use: {BASE_URL_ENV}=file://{args.to.expanduser().resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
