"""CLIP's two towers with (deep) prompts, written out the way the official code does: the baseline that
`make bench` times promptbench against, and the independent reference the prompt-method tests check logits with.

Written from the official code, not from `Backbone` (muzairkhattak/multimodal-prompt-learning clip/model.py:
TextEncoder, VisionTransformer_MaPLe, ResidualAttentionBlock_MaPLe; CoOp's TextEncoder is the same without deep
prompts). The prompts `phrase + " " + name + "."` are tokenised to the full context length (77 for CLIP), once
(`reference_prompts`, as the reference's prompt learner does) or at every call (`reference_text_features`), and
every class runs through all of it; the activations are sequence-first [L, N, D] and the prompts of each layer are
concatenated in that layout before the layer. Only open_clip's modules are used (its blocks are batch-first
since open_clip 2.x, so each block is called on a transposed view).
"""

from __future__ import annotations

from typing import Sequence

import open_clip
import torch
from torch import nn

from promptbench.backbones import Backbone


def _block(transformer: nn.Module, block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One residual block on sequence-first `x`, whatever layout open_clip's blocks take."""
    if not getattr(transformer, "batch_first", False):
        return block(x, attn_mask=attn_mask)
    return block(x.permute(1, 0, 2), attn_mask=attn_mask).permute(1, 0, 2)


def reference_prompts(backbone: Backbone, classnames: Sequence[str], n_ctx: int,
                      phrase: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the reference's prompt learner builds once: the token ids [n_cls, context_length] of
    `phrase + " " + name + "."` (default phrase: one "X" per context vector) and their embeddings."""
    model = backbone.model
    names = [name.replace("_", " ") for name in classnames]
    phrase = " ".join(["X"] * n_ctx) if phrase is None else phrase
    tokens = open_clip.tokenize([f"{phrase} {name}." for name in names], context_length=backbone.context_length)
    tokens = tokens.to(model.token_embedding.weight.device)
    with torch.no_grad():
        return tokens, model.token_embedding(tokens)


def reference_text_tower(backbone: Backbone, tokens: torch.Tensor, embedding: torch.Tensor, ctx: torch.Tensor,
                         deeper: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Unnormalised text features [n_cls, embed_dim] of the prompts of `reference_prompts`, every class through
    the full context length: token positions 1..n_ctx are the context `ctx` ([n_ctx, d], or [1, n_ctx, d]) at the
    input, and `deeper[i-1]` ([n_ctx, d]) at the input of text block i for 1 <= i <= len(deeper); the EOT feature
    @ text_projection."""
    model = backbone.model
    n_ctx, n_cls = ctx.shape[-2], len(tokens)
    ctx = ctx.reshape(1, n_ctx, -1).expand(n_cls, -1, -1).to(embedding.dtype)
    x = torch.cat([embedding[:, :1], ctx, embedding[:, 1 + n_ctx:]], dim=1) + model.positional_embedding
    x = x.permute(1, 0, 2)  # NLD -> LND
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deeper):
            context = deeper[i - 1].to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x[:1], context, x[1 + n_ctx:]], dim=0)
        x = _block(model.transformer, block, x, attn_mask=model.attn_mask)
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(n_cls, device=x.device), tokens.argmax(dim=-1)] @ model.text_projection


def reference_text_features(backbone: Backbone, classnames: Sequence[str], ctx: torch.Tensor,
                            deeper: Sequence[torch.Tensor] = (), phrase: str | None = None) -> torch.Tensor:
    """`reference_text_tower` of prompts tokenised at this call (`reference_prompts`)."""
    return reference_text_tower(backbone, *reference_prompts(backbone, classnames, ctx.shape[-2], phrase), ctx, deeper)


def reference_image_features(backbone: Backbone, images: torch.Tensor,
                             prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Unnormalised image features of a ViT tower with deep visual prompts: `prompts[0]` ([n, width]) appended
    to the patch tokens after the positional embedding, before ln_pre; at the input of block i
    (1 <= i < len(prompts)) the last n tokens replaced by `prompts[i]`; ln_post(CLS) @ proj. No prompts: the
    plain tower (open_clip's encode_image)."""
    if not prompts:
        return backbone.model.encode_image(images)
    visual = backbone.model.visual
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    n = prompts[0].shape[0]
    x = visual.ln_pre(torch.cat([x, prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1))
    x = x.permute(1, 0, 2)  # NLD -> LND
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i < len(prompts):
            x = torch.cat([x[:-n], prompts[i].to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)], dim=0)
        x = _block(visual.transformer, block, x)
    return visual.ln_post(x.permute(1, 0, 2)[:, 0]) @ visual.proj
