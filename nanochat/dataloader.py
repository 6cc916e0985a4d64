"""Token batches for pretraining: documents packed into one continuous stream, sharded across ranks.

The data of a split is a list of units, one per (shard, row group). Rank r reads the units whose index is
r modulo world_size, so ranks never share a document. Training visits a rank's units in an order shuffled per
epoch from (seed, epoch) and wraps into the next epoch forever; validation reads them in order, once.

Each document becomes [BOS] + its tokens, appended to the stream. A batch of shape (B, T) takes the next
B*T + 1 stream tokens (x = all but the last, y = all but the first) and advances by B*T, so the last target
of one batch is the first input of the next and no token is skipped.

The position in the stream is (epoch, unit, document, token offset in that document), which is all that
state_dict() needs: a restored loader re-reads and re-tokenises that document and continues bit-identically.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq
import torch

from nanochat.dataset import data_dir as default_data_dir
from nanochat.dataset import shard_index, train_val_shards
from nanochat.tokenizer import Tokenizer

STATE_VERSION = 1
FIRST_RUN = 4  # documents the first tokenisation after a seek takes (see _seek)


class Unit(NamedTuple):
    """One row group of one shard: the unit in which data is dealt out to ranks and shuffled."""

    shard: Path
    row_group: int


class Segment(NamedTuple):
    """Where a run of buffered tokens came from: one document's [BOS] + tokens."""

    epoch: int
    unit: int  # index into the rank's unit order for that epoch
    doc: int  # row within the unit
    length: int


