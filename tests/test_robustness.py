"""Adversarial evaluation: PGD against TeCoA's loop, epsilon 0 = clean accuracy exactly, robust <= clean, every kind
of method attacked end to end (zero-shot and a features method through the image tower, CoOp on images, the linear
probe through its torch head), the options checked and part of skip-if-done."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from promptbench.config import check_run_config
from promptbench.contract import FeatureSet
from promptbench.data.transforms import pixel_transform
from promptbench.errors import PromptbenchError
from promptbench.robustness import PGD, logits_of_pixels, robust_top1
from promptbench.runner import result_relevant
from conftest import build_method, composed, find_results, run_py

CLASSES = ["blue", "green", "red"]
TEMPLATES = ["a photo of a {}."]
DEFAULTS = {"attack": "pgd", "epsilon": 1.0, "step_size": 1.0, "steps": 5, "norm": "linf", "random_start": True,
            "worst_case": True}


def attack(seed=0, **options) -> PGD:
    return PGD.from_config(DEFAULTS | options, seed)


def toy_pixels(root, backbone, split="test"):
    """The toy images of a split as [0, 1] test crops, with their labels."""
    transform = pixel_transform(backbone.image_size)
    paths = sorted((root / split).glob("*/*.png"))
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    labels = torch.tensor([CLASSES.index(path.parent.name) for path in paths])
    return pixels, labels


def reference_pgd(model, pixels, labels, epsilon, alpha, steps, norm, start):
    """cvlab-columbia/ZSRobust4FoundationModel attacks.py attack_pgd, line by line (its random start passed in)."""
    delta = start.clone()
    delta = torch.max(torch.min(delta, 1 - pixels), 0 - pixels)
    delta.requires_grad = True
    for _ in range(steps):
        loss = F.cross_entropy(model(pixels + delta), labels)
        loss.backward()
        grad = delta.grad.detach()
        d = delta[:, :, :, :]
        if norm == "linf":
            d = torch.clamp(d + alpha * torch.sign(grad), min=-epsilon, max=epsilon)
        else:
            g_norm = torch.norm(grad.view(grad.shape[0], -1), dim=1).view(-1, 1, 1, 1)
            d = (d + grad / (g_norm + 1e-10) * alpha).view(d.size(0), -1).renorm(p=2, dim=0, maxnorm=epsilon).view_as(d)
        d = torch.max(torch.min(d, 1 - pixels), 0 - pixels)
        delta.data[:, :, :, :] = d
        delta.grad.zero_()
    return pixels + delta


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_is_tecoas_attack(norm, tiny_backbone, toy_root):
    pixels, labels = toy_pixels(toy_root, tiny_backbone)
    model = logits_of_pixels(build_method("zeroshot", tiny_backbone, CLASSES, TEMPLATES))
    pgd = attack(epsilon=4.0 if norm == "linf" else 200.0, step_size=1.0 if norm == "linf" else 60.0, norm=norm)
    # the reference's random start, drawn from the same stream
    generator = torch.Generator().manual_seed(7)
    start = torch.zeros(pixels.shape)
    if norm == "linf":
        start.uniform_(-pgd.epsilon, pgd.epsilon, generator=generator)
    else:
        start.normal_(generator=generator)
        radius = torch.zeros(len(start), 1, 1, 1).uniform_(0, 1, generator=generator)
        start *= radius / start.view(len(start), -1).norm(p=2, dim=1).view(-1, 1, 1, 1) * pgd.epsilon
    expected = reference_pgd(model, pixels, labels, pgd.epsilon, pgd.step_size, pgd.steps, norm, start)
    adversarial = pgd.perturb(lambda x: F.cross_entropy(model(x), labels), pixels, torch.Generator().manual_seed(7))
    torch.testing.assert_close(adversarial, expected.detach(), rtol=0, atol=1e-7)
    assert not torch.equal(adversarial, pixels)
    assert 0 <= adversarial.min() and adversarial.max() <= 1
    if norm == "linf":
        assert (adversarial - pixels).abs().max() <= pgd.epsilon + 1e-7
    else:
        assert (adversarial - pixels).flatten(1).norm(dim=1).max() <= pgd.epsilon + 1e-5


def evaluate_attack(method, pixels, labels, pgd):
    """robust_top1 over a real loader of the pixels, with the clean evaluation as the runner gives it."""
    logits_of = logits_of_pixels(method)
    with torch.no_grad():
        clean = {"logits": logits_of(pixels), "labels": labels, "index": torch.arange(len(labels))}
    loader = DataLoader(TensorDataset(pixels, labels, torch.arange(len(labels))), batch_size=8)
    robust = robust_top1(pgd, method, loader, clean, lambda logits, targets: (logits, targets),
                         device=torch.device("cpu"), forward_context=torch.enable_grad)
    return 100.0 * float((clean["logits"].argmax(-1) == labels).float().mean()), robust


def test_robust_accuracy_is_never_above_clean_and_the_attack_bites(tiny_backbone, toy_root):
    pixels, labels = toy_pixels(toy_root, tiny_backbone)
    method = build_method("zeroshot", tiny_backbone, CLASSES, TEMPLATES)
    clean, robust = evaluate_attack(method, pixels, labels, attack(epsilon=16.0, steps=10, step_size=4.0))
    _, attacked_only = evaluate_attack(method, pixels, labels, attack(epsilon=16.0, steps=10, step_size=4.0,
                                                                      worst_case=False))
    assert clean > 0 and robust <= clean and robust <= attacked_only
    assert attacked_only < clean, "an attack of 16/255 must flip some of the random tiny model's right answers"
    _, unattacked = evaluate_attack(method, pixels, labels, attack(epsilon=0.0, worst_case=False))
    assert unattacked == clean


def test_the_linear_probes_torch_head_is_sklearns_decision_function_and_differentiable(tiny_backbone):
    generator = torch.Generator().manual_seed(2)
    dim = tiny_backbone.embed_dim
    labels = torch.arange(3).repeat_interleave(6)
    features = torch.randn(3, dim, generator=generator)[labels] + torch.randn(18, dim, generator=generator)
    train = FeatureSet(features, labels, torch.arange(18))
    method = build_method("linear_probe", tiny_backbone, CLASSES, TEMPLATES, selection="none")
    method.prepare(type("Provider", (), {"features": staticmethod(lambda split: train)}))
    reference = method.fit(np.array(features.tolist()), labels.numpy(), method.default_c)
    test = torch.randn(5, dim, generator=generator, requires_grad=True)
    logits = method(test)
    np.testing.assert_allclose(logits.detach().numpy(), reference.decision_function(np.array(test.tolist())),
                               rtol=1e-12, atol=1e-12)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    assert test.grad is not None and test.grad.abs().sum() > 0


def test_attack_options_are_checked_before_the_run():
    base = ["backbone=tiny", "dataset=folder", "dataset.root=/tmp/none"]
    check_run_config(composed((*base, "eval.attack=pgd")))
    for override, message in (("eval.attack=fgsm", "eval.attack='fgsm'"), ("eval.norm=l3", "eval.norm='l3'"),
                              ("eval.epsilon=-1", "eval.epsilon=-1"), ("eval.steps=2.5", "eval.steps=2.5"),
                              ("eval.worst_case=maybe", "eval.worst_case='maybe'")):
        with pytest.raises(PromptbenchError, match=message):
            check_run_config(composed((*base, "eval.attack=pgd", override)))
    assert PGD.from_config(composed(tuple(base)).eval, 1) is None, "no attack by default"
    assert attack().epsilon == pytest.approx(1 / 255) and attack().record()["epsilon_255"] == pytest.approx(1.0)


def test_the_attack_is_part_of_what_a_run_is_only_while_it_runs():
    config = {"method": {"name": "zeroshot"}, "seed": 1}
    unattacked = config | {"eval": DEFAULTS | {"attack": None}}
    assert result_relevant(unattacked) == result_relevant(config), "runs from before the option still match"
    assert result_relevant(unattacked | {"eval": DEFAULTS | {"attack": None, "epsilon": 4.0}}) == result_relevant(config)
    attacked = config | {"eval": DEFAULTS}
    assert result_relevant(attacked) != result_relevant(config)
    assert result_relevant(attacked) != result_relevant(config | {"eval": DEFAULTS | {"epsilon": 4.0}})


ATTACKED = ("zeroshot", "coop", "tip_adapter", "linear_probe")


def test_every_kind_of_method_is_attacked_and_epsilon_zero_is_clean_accuracy(toy_root, run_env, tmp_path):
    """Zero-shot and Tip-Adapter (features: attacked through the image tower), CoOp (images), the linear probe."""
    result = run_py(["-m", f"method={','.join(ATTACKED)}", "backbone=tiny", "dataset=folder", f"dataset.root={toy_root}",
                     "shots=2", "logger=none", "num_workers=0", "trainer.max_epochs=1",
                     "eval.attack=pgd", "eval.epsilon=0", "eval.steps=2", "eval.worst_case=false"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["method"]: r for r in find_results(tmp_path / "outputs")}
    assert sorted(runs) == sorted(ATTACKED)
    for name, payload in runs.items():
        metrics = payload["metrics"]["test"]
        assert metrics["robust_top1"] == metrics["top1"], name
        assert payload["robustness"]["epsilon"] == 0 and payload["robustness"]["steps"] == 2
        assert payload["config"]["eval"]["attack"] == "pgd"
    assert "robust_top1" in result.stdout
