"""The slow-link decision table (docs/results/slow_links.md): on my link, at my depth, which
pipeline reaches the best synchronous loss first, and by how much?

    python experiments/slow_links.py --collect runs       # copy finished loss runs into the data files
    python experiments/slow_links.py                      # the tables and the plot from the data files

The losses come from the benchmark regime (configs/bench.toml, 2,000 microbatches of 8 x 64
tokens), the times from the wall-clock model (pipenag.wallclock.predict) of a scenario:
- every stage computes 20 ms per forward and 20 ms per backward of one microbatch (the setting
  of docs/results/pipeline.md), scaled per method by the forward, backward and optimizer-step
  costs that pipenag.wallclock.calibrate measures for that method on the model of
  docs/results/time_model.md (one block of width 128 per stage, where the model is validated);
- every message is 512 KiB (8 x 128 x 128 float32), 136 KiB with int8 on both directions,
  which every link setting here uses, for the synchronous schedules as well;
- the asynchronous methods run at the depths pipeline.in_flight = "auto" plans for that link
  (timing.plan_in_flight on the scenario), and their loss runs were made at those depths, so
  the staleness each link implies is in the loss;
- the synchronous schedules (gpipe, 1f1b, zb-h1, whose numbers are gpipe's) at M in
  {4, K, 2K, 4K}, their loss at each M from gpipe runs at K = 1 (a flushing schedule's numbers do
  not depend on K); their loss with int8 is taken to be the uncompressed one (int8's measured
  cost at K = 8 is within noise of 0: docs/results/compression.md), which favours them.
Time to target = microbatches to the target on the seed-mean curve x modelled seconds per
microbatch in the steady state. The target: the best synchronous schedule's final loss (the
lowest seed-mean final loss over the synchronous runs), and the reference: the synchronous
schedule and M that reach it first.

The loss runs (made from a clone of this repository, their run folders under RUNS):
    S=configs/bench.toml; I8=link.compress_activations=int8:link.compress_gradients=int8
    pipenag sweep --config $S --methods muon-wp:$I8 --stages 8 --seeds 1 --lrs 3e-3 --no-k1-controls \\
        --grid "pipeline.in_flight=22,19,16,13,10,7,4,1" --out RUNS/sl_k8        (and the others of QUEUE)
    pipenag sweep --config $S --methods gpipe:pipeline.num_microbatches=8 --stages 1 --seeds 1 --lrs 3e-3 \\
        --out RUNS/sl_sync                                                            (and the others)
    # K = 4 at the depths of the three links, and without a link at the default depths
    pipenag sweep --config $S --methods pipedream:$I8,nesterov:$I8,muon-wp:$I8 --stages 4 --seeds 1 \\
        --lrs 3e-3 --no-k1-controls --grid "pipeline.in_flight=7,5,3,1;10,7,4,1;22,15,8,1" --out RUNS/sl_k8
    pipenag sweep --config $S --methods pipedream,nesterov,muon-wp --stages 4 --seeds 1 --lrs 3e-3 \\
        --no-k1-controls --out RUNS/sl_k4none
    # 4x the budget at K = 8 on 100 Mbit/s, 30 ms (rows of their own: "..., 8,000 microbatches")
    pipenag sweep --config $S --methods nesterov:$I8,muon-wp:$I8 --stages 8 --seeds 1 --lrs 3e-3 \\
        --no-k1-controls --grid "pipeline.in_flight=22,19,16,13,10,7,4,1" --train.microbatch_budget=8000 \\
        --train.eval_every=160 --out RUNS/sl_k8_long
    # machine c: the synchronous lr edges and M, the target's seeds, the moonshot's seeds, the best method
    pipenag sweep --config $S --methods gpipe-muon --stages 1 --seeds 1 --lrs 3e-2,1e-1 --out RUNS/sl_sync_up
    pipenag sweep --config $S --methods gpipe-muon --stages 1 --seeds 2,3 --lrs 3e-2 --out RUNS/sl_sync_seeds
    pipenag sweep --config $S --methods gpipe-muon:pipeline.num_microbatches=8 --stages 1 --seeds 1 \
        --lrs 3e-3,1e-2,3e-2,1e-1 --out RUNS/sl_sync_muon
    pipenag sweep --config $S --methods gpipe:pipeline.num_microbatches=32 --stages 1 --seeds 1 --lrs 3e-4 \
        --out RUNS/sl_sync_down
    pipenag sweep --config $S --methods muon-wp:$I8 --stages 8 --seeds 2,3 --lrs 3e-3 --no-k1-controls \
        --grid "pipeline.in_flight=22,19,16,13,10,7,4,1" --train.microbatch_budget=8000 --train.eval_every=160 \
        --out RUNS/sl_k8_long_seeds          (and muon-wp-ef:$I8 seed 1 into RUNS/sl_ef_k8_long; without the
                                              budget into RUNS/sl_ef_k8; muon-wp:$I8 --lrs 1e-2 into RUNS/sl_k8_lr)
    # K = 16 at the depths of the three links (D16: the depths of depths.json, ";"-separated)
    pipenag sweep --config $S --methods pipedream:$I8,nesterov:$I8,muon-wp:$I8 --stages 16 --seeds 1 --lrs 3e-3 \
        --no-k1-controls --grid "pipeline.in_flight=$D16" --out RUNS/sl_k16
    # K = 32 on the other two links (D32: their depths), the link-free K = 16 and 32 rows at the
    # default depths, muon-wp-ef at K = 16 and 32 (all seed 1, lr 3e-3, --jobs 1, two sweeps at once)
    pipenag sweep --config $S --methods pipedream:$I8,nesterov:$I8,muon-wp:$I8 --stages 32 --seeds 1 --lrs 3e-3 \
        --no-k1-controls --grid "pipeline.in_flight=$D32" --out RUNS/sl_k32
    pipenag sweep --config $S --methods pipedream,nesterov,muon-wp --stages 16 --seeds 1 --lrs 3e-3 \
        --no-k1-controls --out RUNS/sl_k16none            (and nesterov,muon-wp,muon-wp-ef --stages 32: sl_k32none;
                                                      muon-wp-ef --stages 16: sl_ef_k16none)
    pipenag sweep --config $S --methods muon-wp-ef:$I8 --stages 16 --seeds 1 --lrs 3e-3 --no-k1-controls \
        --grid "pipeline.in_flight=$D16" --out RUNS/sl_ef_k16                         (and --stages 32: sl_ef_k32)
    pipenag sweep --config $S --methods nesterov:$I8 --stages 8 --seeds 1 --lrs 3e-3 --no-k1-controls \
        --grid "pipeline.in_flight=15,13,11,9,7,5,3,1;50,43,36,29,22,15,8,1" --out RUNS/sl_k8b
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

DATA = Path("docs/results/data/slow_links")
LINKS = [("none", 0.0, 0.0), ("1 Gbit/s, 5 ms", 5.0, 1000.0), ("100 Mbit/s, 30 ms", 30.0, 100.0),
         ("50 Mbit/s, 100 ms", 100.0, 50.0)]
F_MS = B_MS = 20.0
SHAPE = ["--data.microbatch_size=8", "--model.block_size=128", "--model.n_embd=128", "--model.n_head=4"]
INT8 = ["--link.compress_activations=int8", "--link.compress_gradients=int8"]
ASYNC = ("pipedream", "nesterov", "muon-wp", "muon-wp-ef")
# The Muon methods, whose optimizer step a GPU would make cheap: each also gets a what-if row (*)
# with its step at AdamW's cost.
STARRED = ("muon-wp", "muon-wp-ef")
SYNC = ("gpipe", "1f1b", "zb-h1")
BENCH_TOKENS_PER_MICROBATCH = 8 * 64
BUDGET = 2000 * BENCH_TOKENS_PER_MICROBATCH  # tokens of a benchmark run (longer runs are rows of their own)
# The calibration model: docs/results/time_model.md's (4 blocks of width 128, one per stage).
CALIBRATION = ["--model.n_layer=4", "--model.n_embd=128", "--model.n_head=4", "--model.block_size=128",
               "--data.microbatch_size=8", "--data.max_chars=400000", "--pipeline.num_stages=4", "--run.threads=1"]
COST_METHODS = ("pipedream", "nesterov", "muon-wp", "muon-wp-ef", "gpipe", "gpipe-muon")


def sync_ms(K: int) -> tuple[int, ...]:
    return tuple(sorted({4, K, 2 * K, 4 * K}))


# -- costs ----------------------------------------------------------------------------------------


def measure_costs() -> dict:
    """Per method: forward and backward relative to pipedream's, and the optimizer step relative
    to pipedream's forward + backward, each the mean over the calibration model's stages."""
    from pipenag.config import load_config
    from pipenag.wallclock import calibrate, machine_key

    raw = {}
    for m in COST_METHODS:
        c = calibrate(load_config(None, CALIBRATION + [f"--pipeline.method={m}"]), repeats=12, warmup=4)
        raw[m] = {k: statistics.fmean(getattr(c, k)) for k in ("forward", "backward", "step")}
    pd = raw["pipedream"]
    return {"machine": machine_key(), "measured_s": raw,
            "scale": {m: {"forward": r["forward"] / pd["forward"], "backward": r["backward"] / pd["backward"],
                          "step": r["step"] / (pd["forward"] + pd["backward"])} for m, r in raw.items()}}


def scenario_costs(method: str, K: int, scale: dict):
    from pipenag.wallclock import StageCosts

    s = scale["gpipe" if method in SYNC else method]  # the synchronous schedules share gpipe's modules and AdamW
    f, b = F_MS / 1e3 * s["forward"], B_MS / 1e3 * s["backward"]
    step = (F_MS + B_MS) / 1e3 * s["step"]
    return StageCosts((f,) * K, (b,) * K, (step,) * K, 1, "scenario")


def scenario_depths(K: int, latency_ms: float, bandwidth_mbps: float, compressed: bool) -> tuple[int, ...]:
    """What pipeline.in_flight = "auto" plans for the scenario's passes and messages (kept in
    DATA/depths.json: the planner's search takes minutes at K = 32)."""
    path = DATA / "depths.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    key = f"K={K} latency_ms={latency_ms:g} bandwidth_mbps={bandwidth_mbps:g} int8={compressed}"
    if key not in saved:
        saved[key] = list(_plan_depths(K, latency_ms, bandwidth_mbps, compressed))
        DATA.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1) + "\n")
    return tuple(saved[key])


