"""distmed.space: search-space files, distributions, Ray Tune domains, trial configs, errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
import yaml
from torchvision import models

from distmed.config import ExperimentConfig, config_fields
from distmed.errors import EXIT_USER_ERROR, UserError
from distmed.model import ARCHS
from distmed.search import (
    build_sampler,
    resolve_sampler,
    wait_until_tune_took_every_report,
)
from distmed.space import apply_params, fixed_for_the_search, load_space, to_tune_domains

REPO = Path(__file__).resolve().parents[1]
# The two that run offline on a CPU: the demo and the random-init variant of resnet.yaml.
SHIPPED = [REPO / "search_spaces" / "demo.yaml", REPO / "search_spaces" / "scratch.yaml"]
EVERY_SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))
# backbones.yaml searches the arch and the recipe instead (test_backbones_space_...).
FIVE_KEY_SPACES = [p for p in EVERY_SHIPPED if p.name != "backbones.yaml"]
FOUR_KEYS = {"optim.lr", "train.batch_size", "optim.name", "optim.weight_decay"}
FIVE_KEYS = FOUR_KEYS | {"model.unfreeze"}


def space_file(tmp_path: Path, space: str, top: str = "", name: str = "space.yaml") -> Path:
    """A search-space file: `top` (raw top-level YAML) then `space:` with `space` indented."""
    body = "".join(f"  {line}\n" for line in space.strip().splitlines())
    path = tmp_path / name
    path.write_text(f"{top}space:\n{body}" if space.strip() else f"{top}space: {{}}\n")
    return path


def draws(domain, n: int = 200, seed: int = 0) -> list:
    return list(domain.sample(size=n, random_state=np.random.default_rng(seed)))


# --------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("path", FIVE_KEY_SPACES, ids=lambda p: p.name)
def test_shipped_space_loads_with_the_optimiser_keys(path: Path):
    spec = load_space(path)
    assert FOUR_KEYS <= set(spec.space) <= FIVE_KEYS
    assert spec.space["optim.lr"].kind == "loguniform"
    assert spec.space["optim.weight_decay"].kind == "loguniform"
    assert spec.space["train.batch_size"].kind == "choice"
    assert spec.space["optim.name"].kind == "choice"
    assert set(spec.space["optim.name"].args) == {"adam", "adamw", "sgd"}
    if "model.unfreeze" in spec.space:
        assert spec.space["model.unfreeze"].kind == "randint"
    assert spec.search.metric == "cv_roc_auc"
    assert spec.search.mode == "max"
    assert spec.search.scheduler.type == "asha"
    # Only the flagship downloads weights; the others (the tests' and CI's) run offline.
    assert spec.base.model.weights == ("imagenet" if path.stem == "resnet" else "none")


def test_the_flagship_search_is_imagenet_transfer_learning():
    spec = load_space(REPO / "search_spaces" / "resnet.yaml")
    arch = ARCHS[spec.base.model.arch]
    assert spec.base.model.weights == "imagenet" and spec.base.model.stem == "imagenet"
    assert spec.base.data.image_size == arch.input_size  # the weights' preprocessing
    # The unfreeze depth is searched from the head alone to every stage and the stem.
    assert set(spec.space) == FIVE_KEYS
    assert spec.space["model.unfreeze"].args == (0, arch.depth)


SPACES = ("scratch", "resnet")


def test_the_scratch_variant_is_resnet_yaml_from_random_init_training_every_stage(caplog):
    from distmed.tune import main

    scratch, resnet = (load_space(REPO / "search_spaces" / f"{n}.yaml") for n in SPACES)
    assert scratch.base.model.weights == "none"
    assert "model.unfreeze" not in scratch.space  # freezing random-init stages is no search
    assert scratch.base.model.unfreeze == ARCHS[scratch.base.model.arch].depth
    assert scratch.base.model.arch == resnet.base.model.arch
    assert scratch.base.cv == resnet.base.cv and scratch.search == resnet.search
    with caplog.at_level("WARNING", logger="distmed.model"):
        for name in SPACES:
            assert main(["--space", name, "--dry-run"]) == 0
    assert [r for r in caplog.records if r.name == "distmed.model"] == []  # no frozen random init


def test_shipped_files_differ_where_documented():
    demo, scratch = (load_space(p) for p in SHIPPED)
    assert demo.base.data.root == "demo"
    assert demo.base.data.image_size == 32
    assert demo.search.num_samples == 6
    assert "model.unfreeze" not in demo.space  # random init: freezing stages is no search
    assert demo.base.model.unfreeze == ARCHS[demo.base.model.arch].depth
    assert scratch.base.data.root is None
    assert scratch.base.data.image_size == 64
    assert scratch.base.train.patience == 4
    assert scratch.search.num_samples == 30
    assert scratch.space["train.batch_size"].args == (32, 64, 128)


@pytest.mark.parametrize("path", FIVE_KEY_SPACES, ids=lambda p: p.name)
def test_every_sample_of_a_shipped_space_is_a_valid_trial_config(path: Path):
    spec = load_space(path)
    domains = to_tune_domains(spec.space)
    assert set(domains) == set(spec.space)
    rng = np.random.default_rng(1)
    for _ in range(50):
        params = {key: domain.sample(random_state=rng) for key, domain in domains.items()}
        cfg = apply_params(spec.base, params)
        assert cfg.optim.lr == pytest.approx(float(params["optim.lr"]))
        assert cfg.model.unfreeze == int(params.get("model.unfreeze", spec.base.model.unfreeze))
        assert cfg.optim.name == params["optim.name"]
        assert cfg.train.epochs == spec.base.train.epochs  # not searched: from the base


RANDOM_INIT = "base:\n model:\n  weights: none\n"  # the default is imagenet


@pytest.mark.parametrize(
    ("space", "top", "frozen"),
    [
        ("model.unfreeze: {randint: [3, 5]}", RANDOM_INIT, "layer1, stem"),
        ("model.unfreeze: {choice: [5, 4]}", RANDOM_INIT, "stem"),
        ("model.unfreeze: {randint: [0, 5]}", "", None),  # pretrained: freezing is the point
        ("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", RANDOM_INIT, None),  # every stage trains
        # a small stem always trains, but this space can also draw the ImageNet stem
        (
            "model.unfreeze: {randint: [4, 5]}\nmodel.stem: {choice: [small, imagenet]}",
            RANDOM_INIT + "  stem: small\n",
            "stem",
        ),
        ("model.unfreeze: {randint: [4, 5]}", RANDOM_INIT + "  stem: small\n", None),
        # trials may draw pretrained weights: no warning for the space as a whole
        (
            "model.unfreeze: {randint: [0, 5]}\nmodel.weights: {choice: [none, W]}",
            RANDOM_INIT,
            None,
        ),
    ],
)
def test_search_warns_when_trials_can_freeze_random_init_stages(
    tmp_path, caplog, space, top, frozen
):
    from distmed.tune import main

    if " W]" in space:  # a weights file the dry run can load into the base arch
        weights = tmp_path / "w.pt"
        torch.save(models.resnet18(weights=None).state_dict(), weights)
        space = space.replace(" W]", f" {weights}]")
    path = space_file(tmp_path, space, top)
    with caplog.at_level("WARNING", logger="distmed.model"):
        assert main(["--space", str(path), "--dry-run"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "distmed.model"]
    if frozen is None:
        assert warnings == []
    else:
        [message] = warnings
        assert "model.unfreeze searched down to" in message
        assert f"freezes {frozen} at random init" in message


def test_the_frozen_random_stages_warning_names_each_drawn_arch_s_own_stages(tmp_path, caplog):
    """Unfreeze 5 trains every stage of a ResNet and freezes four of EfficientNet-B0's nine."""
    from distmed.tune import main

    space = "model.arch: {choice: [resnet18, efficientnet_b0]}\nmodel.unfreeze: {choice: [5]}"
    path = space_file(tmp_path, space, RANDOM_INIT)
    with caplog.at_level("WARNING", logger="distmed.model"):
        assert main(["--space", str(path), "--dry-run"]) == 0
    [message] = [r.getMessage() for r in caplog.records if r.name == "distmed.model"]
    assert "searched down to 5 in efficientnet_b0" in message
    assert "freezes features.3, features.2, features.1, stem at random init" in message


