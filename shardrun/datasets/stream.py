"""Stream: one rank's batches of the global sample order, decoded ahead in the background.

A producer thread walks the plan for the partitions this rank owns, decodes the row groups of the
current shuffle window and the two after it on a small thread pool, and gathers the rows of several steps at
once (a chunk of about CHUNK_TOKENS tokens: per step, Python's overhead would outweigh the copying)
straight into int64 tensors; the queue holds chunks, about `prefetch_steps` steps but at least one
chunk. The loop takes micro-batches one by one; the position (epoch, samples taken from every
partition) advances only when a whole step has been taken, so a checkpoint saved between steps
resumes with exactly the next sample.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from shardrun import fs
from shardrun.config import DataSpec, check_partitions
from shardrun.datasets.index import DataIndex
from shardrun.datasets.plan import Plan
from shardrun.datasets.reader import IGNORE_INDEX, PAD, BadRowGroup, RowGroupReader, decode_rows
from shardrun.errors import DataStalled, UserError

POSITION_VERSION = 1
CHUNK_TOKENS = 1 << 19
"""Tokens the producer gathers in one go (tables: CHUNK_ROWS rows): per step, Python's overhead
outweighs the copying; the loop takes the steps of a chunk from the queue together."""
CHUNK_ROWS = 1024


def check_position(position: dict, spec: DataSpec, index: DataIndex) -> None:
    """A UserError when a checkpoint's data position cannot resume on this data and spec: another version of the
    stream, another seed, other files (their fingerprint), another partition count. The workers check it when
    they resume; the driver, before Ray, against the newest complete checkpoint's manifest."""
    if position.get("version") != POSITION_VERSION:
        raise UserError(f"the checkpoint's data position {position} is from another version of "
                        "shardrun's stream; start over with --fresh")
    if position["seed"] != spec.seed:
        raise UserError(f"data.seed is {spec.seed} but the checkpoint's stream used seed "
                        f"{position['seed']}; keep the seed to resume, or start over with --fresh")
    if position["fingerprint"] != index.fingerprint:
        raise UserError(
            f"the data changed: it now holds {index.rows} rows in {index.num_row_groups} "
            f"row groups, the checkpoint's {position['rows']} rows in {position['row_groups']}; "
            "resume on the same files, or start over with --fresh")
    if spec.partitions and spec.partitions != position["partitions"]:
        raise UserError(f"data.partitions is {spec.partitions} but the run started with "
                        f"{position['partitions']}; the partition count is fixed for a run")


