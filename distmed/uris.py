"""Credentials never ride inside a URI that distmed takes.

distmed prints the URIs it is given (progress lines, the TensorBoard hint, error messages)
and stores them (the config beside every result, Tune's `tuner.pkl` and search state in the
storage folder). A secret inside one (`s3://KEY:SECRET@bucket/...`, `https://user:pw@host`,
`https://token@host`, `?secret_key=...`) would be copied to all of those. So every value an
entry point takes, from the command line (`--storage`, `--address`, `--data`, `--set k=v`,
...) or from a config file (`tracking.mlflow.uri`, `data.root`, ...), goes through
`check_no_credentials` before any work, and a URI with credentials is refused in one line
that names where the value came from and where credentials go instead, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from distmed.errors import UserError

# scheme://authority: any URI-like text inside a longer value (`--set tracking.mlflow.uri=...`).
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"']*")
# Query parameters that carry secrets: pyarrow's S3 options (access_key, secret_key,
# session_token), signed URLs (X-Amz-Signature, sig), tokens and passwords.
_SECRET_PARAM = re.compile(r"secret|token|password|passwd|access_?key|api_?key|signature|^sig$")

WHERE_CREDENTIALS_GO = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE (~/.aws/credentials)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
    "http": "MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME / _PASSWORD) for MLflow",
    "https": "MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME / _PASSWORD) for MLflow",
}


def credential_kind(text: str) -> tuple[str, str] | None:
    """(scheme, what) of the first URI in `text` that holds credentials; None when none does.

    `what` is `user:password@`, `token@` or `a secret query parameter`, never the secret.
    """
    if "://" not in text:  # no URI; `_URI` alone is quadratic in a long run of letters
        return None
    for match in _URI.finditer(text):
        try:
            parts = urlsplit(match.group(0))
        except ValueError:  # e.g. an unbalanced [ in the host: not a URI we could use anyway
            continue
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at:
            return parts.scheme.lower(), "user:password@" if ":" in userinfo else "token@"
        if any(_SECRET_PARAM.search(k.lower()) for k, _ in parse_qsl(parts.query)):
            return parts.scheme.lower(), "a secret query parameter"
    return None


def shown(uri: str) -> str:
    """`uri` without a userinfo part (`user:password@`, `token@`), for printing. Entry points
    refuse such URIs already (`check_no_credentials`); this keeps a message safe regardless."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def check_no_credentials(value: Any, where: str) -> None:
    """Refuse `value` (any text; other types pass) when a URI in it holds credentials.

    Args:
        value: what was given, e.g. `s3://bucket/runs` or `tracking.mlflow.uri=http://...`.
        where: how the message names its source, e.g. `--storage` or `config: data.root`.

    Raises:
        UserError: one line naming `where`, the kind of credential and where credentials go
            instead; the value itself is not repeated (it holds the secret).
    """
    if not isinstance(value, str):
        return
    found = credential_kind(value)
    if found is None:
        return
    scheme, what = found
    home = WHERE_CREDENTIALS_GO.get(scheme, "the environment or the provider's credential chain")
    raise UserError(
        f"{where}: the {scheme}:// URI holds credentials ({what}), which would be printed and "
        f"saved with the results; give the URI without them and put the credentials in the "
        f"environment instead ({home})"
    )


def check_values(values: Iterable[tuple[str, Any]]) -> None:
    """`check_no_credentials` on each (where, value); lists and tuples item by item."""
    for where, value in values:
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            check_no_credentials(item, where)


def check_arguments(args: Any) -> None:
    """Every option of a parsed command line (an `argparse.Namespace`), e.g. `--storage`;
    a `--set KEY=VALUE` item is named by its key."""
    for name, value in sorted(vars(args).items()):
        if name == "overrides":  # --set items
            check_values((f"--set {shorten_key(item)}", item) for item in value or [])
        elif name != "argv":  # the raw command line: the same values, checked as parsed
            check_values([(f"--{name.replace('_', '-')}", value)])


def shorten_key(item: Any) -> str:
    key = str(item).partition("=")[0]
    return key if len(key) <= 60 else key[:60] + "…"


def check_config(raw: dict[str, Any], source: str, prefix: str = "") -> None:
    """Every text value of a config mapping (nested sections), named by its dotted key."""
    for key, value in raw.items():
        if isinstance(value, dict):
            check_config(value, source, f"{prefix}{key}.")
        else:
            check_values([(f"{source}: {prefix}{key}", value)])
