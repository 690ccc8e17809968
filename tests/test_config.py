"""distmed.config: defaults, YAML files, search-space `base`, `--set` overrides, errors."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from distmed.config import (
    ExperimentConfig,
    config_fields,
    dump_config,
    load_config,
)
from distmed.errors import UserError
from distmed.space import load_space

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- defaults + files


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.data.root is None
    assert cfg.data.image_size == 224
    assert cfg.model.arch == "resnet18"
    assert cfg.model.weights == "imagenet"
    assert cfg.model.head == "linear"
    assert cfg.model.unfreeze == 5
    assert cfg.optim.name == "adamw"
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.schedule == "cosine"
    assert cfg.train.batch_size == 32
    assert cfg.train.epochs == 10
    assert cfg.train.amp == "auto"
    assert cfg.train.patience is None
    assert cfg.cv.folds == 5
    assert cfg.cv.seed == 0
    assert cfg.scaling.num_workers == 1
    assert cfg.scaling.use_gpu == "auto"


def test_yaml_file_values_and_untouched_defaults(tmp_path):
    path = write(
        tmp_path / "exp.yaml",
        "data:\n  root: /data/xray\n  image_size: 64\n"
        "model:\n  arch: resnet34\n  head: mlp\n  unfreeze: 2\n"
        "optim:\n  name: sgd\n  lr: 0.05\n"
        "train:\n  epochs: 7\n  amp: bf16\n"
        "cv:\n  folds: 3\n",
    )
    cfg = load_config(path)
    assert cfg.data.root == "/data/xray"
    assert cfg.data.image_size == 64
    assert (cfg.model.arch, cfg.model.head, cfg.model.unfreeze) == ("resnet34", "mlp", 2)
    assert (cfg.optim.name, cfg.optim.lr) == ("sgd", pytest.approx(0.05))
    assert (cfg.train.epochs, cfg.train.amp) == (7, "bf16")
    assert cfg.cv.folds == 3
    # keys the file does not mention keep their defaults
    assert cfg.train.batch_size == 32
    assert cfg.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.cv.seed == 0


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "")) == ExperimentConfig()


def test_search_space_file_uses_base(tmp_path):
    path = write(
        tmp_path / "space.yaml",
        "base:\n  train:\n    epochs: 4\n  data:\n    image_size: 32\n"
        "space:\n  optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n",
    )
    cfg = load_config(path)
    assert cfg.train.epochs == 4
    assert cfg.data.image_size == 32
    assert cfg.optim.lr == pytest.approx(1e-3)  # `space` is not applied by load_config


def test_search_space_without_base_gives_defaults(tmp_path):
    path = write(tmp_path / "space.yaml", "space:\n  optim.lr: [0.1, 0.01]\n")
    assert load_config(path) == ExperimentConfig()


def test_search_space_base_not_a_mapping(tmp_path):
    path = write(tmp_path / "space.yaml", "base: [1, 2]\nspace: {}\n")
    with pytest.raises(UserError, match="base"):
        load_config(path)


def test_repository_demo_search_space_loads():
    cfg = load_config(REPO / "search_spaces" / "demo.yaml")
    assert cfg.data.root == "demo"
    assert cfg.data.positive_class == "lesion"
    assert cfg.data.group_regex == r"^(p\d+)_"
    assert cfg.model.weights == "none"


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  epochs: 3\n  amp: [bf16\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "bad.yaml" in message
    assert "line" in message


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(UserError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


# --------------------------------------------------------------------------- overrides


def test_override_parses_types():
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "optim.lr=3e-4",
            "optim.weight_decay=0.05",
            "train.batch_size=8",
            "data.augment.hflip=false",
            "data.augment.vflip=true",
            "scaling.use_gpu=false",
            "model.head=mlp",
        ],
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(0.05)
    assert cfg.train.batch_size == 8
    assert cfg.data.augment.hflip is False
    assert cfg.data.augment.vflip is True
    assert cfg.scaling.use_gpu is False
    assert cfg.model.head == "mlp"


def test_override_applies_on_top_of_file(tmp_path):
    path = write(tmp_path / "exp.yaml", "train:\n  epochs: 7\n  batch_size: 4\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 4


def test_later_override_wins():
    assert load_config(None, ["train.epochs=3", "train.epochs=5"]).train.epochs == 5


def test_override_use_gpu_auto_and_true():
    assert load_config(None, ["scaling.use_gpu=auto"]).scaling.use_gpu == "auto"
    assert load_config(None, ["scaling.use_gpu=true"]).scaling.use_gpu is True


def test_override_amp_off_is_the_string_off():
    # YAML 1.1 reads a bare `off` as False; the config must still mean "no mixed precision".
    assert load_config(None, ["train.amp=off"]).train.amp == "off"


def test_override_empty_value_is_none():
    cfg = load_config(None, ["train.patience=3"])
    assert cfg.train.patience == 3
    assert load_config(None, ["train.patience=3", "train.patience="]).train.patience is None


def test_override_numeric_class_name_stays_a_string():
    # MedMNIST classes are named "0", "1", ...: `--set data.positive_class=0` must select "0".
    cfg = load_config(None, ["data.positive_class=0"])
    assert cfg.data.positive_class == "0"


def test_override_value_that_is_not_yaml_never_escapes_as_yaml_error():
    # A regex such as `[A-Z]+_` is not valid YAML; the result must be the literal string
    # or a UserError, never a raw yaml exception (the CLI prints only UserErrors cleanly).
    try:
        cfg = load_config(None, ["data.group_regex=[A-Z]+_"])
    except UserError as exc:
        assert "data.group_regex" in str(exc)
    else:
        assert cfg.data.group_regex == "[A-Z]+_"


@pytest.mark.parametrize("item", ["train.epochs", "train.epochs 3", "=3", " =3"])
def test_malformed_override(item):
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, [item])


@pytest.mark.parametrize(
    ("item", "dotted"),
    [
        ("train.epoch=3", "train.epoch"),
        ("optim.learning_rate=0.1", "optim.learning_rate"),
        ("data.augment.hfilp=true", "data.augment.hfilp"),
        ("trian.epochs=3", "trian"),
    ],
)
def test_unknown_key_names_dotted_path(item, dotted):
    with pytest.raises(UserError) as info:
        load_config(None, [item])
    assert dotted in str(info.value)
    assert "unknown key" in str(info.value)


def test_unknown_key_in_file_names_file_and_path(tmp_path):
    path = write(tmp_path / "typo.yaml", "model:\n  unfrezee: 2\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert "typo.yaml" in str(info.value)
    assert "model.unfrezee" in str(info.value)


@pytest.mark.parametrize(
    ("item", "dotted"),
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("optim.lr=fast", "optim.lr"),
        ("data.augment.hflip=sometimes", "data.augment.hflip"),
        ("model.arch=resnet7", "model.arch"),
        ("optim.name=rmsprop", "optim.name"),
        ("train.amp=fp8", "train.amp"),
        ("data=3", "data"),
    ],
)
def test_wrong_type_names_dotted_path(item, dotted):
    with pytest.raises(UserError) as info:
        load_config(None, [item])
    assert dotted in str(info.value)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("-1", "Input should be greater than or equal to 0 or 'all' (got -1)"),
        ("everything", "unable to parse string as an integer or 'all' (got 'everything')"),
    ],
)
def test_a_field_of_several_types_gets_one_problem_at_its_own_key(value, said):
    """`model.unfreeze` takes a count or `all`: one part at the key, not one per member of
    the union under pydantic's names for them (`constrained-int`, `literal['all']`)."""
    with pytest.raises(UserError) as info:
        load_config(None, [f"model.unfreeze={value}"])
    message = str(info.value)
    assert said in message and message.count("model.unfreeze: ") == 1
    assert "constrained" not in message and "literal[" not in message


