"""distmed.model: heads, stage freezing, BatchNorm modes, local weight files."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from torch import nn
from torchvision import models

from distmed.config import ModelConfig
from distmed.errors import UserError
from distmed.model import build_model, set_train_mode, warn_frozen_random_stages

# What `model.unfreeze` counts for a ResNet, head end first, spelled out independently of
# the architecture table in distmed/model.py.
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "stem")
STAGE_PREFIXES = {
    "layer4": ("layer4.",),
    "layer3": ("layer3.",),
    "layer2": ("layer2.",),
    "layer1": ("layer1.",),
    "stem": ("conv1.", "bn1."),
}


def model_cfg(**kwargs) -> ModelConfig:
    kwargs.setdefault("weights", "none")
    return ModelConfig(**kwargs)


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(123)
    state = models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_output_shape(head):
    torch.manual_seed(0)
    model = build_model(model_cfg(head=head, head_hidden=16), num_classes=3)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 3)
    assert torch.isfinite(out).all()


def test_head_structure():
    linear = build_model(model_cfg(head="linear"), 2)
    assert isinstance(linear.fc, nn.Linear)
    assert (linear.fc.in_features, linear.fc.out_features) == (512, 2)
    mlp = build_model(model_cfg(head="mlp", head_hidden=24, head_dropout=0.3), 5)
    assert isinstance(mlp.fc, nn.Sequential)
    layers = list(mlp.fc)
    assert (layers[0].in_features, layers[0].out_features) == (512, 24)
    assert isinstance(layers[2], nn.Dropout) and layers[2].p == pytest.approx(0.3)
    assert (layers[-1].in_features, layers[-1].out_features) == (24, 5)


@pytest.mark.parametrize("unfreeze", range(6))
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_unfreeze_trains_head_and_last_k_stages(unfreeze, head):
    model = build_model(model_cfg(unfreeze=unfreeze, head=head, head_hidden=8), 2)
    names = [name for name, _ in model.named_parameters()]
    prefixes = ["fc."] + [p for stage in RESNET_STAGES[:unfreeze] for p in STAGE_PREFIXES[stage]]
    expected = {n for n in names if n.startswith(tuple(prefixes))}
    assert trainable_names(model) == expected
    assert any(n.startswith("fc.") for n in expected)
    if unfreeze == 5:
        assert expected == set(names)  # everything trains
    if unfreeze == 0:
        assert all(n.startswith("fc.") for n in expected)


def test_unfreeze_expected_sets_by_hand():
    two = trainable_names(build_model(model_cfg(unfreeze=2), 2))
    assert "layer4.1.conv2.weight" in two and "layer3.0.downsample.0.weight" in two
    assert "layer2.0.conv1.weight" not in two and "conv1.weight" not in two
    four = trainable_names(build_model(model_cfg(unfreeze=4), 2))
    assert "layer1.0.bn1.weight" in four and "bn1.weight" not in four
    five = trainable_names(build_model(model_cfg(unfreeze=5), 2))
    assert {"conv1.weight", "bn1.weight", "bn1.bias"} <= five


def test_set_train_mode_keeps_frozen_batchnorm_in_eval():
    model = build_model(model_cfg(unfreeze=2), 2)
    model.eval()
    set_train_mode(model)
    assert model.training
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            trainable_stage = name.startswith(("layer4.", "layer3."))
            assert module.training == trainable_stage, name
    assert model.fc.training
    assert model.layer1[0].conv1.training  # non-BatchNorm modules are in train mode


def test_set_train_mode_frozen_stats_do_not_move():
    torch.manual_seed(0)
    model = build_model(model_cfg(unfreeze=1), 2)
    set_train_mode(model)
    before_frozen = model.layer1[0].bn1.running_mean.clone()
    before_trained = model.layer4[0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(model.layer1[0].bn1.running_mean, before_frozen)
    assert not torch.equal(model.layer4[0].bn1.running_mean, before_trained)


@pytest.mark.parametrize("unfreeze", [0, 5])
def test_set_train_mode_extremes(unfreeze):
    model = build_model(model_cfg(unfreeze=unfreeze), 2)
    set_train_mode(model)
    bn_modes = {m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_modes == {unfreeze == 5}


@pytest.mark.parametrize(
    ("kwargs", "lowest", "frozen"),
    [
        ({"unfreeze": 3}, None, "layer1, stem"),
        ({"unfreeze": 4, "stem": "small"}, None, None),  # the new stem trains anyway
        ({"unfreeze": 3, "stem": "small"}, None, "layer1"),
        ({"unfreeze": 5}, None, None),
        ({"unfreeze": 5}, 2, "layer2, layer1, stem"),  # a search that can draw 2
        ({"unfreeze": 0, "weights": "frozen.pt"}, None, None),  # pretrained: freezing is the point
    ],
)
def test_frozen_stages_at_random_init_are_warned_by_name(caplog, kwargs, lowest, frozen):
    cfg = model_cfg(**kwargs)
    with caplog.at_level("WARNING", logger="distmed.model"):
        warn_frozen_random_stages(cfg, lowest)
    if frozen is None:
        assert caplog.records == []
        return
    [record] = caplog.records
    message = record.getMessage()
    assert f"freezes {frozen} at random init" in message
    fix = "set model.unfreeze=5" if lowest is None else "take it out of the space"
    assert f"; {fix} to train every stage" in message
    # The warning names exactly what build_model freezes.
    unfreeze = cfg.unfreeze if lowest is None else lowest
    built = build_model(cfg.model_copy(update={"unfreeze": unfreeze}), 2)
    frozen_params = {name.split(".")[0] for name in dict(built.named_parameters())} - {
        name.split(".")[0] for name in trainable_names(built)
    }
    expected = {p.rstrip(".") for stage in frozen.split(", ") for p in STAGE_PREFIXES[stage]}
    assert frozen_params == expected


def test_local_weights_are_loaded(resnet18_file):
    path, state = resnet18_file
    model = build_model(model_cfg(weights=str(path)), 2)
    for key in ("conv1.weight", "layer2.0.conv1.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(model.state_dict()[key], state[key]), key
    assert model.fc.out_features == 2  # the saved 1000-class fc is replaced


def test_local_weights_wrapped_in_state_dict_key(tmp_path, resnet18_file):
    _, state = resnet18_file
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = build_model(model_cfg(weights=str(path)), 2)
    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])


def test_local_weights_sha256(resnet18_file):
    path, state = resnet18_file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = build_model(model_cfg(weights=str(path), weights_sha256=digest[:12]), 2)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    model = build_model(model_cfg(weights=str(path), weights_sha256=digest.upper()), 2)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:16]
    with pytest.raises(UserError) as info:
        build_model(model_cfg(weights=str(path), weights_sha256=wrong), 2)
    assert "sha256" in str(info.value)
    assert str(path) in str(info.value)


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nothing.pt"
    with pytest.raises(UserError) as info:
        build_model(model_cfg(weights=str(missing)), 2)
    assert "model.weights" in str(info.value) and "nothing.pt" in str(info.value)


def test_weights_file_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="state dict"):
        build_model(model_cfg(weights=str(path)), 2)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a torch file")
    with pytest.raises(UserError, match="garbage.pt"):
        build_model(model_cfg(weights=str(garbage)), 2)


def test_weights_with_wrong_keys_fail_strictly(tmp_path, resnet18_file):
    # A strict load: torch's key report reaches the user as a one-line UserError.
    _, state = resnet18_file
    renamed = {k.replace("layer", "stage"): v for k, v in state.items()}
    path = tmp_path / "renamed.pt"
    torch.save(renamed, path)
    with pytest.raises(UserError, match="does not fit resnet18.*Missing key"):
        build_model(model_cfg(weights=str(path)), 2)
    extra = dict(state, extra_tensor=torch.zeros(1))
    torch.save(extra, path)
    with pytest.raises(UserError, match="does not fit resnet18.*Unexpected key"):
        build_model(model_cfg(weights=str(path)), 2)


def test_weights_saved_from_a_ddp_wrapper_load_without_its_module_prefix(tmp_path, resnet18_file):
    _, state = resnet18_file
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = build_model(model_cfg(weights=str(path)), 2)
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_a_fine_tuned_head_is_refused_with_what_a_backbone_file_holds(tmp_path, resnet18_file):
    """A state dict with a 2-class head (a fine-tuned model) is no backbone file: the line
    says the file needs torchvision's ImageNet head, not just 'check the file'."""
    _, state = resnet18_file
    path = tmp_path / "finetuned.pt"
    torch.save(dict(state, **{"fc.weight": torch.zeros(2, 512), "fc.bias": torch.zeros(2)}), path)
    with pytest.raises(UserError, match="size mismatch for fc.weight.*1000-class ImageNet head"):
        build_model(model_cfg(weights=str(path)), 2)


