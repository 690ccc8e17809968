"""What the augmentation keys and test-time augmentation cost on this CPU.

Training: the time of one training step (augmentation on the batch + forward + backward +
AdamW) of a ResNet-18 with the small stem at 28 px, batch 32, BreastMNIST images, for
today's default augmentation and for it plus each new key; the steps of all settings are
interleaved round by round (`round_order`), so a drift of a shared machine falls on all.
Prediction: seconds to predict the pool through `loop.predict` with tta none / flips /
policy (4 draws of TrivialAugment), and their factor over none.
Run from the repository root:
  .venv/bin/python -m benchmarks.augment_costs [--rounds 3]
Writes benchmarks/results/augment_costs.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import (
    REPO,
    machine_info,
    machine_line,
    markdown_table,
    median,
    pool_of,
    round_order,
    write_result,
)
from distmed.config import AugmentConfig, ModelConfig
from distmed.data import CachedImageDataset, to_model_input
from distmed.loop import Runtime, predict
from distmed.model import build_model
from distmed.task import BinaryTask

SOURCE = REPO.parent / "shared" / "data" / "breastmnist.npz"
BATCH = 32
TRAIN: dict[str, dict[str, Any]] = {
    "default (hflip, rotation 10)": {},
    "+ policy=randaugment (N 2, M 9)": {"policy": "randaugment"},
    "+ policy=trivialaugment": {"policy": "trivialaugment"},
    "+ crop_scale=0.5": {"crop_scale": 0.5},
    "+ brightness 0.1, contrast 0.2, gamma 0.2": {"brightness": 0.1, "contrast": 0.2, "gamma": 0.2},
}
TTA: dict[str, dict[str, Any]] = {
    "none": {},
    "flips": {"tta": "flips"},
    "policy (4 draws)": {"tta": "policy", "policy": "trivialaugment", "tta_draws": 4},
}


def step_seconds(model, optimizer, images: torch.Tensor, cfg: AugmentConfig, steps: int):
    """(seconds per training step, of which augmentation) over `steps` steps."""
    labels = torch.zeros(BATCH, dtype=torch.long)
    augment_time, started = 0.0, time.perf_counter()
    for step in range(steps):
        batch = images[step * BATCH : (step + 1) * BATCH]
        before = time.perf_counter()
        inputs = to_model_input(batch, cfg)
        augment_time += time.perf_counter() - before
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    total = time.perf_counter() - started
    return total / steps, augment_time / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--predict-images", type=int, default=512)
    args = parser.parse_args(argv)
    machine = machine_info()
    images, labels = pool_of(Path(SOURCE))
    pool = torch.from_numpy(images[:, None])  # uint8 (N, 1, 28, 28)
    model_cfg = ModelConfig(weights="none", stem="small")
    torch.manual_seed(0)
    model = build_model(model_cfg, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    configs = {name: AugmentConfig(**keys) for name, keys in TRAIN.items()}
    for cfg in configs.values():  # warm-up: kornia's import and first calls
        step_seconds(model, optimizer, pool, cfg, 1)
    train: dict[str, list[tuple[float, float]]] = {name: [] for name in TRAIN}
    for number in range(args.rounds):
        for name in round_order(list(TRAIN), number):
            train[name].append(step_seconds(model, optimizer, pool, configs[name], args.steps))
    model.eval()
    count = args.predict_images
    loader = DataLoader(
        CachedImageDataset(images[:count, None], labels[:count], np.arange(count)), batch_size=128
    )
    task, runtime = BinaryTask(("benign", "malignant"), 1), Runtime(torch.device("cpu"))
    tta: dict[str, list[float]] = {name: [] for name in TTA}
    for number in range(args.rounds):
        for name in round_order(list(TTA), number):
            started = time.perf_counter()
            predict(model, loader, runtime, task, AugmentConfig(**TTA[name]))
            tta[name].append(time.perf_counter() - started)
    base_step = median([s for s, _ in train["default (hflip, rotation 10)"]])
    train_rows = [
        [
            name,
            f"{1000 * median([s for s, _ in runs]):.0f}",
            f"{1000 * median([a for _, a in runs]):.1f}",
            f"{median([s for s, _ in runs]) / base_step:.2f}x",
        ]
        for name, runs in train.items()
    ]
    base_tta = median(tta["none"])
    tta_rows = [
        [name, f"{median(runs):.2f}", f"{median(runs) / base_tta:.2f}x"]
        for name, runs in tta.items()
    ]
    print(machine_line(machine))
    headers = ["augmentation", "ms/step", "of which augment ms", "vs default"]
    print(markdown_table(headers, train_rows))
    print(markdown_table([f"tta ({count} images)", "s", "vs none"], tta_rows))
    write_result(
        "augment_costs",
        {"machine": machine, "train_steps": train, "tta_seconds": tta, "args": vars(args)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
