"""A saved model as one network that predicts: the refit model or the fold ensemble, calibrated.

`load_inference_model(path, ensemble)` rebuilds it from `best_model.pt` alone. Its outputs
are logits in the sense that their softmax is the final class probabilities: the refit
model's logits divided by the saved temperature, or, for the fold ensemble, the log of the
mean of the fold models' temperature-scaled probabilities. Predict, evaluate, the app,
export and the search's test evaluation all go through it, so they agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from distmed.cli import first_line
from distmed.config import ModelConfig
from distmed.errors import UserError
from distmed.model import build_model
from distmed.savedmodel import SavedModel

Ensemble = Literal["refit", "folds"]
ENSEMBLES: tuple[Ensemble, ...] = ("refit", "folds")
# log(0) would be -inf in an exported graph; a probability this small is 0 to any reader.
MIN_PROBABILITY = 1e-12


class InferenceModel(nn.Module):
    """Normalised images (B, 3, S, S) -> logits (B, K) whose softmax is the prediction.

    One member: its logits / `temperature`. Several (the fold ensemble): log of the mean
    of softmax(member logits / `temperature`), i.e. the ensemble averages probabilities
    (as `--ensemble folds` promises), and a softmax of the output gives that mean back.
    """

    def __init__(self, members: Sequence[nn.Module], temperature: float = 1.0) -> None:
        super().__init__()
        if not members or temperature <= 0:
            raise ValueError("an InferenceModel needs members and a positive temperature")
        self.members = nn.ModuleList(members)
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](images).float() / self.temperature
        probs = torch.stack(
            [torch.softmax(m(images).float() / self.temperature, dim=1) for m in self.members]
        ).mean(dim=0)
        return torch.log(probs.clamp_min(MIN_PROBABILITY))


def load_inference_model(
    path: Path, ensemble: Ensemble = "refit"
) -> tuple[InferenceModel, SavedModel]:
    """The model in `best_model.pt` (safe load: `weights_only=True`), in eval mode.

    Args:
        ensemble: "refit" (the model refitted on all training data) or "folds" (the best
            trial's k fold models, probabilities averaged).

    Raises:
        UserError: not a valid best_model.pt; weights that do not fit its network; fold
            models asked of a file without them. One line naming the file.
    """
    saved, state, fold_states = SavedModel.load_all(path)
    if ensemble == "folds":
        if not fold_states:
            raise UserError(
                f"--model {path}: holds no fold models (written before distmed kept them, "
                "or the best trial's checkpoint was gone); use --ensemble refit"
            )
        members = [network(saved, s, path) for s in fold_states]
    else:
        members = [network(saved, state, path)]
    temperature = saved.calibration.temperature if saved.calibration else 1.0
    return InferenceModel(members, temperature).eval(), saved


def load_model(path: Path) -> tuple[nn.Module, SavedModel]:
    """The refit network alone, uncalibrated (what training produced), in eval mode."""
    saved, state = SavedModel.load_with_weights(path)
    return network(saved, state, path).eval(), saved


def network(saved: SavedModel, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """The ResNet `saved.config.model` describes, with `state` loaded (no download).

    Raises:
        UserError: the weights do not fit that network; names `path` and the first key.
    """
    try:
        return build_network(saved.config.model, len(saved.class_names), state)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: torch lists them all
        # Its first line only says "Error(s) in loading state_dict"; the next names the key.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else first_line(exc)
        raise UserError(
            f"--model {path}: its weights do not fit a {saved.config.model.arch} with "
            f"{len(saved.class_names)} classes ({detail[:160]})"
        ) from exc


def build_network(
    model_cfg: ModelConfig, num_classes: int, state: dict[str, torch.Tensor]
) -> nn.Module:
    """The ResNet `model_cfg` describes with `state` loaded; never downloads weights.

    Raises:
        RuntimeError: `state` does not fit it (torch's message lists the keys).
    """
    model = build_model(model_cfg.model_copy(update={"weights": "none"}), num_classes)
    model.load_state_dict(state)
    return model


def members(model: nn.Module) -> list[nn.Module]:
    """The networks inside `model` (itself when it is a plain network): Grad-CAM's targets."""
    return list(model.members) if isinstance(model, InferenceModel) else [model]
