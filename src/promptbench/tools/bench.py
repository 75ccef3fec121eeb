"""`make bench`: promptbench's speed against straightforward reference-style code, at equal results.

Sections (each writes rows to <out>/benchmarks.json and a Markdown table to <out>/benchmarks.md):
1. CoOp training step (forward + backward + SGD) and peak memory vs a reference-style step (every prompt
   re-tokenised each step, one 77-token text-encoder pass over all classes), batch 32, n_cls 10/100/1000;
   the two produce equal logits, checked before timing. `cached_views_ms`: the same step on cached image
   features (`method.views.n=N`, no image tower).
2. CoCoOp step, batched (one text pass over B x n_cls prompts) vs the per-image loop, batch 32.
3. Deep-prompt training steps (MaPLe: CE; PromptSRC: CE + KL + L1 losses to the frozen CLIP, whose image
   tower runs too) at the official batch 4, images through the prompted image tower and every class through
   the prompted text tower, vs the per-layer reference of promptbench.tools.reference (the official code's
   style: prompts tokenised every step, full context-length text pass, prompts concatenated per layer in the
   sequence-first layout); equal logits and losses, checked before timing. mini_vit and ViT-B/16 shapes,
   random weights.
4. Image feature extraction (decode + transform + model, through the DataLoader) vs the bare model
   forward on pre-decoded tensors: how close the pipeline gets to the model's own limit.
5. A sweep of the feature methods x shots x seeds on the mini world through `run.py -m`, with and without
   the feature cache: wall time and image-tower passes (extractions) against the minimum, one pass per
   distinct image set and transform (= the cache entries the sweep creates).
6. Text-encoder FLOPs of a CoOp step (forward + backward to the context, counted by torch's FLOP counter)
   over its measured time, against the device's measured dense-matmul rate in the same precision: how far
   the step is from the hardware limit. CLIP's ViT-B/16 and RN50 text towers with random weights.
7. Speed options at equal numbers: the CoOp text step eager vs `speed.compile_text`, and the image tower
   default vs `speed.channels_last`.
`--smoke` runs every section at toy sizes (CI); `--device cuda` measures on a GPU (bf16 autocast in section 6).
`--sections` re-measures some sections and keeps the other sections' rows already in the output file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from promptbench.backbones import Backbone, load_backbone
from promptbench.io import atomic_path, write_json_atomic
from promptbench.config import compose_config, method_from_config
from promptbench.data.transforms import BICUBIC
from promptbench.methods.cocoop import CoCoOp
from promptbench.methods.coop import CoOp
from promptbench.methods.ivlp import IVLP
from promptbench.methods.promptsrc import PromptSRC
from promptbench.results import device_info, package_versions
from promptbench.tools.reference import (reference_image_features, reference_prompts, reference_text_features,
                                         reference_text_tower)

BATCH = 32


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on GPU, sampled resident set size on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._base, self._stop = self._rss_mb(), threading.Event()
            self._peak = self._base

            def sample() -> None:
                while not self._stop.wait(0.002):
                    self._peak = max(self._peak, self._rss_mb())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._rss_mb()) - self._base


def timed(step: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2,
          budget_s: float | None = None) -> tuple[float, float]:
    """Median seconds per call and peak memory (MB) over `repeats` calls after `warmup` calls (fewer, but at
    least one, once the timed calls have taken `budget_s` seconds)."""
    for _ in range(warmup):
        step()
    times = []
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            if budget_s is not None and sum(times) > budget_s:
                break
    return statistics.median(times), memory.peak_mb


def class_names(n: int) -> list[str]:
    words = ["red", "small", "striped", "wooden", "flying", "round", "old", "bright", "dark", "tiny"]
    nouns = ["car", "bird", "flower", "dog", "plane", "house", "chair", "fish", "tree", "boat"]
    return [f"{words[i % 10]} {nouns[(i // 10) % 10]} {i // 100}" for i in range(n)]


# ---- the reference-style baselines (towers: promptbench.tools.reference) ---------------------------------
def reference_coop_logits(backbone: Backbone, classnames: list[str], ctx: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        image = F.normalize(backbone.encode_image(images), dim=-1)
    text = F.normalize(reference_text_features(backbone, classnames, ctx), dim=-1)
    return backbone.logit_scale * image @ text.T


def reference_cocoop_logits(method: CoCoOp, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        image = F.normalize(method.backbone.encode_image(images), dim=-1)
    return reference_cocoop_loop(method, image)


def reference_cocoop_loop(method: CoCoOp, image_features: torch.Tensor,
                          prompts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The reference's CoCoOp loop on normalised image features: one image at a time, its shifted context, a full
    pass over all classes (`prompts`: built once by `reference_prompts`; default: built at this call)."""
    backbone, learner = method.backbone, method.prompt_learner
    tokens, embedding = prompts or reference_prompts(backbone, method.classnames, learner.n_ctx)
    rows = []
    for feature in image_features:
        ctx = learner.ctx + method.meta_net(feature.unsqueeze(0))
        text = F.normalize(reference_text_tower(backbone, tokens, embedding, ctx), dim=-1)
        rows.append(backbone.logit_scale * feature @ text.T.to(feature.dtype))
    return torch.stack(rows)


