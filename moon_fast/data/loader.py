"""Per-rank streams of training triplet batches with a resumable position.

Two modes:

* ``memory`` (default): all triplets are read once; epoch ``e`` visits them in a permutation seeded by
  ``(seed, e)``. Global step ``s`` consumes positions ``[s*G, (s+1)*G)`` of that endless sequence
  (``G`` = micro batch x accumulation x world size) and rank ``r`` takes the ``r``-th slice of each
  micro step, so the global batch of a step does not depend on the number of ranks (a 2-process run
  sees the same samples as a 1-process run of the same global batch). Position = one integer.
* ``stream`` (large sharded manifests): rank ``r`` reads only its shards (shard ``k`` goes to rank
  ``k % world``; with fewer shards than ranks, rows are strided instead), in a shard order permuted per
  epoch; position = (epoch, shard cursor, row), saved per rank. Shards should be written pre-shuffled.

A bad triplet (unknown product, missing or corrupt image, malformed row) is skipped with a message
naming it and counted; the ``memory`` mode substitutes the next position's triplet so batch sizes stay
fixed across ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .batch import TripletBatch
from .catalog import (
    BadRecordCounter,
    BadRecordError,
    Catalog,
    Triplet,
    iter_manifest,
    manifest_files,
    parse_triplet,
)
from .collate import SampleBuilder, collate_triplets, prepare_triplet


def read_triplets(root: Path, bad: BadRecordCounter) -> list[Triplet]:
    out = []
    for f in manifest_files(root, "triplets"):
        for i, rec in iter_manifest(f):
            where = f"{f}:{i + 1}"
            try:
                if isinstance(rec, Exception):
                    raise rec
                out.append(parse_triplet(rec, root, where))
            except BadRecordError as e:
                bad.skip(e)
    if not out:
        raise ValueError(f"{root}: no usable triplets")
    return out


class TripletLoader:
    """Yields this rank's micro batches (``next()``) and saves / restores its position."""

    def __init__(self, root: str | Path, catalog: Catalog, builder: SampleBuilder, *, micro_batch: int,
                 grad_accum: int = 1, rank: int = 0, world: int = 1, seed: int = 0, mode: str = "memory",
                 bad: BadRecordCounter | None = None):
        if mode not in ("memory", "stream"):
            raise ValueError(f"data.mode={mode!r}: expected 'memory' or 'stream'")
        self.root, self.catalog, self.builder = Path(root), catalog, builder
        self.micro, self.accum, self.rank, self.world, self.seed, self.mode = (
            micro_batch, grad_accum, rank, world, seed, mode)
        self.bad = bad or catalog.bad
        if mode == "memory":
            self.triplets = read_triplets(self.root, self.bad)
            self.pos = 0          # global position at the start of the current step
            self.micro_step = 0   # micro steps taken in the current step
            self._perm_epoch, self._perm = -1, None
        else:
            self.shards = manifest_files(self.root, "triplets")
            self.state = {"epoch": 0, "shard_pos": 0, "row": 0}
            self._it = None
            self._usable = 0  # usable triplets streamed so far (tells _stream whether a pass found any)

    # ---- memory mode ----
    def _index(self, p: int) -> int:
        n = len(self.triplets)
        epoch, k = divmod(p, n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def _prepare_at(self, p: int):
        n = len(self.triplets)
        for j in range(n):  # substitute following triplets for a bad one (deterministically)
            t = self.triplets[(self._index(p) + j) % n]
            try:
                item = prepare_triplet(t, self.catalog, self.builder)
                self.bad.ok()
                return item
            except BadRecordError as e:
                self.bad.skip(e)
        raise ValueError(f"no usable triplet in {self.root}: every triplet was skipped as bad ("
                         f"{self.bad.summary() or 'none read'}); run `moon-fast data check {self.root}`")

    # ---- stream mode ----
    def _my_files(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        files = [self.shards[i] for i in order]
        if len(files) >= self.world:
            return [(f, 0, 1) for f in files[self.rank::self.world]]
        return [(f, self.rank, self.world) for f in files]  # stride rows instead

    def _stream(self):
        dry: set = set()  # shards read whole since the last usable triplet
        while True:
            files = self._my_files(self.state["epoch"])
            while self.state["shard_pos"] < len(files):
                f, offset, stride = files[self.state["shard_pos"]]
                whole, usable = self.state["row"] == 0, self._usable
                for i, rec in iter_manifest(f, self.state["row"]):
                    self.state["row"] = i + 1
                    if (i - offset) % stride:
                        continue
                    yield f, i, rec
                if self._usable != usable:
                    dry.clear()
                elif whole:
                    dry.add(f)
                self.state["shard_pos"] += 1
                self.state["row"] = 0
            # Without this, empty or all-bad shards would make this loop spin through epochs forever.
            # (A rank reads a different subset of shards each epoch: wait until it has read them all.)
            if len(dry) == len(self.shards):
                raise ValueError(self._no_usable_message())
            self.state = {"epoch": self.state["epoch"] + 1, "shard_pos": 0, "row": 0}

    def _no_usable_message(self) -> str:
        where = f"{self.shards[0].parent}/ shards" if len(self.shards) > 1 else str(self.shards[0])
        strided = len(self.shards) < self.world
        rows = f" (rows {self.rank}::{self.world} of each, for rank {self.rank})" if strided else ""
        return (f"no usable triplets in {where}{rows}: a full pass over them found none (they are empty or "
                f"blank, or every record in them was skipped as bad). Put triplet records in them "
                f"(see moon_fast/data/FORMAT.md) and run `moon-fast data check {self.root}`")

    def _next_streamed(self):
        if self._it is None:
            self._it = self._stream()
        for _ in range(1_000_000):
            f, i, rec = next(self._it)
            try:
                if isinstance(rec, Exception):
                    raise rec
                item = prepare_triplet(parse_triplet(rec, self.root, f"{f}:{i + 1}"), self.catalog, self.builder)
                self.bad.ok()
                self._usable += 1
                return item
            except BadRecordError as e:
                self.bad.skip(e)
        raise RuntimeError("no usable triplet in a million records")

    # ---- common ----
    def next(self) -> TripletBatch:
        """This rank's next micro batch (``micro_batch`` triplets)."""
        if self.mode == "memory":
            start = self.pos + self.micro_step * self.world * self.micro + self.rank * self.micro
            items = [self._prepare_at(start + k) for k in range(self.micro)]
            self.micro_step += 1
            if self.micro_step == self.accum:
                self.micro_step = 0
                self.pos += self.micro * self.accum * self.world
        else:
            items = [self._next_streamed() for _ in range(self.micro)]
        return collate_triplets(items)

    def state_dict(self) -> dict:
        s = {"mode": self.mode, "bad": self.bad.state_dict()}
        if self.mode == "memory":
            s.update(pos=self.pos, micro_step=self.micro_step, n=len(self.triplets))
        else:
            s.update(self.state)
        return s

    def load_state_dict(self, s: dict) -> None:
        if s.get("mode") != self.mode:
            raise ValueError(f"checkpoint data position is for mode {s.get('mode')}, this run uses {self.mode}")
        self.bad.load_state_dict(s["bad"])
        if self.mode == "memory":
            if s["n"] != len(self.triplets):
                raise ValueError(f"checkpoint was taken on {s['n']} triplets, the data now has "
                                 f"{len(self.triplets)}: resume with the same data")
            self.pos, self.micro_step = s["pos"], s["micro_step"]
        else:
            self.state = {k: s[k] for k in ("epoch", "shard_pos", "row")}
            self._it = None


class Prefetcher:
    """Prepares the next micro batch in a background thread while the current one trains.

    ``next()`` returns the batch; ``state_dict()`` is the loader position after the batches returned
    so far (not after the one being prefetched), so a checkpoint resumes exactly."""

    def __init__(self, loader: TripletLoader, enabled: bool = True):
        import copy
        from concurrent.futures import ThreadPoolExecutor

        self.loader = loader
        self._copy = copy.deepcopy
        self._state = self._copy(loader.state_dict())
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moon-fast-data") if enabled else None
        self._future = None

    def _produce(self):
        batch = self.loader.next()
        return batch, self._copy(self.loader.state_dict())

    def next(self) -> TripletBatch:
        if self._pool is None:
            batch, self._state = self._produce()
            return batch
        fut = self._future or self._pool.submit(self._produce)
        batch, self._state = fut.result()
        self._future = self._pool.submit(self._produce)
        return batch

    def state_dict(self) -> dict:
        return self._copy(self._state)

    def close(self) -> None:
        if self._pool is not None:
            if self._future is not None:
                self._future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
