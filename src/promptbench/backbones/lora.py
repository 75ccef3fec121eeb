"""Low-rank adapters in the attention of open_clip's transformer towers, placed as CLIP-LoRA places them (Zanella &
Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024; MaxZanella/CLIP-LoRA
loralib/layers.py and loralib/utils.py).

An adapted projection keeps its pretrained weight W and bias b frozen and gains a trainable low-rank branch:

    h = x W^T + b + (alpha / sqrt(r)) * dropout(x) A^T B^T,    A [r, in], B [out, r]

A starts like nn.Linear's weight (kaiming_uniform, a = sqrt(5)) and B at zero, so a new adapter changes nothing. The
dropout acts on the branch's input only, with its own mask in each projection. The scaling is alpha / sqrt(r), as in
the official code (LoRA's paper uses alpha / r).

open_clip's blocks attend through nn.MultiheadAttention, whose q, k and v share one fused `in_proj`. `LoRAAttention`
takes its place: the same attention with separate q, k, v and output (o) linear maps holding the pretrained slices,
so that each projection can carry its own adapter, as the official code does. With B = 0 it gives the frozen
tower's outputs up to float rounding.

`position` names which blocks of a tower are adapted. The official tables index ViT-B's 12 layers (bottom: 0-3, mid:
4-7, up: 8-11, half-bottom: 0-5, half-up: 6-11, top3: 9-11, all: 0-11); here they are fractions of the tower's depth,
the same blocks on 12 layers and the same share of any other tower.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptbench.errors import PromptbenchError

ENCODERS = ("both", "text", "vision")
PROJECTIONS = ("q", "k", "v", "o")
# The names of an adapter's trainable tensors (the official code's are w_lora_A, w_lora_B).
LORA_TENSORS = ("lora_A", "lora_B")
# Where a position starts and stops, as fractions of the tower's depth.
POSITIONS = {
    "all": (0, 1),
    "bottom": (0, 1 / 3),
    "mid": (1 / 3, 2 / 3),
    "up": (2 / 3, 1),
    "half-bottom": (0, 1 / 2),
    "half-up": (1 / 2, 1),
}
TOP3 = "top3"


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


class LoRALinear(nn.Module):
    """A frozen linear map `base` plus the trainable low-rank branch of the module docstring."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / math.sqrt(rank)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * branch


class LoRAAttention(nn.Module):
    """nn.MultiheadAttention's self- or cross-attention (called as open_clip's blocks call it) from separate q, k, v, o
    maps; `projections` of them carry adapters. No attention dropout: the towers always run in eval mode."""

    def __init__(self, attention: nn.MultiheadAttention, projections: Sequence[str], rank: int, alpha: float,
                 dropout: float):
        super().__init__()
        self.heads = attention.num_heads
        self.batch_first = attention.batch_first
        biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None,) * 3
        pretrained = {**dict(zip("qkv", zip(attention.in_proj_weight.chunk(3), biases))),
                      "o": (attention.out_proj.weight, attention.out_proj.bias)}

        def linear(name: str) -> nn.Module:
            base = frozen_linear(*(None if t is None else t.detach() for t in pretrained[name]))
            return LoRALinear(base, rank, alpha, dropout) if name in projections else base

        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (linear(name) for name in PROJECTIONS)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """(output, None) like nn.MultiheadAttention with need_weights=False; `attn_mask` in its convention (an
        additive float mask, or a boolean one where True means "do not attend")."""
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        if attn_mask is not None:
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = self.out_proj(x.transpose(1, 2).flatten(2))
        return (x if self.batch_first else x.transpose(0, 1)), None


def layer_indices(position: str, layers: int) -> list[int]:
    """The blocks of a `layers`-deep tower that `position` adapts."""
    if position == TOP3:
        return list(range(max(layers - 3, 0), layers))
    if position not in POSITIONS:
        raise PromptbenchError(f"LoRA position '{position}' is unknown: use one of {[*POSITIONS, TOP3]}")
    start, stop = POSITIONS[position]
    return list(range(round(start * layers), round(stop * layers)))


def adaptable_blocks(transformer: nn.Module, tower: str, position: str) -> list[int]:
    """The indices of the `position` blocks of an open_clip Transformer, after checking that each can be adapted."""
    blocks = transformer.resblocks
    indices = layer_indices(position, len(blocks))
    if not indices:
        raise PromptbenchError(f"LoRA position '{position}' selects no block of the {len(blocks)}-layer {tower} "
                               f"tower: use position=all, or one that covers more layers")
    for index in indices:
        attention = getattr(blocks[index], "attn", None)
        if not (isinstance(attention, nn.MultiheadAttention) and attention.in_proj_weight is not None
                and attention.bias_k is None and not attention.add_zero_attn):
            raise PromptbenchError(
                f"block {index} of the {tower} tower attends with a {type(attention).__name__}; LoRA adapters go into "
                f"open_clip's standard nn.MultiheadAttention (one fused in_proj, no extra key/value biases)"
            )
    return indices


def adapt_blocks(transformer: nn.Module, indices: Sequence[int], projections: Sequence[str], rank: int, alpha: float,
                 dropout: float) -> None:
    """Replace the attention of blocks `indices` (from `adaptable_blocks`) by adapted `LoRAAttention`."""
    for index in indices:
        block = transformer.resblocks[index]
        block.attn = LoRAAttention(block.attn, projections, rank, alpha, dropout)


def check_options(projections: Sequence[str], rank: int, alpha: float, dropout: float) -> None:
    unknown = sorted(set(projections) - set(PROJECTIONS))
    if unknown or not projections:
        raise PromptbenchError(f"LoRA projections {list(projections)}: choose one or more of {list(PROJECTIONS)} "
                               f"(q, k, v: the attention's inputs; o: its output projection)")
    if rank < 1:
        raise PromptbenchError(f"LoRA rank must be >= 1, got {rank}")
    if not alpha > 0:
        raise PromptbenchError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise PromptbenchError(f"LoRA dropout must be in [0, 1), got {dropout}")
