"""Start the dist engine: K local worker processes, or this process as one of torchrun's.

    pipenag train --config configs/tiny.toml --engine dist --out runs/d
    torchrun --nproc-per-node 4 -m pipenag train --config configs/tiny.toml --engine dist --out runs/d

Under torchrun (RANK and WORLD_SIZE are set) this process is a worker. Otherwise it is the
launcher: it starts pipeline.num_stages workers (`python -m pipenag.runtime.worker`) with the
variables torchrun would set, watches them, and returns 0 when all finished. When one fails
(an error, a signal, or a neighbour that stopped answering for dist.timeout_s), the launcher
names the stage that failed first, kills the others and reaps every child; then it starts the
group again from the newest complete checkpoint (dist.max_restarts times at most) or returns 1.
Under torchrun, `--max-restarts N` with train.resume="auto" does the same.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipenag.checkpoint import CheckpointStore, stage_part
from pipenag.config import Config
from pipenag.run import check_same_run, log_event, preflight, resume_mode
from pipenag.runtime.torch_pipelining import check_supported
from pipenag.runtime.worker import (CONFIG_ENV, ERRDIR_ENV, EXIT_DIVERGED, EXIT_PEER, PARENT_ENV, RESUME_ENV,
                                 DistEnv, run_worker)

POLL_S = 0.05
SETTLE_S = 0.5  # after the first failure, how long to collect the others before blaming one
KILL_GRACE_S = 1.0  # SIGTERM, then SIGKILL after this


def train_dist(cfg: Config, resume: bool = False, start_method: Optional[str] = None) -> int:
    """`pipenag train` with train.engine = "dist"; returns the exit status. With
    dist.max_restarts > 0 a failed group is started again from its newest complete checkpoint.

    Args:
        cfg: the run's config.
        resume: continue from the newest update with a checkpoint from every stage.
        start_method: how the local launcher starts workers, "spawn" or "fork" (see
            launch_local); None: fork with a CPU-only build of torch (no CUDA to inherit, and
            the workers skip seconds of imports each), else spawn.

    Raises:
        ValueError: a bad config, or --resume without a checkpoint from every stage.
    """
    from pipenag.compare import apply_microbatch_budget

    cfg = apply_microbatch_budget(cfg)  # a budget in microbatches means the same here as in `pipenag train`
    env = DistEnv.from_env()
    if env is not None:
        return run_worker(cfg, resume, env)
    K = preflight(cfg).schedule.num_stages
    check_supported(cfg)
    store = CheckpointStore(cfg.run.out_dir, [stage_part(k) for k in range(K)])
    if resume_mode(cfg, resume) == "auto":
        check_same_run(cfg)
    if resume_mode(cfg, resume) != "no":
        # Refuse a damaged or unsafe set here, before any worker starts (the workers load the
        # set they agree on weights-only again, and warn about damaged files themselves).
        update = store.newest_verified_set(warn=lambda message: None)
        if update is None and resume:
            raise ValueError(f"--resume {cfg.run.out_dir!r}: {store.missing_reason()}")
        if update is not None:
            store.check_loadable(update)
    if start_method is None:
        import torch

        cpu_only = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
        start_method = "fork" if cpu_only and sys.platform.startswith("linux") else "spawn"
    if start_method == "fork":
        # Import once what every worker needs, so that the forks share it: torch.optim's
        # constructors import torch._dynamo, seconds per process otherwise.
        import torch._dynamo  # noqa: F401

        import pipenag.build  # noqa: F401
        import pipenag.data.batches  # noqa: F401
        if cfg.dist.sync_executor == "torch":
            import torch.distributed.pipelining  # noqa: F401
    return _run_with_restarts(cfg, resume, K, store, start_method)


def _run_with_restarts(cfg: Config, resume: bool, K: int, store: CheckpointStore, start_method: str) -> int:
    """Launch the K workers; after a failure (not a diverged loss), launch them again with
    train.resume="auto" up to dist.max_restarts times. Every failure goes to events.jsonl."""
    out = Path(cfg.run.out_dir)
    failures: list[dict] = []
    for attempt in range(cfg.dist.max_restarts + 1):
        run_cfg = cfg if attempt == 0 else cfg.with_overrides(["--train.resume=auto"])
        extra = {CONFIG_ENV: json.dumps(run_cfg.to_dict()), RESUME_ENV: "1" if resume and attempt == 0 else "0"}
        failure: dict = {}
        rc = launch_local("pipenag.runtime.worker", [], K, extra, master_port=cfg.dist.master_port,
                          prog="pipenag train", start_method=start_method, on_failure=failure.update)
        if rc == 0 or not failure:
            return rc
        failure["last_update"] = _last_recorded_update(out)
        failures.append(failure)
        log_event(out, {"event": "failure", "attempt": attempt + 1, **failure})
        if failure["exit_status"] == EXIT_DIVERGED or attempt == cfg.dist.max_restarts:
            break
        complete = store.complete_updates()
        since = f"the checkpoint of update {complete[-1]}" if complete else "the start (no complete checkpoint)"
        print(f"pipenag train: {failure['cause']} (after update {failure['last_update']}); restarting "
              f"({attempt + 1} of {cfg.dist.max_restarts}) from {since}", file=sys.stderr, flush=True)
    message = failures[-1]["cause"]
    if len(failures) > 1:
        earlier = "; ".join(f"attempt {i + 1}: {f['cause']}" for i, f in enumerate(failures[:-1]))
        message += f" (after {len(failures) - 1} restart(s); earlier failures: {earlier})"
    print(f"pipenag train: error: {message}", file=sys.stderr, flush=True)
    return 1


def _last_recorded_update(out: Path) -> int:
    """The last update in the run's metrics.jsonl (0 if none)."""
    from pipenag.metrics import read_metrics

    try:
        records = read_metrics(out)
    except ValueError:  # a line cut short by the kill
        return 0
    return records[-1]["step"] if records else 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(module: str, args: Sequence[str], num_procs: int, extra_env: dict,
                 master_port: int = 0, prog: str = "pipenag",
                 describe: Callable[[int], str] = lambda r: f"stage {r}", start_method: str = "spawn",
                 on_failure: Optional[Callable[[dict], None]] = None) -> int:
    """Run `module.main(args)` in `num_procs` processes, as torchrun would on one machine.

    Args:
        module: a module with main(argv) (and `if __name__ == "__main__": main(sys.argv[1:])`).
        args: its arguments.
        num_procs: processes (ranks 0 .. num_procs-1).
        extra_env: more environment variables for every process.
        master_port: rendezvous port on 127.0.0.1 (0: a free one).
        prog: prefix of the error line.
        describe: rank -> words for messages.
        start_method: "spawn": `python -m module args` (a fresh interpreter, like torchrun);
            "fork": a fork of this process that calls module.main(args), which skips importing
            torch again (seconds per process). Fork only from a process that has not started
            CUDA or a thread pool; tests and the pipeline benchmark use it on CPU.
        on_failure: called with the failure (stage: the rank blamed first, exit_status, cause:
            one line naming it and the others) instead of printing the error line.
    Returns:
        0 when every process exited with 0, else 1 (after reporting which one failed).
    """
    if start_method not in ("spawn", "fork"):
        raise ValueError(f"start_method={start_method!r}: must be 'spawn' or 'fork'")
    port = master_port or free_port()
    errdir = tempfile.mkdtemp(prefix="pipenag-dist-")
    root = str(Path(__file__).resolve().parents[2])  # so children import this same pipenag
    base = dict(extra_env)
    base.update(WORLD_SIZE=str(num_procs), LOCAL_WORLD_SIZE=str(num_procs), GROUP_RANK="0",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{ERRDIR_ENV: errdir, PARENT_ENV: str(os.getpid())})
    procs: list = []
    previous = _on_sigterm_exit()
    try:
        if start_method == "fork":
            importlib.import_module(module)
            sys.stdout.flush()
            sys.stderr.flush()
            ctx = multiprocessing.get_context("fork")
        for rank in range(num_procs):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            if start_method == "fork":
                proc = ctx.Process(target=_forked_main, args=(module, list(args), env), daemon=False,
                                   name=f"pipenag-{describe(rank)}")
                proc.start()
                procs.append(_Forked(proc))
            else:
                full = dict(os.environ, **env)
                full["PYTHONPATH"] = root + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
                procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=full))
        failure = _supervise(procs, errdir, describe)
        if failure is None:
            return 0
        if on_failure is not None:
            on_failure(failure)
        else:
            print(f"{prog}: error: {failure['cause']}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; stopping the workers", file=sys.stderr, flush=True)
        return 130
    finally:
        stop_all(procs)
        shutil.rmtree(errdir, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _forked_main(module: str, args: list, env: dict) -> None:
    os.environ.update(env)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the launcher's handler
    code = importlib.import_module(module).main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


class _Forked:
    """A multiprocessing.Process with the Popen methods the supervisor uses."""

    def __init__(self, proc):
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.exitcode

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: Optional[float] = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.proc.name, timeout)
        return self.proc.exitcode