def _plan_depths(K: int, latency_ms: float, bandwidth_mbps: float, compressed: bool) -> tuple[int, ...]:
    from pipenag.config import load_config
    from pipenag.link.messages import link_times, message_bytes
    from pipenag.schedules import default_in_flight
    from pipenag.timing import plan_in_flight

    if latency_ms == 0 and bandwidth_mbps == 0:
        return default_in_flight(K)
    cfg = load_config(None, SHAPE + (INT8 if compressed else []) +
                      [f"--link.latency_ms={latency_ms}", f"--link.bandwidth_mbps={bandwidth_mbps}"])
    latency, fwd = link_times(cfg, message_bytes(cfg, "activation"))
    _, bwd = link_times(cfg, message_bytes(cfg, "gradient"))
    return plan_in_flight("pipedream", K, 1, F_MS / 1e3, B_MS / 1e3, latency, fwd, backward_transfer_time=bwd)


def seconds_per_microbatch(method: str, schedule: str, K: int, M: int, link: tuple, depths: tuple[int, ...],
                           scale: dict) -> float:
    from pipenag.config import load_config
    from pipenag.wallclock import predict

    _, latency, bandwidth = link
    args = SHAPE + (INT8 if latency or bandwidth else []) + [
        f"--link.latency_ms={latency}", f"--link.bandwidth_mbps={bandwidth}", f"--pipeline.num_stages={K}",
        f"--pipeline.method={method}", f"--pipeline.schedule={schedule}", f"--model.n_layer={K}",
        f"--train.steps={400 + 3 * max(depths, default=0)}"]  # the steady state lies past the fill of the deepest stage
    if schedule in SYNC:
        args.append(f"--pipeline.num_microbatches={M}")
    else:
        args.append("--pipeline.in_flight=" + ",".join(map(str, depths)))
    cfg = load_config(None, args)
    return predict(cfg, scenario_costs(method, K, scale)).steady_s_per_update / M


