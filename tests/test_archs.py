"""A contract every row of distmed.model.ARCHS keeps (after timm's tests/test_models.py).

Random init only (no downloads), CPU, batch 2 at 32 and 64 px: build with a new head, freeze
counts for every `unfreeze`, a forward and backward step with the stage strides, the small
stem, the smallest accepted input, Grad-CAM maps (32 px), a local state dict loaded strictly (sha256
checked), the weights' preprocessing, and the config values derived from the table. Each row
is built once per module (`built`); the rows over ~20M parameters carry the `heavy` marker
(`-m "not heavy"` leaves them out of a quick loop).
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torchvision import models

import distmed.model
from distmed.config import MIN_IMAGE_SIZE, ModelConfig, validate_config
from distmed.errors import UserError
from distmed.gradcam import cam_layer, gradcam_maps
from distmed.model import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCRATCH_NORM_MOMENTUM,
    Stage,
    apply_freeze,
    arch_of,
    build_model,
    use_small_stem,
)
from distmed.space import load_space

NUM_CLASSES = 3
SIDES = (32, 64)
# Rows whose build, steps and state-dict round trip dominate the file's time on a CPU.
HEAVY = {
    "resnet101",
    "resnet152",
    "efficientnet_v2_s",
    "convnext_tiny",
    "convnext_small",
    "swin_t",
}
ROWS = [pytest.param(name, marks=pytest.mark.heavy) if name in HEAVY else name for name in ARCHS]


@pytest.fixture(scope="module", params=ROWS)
def built(request):
    """(row, a randomly initialised network of it with a NUM_CLASSES linear head)."""
    torch.manual_seed(0)
    arch = ARCHS[request.param]
    return arch, build_model(ModelConfig(arch=arch.name, weights="none"), NUM_CLASSES)


def n_params(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_head_is_a_linear_with_the_classes_and_the_row_is_remembered(built):
    arch, model = built
    head = arch.get_classifier(model)
    assert type(head) is torch.nn.Linear and head.out_features == NUM_CLASSES
    assert arch_of(model) is arch


def test_only_the_final_linear_is_replaced(built):
    arch, model = built
    with torch.device("meta"):  # the module tree without the cost of initialising it
        fresh = models.get_model(arch.name, weights=None)
    # Dropout, norms and pre-logits layers before the final Linear stay as torchvision has them.
    ours = [type(m) for name, m in model.named_modules() if name != arch.head]
    theirs = [type(m) for name, m in fresh.named_modules() if name != arch.head]
    assert ours == theirs


def test_head_stem_and_stages_cover_every_parameter_once(built):
    arch, model = built
    owners: dict[int, str] = {}
    parts = {"head": [arch.get_classifier(model)], **arch.stage_modules(model)}
    for part, modules in parts.items():
        for module in modules:
            for p in module.parameters():
                assert id(p) not in owners, f"{part} shares a parameter with {owners[id(p)]}"
                owners[id(p)] = part
    assert set(owners) == {id(p) for p in model.parameters()}


def test_unfreeze_trains_the_head_and_then_one_more_stage_per_step(built):
    arch, model = built
    head_size = n_params([arch.get_classifier(model)])
    stage_sizes = [n_params(modules) for modules in arch.stage_modules(model).values()]
    assert all(stage_sizes)
    try:
        for unfreeze in range(arch.depth + 1):
            apply_freeze(model, arch, unfreeze)
            assert n_trainable(model) == head_size + sum(stage_sizes[:unfreeze])
        assert n_trainable(model) == sum(p.numel() for p in model.parameters())  # max: all
        apply_freeze(model, arch, 0)
        assert n_trainable(model) == head_size  # 0: the head only
    finally:
        apply_freeze(model, arch, arch.depth)


@pytest.mark.parametrize("side", SIDES)
def test_a_forward_and_backward_step_reaches_exactly_the_trainable_parameters(built, side):
    arch, model = built
    apply_freeze(model, arch, 2)
    sides = {}
    hooks = [  # each stage's map is side / its table stride wide
        model.get_submodule(stage.path).register_forward_hook(
            lambda m, i, o, path=stage.path: sides.update({path: arch.to_nchw(o).shape[-2:]})
        )
        for stage in arch.stages
    ]
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(torch.randn(2, 3, side, side))
        assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        apply_freeze(model, arch, arch.depth)
    assert sides == {s.path: (-(-side // s.reduction),) * 2 for s in arch.stages}


def test_grad_cam_gives_a_finite_map_per_image_at_the_input_size(built):
    arch, model = built
    side = SIDES[0]
    assert cam_layer(arch.name, side) in {stage.path for stage in arch.stages}
    images = np.random.default_rng(0).integers(0, 255, (2, 1, side, side), dtype=np.uint8)
    maps = gradcam_maps(model, images, [NUM_CLASSES - 1, 0])
    assert maps.shape == (2, side, side) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1


def test_the_small_stem_widens_every_map_by_its_gain_and_trains(built):
    arch, model = built
    if arch.small_stem is None:
        with pytest.raises(ValidationError, match=f"{arch.name} has no small stem"):
            ModelConfig(arch=arch.name, stem="small")
        return
    model = copy.deepcopy(model)  # cheaper than building the deep rows again
    use_small_stem(model, arch)
    apply_freeze(model, arch, 1, new_stem=True)
    shallowest = arch.stages[-1]
    sides = []
    model.get_submodule(shallowest.path).register_forward_hook(
        lambda m, i, o: sides.append(arch.to_nchw(o).shape[-1])
    )
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, NUM_CLASSES)
    assert sides == [16 * arch.small_stem.gain // shallowest.reduction]
    stem_params = [p for m in arch.stage_modules(model)["stem"] for p in m.parameters()]
    assert stem_params and all(p.requires_grad for p in stem_params)


def test_the_smallest_input_the_row_claims_runs_and_one_less_does_not(built):
    arch, model = built
    with torch.no_grad():
        model.eval()
        assert model(torch.randn(1, 3, arch.min_size, arch.min_size)).shape == (1, NUM_CLASSES)
        if arch.min_size > MIN_IMAGE_SIZE:
            with pytest.raises(RuntimeError):
                model(torch.randn(1, 3, arch.min_size - 1, arch.min_size - 1))
    if arch.min_size > MIN_IMAGE_SIZE:
        raw = {"data": {"image_size": arch.min_size - 1}, "model": {"arch": arch.name}}
        with pytest.raises(UserError, match=f"needs at least {arch.min_size} px") as info:
            validate_config(raw)
        assert "\n" not in str(info.value)
        if arch.small_stem is not None:
            raw["model"]["stem"] = "small"
            assert validate_config(raw).data.image_size == arch.min_size - 1


def test_a_local_state_dict_loads_strictly_with_its_sha256(built, tmp_path):
    arch, model = built
    # The file a user would give: the backbone plus torchvision's 1000-class ImageNet head.
    head = arch.get_classifier(model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(arch.head + ".")}
    state[f"{arch.head}.weight"] = torch.zeros(1000, head.in_features)
    state[f"{arch.head}.bias"] = torch.zeros(1000)
    path = tmp_path / f"{arch.name}.pt"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = ModelConfig(arch=arch.name, weights=str(path), weights_sha256=digest)
    loaded = build_model(cfg, NUM_CLASSES)
    path.unlink()  # up to 230 MB an architecture: the suite's disk use stays small
    assert arch.get_classifier(loaded).out_features == NUM_CLASSES
    mine = loaded.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in state.items() if not k.startswith(arch.head))


def _norm_momenta(model: torch.nn.Module) -> set[float | None]:
    return {
        m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }


def test_from_random_init_every_batch_norm_averages_with_momentum_0_1(built):
    """torchvision's MobileNet-V3 and EfficientNet-B5+/V2 ship 0.01; from scratch that leaves
    the running statistics near their initial values for a whole short search."""
    _, model = built
    assert _norm_momenta(model) in (set(), {SCRATCH_NORM_MOMENTUM})


def test_a_pretrained_backbone_keeps_its_own_batch_norm_momentum(tmp_path):
    scratch = build_model(ModelConfig(arch="mobilenet_v3_large", weights="none"), NUM_CLASSES)
    path = tmp_path / "mobilenet.pt"
    shipped = models.mobilenet_v3_large(weights=None)
    assert _norm_momenta(shipped) == {0.01}  # what torchvision builds
    torch.save(shipped.state_dict(), path)
    cfg = ModelConfig(arch="mobilenet_v3_large", weights=str(path))
    assert _norm_momenta(build_model(cfg, NUM_CLASSES)) == {0.01}
    assert _norm_momenta(scratch) == {SCRATCH_NORM_MOMENTUM}


@pytest.mark.parametrize("name", list(ARCHS))
def test_the_rows_weights_and_preprocessing_are_torchvisions(name):
    arch = ARCHS[name]
    weights = getattr(models, arch.weights)
    assert models.get_model_weights(name) is weights
    preset = weights.DEFAULT.transforms()  # builds the preset only; downloads nothing
    assert tuple(preset.mean) == arch.mean and tuple(preset.std) == arch.std
    assert preset.crop_size == [arch.input_size] and preset.resize_size == [arch.resize_size]
    assert preset.interpolation.value == arch.interpolation


def test_every_row_normalises_as_the_pipeline_does():
    # to_model_input, savedmodel.Preprocessing and export normalise with the ImageNet
    # statistics; a row whose weights want others needs that path to read the row first.
    assert {(arch.mean, arch.std) for arch in ARCHS.values()} == {(IMAGENET_MEAN, IMAGENET_STD)}


def test_the_config_takes_its_arch_values_and_unfreeze_bound_from_the_table():
    for name, arch in ARCHS.items():
        assert ModelConfig(arch=name).unfreeze == arch.depth  # unset: everything trains
        assert ModelConfig(arch=name, unfreeze=0).unfreeze == 0
        with pytest.raises(ValidationError, match=f"{name} has {arch.depth} stages") as info:
            ModelConfig(arch=name, unfreeze=arch.depth + 1)
        assert f"at most {arch.depth}" in str(info.value)
    with pytest.raises(ValidationError, match="model.arch|arch"):
        ModelConfig(arch="resnet7")


def test_an_unfreeze_deeper_than_the_arch_is_refused_by_name(monkeypatch):
    # A shallower row (as a future backbone could be) must bound `unfreeze` by its own depth.
    shallow = ARCHS["resnet18"]
    shallow = type(shallow)(**{**shallow.__dict__, "stages": (Stage("layer4", 32),)})
    monkeypatch.setitem(distmed.model.ARCHS, "resnet18", shallow)
    assert ModelConfig(arch="resnet18", unfreeze=2).unfreeze == 2
    with pytest.raises(ValidationError, match="resnet18 has 2 stages"):
        ModelConfig(arch="resnet18", unfreeze=3)


def test_model_arch_is_searchable_over_every_row(tmp_path):
    base = "base: {data: {image_size: 64}, model: {weights: none, unfreeze: 5}}\n"
    path = tmp_path / "space.yaml"
    path.write_text(base + f"space:\n  model.arch: {{choice: {list(ARCHS)}}}\n")
    assert load_space(path).space["model.arch"].args == tuple(ARCHS)
    # A choice the base cannot take is refused before Ray starts, naming the arch.
    deep = max(ARCHS.values(), key=lambda arch: arch.depth)
    path.write_text(
        base.replace("unfreeze: 5", f"arch: {deep.name}, unfreeze: {deep.depth}")
        + "space:\n  model.arch: {choice: [resnet18]}\n"
    )
    with pytest.raises(
        UserError, match="space.model.arch can produce .resnet18.*resnet18 has 5 stages"
    ):
        load_space(path)