@pytest.mark.parametrize(
    ("where", "space"),
    [
        ("base", "model.arch: {choice: [resnet18, mobilenet_v3_large]}"),
        ("space", "model.weights: {choice: [none, W]}\nmodel.arch: {choice: [resnet18, resnet34]}"),
    ],
)
def test_a_weights_file_is_checked_against_every_arch_the_space_can_draw(
    tmp_path, capsys, where, space
):
    """A file that fits one drawn arch and not another would error every trial of the other,
    inside Ray; the dry run (and the search, before its first decode) refuse it in one line."""
    from distmed.pipeline import models_to_check
    from distmed.tune import main

    weights = tmp_path / "resnet18.pt"
    torch.save(models.resnet18(weights=None).state_dict(), weights)
    top = f"base:\n model:\n  weights: {weights}\n" if where == "base" else RANDOM_INIT
    path = space_file(tmp_path, space.replace(" W]", f" {weights}]"), top)
    other = "mobilenet_v3_large" if where == "base" else "resnet34"
    checked = [(m.arch, m.weights) for m in models_to_check(load_space(path))]
    assert ("resnet18", str(weights)) in checked and (other, str(weights)) in checked
    assert main(["--space", str(path), "--dry-run"]) == EXIT_USER_ERROR
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"model.weights {weights}: does not fit {other}" in line


