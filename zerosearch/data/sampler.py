"""Batches of sample indices, epoch after epoch, with an exactly resumable position."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator


class PromptSampler:
    """Yields batches of dataset indices forever; each epoch is a fresh permutation from `seed + epoch`.

    The state is `(epoch, position)`: the epoch being served and how many of its indices were handed out.
    `state_dict()` saved after any batch and restored into a new sampler continues with exactly the
    batches the uninterrupted run would have produced. With `drop_last`, the tail of an epoch that does
    not fill a batch is skipped; without it the last batch of an epoch is shorter.

    `pairs` (index pairs, `data.pair_orders`) are kept together and spread evenly: each pair is shuffled as one
    unit, and batch b of an epoch gets `floor((b+1)P/B) - floor(bP/B)` of the P pairs (B batches), so no batch is
    filled with pairs by the luck of the draw (a batch of only comparisons taught over-searching in the seventeenth
    session's run, docs/results.md). Single indices fill the rest; a pair is cut in two only when one place is
    free and no single index is left, as at the end of an odd-sized split.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True, pairs: tuple[tuple[int, int], ...] | list[tuple[int, int]] = ()):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}: the dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if batch_size > num_samples:
            raise ValueError(
                f"batch_size {batch_size} is larger than the dataset ({num_samples} samples): lower the "
                "batch size (prompts per step) or use a larger dataset"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pairs = [tuple(p) for p in pairs]
        paired = [k for p in self.pairs for k in p]
        if len(set(paired)) != len(paired) or any(not 0 <= k < num_samples for k in paired):
            raise ValueError(f"pairs must be disjoint indices below {num_samples}, got {self.pairs}")
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._laid_out_order(), self.epoch
        return self._order

    def _laid_out_order(self) -> list[int]:
        """Units (pairs and single indices) shuffled, then laid out; with no pairs, a plain seeded permutation."""
        paired = {k for p in self.pairs for k in p}
        units = sorted([*self.pairs, *((k,) for k in range(self.num_samples) if k not in paired)])
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(units)
        pairs = deque(u for u in units if len(u) == 2)
        singles = deque(u for u in units if len(u) == 1)
        n_batches, order = -(-self.num_samples // self.batch_size), []
        for b in range(n_batches):
            quota = (b + 1) * len(self.pairs) // n_batches - b * len(self.pairs) // n_batches
            batch: list[int] = []
            while pairs and (quota > 0 or not singles) and len(batch) + 2 <= self.batch_size:
                batch.extend(pairs.popleft())
                quota -= 1
            while singles and len(batch) < self.batch_size:
                batch.extend(singles.popleft())
            while pairs and len(batch) + 2 <= self.batch_size:  # singles ran out: pairs fill the batch
                batch.extend(pairs.popleft())
            if pairs and len(batch) < self.batch_size:  # one place free, only pairs left: cut one
                head, tail = pairs.popleft()
                batch.append(head)
                singles.appendleft((tail,))
            order.extend(batch)
        return order

    def _epoch_done(self) -> bool:
        left = self.num_samples - self.position
        return left < self.batch_size if self.drop_last else left <= 0

    def next_batch(self) -> list[int]:
        """The next batch of indices, starting a new epoch when the current one is used up."""
        if self._epoch_done():
            self.epoch += 1
            self.position = 0
        batch = self._epoch_order()[self.position : self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "pairs": len(self.pairs),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the sampler must be built with the same dataset size, batch and seed."""
        mine = self.state_dict()
        for key in ("num_samples", "batch_size", "seed", "shuffle", "drop_last", "pairs"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {mine[key]!r}: "
                    "resume with the same dataset, batch size and seed as the checkpointed run"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_samples:
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position

    def metrics(self) -> dict[str, float]:
        return {"data/epoch": float(self.epoch), "data/epoch_progress": self.position / self.num_samples}