class Stream:
    def __init__(self, spec: DataSpec, index: DataIndex, *, rank: int, world_size: int,
                 micro_batch_size: int, grad_accum_steps: int, position: dict | None = None,
                 device: str = "cpu", log=None, chunk_rows: int | None = None,
                 partitions: int | None = None, vocab_size: int | None = None, wait_timeout: float = 600.0):
        self.spec = spec
        self.index = index
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.device = torch.device(device)
        self._log = log or fs.log
        self.wait_timeout = wait_timeout
        """Seconds a row group's read may give nothing before the stream gives up (DataStalled); the producer
        meets it and hands it to next_batch like any error of its own."""
        self._stalled = False

        partitions = spec.partitions or partitions or world_size  # a new run's count; see JobSpec.partitions
        self.epoch, self.offset = 0, 0
        if position:  # the run's partition count is the one it started with
            partitions = self._check_position(position)
        check_partitions(partitions, world_size, self.global_batch)
        self.partitions = partitions
        self.per_partition = self.global_batch // partitions
        self.owned = list(range(rank, partitions, world_size))
        rows_per_step = self.per_partition * len(self.owned)
        if chunk_rows is None:
            chunk_rows = CHUNK_TOKENS // (spec.seq_len + 1) if spec.format == "tokens" else CHUNK_ROWS
        self._chunk_steps = max(1, chunk_rows // rows_per_step)
        self.plan = Plan(index.rg_rows, partitions=partitions, seed=spec.seed, window=spec.shuffle_window)
        if self.plan.steps_in_epoch(self.epoch, self.per_partition, self.offset) < 1 and self.offset == 0:
            raise UserError(self._too_small(self.epoch))

        self.reader = RowGroupReader(spec, index, vocab_size)
        self.skipped_row_groups: list[str] = []
        self.decoded: list[tuple[int, int]] = []
        """(epoch, row group) of every decode this rank started (tests check no two ranks share one)."""
        self.wait_seconds = 0.0
        """Time the loop spent waiting for data."""
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, spec.prefetch_steps // self._chunk_steps))
        self._pool = ThreadPoolExecutor(spec.read_threads, thread_name_prefix=f"shardrun-read{rank}")
        self._cache: dict[int, Future] = {}
        self._cache_lock = threading.Lock()
        self._stop = threading.Event()
        self._producer: threading.Thread | None = None
        self._current: list[dict[str, torch.Tensor]] = []
        self._current_position: tuple[int, int] | None = None
        self._ready: collections.deque = collections.deque()
        """Steps of the chunk taken from the queue that the loop has not begun."""
        self._step_bytes = 0
        self._step_has_pad = False
        self._padded: set[int] = set()

    # -- position --------------------------------------------------------------------------------

    def position(self) -> dict:
        """Where the next step starts: a small dict for the checkpoint."""
        if self._current:
            raise RuntimeError("the stream position is only defined between steps")
        return {"version": POSITION_VERSION, "seed": self.spec.seed, "partitions": self.partitions,
                "rows": self.index.rows, "row_groups": self.index.num_row_groups,
                "fingerprint": self.index.fingerprint, "epoch": self.epoch, "offset": self.offset}

    def _check_position(self, position: dict) -> int:
        check_position(position, self.spec, self.index)
        self.epoch, self.offset = int(position["epoch"]), int(position["offset"])
        return int(position["partitions"])

    def _too_small(self, epoch: int) -> str:
        rows = self.plan.partition_rows(epoch)
        return (f"data.paths: {self.index.rows} rows in {self.index.num_row_groups} row groups make "
                f"partitions of {min(rows)} to {max(rows)} rows, too few for one step, which takes "
                f"{self.per_partition} from each of {self.partitions} partitions; use more data, smaller "
                "row groups, or fewer data.partitions")

    def steps_per_epoch(self) -> int:
        return self.plan.steps_in_epoch(self.epoch, self.per_partition)

    # -- consuming -------------------------------------------------------------------------------

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch."""
        if not self._current:
            if not self._ready:
                self._start()
                t0 = time.perf_counter()
                item = self._queue.get()
                self.wait_seconds += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    self.close()
                    raise item
                self._ready.extend(item)
            self._current, self._current_position = self._ready.popleft()
        batch = self._current.pop(0)
        if not self._current:
            self.epoch, self.offset = self._current_position
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def stats(self) -> dict:
        """Numbers for metrics: queued steps, bytes held, wait time, what was skipped."""
        with self._cache_lock:
            futures = list(self._cache.values())
        held = sum(_nbytes(f.result()) for f in futures if f.done() and not f.exception())
        queued = self._queue.qsize() * self._chunk_steps + len(self._ready)
        return {"queue_depth": queued, "buffered_bytes": held + queued * self._step_bytes,
                "wait_seconds": self.wait_seconds,
                "skipped_files": len(self.index.skipped),
                "skipped_row_groups": len(self.skipped_row_groups)}

    def close(self) -> None:
        self._stop.set()
        if self._producer is not None:
            while self._producer.is_alive():
                try:  # unblock a producer waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._producer.join(timeout=0.05)
        # a read stuck in storage would hold the close, and the run's end, for good
        self._pool.shutdown(wait=not self._stalled, cancel_futures=True)
        self._cache.clear()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- producing -------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._producer is None:
            self._producer = threading.Thread(target=self._produce, name=f"shardrun-data{self.rank}",
                                              daemon=True)
            self._producer.start()

    def _produce(self) -> None:
        epoch, offset = self.epoch, self.offset
        try:
            while not self._stop.is_set():
                steps = self.plan.steps_in_epoch(epoch, self.per_partition, offset)
                if steps < 1:
                    epoch, offset = epoch + 1, 0
                    steps = self.plan.steps_in_epoch(epoch, self.per_partition)
                    if steps < 1:
                        raise UserError(self._too_small(epoch))
                chunk = []
                for micro in self._make_steps(epoch, offset, min(steps, self._chunk_steps)):
                    offset += self.per_partition
                    chunk.append((micro, (epoch, offset)))
                self._put(chunk)
        except BaseException as e:  # handed to the loop, raised there
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _make_steps(self, epoch: int, offset: int, k: int) -> list[list[dict[str, torch.Tensor]]]:
        """The micro-batches of the k steps from offset, gathered together."""
        count = k * self.per_partition
        self._read_ahead(epoch, offset, count)
        self._step_has_pad = False
        parts = [self._gather(*self.plan.samples(epoch, p, offset, count)) for p in self.owned]
        if self.spec.format == "tokens":
            rows = _by_step(parts, k)
            self._step_bytes = rows[0].size * 8  # as int64 tensors
            return [self._token_micro_batches(step) for step in rows]
        cols = {c: _by_step([p[c] for p in parts], k) for c in parts[0]}
        self._step_bytes = sum(v[0].nbytes for v in cols.values())
        return [self._table_micro_batches({c: v[i] for c, v in cols.items()}) for i in range(k)]

    def _read_ahead(self, epoch: int, offset: int, count: int) -> None:
        """Decode the row groups of these samples' windows and of the two windows after them; drop the rest.

        Two windows ahead, not one: decoding then keeps up on two cores (measured by bench/data.py).
        """
        window, k = self.plan.window, self.per_partition
        used = offset + self.plan.steps_in_epoch(epoch, k, offset) * k  # samples this epoch gives
        end = -(-used // window)  # windows this epoch reads; later ones are the next epoch's
        first, last = offset // window, (offset + count - 1) // window
        wanted: list[tuple[int, int]] = []
        for p in self.owned:
            for w in range(first, last + 3):
                e, ww = (epoch, w) if w < end else (epoch + 1, w - end)
                wanted.extend((e, int(g)) for g in self.plan.window_groups(e, p, ww))
        keep = set()
        with self._cache_lock:
            for e, g in wanted:
                keep.add(g)
                if g not in self._cache:
                    self.decoded.append((e, g))
                    self._cache[g] = self._pool.submit(self._read, g)
            for g in [g for g in self._cache if g not in keep]:
                del self._cache[g]

    def _gather(self, groups: np.ndarray, rows: np.ndarray):
        """The rows (groups[i], rows[i]) from decoded row groups, in order."""
        n, out = len(groups), None
        if self.spec.format == "tokens":  # gathered straight into the int64 the model takes
            out = np.empty((n, self.spec.seq_len + 1), dtype=np.int64)
        for g in np.unique(groups).tolist():
            data = self._decoded(g)
            sel = np.flatnonzero(groups == g)
            if data is None:  # skipped: token rows of padding only (left out of the loss)
                if out is None or isinstance(out, dict):
                    raise UserError(f"{self.index.describe(g)} is unreadable, and table rows cannot "
                                    "be padded; fix or remove the file")
                out[sel] = PAD
                self._step_has_pad = True
            elif isinstance(data, dict):
                if out is None:
                    out = {k: np.empty((n, *v.shape[1:]), dtype=v.dtype) for k, v in data.items()}
                for k, v in data.items():
                    out[k][sel] = v[rows[sel]]
            else:
                out[sel] = data[rows[sel]]
                self._step_has_pad |= g in self._padded
        return out

    def _read(self, g: int):
        data = self.reader.read(g)
        if isinstance(data, np.ndarray) and data.size and data.min() == PAD:
            self._padded.add(g)  # once per row group, so a step needs no scan for padding
        return data

    def _decoded(self, g: int):
        with self._cache_lock:
            future = self._cache.get(g)
            if future is None:  # not read ahead: read now
                future = self._cache[g] = self._pool.submit(self._read, g)
        try:
            return future.result(timeout=self.wait_timeout)
        except concurrent.futures.TimeoutError:
            self._stalled = True
            raise DataStalled(f"{self.index.describe(g)}: no data after {self.wait_timeout:g} s "
                              "(failure.data_wait_timeout_s): the storage behind it stalls") from None
        except BadRowGroup as e:
            if self.spec.on_bad_file != "skip":
                raise UserError(f"{e} (data.on_bad_file: skip leaves it out)") from None
            if str(e) not in self.skipped_row_groups:
                self.skipped_row_groups.append(str(e))
                self._log(f"skipping {e}; its rows are padding, left out of the loss "
                          f"({len(self.skipped_row_groups)} row groups skipped so far)")
            return None

    def _token_micro_batches(self, rows: np.ndarray) -> list[dict[str, torch.Tensor]]:
        t = torch.from_numpy(rows)
        if self.reader.encoded:  # a loss mask or positions ride in the ids' high bits
            batch = decode_rows(t, positions=self.reader.positions)
        else:
            inputs, targets = t[:, :-1], t[:, 1:]
            if self._step_has_pad:
                inputs = inputs.clamp(min=0)
                targets = targets.masked_fill(targets == PAD, IGNORE_INDEX)
            batch = {"inputs": inputs, "targets": targets}
        out = []
        for m in range(self.grad_accum_steps):
            sl = slice(m * self.micro_batch_size, (m + 1) * self.micro_batch_size)
            out.append(self._staged({k: v[sl] for k, v in batch.items()}))
        return out

    def _staged(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A micro-batch as the device takes it: for a GPU, contiguous and in pinned memory, so that the copy in
        next_batch runs beside the GPU's work (a strided pinned tensor goes through pageable memory first, and
        the copy waits). Done here, in the producer's thread, off the loop."""
        if self.device.type != "cuda":
            return batch
        return {k: v.contiguous().pin_memory() for k, v in batch.items()}

    def _table_micro_batches(self, cols: dict[str, np.ndarray]) -> list[dict[str, torch.Tensor]]:
        label = self.spec.label
        out = []
        for m in range(self.grad_accum_steps):
            sl = slice(m * self.micro_batch_size, (m + 1) * self.micro_batch_size)
            out.append(self._staged({("label" if k == label else k): torch.from_numpy(v[sl]) for k, v in cols.items()}))
        return out


def _by_step(parts: list[np.ndarray], k: int) -> np.ndarray:
    """k steps of rows from each owned partition as (step, sample, ...): a step takes its share of each in turn."""
    if len(parts) == 1:
        return parts[0].reshape(k, -1, *parts[0].shape[1:])
    return np.stack([p.reshape(k, -1, *p.shape[1:]) for p in parts], axis=1).reshape(k, -1, *parts[0].shape[1:])


def _nbytes(data) -> int:
    if data is None:
        return 0
    arrays = data.values() if isinstance(data, dict) else [data]
    return sum((a.base if isinstance(a.base, np.ndarray) else a).nbytes for a in arrays)