# --------------------------------------------------------------------------- distributions


def test_loguniform_parses_and_samples_log_spaced_within_bounds(tmp_path):
    spec = load_space(space_file(tmp_path, "optim.lr: {loguniform: [1.0e-5, 1.0e-1]}"))
    dist = spec.space["optim.lr"]
    assert (dist.kind, dist.args) == ("loguniform", (1e-5, 1e-1))
    values = draws(to_tune_domains(spec.space)["optim.lr"])
    assert all(1e-5 <= v <= 1e-1 and v > 0 for v in values)
    # Log-uniform: about half below the geometric midpoint 1e-3 (uniform would give ~1 %).
    below = sum(v < 1e-3 for v in values) / len(values)
    assert 0.35 < below < 0.65


def test_uniform_parses_and_samples_within_bounds(tmp_path):
    spec = load_space(space_file(tmp_path, "model.head_dropout: {uniform: [0.1, 0.5]}"))
    assert spec.space["model.head_dropout"].kind == "uniform"
    values = draws(to_tune_domains(spec.space)["model.head_dropout"])
    assert all(0.1 <= v <= 0.5 for v in values)
    below = sum(v < 0.3 for v in values) / len(values)
    assert 0.35 < below < 0.65
    assert len(set(values)) > 150  # continuous, not quantized


def test_quniform_samples_multiples_of_q_within_bounds_both_ends_reachable(tmp_path):
    spec = load_space(space_file(tmp_path, "model.head_dropout: {quniform: [0.0, 0.5, 0.125]}"))
    assert spec.space["model.head_dropout"].args == (0.0, 0.5, 0.125)
    values = draws(to_tune_domains(spec.space)["model.head_dropout"])
    assert set(values) == {0.0, 0.125, 0.25, 0.375, 0.5}


def test_qloguniform_samples_positive_multiples_of_q_and_fit_an_int_field(tmp_path):
    spec = load_space(space_file(tmp_path, "train.batch_size: {qloguniform: [8, 256, 8]}"))
    dist = spec.space["train.batch_size"]
    assert (dist.kind, dist.args) == ("qloguniform", (8, 256, 8))
    values = draws(to_tune_domains(spec.space)["train.batch_size"])
    assert all(v > 0 and 8 <= v <= 256 for v in values)
    assert all(math.isclose(v / 8, round(v / 8)) for v in values)
    assert len(set(values)) > 5
    cfg = apply_params(spec.base, {"train.batch_size": values[0]})
    assert cfg.train.batch_size == round(values[0])
    assert type(cfg.train.batch_size) is int


def test_randint_high_is_inclusive_and_never_exceeded(tmp_path):
    spec = load_space(space_file(tmp_path, "model.unfreeze: {randint: [1, 4]}"))
    assert spec.space["model.unfreeze"].args == (1, 4)
    values = draws(to_tune_domains(spec.space)["model.unfreeze"])
    assert set(int(v) for v in values) == {1, 2, 3, 4}  # 4 reachable, 0 and 5 never


