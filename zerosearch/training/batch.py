"""Trajectories -> padded tensors for log-prob, value and loss computation.

Sequences are `prompt + response`, right-padded. Response token j of sequence b sits at position
`P_b + j` and is predicted from the hidden state at `P_b + j - 1`, so per-token quantities live on a
`[batch, response_len]` grid aligned with `response_ids` and the masks.

With `share_prompts`, trajectories with the same prompt (a GRPO group) share one row: the prompt once, padding
up to the micro-batch's widest prompt, then each response in turn, `prompt + pad + response_1 + response_2 +
...`. A 4D attention mask lets each response see the prompt and its own earlier tokens only, and its position
ids continue from the prompt's, so every response token gets the hidden state it would get in its own row,
while the prompt is computed once instead of once per response. The per-token grids stay one row per
trajectory; `Batch.rows` and `Batch.starts` say where each trajectory sits.
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
    rows: torch.Tensor | None = None  # [B] the row of `input_ids` holding each trajectory; None: row b
    starts: torch.Tensor | None = None  # [B] where each response starts in its row; None: its prompt's length
    position_ids: torch.Tensor | None = None  # [G, L] with shared prompts (`attention_mask` is then [G, 1, L, L])
    layout: SharedLayout | None = None  # with shared prompts

    @property
    def predict_positions(self) -> torch.Tensor:
        """[B, R] position (in its row) of the hidden state that predicts each response token: the prompt's
        last token for the first, the response's previous token for the others."""
        r = torch.arange(self.response_ids.shape[1])
        starts = self.prompt_lens if self.starts is None else self.starts
        pos = starts[:, None] + r[None, :] - 1  # [B, R]
        pos[:, 0] = self.prompt_lens - 1
        return pos.clamp(max=self.input_ids.shape[1] - 1)

    @property
    def row_of(self) -> torch.Tensor:
        """[B] the row of `input_ids` that holds each trajectory."""
        return torch.arange(len(self.prompt_lens)) if self.rows is None else self.rows


def collate(trajs: list[Trajectory], pad_id: int, share_prompts: bool = False) -> Batch:
    """Pad a list of trajectories; which tokens carry loss is each trajectory's `train_mask`. With
    `share_prompts`, the trajectories with one prompt share a row (`prompt_groups`; the module docstring)."""
    B = len(trajs)
    R = max(max(len(t.response_ids) for t in trajs), 1)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    train_mask = torch.zeros((B, R), dtype=torch.float32)
    prompt_lens = torch.tensor([len(t.prompt_ids) for t in trajs], dtype=torch.long)
    for b, t in enumerate(trajs):
        n = len(t.response_ids)
        if n:
            response_ids[b, :n] = torch.tensor(t.response_ids)
            response_mask[b, :n] = 1.0
            train_mask[b, :n] = torch.tensor(t.train_mask, dtype=torch.float32)
    if share_prompts:
        return _shared(trajs, pad_id, prompt_lens, response_ids, response_mask, train_mask)
    L = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, t in enumerate(trajs):
        seq = t.prompt_ids + t.response_ids
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
    return Batch(input_ids, attention_mask, prompt_lens, response_ids, response_mask, train_mask)


