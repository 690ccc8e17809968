"""A contract every row of distmed.model.ARCHS keeps (after timm's tests/test_models.py).

Random init only (no downloads), CPU, 32 px inputs: build with a new head, freeze counts for
every `unfreeze`, a forward and backward step, the small stem, Grad-CAM's layer, a local state
dict loaded strictly, and the config values derived from the table.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torchvision import models

import distmed.model
from distmed.config import ModelConfig
from distmed.gradcam import cam_layer, gradcam_maps
from distmed.model import ARCHS, Stage, apply_freeze, arch_of, build_model, use_small_stem

NUM_CLASSES = 3
SIDE = 32


@pytest.fixture(scope="module", params=sorted(ARCHS))
def built(request):
    """(row, a randomly initialised network of it with a NUM_CLASSES linear head)."""
    torch.manual_seed(0)
    arch = ARCHS[request.param]
    return arch, build_model(ModelConfig(arch=arch.name, weights="none"), NUM_CLASSES)


def test_the_head_has_the_classes_and_the_row_is_remembered(built):
    arch, model = built
    head = arch.get_classifier(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == NUM_CLASSES
    assert arch_of(model) is arch


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
    head_size = sum(p.numel() for p in arch.get_classifier(model).parameters())
    stage_sizes = [
        sum(p.numel() for m in modules for p in m.parameters())
        for modules in arch.stage_modules(model).values()
    ]
    total = sum(p.numel() for p in model.parameters())
    for unfreeze in range(arch.depth + 1):
        apply_freeze(model, arch, unfreeze)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == head_size + sum(stage_sizes[:unfreeze])
    assert trainable == total  # unfreeze=depth trains everything
    apply_freeze(model, arch, 0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == head_size
    apply_freeze(model, arch, arch.depth)


def test_a_forward_and_backward_step_reaches_every_trainable_parameter(built):
    arch, model = built
    apply_freeze(model, arch, 2)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(torch.randn(2, 3, SIDE, SIDE))
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    apply_freeze(model, arch, arch.depth)


def test_the_cam_layer_exists_and_gives_a_map_per_image(built):
    arch, model = built
    path = cam_layer(arch.name, SIDE)
    assert path in {stage.path for stage in arch.stages}
    assert list(model.get_submodule(path).children())  # Grad-CAM hooks its last block
    images = np.random.default_rng(0).integers(0, 255, (1, 1, SIDE, SIDE), dtype=np.uint8)
    maps = gradcam_maps(model, images, [NUM_CLASSES - 1])
    assert maps.shape == (1, SIDE, SIDE) and np.isfinite(maps).all()


def test_stage_strides_are_the_tables(built):
    arch, model = built
    sides = {}
    hooks = [
        model.get_submodule(stage.path).register_forward_hook(
            lambda m, i, o, path=stage.path: sides.update({path: o.shape[-1]})
        )
        for stage in arch.stages
    ]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert sides == {stage.path: 64 // stage.reduction for stage in arch.stages}


def test_the_small_stem_keeps_4x_the_resolution_and_trains(built):
    arch, model = built
    model = copy.deepcopy(model)  # cheaper than building the deep rows again
    use_small_stem(model, arch)
    apply_freeze(model, arch, 1, new_stem=True)
    shallowest = arch.stages[-1]
    sides = []
    model.get_submodule(shallowest.path).register_forward_hook(
        lambda m, i, o: sides.append(o.shape[-1])
    )
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, SIDE, SIDE)).shape == (1, NUM_CLASSES)
    assert sides == [SIDE * 4 // shallowest.reduction]
    stem_params = [p for m in arch.stage_modules(model)["stem"] for p in m.parameters()]
    assert stem_params and all(p.requires_grad for p in stem_params)


def test_a_local_state_dict_loads_strictly(built, tmp_path):
    arch, model = built
    # The file a user would give: the backbone plus torchvision's 1000-class ImageNet head.
    head = arch.get_classifier(model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(arch.head + ".")}
    state[f"{arch.head}.weight"] = torch.zeros(1000, head.in_features)
    state[f"{arch.head}.bias"] = torch.zeros(1000)
    path = tmp_path / f"{arch.name}.pt"
    torch.save(state, path)
    loaded = build_model(ModelConfig(arch=arch.name, weights=str(path)), NUM_CLASSES)
    assert arch.get_classifier(loaded).out_features == NUM_CLASSES
    mine = loaded.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in state.items() if not k.startswith(arch.head))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_the_rows_weights_and_normalisation_are_torchvisions(name):
    arch = ARCHS[name]
    weights = getattr(models, arch.weights)
    assert models.get_model_weights(name) is weights
    preset = weights.DEFAULT.transforms()  # builds the preset only; downloads nothing
    assert tuple(preset.mean) == arch.mean and tuple(preset.std) == arch.std


def test_the_config_takes_its_arch_values_and_unfreeze_bound_from_the_table():
    for name, arch in ARCHS.items():
        assert ModelConfig(arch=name, unfreeze=arch.depth).unfreeze == arch.depth
    with pytest.raises(ValidationError, match="model.arch|arch"):
        ModelConfig(arch="resnet7")
    deepest = max(arch.depth for arch in ARCHS.values())
    with pytest.raises(ValidationError):
        ModelConfig(unfreeze=deepest + 1)


def test_an_unfreeze_deeper_than_the_arch_is_refused_by_name(monkeypatch):
    # A shallower row (as a future backbone could be) must bound `unfreeze` by its own depth.
    shallow = ARCHS["resnet18"]
    shallow = type(shallow)(**{**shallow.__dict__, "stages": (Stage("layer4", 32),)})
    monkeypatch.setitem(distmed.model.ARCHS, "resnet18", shallow)
    assert ModelConfig(arch="resnet18", unfreeze=2).unfreeze == 2
    with pytest.raises(ValidationError, match="resnet18 has 2 stages"):
        ModelConfig(arch="resnet18", unfreeze=3)