# -- losses ---------------------------------------------------------------------------------------


ALL_TABLES = "## All tables"
LOWER_TARGETS = (1.75, 1.70, 1.65, 1.60)
IDENT = ("method", "stages", "M", "in_flight", "codec", "seed", "lr", "budget")


def collect(runs_root: Path) -> None:
    """Add the finished loss runs of every sweep under runs_root/sl_* (sl_k8, sl_sync, sl_k8_long,
    sl_k4none, ...) to DATA's files: a run replaces the data of the same run (IDENT) already
    there, and the rest are kept (their run folders may be gone: they were made in other
    sessions)."""
    from paired_runs import machine_key
    from pipenag.metrics import read_metrics

    rows, curves = [], []
    for sweep in sorted(runs_root.glob("sl_*")):
        for path in sorted((sweep / "runs").glob("**/summary.json")):
            folder = path.parent
            summary = json.loads(path.read_text())
            config = json.loads((folder / "config.json").read_text())
            if summary.get("status") != "ok":
                continue
            p = config["pipeline"]
            codec = config["link"]["compress_activations"]
            row = {"method": p["method"], "stages": p["num_stages"], "M": summary.get("microbatches_per_update")
                   or p["num_microbatches"] or 1, "in_flight": p["in_flight"] if isinstance(p["in_flight"], str)
                   else ",".join(map(str, p["in_flight"])), "codec": codec, "seed": config["train"]["seed"],
                   "lr": config["optim"]["lr"], "val_loss": summary["val_loss"], "tokens": summary["tokens"],
                   "budget": summary["tokens"],
                   "wall_time_s": summary["wall_time_s"], "machine": machine_key(summary.get("machine"))}
            rows.append(row)
            for r in read_metrics(folder):
                if r.get("val_loss") is not None:
                    curves.append({**{k: row[k] for k in ("method", "stages", "M", "in_flight", "codec", "seed", "lr")},
                                   "budget": row["budget"],
                                   "tokens": r["tokens"], "val_loss": r["val_loss"]})
    added = len(rows)
    new = {tuple(str(r[k]) for k in IDENT) for r in rows}
    if (DATA / "runs.csv").is_file():
        for file, data in (("runs.csv", rows), ("curves.csv", curves)):
            with open(DATA / file, newline="") as f:
                data[:0] = [r for r in csv.DictReader(f) if tuple(r[k] for k in IDENT) not in new]
    DATA.mkdir(parents=True, exist_ok=True)
    for file, data in (("runs.csv", rows), ("curves.csv", curves)):
        with open(DATA / file, "w", newline="") as f:
            # (rows written before the machine was recorded have none: an earlier host's)
            w = csv.DictWriter(f, fieldnames=list(max(data, key=len)), restval="")
            w.writeheader()
            w.writerows(data)
    print(f"{added} runs added, {len(rows) - added} kept -> {DATA}")


