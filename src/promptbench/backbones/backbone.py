"""One `Backbone` object around an open_clip CLIP: what every method needs, and nothing it must not touch."""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from promptbench.backbones import lora, weights
from promptbench.errors import PromptbenchError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
# `pretrained: bundled` means the weights shipped inside the package for that model config.
BUNDLED = "bundled"
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "assets"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_INIT = ("", "none", "random")
# Random-init backbones are seeded independently of the run seed, so `tiny` is one fixed model everywhere.
RANDOM_INIT_SEED = 0
MEANINGLESS_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! backbone '{name}' has RANDOM weights: accuracy numbers from it are meaningless.\n"
    "!! Use it for tests and smoke runs only.\n" + "!" * 78
)


def register_model_configs() -> None:
    """Make promptbench's own model configs (tiny, mini) known to open_clip like its built-ins."""
    if "promptbench-tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


class Backbone(nn.Module):
    """A frozen CLIP: image encoder, text-encoder parts, tokenizer, normalisation and identity."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        model_name: str,
        pretrained: str,
        tokenizer: Any,
        mean: Sequence[float],
        std: Sequence[float],
        fingerprint: str,
    ):
        super().__init__()
        if not isinstance(model, open_clip.CLIP):
            raise PromptbenchError(
                f"backbone '{name}' ({model_name}) is a {type(model).__name__}; promptbench needs an open_clip "
                f"CLIP with the standard text transformer (token embedding, causal transformer, ln_final)."
            )
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.model_name = model_name
        self.pretrained = pretrained
        self.tokenizer = tokenizer
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.fingerprint = fingerprint
        self.text_pool_type = getattr(model, "text_pool_type", "argmax")
        self.speed = {"compile_text": False, "channels_last": False, "shared_prefix": False, "text_chunk": None}
        self._text_tower = self._run_text_tower
        self._prefix_tower, self._suffix_tower = self._run_prefix, self._run_suffixes
        if self.text_pool_type not in ("argmax", "eos"):
            raise PromptbenchError(
                f"backbone '{name}' pools its text features with '{self.text_pool_type}'; promptbench's prompt "
                f"encoder reads the EOS token ('argmax' or 'eos' pooling)."
            )

    def train(self, mode: bool = True) -> "Backbone":
        # The towers are frozen: BatchNorm statistics and dropout must never switch to training behaviour. Low-rank
        # adapters are learned: their dropout follows the mode.
        super().train(False)
        for adapter in self.lora_layers():
            adapter.train(mode)
        return self

    @cached_property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if not isinstance(
            self.model.text_projection, nn.Linear
        ) else int(self.model.text_projection.out_features)

    @property
    def ctx_dim(self) -> int:
        return int(self.model.token_embedding.embedding_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.positional_embedding.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def accelerate(self, compile_text: bool = False, channels_last: bool = False, shared_prefix: bool = False,
                   text_chunk: int | None = None) -> "Backbone":
        """Execution options that leave the numbers unchanged up to float rounding (equality-tested).

        `compile_text`: torch.compile the text transformer (the full pass and the shared-prefix passes). It
        specialises to the first prompt length (on CPU 1.8x faster than compiling for dynamic shapes); another
        class set's length recompiles once, dynamically.
        `channels_last`: NHWC memory layout for the image tower, which convolution kernels prefer (RN towers).
        These two change the backbone and stay on once set.
        `shared_prefix`: prompts that start with the same tokens run them once (`encode_shared_prefix`).
        `text_chunk`: encode at most this many prompts at a time, each chunk under activation checkpointing when
        gradients are recorded, so the text step's peak memory grows with the chunk, not with the class count
        (None: all at once). These two are read at every call and follow the latest setting.
        """
        if text_chunk is not None and int(text_chunk) < 1:
            raise PromptbenchError(f"speed.text_chunk must be a positive number of prompts or null (off), got {text_chunk}")
        if compile_text and not self.speed["compile_text"]:
            self._text_tower = torch.compile(self._run_text_tower)
            self._prefix_tower, self._suffix_tower = torch.compile(self._run_prefix), torch.compile(self._run_suffixes)
        if channels_last and not self.speed["channels_last"]:
            self.model.visual.to(memory_format=torch.channels_last)
        self.speed = {"compile_text": self.speed["compile_text"] or bool(compile_text),
                      "channels_last": self.speed["channels_last"] or bool(channels_last),
                      "shared_prefix": bool(shared_prefix), "text_chunk": None if text_chunk is None else int(text_chunk)}
        return self

    def encode_image(self, images: torch.Tensor, deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Image features; `deep_prompts` (ViT towers only) are learnable tokens, one tensor per prompted layer.

        The official deep scheme (VPT-deep, IVLP, MaPLe, PromptSRC): `deep_prompts[0]` ([n, width], or
        [B, n, width] per image) is appended to the patch tokens after the positional embedding, before
        `ln_pre`; at the input of layer i (1 <= i < len), the last n tokens are replaced by `deep_prompts[i]`.
        The class token is pooled, so the prompts act through attention only. No prompts: the plain tower.
        """
        layout = torch.channels_last if self.speed["channels_last"] else torch.preserve_format
        images = images.to(self.dtype, memory_format=layout)
        if not deep_prompts:
            return self.model.encode_image(images)
        visual = self.prompted_vision_tower()
        self.check_prompt_depth("image", len(deep_prompts))
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(torch.cat([x, _per_sample(deep_prompts[0], x)], dim=1))
        x = self._prompted_blocks(visual.transformer, x, deep_prompts, start=-deep_prompts[0].shape[-2])
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB pixels [B, 3, H, W] -> the tower's input, as the test transform's `Normalize` computes it
        (same float operations, so equal to the bit): for the attacks that run in pixel space and normalise inside
        the differentiable function (robustness.py)."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def encode_image_spatial(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global [B, D], spatial [B, L, D]): the image feature, the very tensor `encode_image` returns, and one
        feature per spatial position in the same embedding space (CALIP's parameter-free attention reads both).

        As ZiyuGuo99/CALIP's modified `clip/model.py` computes them: a ResNet tower runs its attention pool with every
        position of the last feature map as a query, not only the mean token, so each of the H x W outputs went
        through the pool's value and output projections (row 0, the mean-token query, is the global feature); a ViT
        tower puts every patch token through `ln_post` and the projection, like its class token. Other towers are
        refused with a message naming the supported ones.
        """
        layout = torch.channels_last if self.speed["channels_last"] else torch.preserve_format
        images = images.to(self.dtype, memory_format=layout)
        visual = self.model.visual
        if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
            x = visual.stem(images)
            for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                x = stage(x)
            tokens = _attention_pool_every_query(visual.attnpool, x)
            return tokens[0], tokens[1:].transpose(0, 1)
        if (isinstance(visual, open_clip.transformer.VisionTransformer) and visual.attn_pool is None
                and visual.pool_type == "tok" and not visual.final_ln_after_pool):
            pooled, tokens = visual._pool(visual.transformer(visual._embeds(images)))
            if visual.proj is None:
                return pooled, tokens
            return pooled @ visual.proj, tokens @ visual.proj
        raise PromptbenchError(
            f"spatial image features need an open_clip ModifiedResNet (RN50, RN101, mini) or a ViT that pools its "
            f"class token after ln_post (OpenAI/LAION-style: vit_b16, vit_b32, mini_vit); backbone '{self.name}' "
            f"({self.model_name}) has a {type(visual).__name__}"
            + (f" pooling with '{visual.pool_type}'" if isinstance(visual, open_clip.transformer.VisionTransformer)
               else "") + ". Use one of those backbones."
        )

    def prompted_vision_tower(self, method: str | None = None) -> nn.Module:
        """The image tower if it can take deep prompts; otherwise a clear error naming what cannot run."""
        visual = self.model.visual
        who = f"method '{method}' needs" if method else "deep visual prompts need"
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise PromptbenchError(
                f"{who} a ViT image tower, but backbone '{self.name}' ({self.model_name}) has a "
                f"{type(visual).__name__} (convolutional): visual prompts are tokens and a CNN has none. "
                f"Use a ViT backbone (backbone=vit_b16, vit_b32, or mini_vit offline)."
            )
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise PromptbenchError(
                f"{who} a ViT that pools its class token (pool_type 'tok', no attentional pooler); backbone "
                f"'{self.name}' ({self.model_name}) pools with '{visual.pool_type}'"
                f"{' and an attentional pooler' if visual.attn_pool is not None else ''}, which would mix the "
                f"prompt tokens into the feature. Use an OpenAI/LAION-style CLIP ViT."
            )
        return visual

    def add_lora(self, encoders: str, position: str, projections: Sequence[str], rank: int, alpha: float,
                 dropout: float, method: str | None = None) -> dict[str, list[int]]:
        """Low-rank adapters (lora.py) in the attention of the `position` blocks of the text tower, the image tower or
        both (`encoders`: text, vision or both); returns the adapted block indices of each tower. The backbone
        changes in place: build one for each method that adapts it. A convolutional image tower is refused."""
        if encoders not in lora.ENCODERS:
            raise PromptbenchError(f"LoRA encoders='{encoders}': use one of {list(lora.ENCODERS)}")
        lora.check_options(projections, rank, alpha, dropout)
        towers = {"text": self.model.transformer} if encoders in ("text", "both") else {}
        if encoders in ("vision", "both"):
            visual = self.model.visual
            if not isinstance(visual, open_clip.transformer.VisionTransformer):
                who = f"method '{method}' with" if method else "LoRA with"
                kind = " (convolutional)" if isinstance(visual, open_clip.modified_resnet.ModifiedResNet) else ""
                raise PromptbenchError(
                    f"{who} encoders={encoders} adapts the attention of a ViT image tower, but backbone '{self.name}' "
                    f"({self.model_name}) has a {type(visual).__name__}{kind}, which has no open_clip transformer "
                    f"blocks. Use encoders=text (adapters in the text tower only), or a ViT backbone "
                    f"(backbone=vit_b16, vit_b32, or mini_vit offline)."
                )
            towers["vision"] = visual.transformer
        # Every tower is checked before any changes, so a refusal leaves the backbone as it was.
        blocks = {tower: lora.adaptable_blocks(transformer, tower, position) for tower, transformer in towers.items()}
        for tower, transformer in towers.items():
            lora.adapt_blocks(transformer, blocks[tower], projections, rank, alpha, dropout)
        return blocks

    def lora_layers(self) -> list[lora.LoRALinear]:
        return [module for module in self.modules() if isinstance(module, lora.LoRALinear)]

    @property
    def vision_width(self) -> int:
        return int(self.prompted_vision_tower().transformer.width)

    @property
    def vision_layers(self) -> int:
        return len(self.prompted_vision_tower().transformer.resblocks)

    @property
    def text_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    def check_prompt_depth(self, tower: str, depth: int) -> None:
        """Refuse more prompted layers than `tower` ("image" or "text") has."""
        layers = self.vision_layers if tower == "image" else self.text_layers
        if depth > layers:
            raise PromptbenchError(
                f"{depth} layers of {tower} prompts asked for, but backbone '{self.name}' has {layers} {tower} "
                f"layers: set the method's prompt depth to at most {layers}"
            )

    @staticmethod
    def _prompted_blocks(transformer: nn.Module, x: torch.Tensor, deep_prompts: Sequence[torch.Tensor],
                         start: int, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run `transformer`'s blocks on batch-first `x`; before block i >= 1 the n prompt tokens from
        position `start` (negative: counted from the end) are replaced by `deep_prompts[i]`."""
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for layer, block in enumerate(transformer.resblocks):
            if 0 < layer < len(deep_prompts):
                x = _with_prompt(x, deep_prompts[layer], start)
            x = block(x if transformer.batch_first else x.transpose(0, 1), attn_mask=attn_mask)
            x = x if transformer.batch_first else x.transpose(0, 1)
        return x

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def eos_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_pool_type == "eos":
            return (tokens == self.model.text_eos_id).int().argmax(dim=-1)
        # The standard CLIP vocabulary gives EOS the highest id of any token.
        return tokens.argmax(dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens.to(self.model.token_embedding.weight.device))

    def encode_text_embeddings(self, embeddings: torch.Tensor, eos: torch.Tensor,
                               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Text features of prompt embeddings [B, L, ctx_dim] whose EOS tokens sit at positions `eos`.

        Attention is causal, so the EOS output depends only on tokens up to EOS: everything after the
        longest prompt's EOS is dropped before the transformer. The result equals the full 77-token pass.
        `deep_prompts` (the official deep text scheme): entry i >= 1 ([n, ctx_dim], or one per sequence)
        replaces the n tokens after SOS at the input of layer i; entry 0 is the input context, already in
        `embeddings`, and only its length is read.
        """
        length = int(eos.max()) + 1
        if deep_prompts:
            self.check_prompt_depth("text", len(deep_prompts))
        embeddings, eos = embeddings[:, :length], eos.to(embeddings.device)

        def encode(part: slice) -> torch.Tensor:
            prompts = tuple(p[part] if p.dim() == 3 else p for p in deep_prompts)
            return self._text_tower(embeddings[part], eos[part], prompts)

        return self._in_chunks(encode, len(embeddings), prompts_per_item=1, dim=0)

    def encode_shared_prefix(self, prefixes: torch.Tensor, suffixes: torch.Tensor, eos: torch.Tensor,
                             deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Text features [P, S, embed_dim] of the P x S prompts "prefix p, then suffix s": prefixes [P, Lp, ctx_dim]
        (e.g. SOS + learned context, one per image for CoCoOp), suffixes [S, Ls, ctx_dim] (e.g. class name + "." +
        EOS) whose EOS tokens sit at positions `eos` [S] of the suffix. Equal to `encode_text_embeddings` of the
        concatenations.

        With `speed.shared_prefix`, attention being causal, a prefix's hidden states are the same in all S of its
        prompts at every layer: each prefix runs once, and the suffixes run alone, attending to their prefix's
        keys and values (`_causal_block`); gradients reach the prefix through its one pass. Without the option,
        or on a text tower that this scheme does not cover (`shared_prefix_blocker`), the concatenated prompts
        take the full pass. `deep_prompts` as in `encode_text_embeddings`, [n, ctx_dim] or one per prefix
        [P, n, ctx_dim]: they replace tokens of the prefix, which its one pass covers.
        """
        n_prefixes, n_suffixes = len(prefixes), len(suffixes)
        if not self.speed["shared_prefix"] or self.shared_prefix_blocker() is not None:
            full = torch.cat([prefixes.unsqueeze(1).expand(-1, n_suffixes, -1, -1),
                              suffixes.expand(n_prefixes, -1, -1, -1)], dim=2).flatten(0, 1)
            per_sequence = [p.repeat_interleave(n_suffixes, dim=0) if p.dim() == 3 else p for p in deep_prompts]
            features = self.encode_text_embeddings(full, (eos.to(full.device) + prefixes.shape[1]).repeat(n_prefixes),
                                                   per_sequence)
            return features.view(n_prefixes, n_suffixes, -1)
        if deep_prompts:
            self.check_prompt_depth("text", len(deep_prompts))
        eos = eos.to(suffixes.device)
        suffixes = suffixes[:, : int(eos.max()) + 1]
        past = self._prefix_tower(prefixes, tuple(deep_prompts))
        return self._in_chunks(lambda part: self._suffix_tower(suffixes[part], eos[part], past), n_suffixes,
                               prompts_per_item=n_prefixes, dim=1)

    def shared_prefix_blocker(self) -> str | None:
        """Why the text tower cannot run prompts as shared prefix + suffixes (None: it can). `_causal_block`
        computes open_clip's standard block from its weights: plain causal multi-head self-attention."""
        model = self.model
        mask = model.attn_mask
        if not isinstance(mask, torch.Tensor) or not torch.equal(
                torch.isneginf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)):
            return "the text tower has no causal attention mask"
        for index, block in enumerate(model.transformer.resblocks):
            attention = getattr(block, "attn", None)
            if type(block) is not open_clip.transformer.ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
                return f"text block {index} is a {type(block).__name__}, not open_clip's ResidualAttentionBlock"
            if not (isinstance(attention, nn.MultiheadAttention) and attention.in_proj_weight is not None
                    and attention.bias_k is None and not attention.add_zero_attn):
                return (f"text block {index} attends with a {type(attention).__name__} (e.g. low-rank adapters), not "
                        f"the standard nn.MultiheadAttention")
        return None

    def _in_chunks(self, encode: Callable[[slice], torch.Tensor], items: int, prompts_per_item: int,
                   dim: int) -> torch.Tensor:
        """`encode(slice(None))`, or with `speed.text_chunk` the concatenation (along `dim`) of `encode` on slices
        of the items worth at most text_chunk prompts each (at least one item), each checkpointed (recomputed in
        backward) when gradients are recorded: only one chunk's activations are ever alive."""
        chunk = self.speed["text_chunk"]
        step = max(1, chunk // prompts_per_item) if chunk else items
        if step >= items:
            return encode(slice(None))
        run = (lambda part: checkpoint(encode, part, use_reentrant=False)) if torch.is_grad_enabled() else encode
        return torch.cat([run(slice(start, start + step)) for start in range(0, items, step)], dim=dim)

    def _run_text_tower(self, embeddings: torch.Tensor, eos: torch.Tensor,
                        deep_prompts: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        model, length = self.model, embeddings.shape[1]
        x = embeddings.to(self.dtype) + model.positional_embedding[:length].to(self.dtype)
        mask = model.attn_mask[:length, :length]
        if len(deep_prompts) > 1:
            x = self._prompted_blocks(model.transformer, x, deep_prompts, start=1, attn_mask=mask)
        else:
            x = model.transformer(x, attn_mask=mask)
        return self._text_head(x[torch.arange(x.shape[0], device=x.device), eos])

    def _run_prefix(self, prefixes: torch.Tensor, deep_prompts: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys and values [P, Lp, heads, head_dim] of every text layer for prefixes [P, Lp, ctx_dim]."""
        model, length = self.model, prefixes.shape[1]
        x = (prefixes.to(self.dtype) + model.positional_embedding[:length].to(self.dtype)).unsqueeze(1)
        past = []
        for layer, block in enumerate(model.transformer.resblocks):
            if 0 < layer < len(deep_prompts):
                x = _with_prompt(x.squeeze(1), deep_prompts[layer], start=1).unsqueeze(1)
            x, (keys, values) = _causal_block(block, x, model.attn_mask[:length, :length])
            past.append((keys.squeeze(1), values.squeeze(1)))
        return past

    def _run_suffixes(self, suffixes: torch.Tensor, eos: torch.Tensor,
                      past: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Features [P, S, embed_dim] of suffixes [S, Ls, ctx_dim] behind each of the P prefixes of `past`."""
        model, start, length = self.model, past[0][0].shape[1], suffixes.shape[1]
        x = suffixes.to(self.dtype) + model.positional_embedding[start : start + length].to(self.dtype)
        x = x.expand(len(past[0][0]), -1, -1, -1)
        for block, layer_past in zip(model.transformer.resblocks, past):
            x, _ = _causal_block(block, x, model.attn_mask[:length, :length], layer_past)
        return self._text_head(x[:, torch.arange(x.shape[1], device=x.device), eos])

    def _text_head(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and projection of the EOS tokens' hidden states."""
        model = self.model
        x = model.ln_final(x)
        if isinstance(model.text_projection, nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text_embeddings(self.embed_tokens(tokens), self.eos_positions(tokens))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "fingerprint": self.fingerprint,
            "image_size": self.image_size,
            "embed_dim": self.embed_dim,
            # the pretrained model's, without any low-rank adapters a method added
            "parameters": sum(p.numel() for name, p in self.model.named_parameters()
                              if name.rsplit(".", 1)[-1] not in lora.LORA_TENSORS),
            "speed": dict(self.speed),
        }


def _attention_pool_every_query(pool: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
    """open_clip's `AttentionPool2d.forward` ([B, C, H, W] -> [1 + HW, B, D]) without its final `[0]`: the same
    operations (so row 0 is its output to the bit), every row kept."""
    x = feature_map.reshape(feature_map.shape[0], feature_map.shape[1], -1).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    x, _ = nn.functional.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=pool.training, need_weights=False,
    )
    return x


def _per_sample(prompt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Prompt tokens [n, d] shared by every sequence of `x`, or already one set per sequence [B, n, d]."""
    prompt = prompt.to(x.dtype)
    return prompt.expand(x.shape[0], -1, -1) if prompt.dim() == 2 else prompt


def _with_prompt(x: torch.Tensor, prompt: torch.Tensor, start: int) -> torch.Tensor:
    """Batch-first `x` with its n tokens from position `start` (negative: from the end) replaced by `prompt`."""
    prompt = _per_sample(prompt, x)
    stop = start + prompt.shape[1]
    return torch.cat([x[:, :start], prompt, x[:, stop:]] if stop else [x[:, :start], prompt], dim=1)


def _causal_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                  past: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """open_clip's ResidualAttentionBlock, computed from its weights, on new tokens x [P, S, L, width]: S sequences
    behind each of P prefixes. Each token attends to the earlier new tokens of its sequence (`mask`: the tower's
    causal mask [L, L]) and to every token of its prefix (`past`: the prefix's keys and values [P, Lp, heads,
    head_dim] at this layer, or None for no prefix). Returns the block's output and the new tokens' keys and values.

    The prefix's keys are contracted per prefix (einsum), never copied once per sequence, so the memory of the
    suffix pass does not grow with the prefix length. The layout of open_clip's blocks (batch_first or not) does
    not matter: only their weights are used.
    """
    attention = block.attn
    queries, keys, values = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias).unflatten(
        -1, (3, attention.num_heads, -1)).unbind(-3)  # each [P, S, L, heads, head_dim]
    queries = queries * queries.shape[-1] ** -0.5
    scores = torch.einsum("pslhd,psmhd->phslm", queries, keys) + mask.to(queries.dtype)
    if past is not None:
        scores = torch.cat([torch.einsum("pslhd,pmhd->phslm", queries, past[0]), scores], dim=-1)
    # in at least float32, as the fused attention kernels do for half precision
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(values.dtype)
    length = keys.shape[2]
    out = torch.einsum("phslm,psmhd->pslhd", weights[..., -length:], values)
    if past is not None:
        out = out + torch.einsum("phslm,pmhd->pslhd", weights[..., :-length], past[1])
    x = x + block.ls_1(attention.out_proj(out.flatten(-2)))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, (keys, values)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def quiet_open_clip(level: int = logging.WARNING) -> Iterator[None]:
    """open_clip logs every construction step at INFO on the root logger; keep only records at `level` and up."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, level))
    try:
        yield
    finally:
        root.setLevel(previous)


def _create(model_name: str, quiet_level: int = logging.WARNING, **kwargs: Any) -> nn.Module:
    with quiet_open_clip(quiet_level):
        return open_clip.create_model(model_name, device="cpu", precision="fp32", **kwargs)


def _random_init(model_name: str) -> nn.Module:
    # open_clip warns "initialized randomly" here, which is wrong when a checkpoint is loaded right after and
    # redundant for random backbones (promptbench's own warning says so, louder).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return _create(model_name, quiet_level=logging.ERROR)


def _from_tag(name: str, model_name: str, tag: str, cache_dir: str | None) -> nn.Module:
    if weights.hub_available():
        return _create(model_name, pretrained=tag, cache_dir=cache_dir)
    try:
        with weights.hub_offline():
            return _create(model_name, pretrained=tag, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - every failure here means "not cached and no network"
        raise weights.offline_error(name, tag, error) from error


def _from_hub_id(name: str, hub_id: str, cache_dir: str | None) -> nn.Module:
    if weights.hub_available():
        return _create(hub_id, cache_dir=cache_dir)
    try:
        with weights.hub_offline():
            return _create(hub_id, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001
        raise weights.offline_error(name, hub_id, error) from error


def bundled_weights(name: str, model_name: str) -> Path:
    path = BUNDLED_DIR / f"{model_name}.safetensors"
    if not path.is_file():
        raise PromptbenchError(
            f"backbone '{name}': no bundled weights for {model_name} at {path}. Reinstall promptbench, or "
            f"train your own with `promptbench pretrain-mini` and pass them as backbone.pretrained=<file>."
        )
    return path


def load_backbone(
    name: str,
    model_name: str,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Backbone:
    """Build any open_clip CLIP.

    `pretrained`: an open_clip tag ("openai", "laion2b_s34b_b79k", ...), an "hf-hub:org/repo" id, a local
    checkpoint path (OpenAI TorchScript archive, OpenAI-format state dict, open_clip checkpoint, safetensors),
    or empty / "random" for random weights.
    """
    register_model_configs()
    pretrained = "" if pretrained is None else str(pretrained)
    tokenizer_name = model_name
    if pretrained.startswith("hf-hub:"):
        model = _from_hub_id(name, pretrained, cache_dir)
        tokenizer_name, fingerprint = pretrained, pretrained
    else:
        if model_name not in open_clip.list_models():
            raise PromptbenchError(
                f"backbone '{name}': open_clip has no model config '{model_name}'. Known configs include "
                f"RN50-quickgelu, RN101-quickgelu, ViT-B-32-quickgelu, ViT-B-16-quickgelu, promptbench-tiny "
                f"(full list: python -c 'import open_clip; print(open_clip.list_models())')."
            )
        if pretrained == BUNDLED:
            pretrained = str(bundled_weights(name, model_name))
        if pretrained.lower() in RANDOM_INIT:
            model = _random_init(model_name)
            fingerprint = f"{model_name}|random-seed{RANDOM_INIT_SEED}"
            log.warning(MEANINGLESS_WARNING.format(name=name))
        elif Path(pretrained).expanduser().is_file():
            path = Path(pretrained).expanduser().resolve()
            model = _random_init(model_name)
            weights.load_into(model, weights.read_state_dict(path), str(path))
            fingerprint = f"{model_name}|sha256:{_file_sha256(path)}"
        elif pretrained in open_clip.list_pretrained_tags_by_model(model_name):
            model = _from_tag(name, model_name, pretrained, cache_dir)
            fingerprint = f"{model_name}|{pretrained}"
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise PromptbenchError(
                f"backbone '{name}': pretrained='{pretrained}' is neither an existing file nor a known tag for "
                f"{model_name} (tags: {tags or 'none'}). Pass a checkpoint path, a tag, or an hf-hub: id."
            )
    preprocess = getattr(model.visual, "preprocess_cfg", None) or {}
    with weights.hub_offline(), quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(tokenizer_name)
    return Backbone(
        model=model,
        name=name,
        model_name=model_name,
        pretrained=pretrained or "random",
        tokenizer=tokenizer,
        mean=mean or preprocess.get("mean", OPENAI_MEAN),
        std=std or preprocess.get("std", OPENAI_STD),
        fingerprint=fingerprint,
    )