def reference_deep_features(method: IVLP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (image, text) features of the official prompted CLIP of IVLP / MaPLe / PromptSRC
    (CustomCLIP.forward): the per-layer towers of promptbench.tools.reference, on the method's own learned
    tensors (MaPLe: its projected image prompts)."""
    backbone, learner = method.backbone, method.prompt_learner
    text = reference_text_features(backbone, method.classnames, learner.ctx, list(method.text_prompts),
                                   learner.prompt_prefix)
    image = reference_image_features(backbone, images, method.visual_prompts())
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def reference_deep_logits(method: IVLP, images: torch.Tensor) -> torch.Tensor:
    image, text = reference_deep_features(method, images)
    return method.backbone.logit_scale * image @ text.T


def reference_promptsrc_loss(method: PromptSRC, images: torch.Tensor,
                             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """muzairkhattak/PromptSRC trainers/promptsrc.py forward_backward: CE + KL to the zero-shot logits + L1 to
    the frozen text (precomputed at build time there too) and image features (the plain tower, no gradient).
    Returns the loss and the logits."""
    image, text = reference_deep_features(method, images)
    scale = method.backbone.logit_scale
    logits = scale * image @ text.T
    teacher_text = method.teacher_text_features()
    with torch.no_grad():
        teacher_image = F.normalize(reference_image_features(method.backbone, images), dim=-1)
        zero_shot = scale * teacher_image @ teacher_text.T
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zero_shot, dim=1), reduction="sum",
                  log_target=True) / logits.numel()
    loss = (F.cross_entropy(logits, labels) + method.kl_weight * kl + method.text_loss_weight * F.l1_loss(text, teacher_text)
            + method.image_loss_weight * F.l1_loss(image, teacher_image))
    return loss, logits


def optimiser_step(loss_fn: Callable[[], torch.Tensor], optimizer) -> Callable[[], None]:
    """One training step: the loss, backward, the optimiser's step."""
    def step() -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_step(logits_fn: Callable[[], torch.Tensor], labels: torch.Tensor, optimizer) -> Callable[[], None]:
    return optimiser_step(lambda: F.cross_entropy(logits_fn().float(), labels), optimizer)


# ---- sections -------------------------------------------------------------------------------------------
def configured(conf: Path, name: str, backbone: Backbone, classnames: list[str], overrides: tuple[str, ...] = ()):
    """The method with its conf/method defaults (and `overrides`), as a run builds it."""
    return method_from_config(compose_config(conf, [f"method={name}", *overrides]), backbone, classnames,
                              ["a photo of a {}."])


def bench_coop(conf: Path, backbone: Backbone, device: torch.device, class_counts: list[int], repeats: int) -> list[dict]:
    rows = []
    images = torch.randn(BATCH, 3, backbone.image_size, backbone.image_size, device=device)
    for n_cls in class_counts:
        names = class_names(n_cls)
        labels = torch.randint(0, n_cls, (BATCH,), device=device)
        method = configured(conf, "coop", backbone, names).to(device)
        ctx = method.prompt_learner.ctx
        with torch.no_grad():
            ours, reference = method(images), reference_coop_logits(backbone, names, ctx, images)
        max_diff = (ours - reference).abs().max().item()
        optimizer = torch.optim.SGD([ctx], lr=1e-4, momentum=0.9)
        ours_s, ours_mb = timed(training_step(lambda: method(images), labels, optimizer), device, repeats)
        with torch.no_grad():
            cached_features = method.image_features(images)  # what method.views.n=N trains on
        cached_s, _ = timed(training_step(lambda: method.class_logits(cached_features), labels, optimizer), device, repeats)
        ref_s, ref_mb = timed(training_step(lambda: reference_coop_logits(backbone, names, ctx, images), labels, optimizer),
                              device, repeats)
        rows.append({"section": "coop_step", "backbone": backbone.name, "n_cls": n_cls, "batch": BATCH,
                     "promptbench_ms": ours_s * 1e3, "reference_ms": ref_s * 1e3, "speedup": ref_s / ours_s,
                     "cached_views_ms": cached_s * 1e3, "cached_views_speedup": ref_s / cached_s,
                     "promptbench_peak_mb": ours_mb, "reference_peak_mb": ref_mb, "max_logit_diff": max_diff,
                     "prompt_tokens": int(method.prompt_learner.eos.max()) + 1, "context_length": backbone.context_length})
    return rows


def bench_cocoop(conf: Path, backbone: Backbone, device: torch.device, class_counts: list[int], repeats: int) -> list[dict]:
    rows = []
    images = torch.randn(BATCH, 3, backbone.image_size, backbone.image_size, device=device)
    for n_cls in class_counts:
        names = class_names(n_cls)
        labels = torch.randint(0, n_cls, (BATCH,), device=device)
        method = configured(conf, "cocoop", backbone, names).to(device)
        with torch.no_grad():
            max_diff = (method(images) - reference_cocoop_logits(method, images)).abs().max().item()
        trainable = [p for p in method.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9)
        ours_s, ours_mb = timed(training_step(lambda: method(images), labels, optimizer), device, repeats)
        loop_s, loop_mb = timed(training_step(lambda: reference_cocoop_logits(method, images), labels, optimizer),
                                device, max(1, repeats // 2), warmup=1)
        rows.append({"section": "cocoop_step", "backbone": backbone.name, "n_cls": n_cls, "batch": BATCH,
                     "batched_ms": ours_s * 1e3, "per_image_loop_ms": loop_s * 1e3, "speedup": loop_s / ours_s,
                     "batched_peak_mb": ours_mb, "loop_peak_mb": loop_mb, "max_logit_diff": max_diff})
    return rows


def cross_entropy_of(logits_fn: Callable[[IVLP, torch.Tensor], torch.Tensor]) -> Callable:
    def loss(method: IVLP, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_fn(method, images)
        return F.cross_entropy(logits, labels), logits

    return loss


def promptsrc_loss(method: PromptSRC, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    terms = method.loss_terms(images, labels)
    return terms["loss"], terms["logits"]


# Per deep-prompt method: conf overrides for the bench (PromptSRC's frozen text teacher is computed once, before
# the first step, from the one dataset template instead of 60: it is not part of a step) and the (loss, logits)
# of its training step, promptbench's and the reference's.
DEEP_METHODS: dict[str, tuple[tuple[str, ...], Callable, Callable]] = {
    "maple": ((), cross_entropy_of(lambda method, images: method(images)), cross_entropy_of(reference_deep_logits)),
    "promptsrc": (("method.teacher_templates=dataset",), promptsrc_loss, reference_promptsrc_loss),
}
# Stop timing a row's steps after this many seconds (ViT-B/16 on a CPU: one step each).
DEEP_STEP_BUDGET_S = 20.0


def deep_model_spec(spec: str) -> tuple[str, list[int]]:
    """"ViT-B-16-quickgelu:10,100" -> ("ViT-B-16-quickgelu", [10, 100]); a bare name: n_cls 10."""
    name, _, counts = spec.partition(":")
    return name, [int(count) for count in counts.split(",")] if counts else [10]


def bench_deep_prompts(conf: Path, models: dict[str, list[int]], device: torch.device, repeats: int) -> list[dict]:
    """`models`: backbone name -> the class counts to measure it at."""
    rows = []
    for model_name, class_counts in models.items():
        backbone = bench_backbone(model_name, device)
        images = {}
        for name, (overrides, loss_fn, reference_loss_fn) in DEEP_METHODS.items():
            for n_cls in class_counts:
                names = class_names(n_cls)
                torch.manual_seed(0)
                method = configured(conf, name, backbone, names, overrides).to(device)
                batch = method.batch_size  # the official batch (4)
                if batch not in images:
                    images[batch] = torch.randn(batch, 3, backbone.image_size, backbone.image_size, device=device)
                inputs, labels = images[batch], torch.randint(0, n_cls, (batch,), device=device)
                if name == "promptsrc":
                    method.teacher_text_features()
                with torch.no_grad():
                    (ours_loss, ours), (ref_loss, ref) = (fn(method, inputs, labels) for fn in (loss_fn, reference_loss_fn))
                optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-4, momentum=0.9)
                ours_s, ours_mb = timed(optimiser_step(lambda: loss_fn(method, inputs, labels)[0], optimizer), device,
                                        repeats, warmup=1, budget_s=DEEP_STEP_BUDGET_S)
                ref_s, ref_mb = timed(optimiser_step(lambda: reference_loss_fn(method, inputs, labels)[0], optimizer),
                                      device, repeats, warmup=1, budget_s=DEEP_STEP_BUDGET_S)
                rows.append({"section": "deep_prompt_step", "method": name, "backbone": model_name, "n_cls": n_cls,
                             "batch": batch, "depth_text_image": f"{method.text_depth}/{method.vision_depth}",
                             "promptbench_ms": ours_s * 1e3, "reference_ms": ref_s * 1e3, "speedup": ref_s / ours_s,
                             "promptbench_peak_mb": ours_mb, "reference_peak_mb": ref_mb,
                             "max_logit_diff": (ours - ref).abs().max().item(),
                             "loss_diff": (ours_loss - ref_loss).abs().item(),
                             "prompt_tokens": int(method.prompt_learner.eos.max()) + 1,
                             "context_length": backbone.context_length})
    return rows


def bench_extraction(backbone: Backbone, device: torch.device, images: int, workers: int) -> list[dict]:
    from PIL import Image

    from promptbench.data.features import extract_features
    from promptbench.data.images import load_rgb
    from promptbench.data.items import Item
    from promptbench.data.transforms import test_transform

    size = backbone.image_size
    transform = test_transform(size, backbone.mean, backbone.std)
    with tempfile.TemporaryDirectory() as folder:
        generator = torch.Generator().manual_seed(0)
        items = []
        for index in range(images):
            # ImageNet-typical 500x375 JPEGs (noise: a pessimistic decode cost) resized to the model input.
            pixels = (torch.rand(375, 500, 3, generator=generator) * 255).to(torch.uint8)
            path = Path(folder) / f"{index}.jpg"
            Image.fromarray(pixels.numpy()).save(path, quality=90)
            items.append(Item(str(path), index % 10, str(index % 10)))
        start = time.perf_counter()
        for item in items:
            transform(load_rgb(item.path))
        decode_rate = len(items) / (time.perf_counter() - start)  # one process: images/s per core
        extract_features(backbone, items[: min(64, images)], transform, device=device, num_workers=0)  # warm-up
        start = time.perf_counter()
        extract_features(backbone, items, transform, device=device, batch_size=128, num_workers=workers)
        pipeline_s = time.perf_counter() - start
        batch = torch.randn(128, 3, size, size, device=device)
        with torch.no_grad():
            model_s, _ = timed(lambda: backbone.encode_image(batch), device, repeats=3, warmup=1)
    pipeline_rate, model_rate = images / pipeline_s, 128 / model_s
    return [{"section": "extraction", "backbone": backbone.name, "images": images, "workers": workers,
             "decode_transform_images_per_s_per_core": decode_rate, "pipeline_images_per_s": pipeline_rate, "model_images_per_s": model_rate,
             "fraction_of_model_limit": pipeline_rate / model_rate}]


def bench_sweep(run_py: Path, backbone_name: str, methods: list[str], shots: list[int], seeds: list[int],
                device: torch.device, workdir: Path) -> list[dict]:
    import subprocess
    import sys

    from promptbench.report import load_results

    rows = []
    for cache in (True, False):
        tag = f"sweep_cache_{'on' if cache else 'off'}"
        command = [sys.executable, str(run_py), "-m", f"backbone={backbone_name}",
                   "dataset=synthetic_shapes", f"method={','.join(methods)}", f"shots={','.join(map(str, shots))}",
                   f"seed={','.join(map(str, seeds))}", f"feature_cache={str(cache).lower()}", "logger=none",
                   f"tag={tag}", f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}"]
        env = dict(os.environ, PROMPTBENCH_OUTPUT=str(workdir / "outputs"), PROMPTBENCH_CACHE=str(workdir / "cache"),
                   PROMPTBENCH_DATA=str(workdir / "data"))
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        results = load_results([workdir / "outputs" / tag])
        extractions = sum(r["feature_cache"]["extractions"] for r in results)
        distinct = len(list((workdir / "cache" / "features").glob("*.safetensors"))) if cache else None
        rows.append({"section": "sweep", "backbone": backbone_name, "feature_cache": cache, "runs": len(results),
                     "wall_s": wall, "image_tower_passes": extractions,
                     "cache_hits": sum(r["feature_cache"]["hits"] for r in results),
                     "minimum_passes": distinct if cache else "-"})
    minimum = rows[0]["minimum_passes"]
    for row in rows:
        row["passes_over_minimum"] = row["image_tower_passes"] / minimum
    return rows


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Achieved rate of one large square matmul: the practical ceiling for transformer-shaped work."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = timed(lambda: a @ b, device, repeats)
    return 2 * size**3 / seconds


def text_tower_step(method: CoOp, device: torch.device, autocast: torch.dtype | None = None) -> Callable[[], None]:
    """The part of a CoOp step that runs every step: text tower forward, backward to the context, SGD."""
    optimizer = torch.optim.SGD([method.prompt_learner.ctx], lr=1e-4, momentum=0.9)

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return method.text_features().float().square().mean()

    return optimiser_step(loss, optimizer)


def bench_text_flops(conf: Path, device: torch.device, model_names: list[str], class_counts: list[int], repeats: int,
                     matmul_size: int) -> list[dict]:
    """Per model and class count, the CoOp text step with the full pass and with the shared prefix."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_flops_per_s(device, dtype, matmul_size, repeats)
    rows = []
    for model_name in model_names:
        backbone = bench_backbone(model_name, device)
        for n_cls in class_counts:
            method = configured(conf, "coop", backbone, class_names(n_cls)).to(device)
            for shared_prefix in (False, True):
                backbone.accelerate(shared_prefix=shared_prefix)
                step = text_tower_step(method, device, None if dtype == torch.float32 else dtype)
                with FlopCounterMode(display=False) as counter:
                    step()
                seconds, _ = timed(step, device, repeats, budget_s=60)
                flops = counter.get_total_flops()
                rows.append({"section": "text_flops", "model": model_name, "dtype": str(dtype).removeprefix("torch."),
                             "n_cls": n_cls, "text_pass": "shared_prefix" if shared_prefix else "full",
                             "prompt_tokens": int(method.prompt_learner.eos.max()) + 1,
                             "gflop_per_step": flops / 1e9, "step_ms": seconds * 1e3,
                             "achieved_tflops": flops / seconds / 1e12, "matmul_tflops": peak / 1e12,
                             "fraction_of_matmul_rate": flops / seconds / peak})
    return rows


def bench_speed_options(conf: Path, backbone_name: str, device: torch.device, n_cls: int, repeats: int) -> list[dict]:
    default = bench_backbone(backbone_name, device)
    accelerated = bench_backbone(backbone_name, device).accelerate(compile_text=True, channels_last=True)
    methods = [configured(conf, "coop", backbone, class_names(n_cls)).to(device) for backbone in (default, accelerated)]
    methods[1].load_state_dict(methods[0].state_dict())
    with torch.no_grad():
        text_diff = (methods[1].text_features() - methods[0].text_features()).abs().max().item()
    steps = [text_tower_step(method, device) for method in methods]
    start = time.perf_counter()
    steps[1]()  # compiles
    compile_s = time.perf_counter() - start
    (default_s, _), (option_s, _) = (timed(step, device, repeats) for step in steps)
    rows = [{"section": "speed_options", "option": "speed.compile_text", "backbone": backbone_name, "n_cls": n_cls,
             "default_ms": default_s * 1e3, "option_ms": option_s * 1e3, "speedup": default_s / option_s,
             "one_off_s": compile_s, "max_diff": text_diff}]
    images = torch.randn(BATCH, 3, default.image_size, default.image_size, device=device)
    with torch.no_grad():
        (default_s, _), (option_s, _) = (timed(lambda b=b: b.encode_image(images), device, repeats)
                                         for b in (default, accelerated))
        image_diff = (accelerated.encode_image(images) - default.encode_image(images)).abs().max().item()
    rows.append({"section": "speed_options", "option": "speed.channels_last", "backbone": backbone_name, "n_cls": "-",
                 "default_ms": default_s * 1e3, "option_ms": option_s * 1e3, "speedup": default_s / option_s,
                 "one_off_s": "-", "max_diff": image_diff})
    return rows


# ---- real CLIP shapes: the shared prefix and chunked text at ImageNet's class count --------------------------
class LiveTensorMemory(TorchDispatchMode):
    """The peak bytes of tensors created under this mode and alive at once. On CPU the process's resident size
    keeps memory that tensors freed, so it cannot show a step's peak; this counts what the step holds."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, size = id(storage), storage.nbytes()
                if key not in self._tracked and size:
                    self._tracked.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    # a storage's Python object lives exactly as long as the storage (PyObject preservation)
                    weakref.finalize(storage, self._freed, key, size)
        return out


def step_peak_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory (MB) that one call of `step` adds: the CUDA allocator's peak, or the live tensors' on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with LiveTensorMemory() as memory:
        step()
    return memory.peak / 2**20


# Text passes compared in section real_shapes: the reference (prompt embeddings built once, every class through the
# full context length; CoCoOp: its per-image loop), promptbench's full pass (truncated after the longest EOS), the
# shared prefix, and either with class-chunked checkpointed encoding (+chunk).
VARIANT_SPEED = {"full": {"shared_prefix": False}, "shared_prefix": {"shared_prefix": True}}
ALL_VARIANTS = ("reference", "full", "shared_prefix", "shared_prefix+chunk")
# On a 2-core CPU with ~20 GB of memory: (method, model, n_cls, variants). The references beyond
# --reference-prompts prompts are measured on part of the work and scaled (their cost is linear in it); CoCoOp's
# full batched pass runs chunked (unchunked it holds 32 x 100 prompts' activations at once).
CPU_PLAN = (
    ("coop", "ViT-B-16-quickgelu", 100, ("reference", "full", "shared_prefix")),
    ("coop", "ViT-B-16-quickgelu", 1000, ALL_VARIANTS),
    ("cocoop", "ViT-B-16-quickgelu", 100, ("reference", "full+chunk", "shared_prefix", "shared_prefix+chunk")),
    ("maple", "ViT-B-16-quickgelu", 100, ("reference", "full", "shared_prefix")),
    ("coop", "RN50-quickgelu", 100, ("reference", "shared_prefix")),
    ("coop", "RN50-quickgelu", 1000, ("reference", "shared_prefix", "shared_prefix+chunk")),
)


SMOKE_PLAN = (
    ("coop", "tiny", 4, ALL_VARIANTS),
    ("cocoop", "tiny", 4, ("reference", "shared_prefix+chunk")),
    ("maple", "tiny", 4, ("reference", "shared_prefix")),
)


def real_shapes_plan(device: torch.device, smoke: bool) -> tuple[tuple[str, str, int, tuple[str, ...]], ...]:
    """CPU_PLAN on a CPU; on a GPU every pass of CoOp, CoCoOp and MaPLe at 100 and 1000 classes, both towers."""
    if smoke:
        return SMOKE_PLAN
    if device.type == "cpu":
        return CPU_PLAN
    # CoCoOp at 1000 classes: 32 000 prompts, whose unchunked full pass would hold ~100 GB of activations
    return tuple((method, model, n_cls, ("reference", "full+chunk", *ALL_VARIANTS[2:])
                  if (method, n_cls) == ("cocoop", 1000) else ALL_VARIANTS)
                 for model in ("ViT-B-16-quickgelu", "RN50-quickgelu")
                 for method in ("coop", "cocoop", "maple") for n_cls in (100, 1000)
                 if not (method == "maple" and model.startswith("RN")))


class TextPass(NamedTuple):
    """One way to compute a step's logits: on the batch rows `rows` and classes `cols` (all, or the part a
    reference is measured on), whose time and memory are multiplied by `scale` for the whole step."""
    logits: Callable[[], torch.Tensor]
    rows: slice = slice(None)
    cols: slice = slice(None)
    scale: float = 1.0
    measured_on: str = "all"


def real_shapes_pass(method: CoOp, variant: str, images: torch.Tensor, features: torch.Tensor, text_chunk: int,
                     reference_limit: int | None) -> TextPass:
    backbone, n_cls, batch = method.backbone, len(method.classnames), len(features)
    if variant == "reference":
        if isinstance(method, IVLP):
            return TextPass(lambda: reference_deep_logits(method, images))
        if isinstance(method, CoCoOp):
            part = min(batch, max(1, (reference_limit or batch * n_cls) // n_cls))
            prompts = reference_prompts(backbone, method.classnames, method.prompt_learner.n_ctx)
            return TextPass(lambda: reference_cocoop_loop(method, features[:part], prompts), rows=slice(part),
                            scale=batch / part, measured_on="all" if part == batch else f"{part} of {batch} images")
        part = min(n_cls, reference_limit or n_cls)
        tokens, embedding = reference_prompts(backbone, method.classnames[:part], method.prompt_learner.n_ctx)

        def coop_reference() -> torch.Tensor:
            text = F.normalize(reference_text_tower(backbone, tokens, embedding, method.prompt_learner.ctx), dim=-1)
            return backbone.logit_scale * features @ text.T.to(features.dtype)

        return TextPass(coop_reference, cols=slice(part), scale=n_cls / part,
                        measured_on="all" if part == n_cls else f"{part} of {n_cls} classes")
    text_pass, _, chunked = variant.partition("+")
    speed = VARIANT_SPEED[text_pass] | {"text_chunk": text_chunk if chunked else None}

    def logits() -> torch.Tensor:
        backbone.accelerate(**speed)
        return method(images) if isinstance(method, IVLP) else method.class_logits(features)

    return TextPass(logits)


def text_tokens(method: CoOp, variant: str) -> str:
    """The tokens each prompt's text pass covers."""
    learner = method.prompt_learner
    full = int(learner.eos.max()) + 1
    if variant == "reference":
        return str(method.backbone.context_length)
    if variant.startswith("shared_prefix") and learner.shares_prefix(learner.ctx):
        prefix = 1 + learner.n_ctx + learner.shared_words
        return f"{full - prefix} (+{prefix} shared)"
    return str(full)


def bench_real_shapes(conf: Path, device: torch.device, plan, batch: int, autocast: torch.dtype | None,
                      text_chunk: int, reference_limit: int | None, repeats: int, budget_s: float) -> list[dict]:
    """Training steps (loss, backward, SGD) of CoOp, CoCoOp and MaPLe at CLIP's shapes (random weights, 77-token
    context), each text pass of `plan` at equal logits. CoOp and CoCoOp train on cached image features (the frozen
    image tower's time is `image_tower_ms`, equal for every pass); MaPLe's step includes its prompted image tower."""
    precision = "fp32" if autocast is None else f"{str(autocast).removeprefix('torch.')} autocast"

    def autocasting():
        return torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)

    rows = []
    for model_name in dict.fromkeys(model for _, model, _, _ in plan):
        backbone = bench_backbone(model_name, device)
        images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, device=device)
        with torch.no_grad(), autocasting():
            image_tower_s, _ = timed(lambda: backbone.encode_image(images), device, repeats=1, warmup=1)
            features = F.normalize(backbone.encode_image(images).float(), dim=-1)
        for method_name, _, n_cls, variants in (entry for entry in plan if entry[1] == model_name):
            torch.manual_seed(0)
            method = configured(conf, method_name, backbone, class_names(n_cls)).to(device)
            labels = torch.randint(0, n_cls, (batch,), device=device)
            passes = {variant: real_shapes_pass(method, variant, images, features, text_chunk, reference_limit)
                      for variant in variants}
            with torch.no_grad(), autocasting():
                logits = {variant: text_pass.logits().float() for variant, text_pass in passes.items()}
            reference = passes["reference"]
            measured = {}
            for variant, text_pass in passes.items():
                def loss(text_pass: TextPass = text_pass) -> torch.Tensor:
                    with autocasting():
                        logits = text_pass.logits().float()
                    return F.cross_entropy(logits, labels[text_pass.rows] % logits.shape[1])

                step = optimiser_step(loss, torch.optim.SGD(method.trainable_parameters(), lr=1e-4, momentum=0.9))
                cpu_times = []

                def counted_step(step: Callable[[], None] = step) -> None:
                    start = time.process_time()
                    step()
                    cpu_times.append(time.process_time() - start)

                peak_mb = step_peak_mb(step, device)  # also the warm-up call
                seconds, _ = timed(counted_step, device, repeats, warmup=0, budget_s=budget_s)
                measured[variant] = (seconds * text_pass.scale, statistics.median(cpu_times) * text_pass.scale,
                                     peak_mb * text_pass.scale)
            for variant, (seconds, cpu_seconds, peak_mb) in measured.items():
                ours = logits[variant] if variant == "reference" else logits[variant][reference.rows, reference.cols]
                rows.append({
                    "section": "real_shapes", "method": method_name, "model": model_name, "n_cls": n_cls,
                    "batch": batch, "text_pass": variant.replace("+chunk", f"+chunk{text_chunk}"),
                    "precision": precision, "step_ms": seconds * 1e3, "step_cpu_ms": cpu_seconds * 1e3,
                    "peak_mb": peak_mb, "speedup": measured["reference"][0] / seconds,
                    "peak_vs_reference": peak_mb / measured["reference"][2],
                    "max_logit_diff": (ours - logits["reference"]).abs().max().item(),
                    "text_tokens": text_tokens(method, variant),
                    "reference_measured_on": passes[variant].measured_on,
                    "image_tower_ms": "in step" if method_name == "maple" else image_tower_s * 1e3})
    return rows


# ---- a CoOp 16-shot ImageNet epoch: images decoded by CPU workers or on the device --------------------------
IMAGENET_SHOTS_IMAGES = 16_000  # 16 shots x 1000 classes
IMAGENET_TEST_IMAGES = 50_000


def write_photo_like_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs at ImageNet-like sizes (sides 250-500 px, about 110 kB at quality 90): smooth colour fields
    with noise, which compress like photographs rather than like pure noise."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    paths = []
    for index in range(count):
        width, height = (int(v) for v in torch.randint(300, 501, (2,), generator=generator))
        height = height * 3 // 4
        coarse = torch.rand(1, 3, 6, 8, generator=generator)
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        field = field + 0.08 * torch.randn(field.shape, generator=generator)
        pixels = (field.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        path = folder / f"{index}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


class DeviceDecodedBatches:
    """Training batches decoded on `device` (torchvision.io.decode_jpeg; on CUDA: nvJPEG) and augmented there like
    the CPU pipeline (RandomResizedCrop, bicubic, horizontal flip, normalisation); CPU threads only read the files."""

    def __init__(self, paths: list[Path], labels: list[int], batch_size: int, size: int, mean, std,
                 scale: tuple[float, float], device: torch.device):
        self.paths, self.labels, self.batch_size, self.size, self.scale, self.device = paths, labels, batch_size, size, scale, device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __iter__(self):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.v2.functional import resized_crop

        order = torch.randperm(len(self.paths)).tolist()
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            chosen = order[start : start + self.batch_size]
            data = [read_file(str(self.paths[i])) for i in chosen]
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            crops = []
            for image in decoded:
                top, left, height, width = RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
                crop = resized_crop(image.float(), top, left, height, width, [self.size, self.size],
                                    interpolation=BICUBIC, antialias=True)
                crops.append(crop.flip(-1) if torch.rand(()) < 0.5 else crop)
            batch = (torch.stack(crops).clamp(0, 255) - self.mean) / self.std
            yield batch, torch.tensor([self.labels[i] for i in chosen], device=self.device)


def bench_imagenet_epoch(conf: Path, device: torch.device, model_name: str, n_cls: int, images: int, batch: int,
                         workers: int, autocast: torch.dtype | None) -> list[dict]:
    """A CoOp 16-shot ImageNet step per batch (frozen image tower, shared-prefix text step over n_cls classes,
    SGD) over `images` synthetic JPEGs, projected to an epoch of 16 000 images and to 50 (the recipe) and 200 (the
    published cost's) epochs, plus the test pass over 50 000 images (decode and image tower only)."""
    from promptbench.data.items import Item
    from promptbench.data.loading import ImageDataset
    from promptbench.data.transforms import DEFAULT_CROP_SCALE, train_transform

    backbone = bench_backbone(model_name, device).accelerate(shared_prefix=True)
    method = configured(conf, "coop", backbone, class_names(n_cls)).to(device)
    optimizer = torch.optim.SGD([method.prompt_learner.ctx], lr=1e-4, momentum=0.9)

    def autocasting():
        return torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)

    def train(batches) -> tuple[float, float]:
        """Seconds of the whole loop and of the image tower alone (data + tower = the test pass's work)."""
        tower_s, start = 0.0, time.perf_counter()
        for pixels, labels in batches:
            pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            tower_start = time.perf_counter()
            with torch.no_grad(), autocasting():
                features = F.normalize(backbone.encode_image(pixels).float(), dim=-1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tower_s += time.perf_counter() - tower_start
            with autocasting():
                loss = F.cross_entropy(method.class_logits(features).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, tower_s

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_photo_like_jpegs(Path(folder), images)
        labels = [index % n_cls for index in range(images)]
        transform = train_transform(backbone.image_size, backbone.mean, backbone.std)
        loaders = {
            f"cpu_workers ({workers})": lambda: torch.utils.data.DataLoader(
                ImageDataset([Item(str(path), label, str(label)) for path, label in zip(paths, labels)], transform),
                batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                pin_memory=device.type == "cuda", collate_fn=lambda samples: (
                    torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples]))),
            f"decode_jpeg on {device.type}": lambda: DeviceDecodedBatches(
                paths, labels, batch, backbone.image_size, backbone.mean, backbone.std, DEFAULT_CROP_SCALE, device),
        }
        for loader in loaders.values():  # warm-up: allocations, kernels, the JPEG decoder's set-up
            train(itertools.islice(loader(), 1))
        for decode, loader in loaders.items():
            start = time.perf_counter()
            data_images = sum(len(pixels) for pixels, _ in loader())
            data_s = time.perf_counter() - start
            loop_s, tower_s = train(loader())
            steps = images // batch
            epoch_s = loop_s / (steps * batch) * IMAGENET_SHOTS_IMAGES
            test_s = (data_s / data_images + tower_s / (steps * batch)) * IMAGENET_TEST_IMAGES
            rows.append({"section": "imagenet_epoch", "decode": decode, "model": model_name, "n_cls": n_cls,
                         "batch": batch, "images": steps * batch, "device": device.type,
                         "precision": "fp32" if autocast is None else str(autocast).removeprefix("torch."),
                         "data_images_per_s": data_images / data_s, "train_images_per_s": steps * batch / loop_s,
                         "epoch_s": epoch_s, "test_pass_min": test_s / 60,
                         "coop_50_epochs_h": (50 * epoch_s + test_s) / 3600,
                         "coop_200_epochs_h": (200 * epoch_s + test_s) / 3600})
    return rows


def bench_backbone(name: str, device: torch.device) -> Backbone:
    """tiny, mini (bundled weights), mini_vit, or any open_clip model config with random weights."""
    model_name, pretrained = {"tiny": ("promptbench-tiny", "random"), "mini": ("promptbench-mini", "bundled"),
                              "mini_vit": ("promptbench-mini-vit", "random")}.get(name, (name, "random"))
    return load_backbone(name, model_name, pretrained).to(device)


# ---- output ---------------------------------------------------------------------------------------------
SECTION_NOTES = {
    "real_shapes": (
        "Training steps at CLIP's text shapes (random weights, 77-token context, 16 context vectors for CoOp, "
        "CoCoOp's 4, MaPLe's 2 + deep prompts), batch 32. `reference`: the official style (prompt embeddings built "
        "once, every class through all 77 tokens; CoCoOp: its per-image loop); `full`: promptbench's pass truncated "
        "after the longest EOS; `shared_prefix`: [SOS][context] run once, the class tokens alone (`speed.shared_prefix`); "
        "`+chunkN`: `speed.text_chunk=N` (chunks of N prompts recomputed in backward). `peak_mb`: the most memory the "
        "step's tensors hold at once (CUDA allocator peak, or live tensors counted on CPU). `reference_measured_on`: "
        "a reference too large for the machine is measured on part of the classes or images and its time and memory "
        "scaled (both linear in them). `max_logit_diff`: against the reference's logits, same parameters."),
    "imagenet_epoch": (
        "A CoOp 16-shot ImageNet step per batch of 32 (frozen RN50 image tower, shared-prefix text step over 1000 "
        "classes, SGD) on synthetic JPEGs of ImageNet-like size, images decoded and augmented (RandomResizedCrop, "
        "flip, normalisation) by CPU DataLoader workers or on the device (torchvision.io.decode_jpeg). Projected to "
        "an epoch of 16 000 images, and end to end to 50 epochs (the recipe, KaiyangZhou/CoOp rn50_ep50.yaml) and "
        "200 epochs, each plus one test pass over 50 000 images. Published cost (protocol.md, section 6): CoOp "
        "ImageNet 16-shot RN50 on one GPU, 14 h 40 min for 200 epochs."),
}


def real_shapes_summary(rows: list[dict]) -> list[str]:
    """The issue's targets at ViT-B/16 shapes, met or not, and the CoOp ImageNet projection from RN50's step."""
    found = {(row["method"], row["model"], row["n_cls"], row["text_pass"].split("+chunk")[0]
              + ("+chunk" if "+chunk" in row["text_pass"] else "")): row for row in rows}
    vit, lines = "ViT-B-16-quickgelu", []

    def verdict(value: float, target: float, above: bool) -> str:
        return "met" if (value >= target if above else value <= target) else "NOT met"

    coop = found.get(("coop", vit, 100, "shared_prefix"))
    if coop:
        lines.append(f"- CoOp step, n_cls 100, shared prefix vs reference: {coop['speedup']:.1f}x wall "
                     f"({found[('coop', vit, 100, 'reference')]['step_cpu_ms'] / coop['step_cpu_ms']:.1f}x CPU time); "
                     f"target >= 10x: {verdict(coop['speedup'], 10, True)}.")
    batched = [found[key] for key in (("cocoop", vit, 100, "shared_prefix"), ("cocoop", vit, 100, "shared_prefix+chunk"))
               if key in found]
    if batched:
        best = max(batched, key=lambda row: row["speedup"])
        loop = found[("cocoop", vit, 100, "reference")]
        lines.append(f"- CoCoOp batched ({best['text_pass']}) vs the per-image loop (measured on "
                     f"{loop['reference_measured_on']}), n_cls 100, batch {best['batch']}: {best['speedup']:.1f}x wall "
                     f"({loop['step_cpu_ms'] / best['step_cpu_ms']:.1f}x CPU time); target >= 5x: "
                     f"{verdict(best['speedup'], 5, True)}.")
    chunked = found.get(("coop", vit, 1000, "shared_prefix+chunk"))
    if chunked:
        lines.append(f"- CoOp step, n_cls 1000, peak memory {chunked['text_pass']} / reference: "
                     f"{chunked['peak_vs_reference']:.3f}; target <= 1/4: {verdict(chunked['peak_vs_reference'], 0.25, False)}.")
    rn50 = found.get(("coop", "RN50-quickgelu", 1000, "shared_prefix"))
    if rn50:
        def hours(row: dict, epochs: int) -> float:
            return epochs * 500 * (row["step_ms"] + row["image_tower_ms"]) / 1e3 / 3600

        reference = found.get(("coop", "RN50-quickgelu", 1000, "reference"))
        lines.append(f"- Projection, CoOp 16-shot ImageNet on RN50 from these steps (500 steps per epoch, each the "
                     f"image tower's {rn50['image_tower_ms'] / 1e3:.2f} s and the text step; image decoding and the "
                     f"test pass not included, see imagenet_epoch): shared prefix {hours(rn50, 50):.1f} h for 50 "
                     f"epochs, {hours(rn50, 200):.1f} h for 200"
                     + (f"; reference-style step {hours(reference, 50):.0f} h and {hours(reference, 200):.0f} h"
                        if reference else "")
                     + ". Published: 14 h 40 min for 200 epochs on one GPU.")
    return lines


def markdown(rows: list[dict], measured: dict[str, dict]) -> str:
    lines = ["# promptbench benchmarks", ""]
    for section in dict.fromkeys(row["section"] for row in rows):
        meta = measured[section]
        selected = [row for row in rows if row["section"] == section]
        columns = [key for key in selected[0] if key != "section"]
        lines += [f"## {section}", "",
                  f"Measured {meta['date']} on {meta['device']['name']} ({meta['device']['type']}, "
                  f"{meta['device']['torch_threads']} torch threads), torch {meta['versions'].get('torch')}."
                  f"{' SMOKE MODE: toy sizes, numbers mean nothing.' if meta['smoke'] else ''}"
                  f"{' ' + meta['note'] if meta.get('note') else ''}", ""]
        if section in SECTION_NOTES:
            lines += [SECTION_NOTES[section], ""]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in selected:
            lines.append("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
        lines.append("")
        if section == "real_shapes":
            summary = real_shapes_summary(selected)
            lines += [*summary, ""] if summary else []
    return "\n".join(lines)


SECTIONS = ("coop_step", "cocoop_step", "deep_prompt_step", "extraction", "sweep", "text_flops", "speed_options",
            "real_shapes", "imagenet_epoch")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="mini", help="tiny | mini | an open_clip model name (random weights)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes for CI; no meaningful timings")
    parser.add_argument("--out", required=True, help="folder for benchmarks.md / benchmarks.json (make bench: experiments)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--run-py", type=Path, default=Path("run.py"),
                        help="the checkout's run.py, which section sweep launches (default: ./run.py)")
    parser.add_argument("--conf", type=Path, default=Path("conf"),
                        help="the checkout's conf/, whose method defaults the step sections use (default: ./conf)")
    parser.add_argument("--sweep-shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--text-models", nargs="+", default=["ViT-B-16-quickgelu", "RN50-quickgelu"],
                        help="open_clip configs whose text towers section 6 measures (random weights)")
    parser.add_argument("--deep-models", nargs="+", default=["mini_vit:10,100", "ViT-B-16-quickgelu:10"],
                        help="NAME:N_CLS,... ViT backbones (random weights) and class counts of section "
                             "deep_prompt_step (on a 2-core CPU one ViT-B/16 step takes ~25 s, its reference "
                             "~65 s at n_cls 100: add ViT-B-16-quickgelu:10,100 on a GPU)")
    parser.add_argument("--deep-repeats", type=int, default=5, help="timed steps per row of deep_prompt_step")
    parser.add_argument("--flops-classes", type=int, nargs="+", default=[100], help="class counts of text_flops")
    parser.add_argument("--autocast", choices=["none", "bf16"], default=None,
                        help="autocast of sections real_shapes and imagenet_epoch (default: bf16 on cuda, none on cpu)")
    parser.add_argument("--text-chunk", type=int, default=256,
                        help="speed.text_chunk of the +chunk text passes of real_shapes (prompts per chunk)")
    parser.add_argument("--reference-prompts", type=int, default=None,
                        help="real_shapes measures a reference on at most this many prompts (classes, or images x "
                             "classes for CoCoOp's loop) and scales its time and memory; 0: no limit (default: 200 "
                             "on cpu, where the 1000-class reference needs ~28 GB; 2000 on cuda, where CoCoOp's "
                             "loop over 32 images x 1000 classes would hold ~0.5 TB)")
    parser.add_argument("--epoch-images", type=int, default=None,
                        help="synthetic JPEGs of imagenet_epoch (default: 512 on cuda, 64 on cpu)")
    parser.add_argument("--epoch-workers", type=int, default=None,
                        help="DataLoader workers of imagenet_epoch's CPU decoding (default: min(8, CPU cores))")
    parser.add_argument("--note", default="", help="a line on the conditions, written under every measured section")
    args = parser.parse_args(argv)
    if "sweep" in args.sections and not args.run_py.is_file():
        parser.error(f"section sweep launches `python run.py -m` and there is no {args.run_py.resolve()}: run from the "
                     f"repository root, pass --run-py PATH, or leave sweep out of --sections")
    device = torch.device(args.device)
    backbone = bench_backbone(args.backbone, device)
    repeats = 2 if args.smoke else 10
    sections = set(args.sections)
    rows = []
    if "coop_step" in sections:
        rows += bench_coop(args.conf, backbone, device, [4] if args.smoke else [10, 100, 1000], repeats)
    if "cocoop_step" in sections:
        rows += bench_cocoop(args.conf, backbone, device, [4] if args.smoke else [10, 100], repeats)
    if "deep_prompt_step" in sections:
        models = {"tiny": [4]} if args.smoke else dict(map(deep_model_spec, args.deep_models))
        rows += bench_deep_prompts(args.conf, models, device, repeats=2 if args.smoke else args.deep_repeats)
    if "extraction" in sections:
        rows += bench_extraction(backbone, device, images=16 if args.smoke else 1024, workers=0 if args.smoke else 2)
    if "sweep" in sections:
        with tempfile.TemporaryDirectory() as workdir:
            if args.smoke:
                rows += bench_sweep(args.run_py, args.backbone, ["zeroshot", "tip_adapter"], [1], [1], device, Path(workdir))
            else:
                rows += bench_sweep(args.run_py, args.backbone, ["zeroshot", "linear_probe", "tip_adapter",
                                                                 "tip_adapter_f", "clip_adapter", "lp_plus_plus",
                                                                 "zs_linear_probe", "clap", "taskres"],
                                    args.sweep_shots, args.sweep_seeds, device, Path(workdir))
    if "text_flops" in sections:
        rows += bench_text_flops(args.conf, device, ["promptbench-tiny"] if args.smoke else args.text_models,
                                 class_counts=[4] if args.smoke else args.flops_classes, repeats=2 if args.smoke else 5,
                                 matmul_size=256 if args.smoke else 4096 if device.type == "cuda" else 1024)
    if "speed_options" in sections:
        rows += bench_speed_options(args.conf, args.backbone, device, n_cls=4 if args.smoke else 100, repeats=repeats)
    autocast = {"none": None, "bf16": torch.bfloat16}[args.autocast or ("bf16" if device.type == "cuda" else "none")]
    if "real_shapes" in sections:
        limit = args.reference_prompts if args.reference_prompts is not None else 2 if args.smoke else \
            200 if device.type == "cpu" else 2000
        rows += bench_real_shapes(args.conf, device, real_shapes_plan(device, args.smoke), batch=4 if args.smoke else BATCH,
                                  autocast=autocast, text_chunk=2 if args.smoke else args.text_chunk,
                                  reference_limit=limit or None, repeats=1 if args.smoke else 3,
                                  budget_s=1 if args.smoke else 30)
    if "imagenet_epoch" in sections:
        workers = args.epoch_workers if args.epoch_workers is not None else min(8, os.cpu_count() or 1)
        images = args.epoch_images or (8 if args.smoke else 512 if device.type == "cuda" else 64)
        rows += bench_imagenet_epoch(args.conf, device, "tiny" if args.smoke else "RN50-quickgelu",
                                     n_cls=4 if args.smoke else 1000, images=images, batch=4 if args.smoke else BATCH,
                                     workers=0 if args.smoke else workers, autocast=autocast)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": device_info(device), "versions": package_versions(),
            "smoke": args.smoke, "backbone": backbone.describe(), "host": platform.node(), "note": args.note}
    out = Path(args.out)
    stem = "benchmarks_smoke" if args.smoke else "benchmarks" if args.backbone == "mini" else f"benchmarks_{args.backbone}"
    if device.type != "cpu" and not args.smoke:
        stem += f"_{device.type}"
    json_path = out / f"{stem}.json"
    # Sections not re-measured keep their earlier rows, each with the machine and date it was measured on.
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": [], "measured": {}}
    kept = [row for row in previous["rows"] if row["section"] in previous.get("measured", {})
            and row["section"] not in sections]
    measured = {section: previous["measured"][section] for section in dict.fromkeys(row["section"] for row in kept)}
    measured |= {row["section"]: meta for row in rows}
    rows = sorted(kept + rows, key=lambda row: SECTIONS.index(row["section"]))
    write_json_atomic(json_path, {"measured": measured, "rows": rows})
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text(markdown(rows, measured))
    print(markdown(rows, measured))


if __name__ == "__main__":
    main()