def split_units(split: str, directory: Path | None = None) -> list[Unit]:
    """All non-empty (shard, row group) units of a split, in shard then row-group order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = train_val_shards(directory)
    units = []
    for shard in train if split == "train" else [val]:
        with pq.ParquetFile(shard) as pf:
            if "text" not in pf.schema_arrow.names:
                raise ValueError(f"{shard} has no `text` column: it is not a nanochat data shard, remove it")
            meta = pf.metadata
            units.extend(Unit(shard, rg) for rg in range(meta.num_row_groups) if meta.row_group(rg).num_rows > 0)
    return units


class DataLoader:
    """Packed (x, y) batches of one split for one rank; see the module docstring for the data order."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        seed: int = 0,
        data_dir: Path | None = None,
        tokenizer_batch: int = 128,
    ) -> None:
        if batch_size < 1 or seq_len < 1 or tokenizer_batch < 1:
            sizes = f"batch_size={batch_size} seq_len={seq_len} tokenizer_batch={tokenizer_batch}"
            raise ValueError(f"batch_size, seq_len and tokenizer_batch must be at least 1, got {sizes}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.seed = seed
        self.tokenizer_batch = tokenizer_batch
        directory = default_data_dir() if data_dir is None else data_dir
        every = split_units(split, directory)
        self.units: list[Unit] = every[rank::world_size]
        if not self.units:
            raise ValueError(
                f"the {split} split of {directory} has {len(every)} row groups, fewer than world_size={world_size}: "
                "use more shards or fewer processes"
            )
        # on CUDA, batches go through a pinned host buffer so the copy to the device can be asynchronous
        self._pinned = torch.empty(batch_size * seq_len + 1, dtype=torch.int64, pin_memory=True) if self._cuda else None
        self._copied: torch.cuda.Event | None = None
        self._seek(epoch=0, unit=0, doc=0, offset=0)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    # ---- reading ---------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        """The rank's unit indices in the order epoch `epoch` reads them."""
        order = list(range(len(self.units)))
        if self.split == "train":
            random.Random(self.seed * 1000003 + epoch).shuffle(order)
        return order

    def _seek(self, epoch: int, unit: int, doc: int, offset: int) -> None:
        """Position the reader at token `offset` of document `doc` of the unit at order[unit] in `epoch`."""
        self._epoch = epoch
        self._order_cache = self._order(epoch)
        self._unit = unit
        self._doc = doc
        self._texts: list[str] | None = None
        self._buf: list[int] = []
        self._segs: deque[Segment] = deque()
        self._head = 0  # offset of _buf[0] within _segs[0]
        self._skip = offset  # tokens of the first document to drop once it is tokenised
        # documents to tokenise next: a few at first, doubling up to tokenizer_batch, so a (re)start tokenises about
        # what its first batch needs, not a whole run (0.7 s of a restart's 5 s on the built-in corpus); the tokens
        # do not depend on how documents are grouped
        self._run = min(FIRST_RUN, self.tokenizer_batch)

    def _read_docs(self) -> tuple[int, int, list[str]]:
        """The next run of documents (up to tokenizer_batch): (unit position, first doc index, texts).

        Advances the reader across units and, for training, epochs; raises StopIteration at the end of val.
        """
        while True:
            if self._unit >= len(self._order_cache):
                if self.split != "train":
                    raise StopIteration
                self._epoch += 1
                self._order_cache = self._order(self._epoch)
                self._unit, self._doc, self._texts = 0, 0, None
            if self._texts is None:
                shard, rg = self.units[self._order_cache[self._unit]]
                with pq.ParquetFile(shard) as pf:
                    self._texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            if self._doc < len(self._texts):
                start = self._doc
                self._doc = min(start + self._run, len(self._texts))
                self._run = min(2 * self._run, self.tokenizer_batch)
                return self._unit, start, self._texts[start : self._doc]
            self._unit, self._doc, self._texts = self._unit + 1, 0, None

    def _fill(self, need: int) -> None:
        """Tokenise documents until the buffer holds at least `need` tokens."""
        bos = self.tokenizer.bos_id
        while len(self._buf) < need:
            unit, first, texts = self._read_docs()
            epoch = self._epoch  # read after _read_docs, which may have moved on to the next epoch
            for i, ids in enumerate(self.tokenizer.encode_batch(texts)):
                self._buf.append(bos)
                self._buf.extend(ids)
                self._segs.append(Segment(epoch, unit, first + i, len(ids) + 1))
            if self._skip:
                skip, self._skip = self._skip, 0
                self._consume(skip)

    def _consume(self, n: int) -> None:
        """Drop the first n buffered tokens and keep _segs/_head pointing at the new first token."""
        del self._buf[:n]
        self._head += n
        while self._segs and self._head >= self._segs[0].length:
            self._head -= self._segs.popleft().length

    # ---- batches ---------------------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 of shape (B, T) on the device; y is x shifted by one token. StopIteration ends val."""
        n = self.batch_size * self.seq_len
        self._fill(n + 1)
        tokens = torch.tensor(self._buf[: n + 1], dtype=torch.int64)
        self._consume(n)
        if self._cuda:
            if self._copied is not None:
                self._copied.synchronize()  # the previous async copy must finish reading the pinned buffer
            self._pinned.copy_(tokens)
            tokens = self._pinned.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        x = tokens[:-1].view(self.batch_size, self.seq_len)
        y = tokens[1:].view(self.batch_size, self.seq_len)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches until the split ends (never, for train)."""
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    # ---- checkpointing ---------------------------------------------------------------------------------------

    def _position(self) -> tuple[int, int, int, int]:
        """(epoch, unit, doc, offset) of the first token not yet consumed."""
        if self._segs:
            seg = self._segs[0]
            return seg.epoch, seg.unit, seg.doc, self._head
        return self._epoch, self._unit, self._doc, self._skip

    def state_dict(self) -> dict:
        """The exact stream position, JSON-serialisable; shard and row_group are for humans (None at the end)."""
        epoch, unit, doc, offset = self._position()
        order = self._order(epoch)
        shard, row_group = (None, None)
        if unit < len(order):
            u = self.units[order[unit]]
            shard, row_group = shard_index(u.shard), u.row_group
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "num_units": len(self.units),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "epoch": epoch,
            "unit": unit,
            "shard": shard,
            "row_group": row_group,
            "doc": doc,
            "offset": offset,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict(): the next batch is the one that followed when the state was taken."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}: start afresh")
        for key in ("split", "rank", "world_size", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                    f"{key}={getattr(self, key)!r}: resume with the same {key}"
                )
        if state.get("num_units") != len(self.units):
            raise ValueError(
                f"loader state was saved over {state.get('num_units')} row groups but rank {self.rank} now has "
                f"{len(self.units)}: the data directory changed since the checkpoint; restore it or start afresh"
            )
        epoch, unit, doc, offset = (int(state[k]) for k in ("epoch", "unit", "doc", "offset"))
        order = self._order(epoch)
        if min(epoch, unit, doc, offset) < 0 or unit > len(order):
            raise ValueError(f"loader state position {(epoch, unit, doc, offset)} is out of range: state is corrupt")
        if unit < len(order) and state.get("shard") is not None:
            u = self.units[order[unit]]
            if (shard_index(u.shard), u.row_group) != (state["shard"], state["row_group"]):
                raise ValueError(
                    f"loader state points at shard {state['shard']} row group {state['row_group']} but that "
                    f"position is now shard {shard_index(u.shard)} row group {u.row_group}: the data directory "
                    "changed since the checkpoint; restore it or start afresh"
                )
        # batch_size and seq_len may differ: the position is in tokens, so the stream continues seamlessly
        self._seek(epoch, unit, doc, offset)

    def load_resharded(self, states: list[dict]) -> None:
        """Continue from the loader states of a run with a different world size: approximately, not exactly.

        A rank's units depend on the world size, so no new rank can pick up an old rank's stream. Every new rank
        starts at the same fraction of its own units that the slowest old rank had reached in the oldest epoch
        still being read, at a document boundary: a few documents per rank may be read twice or skipped.
        """
        epoch = min(int(s["epoch"]) for s in states)
        frac = min(int(s["unit"]) / int(s["num_units"]) for s in states if int(s["epoch"]) == epoch)
        self._seek(epoch, min(int(frac * len(self.units)), len(self.units)), 0, 0)
