"""Trajectories -> padded tensors for log-prob, value and loss computation.

Sequences are `prompt + response`, right-padded. Response token j of sequence b sits at position
`P_b + j` and is predicted from the hidden state at `P_b + j - 1`, so per-token quantities live on a
`[batch, response_len]` grid aligned with `response_ids` and the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zerosearch.rollout.trajectory import Trajectory


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    prompt_lens: torch.Tensor  # [B]
    response_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] 1 on every real response token
    train_mask: torch.Tensor  # [B, R] 1 on tokens that carry loss: `Trajectory.train_mask`

    @property
    def predict_positions(self) -> torch.Tensor:
        """[B, R] position of the hidden state that predicts each response token."""
        r = torch.arange(self.response_ids.shape[1])
        pos = self.prompt_lens[:, None] + r[None, :] - 1  # [B, R]
        return pos.clamp(max=self.input_ids.shape[1] - 1)


def collate(trajs: list[Trajectory], pad_id: int) -> Batch:
    """Pad a list of trajectories; which tokens carry loss is each trajectory's `train_mask`."""
    B = len(trajs)
    L = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    R = max(max(len(t.response_ids) for t in trajs), 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    train_mask = torch.zeros((B, R), dtype=torch.float32)
    prompt_lens = torch.tensor([len(t.prompt_ids) for t in trajs], dtype=torch.long)
    for b, t in enumerate(trajs):
        seq = t.prompt_ids + t.response_ids
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        n = len(t.response_ids)
        if n:
            response_ids[b, :n] = torch.tensor(t.response_ids)
            response_mask[b, :n] = 1.0
            train_mask[b, :n] = torch.tensor(t.train_mask, dtype=torch.float32)
    return Batch(input_ids, attention_mask, prompt_lens, response_ids, response_mask, train_mask)


def loss_totals(trajs: list[Trajectory]) -> tuple[int, int]:
    """What a mini-batch's loss averages over: its loss-carrying tokens, and its sequences with at least one."""
    masks = [t.train_mask for t in trajs]
    return sum(sum(m) for m in masks), sum(1 for m in masks if any(m))


def loss_weight(train_mask: torch.Tensor, tokens: int, sequences: int, agg: str) -> float:
    """The weight of one micro-batch's loss, aggregated by `agg` over its own `train_mask` [B, R], in the loss
    of its mini-batch of `tokens` loss-carrying tokens in `sequences` sequences (`loss_totals`): its share of
    the tokens (`token-mean`) or of the sequences (the `seq-mean-*` modes). Summed over the micro-batches the
    weighted losses are the mini-batch's loss in one pass; with `token-mean` and `seq-mean-token-mean` each
    token's weight in it is then 1/tokens, or 1/(sequences x its sequence's tokens), summing to 1."""
    if agg == "token-mean":
        return float(train_mask.sum()) / max(tokens, 1)
    return float(train_mask.bool().any(-1).sum()) / max(sequences, 1)


def micro_batches(lengths: list[int], max_tokens: int, max_size: int) -> list[list[int]]:
    """Group indices into micro-batches of similar length (less padding), each at most `max_size`
    sequences and about `max_tokens` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        if current and (len(current) >= max_size or longest * (len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_to_grid(values: torch.Tensor | list[list[float]] | list[torch.Tensor], R: int) -> torch.Tensor:
    """Per-response-token values -> float32 [B, R]: a [B, R'] tensor cut or zero-padded to R columns, or
    per-trajectory lists zero-padded."""
    if torch.is_tensor(values):
        out = torch.zeros((values.shape[0], R), dtype=torch.float32)  # [B, R]
        n = min(R, values.shape[1])
        out[:, :n] = values[:, :n]
        return out
    out = torch.zeros((len(values), R), dtype=torch.float32)
    for b, v in enumerate(values):
        v = torch.as_tensor(v, dtype=torch.float32)[:R]
        out[b, : len(v)] = v
    return out


def response_len(trajs: list[Trajectory]) -> int:
    """The longest response of `trajs`: the width of their per-token grids."""
    return max((len(t.response_ids) for t in trajs), default=0)


def stack_grids(grids: list[torch.Tensor]) -> torch.Tensor:
    """Per-rank [B_r, R_r] grids -> one [sum B_r, max R_r] grid, in rank order (zero padded)."""
    R = max(g.shape[1] for g in grids)
    return torch.cat([pad_to_grid(g, R) for g in grids])  # [B, R]
