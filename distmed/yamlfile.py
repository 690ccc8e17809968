"""Every YAML distmed reads from a user (config, search space, `--set` values), read with bounds.

`yaml.safe_load` builds no objects but still trusts the document's size: nine lists of nine
aliases of the list before ("billion laughs") compose to a few hundred nodes that stand for
9**9 values, which validation and error messages then walk one by one. This module counts
aliases, nesting and the *expanded* node count on the composed graph, before anything is
constructed or validated, and refuses the document in one line naming its source.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from distmed.errors import UserError

MAX_BYTES = 1 << 20  # 1 MiB: a config or search space is a few kB
MAX_ALIASES = 100  # anchors are rare in configs; a handful is the legitimate use
MAX_DEPTH = 64  # the config nests 3 deep; PyYAML's composer recurses per level
MAX_NODES = 100_000  # values after every alias is expanded (the default config has ~60)


class NotYaml(UserError):
    """The text does not parse as YAML (`--set` then keeps it as a plain string)."""


class _Refused(Exception):
    """A bound was crossed; carries the reason without the source."""


# A key path (mapping keys down to a value, "*" for a list item) -> keep the scalar's text.
KeepsText = Callable[[tuple[str, ...]], bool]


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and depth while composing, expanded size before building.

    With `keeps_text`, scalars at the key paths it accepts keep their source text: YAML 1.1
    resolves plain `yes`/`no`/`on`/`off` to booleans, `01` to an octal int and `2024-01-01`
    to a date, which for a string-typed field is never what the user meant. A plain `null`,
    `~` or empty value stays None.
    """

    def __init__(self, stream: str, keeps_text: KeepsText | None = None) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._keeps_text = keeps_text

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(f"more than {MAX_ALIASES} aliases (*name)")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())  # before construction: nothing big is built yet
        if self._keeps_text is None:
            return self.construct_document(node)
        return self._construct(node, ())

    def _construct(self, node: yaml.Node, path: tuple[str, ...]) -> Any:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # resolve `<<` merge keys as safe_load does
            out = {}
            for key_node, value_node in node.value:
                key = self.construct_object(key_node, deep=True)
                out[key] = self._construct(value_node, (*path, str(key)))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._construct(item, (*path, "*")) for item in node.value]
        assert self._keeps_text is not None
        if self._keeps_text(path) and node.tag != "tag:yaml.org,2002:null":
            return node.value
        return self.construct_object(node, deep=True)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes `node` stands for with every alias expanded; memoised, so linear in the graph."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _Refused("an alias refers to a node that contains it (a cycle)")
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_NODES:
            raise _Refused(f"expands to more than {MAX_NODES:,} values (nested aliases?)")
    open_nodes.discard(key)
    sizes[key] = total
    return total


def load_yaml(text: str, source: str, keeps_text: KeepsText | None = None) -> Any:
    """Parse untrusted YAML text into plain Python values (dicts, lists, scalars).

    Args:
        text: the document; at most `MAX_BYTES` bytes of UTF-8.
        source: what to name in errors, e.g. the file path or `--set train.epochs`.
        keeps_text: key paths whose scalars keep their source text (see `_BoundedLoader`).

    Raises:
        NotYaml: the text is not YAML (the message names `source` and the line).
        UserError: the document is too large, too deep, alias-heavy or expands past
            `MAX_NODES` values; one line naming `source`, without quoting the document.
    """
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise UserError(f"{source}: larger than {MAX_BYTES // 1024} KiB; not a distmed config")
    loader = _BoundedLoader(text, keeps_text)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise UserError(f"{source}: refused, the YAML {exc}; write the values out plainly") from exc
    except RecursionError as exc:  # the scanner's own recursion, deeper than MAX_DEPTH allows
        raise UserError(f"{source}: refused, the YAML is nested too deeply") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise NotYaml(f"{source}{where}: not valid YAML ({problem})") from exc
    finally:
        loader.dispose()


def read_yaml_file(path: Path, what: str, keeps_text: KeepsText | None = None) -> Any:
    """`load_yaml` of a file, size checked before it is read.

    Args:
        path: an existing file (callers check existence with their own hint).
        what: the kind of file for messages, e.g. "config" or "search space".

    Raises:
        UserError: too large, not UTF-8, or refused by `load_yaml`; names `path`.
    """
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UserError(
            f"{path}: {size / 2**20:.1f} MiB is too large for a {what} file "
            f"(limit {MAX_BYTES // 1024} KiB); is this the right file?"
        )
    with path.open("rb") as handle:  # read at most the limit, also if the file grows meanwhile
        data = handle.read(MAX_BYTES + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file; a {what} file is YAML text") from exc
    return load_yaml(text, str(path), keeps_text)
