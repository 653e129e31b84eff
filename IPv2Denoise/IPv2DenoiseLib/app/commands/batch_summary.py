"""``ipv2-denoise batch-summary OUT``: one summary from the shard summaries of a ``batch --shard`` run.

Only finished shards of one run are combined (``records.combine_shard_summaries``): a shard that
was interrupted or stopped, lacks rows, or comes from another input, model, options or case list
is refused in one line naming it (exit 2), never merged into a summary that looks complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from IPv2DenoiseLib.app.batch.records import SUMMARY_STEM, combine_shard_summaries, totals, write_summary
from IPv2DenoiseLib.core.errors import UserError

NAME = "batch-summary"
HELP = (
    "Combine the shard summaries (batch-summary.shard-K-of-N.json) in OUT into batch-summary.csv/.json; "
    "exit 1 if any case failed, 2 if a shard is missing or unfinished, or the shards are not of one run."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUT", help="the OUT folder the shards wrote to")


def run(args: argparse.Namespace) -> int:
    """Combine the shard summaries in OUT; 0 all done, 1 some case failed (2: UserError raised)."""
    out_root = Path(args.output)
    if not out_root.is_dir():
        raise UserError(f"OUT {out_root} is not a folder")
    rows, info = combine_shard_summaries(out_root)
    path = write_summary(out_root, rows, info, stem=SUMMARY_STEM)
    counts = totals(rows)
    print(
        f"{info['combined_shards']} shards: {counts['done']} done, {counts['skipped']} already done, "
        f"{counts['failed']} failed of {counts['cases']} cases; summary {path}",
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0
