"""``python -m tests.fuzz``: fuzz the gateway's input surfaces, replay the corpus, write
the seeds.

    python -m tests.fuzz run [--seconds 300] [--timeout 10] [TARGET...]
    python -m tests.fuzz replay [TARGET...]
    python -m tests.fuzz seeds
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.fuzz import TARGETS, function, inputs, quiet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fuzz each target under atheris for a bounded time")
    run.add_argument(
        "targets", nargs="*", metavar="TARGET", help=f"default: all ({', '.join(TARGETS)})"
    )
    run.add_argument("--seconds", type=float, default=300, help="per target (default 300)")
    run.add_argument(
        "--timeout",
        type=int,
        default=10,
        help="seconds one input may run before it counts as a hang (default 10)",
    )
    run.add_argument("--rss-mb", type=int, default=2048, help="memory ceiling (default 2048)")
    run.add_argument("--quiet", action="store_true", help="figures only")
    replay = commands.add_parser("replay", help="feed the corpus and crashes/ to the targets")
    replay.add_argument("targets", nargs="*", metavar="TARGET")
    commands.add_parser("seeds", help="rewrite the generated seed corpora")
    args = parser.parse_args(argv)
    chosen = list(getattr(args, "targets", None) or TARGETS)
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; targets: {', '.join(TARGETS)}")
    if args.command == "run":
        from tests.fuzz.runner import run as fuzz  # atheris is checked there

        return fuzz(chosen, args.seconds, timeout=args.timeout, rss_mb=args.rss_mb,
                    quiet=args.quiet)  # fmt: skip
    if args.command == "seeds":
        from tests.fuzz.seeds import write

        for target, count in write().items():
            print(f"{target}: {count} seeds")
        return 0
    failures = 0
    for target in chosen:
        fn = function(target)
        started = time.perf_counter()
        files = inputs()
        for path in files:
            try:
                with quiet():
                    fn(path.read_bytes())
            except Exception as exc:
                failures += 1
                print(f"{target} {path.relative_to(path.parents[2])}: {type(exc).__name__}: "
                      f"{str(exc)[:300]}")  # fmt: skip
        print(f"{target}: {len(files)} inputs in {time.perf_counter() - started:.2f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