@pytest.mark.parametrize(
    ("item", "dotted"),
    [
        ("train.epochs=0", "train.epochs"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("model.unfreeze=6", "model.unfreeze"),
        ("model.unfreeze=-1", "model.unfreeze"),
        ("cv.folds=1", "cv.folds"),
        ("data.image_size=4", "data.image_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.head_dropout=1", "model.head_dropout"),
        ("scaling.num_workers=0", "scaling.num_workers"),
    ],
)
def test_out_of_range_names_dotted_path(item, dotted):
    with pytest.raises(UserError) as info:
        load_config(None, [item])
    message = str(info.value)
    assert dotted in message
    assert f"(got {item.split('=')[1]})" in message  # the offending value is quoted back


@pytest.mark.parametrize(
    "item", ["optim.lr=nan", "data.stream_decode_cpus=nan", "optim.weight_decay=inf"]
)
def test_nan_and_infinity_are_refused_as_not_finite_on_every_float_key(item):
    """nan fails every bound check, so it was refused as 'less than or equal to 64'."""
    with pytest.raises(UserError) as info:
        load_config(None, [item])
    assert item.split("=")[0] in str(info.value) and "finite number" in str(info.value)


def test_boundaries_are_accepted():
    cfg = load_config(None, ["train.epochs=1", "model.unfreeze=0", "cv.folds=2"])
    assert (cfg.train.epochs, cfg.model.unfreeze, cfg.cv.folds) == (1, 0, 2)
    assert load_config(None, ["model.unfreeze=5"]).model.unfreeze == 5


def test_group_csv_and_regex_are_exclusive():
    with pytest.raises(UserError, match="group_csv"):
        load_config(None, ["data.group_csv=groups.csv", "data.group_regex=^(p\\d+)_"])


def test_override_into_a_scalar_is_refused(tmp_path):
    path = write(tmp_path / "exp.yaml", "train:\n  epochs: 3\n")
    with pytest.raises(UserError, match="not a section"):
        load_config(path, ["train.epochs.value=4"])


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance ValidationError
        cfg.train.epochs = 3  # type: ignore[misc]
    assert cfg.train.epochs == 10


# --------------------------------------------------------------------------- dump + fields


def test_dump_then_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "data.root=/some/where",
            "data.image_size=48",
            "data.positive_class=lesion",
            "data.group_regex=^(p\\d+)_",
            "model.arch=resnet50",
            "model.weights=none",
            "model.weights_sha256=0123456789abcdef",
            "model.head=mlp",
            "model.unfreeze=3",
            "optim.name=sgd",
            "optim.lr=3e-4",
            "optim.schedule=constant",
            "train.epochs=3",
            "train.amp=off",
            "train.patience=2",
            "train.class_weights=balanced",
            "cv.folds=4",
            "cv.seed=11",
            "scaling.use_gpu=false",
            "scaling.cpus_per_worker=1.5",
        ],
    )
    path = tmp_path / "resolved.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.model.weights_sha256 == "0123456789abcdef"
    assert again.train.amp == "off"