def _on_sigterm_exit():
    """Turn SIGTERM into SystemExit so that the launcher's cleanup runs; returns the old handler."""
    try:
        return signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread
        return None


def _supervise(procs: list, errdir: str, describe: Callable[[int], str]) -> Optional[dict]:
    """Wait until every process ended well (None) or one failed: then the failure (stage
    blamed first, its exit status, and a line naming it and the others)."""
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return None
        if any(c not in (None, 0) for c in codes):
            break
        time.sleep(POLL_S)
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    codes = [p.poll() for p in procs]
    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    reports = {r: _report(errdir, r) for r in failed}
    running = {r for r, c in enumerate(codes) if c is None}

    def blame(r: int) -> tuple:
        # First a process that failed on its own (a signal, an error); then one whose
        # neighbour is still running (hung or silent: a stage that is only starved fails too,
        # and a report naming it is one hop off); among those, a receive timeout before a lost
        # connection, the earliest first; then the lowest rank.
        report = reports[r]
        timed_out = bool(report.get("timed_out"))
        return (codes[r] == EXIT_PEER, report.get("peer_stage") not in running, not timed_out,
                report.get("time", 0.0) if timed_out else 0.0, r)

    failed.sort(key=blame)
    first = failed[0]
    msg = _reason(first, codes[first], reports[first], describe)
    others = [describe(r) for r in failed[1:]]
    if others:
        msg += f"; then {', '.join(others)} failed"
    if running:
        msg += f"; stopping {', '.join(describe(r) for r in sorted(running))}"
    # The stage at fault: for a timeout, the neighbour that stopped sending, not the reporter.
    stage = reports[first]["peer_stage"] if codes[first] == EXIT_PEER and reports[first].get("timed_out") else first
    return {"stage": stage, "exit_status": codes[first], "cause": msg}


def _report(errdir: str, rank: int) -> dict:
    path = Path(errdir, f"rank{rank}.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _reason(rank: int, code: int, report: dict, describe: Callable[[int], str]) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"{describe(rank)} was killed by {name}"
    if report.get("message"):
        return f"{report['message']} (exit status {code})"
    return f"{describe(rank)} exited with status {code}"


def stop_all(procs: Sequence[subprocess.Popen], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM every live process, SIGKILL those alive after `grace_s`, and reap them all."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