def read_losses() -> list[dict]:
    """Loss runs, each {key..., seed, val_loss, curve: [(tokens, val_loss)]}: this page's runs,
    plus the uncompressed K = 8 runs at the default depths of docs/results/compression.md and,
    for muon-wp-ef, of the corrections (the link-free row)."""
    runs = {}

    def add(key: tuple, seed: int, val_loss: float, curve_rows) -> None:
        runs[key + (seed,)] = {"key": key, "seed": seed, "val_loss": val_loss,
                               "curve": sorted((int(c["tokens"]), float(c["val_loss"])) for c in curve_rows)}

    def read(path: Path) -> list[dict]:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    if (DATA / "runs.csv").is_file():
        curves = read(DATA / "curves.csv")
        rows = read(DATA / "runs.csv")
        # Where a setting has runs of a recorded machine, the runs of earlier hosts (no machine
        # recorded) are left out: two hosts give different runs, so their seeds do not mix.
        recorded = {tuple(r[k] for k in IDENT if k != "seed") for r in rows if r.get("machine")}
        rows = [r for r in rows if r.get("machine") or tuple(r[k] for k in IDENT if k != "seed") not in recorded]
        for r in rows:
            key = (r["method"], int(r["stages"]), int(r["M"]), r["in_flight"], r["codec"], float(r["lr"]), int(r["tokens"]))
            add(key, int(r["seed"]), float(r["val_loss"]), [c for c in curves if all(c[k] == r[k] for k in IDENT)])
    comp = Path("docs/results/data/compression/k8")
    if comp.is_dir():
        curves = read(comp / "curves.csv")
        for r in read(comp / "runs.csv"):
            method, *overrides = r["method"].split(":")
            if method in ASYNC and "link.compress_activations=none" in overrides:
                key = (method, int(r["stages"]), 1, "", "none", 3e-3, BUDGET)
                add(key, int(r["seed"]), float(r["val_loss"]),
                    [c for c in curves if c["method"] == r["method"] and c["seed"] == r["seed"]])
    ef = Path("docs/results/data/corrections/k8w")  # muon-wp-ef at K = 8, the default depths (machine a)
    if ef.is_dir():
        curves = read(ef / "curves.csv")
        for r in read(ef / "runs.csv"):
            add(("muon-wp-ef", int(r["stages"]), 1, "", "none", 3e-3, BUDGET), int(r["seed"]), float(r["val_loss"]),
                [c for c in curves if c["method"] == r["method"] and c["seed"] == r["seed"]])
    return list(runs.values())


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    common = set.intersection(*(set(t for t, _ in r["curve"]) for r in runs))
    return [(t, statistics.fmean(dict(r["curve"])[t] for r in runs)) for t in sorted(common)]