def test_randint_up_to_the_config_maximum_is_accepted(tmp_path):
    # unfreeze allows 0..5: randint [0, 5] must load (5 is produced) and samples reach 5.
    spec = load_space(space_file(tmp_path, "model.unfreeze: {randint: [0, 5]}"))
    values = {int(v) for v in draws(to_tune_domains(spec.space)["model.unfreeze"])}
    assert values == {0, 1, 2, 3, 4, 5}


def test_choice_samples_only_and_all_listed_values(tmp_path):
    spec = load_space(
        space_file(
            tmp_path,
            "optim.name: {choice: [adam, sgd]}\ntrain.batch_size: {choice: [16, 32, 64]}",
        )
    )
    assert spec.space["optim.name"].args == ("adam", "sgd")
    domains = to_tune_domains(spec.space)
    assert set(draws(domains["optim.name"])) == {"adam", "sgd"}
    assert {int(v) for v in draws(domains["train.batch_size"])} == {16, 32, 64}


def test_augmentation_is_searched_per_trial_while_other_data_keys_are_fixed(tmp_path):
    spec = load_space(space_file(tmp_path, "data.augment.rotation: {choice: [0, 15]}"))
    assert set(draws(to_tune_domains(spec.space)["data.augment.rotation"])) == {0, 15}
    fixed = [k for k in config_fields() if fixed_for_the_search(k)]
    assert "data.image_size" in fixed and "cv.seed" in fixed and "data.augment.hflip" not in fixed
    assert "scaling.num_workers" in fixed and "tracking.wandb.project" in fixed
    assert not [k for k in fixed if not k.startswith(("data.", "cv.", "scaling.", "tracking."))]
    assert "optim.lr" not in fixed and "train.batch_size" not in fixed


def test_float_bounds_that_are_whole_numbers_are_fine_for_randint(tmp_path):
    spec = load_space(space_file(tmp_path, "model.unfreeze: {randint: [1.0, 3.0]}"))
    values = {int(v) for v in draws(to_tune_domains(spec.space)["model.unfreeze"])}
    assert values == {1, 2, 3}


