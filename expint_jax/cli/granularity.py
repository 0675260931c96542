"""``expint granularity POOL [POOL ...] [--out report.json]``: the granularity table of pools.

Reads each pool (ours or the release's format), prints one row per pool
(``experience.granularity.format_table``), and optionally stores the single pool's report.
Exit 2 with one line naming the file when a pool cannot be read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from expint_jax.cli.errors import ArgumentParser
from expint_jax.experience.bank import PoolError, read_pool
from expint_jax.experience.granularity import analyze_pool, format_table, write_report


def main(argv: Sequence[str] | None = None) -> int:
    """``expint granularity POOL [POOL ...] [--out report.json]``: prints one table row per pool."""
    parser = ArgumentParser(prog="expint granularity", description=main.__doc__)
    parser.add_argument("pools", nargs="+", type=Path, help="pool files: our .jsonl or the release's flat .json")
    parser.add_argument("--out", type=Path, help="write the report of the (single) pool here as JSON")
    args = parser.parse_args(argv)
    if args.out and len(args.pools) != 1:
        parser.error("--out needs exactly one pool")
    try:
        rows = [(str(path), analyze_pool(read_pool(path))) for path in args.pools]
    except (PoolError, ValueError) as e:
        print(f"expint granularity: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.out:
        write_report(args.out, rows[0][1])
    return 0
