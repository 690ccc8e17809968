"""distmed.loop (no Ray): precision, optimiser, schedule, stopping, prediction outside
torch.distributed, and that the module imports no Ray at all."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assembled_fold, built_fold, two_class_images
from torch.utils.data import DataLoader

from distmed import loop as fold_loop
from distmed.config import ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from distmed.data import CachedImageDataset, to_model_input
from distmed.loop import (
    FoldRun,
    Runtime,
    build_loss,
    build_optimizer,
    build_scheduler,
    cpu_has_native_bf16,
    epoch_metrics,
    predict,
    resolve_amp,
    run_fold_epoch,
    train_one_epoch,
)
from distmed.model import build_model, set_train_mode
from distmed.task import BinaryTask, MulticlassTask

TWO = BinaryTask(("negative", "positive"), 1)
THREE = MulticlassTask(("a", "b", "c"))

CPU = Runtime(torch.device("cpu"))
CPU_CHANNELS_LAST = Runtime(torch.device("cpu"), channels_last=True)


def params(n: int = 3) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]


def lr_trace(cfg: OptimConfig, epochs: int, steps: int) -> list[float]:
    """The learning rate before the first step and after each of epochs * steps steps."""
    optimizer = build_optimizer(params(1), cfg)
    scheduler = build_scheduler(optimizer, cfg, epochs, steps)
    trace = [optimizer.param_groups[0]["lr"]]
    for _ in range(epochs * steps):
        optimizer.step()
        scheduler.step()
        trace.append(optimizer.param_groups[0]["lr"])
    return trace


def bare_fold() -> FoldRun:
    return FoldRun(
        index=0,
        task=TWO,
        model=None,
        optimizer=None,
        scheduler=None,
        scaler=None,
        loss_fn=None,
        train_loader=None,
        val_loader=None,
    )


def test_the_loop_imports_no_ray():
    code = "import sys, distmed.loop; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- precision


def test_resolve_amp_auto_on_cpu():
    resolved = resolve_amp("auto", torch.device("cpu"))
    assert resolved in ("bf16", "off")
    assert resolved == ("bf16" if cpu_has_native_bf16() else "off")


@pytest.mark.parametrize("setting", ["bf16", "fp16", "off"])
def test_resolve_amp_explicit_passes_through(setting):
    assert resolve_amp(setting, torch.device("cpu")) == setting


def test_resolve_amp_auto_follows_cpu_capability(monkeypatch):
    monkeypatch.setattr(fold_loop, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(fold_loop, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp("auto", torch.device("cpu")) == "off"


def test_cpu_has_native_bf16_is_a_bool():
    assert isinstance(cpu_has_native_bf16(), bool)


# --------------------------------------------------------------------------- optimiser


def test_build_optimizer_adamw():
    optimizer = build_optimizer(params(), OptimConfig(name="adamw", lr=0.02, weight_decay=0.1))
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.02)
    assert group["weight_decay"] == pytest.approx(0.1)
    assert len(group["params"]) == 3


def test_build_optimizer_adam():
    optimizer = build_optimizer(params(), OptimConfig(name="adam", lr=0.003, weight_decay=0.0))
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.003)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_build_optimizer_fuses_the_update_and_it_matches_the_per_tensor_one(name, monkeypatch):
    cfg = OptimConfig(name=name, lr=0.05, momentum=0.9, weight_decay=0.01)
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(5)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    fused_params = [torch.nn.Parameter(t.clone()) for t in start]
    loop_params = [torch.nn.Parameter(t.clone()) for t in start]
    fused = build_optimizer(fused_params, cfg)
    assert fused.defaults["fused"] is True  # CPU tensors: the fused kernel
    # With no fused device, the same call leaves torch its default: a loop over the tensors.
    monkeypatch.setattr(fold_loop, "_FUSED_DEVICES", ())
    loop = build_optimizer(loop_params, cfg)
    assert not loop.defaults["fused"]
    for step_grads in grads:
        for optimizer, tensors in ((fused, fused_params), (loop, loop_params)):
            for param, grad in zip(tensors, step_grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(fused_params, loop_params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(fused_params[0], start[0])  # it did update


def test_build_optimizer_sgd():
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.8, weight_decay=5e-4)
    optimizer = build_optimizer(params(), cfg)
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.1)
    assert group["momentum"] == pytest.approx(0.8)
    assert group["weight_decay"] == pytest.approx(5e-4)


# --------------------------------------------------------------------------- schedule


def test_cosine_with_warmup_ramps_up_then_decays_to_zero():
    epochs, steps, lr = 4, 5, 1e-3
    trace = lr_trace(OptimConfig(lr=lr, warmup_epochs=1, schedule="cosine"), epochs, steps)
    assert len(trace) == epochs * steps + 1
    warmup = steps  # one epoch of warm-up
    assert trace[0] == pytest.approx(0.01 * lr)  # LinearLR start factor
    ramp = trace[: warmup + 1]
    assert (np.diff(ramp) > 0).all(), ramp
    assert trace[warmup] == pytest.approx(lr)
    assert max(trace) == pytest.approx(lr)
    decay = trace[warmup:]
    assert (np.diff(decay) < 0).all(), decay
    assert trace[-1] == pytest.approx(0.0, abs=1e-9)
    # halfway through the cosine part the rate is half the peak
    assert trace[warmup + (len(decay) - 1) // 2] == pytest.approx(
        lr * 0.5 * (1 + math.cos(math.pi * ((len(decay) - 1) // 2) / (len(decay) - 1)))
    )


def test_cosine_without_warmup_starts_at_peak():
    trace = lr_trace(OptimConfig(lr=0.1, warmup_epochs=0), 3, 4)
    assert trace[0] == pytest.approx(0.1)
    assert (np.diff(trace) < 0).all()
    assert trace[-1] == pytest.approx(0.0, abs=1e-9)
    assert trace[6] == pytest.approx(0.05)  # 6 of 12 steps: cos(pi/2)


def test_warmup_longer_than_training_still_reaches_peak_then_zero():
    trace = lr_trace(OptimConfig(lr=1e-3, warmup_epochs=5), 2, 3)
    assert trace[0] == pytest.approx(1e-5)
    assert max(trace) == pytest.approx(1e-3)
    assert trace[-1] == pytest.approx(0.0, abs=1e-9)


def test_constant_schedule_holds_after_warmup():
    trace = lr_trace(OptimConfig(lr=0.01, warmup_epochs=1, schedule="constant"), 3, 4)
    assert trace[0] == pytest.approx(1e-4)
    assert (np.diff(trace[:5]) > 0).all()
    assert trace[4:] == pytest.approx([0.01] * (len(trace) - 4))


# --------------------------------------------------------------------------- loss


def test_build_loss_balanced_weights():
    labels = np.array([0, 0, 0, 1])
    three = MulticlassTask(("a", "b", "c"))
    loss = build_loss(TrainConfig(class_weights="balanced"), labels, three, "cpu")
    # sklearn 'balanced': n / (classes_present * count); an absent class keeps weight 1
    assert loss.weight.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1), 1.0])
    assert build_loss(TrainConfig(), labels, three, "cpu").weight is None


# --------------------------------------------------------------------------- early stopping


def test_update_stopping_with_patience():
    fold = bare_fold()
    aucs = [0.60, 0.70, 0.65, 0.70, 0.69]  # best at epoch 2, then 3 epochs without gain
    states = []
    for auc in aucs:
        fold.update_stopping(auc, patience=3)
        states.append((fold.best_auc, fold.epochs_since_best, fold.stopped))
    assert states == [
        (0.60, 0, False),
        (0.70, 0, False),
        (0.70, 1, False),
        (0.70, 2, False),  # equal is not a gain
        (0.70, 3, True),
    ]


def test_update_stopping_improvement_resets_counter():
    fold = bare_fold()
    for auc in [0.6, 0.5, 0.55, 0.61, 0.6]:
        fold.update_stopping(auc, patience=3)
    assert fold.best_auc == 0.61
    assert fold.epochs_since_best == 1
    assert not fold.stopped


def test_update_stopping_patience_one_and_nan():
    fold = bare_fold()
    fold.update_stopping(0.7, patience=1)
    assert not fold.stopped
    fold.update_stopping(float("nan"), patience=1)  # an undefined AUC is no gain
    assert fold.stopped


def test_update_stopping_without_patience_never_stops():
    fold = bare_fold()
    for auc in [0.9] + [0.1] * 20:
        fold.update_stopping(auc, patience=None)
    assert fold.epochs_since_best == 20
    assert not fold.stopped


# --------------------------------------------------------------------------- prediction


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none", unfreeze=5), num_classes=3)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny_data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 1, 16, 16), dtype=np.uint8)
    labels = rng.integers(0, 3, 12)
    return images, labels


def test_predict_returns_each_sample_once_sorted(tiny_model, tiny_data):
    images, labels = tiny_data
    subset = np.array([9, 2, 7, 0, 5, 11, 3])
    loader = DataLoader(CachedImageDataset(images, labels, subset), batch_size=3, shuffle=True)
    torch.manual_seed(1)
    indices, got_labels, probs = predict(tiny_model, loader, CPU, THREE)
    assert indices.tolist() == sorted(subset.tolist())
    assert got_labels.tolist() == labels[indices].tolist()
    assert probs.shape == (len(subset), 3)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        direct = torch.softmax(tiny_model(to_model_input(torch.from_numpy(images[indices]))), 1)
    assert np.allclose(probs, direct.numpy(), atol=1e-5)


def test_predict_drops_padding_duplicates(tiny_model, tiny_data):
    images, labels = tiny_data
    # what DistributedSampler padding looks like: samples repeated at the end
    padded = np.array([4, 1, 6, 4, 1])
    loader = DataLoader(CachedImageDataset(images, labels, padded), batch_size=2)
    indices, got_labels, probs = predict(tiny_model, loader, CPU_CHANNELS_LAST, THREE)
    assert indices.tolist() == [1, 4, 6]
    assert got_labels.tolist() == labels[[1, 4, 6]].tolist()
    assert probs.shape == (3, 3)


def test_predict_puts_model_in_eval_mode(tiny_data):
    images, labels = tiny_data
    model = build_model(ModelConfig(weights="none"), num_classes=2)
    model.train()
    loader = DataLoader(CachedImageDataset(images, labels, np.arange(4)), batch_size=4)
    first = predict(model, loader, CPU, TWO)[2]
    second = predict(model, loader, CPU, TWO)[2]
    assert not model.training
    assert np.array_equal(first, second)  # no dropout / batch statistics in play


# --------------------------------------------------------------------------- divergence


def _real_fold(index: int, lr: float, images, labels) -> FoldRun:
    torch.manual_seed(index)
    model = build_model(ModelConfig(weights="none"), num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    train_set = CachedImageDataset(images, labels, np.arange(0, 16))
    val_set = CachedImageDataset(images, labels, np.arange(16, 24))
    return assembled_fold(
        TWO,
        model,
        optimizer,
        torch.nn.CrossEntropyLoss(),
        DataLoader(train_set, batch_size=4, shuffle=True, drop_last=True),
        DataLoader(val_set, batch_size=8),
        index=index,
    )


def test_absurd_learning_rate_diverges_and_leaves_the_cv_score_undefined():
    images, labels = two_class_images(24)
    cfg = ExperimentConfig()
    sane, absurd = _real_fold(0, 1e-3, images, labels), _real_fold(1, 1e12, images, labels)
    for fold in (sane, absurd):
        run_fold_epoch(fold, 0, cfg, CPU)
    assert not sane.stopped and "diverged" not in sane.history[-1]
    assert math.isfinite(sane.history[-1]["val_roc_auc"])
    assert absurd.stopped and absurd.history[-1]["diverged"] == 1.0
    assert math.isnan(absurd.history[-1]["val_roc_auc"])

    reported = epoch_metrics([sane, absurd], epoch=0, epochs=5)
    assert reported["folds_diverged"] == 1
    assert math.isnan(reported["cv_roc_auc"])  # never the mean of the surviving folds
    assert reported["folds_active"] == 1 and reported["cv_complete"] == 0


def test_epoch_metrics_average_the_folds_and_mark_the_last_epoch():
    folds = [bare_fold(), bare_fold()]
    for k, (fold, auc) in enumerate(zip(folds, (0.6, 0.8), strict=True)):
        fold.index = k
        fold.history.append({"epoch": 2, "train_loss": 0.5 + k, "val_roc_auc": auc})
    reported = epoch_metrics(folds, epoch=1, epochs=2)
    assert reported["cv_roc_auc"] == pytest.approx(0.7)
    assert reported["cv_roc_auc_std"] == pytest.approx(0.1)
    assert reported["fold1_roc_auc"] == 0.8 and reported["fold0_epoch"] == 2
    assert reported["train_loss"] == pytest.approx(1.0)
    assert reported["cv_complete"] == 1 and reported["folds_diverged"] == 0


def test_epoch_metrics_report_each_findings_fold_mean_where_it_is_defined():
    """Several findings per image: a trial reports `cv_roc_auc/<finding>` (fold means; a fold
    where a finding's AUC is undefined is left out of that finding's mean)."""
    folds = [bare_fold(), bare_fold()]
    per_fold = ({"A": 0.6, "B": math.nan}, {"A": 0.8, "B": 0.9})
    for k, (fold, aucs) in enumerate(zip(folds, per_fold, strict=True)):
        fold.index = k
        record = {"epoch": 1, "train_loss": 0.5, "val_roc_auc": 0.7}
        fold.history.append(record | {f"val_roc_auc/{f}": v for f, v in aucs.items()})
    reported = epoch_metrics(folds, epoch=0, epochs=1)
    assert reported["cv_roc_auc/A"] == pytest.approx(0.7)
    assert reported["cv_roc_auc/B"] == pytest.approx(0.9)


def test_epoch_metrics_report_every_repeated_fold_and_the_corrected_se():
    aucs = [0.6, 0.8, 0.7, 0.9]  # 2 repeats x 2 folds, repeat-major
    folds = [bare_fold() for _ in aucs]
    for k, (fold, auc) in enumerate(zip(folds, aucs, strict=True)):
        fold.index = k
        fold.history.append({"epoch": 3, "train_loss": 0.5, "val_roc_auc": auc})
    reported = epoch_metrics(folds, epoch=2, epochs=3, folds_per_repeat=2)
    assert reported["cv_roc_auc"] == pytest.approx(0.75)  # the mean over all R*k folds
    assert [reported[f"fold{k}_roc_auc"] for k in range(4)] == aucs
    assert reported["fold3_epoch"] == 3
    # sqrt((1/4 + 1/(2-1)) * s^2), s^2 = 0.05/3 (ddof 1)
    assert reported["cv_roc_auc_se"] == pytest.approx(math.sqrt(1.25 * 0.05 / 3))
    # without k the folds count as one repeat of 4: (1/4 + 1/3) * s^2
    one_repeat = epoch_metrics(folds, epoch=2, epochs=3)
    assert one_repeat["cv_roc_auc_se"] == pytest.approx(math.sqrt((1 / 4 + 1 / 3) * 0.05 / 3))


def test_train_one_epoch_scores_the_logits_of_its_own_steps(tiny_data):
    images, labels = tiny_data
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none", unfreeze=5), num_classes=3)
    # lr 0: weights stay put, so each step's logits can be recomputed here afterwards
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(CachedImageDataset(images, labels, np.arange(12)), batch_size=4)
    fold = assembled_fold(THREE, model, optimizer, torch.nn.CrossEntropyLoss(), loader)
    got = train_one_epoch(fold, CPU)

    set_train_mode(model)  # batch statistics, as during the steps
    with torch.no_grad():
        logits = torch.cat([model(to_model_input(x)) for x, _, _ in loader])
    probs = torch.softmax(logits, dim=1).numpy()
    expected = THREE.metrics(labels, probs)
    assert set(got) == {"loss", "accuracy", "roc_auc", "images_per_s"}
    assert got["images_per_s"] > 0
    assert got["accuracy"] == pytest.approx(expected["accuracy"])
    assert got["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()
    assert got["loss"] == pytest.approx(loss, rel=1e-5)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_due_every_n_epochs_and_always_on_the_last_report():
    every2 = TrainConfig(epochs=5, checkpoint_every=2)
    due = [fold_loop.checkpoint_due(e, every2, last=e == 4) for e in range(5)]
    assert due == [False, True, False, True, True]  # epochs 2, 4 and the last (5)
    assert all(fold_loop.checkpoint_due(e, TrainConfig(epochs=3), last=False) for e in range(3))
    # A run that ends early (every fold stopped, or diverged) keeps its last epoch too.
    assert fold_loop.checkpoint_due(0, TrainConfig(epochs=9, checkpoint_every=4), last=True)


def _epochs(fold: FoldRun, cfg: ExperimentConfig, epochs: range) -> None:
    """The epochs of `worker.train_folds` for one fold on rank 0, without Ray."""
    for epoch in epochs:
        torch.manual_seed(fold_loop.epoch_seed(cfg.train.seed, 0, epoch))
        run_fold_epoch(fold, epoch, cfg, CPU)


def test_a_run_resumed_from_an_older_checkpoint_repeats_the_same_epochs():
    """checkpoint_every=2 and a kill after epoch 3: the resumed run restarts from epoch 2's
    checkpoint and ends with the very weights and history of a run never interrupted
    (shuffling and augmentation are seeded per epoch)."""
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"weights": "none"},
            "train": {"epochs": 4, "batch_size": 4, "amp": "off", "checkpoint_every": 2},
            "data": {"image_size": 16, "augment": {"hflip": True, "rotation": 20}},
        }
    )

    def fresh() -> FoldRun:
        return built_fold(cfg, range(8), range(16, 24), count=24)

    straight = fresh()
    _epochs(straight, cfg, range(4))

    killed = fresh()
    kept = None
    for epoch in range(3):  # killed during epoch 4; the last checkpoint is epoch 2's
        _epochs(killed, cfg, range(epoch, epoch + 1))
        if fold_loop.checkpoint_due(epoch, cfg.train, last=False):
            kept = {k: _clone(v) for k, v in killed.state_dict().items()}
    resumed = fresh()
    resumed.load_state_dict(kept)
    assert len(resumed.history) == 2
    _epochs(resumed, cfg, range(2, 4))

    def scores(history):  # all but the timing
        return [{k: v for k, v in r.items() if k != "train_images_per_s"} for r in history]

    assert scores(resumed.history) == scores(straight.history)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def _clone(value):
    import copy

    return copy.deepcopy(value)
