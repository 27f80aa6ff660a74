"""``gateway queue status|dead|retry``: inspect and replay the work queue."""

from __future__ import annotations

import argparse
import json
import time
from typing import TextIO

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.envelope import Stage
from gateway.store.backend import database_label, database_password, open_queue, queue_exists
from gateway.store.space import MB, SpaceGuard


def register(sub: Subparsers) -> None:
    queue = sub.add_parser("queue", help="inspect and replay the work queue")
    qsub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    status = needs_config(
        qsub.add_parser("status", help="counts per stage and state"), queue_command
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    dead = needs_config(
        qsub.add_parser("dead", help="dead letters with their last error"), queue_command
    )
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    retry = needs_config(qsub.add_parser("retry", help="replay dead jobs"), queue_command)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", type=int, default=[], metavar="ID")
    which.add_argument("--all", action="store_true", help="replay every dead job")


def queue_command(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    database, password = cfg.gateway.database, database_password(cfg)
    if not queue_exists(cfg.data_dir, database, password):
        if getattr(args, "json", False):
            out.write("{}\n" if args.queue_command == "status" else "[]\n")
        else:
            where = database_label(database, cfg.data_dir)
            print(f"no queue yet at {where} (the gateway has not run with this config)", file=out)
        return 1 if args.queue_command == "retry" else 0
    queue = open_queue(cfg.data_dir, database=database, password=password)
    try:
        if args.queue_command == "status":
            counts = queue.counts()
            if args.json:
                json.dump(counts, out, indent=2)
                out.write("\n")
                return 0
            _print_status(counts, queue.oldest_ready_age(time.time()), out)
            _print_space(cfg, out)
            return 0
        if args.queue_command == "dead":
            jobs = queue.dead_jobs()
            if args.json:
                json.dump(
                    [
                        {
                            "id": j.id,
                            "stage": j.stage.value,
                            "subject": j.subject,
                            "attempts": j.attempts,
                            "last_error": j.last_error,
                        }
                        for j in jobs
                    ],
                    out,
                    indent=2,
                )
                out.write("\n")
                return 0
            if not jobs:
                print("no dead letters", file=out)
            for j in jobs:
                print(
                    f"{j.id:>8}  {j.stage.value:<8} {j.subject[:12]}  attempts={j.attempts}  "
                    f"{j.last_error}",
                    file=out,
                )
            return 0
        if args.queue_command == "retry":
            n = queue.replay(None if args.all else list(args.ids), time.time())
            print(f"{n} job(s) returned to the queue", file=out)
            return 0 if n or args.all else 1
    finally:
        queue.close()
    raise AssertionError(args.queue_command)


def _print_status(counts: dict[str, dict[str, int]], oldest: float | None, out: TextIO) -> None:
    received = counts.get("received", {})
    studies = counts.get("studies", {})
    print(
        f"received   dicom instances: {received.get('dicom', 0)}   "
        f"hl7 messages: {received.get('hl7', 0)}",
        file=out,
    )
    print(
        f"studies    open (assembling): {studies.get('open', 0)}   "
        f"complete: {studies.get('complete', 0)}",
        file=out,
    )
    print(f"{'stage':<10}{'ready':>8}{'leased':>8}{'done':>8}{'dead':>8}", file=out)
    order = {f"jobs:{stage.value}": i for i, stage in enumerate(Stage)}  # pipeline order
    stages = sorted(
        (k for k in counts if k.startswith("jobs:")), key=lambda k: (order.get(k, 99), k)
    )
    for key in stages:
        s = counts[key]
        print(
            f"{key[5:]:<10}{s.get('ready', 0):>8}{s.get('leased', 0):>8}"
            f"{s.get('done', 0):>8}{s.get('dead', 0):>8}",
            file=out,
        )
    if not stages:
        print("(no jobs yet)", file=out)
    if oldest is not None:
        print(f"oldest waiting job: {oldest:.0f} s", file=out)


def _print_space(cfg: Config, out: TextIO) -> None:
    """The volumes' free space against ``gateway.min_free_mb``: below it, ingest refuses."""
    floor = cfg.gateway.min_free_mb * MB
    guard = SpaceGuard({"data": cfg.data_dir, "spool": cfg.spool_dir}, floor)
    parts = [
        f"{v.name}: {'unknown' if v.free < 0 else f'{v.free / 2**30:.1f} GB'}"
        + (" BELOW THE FLOOR" if v.below(floor) else "")
        for v in guard.volumes()
    ]
    said = f"floor {floor / 2**30:.1f} GB: below it new data is refused" if floor else "no floor"
    print(f"free space {'   '.join(parts)}   ({said})", file=out)