# --------------------------------------------------------------------------- errors: the space


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            "optim.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}",
            ["optim.learning_rate", "not a config field"],
            id="unknown-key",
        ),
        pytest.param(
            "data.image_size: {choice: [28, 64]}",
            ["space.data.image_size", "fixed for the whole search", "base"],
            id="data-fixed-per-search",
        ),
        pytest.param(
            "cv.folds: {randint: [3, 5]}",
            ["space.cv.folds", "fixed for the whole search"],
            id="cv-fixed-per-search",
        ),
        pytest.param(
            "optim.lr: {lognormal: [1.0e-4, 1.0e-2]}",
            ["space.optim.lr", "unknown distribution 'lognormal'"],
            id="unknown-distribution",
        ),
        pytest.param(
            "optim.name: {choice: []}", ["space.optim.name", "choice is empty"], id="empty-choice"
        ),
        pytest.param(
            "optim.lr: {loguniform: [0, 1.0e-2]}",
            ["space.optim.lr", "must be > 0"],
            id="loguniform-low-zero",
        ),
        pytest.param(
            "optim.lr: {loguniform: [-1.0, 1.0e-2]}",
            ["space.optim.lr", "must be > 0"],
            id="loguniform-low-negative",
        ),
        pytest.param(
            "model.head_dropout: {qloguniform: [0.0, 0.5, 0.1]}",
            ["space.model.head_dropout", "must be > 0"],
            id="qloguniform-low-zero",
        ),
        pytest.param(
            "optim.lr: {uniform: [1.0e-2, 1.0e-3]}",
            ["space.optim.lr", "must be below high"],
            id="low-above-high",
        ),
        pytest.param(
            "optim.lr: {loguniform: [1.0e-3, 1.0e-3]}",
            ["space.optim.lr", "must be below high"],
            id="low-equals-high",
        ),
        pytest.param(
            "model.unfreeze: {randint: [4, 2]}",
            ["space.model.unfreeze", "must be below high"],
            id="randint-low-above-high",
        ),
        pytest.param(
            "optim.lr: {uniform: [0.1]}",
            ["space.optim.lr", "uniform needs [low, high]"],
            id="uniform-one-arg",
        ),
        pytest.param(
            "optim.lr: {uniform: [0.1, 0.2, 0.3]}",
            ["space.optim.lr", "uniform needs [low, high]"],
            id="uniform-three-args",
        ),
        pytest.param(
            "model.head_dropout: {quniform: [0.0, 0.5]}",
            ["space.model.head_dropout", "[low, high, q]"],
            id="quniform-two-args",
        ),
        pytest.param(
            "model.unfreeze: {randint: [1, 2, 3]}",
            ["space.model.unfreeze", "randint needs [low, high]"],
            id="randint-three-args",
        ),
        pytest.param(
            "optim.lr: {uniform: [a, 0.5]}", ["space.optim.lr", "numbers"], id="non-numeric-bound"
        ),
        pytest.param(
            "optim.lr: {uniform: [true, 0.5]}", ["space.optim.lr", "numbers"], id="bool-bound"
        ),
        pytest.param(
            "model.unfreeze: {randint: [0.5, 3]}",
            ["space.model.unfreeze", "must be integers"],
            id="randint-non-integer",
        ),
        pytest.param(
            "model.head_dropout: {quniform: [0.0, 0.5, 0]}",
            ["space.model.head_dropout", "q must be > 0"],
            id="q-zero",
        ),
        pytest.param(
            "model.head_dropout: {quniform: [0.0, 0.5, -0.1]}",
            ["space.model.head_dropout", "q must be > 0"],
            id="q-negative",
        ),
        pytest.param("optim.lr: 0.01", ["space.optim.lr", "expected one of"], id="not-a-mapping"),
        pytest.param(
            "optim.lr: {loguniform: [1.0e-4, 1.0e-2], uniform: [0.1, 0.2]}",
            ["space.optim.lr", "expected one of"],
            id="two-distributions",
        ),
        pytest.param(
            "optim.lr: {loguniform: 0.01}", ["space.optim.lr", "needs a list"], id="args-not-a-list"
        ),
    ],
)
def test_bad_distribution_is_a_user_error_naming_the_key(tmp_path, line, expected):
    with pytest.raises(UserError) as info:
        load_space(space_file(tmp_path, line))
    message = str(info.value)
    assert "space.yaml" in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("model.unfreeze: {randint: [0, 9]}", ["space.model.unfreeze", "can produce 9"]),
        ("train.batch_size: {choice: [0, 32]}", ["space.train.batch_size", "can produce 0"]),
        (
            "optim.name: {choice: [adam, lion]}",
            ["space.optim.name", "can produce 'lion'", "list only values the config takes"],
        ),
        (
            "optim.lr: {loguniform: [1.0e-4, 20.0]}",
            ["space.optim.lr", "can produce 20.0", "use randint or choice"],
        ),
        (
            "model.head_dropout: {uniform: [0.5, 1.0]}",
            ["space.model.head_dropout", "can produce 1.0"],
        ),
    ],
    ids=["randint-high", "choice-zero-batch", "choice-unknown-optimiser", "lr-too-big", "lt-bound"],
)
def test_value_the_config_rejects_is_a_user_error(tmp_path, line, expected):
    with pytest.raises(UserError) as info:
        load_space(space_file(tmp_path, line))
    message = str(info.value)
    for part in expected:
        assert part in message
    assert "config rejects" in message
    # the whole-number hint only where a continuous range can draw a fraction
    assert ("randint" in message.split("rejects")[-1]) == ("uniform" in line)


@pytest.mark.parametrize(
    "line",
    [
        "model.head_dropout: {quniform: [0.0, 0.5, 0.2]}",  # 0.5 is not a multiple of 0.2
        "train.batch_size: {qloguniform: [10, 256, 8]}",  # 10 is not a multiple of 8
    ],
    ids=["quniform-high", "qloguniform-low"],
)
def test_quantized_bounds_off_the_q_grid_are_a_user_error_at_load(tmp_path, line):
    # Ray Tune's quniform/qloguniform raise a bare ValueError for bounds that are not
    # multiples of q, in to_tune_domains (build_tuner, after Ray has started). load_space
    # promises every space problem as a UserError before Ray starts.
    key = line.split(":")[0]
    with pytest.raises(UserError) as info:
        load_space(space_file(tmp_path, line))
    assert f"space.{key}" in str(info.value)


