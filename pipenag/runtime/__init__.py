"""The multi-process runtime: one process per pipeline stage, point-to-point messages.

    pipenag train --config configs/tiny.toml --engine dist --out runs/d

- launch: the local launcher (K worker processes) and the torchrun entry;
- worker: one stage's training process (data, model, and pipenag.run's Recorder for its
  checkpoints, metrics and summary);
- executor: runs a stage's action list (pipenag.schedules) against any stage object;
- comm: the channels between neighbour stages (early receives, link emulation, timeouts);
- torch_pipelining: gpipe, 1f1b and zb-h1 on torch.distributed.pipelining (--dist.sync_executor=torch).

See docs/dist.md.
"""
