"""The ``nai-fast`` command line.

Each subcommand imports what it needs when it runs, so ``nai-fast --help``
stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nai-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nai_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_buckets(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as error:
        parser.exit(2, f"nai-fast {args.command}: error: {error}\n")


def _add_buckets(commands: argparse._SubParsersAction) -> None:
    from .buckets import PRESETS

    command = commands.add_parser(
        "buckets",
        help="show how a folder of images falls into aspect-ratio buckets",
        description="Scan DIR for images (or use a built-in sample of image sizes) and show how they fall "
        "into aspect-ratio buckets: images per bucket, pruning, aspect error, cropping, batches per epoch.",
    )
    command.add_argument("dir", nargs="?", help="image folder (default: a built-in sample of image sizes)")
    command.add_argument("--preset", choices=sorted(PRESETS), default="sd1", help="bucket grid (default: sd1)")
    command.add_argument("--batch-size", type=int, default=4, help="images per batch (default: 4)")
    command.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default: 1)")
    command.add_argument(
        "--max-aspect-error",
        type=float,
        default=0.5,
        help="prune images whose aspect error reaches this; in log units the default 0.5 prunes "
        "images that would lose about 40%% or more of their pixels (default: 0.5)",
    )
    command.add_argument("--metric", choices=("log", "linear"), default="log", help="aspect metric (default: log)")
    command.add_argument("--seed", type=int, default=0, help="shuffle seed of the epoch shown (default: 0)")
    command.add_argument("--plot", metavar="FILE.png", help="also write a chart of the distribution")
    command.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    command.set_defaults(run=_run_buckets)


def _run_buckets(args: argparse.Namespace) -> int:
    from .buckets import preset_buckets
    from .report import describe, format_table, plot

    if args.dir is None:
        from .sample import sample_sizes

        sizes, source, found = sample_sizes(), "built-in sample", None
    else:
        from .scan import scan

        found = scan(args.dir, progress=sys.stderr.isatty())
        sizes, source = found.sizes, args.dir
    figures = describe(
        sizes,
        preset_buckets(args.preset),
        batch_size=args.batch_size,
        world_size=args.world_size,
        max_aspect_error=args.max_aspect_error,
        metric=args.metric,
        seed=args.seed,
    )
    figures = {"source": source, "preset": args.preset, **figures}
    if found is not None:
        figures["unreadable"] = found.skipped_counts()
        figures["files"] = found.num_files
    if args.plot:
        plot(figures, args.plot)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{source}, preset {args.preset}\n")
        print(format_table(figures))
        if args.plot:
            print(f"\nchart written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