def test_continuous_distribution_on_an_integer_field_is_a_user_error(tmp_path):
    # uniform [0, 5] on model.unfreeze (an int) passes the bound probes (0 and 5), but almost
    # every sample (e.g. 2.7) fails the config, so every trial would error at apply_params.
    path = space_file(tmp_path, "model.unfreeze: {uniform: [0, 5]}")
    with pytest.raises(UserError) as info:
        load_space(path)
    assert "space.model.unfreeze" in str(info.value)


def test_randint_high_inclusive_is_what_the_fit_check_probes(tmp_path):
    # [0, 5] fits model.unfreeze (max 5); [0, 6] must not, even though Tune's exclusive
    # upper bound would be 6 for the first.
    load_space(space_file(tmp_path, "model.unfreeze: {randint: [0, 5]}"))
    with pytest.raises(UserError, match="can produce 6"):
        load_space(space_file(tmp_path, "model.unfreeze: {randint: [0, 6]}"))


def test_fit_check_uses_the_files_base(tmp_path):
    # A choice that is valid on its own but clashes with the base: group_csv vs group_regex.
    top = "base:\n  data:\n    group_regex: '^(p\\d+)_'\n"
    path = space_file(tmp_path, "data.group_csv: {choice: [groups.csv]}", top=top)
    with pytest.raises(UserError, match="space.data.group_csv"):
        load_space(path)


# --------------------------------------------------------------------------- errors: the file


def test_unknown_top_level_key(tmp_path):
    path = space_file(tmp_path, "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", top="serach: {}\n")
    with pytest.raises(UserError, match="unknown top-level key") as info:
        load_space(path)
    assert "serach" in str(info.value)


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("search:\n  num_sample: 5\n", "search.num_sample"),
        ("search:\n  num_samples: 0\n", "search.num_samples"),
        ("search:\n  metric: accuracy\n", "search.metric"),
        ("search:\n  scheduler:\n    type: hyperband\n", "search.scheduler.type"),
        ("search:\n  scheduler:\n    reduction_factor: 1\n", "search.scheduler.reduction_factor"),
        ("search:\n  algorithm: grid\n", "search.algorithm"),
    ],
    ids=[
        "unknown-key",
        "zero-samples",
        "metric",
        "scheduler-type",
        "reduction-factor",
        "algorithm",
    ],
)
def test_bad_search_settings_name_the_key(tmp_path, search, expected):
    path = space_file(tmp_path, "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", top=search)
    with pytest.raises(UserError) as info:
        load_space(path)
    assert expected in str(info.value)


def test_bad_base_names_the_key(tmp_path):
    top = "base:\n  train:\n    epoch: 3\n"
    with pytest.raises(UserError) as info:
        load_space(space_file(tmp_path, "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", top=top))
    assert "base" in str(info.value)
    assert "train.epoch" in str(info.value)


def test_search_defaults_when_the_section_is_missing(tmp_path):
    spec = load_space(space_file(tmp_path, "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}"))
    assert spec.search.num_samples == 20
    assert spec.search.scheduler.type == "asha"
    assert spec.search.algorithm == "tpe"
    assert spec.base == ExperimentConfig()


@pytest.mark.parametrize(
    ("algorithm", "sampler"), [("tpe", "TPESampler"), ("random", "RandomSampler")]
)
def test_algorithm_picks_a_seeded_optuna_sampler(tmp_path, algorithm, sampler):
    top = f"search:\n  algorithm: {algorithm}\n  seed: 7\n"
    spec = load_space(space_file(tmp_path, "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", top=top))
    draws = []
    for _ in range(2):  # the same seed draws the same learning rates
        built = build_sampler(resolve_sampler(spec.search, max_concurrent=1))
        assert type(built).__name__ == sampler
        study = optuna.create_study(sampler=built)
        draws.append([study.ask().suggest_float("lr", 1e-4, 1e-2, log=True) for _ in range(3)])
    assert draws[0] == draws[1]


