"""Learned prompt context (CoOp, CoCoOp): the one place that turns context vectors into text features.

Prompt layout of the reference CoOp: [SOS][V1..VM][class-name tokens][.][EOS], with the class tokens at
the end, in the middle (between the two halves of the context) or at the front. Class names are
tokenised once per class set and their embeddings kept as buffers; only the context is a Parameter.
Buffers stop after the longest prompt's EOS: attention is causal, so the EOS feature never depends on
the padding behind it and the text encoder sees ~20 tokens instead of 77. With one context for all classes
and the class name at the end, every prompt starts with the same tokens ([SOS][V1..VM], and any fixed words
that all class prompts continue with): the backbone runs that shared prefix once and only the class-specific
rest per class (`Backbone.encode_shared_prefix`, option `speed.shared_prefix`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from promptbench.backbones import Backbone, load_backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.base import read_learned
from promptbench.methods.prompts import readable_classname

log = logging.getLogger(__name__)

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
# How ctx_init becomes context. "all" (CoOp): every token of the phrase is a learned vector and n_ctx is the
# phrase's length. "first_n_ctx" (IVLP, MaPLe, PromptSRC): the first n_ctx tokens are learned, the rest of
# the phrase stays as fixed words before the class name ("[c1][c2] of a {class}." for n_ctx 2).
CTX_INIT_LEARNED = ("all", "first_n_ctx")
# Stand-in word tokenised at the context positions; its embeddings are replaced by the context vectors.
PLACEHOLDER = "X"
CONTEXT_INIT_STD = 0.02
CONTEXT_KEY = "prompt_learner.ctx"


class PromptLearner(nn.Module):
    """Context vectors plus the fixed token embeddings of every class prompt.

    `ctx` is [M, ctx_dim] (unified: one context shared by all classes) or [n_cls, M, ctx_dim]
    (class-specific, `csc`). The backbone is passed to each call rather than stored, so the frozen CLIP
    weights never become part of this module's state.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        n_ctx: int,
        ctx_init: str | None,
        csc: bool,
        class_token_position: str,
        ctx_init_learned: str,
    ):
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise PromptbenchError(
                f"class_token_position='{class_token_position}' is unknown: use one of {list(CLASS_TOKEN_POSITIONS)}"
            )
        if ctx_init_learned not in CTX_INIT_LEARNED:
            raise PromptbenchError(f"ctx_init_learned='{ctx_init_learned}' is unknown: use one of {list(CTX_INIT_LEARNED)}")
        self.csc = bool(csc)
        self.class_token_position = class_token_position
        self.classnames: list[str] = []
        # The text between SOS and the class name; its first n_ctx tokens are the learned context.
        self.prompt_prefix = None
        if ctx_init and ctx_init_learned == "first_n_ctx":
            vectors = self._phrase_vectors(backbone, ctx_init)
            if not 1 <= int(n_ctx) <= len(vectors):
                raise PromptbenchError(
                    f"n_ctx={n_ctx} with ctx_init='{ctx_init}' ({len(vectors)} tokens): the learned context is the "
                    f"phrase's first n_ctx tokens, so 1 <= n_ctx <= {len(vectors)}. For more (random) context set "
                    f"ctx_init=null, which is what the reference does when n_ctx exceeds 4."
                )
            if int(n_ctx) < len(vectors) and class_token_position != "end":
                raise PromptbenchError(
                    f"class_token_position='{class_token_position}' cannot keep the fixed words of ctx_init "
                    f"'{ctx_init}' in place: use class_token_position=end, or n_ctx={len(vectors)}"
                )
            vectors = vectors[: int(n_ctx)]
            self.prompt_prefix = ctx_init.replace("_", " ").strip()
        elif ctx_init:
            vectors = self._phrase_vectors(backbone, ctx_init)
            if int(n_ctx) != len(vectors):
                log.info("ctx_init '%s' has %d tokens: n_ctx=%d is replaced by %d", ctx_init, len(vectors), n_ctx,
                         len(vectors))
            if self.csc:
                vectors = vectors.expand(len(classnames), -1, -1).clone()
        else:
            if int(n_ctx) < 1:
                raise PromptbenchError(f"n_ctx={n_ctx}: a learned prompt needs at least one context vector (n_ctx >= 1)")
            shape = (len(classnames), int(n_ctx), backbone.ctx_dim) if self.csc else (int(n_ctx), backbone.ctx_dim)
            vectors = torch.empty(shape)
            nn.init.normal_(vectors, std=CONTEXT_INIT_STD)
        # The context is trained in fp32 even when mixed precision runs the encoder in half.
        self.ctx = nn.Parameter(vectors.float())
        self.set_classes(backbone, classnames)

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[-2])

    @staticmethod
    def _phrase_vectors(backbone: Backbone, phrase: str) -> torch.Tensor:
        """Token embeddings of an initialisation phrase such as "a photo of a": one context vector per token."""
        phrase = phrase.replace("_", " ").strip()
        tokens = backbone.tokenize([phrase])
        n_tokens = int(backbone.eos_positions(tokens)[0]) - 1
        if n_tokens < 1:
            raise PromptbenchError(f"ctx_init='{phrase}' has no tokens; give a phrase such as 'a photo of a' or null")
        with torch.no_grad():
            return backbone.embed_tokens(tokens)[0, 1 : 1 + n_tokens].detach().cpu()

    def set_classes(self, backbone: Backbone, classnames: Sequence[str]) -> None:
        """Tokenise the prompts of a class set once and keep their fixed embeddings as buffers."""
        classnames = list(classnames)
        if self.csc and self.classnames and classnames != self.classnames:
            raise PromptbenchError(
                f"class-specific context (csc=true) holds one context per training class ({len(self.classnames)}) and "
                f"cannot be moved to another class set ({len(classnames)} classes); train with csc=false to transfer"
            )
        n_ctx, limit = self.n_ctx, backbone.context_length
        prefix = self.prompt_prefix or " ".join([PLACEHOLDER] * n_ctx)
        prefix_length = int(backbone.eos_positions(backbone.tokenize([prefix]))[0]) - 1
        names = [readable_classname(name) for name in classnames]
        name_lengths = backbone.eos_positions(backbone.tokenize(names)) - 1
        # SOS + context + name + "." + EOS must fit: the tokenizer would otherwise silently cut the name.
        too_long = [name for name, length in zip(names, name_lengths.tolist())
                    if 1 + prefix_length + length + 2 > limit]
        if too_long:
            raise PromptbenchError(
                f"prompt longer than the text encoder's {limit} tokens for class name(s) {too_long[:3]} with "
                f"{n_ctx} context tokens; use a smaller n_ctx or a shorter ctx_init phrase"
            )
        tokens = backbone.tokenize([prefix + " " + name + "." for name in names])
        eos = backbone.eos_positions(tokens)
        length = int(eos.max()) + 1
        with torch.no_grad():
            embeddings = backbone.embed_tokens(tokens[:, :length])
        device = embeddings.device
        self.register_buffer("token_prefix", embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embeddings[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eos", eos.to(device), persistent=False)
        order = token_order(self.class_token_position, n_ctx, name_lengths.tolist(), length)
        self.register_buffer("order", None if order is None else order.to(device), persistent=False)
        # Tokens after the context that every class prompt has in common (fixed words of ctx_init "first_n_ctx"):
        # they belong to the shared prefix. Every class keeps at least its EOS token out of it.
        rest = tokens[:, 1 + n_ctx : length]
        common = int((rest == rest[:1]).all(dim=0).int().cumprod(dim=0).sum())
        self.shared_words = min(common, int(eos.min()) - 1 - n_ctx)
        self.classnames = classnames

    def prompts(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings [*batch, n_cls, L, ctx_dim] for context `ctx` (default: the learned one).

        `ctx` broadcasts against [n_cls, M, ctx_dim]: [M, d] is shared by all classes, [n_cls, M, d] is
        class-specific, and [B, 1, M, d] gives every image its own context (CoCoOp).
        """
        ctx = self.ctx if ctx is None else ctx
        ctx = ctx.to(self.token_prefix.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)
        n_cls = self.token_prefix.shape[0]
        batch = ctx.shape[:-3]
        prompts = torch.cat(
            [
                self.token_prefix.expand(*batch, -1, -1, -1),
                ctx.expand(*batch, n_cls, -1, -1),
                self.token_suffix.expand(*batch, -1, -1, -1),
            ],
            dim=-2,
        )
        if self.order is None:
            return prompts
        index = self.order.unsqueeze(-1).expand(*prompts.shape)
        return prompts.gather(-2, index)

    def class_prompts(self, labels: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [B, L, ctx_dim]: for each b, the prompt of class `labels[b]` with its own context
        `ctx[b]` ([B, M, ctx_dim]), e.g. SHIP's synthesized prompts. One prompt per sample, not one per class."""
        ctx = ctx.to(self.token_prefix.dtype)
        prompts = torch.cat([self.token_prefix[labels], ctx, self.token_suffix[labels]], dim=-2)
        if self.order is None:
            return prompts
        return prompts.gather(-2, self.order[labels].unsqueeze(-1).expand(*prompts.shape))

    def class_text_features(self, backbone: Backbone, labels: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features [B, embed_dim] of `class_prompts(labels, ctx)`, in one encoder pass."""
        return backbone.encode_text_embeddings(self.class_prompts(labels, ctx), self.eos[labels])

    def shares_prefix(self, ctx: torch.Tensor) -> bool:
        """Whether every class prompt of context `ctx` starts with the same tokens: one context for all classes
        ([M, d], or [B, 1, M, d] one per image) and the class name at the end."""
        return self.order is None and (ctx.dim() == 2 or ctx.shape[-3] == 1)

    def text_features(self, backbone: Backbone, ctx: torch.Tensor | None = None,
                      deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Unnormalised text features [*batch, n_cls, embed_dim] of the prompts of `ctx`, in one encoder pass (or,
        for a shared prefix, one pass of the prefixes and one of the class-specific rest).

        `deep_prompts`: context for text layers 1, 2, ... (the deep scheme, `Backbone.encode_text_embeddings`),
        replacing the n_ctx context positions after SOS; needs class_token_position end.
        Prompts that share a prefix (`shares_prefix`) go through `Backbone.encode_shared_prefix`, the others
        through the full pass; the two give equal features.
        """
        ctx = self.ctx if ctx is None else ctx
        layers = (self.ctx, *deep_prompts) if deep_prompts else ()
        n_cls = self.token_prefix.shape[0]
        if self.shares_prefix(ctx):
            batch = ctx.shape[:-3]
            contexts = ctx.to(self.token_prefix.dtype).reshape(-1, *ctx.shape[-2:])  # [P, M, d]
            shared, n_prefixes = self.shared_words, len(contexts)
            prefixes = torch.cat([self.token_prefix[:1].expand(n_prefixes, -1, -1), contexts,
                                  self.token_suffix[:1, :shared].expand(n_prefixes, -1, -1)], dim=1)
            features = backbone.encode_shared_prefix(prefixes, self.token_suffix[:, shared:],
                                                     self.eos - prefixes.shape[1], deep_prompts=layers)
            return features.view(*batch, n_cls, -1)
        prompts = self.prompts(ctx)
        batch = prompts.shape[:-3]
        flat = prompts.reshape(-1, *prompts.shape[-2:])
        eos = self.eos.repeat(flat.shape[0] // n_cls)
        return backbone.encode_text_embeddings(flat, eos, deep_prompts=layers).view(*batch, n_cls, -1)


def deep_prompt_parameters(layers: int, n_tokens: int, width: int) -> nn.ParameterList:
    """`layers` sets of `n_tokens` learnable prompt tokens, N(0, 0.02) like every deep prompt of the references."""
    prompts = nn.ParameterList()
    for _ in range(max(int(layers), 0)):
        tokens = torch.empty(int(n_tokens), int(width))
        nn.init.normal_(tokens, std=CONTEXT_INIT_STD)
        prompts.append(nn.Parameter(tokens))
    return prompts


def token_order(position: str, n_ctx: int, name_lengths: Sequence[int], length: int) -> torch.Tensor | None:
    """Per class, where each token of the class-at-end layout goes for `position` (None: end, no reordering).

    The end layout is [SOS][ctx 1..M][name][.][EOS]...; "middle" puts the name between ctx[:M//2] and
    ctx[M//2:], "front" puts it before the whole context. Tokens from "." on keep their places.
    """
    if position == "end":
        return None
    rows = []
    for name_length in name_lengths:
        context = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + name_length))
        half = n_ctx // 2
        middle = context[:half] + name + context[half:] if position == "middle" else name + context
        rows.append([0, *middle, *range(1 + n_ctx + name_length, length)])
    return torch.tensor(rows, dtype=torch.long)


# ---- interpretation ---------------------------------------------------------------------------------
def nearest_words(backbone: Backbone, vectors: torch.Tensor, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each vector [*, ctx_dim], the `top_k` vocabulary tokens closest in Euclidean distance (CoOp paper)."""
    vocabulary = backbone.model.token_embedding.weight.detach().float().cpu()
    flat = vectors.detach().float().cpu().reshape(-1, vocabulary.shape[1])
    if flat.shape[1] != vocabulary.shape[1]:
        raise PromptbenchError(
            f"context vectors have width {flat.shape[1]} but backbone '{backbone.name}' embeds tokens in "
            f"{vocabulary.shape[1]} dimensions: pass the backbone the prompts were learned with"
        )
    distances, ids = torch.cdist(flat, vocabulary).topk(min(top_k, vocabulary.shape[0]), dim=1, largest=False)
    decode = backbone.tokenizer.decode
    return [
        [(decode([token]).strip(), float(distance)) for token, distance in zip(row_ids.tolist(), row_distances.tolist())]
        for row_ids, row_distances in zip(ids, distances)
    ]


def interpret_learned(path: str | Path, backbone_config: str | Path | None = None, top_k: int = 5) -> str:
    """A table of the nearest vocabulary words of every learned context vector in `path`."""
    from omegaconf import OmegaConf

    state, metadata = read_learned(path)
    if CONTEXT_KEY not in state:
        raise PromptbenchError(f"{path} holds no learned prompt context ('{CONTEXT_KEY}'); was it saved by CoOp/CoCoOp?")
    if backbone_config is not None:
        described = OmegaConf.to_container(OmegaConf.load(backbone_config), resolve=True)
    elif "backbone" in metadata:
        described = metadata["backbone"]
    else:
        raise PromptbenchError(f"{path} does not name its backbone: pass --backbone-config conf/backbone/<name>.yaml")
    backbone = load_backbone(described["name"], described["model_name"], described.get("pretrained"),
                             cache_dir=described.get("cache_dir"))
    ctx = state[CONTEXT_KEY]
    words = nearest_words(backbone, ctx, top_k)
    n_ctx = ctx.shape[-2]
    # [n_ctx, d] unified, [n_cls, n_ctx, d] class-specific, [prompts, 1 or n_cls, n_ctx, d] an ensemble (UPL)
    per_class = ctx.dim() >= 3 and ctx.shape[-3] > 1
    classnames = metadata.get("classnames") or [f"class {i}" for i in range(ctx.shape[-3] if per_class else 0)]
    rows = ctx.shape[-3] * n_ctx if ctx.dim() >= 3 else n_ctx
    labels = []
    for i in range(len(words)):
        prompt, within = divmod(i, rows)
        label = f"{classnames[within // n_ctx]} #{within % n_ctx + 1}" if per_class else f"#{within % n_ctx + 1}"
        labels.append(f"prompt {prompt + 1} {label}" if ctx.dim() == 4 else label)
    width = max(len(label) for label in [*labels, "context"]) + 2
    header = f"{'context':<{width}}" + "".join(f"{f'nearest {k + 1}':<24}" for k in range(len(words[0])))
    lines = [
        f"{metadata.get('method', 'prompt')} context from {path} ({n_ctx} vectors, backbone {backbone.name}); "
        f"nearest vocabulary tokens by Euclidean distance in the token-embedding space:",
        header.rstrip(),
    ]
    for label, row in zip(labels, words):
        cells = "".join(f"{f'{word} ({distance:.3f})':<24}" for word, distance in row)
        lines.append(f"{label:<{width}}{cells}".rstrip())
    return "\n".join(lines)