def test_weights_for_another_arch_fail_strictly(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(models.resnet34().state_dict(), path)
    with pytest.raises(UserError, match="does not fit resnet18.*Unexpected key"):
        build_model(model_cfg(weights=str(path), arch="resnet18"), 2)


def test_imagenet_weights_offline_is_a_user_error(tmp_path, monkeypatch):
    # An empty TORCH_HOME: nothing cached, so torchvision must download (the network is closed).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(weights="imagenet"), 2)
    assert "model.weights" in str(info.value)
    assert time.monotonic() - start < 30


def test_small_stem_keeps_resolution_and_loads_the_rest_of_the_weights(resnet18_file):
    path, state = resnet18_file
    model = build_model(model_cfg(weights=str(path), stem="small", unfreeze=1), 2).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    # layer1 sees the full 28x28 input instead of 7x7 through the ImageNet stem.
    shapes = []
    model.layer1.register_forward_hook(lambda m, i, o: shapes.append(o.shape) and None)
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 2)
    assert shapes[0][-2:] == (28, 28)
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    # The new stem trains even though unfreeze=1 freezes layer1..layer3.
    names = trainable_names(model)
    assert {"conv1.weight", "bn1.weight"} <= names
    assert not any(n.startswith(("layer1.", "layer3.")) for n in names)
