"""The token heads: log-probs (and entropies) or values at the selected response tokens only.

Only the hidden states at the positions that predict loss-carrying tokens go through the vocabulary (or value)
head, never the whole sequence; the results are scattered back onto the [batch, response_len] grid.
"""

from __future__ import annotations

import torch

from zerosearch.algos import entropy_from_logits
from zerosearch.config import Config
from zerosearch.training.batch import Batch


class _Selected(torch.nn.Module):
    """The causal LM's transformer as one module whose forward returns the hidden states [N, H] at the
    positions predicting selected response tokens. Being the FSDP root, its forward also gathers the
    embeddings and the tied vocabulary head, so gradients through them are reduced like the rest."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def hidden(self, input_ids, attention_mask, b_idx, pos, autocast: torch.dtype | None,
               position_ids=None, layout=None) -> torch.Tensor:
        """`b_idx`, `pos` [N]: the row and position of each selected hidden state; `position_ids`, a 4D
        `attention_mask` and `layout` with shared prompts (`batch.collate`; `layout` goes to the attention
        function, which may use it to skip what the mask hides)."""
        if attention_mask.dim() == 4 and self.lm.config._attn_implementation == "eager":
            # eager attention adds its mask to the scores: 0 where a key is seen, the lowest float where not
            attention_mask = torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill_(
                ~attention_mask, torch.finfo(torch.float32).min)
        with torch.autocast(input_ids.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            extra = {} if layout is None else {"shared_layout": layout}
            out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     **extra)
        return out.last_hidden_state[b_idx, pos].float()  # [N, H]


class TokenLogProbs(_Selected):
    """forward -> (log-probs [N], entropies [N] or None) of the target tokens under `softmax(logits / T)`.

    T is the temperature the rollout sampled at, so the PPO ratio and the KL compare the distribution that
    produced the samples (verl divides the logits the same way). The vocabulary head's forward always runs in
    fp32, so log-probs keep full precision under autocast; its backward runs in the autocast dtype
    (`_HeadLogProbs`). Only the N selected positions ever produce logits.
    The entropy has a gradient only with `entropy_grad` (an entropy bonus); as a metric it is detached."""

    def forward(self, input_ids, attention_mask, b_idx, pos, position_ids, layout, targets, with_entropy: bool = False,
                autocast: torch.dtype | None = None, temperature: float = 1.0, entropy_grad: bool = False):
        h = self.hidden(input_ids, attention_mask, b_idx, pos, autocast, position_ids, layout)  # [N, H]
        head = self.lm.get_output_embeddings()
        if head.bias is None and not entropy_grad:
            return _HeadLogProbs.apply(h, head.weight, targets, temperature, autocast, with_entropy)
        logits = torch.nn.functional.linear(h, head.weight.float(), None if head.bias is None else head.bias.float())  # [N, V]
        if temperature != 1.0:
            logits = logits.div_(temperature)  # in place: the head's backward does not need its output
        lp = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [N]
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach()) if with_entropy else None  # [N]
        return lp, entropy


class _HeadLogProbs(torch.autograd.Function):
    """``lp = log_softmax(h W^T / T)[target]`` with the forward in fp32 and the backward's two vocabulary-sized
    matmuls in `grad_dtype` (the autocast dtype, or fp32 when None).

    The forward is in fp32 as plain autograd's (equal to float rounding), so log-probs (and the PPO ratio and KL built
    on them) keep full precision. The backward needs only ``dlp/dlogits = (onehot(target) - softmax) / T``; its
    products with W (for dh) and with h (for dW) are ~2/3 of the head's FLOPs and, in fp32, ~2 s of a W1 step.
    In bf16 (fp32 accumulation) they run ~3x faster, like the rest of the transformer's backward under autocast;
    the gradient differs from fp32 by bf16's rounding of its inputs, as every other autocast matmul's does.
    The forward exponentiates once: the logsumexp, the entropy and the softmax come from the same [N, V] tensor,
    which is kept (the logits are not) and turned into the gradient in place, so the backward allocates no second
    [N, V] fp32 tensor; it can therefore run once (`retain_graph` would be refused). The entropy, when asked for,
    is a detached metric computed in the forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature: float, grad_dtype: torch.dtype | None, with_entropy: bool):
        logits = torch.nn.functional.linear(h, weight.float())  # [N, V] fp32
        if temperature != 1.0:
            logits = logits.div_(temperature)
        # one exponentiation gives the logsumexp, the entropy and the softmax the backward needs
        top = logits.amax(dim=-1, keepdim=True)  # [N, 1]
        probs = torch.sub(logits, top).exp_()  # [N, V], unnormalised
        total = probs.sum(dim=-1)  # [N]
        lse = top.squeeze(-1) + total.log()  # [N]
        lp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # [N]
        entropy = lse - torch.linalg.vecdot(probs, logits) / total if with_entropy else None  # [N], no gradient
        del logits
        probs = probs.div_(total[:, None])  # the softmax
        ctx.save_for_backward(h, weight, targets, probs)
        ctx.temperature, ctx.grad_dtype, ctx.used = temperature, grad_dtype, False
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return lp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp, _grad_entropy):
        if ctx.used:
            raise RuntimeError("the vocabulary head's backward reuses its saved softmax and runs once; "
                               "backward(retain_graph=True) twice through it is not supported")
        ctx.used = True
        h, weight, targets, probs = ctx.saved_tensors
        g = grad_lp / ctx.temperature  # [N]
        grad_logits = probs.mul_(-g[:, None])  # [N, V]: -g * softmax, in place
        grad_logits.scatter_add_(-1, targets[:, None], g[:, None])  # + g at the target
        dtype = ctx.grad_dtype or torch.float32
        grad_logits = grad_logits.to(dtype)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_logits @ weight.to(dtype)).to(h.dtype)  # [N, H]
        if ctx.needs_input_grad[1]:
            grad_w = (grad_logits.T @ h.to(dtype)).to(weight.dtype)  # [V, H]
        return grad_h, grad_w, None, None, None, None