def test_dump_defaults_round_trip(tmp_path):
    path = tmp_path / "defaults.yaml"
    dump_config(ExperimentConfig(), path)
    assert load_config(path) == ExperimentConfig()


def test_config_fields_lists_public_names():
    fields = config_fields()
    expected = {
        "data.root",
        "data.image_size",
        "model.arch",
        "model.weights",
        "model.head",
        "model.unfreeze",
        "optim.name",
        "optim.lr",
        "optim.weight_decay",
        "train.batch_size",
        "train.epochs",
        "train.amp",
        "cv.folds",
        "cv.seed",
        "scaling.num_workers",
        "scaling.use_gpu",
    }
    assert expected <= fields
    assert "data.augment.hflip" in fields  # nested sections are flattened to leaves
    assert "data" not in fields and "data.augment" not in fields
    # every listed name is settable with an override
    for name in ("data.augment.rotation", "scaling.max_failures", "optim.warmup_epochs"):
        assert name in fields


# --------------------------------------------------------------------------- values as typed

# Plain YAML 1.1 turns these into booleans, octal or sexagesimal ints, floats or dates.
TRICKY_TEXT = ["yes", "no", "on", "off", "01", "1e3", "1.0e3", "00000000", "01234567"]
TRICKY_TEXT += ["2024-01-01", "1:30", "0x1f", "y", "True", "12_34"]