def prompt_groups(trajs: list[Trajectory]) -> list[list[int]]:
    """Indices of `trajs` grouped by identical prompt, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(tuple(t.prompt_ids), []).append(i)
    return list(groups.values())


@dataclass
class SharedLayout:
    """Where a shared-prompt batch's attention inputs sit, for an attention that computes only what the mask
    lets through (`workers._sdpa_fp32`): the prompts `[G, Pw]` attend causally among themselves, and each
    trajectory's response tokens `[B, R]` attend to its prompt and its own earlier tokens, gathered out of the rows
    (Pw: the widest prompt, where every row's responses begin)."""

    prompt_width: int
    prompt_mask: torch.Tensor  # [G, 1, Pw, Pw] bool
    rows: torch.Tensor  # [B] the row of each trajectory
    q_pos: torch.Tensor  # [B, R] the row positions of its response tokens (clamped past the response)
    kv_pos: torch.Tensor  # [B, Pw + R] the row positions of its keys: the prompt's slots, then its response's
    resp_mask: torch.Tensor  # [B, 1, R, Pw + R] bool
    valid: torch.Tensor  # [B, R] bool: a real response token

    def to(self, device) -> SharedLayout:
        return SharedLayout(self.prompt_width, *(t.to(device) for t in (
            self.prompt_mask, self.rows, self.q_pos, self.kv_pos, self.resp_mask, self.valid)))


def _shared(trajs: list[Trajectory], pad_id: int, prompt_lens: torch.Tensor, response_ids: torch.Tensor,
            response_mask: torch.Tensor, train_mask: torch.Tensor) -> Batch:
    """`collate` with one row per prompt: the prompt, padding up to the widest prompt, then each response in turn;
    a [G, 1, L, L] boolean mask (True: may attend) and position ids that continue from the prompt's for each
    response, and the `SharedLayout` of the same."""
    groups = prompt_groups(trajs)
    group_prompt_lens = torch.tensor([len(trajs[g[0]].prompt_ids) for g in groups])  # [G]
    Pw = int(group_prompt_lens.max())
    G, L = len(groups), Pw + max(sum(len(trajs[i].response_ids) for i in g) for g in groups)
    B, R = response_ids.shape
    input_ids = torch.full((G, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((G, L), dtype=torch.long)
    segment = torch.full((G, L), -1, dtype=torch.long)  # 0: the prompt, k: the k-th response, -1: padding
    rows = torch.zeros(B, dtype=torch.long)
    starts = torch.zeros(B, dtype=torch.long)
    for g, members in enumerate(groups):
        prompt = trajs[members[0]].prompt_ids
        P = len(prompt)
        input_ids[g, :P] = torch.tensor(prompt)
        position_ids[g, :P] = torch.arange(P)
        segment[g, :P] = 0
        at = Pw
        for k, i in enumerate(members, start=1):
            resp = trajs[i].response_ids
            rows[i], starts[i] = g, at
            if resp:
                input_ids[g, at: at + len(resp)] = torch.tensor(resp)
                position_ids[g, at: at + len(resp)] = torch.arange(P, P + len(resp))
                segment[g, at: at + len(resp)] = k
            at += len(resp)
    q, kv = segment[:, :, None], segment[:, None, :]  # [G, L, 1], [G, 1, L]
    causal = torch.ones((L, L), dtype=torch.bool).tril()  # [L, L]
    # a real key, earlier or here, in the prompt or the query's own response; padding queries see the prompt
    mask = causal & (kv >= 0) & ((kv == 0) | (kv == q))  # [G, L, L]
    q_pos = (starts[:, None] + torch.arange(R)).clamp(max=L - 1)  # [B, R]
    valid = response_mask.bool()  # [B, R]
    kv_pos = torch.cat([torch.arange(Pw).expand(B, Pw), q_pos], 1)  # [B, Pw + R]
    key_ok = torch.cat([torch.arange(Pw)[None, :] < prompt_lens[:, None], valid], 1)  # [B, Pw + R]
    seen = torch.cat([torch.ones((R, Pw), dtype=torch.bool), torch.ones((R, R), dtype=torch.bool).tril()], 1)
    prompt_seen = causal[:Pw, :Pw] & (torch.arange(Pw)[None, None, :] < group_prompt_lens[:, None, None])  # [G, Pw, Pw]
    layout = SharedLayout(Pw, prompt_seen[:, None], rows, q_pos, kv_pos,
                          (seen[None] & key_ok[:, None, :])[:, None], valid)
    return Batch(input_ids, mask[:, None], prompt_lens, response_ids, response_mask, train_mask, rows=rows,
                 starts=starts, position_ids=position_ids, layout=layout)


def row_lengths(trajs: list[Trajectory], share_prompts: bool) -> tuple[list[list[int]], list[int]]:
    """The rows `collate` makes of `trajs` (indices of the trajectories in each) and their lengths in tokens."""
    groups = prompt_groups(trajs) if share_prompts else [[i] for i in range(len(trajs))]
    return groups, [len(trajs[g[0]].prompt_ids) + sum(len(trajs[i].response_ids) for i in g) for g in groups]


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
