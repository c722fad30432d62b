"""The `pipenag` command line.

    pipenag train --config configs/tiny.toml --method pipedream --stages 4 --steps 40
    pipenag schedule --name pipedream --stages 4 --microbatches 1
    pipenag schedule --name pipedream --stages 4 --pipeline.in_flight=8,6,4,1
    pipenag compare --methods nesterov,pipedream,gpipe --config configs/tiny.toml --out runs/cmp
    pipenag plan --config configs/paper-base.toml --tflops 989
    pipenag sweep --methods gpipe,pipedream,nesterov --stages 1,8 --seeds 1,2,3 --config configs/bench.toml
    pipenag bench optimizer --config configs/small.toml
    pipenag data prepare --config configs/tiny.toml --out data/tiny --max-tokens 67108864

Every subcommand that builds (or plans) a model (train, compare, sweep, bench, plan), and data prepare, takes --config, the shortcuts of
pipenag.config.SHORTCUTS and `--section.key=value` overrides of the config. Errors a user can
cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = {
    "optimizer": "pipenag.bench.optimizer",
    "simulator": "pipenag.bench.simulator",
    "pipeline": "pipenag.bench.pipeline",
}


def build_parser() -> argparse.ArgumentParser:
    from pipenag.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="pipenag", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a pipelined GPT (sim or dist engine)")
    add_config_arguments(train)
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")

    sched = sub.add_parser("schedule", help="print a schedule's per-stage actions and weight versions")
    sched.add_argument("--name", required=True, help="gpipe, 1f1b, pipedream or 2bw")
    sched.add_argument("--stages", type=int, default=4)
    sched.add_argument("--microbatches", type=int, default=0, help="per update (0 = the schedule's default)")
    sched.add_argument("--updates", type=int, default=3, help="updates to show")

    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHES) + " (NAME --help for each)")
    bench.add_argument("which", choices=sorted(BENCHES))

    compare = sub.add_parser("compare", help="train several methods on identical data and weights")
    compare.add_argument("--methods", required=True, help="comma-separated method names")
    add_config_arguments(compare, skip=("method",))

    plan = sub.add_parser("plan", help="predicted memory per stage and time per update, before any work")
    add_config_arguments(plan)
    from pipenag.plan import add_plan_arguments

    add_plan_arguments(plan)

    data = sub.add_parser("data", help="data tools: prepare (tokenize the corpus once into memory-mapped shards)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize data.source into token shards + manifest in --out DIR "
                                               "(train from them with --data.source=shards:DIR)")
    add_config_arguments(prep, skip=("out",))
    prep.add_argument("--out", dest="shard_dir", metavar="DIR", required=True, help="the shard folder")
    from pipenag.data.shards import DEFAULT_MAX_TOKENS

    prep.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                      help=f"tokens per shard at most (default {DEFAULT_MAX_TOKENS})")

    sub.add_parser("sweep", help="methods x stages x seeds x lrs in parallel, with the comparison table "
                                 "(sweep --help for its options)", add_help=False)
    return parser


def schedule_main(name: str, num_stages: int, num_microbatches: int, num_updates: int,
                  overrides: list[str] = ()) -> int:
    """`pipenag schedule`: print the grid, the action lists and the version table.

    Args:
        overrides: --section.key=value settings; pipeline.in_flight (with "auto": [link],
            pipeline.pass_ms and the message size of [data]/[model]) shapes the schedule.
    """
    from pipenag.config import load_config
    from pipenag.schedules import ASYNC_SCHEDULES, Schedule, microbatches_per_update
    from pipenag.timing import format_grid, format_versions

    cfg = load_config(None, ["--pipeline.num_stages=" + str(num_stages), *overrides])
    M = num_microbatches or microbatches_per_update(name, num_stages)
    depths = cfg.pipeline.depths
    if cfg.pipeline.in_flight == "auto" and name in ASYNC_SCHEDULES:
        from pipenag.link.messages import auto_in_flight

        depths = auto_in_flight(cfg, name, num_stages, M)
    try:
        schedule = Schedule(name, num_stages, M, depths)
    except ValueError as e:
        raise ValueError(f"pipeline.{e}" if str(e).startswith("in_flight") else str(e)) from None
    if num_updates < 1:
        raise ValueError(f"updates={num_updates}: must be >= 1")
    if schedule.asynchronous:
        print(f"in flight per stage: {list(schedule.depths)}; staleness: "
              f"{[schedule.staleness(k) for k in range(num_stages)]}; weight versions kept: "
              f"{[schedule.versions_kept(k) for k in range(num_stages)]}")
    print(format_grid(schedule, num_updates))
    print("actions:")
    for k in range(num_stages):
        print(f"stage {k}: " + " ".join(str(a) for a in schedule.actions(k, num_updates)))
    print(format_versions(schedule, num_updates))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench and sweep own their flags: everything after the name goes to them.
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        return importlib.import_module(BENCHES[argv[1]]).main(argv[2:]) or 0
    if argv and argv[0] == "sweep":
        from pipenag.sweep import sweep_main

        return sweep_main(argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            from pipenag.config import config_from_args
            from pipenag.train import train_main

            if args.resume:
                return train_main(None, resume=args.resume, extra=rest) or 0
            return train_main(config_from_args(args, rest)) or 0
        if args.command == "schedule":
            return schedule_main(args.name, args.stages, args.microbatches, args.updates, rest) or 0
        if args.command == "compare":
            from pipenag.compare import compare_main
            from pipenag.config import config_from_args

            return compare_main(args.methods, config_from_args(args, rest)) or 0
        if args.command == "plan":
            from pipenag.config import config_from_args
            from pipenag.plan import plan_main

            return plan_main(config_from_args(args, rest), calibrate=args.calibrate, tflops=args.tflops,
                             as_json=args.json) or 0
        if args.command == "data":
            from pipenag.config import config_from_args
            from pipenag.data.shards import prepare_main

            return prepare_main(config_from_args(args, rest), args.shard_dir, args.max_tokens) or 0
    except ValueError as e:
        print(f"pipenag {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
