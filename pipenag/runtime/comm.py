"""Point-to-point transport between neighbour stages: early receives, non-blocking sends, an
emulated slow link, and failures that name the stage.

    python -m pytest tests/test_dist.py -q -x

Each direction of each link (stage i -> i+1 for activations, i+1 -> i for gradients) is a FIFO
channel with its own two-rank process group. Both ends know the channel's whole message sequence
in advance: it follows from the sender's program (pipenag.runtime.executor.outgoing_keys), which
every rank can compute from the schedule. So

- the receiver posts its receives in the sender's order, ahead of need (`window` at a time,
  more when it needs a later message first), and message i carries tag i: gloo matches by tag,
  NCCL (which ignores tags) by order, and one group per direction keeps NCCL's in-order streams
  from deadlocking a send behind a receive;
- a send is an isend whose completion is only awaited when too many are outstanding, or at the
  end, so the sender goes on computing.

With a codec (pipenag.link.codec, per direction) the sender encodes each tensor and sends the
packed bytes (integers and scales); the receiver's buffers are those bytes, decoded on receipt:
what travels is the compressed size, and the link emulation charges that size.

With a link model (latency, bandwidth) a sender thread per channel releases each message at the
time it would arrive over that link: it leaves when the link is free, occupies it for
bytes * 8 / bandwidth seconds and arrives `latency` later (the same model as
pipenag.timing.simulate). The compute thread never waits for the emulated network.

A receive that fails (the peer's process died, the connection closed) or that does not complete
within `timeout_s` raises PeerFailure with a message that names both stages and the message.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Hashable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

TAG_MASK = 0x7FFFFFFF  # tags are the message's position in its channel, kept in 31 bits


class PeerFailure(RuntimeError):
    """A neighbour stage died, closed its connection or stopped answering.

    Args:
        message: what happened, naming both stages.
        peer_stage: the neighbour that failed.
        timed_out: the neighbour sent nothing for the timeout (hung or silent), as opposed to
            a closed connection; the launcher blames such a neighbour first.
    """

    def __init__(self, message: str, peer_stage: int, timed_out: bool = False):
        super().__init__(message)
        self.peer_stage = peer_stage
        self.timed_out = timed_out


@dataclass(frozen=True)
class LinkModel:
    """An emulated network link between neighbour stages (one per direction).

    Args:
        latency_s: one-way latency added to every message.
        bandwidth_bps: bits per second (0: unlimited).
    """

    latency_s: float = 0.0
    bandwidth_bps: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.bandwidth_bps < 0:
            raise ValueError(f"latency_s={self.latency_s}, bandwidth_bps={self.bandwidth_bps}: must be >= 0")

    @classmethod
    def from_config(cls, latency_ms: float, bandwidth_mbps: float) -> "LinkModel":
        return cls(latency_ms / 1e3, bandwidth_mbps * 1e6)

    @property
    def active(self) -> bool:
        return self.latency_s > 0 or self.bandwidth_bps > 0

    def transfer_s(self, num_bytes: int) -> float:
        """Seconds a message of `num_bytes` occupies the link."""
        return num_bytes * 8 / self.bandwidth_bps if self.bandwidth_bps > 0 else 0.0


def describe_key(key: Hashable) -> str:
    """Human words for a message key of pipenag.runtime.executor."""
    if isinstance(key, tuple) and key and key[0] == "F":
        return f"the activation of microbatch {key[1]}"
    if isinstance(key, tuple) and key and key[0] == "B":
        return f"the gradient of microbatch {key[1]}"
    if isinstance(key, tuple) and key and key[0] == "E":
        return f"validation activation {key[2]} of update {key[1]}"
    return f"message {key!r}"


def make_link_groups(num_stages: int) -> list[tuple]:
    """Two process groups per link (i, i+1): (activations i -> i+1, gradients i+1 -> i).

    Every rank of the default group must call this, in the same order. Rank r runs stage r.
    """
    groups = []
    for i in range(num_stages - 1):
        groups.append((dist.new_group([i, i + 1]), dist.new_group([i, i + 1])))
    return groups


def _wait(work, timeout_s: Optional[float]) -> None:
    if timeout_s is None:
        work.wait()
    else:
        work.wait(timedelta(seconds=timeout_s))


class Sender:
    """The sending end of one channel.

    Args:
        group: the channel's process group.
        dst: the receiver's global rank.
        stage_idx, peer_stage: this stage and the receiver's (for messages).
        link: the emulated link (inactive: send right away).
        timeout_s: how long to wait for one send to complete (None: the group's timeout).
        max_pending: sends left outstanding before the oldest is awaited.
        codec: a pipenag.link codec: the packed bytes travel instead of the tensor (None: the
            tensor as it is).
        wire_device: where the backend takes its tensors (None: where they are); a tensor
            elsewhere is encoded where it is, then copied there.
    """

    def __init__(self, group, dst: int, stage_idx: int, peer_stage: int, link: LinkModel,
                 timeout_s: Optional[float], max_pending: int = 8, codec=None,
                 wire_device: Optional[torch.device] = None):
        self.group, self.dst = group, dst
        self.codec = codec
        self.wire_device = wire_device
        self.bytes_sent = 0
        self.messages_sent = 0
        self.stage_idx, self.peer_stage = stage_idx, peer_stage
        self.link, self.timeout_s = link, timeout_s
        self.max_pending = max(1, max_pending)
        self._seq = 0
        self._works: deque = deque()
        self._error: Optional[BaseException] = None
        self._link_free = 0.0
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        if link.active:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._release_loop, daemon=True,
                                            name=f"pipenag-link-{stage_idx}-{peer_stage}")
            self._thread.start()

    def send(self, tensor: torch.Tensor) -> None:
        """Send the next message of the channel; returns without waiting for the transfer."""
        if self._error is not None:
            raise self._error
        tag = self._seq & TAG_MASK
        self._seq += 1
        tensor = self.codec.encode(tensor) if self.codec is not None else tensor.contiguous()
        if self.wire_device is not None and tensor.device != self.wire_device:
            tensor = tensor.to(self.wire_device)
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.messages_sent += 1
        if self._queue is None:
            self._isend(tensor, tag)
            return
        now = time.perf_counter()
        leave = max(now, self._link_free)
        self._link_free = leave + self.link.transfer_s(tensor.numel() * tensor.element_size())
        self._queue.put((self._link_free + self.link.latency_s, tensor, tag))

    def _isend(self, tensor: torch.Tensor, tag: int) -> None:
        try:
            self._works.append(dist.isend(tensor, self.dst, group=self.group, tag=tag))
        except RuntimeError as e:  # the connection is already gone
            raise PeerFailure(f"stage {self.stage_idx}: lost stage {self.peer_stage}: sending to it failed "
                              f"({short_error(e)})", self.peer_stage) from None
        while len(self._works) > self.max_pending:
            self._wait_one()

    def _wait_one(self) -> None:
        work = self._works.popleft()
        try:
            _wait(work, self.timeout_s)
        except RuntimeError as e:
            # A sender that notices first names the lost peer as a receiver does (docs/dist.md).
            raise PeerFailure(f"stage {self.stage_idx}: lost stage {self.peer_stage}: sending to it failed "
                              f"({short_error(e)})", self.peer_stage) from None

    def _release_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            due, tensor, tag = item
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                self._isend(tensor, tag)
            except BaseException as e:  # reported to the compute thread on its next send/close
                self._error = e
                return

    def close(self) -> None:
        """Wait until every message has left (and the emulated link has released it)."""
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        while self._works:
            self._wait_one()


class Receiver:
    """The receiving end of one channel.

    Args:
        group, src: the channel's process group and the sender's global rank.
        stage_idx, peer_stage: this stage and the sender's (for messages).
        keys: the channel's message keys in the order the sender sends them.
        shape, dtype, device: of every message.
        window: receives kept posted ahead of need.
        timeout_s: how long to wait for one message (None: the group's timeout).
        codec: the sender's pipenag.link codec: the buffers hold its packed bytes, decoded on
            receipt into `shape` and `dtype` (None: the buffers are the tensors).
        wire_device: where the buffers live (None: `device`); each message is copied to
            `device` on receipt and decoded there.
    """

    def __init__(self, group, src: int, stage_idx: int, peer_stage: int, keys: Iterable[Hashable],
                 shape: Sequence[int], dtype: torch.dtype, device: torch.device, window: int,
                 timeout_s: Optional[float], codec=None, wire_device: Optional[torch.device] = None):
        self.group, self.src = group, src
        self.stage_idx, self.peer_stage = stage_idx, peer_stage
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.wire_device = device if wire_device is None else wire_device
        self.codec = codec
        numel = 1
        for n in self.shape:
            numel *= n
        # what one message is on the wire: the packed bytes, or the tensor itself
        self._wire = ((codec.packed_numel(numel),), torch.uint8) if codec is not None else (self.shape, dtype)
        self.window = max(1, window)
        self.timeout_s = timeout_s
        self._keys: Iterator[tuple[int, Hashable]] = enumerate(keys)
        self._posted: dict[Hashable, tuple[torch.Tensor, object]] = {}
        self.fill()

    def _post_next(self) -> bool:
        item = next(self._keys, None)
        if item is None:
            return False
        seq, key = item
        assert key not in self._posted, f"message key {key!r} twice in one channel"
        buf = torch.empty(self._wire[0], dtype=self._wire[1], device=self.wire_device)
        try:
            work = dist.irecv(buf, self.src, group=self.group, tag=seq & TAG_MASK)
        except RuntimeError as e:  # the connection is already gone
            raise PeerFailure(f"stage {self.stage_idx}: lost stage {self.peer_stage} ({short_error(e)})",
                              self.peer_stage) from None
        self._posted[key] = (buf, work)
        return True

    def fill(self) -> None:
        """Post receives until `window` are outstanding. Posting costs a notification to the
        sender (gloo), so the executor calls this after its own send, off the critical path."""
        while len(self._posted) < self.window and self._post_next():
            pass

    def recv(self, key: Hashable) -> torch.Tensor:
        """The message `key` (posting the receives up to it if they are not yet posted)."""
        while key not in self._posted:
            if not self._post_next():
                raise AssertionError(f"stage {self.stage_idx}: {describe_key(key)} is not in the "
                                     f"message sequence of stage {self.peer_stage}")
        buf, work = self._posted.pop(key)
        try:
            _wait(work, self.timeout_s)
        except RuntimeError as e:
            what = describe_key(key)
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                # Name the link, not only the peer: a peer that is alive but silent (its
                # process and connections up, its sends lost) looks exactly like this.
                direction = "activations" if self.peer_stage < self.stage_idx else "gradients"
                raise PeerFailure(f"stage {self.stage_idx}: stage {self.peer_stage} stopped answering: nothing on "
                                  f"the link stage {self.peer_stage} -> stage {self.stage_idx} ({direction}); {what} "
                                  f"did not arrive within {self.timeout_s:g} s", self.peer_stage,
                                  timed_out=True) from None
            raise PeerFailure(f"stage {self.stage_idx}: lost stage {self.peer_stage} while waiting "
                              f"for {what} ({short_error(e)})", self.peer_stage) from None
        if buf.device != self.device:
            buf = buf.to(self.device)
        if self.codec is not None:
            return self.codec.decode(buf, self.shape, self.dtype)
        return buf

    @property
    def num_posted(self) -> int:
        return len(self._posted)


def short_error(e: BaseException) -> str:
    """The gist of a c10d error: its first sentence, without the source location."""
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # "[.../pair.cc:553] Connection closed ..."
    return first.split(". ")[0][:200]


class Transport:
    """The (up to) four channels of one stage: activations in from the previous stage and out
    to the next, gradients in from the next and out to the previous.

    Args:
        stage_idx, num_stages: this stage and the pipeline length (rank == stage).
        groups: make_link_groups(num_stages).
        shape, dtype, device: of every activation and gradient, e.g. (B, T, n_embd) float32.
        link: the emulated link model.
        timeout_s: for one message (None: the process group's timeout).
        activation_codec, gradient_codec: pipenag.link codecs of the two directions (None:
            uncompressed); every stage must use the same ones.
        wire_device: where the backend takes its tensors (None: `device`): the CPU for gloo
            with stages on a GPU.
    """

    def __init__(self, stage_idx: int, num_stages: int, groups: list[tuple], shape: Sequence[int],
                 dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                 link: LinkModel = LinkModel(), timeout_s: Optional[float] = None,
                 activation_codec=None, gradient_codec=None, wire_device: Optional[torch.device] = None):
        self.activation_codec, self.gradient_codec = activation_codec, gradient_codec
        self.wire_device = wire_device
        if len(groups) != num_stages - 1:
            raise ValueError(f"groups: got {len(groups)} links for {num_stages} stages")
        self.stage_idx, self.num_stages = stage_idx, num_stages
        self.groups, self.shape, self.dtype, self.device = groups, tuple(shape), dtype, device
        self.link, self.timeout_s = link, timeout_s
        self.to_next: Optional[Sender] = None
        self.to_prev: Optional[Sender] = None
        self.from_prev: Optional[Receiver] = None
        self.from_next: Optional[Receiver] = None

    def open(self, keys_from_prev: Iterable[Hashable], keys_from_next: Iterable[Hashable],
             window: int = 4, max_pending: int = 8) -> None:
        """Create the channels and post the first receives.

        Args:
            keys_from_prev: the message keys the previous stage sends us, in its order.
            keys_from_next: the same for the next stage.
            window: receives kept posted ahead per incoming channel.
            max_pending: outstanding sends per outgoing channel before the oldest is awaited.
        """
        k, K = self.stage_idx, self.num_stages
        if k > 0:
            fwd, bwd = self.groups[k - 1]
            self.from_prev = Receiver(fwd, k - 1, k, k - 1, keys_from_prev, self.shape, self.dtype,
                                      self.device, window, self.timeout_s, self.activation_codec,
                                      self.wire_device)
            self.to_prev = Sender(bwd, k - 1, k, k - 1, self.link, self.timeout_s, max_pending,
                                  self.gradient_codec, self.wire_device)
        if k < K - 1:
            fwd, bwd = self.groups[k]
            self.from_next = Receiver(bwd, k + 1, k, k + 1, keys_from_next, self.shape, self.dtype,
                                      self.device, window, self.timeout_s, self.gradient_codec,
                                      self.wire_device)
            self.to_next = Sender(fwd, k + 1, k, k + 1, self.link, self.timeout_s, max_pending,
                                  self.activation_codec, self.wire_device)

    def refill(self) -> None:
        """Keep `window` receives posted on both incoming channels."""
        for receiver in (self.from_prev, self.from_next):
            if receiver is not None:
                receiver.fill()

    def close(self) -> None:
        """Wait for every outgoing message to leave."""
        for sender in (self.to_next, self.to_prev):
            if sender is not None:
                sender.close()

    def wire_stats(self) -> dict:
        """Bytes on the wire per message in each direction this stage sends (after its codec)
        and the ratio to the uncompressed message."""
        numel = 1
        for n in self.shape:
            numel *= n
        raw = numel * torch.empty((), dtype=self.dtype).element_size()
        out = {}
        for name, sender in (("activations", self.to_next), ("gradients", self.to_prev)):
            if sender is not None and sender.messages_sent:
                per = sender.bytes_sent / sender.messages_sent
                out[name] = {"messages": sender.messages_sent, "bytes_per_message": per,
                             "raw_bytes_per_message": raw, "ratio": raw / per,
                             "codec": sender.codec.name if sender.codec is not None else "none"}
        return out