@pytest.mark.parametrize("text", ["space: {}\n", "space:\n", "search: {num_samples: 2}\n"])
def test_empty_space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="'space' is empty"):
        load_space(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found") as info:
        load_space(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_space(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- optim.lr\n- train.batch_size\n")
    with pytest.raises(UserError, match="top level"):
        load_space(listing)


# --------------------------------------------------------------------------- overrides


def test_overrides_apply_to_the_base(tmp_path):
    spec = load_space(SHIPPED[1], ["train.epochs=3", "data.root=demo"])
    assert spec.base.train.epochs == 3
    assert spec.base.data.root == "demo"
    assert spec.base.data.image_size == 64  # untouched: from the file
    assert set(spec.space) == FOUR_KEYS
    assert load_space(SHIPPED[1]).base.train.epochs == 12  # the file itself is unchanged


def test_bad_override_names_the_key():
    with pytest.raises(UserError, match="train.epochs"):
        load_space(SHIPPED[0], ["train.epochs=0"])


# --------------------------------------------------------------------------- apply_params


def test_apply_params_sets_dotted_keys_and_makes_plain_python_types():
    base = load_space(SHIPPED[0]).base
    params = {
        "optim.lr": np.float64(0.005),
        "train.batch_size": np.int64(16),
        "optim.name": np.str_("sgd"),
        "optim.weight_decay": np.float32(0.25),
        "model.unfreeze": np.int64(3),
    }
    cfg = apply_params(base, params)
    assert cfg.optim.lr == 0.005
    assert cfg.train.batch_size == 16
    assert cfg.optim.name == "sgd"
    assert cfg.optim.weight_decay == 0.25
    assert cfg.model.unfreeze == 3
    assert type(cfg.optim.lr) is float
    assert type(cfg.train.batch_size) is int
    assert type(cfg.model.unfreeze) is int
    assert type(cfg.optim.name) is str
    # Plain types all the way down: a safe YAML dump (what best_config.yaml uses) works.
    assert yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))["optim"]["lr"] == 0.005
    # Everything else comes from the base, which is itself unchanged.
    assert cfg.data == base.data
    assert cfg.train.epochs == base.train.epochs
    assert cfg.optim.warmup_epochs == base.optim.warmup_epochs
    assert base.optim.lr == 0.002
    assert base.optim.name == "adamw"


def test_apply_params_with_no_params_is_the_base():
    base = load_space(SHIPPED[0]).base
    assert apply_params(base, {}) == base


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"model.unfreeze": np.int64(9)}, "model.unfreeze"),
        ({"optim.name": "lion"}, "optim.name"),
        ({"train.batch_size": 2.5}, "train.batch_size"),
        ({"optim.lr": np.float64(-1.0)}, "optim.lr"),
    ],
    ids=["unfreeze-9", "unknown-optimiser", "fractional-batch", "negative-lr"],
)
def test_apply_params_rejects_an_invalid_sample(params, key):
    base = load_space(SHIPPED[0]).base
    with pytest.raises(UserError) as info:
        apply_params(base, params)
    assert key in str(info.value)
    assert "trial config" in str(info.value)


class _Reports:
    """A stand-in for the callback's queue: not empty for the first `pending` checks."""

    def __init__(self, pending: int):
        self.pending, self.checks = pending, 0

    def empty(self) -> bool:
        self.checks += 1
        return self.checks > self.pending


def test_a_trial_returns_only_after_tune_took_its_last_report():
    reports = _Reports(pending=2)
    to_tune = SimpleNamespace(_training_actor_item_queue=reports)
    wait_until_tune_took_every_report(to_tune, timeout_s=5, settle_s=0)
    assert reports.checks == 3  # polled until the queue was empty, then returned
    # A Ray whose callback has no such queue: an error, not a silently skipped wait.
    with pytest.raises(AttributeError, match="_training_actor_item_queue"):
        wait_until_tune_took_every_report(SimpleNamespace(), timeout_s=5, settle_s=0)