class TokenValues(_Selected):
    """PPO's value model: the policy's transformer with a scalar head; forward -> values [N]."""

    def __init__(self, lm):
        super().__init__(lm)
        self.value_head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, b_idx, pos, position_ids, layout,
                autocast: torch.dtype | None = None):
        return self.value_head(self.hidden(input_ids, attention_mask, b_idx, pos, autocast, position_ids,
                                           layout)).squeeze(-1)  # [N]


def logprob_temperature(cfg: Config) -> float:
    """The temperature of the trainer's log-probs and entropies: the training rollouts' (`rollout.temperature`),
    1 for greedy rollouts (temperature 0), whose distribution is a point mass."""
    return cfg.rollout.temperature or 1.0


def selected_inputs(batch: Batch, select: torch.Tensor, device) -> tuple:
    """The heads' inputs for the tokens `select` [B, R] marks: (input_ids, attention_mask, row [N], pos [N],
    position_ids, layout) on `device`, and where those tokens sit on the grid, (b_idx [N], r_idx [N])."""
    b_idx, r_idx = select.nonzero(as_tuple=True)  # [N], [N]
    pos = batch.predict_positions[b_idx, r_idx]  # [N]
    position_ids = None if batch.position_ids is None else batch.position_ids.to(device)
    layout = None if batch.layout is None else batch.layout.to(device)
    args = (batch.input_ids.to(device), batch.attention_mask.to(device), batch.row_of[b_idx].to(device),
            pos.to(device), position_ids, layout)
    return args, (b_idx.to(device), r_idx.to(device))


def to_grid(values: torch.Tensor, where: tuple, shape, device) -> torch.Tensor:
    """Values [N] of the selected tokens scattered onto a zero [B, R] grid."""
    return torch.zeros(shape, dtype=torch.float32, device=device).index_put(where, values.float())  # [B, R]


def token_logprobs(net, batch: Batch, select: torch.Tensor, device, with_entropy: bool = False,
                   autocast: torch.dtype | None = None, temperature: float = 1.0, entropy_grad: bool = False):
    """Log-probs (and entropies) of the selected response tokens at `temperature`, on the [B, R] grid (0
    elsewhere).

    `net`: a TokenLogProbs, or a plain causal LM (wrapped here)."""
    if not isinstance(net, TokenLogProbs):
        net = TokenLogProbs(net)
    args, where = selected_inputs(batch, select, device)
    targets = batch.response_ids[where[0].cpu(), where[1].cpu()].to(device)  # [N]
    lp, ent = net(*args, targets, with_entropy=with_entropy, autocast=autocast, temperature=temperature,
                  entropy_grad=entropy_grad)
    entropy = to_grid(ent, where, select.shape, device) if ent is not None else None
    return to_grid(lp, where, select.shape, device), entropy


def token_values(net: TokenValues, batch: Batch, select: torch.Tensor, device,
                 autocast: torch.dtype | None = None) -> torch.Tensor:
    """The value model's values of the selected response tokens, on the [B, R] grid (0 elsewhere)."""
    args, where = selected_inputs(batch, select, device)
    return to_grid(net(*args, autocast=autocast), where, select.shape, device)  # [B, R]
