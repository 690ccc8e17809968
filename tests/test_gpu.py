"""The CUDA path on a real GPU: AMP steps, channels_last, pinned loaders, GPU augmentation.

Marked `gpu` and skipped where `torch.cuda.is_available()` is false (CI, laptops); run by
`bash dev.sh gpu-check` on a CUDA machine. Every step goes through distmed's own code
(`build_fold`, `train_step`, `to_model_input`), not a copy of it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmed.config import AugmentConfig, ExperimentConfig
from distmed.data import augment_batch, to_model_input
from distmed.loop import FoldData, Runtime, build_fold, model_inputs, train_step
from distmed.model import set_train_mode
from distmed.task import BinaryTask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
        "run bash dev.sh gpu-check on a GPU machine",
    ),
]

CUDA = torch.device("cuda")
SIZE = 32


def fold_on_cuda(amp: str, workers: int = 0, count: int = 24, channels: int = 1):
    """A fold of distmed's own making on the GPU: random uint8 images, two classes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, channels, SIZE, SIZE), dtype=np.uint8)
    labels = np.arange(count) % 2
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"image_size": SIZE},
            "model": {"arch": "resnet18", "weights": "none"},
            "train": {"amp": amp, "batch_size": 8, "epochs": 1},
        }
    )
    two = BinaryTask(("negative", "positive"))
    data = FoldData(0, np.arange(count - 8), np.arange(count - 8, count), images, labels, two)
    fold = build_fold(data, cfg, Runtime(CUDA, amp, True), batch_size=8, workers=workers)
    return fold, images, labels


def weights_of(fold) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in fold.model.parameters()]).clone()


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_training_steps_on_cuda_move_the_weights_with_finite_losses(amp, dtype):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    fold, _, _ = fold_on_cuda(amp)
    set_train_mode(fold.model)
    assert next(fold.model.parameters()).device.type == "cuda"
    assert fold.scaler.is_enabled() == (amp == "fp16")  # only fp16 needs loss scaling
    before = weights_of(fold)
    losses = []
    for _ in range(2):  # 2 epochs of 2 steps of 8 images
        for images, labels, _ in fold.train_loader:
            loss, logits, on_device = train_step(fold, images, labels, Runtime(CUDA, amp, True))
            assert logits.dtype == dtype  # the forward pass really ran under autocast
            assert on_device.device.type == "cuda"
            losses.append(float(loss))
    assert len(losses) == 4 and all(np.isfinite(losses))
    after = weights_of(fold)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)
    if amp == "fp16":
        # The scaler starts at 2**16, halves at every step whose gradients overflowed (that
        # step is skipped) and grows only after 2000 clean steps: a power of two, and at
        # least one of the 4 steps was applied.
        halvings = np.log2(2.0**16 / fold.scaler.get_scale())
        assert halvings == int(halvings) and 0 <= halvings < len(losses)


def test_channels_last_gives_the_logits_of_contiguous_memory():
    fold, images, _ = fold_on_cuda("off")
    model = fold.model.eval()  # build_fold made it channels_last (always, on CUDA)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = torch.from_numpy(images[:8])
    last = model_inputs(batch, Runtime(CUDA, channels_last=True))
    plain = model_inputs(batch, Runtime(CUDA, channels_last=False))
    assert last.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    # fp32 convolutions without TF32, so that both layouts' kernels agree to float rounding.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        logits_last = model(last)
        model.to(memory_format=torch.contiguous_format)
        assert model.conv1.weight.is_contiguous()
        logits_plain = model(plain)
    torch.testing.assert_close(logits_last, logits_plain, rtol=1e-4, atol=1e-4)


def test_loader_processes_deliver_pinned_batches_equal_to_the_dataset():
    fold, images, labels = fold_on_cuda("off", workers=2, count=40, channels=3)
    for loader in (fold.train_loader, fold.val_loader):
        assert loader.num_workers == 2 and loader.pin_memory
    seen = []
    for batch_images, batch_labels, indices in fold.train_loader:
        assert batch_images.is_pinned() and batch_labels.is_pinned()
        np.testing.assert_array_equal(batch_images.numpy(), images[indices.numpy()])
        np.testing.assert_array_equal(batch_labels.numpy(), labels[indices.numpy()])
        seen += indices.tolist()
    assert sorted(seen) == list(range(32))  # 32 training images, 4 whole batches of 8
    val = list(fold.val_loader)  # not shuffled: the validation images in order
    assert all(b[0].is_pinned() for b in val)
    np.testing.assert_array_equal(torch.cat([b[0] for b in val]).numpy(), images[32:])
    moved = val[0][0].to(CUDA, non_blocking=True)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(moved.cpu().numpy(), images[32:40])


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_augmentation_on_cuda_equals_the_cpu_one_for_the_same_draws(monkeypatch, channels):
    """Same coins and angles on both devices (torch's CPU and CUDA generators differ, so the
    draws come from one seeded CPU generator), then the same output within float rounding."""
    real_rand = torch.rand
    generator = torch.Generator()

    def rand_from_cpu(*size, device=None, **kwargs):
        return real_rand(*size, generator=generator, **kwargs).to(device)

    monkeypatch.setattr(torch, "rand", rand_from_cpu)
    cfg = AugmentConfig(hflip=True, vflip=True, rotation=30)
    rng = np.random.default_rng(1)
    batch = torch.from_numpy(rng.integers(0, 256, (16, channels, SIZE, SIZE), dtype=np.uint8))
    outputs = {}
    for device in ("cpu", "cuda"):
        generator.manual_seed(7)
        outputs[device] = to_model_input(batch.to(device), cfg).cpu()
    unaugmented = to_model_input(batch)
    assert outputs["cuda"].shape == (16, 3, SIZE, SIZE)
    assert not torch.allclose(outputs["cpu"], unaugmented)  # the draws did augment
    torch.testing.assert_close(outputs["cuda"], outputs["cpu"], rtol=1e-4, atol=1e-4)
    # augment_batch alone on a float batch: the flips are exact, the rotation within rounding.
    flips = AugmentConfig(hflip=True, vflip=True, rotation=0)
    floats = batch.float() / 255
    generator.manual_seed(3)
    on_cpu = augment_batch(floats, flips)
    generator.manual_seed(3)
    assert torch.equal(augment_batch(floats.to(CUDA), flips).cpu(), on_cpu)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_kornia_augmentation_runs_on_the_gpu_per_image_and_seeded(policy):
    """The kornia-based keys on CUDA: output on the device, in [0, 1], different per image of
    identical inputs, the same for the same seed."""
    cfg = AugmentConfig(policy=policy, crop_scale=0.5, brightness=0.1, contrast=0.2, gamma=0.2)
    image = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    batch = image.expand(16, -1, -1, -1).contiguous().to(CUDA)
    runs = []
    for _ in range(2):
        torch.manual_seed(9)
        runs.append(augment_batch(batch, cfg))
    out = runs[0]
    assert out.device.type == "cuda" and out.shape == batch.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(runs[0], runs[1])
    assert len({tuple(row.flatten().tolist()) for row in out.cpu()}) == 16