def crossing(curve: list[tuple[int, float]], target: float):
    prev = None
    for t, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return float(t)
            return prev[0] + (prev[1] - target) / (prev[1] - v) * (t - prev[0])
        prev = (t, v)
    return None


def seconds_to(curve: list[tuple[int, float]], goal: float, spm: float):
    """Seconds to `goal` on a loss curve at spm seconds per microbatch (None: never reached)."""
    tt = crossing(curve, goal)
    return None if tt is None else tt / BENCH_TOKENS_PER_MICROBATCH * spm


def fastest_to(sync_rows: list[dict], goal: float):
    """(row, seconds) of the synchronous row that reaches `goal` first, or None."""
    reach = [(x, seconds_to(x["s"]["curve"], goal, x["spm"])) for x in sync_rows]
    reach = [(x, t) for x, t in reach if t is not None]
    return min(reach, key=lambda xt: xt[1]) if reach else None


def groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault(r["key"], []).append(r)
    return out


def summarize(members: list[dict]) -> dict:
    finals = [r["val_loss"] for r in members]
    return {"seeds": sorted(r["seed"] for r in members), "final": statistics.fmean(finals),
            "std": statistics.stdev(finals) if len(finals) > 1 else None, "curve": mean_curve(members)}


# -- the tables -----------------------------------------------------------------------------------


def sync_losses(by_key: dict) -> dict[tuple[str, int], dict]:
    """(method, M) -> the summary at the lr with the lowest mean final loss (seed 1 decides, as
    a tuning seed, when lrs have different seeds)."""
    best: dict[tuple[str, int], tuple[float, float, dict]] = {}
    for key, members in by_key.items():
        method, K, M, _, _, lr, budget = key
        # An M that does not divide the budget makes 2,000 // M updates (M = 32: 1,984 microbatches).
        per_update = M * BENCH_TOKENS_PER_MICROBATCH
        if method not in ("gpipe", "gpipe-muon") or K != 1 or budget != BUDGET // per_update * per_update:
            continue
        s = summarize(members)
        s["lr"] = lr
        s["lrs_tried"] = sorted(k[5] for k in by_key if k[:5] == key[:5] and k[6] == budget)
        seed1 = next((r["val_loss"] for r in members if r["seed"] == 1), s["final"])
        if (method, M) not in best or seed1 < best[(method, M)][0]:
            best[(method, M)] = (seed1, lr, s)
    return {k: v[2] for k, v in best.items()}


