"""The `pipenag` command line.

    pipenag train --config configs/tiny.toml --method pipedream --stages 4 --steps 40
    pipenag schedule --name pipedream --stages 4 --microbatches 1
    pipenag bench optimizer
    pipenag compare --methods nesterov,pipedream,gpipe --config configs/tiny.toml --out runs/cmp

Every subcommand that runs training takes `--section.key=value` overrides of the config
(pipenag.config). Errors a user can cause print one line and exit with status 2.
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


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (see configs/)")
    parser.add_argument("--method", help="named method, e.g. nesterov, pipedream, gpipe (pipeline.method)")
    parser.add_argument("--stages", type=int, help="pipeline stages (pipeline.num_stages)")
    parser.add_argument("--steps", type=int, help="optimizer updates (train.steps)")
    parser.add_argument("--engine", choices=["sim", "dist"], help="train.engine")
    parser.add_argument("--out", help="run folder (run.out_dir)")
    parser.add_argument("--seed", type=int, help="train.seed")


def config_from_args(args: argparse.Namespace, overrides: list[str]):
    """Build the Config from --config, the shortcuts and the --section.key=value overrides."""
    from pipenag.config import load_config, parse_overrides

    tree = parse_overrides(overrides)
    shortcuts = {
        ("pipeline", "method"): getattr(args, "method", None),
        ("pipeline", "num_stages"): getattr(args, "stages", None),
        ("train", "steps"): getattr(args, "steps", None),
        ("train", "engine"): getattr(args, "engine", None),
        ("run", "out_dir"): getattr(args, "out", None),
        ("train", "seed"): getattr(args, "seed", None),
    }
    for (section, key), value in shortcuts.items():
        if value is not None:
            tree.setdefault(section, {})[key] = value
    return load_config(args.config, tree)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipenag", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a pipelined GPT (sim or dist engine)")
    _config_args(train)
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")

    sched = sub.add_parser("schedule", help="print a schedule's per-stage actions and weight versions")
    sched.add_argument("--name", required=True, help="gpipe, 1f1b, pipedream or 2bw")
    sched.add_argument("--stages", type=int, default=4)
    sched.add_argument("--microbatches", type=int, default=0, help="per update (0 = the schedule's default)")
    sched.add_argument("--updates", type=int, default=3, help="updates to show")

    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHES))
    bench.add_argument("which", choices=sorted(BENCHES))

    compare = sub.add_parser("compare", help="train several methods on identical data and weights")
    compare.add_argument("--methods", required=True, help="comma-separated method names")
    _config_args(compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # bench subcommands own their flags: everything after the bench name goes to them.
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        return importlib.import_module(BENCHES[argv[1]]).main(argv[2:]) or 0
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            from pipenag.train import train_main

            if args.resume:
                return train_main(None, resume=args.resume, extra=rest) or 0
            return train_main(config_from_args(args, rest)) or 0
        if args.command == "schedule":
            from pipenag.schedules import schedule_main

            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            return schedule_main(args.name, args.stages, args.microbatches, args.updates) or 0
        if args.command == "compare":
            from pipenag.compare import compare_main

            return compare_main(args.methods, config_from_args(args, rest)) or 0
        if args.command == "bench":
            return importlib.import_module(BENCHES[args.which]).main(rest) or 0
    except ValueError as e:
        print(f"pipenag {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