def test_the_wait_for_tune_is_bounded_and_says_so(caplog):
    reports = _Reports(pending=10**9)  # never taken, e.g. Tune is stopping the trial
    to_tune = SimpleNamespace(_training_actor_item_queue=reports)
    with caplog.at_level(logging.WARNING, logger="distmed.search"):
        wait_until_tune_took_every_report(to_tune, timeout_s=0.3, settle_s=0)
    assert reports.checks >= 2
    assert "has not taken the last report after 0 s" in caplog.text


# --------------------------------------------------------------------------- arch-dependent


def test_backbones_space_draws_valid_trials_that_train_every_stage_of_each_arch():
    spec = load_space(REPO / "search_spaces" / "backbones.yaml")
    assert spec.base.model.unfreeze == "all"  # unset in the file: all stages of any arch
    archs = set(spec.space["model.arch"].args)
    domains = to_tune_domains(spec.space)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        params = {key: domain.sample(random_state=rng) for key, domain in domains.items()}
        cfg = apply_params(spec.base, params)
        seen.add(cfg.model.arch)
        assert cfg.model.stages_trained == ARCHS[cfg.model.arch].depth
    assert seen == archs


@pytest.mark.parametrize(
    ("space", "refused"),
    [
        # mobilenet_v3_large has 7 stages, resnet18 5: 7 is no unfreeze for a ResNet
        (
            "model.arch: {choice: [mobilenet_v3_large, resnet18]}\n"
            "model.unfreeze: {randint: [0, 7]}",
            "space.model.unfreeze can produce 7 with model.arch=resnet18",
        ),
        (
            "model.arch: {choice: [resnet18, swin_t]}\nmodel.stem: {choice: [small]}",
            "space.model.stem can produce 'small' with model.arch=swin_t",
        ),
        (
            "model.arch: {choice: [resnet18, mobilenet_v3_large]}\n"
            "model.unfreeze: {choice: [1, 5, all]}",
            None,
        ),
    ],
)
def test_arch_dependent_bounds_are_checked_for_every_arch_in_the_space(tmp_path, space, refused):
    top = "base: {data: {image_size: 64}, model: {weights: none}}\n"
    path = space_file(tmp_path, space, top)
    if refused is None:
        spec = load_space(path)
        cfg = apply_params(spec.base, {"model.arch": "mobilenet_v3_large", "model.unfreeze": "all"})
        assert cfg.model.stages_trained == 7
        return
    with pytest.raises(UserError, match=refused):
        load_space(path)


def test_a_set_of_a_searched_key_is_refused_not_ignored(tmp_path: Path):
    """`--set` changes the base; a key the space searches never reads it: one line says so."""
    path = space_file(tmp_path, "train.batch_size: {choice: [32, 64]}")
    with pytest.raises(UserError, match=r"--set train.batch_size: .* searches train.batch_size"):
        load_space(path, ["train.batch_size=8"])
    assert load_space(path, ["train.epochs=2"]).base.train.epochs == 2  # base keys still apply


def test_a_misspelt_space_key_suggests_the_config_field(tmp_path):
    path = space_file(tmp_path, "optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}")
    with pytest.raises(
        UserError, match=r"space.optim.lrr: not a config field.*did you mean 'optim.lr'\?$"
    ):
        load_space(path)


def test_a_bad_set_value_names_the_set_item_not_the_space_file(tmp_path):
    path = space_file(tmp_path, "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    with pytest.raises(UserError) as info:
        load_space(path, ["cv.folds=1"])
    assert str(info.value).startswith("--set cv.folds=1: cv.folds: ")


def test_the_shipped_demo_warns_about_nothing_of_its_own(caplog, capsys):
    """The demo trains from random init (offline): it must not draw a frozen random-init
    stage, so neither tune nor train warns about the demo's own settings."""
    from distmed.model import warn_frozen_random_stages
    from distmed.pipeline import warn_frozen_random_stages as warn_for_space
    from distmed.tune import main

    with caplog.at_level("WARNING"):
        assert main(["--space", "demo", "--dry-run"]) == 0
        demo = load_space("demo")
        warn_for_space(demo)
        warn_frozen_random_stages(demo.base.model)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "warning" not in capsys.readouterr().err.lower()