def _loss(s) -> str:
    if s is None:
        return "not run"
    return f"{s['final']:.4f}" + ("" if s["std"] is None else f" +- {s['std']:.4f}") + f" ({len(s['seeds'])})"


def _tokens(s, tt) -> str:
    return "n/a" if s is None else ("never" if tt is None else f"{tt / 1e3:.0f}k")


def _seconds(t) -> str:
    return "n/a" if t is None else f"{t:.0f} s"


def tables(scale: dict, optimizers: tuple[str, ...] = ("gpipe", "gpipe-muon"),
           lower_targets: tuple[float, ...] = LOWER_TARGETS) -> tuple[list[str], dict]:
    """The markdown of the tables, and the plot's points {(K, method): [(latency ms, ratio)]}.

    Args:
        scale: measure_costs()["scale"].
        optimizers: the synchronous methods that set the target and the reference ("gpipe" is
            AdamW, "gpipe-muon" Muon), each at every M it has runs for.
        lower_targets: losses below the target at which the longer runs are compared too.
    """
    by_key = groups(read_losses())
    sync = {k: v for k, v in sync_losses(by_key).items() if k[0] in optimizers}
    lines, plot, by_seed, lower = [], {}, [], []
    if not sync:
        return ["no synchronous runs yet"], plot
    target_key = min(sync, key=lambda k: sync[k]["final"])
    target = sync[target_key]["final"]
    lines += [f"Target: {target:.4f}, the final loss of {target_key[0]} at M = {target_key[1]} "
              f"(lr {sync[target_key]['lr']:g}): the best synchronous loss among {', '.join(optimizers)}.", "",
              "| synchronous method | M | lr (tried) | final loss (seeds) | tokens to target |", "|---|---|---|---|---|"]
    for (m, M), r in sorted(sync.items()):
        tried = ", ".join(f"{x:g}" for x in r["lrs_tried"])
        lines.append(f"| {m} | {M} | {r['lr']:g} ({tried}) | {_loss(r)} | {_tokens(r, crossing(r['curve'], target))} |")
    # Longer synchronous runs (at a tuned lr) are candidates for the reference too: a longer cosine
    # schedule may pass the target before its end.
    candidates = [((m, M, ""), r) for (m, M), r in sorted(sync.items())]
    for key, members in sorted(by_key.items()):
        method, K, M, _, _, lr, budget = key
        if method in optimizers and K == 1 and budget > BUDGET:
            r = {**summarize(members), "lr": lr}
            length = f", {budget // BENCH_TOKENS_PER_MICROBATCH:,} microbatches"
            candidates.append(((method, M, length), r))
            lines.append(f"| {method}{length} | {M} | {lr:g} | {_loss(r)} | {_tokens(r, crossing(r['curve'], target))} |")
    lines.append("")
    # The what-if of a cheap Muon step (a GPU's), for the asynchronous and the synchronous Muon alike.
    free_step = {**scale, **{m: {**scale[m], "step": scale["pipedream"]["step"]} for m in STARRED if m in scale}}
    if "gpipe-muon" in scale and "gpipe" in scale:
        free_step["gpipe-muon"] = {**scale["gpipe-muon"], "step": scale["gpipe"]["step"]}
    for K in (4, 8, 16, 32):
        lines += [f"### K = {K}", "",
                  "| link | method | schedule, M or depths | ms per microbatch | final loss (seeds) | tokens to target "
                  "| time to target | vs best synchronous |", "|---|---|---|---|---|---|---|---|"]
        for link in LINKS:
            name, latency, bandwidth = link
            compressed = bool(latency or bandwidth)
            def sync_rows_at(costs: dict, star: str) -> list[dict]:
                rows = []
                for (method, M, length), r in candidates:
                    if M not in sync_ms(K) and M != 4:
                        continue
                    for sched in SYNC:
                        spm = seconds_per_microbatch(sched if method == "gpipe" else method, sched, K, M, link, (), costs)
                        tt = crossing(r["curve"], target)
                        label = (f"{method}{star if method == 'gpipe-muon' else ''}" + (f" on {sched}" if sched != "gpipe" else "")
                                 + length)
                        rows.append({"label": label, "M": M, "spm": spm, "s": r, "tt": tt,
                                     "t": None if tt is None else tt / BENCH_TOKENS_PER_MICROBATCH * spm})
                return rows

            sync_rows = sync_rows_at(scale, "")
            reaching = [r for r in sync_rows if r["t"] is not None]
            best = min(reaching, key=lambda r: r["t"]) if reaching else None
            fastest = min(sync_rows, key=lambda r: r["spm"])
            ref_t = best["t"] if best else None
            # The reference of the starred (cheap Muon step) rows: the synchronous rows with the same what-if.
            reaching_star = [r for r in sync_rows_at(free_step, "*") if r["t"] is not None]
            best_star = min(reaching_star, key=lambda r: r["t"]) if reaching_star else None
            ref_t_star = best_star["t"] if best_star else None
            if best_star is not None and best is not None and best_star["t"] == best["t"]:
                best_star = None  # the what-if changes nothing: no row of its own
            for label, r in (("best synchronous", best), ("best synchronous, what-if", best_star),
                             ("fastest synchronous per token", fastest)):
                if r is None or (label == "fastest synchronous per token" and r is best):
                    continue
                ratio = "1.00x" if r is best else ("1.00x (for the * rows)" if r is best_star else "n/a")
                lines.append(f"| {name} | {label}: {r['label']} | M = {r['M']} | {r['spm'] * 1e3:.1f} | {_loss(r['s'])} | "
                             f"{_tokens(r['s'], r['tt'])} | {_seconds(r['t'])} | {ratio} |")
            depths = scenario_depths(K, latency, bandwidth, compressed)
            cells = [(m, BUDGET) for m in ASYNC if m in scale] + [(m + "*", BUDGET) for m in STARRED if m in scale]
            long = sorted({(k[0], k[6]) for k in by_key if k[1] == K and k[6] > BUDGET and k[0] in ASYNC
                           and k[3] == (",".join(map(str, depths)) if compressed else "")})
            cells += [c for m, b in long for c in ([(m, b), (m + "*", b)] if m in STARRED else [(m, b)])]
            for method, budget in cells:
                base = method.rstrip("*")
                spm = seconds_per_microbatch(base, "pipedream", K, 1, link, depths, free_step if method != base else scale)
                key = (base, K, 1, ",".join(map(str, depths)) if compressed else "", "int8" if compressed else "none",
                       3e-3, budget)
                if budget != BUDGET:
                    method = f"{method}, {budget // BENCH_TOKENS_PER_MICROBATCH:,} microbatches"
                r = summarize(by_key[key]) if key in by_key else None
                tt = crossing(r["curve"], target) if r else None
                t = None if tt is None else tt / BENCH_TOKENS_PER_MICROBATCH * spm
                if r is None:
                    ratio = "loss not measured"
                elif t is None:
                    ratio = "never"
                else:
                    ref = ref_t_star if "*" in method else ref_t
                    ratio = f"{t / ref:.2f}x" if ref else "n/a"
                    plot.setdefault((K, method), []).append((latency, t / ref))
                shown = list(depths) if K <= 8 else f"[{depths[0]}, {depths[1]}, ..., {depths[-1]}]"
                lines.append(f"| {name} | {method} | {shown} | {spm * 1e3:.1f} | {_loss(r)} | {_tokens(r, tt)} | "
                             f"{_seconds(t)} | {ratio} |")
                if budget == BUDGET or r is None:
                    continue
                for goal in lower_targets if "*" not in method else ():
                    # Lower targets than the synchronous bench loss: the fastest synchronous run to each
                    # (longer synchronous runs included) against this run's seed-mean curve.
                    ref_g = fastest_to(sync_rows, goal)
                    t_g = seconds_to(r["curve"], goal, spm)
                    ref_label = "none reaches it" if ref_g is None else f"{ref_g[0]['label']}, M = {ref_g[0]['M']}"
                    ratio_g = "n/a" if t_g is None or ref_g is None else f"{t_g / ref_g[1]:.2f}x"
                    lower.append(f"| {K} | {name} | {goal:.2f} | {method} | {_seconds(t_g)} | {ref_label} | "
                                 f"{_seconds(ref_g[1] if ref_g else None)} | {ratio_g} |")
                ref = ref_t_star if "*" in method else ref_t  # the longer runs seed by seed, against the same reference
                for run in sorted(by_key[key], key=lambda x: x["seed"]):
                    tt_s = crossing(run["curve"], target)
                    t_s = seconds_to(run["curve"], target, spm)
                    by_seed.append(f"| {K} | {name} | {method} | {run['seed']} | {run['val_loss']:.4f} | "
                                   f"{'never' if tt_s is None else f'{tt_s / BENCH_TOKENS_PER_MICROBATCH:,.0f}'} | "
                                   f"{_seconds(t_s)} | {_seconds(ref)} | "
                                   f"{'never' if t_s is None or not ref else f'{t_s / ref:.2f}x'} |")
        lines.append("")
    if lower:
        lines += ["### Lower targets", "",
                  "The longer asynchronous runs against the fastest synchronous schedule to each loss, longer "
                  "synchronous runs included.", "",
                  "| K | link | target | method | time | fastest synchronous | its time | ratio |",
                  "|---|---|---|---|---|---|---|---|", *lower, ""]
    if by_seed:
        lines += ["### The longer runs, seed by seed", "",
                  f"Each seed's microbatches to the target ({target:.4f}, the synchronous seed mean) and its time, "
                  "against the best synchronous schedule's time on that link.", "",
                  "| K | link | method | seed | final loss | microbatches to target | time to target "
                  "| best synchronous | ratio |", "|---|---|---|---|---|---|---|---|---|", *by_seed, ""]
    muon_step = scale["muon-wp"]["step"]
    lines.append(f"muon-wp*: muon-wp with its optimizer step at AdamW's measured cost (the Newton-Schulz step of "
                 f"torch's Muon costs {muon_step / scale['pipedream']['step']:.1f}x AdamW's in costs.json, "
                 f"{muon_step:.2f}x a forward + backward of a stage; on a GPU it is a few percent of a pass): a "
                 "what-if, not a measurement. Its ratio is to the best synchronous schedule under the same what-if "
                 "(gpipe-muon* with its step at gpipe's cost), when that one is faster.")
    return lines, plot


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", metavar="RUNS", help="copy the finished runs under RUNS/sl_k8 and RUNS/sl_sync")
    parser.add_argument("--costs", action="store_true", help="measure the per-method cost scales again")
    args = parser.parse_args(argv)
    if args.collect:
        collect(Path(args.collect))
    costs_file = DATA / "costs.json"
    if args.costs or not costs_file.is_file():
        DATA.mkdir(parents=True, exist_ok=True)
        costs_file.write_text(json.dumps(measure_costs(), indent=1) + "\n")
    scale = json.loads(costs_file.read_text())["scale"]
    lines, plot = tables(scale)
    adam_lines, adam_plot = tables(scale, ("gpipe",), ())
    lines += ["", "## Against AdamW's synchronous schedules only (the convergence benchmark's reference)", "",
              *adam_lines]
    (DATA / "tables.md").write_text("\n".join(lines) + "\n")
    page = Path("docs/results/slow_links.md")  # its last section, "## All tables", is these tables
    text = page.read_text() if page.is_file() else ""
    if ALL_TABLES in text:
        page.write_text(text[:text.index(ALL_TABLES) + len(ALL_TABLES)] + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    if plot or adam_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, points_of, title in ((axes[0], plot, "target: the best synchronous loss (gpipe-muon)"),
                                     (axes[1], adam_plot, "target: AdamW's synchronous loss (gpipe)")):
            for (K, method), points in sorted(points_of.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=f"{method}, K = {K}")
            ax.axhline(1.0, color="k", lw=0.8, ls="--", label="best synchronous")
            ax.set_yscale("log")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("link latency (ms; bandwidth as in the table)")
            ax.set_ylabel("time to target / best synchronous")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig("docs/results/slow_links.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