def _string_typed_fields(model=ExperimentConfig, prefix=""):
    """Every leaf field whose annotation admits only text (and None): found from the model."""
    import types
    import typing

    from pydantic import BaseModel

    def is_text(annotation) -> bool:
        args = typing.get_args(annotation)
        if annotation is str:
            return True
        if typing.get_origin(annotation) is typing.Literal:
            return all(isinstance(a, str) for a in args)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            return bool(rest) and all(is_text(a) for a in rest)
        return False

    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _string_typed_fields(annotation, f"{prefix}{name}.")
        elif is_text(annotation):
            literals = [a for a in typing.get_args(annotation) if isinstance(a, str)]
            for arg in typing.get_args(annotation):  # Literal inside Optional
                literals += [a for a in typing.get_args(arg) if isinstance(a, str)]
            yield f"{prefix}{name}", literals


def _accepts(dotted: str, value: str) -> bool:
    from distmed.config import set_value, validate_config

    raw: dict = {}
    set_value(raw, dotted, value)
    try:
        validate_config(raw)
    except UserError:
        return False
    return True


def _value_at(cfg: ExperimentConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


STRING_FIELDS = dict(_string_typed_fields())


def test_string_typed_fields_are_found_from_the_model():
    from distmed.config import text_fields

    assert set(STRING_FIELDS) == set(text_fields())
    assert {"data.root", "data.positive_class", "data.group_regex", "model.weights"} <= set(
        STRING_FIELDS
    )
    assert "scaling.use_gpu" not in STRING_FIELDS  # bool | "auto": YAML's booleans apply


@pytest.mark.parametrize("dotted", sorted(STRING_FIELDS))
def test_every_string_field_keeps_its_text_in_yaml_files_and_set(tmp_path, dotted):
    values = [v for v in TRICKY_TEXT + STRING_FIELDS[dotted] if _accepts(dotted, v)]
    assert values, f"no test value fits {dotted}; add one to TRICKY_TEXT"
    section, _, key = dotted.rpartition(".")
    for value in values:
        # YAML: the field nested as in a config file
        lines, indent = [], ""
        for part in section.split("."):
            lines.append(f"{indent}{part}:")
            indent += "  "
        lines.append(f"{indent}{key}: {value}")
        path = write(tmp_path / "exp.yaml", "\n".join(lines) + "\n")
        assert _value_at(load_config(path), dotted) == value, (dotted, value, "yaml")
        # the same field as a space file's base
        base = "base:\n" + "".join(f"  {line}\n" for line in lines)
        space = write(tmp_path / "space.yaml", base + "space:\n  train.epochs: {choice: [1]}\n")
        from distmed.space import load_space

        assert _value_at(load_space(space).base, dotted) == value, (dotted, value, "space")
        # --set
        assert _value_at(load_config(None, [f"{dotted}={value}"]), dotted) == value


def test_string_fields_still_take_null_and_quotes(tmp_path):
    path = write(tmp_path / "exp.yaml", "data:\n  positive_class: ~\n  group_regex: '01'\n")
    cfg = load_config(path)
    assert cfg.data.positive_class is None and cfg.data.group_regex == "01"
    cfg = load_config(None, ["data.positive_class='yes'", 'data.root="no"'])
    assert (cfg.data.positive_class, cfg.data.root) == ("yes", "no")


def test_other_fields_are_still_parsed_as_yaml(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "scaling.use_gpu=false", "optim.lr=1.0e-2"])
    assert (cfg.train.epochs, cfg.scaling.use_gpu, cfg.optim.lr) == (3, False, 0.01)
    path = write(tmp_path / "exp.yaml", "train:\n  amp: off\n  epochs: 2\n")
    assert load_config(path).train.amp == "off"


