"""Weighted mixing of sources into micro-batches, for one slot.

Each sequence comes whole from one source, drawn with the stage's weights; the draws for
sample `n` of stage `k` come from a generator seeded by (seed, slot, k, n // block), so the
mixing state is a single counter. A source's packer is created when first drawn, which keeps
sources of weight 0 from being read at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipelines.config import DataConfig, packs_whole_documents
from data_pipelines.encoding import DocumentEncoder
from data_pipelines.packing import Packer
from data_pipelines.readers import BadInputLog
from data_pipelines.shards import Shard
from data_pipelines.stream import Slot, SourceStream, StreamPosition

_DRAW_BLOCK = 4096
BATCH_KEYS = ("input_ids", "labels", "position_ids")


@dataclass
class Stage:
    """The mixture and sequence length in force, and how many stages came before."""

    index: int
    weights: dict[str, float]
    seq_len: int


@dataclass
class SlotState:
    """Everything one slot needs to continue exactly: plain data, picklable and JSON-able."""

    samples: int = 0
    """Sequences drawn in the current stage."""
    packers: dict[str, dict] = field(default_factory=dict)
    """Per source drawn so far: its window position and the packer's cursor in it."""
    bad_input: dict[str, int] = field(default_factory=dict)
    """Bad records skipped so far, by kind."""
    split_documents: int = 0
    """Documents longer than a sequence that whole-document packing split so far."""

    def to_dict(self) -> dict:
        """A plain-dict copy (faster than `dataclasses.asdict`, which runs once per batch)."""
        packers = {
            name: {"position": dict(state["position"]), "cursor": state["cursor"]}
            for name, state in self.packers.items()
        }
        return {
            "samples": self.samples,
            "packers": packers,
            "bad_input": dict(self.bad_input),
            "split_documents": self.split_documents,
        }


class MixtureStream:
    """Micro-batches of one slot: draws a source per sequence and packs it."""

    def __init__(
        self,
        cfg: DataConfig,
        shards: dict[str, list[Shard]],
        slot: Slot,
        stage: Stage,
        state: SlotState,
        encoder: DocumentEncoder,
    ):
        self.cfg, self.shards, self.slot, self.stage = cfg, shards, slot, stage
        self.encoder = encoder
        self.samples = state.samples
        self.saved_packers = dict(state.packers)
        self.saved_split_documents = state.split_documents
        self.whole_documents = packs_whole_documents(cfg)
        self.log = BadInputLog(cfg.on_bad_input, state.bad_input)
        self.packers: dict[str, Packer] = {}
        self.names = list(stage.weights)
        weights = np.array([stage.weights[name] for name in self.names], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.block, self.draws = -1, np.empty(0, dtype=np.int64)

    def next_batch(self, batch_size: int) -> np.ndarray:
        """A micro-batch as one int64 array [3, batch, seq_len]: `BATCH_KEYS` stacked.

        One array crosses from a worker process at less cost than three tensors.
        """
        batch = np.empty((len(BATCH_KEYS), batch_size, self.stage.seq_len), dtype=np.int64)
        for row in range(batch_size):
            self._packer(self._draw()).fill(batch[0, row], batch[1, row], batch[2, row])
        return batch

    def state(self) -> SlotState:
        """The slot's state after the batches handed out so far."""
        packers = dict(self.saved_packers)
        packers.update({name: packer.state() for name, packer in self.packers.items()})
        split = self.saved_split_documents
        split += sum(packer.split_documents for packer in self.packers.values())
        return SlotState(self.samples, packers, dict(self.log.counts), split)

    def _draw(self) -> str:
        block, within = divmod(self.samples, _DRAW_BLOCK)
        if block != self.block:
            rng = np.random.default_rng([self.cfg.seed, self.slot.index, self.stage.index, block])
            self.block = block
            self.draws = rng.choice(len(self.names), size=_DRAW_BLOCK, p=self.probabilities)
        self.samples += 1
        return self.names[self.draws[within]]

    def _packer(self, name: str) -> Packer:
        if name not in self.packers:
            source = next(source for source in self.cfg.sources if source.name == name)

            def make_stream(position: StreamPosition | None) -> SourceStream:
                return SourceStream(
                    source, self.shards[name], self.slot, self.cfg, self.encoder, self.log, position
                )

            self.packers[name] = Packer.restore(
                make_stream, self.saved_packers.get(name), self.whole_documents
            )
        return self.packers[name]
