"""Credentials inside a URI are refused by every entry point before any work, without
repeating them, and nothing the refused command wrote holds them (no Ray: the check comes
first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distmed import evaluate, predict, train, tune
from distmed.errors import UserError
from distmed.uris import check_no_credentials, credential_kind

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCY"  # the shape of an AWS secret access key
SPACE = str(Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs", "user:password@"),
        (f"https://{SECRET}@mlflow.lab", "token@"),
        (f"s3://bucket/runs?region=eu-west-1&secret_key={SECRET}", "a secret query parameter"),
        (f"tracking.mlflow.uri=http://alice:{SECRET}@mlflow.lab:5000", "user:password@"),
        (f"ray://alice:{SECRET}@head:10001", "user:password@"),
    ],
)
def test_credentials_in_a_uri_are_found_and_not_repeated(text: str, kind: str):
    assert credential_kind(text)[1] == kind
    with pytest.raises(UserError) as caught:
        check_no_credentials(text, "--storage")
    message = str(caught.value)
    assert SECRET not in message and "AKIAEXAMPLE" not in message and "alice" not in message
    assert message.startswith("--storage:") and "environment" in message


@pytest.mark.parametrize(
    "text",
    ["runs", "s3://bucket/runs?region=eu-west-1", "http://127.0.0.1:5000", "s3://b/a@b", "a@b.c"],
)
def test_uris_without_credentials_pass(text: str):
    assert credential_kind(text) is None
    check_no_credentials(text, "--storage")


def _space_with_mlflow_uri(tmp_path: Path) -> str:
    space = tmp_path / "space.yaml"
    text = Path(SPACE).read_text()
    space.write_text(
        text.replace(
            "base:\n", f"base:\n  tracking:\n    mlflow:\n      uri: http://u:{SECRET}@h\n"
        )
    )
    return str(space)


@pytest.mark.parametrize(
    ("entry", "argv", "where"),
    [
        (tune, ["--space", SPACE, "--storage", f"s3://AKIA:{SECRET}@bucket/runs"], "--storage"),
        (tune, ["--space", SPACE, "--mlflow-uri", f"https://tok:{SECRET}@ml"], "--mlflow-uri"),
        (
            tune,
            ["--space", SPACE, "--set", f"tracking.mlflow.uri=http://u:{SECRET}@h"],
            "--set tracking.mlflow.uri",
        ),
        (tune, ["--space", SPACE, "--address", f"ray://u:{SECRET}@head:10001"], "--address"),
        (tune, ["--space", "SPACE_WITH_URI"], "tracking.mlflow.uri"),
        (train, ["--data", f"s3://AKIA:{SECRET}@bucket/xray"], "--data"),
        (evaluate, ["--model", "m.pt", "--data", f"https://{SECRET}@host/x"], "--data"),
        (predict, ["--model", "m.pt", f"s3://AKIA:{SECRET}@b/img.png"], "--inputs"),
    ],
)
def test_cli_refuses_credentials_in_a_uri_before_any_work(
    entry, argv, where, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the default --storage (runs) would be made here
    argv = [_space_with_mlflow_uri(tmp_path) if a == "SPACE_WITH_URI" else a for a in argv]
    before = set(tmp_path.rglob("*"))
    assert entry.main([*argv, "--name", "x"] if entry is tune else argv) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert err.count("\n") == 1 and where in err and "credentials" in err
    written = set(tmp_path.rglob("*")) - before
    assert written == set()  # no results folder, no lock: the --name is not taken


def test_userinfo_of_a_uri_is_never_shown():
    from distmed.uris import shown

    assert shown("s3://AKIDEXAMPLE:s3cr3t@bucket/exp") == "s3://bucket/exp"
    assert shown("s3://bucket/exp") == "s3://bucket/exp"