# --------------------------------------------------------------------------- hostile YAML


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """`levels` lists of `width` aliases of the list before: a few hundred bytes, width**levels
    values once expanded (the "billion laughs" document; 9**9 is 387 million)."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for k in range(1, levels):
        lines.append(f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * width)}]")
    return "\n".join(lines) + f"\ndata:\n  root: *a{levels - 1}\n"


def _refused_fast(call, match: str) -> str:
    """`call()` raises a UserError matching `match` in well under a CPU second (process time:
    other jobs on the machine do not count), in little memory."""
    tracemalloc.start()
    started = time.process_time()
    try:
        with pytest.raises(UserError, match=match) as info:
            call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.process_time() - started < 0.5
    assert peak < 20 * 2**20, peak  # bytes; expanding the bomb would need gigabytes
    message = str(info.value)
    assert len(message.splitlines()) == 1 and len(message) < 300, message
    return message


def test_alias_bomb_in_a_config_file_is_refused_before_validation(tmp_path):
    path = write(tmp_path / "bomb.yaml", alias_bomb())
    assert path.stat().st_size < 1000
    message = _refused_fast(lambda: load_config(path), "expands to more than")
    assert "bomb.yaml" in message


def test_alias_bomb_in_a_set_value_is_refused():
    small = "[" + ", ".join(["&a [lol, lol, lol]"] + ["*a"] * 8) + "]"
    # A non-text field (a text field such as data.root keeps what was typed, unparsed).
    with pytest.raises(UserError, match="train.epochs: Input should be a valid integer"):
        load_config(None, [f"train.epochs={small}"])  # a few aliases reach validation as usual
    deep = "&a0 [x, x, x, x, x, x, x, x, x]"
    for k in range(1, 9):
        deep = f"&a{k} [{deep}, " + ", ".join([f"*a{k - 1}"] * 8) + "]"
    message = _refused_fast(lambda: load_config(None, [f"train.epochs={deep}"]), "expands to more")
    assert message.startswith("--set train.epochs: refused")


def test_alias_bomb_in_a_search_space_is_refused(tmp_path):
    path = write(tmp_path / "space.yaml", alias_bomb().replace("data:\n  root:", "space:\n  x:"))
    message = _refused_fast(lambda: load_space(path), "expands to more than")
    assert "space.yaml" in message


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: &x 1\nb: [" + ", ".join(["*x"] * 101) + "]\n", "more than 100 aliases"),
        ("a: &x [*x]\n", "cycle"),
        ("data:\n  root: " + "[" * 200 + "]" * 200 + "\n", "nested more than"),
    ],
    ids=["alias-heavy", "self-referencing", "deeply-nested"],
)
def test_alias_heavy_cyclic_or_deep_yaml_is_refused(tmp_path, text, match):
    path = write(tmp_path / "odd.yaml", text)
    assert "odd.yaml" in _refused_fast(lambda: load_config(path), match)


def test_oversized_config_file_is_refused_unread(tmp_path):
    path = write(tmp_path / "huge.yaml", "# padding\n" * 200_000)  # 2 MB of comments
    message = _refused_fast(lambda: load_config(path), "too large")
    assert "huge.yaml" in message


def test_binary_config_file_is_one_line(tmp_path):
    path = tmp_path / "noise.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    assert "noise.yaml" in _refused_fast(lambda: load_config(path), "not a UTF-8 text file")


def test_a_few_anchors_still_load(tmp_path):
    path = write(
        tmp_path / "anchors.yaml", "train:\n  seed: &s 7\ncv:\n  seed: *s\n  folds: &f 3\n"
    )
    cfg = load_config(path)
    assert (cfg.train.seed, cfg.cv.seed, cfg.cv.folds) == (7, 7, 3)


@pytest.mark.parametrize(
    "text",
    [
        "/data/x-rays #2",
        "scans: 2024",
        "/data/Röntgen bilder",
        "yes",
        "01",
        "[a, b]",
        "{x: 1}",
        "/data/a=b",
        "2024-01-01",
        "~",
        "& *",
    ],
)
def test_data_path_is_never_parsed_as_yaml(text):
    from distmed.cli import overrides_from_args
    from distmed.train import build_parser

    args = build_parser().parse_args(["--data", text])
    assert load_config(None, overrides_from_args(args)).data.root == text


@pytest.mark.parametrize(
    ("classes", "typed"), [(["no", "yes"], "yes"), (["00", "01"], "01"), (["no", "yes"], "no")]
)
def test_case_14_positive_class_as_typed(tmp_path, classes, typed):
    from distmed.task import task_for

    def positive_index(cfg):
        return task_for(classes, cfg.data.positive_class).positive

    cfg = load_config(None, [f"data.positive_class={typed}"])
    assert positive_index(cfg) == classes.index(typed)
    path = write(tmp_path / "exp.yaml", f"data:\n  positive_class: {typed}\n")
    assert positive_index(load_config(path)) == classes.index(typed)


def test_space_choice_of_text_values_keeps_text(tmp_path):
    from distmed.space import load_space

    path = write(
        tmp_path / "space.yaml",
        "base:\n  data: {root: 01}\nspace:\n  model.weights: {choice: [yes, no, 01]}\n",
    )
    spec = load_space(path)
    assert spec.base.data.root == "01"
    assert spec.space["model.weights"].args == ("yes", "no", "01")


@pytest.mark.parametrize(
    "text",
    [
        "data:\n  image_size: '" + "9" * 100_000 + "x'\n",
        "train:\n  epochs: [" + ", ".join(["many"] * 20_000) + "]\n",
        "model:\n  arch: " + "resnet" * 20_000 + "\n",
    ],
    ids=["long-string", "long-list", "long-literal"],
)
def test_a_rejected_value_is_quoted_cut_short(tmp_path, text):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path / "long.yaml", text))
    message = str(info.value)
    assert "long.yaml" in message and "(got " in message
    assert len(message) < 400 and len(message.splitlines()) == 1, message[:500]


def test_a_bad_set_value_is_blamed_on_the_set_item_not_the_file(tmp_path):
    """`--set cv.folds=1` is not in the file: the line names the --set item, and the file
    only where the file holds a problem too."""
    good = write(tmp_path / "good.yaml", "cv:\n  folds: 3\n")
    with pytest.raises(UserError) as info:
        load_config(good, ["cv.folds=1"])
    assert str(info.value).startswith("--set cv.folds=1: cv.folds: ")
    assert "good.yaml" not in str(info.value)
    bad = write(tmp_path / "bad.yaml", "cv:\n  folds: 1\n")
    with pytest.raises(UserError, match=r"^\S*bad.yaml: cv.folds: "):
        load_config(bad)
    with pytest.raises(UserError, match=r"^\S*bad.yaml with --set train.epochs=0: "):
        load_config(bad, ["train.epochs=0"])
    with pytest.raises(UserError, match=r"^--set trian.epochs=3: trian: unknown key"):
        load_config(good, ["trian.epochs=3"])


@pytest.mark.parametrize(
    ("item", "meant"),
    [
        ("train.epoch=3", "train.epochs"),
        ("trian.epochs=3", "train"),
        ("data.augment.hfilp=true", "data.augment.hflip"),
        ("cv.fold=3", "cv.folds"),
    ],
)
def test_an_unknown_key_suggests_the_closest_name(item, meant):
    with pytest.raises(UserError) as info:
        load_config(None, [item])
    assert str(info.value).endswith(f"; did you mean {meant!r}?")


def test_an_unknown_key_far_from_any_name_gets_no_suggestion():
    with pytest.raises(UserError) as info:
        load_config(None, ["train.zzzzqqq=3"])
    assert "did you mean" not in str(info.value)
