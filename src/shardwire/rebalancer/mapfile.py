"""Rewriting the shard map in the operator's config file after a move (a tenant's or a
category value's entry, or a range split; lookup moves change the directory, not the file).

The file is edited with ruamel.yaml's round-trip mode, not re-emitted from the loaded config:
comments, key order, quoting, flow style (`tenants: {1: s1, 2: s2}`) and `${ENV}` references
stay as the operator wrote them; only the moved keys' entries change or are added.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from ..router.shardmap import KeyType, KeyValue, RuleKind
from ..router.values import to_key
from .plan import key_to_yaml


class MapFileError(ValueError):
    pass


def _section(kind: RuleKind) -> str:
    if kind is RuleKind.TENANT:
        return "tenants"
    if kind is RuleKind.CATEGORY:
        return "values"
    raise MapFileError(f"{kind.value} rules are not written to the map file key by key (a "
                       "range move splits a range, a lookup move changes the directory)")


def place_keys(text: str, rule: str, kind: RuleKind, key_type: KeyType,
               keys: Sequence[KeyValue], shard: str) -> str:
    """The config file `text` with `keys` of `rule` placed on `shard` (an entry changed, or
    added at the end of the rule's `tenants` / `values`).

    >>> text = "sharding:\\n  rules:\\n    t:  # mine\\n      kind: tenant\\n" \\
    ...        "      tenants: {1: s1, 2: s1}  # keep\\n      default: s1\\n"
    >>> print(place_keys(text, "t", RuleKind.TENANT, KeyType.INTEGER, [2], "s2"), end="")
    sharding:
      rules:
        t:  # mine
          kind: tenant
          tenants: {1: s1, 2: s2}  # keep
          default: s1
    """
    yaml, data, node = _load_rule(text, rule)
    section = _section(kind)
    entries = node.get(section)
    if entries is None:
        entries = CommentedMap()
        node.insert(len(node), section, entries)
    for key in keys:
        found = [k for k in entries if _same(k, key, key_type)]
        if found:
            entries[found[0]] = shard
        else:
            entries[_plain_or_quoted(key_to_yaml(key))] = shard
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _load_rule(text: str, rule: str) -> tuple[YAML, Any, Any]:
    """A round-trip loader set up as the file is indented, the document, and the rule."""
    indent, offset = _indentation(text)
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the operator's long lines
    yaml.indent(mapping=indent, sequence=indent + offset, offset=offset)
    data = yaml.load(text)
    try:
        node = data["sharding"]["rules"][rule]
    except (KeyError, TypeError):
        raise MapFileError(f"no sharding.rules.{rule} in the config file") from None
    return yaml, data, node


def split_range(text: str, rule: str, key_type: KeyType, lower: KeyValue | None,
                upper: KeyValue | None, split_at: KeyValue | None, shard: str) -> str:
    """The config file `text` with the part `lower <= key < upper` of a range of `rule` on
    `shard`: the range that holds it ends (or starts) at `split_at` and a new range next to
    it holds the part, written in the style of its neighbour; with no `split_at` (or a part
    that is the whole range) only the range's shard changes. The same text when a range
    `lower..upper` on `shard` is there already.

    >>> text = "sharding:\\n  rules:\\n    r:\\n      kind: range\\n      ranges:\\n" \\
    ...        "        - {to: 100, shard: s1}  # old\\n        - {from: 100, shard: s2}\\n"
    >>> print(split_range(text, "r", KeyType.INTEGER, 150, None, 150, "s3"), end="")
    sharding:
      rules:
        r:
          kind: range
          ranges:
            - {to: 100, shard: s1}  # old
            - {from: 100, to: 150, shard: s2}
            - {from: 150, shard: s3}
    """
    yaml, data, node = _load_rule(text, rule)
    entries = node.get("ranges")
    if not isinstance(entries, list):
        raise MapFileError(f"sharding.rules.{rule}.ranges is not a list in the config file")

    def read(raw: Any) -> KeyValue | None:
        if raw is None:
            return None
        return to_key(raw if isinstance(raw, (str, int)) else str(raw), key_type)
    try:
        bounds = [(read(e.get("from")), read(e.get("to")), e.get("shard")) for e in entries]
    except (ValueError, AttributeError) as e:
        raise MapFileError(f"sharding.rules.{rule}.ranges: {e}") from None
    if (lower, upper, shard) in bounds:
        return text
    index = None
    for i, (lo, hi, _) in enumerate(bounds):
        starts_in = lo is None if lower is None else (lo is None or lo <= lower)
        ends_in = hi is None if upper is None else (hi is None or upper <= hi)
        if starts_in and ends_in:
            index = i
            break
    if index is None:
        raise MapFileError(f"no range of sharding.rules.{rule} holds the part that moves")
    entry = entries[index]
    lo, hi, _ = bounds[index]
    if split_at is None or (lo == lower and hi == upper):
        entry["shard"] = shard
    else:
        split = _plain_or_quoted(key_to_yaml(split_at))
        part = CommentedMap()
        if entry.fa.flow_style():
            part.fa.set_flow_style()
        if lo == lower:  # the lower part moves: the range now starts at the split
            if lower is not None:
                part["from"] = entry["from"]
            part["to"] = split
            part["shard"] = shard
            if "from" in entry:
                entry["from"] = split
            else:
                entry.insert(0, "from", split)
            entries.insert(index, part)
        else:  # the upper part moves: the range now ends at the split
            part["from"] = split
            if upper is not None:
                part["to"] = entry["to"]
            part["shard"] = shard
            if "to" in entry:
                entry["to"] = split
            else:
                entry.insert(1 if "from" in entry else 0, "to", split)
            entries.insert(index + 1, part)
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _indentation(text: str) -> tuple[int, int]:
    """(mapping indent, block sequence dash offset) as the file uses them: ruamel.yaml
    re-indents the whole file with the ones it is given."""
    indent = offset = None
    previous: tuple[int, str] | None = None
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        depth = len(line) - len(stripped)
        if previous is not None and depth > previous[0]:
            if stripped.startswith("- ") and previous[1].rstrip().endswith(":"):
                offset = depth - previous[0] if offset is None else offset
            elif indent is None and not previous[1].lstrip().startswith("- "):
                indent = depth - previous[0]
        previous = (depth, line)
        if indent is not None and offset is not None:
            break
    return indent or 2, offset or 0


def _plain_or_quoted(value: object) -> object:
    """A text key written plain when PyYAML (which loads the config) reads it back as the
    same text, else double-quoted (`"no"`, `"1"`, `"2026-01-01"`)."""
    if not isinstance(value, str):
        return value
    try:
        back = pyyaml.safe_load(f"{value}: x")
    except pyyaml.YAMLError:
        back = None
    if isinstance(back, dict) and list(back) == [value]:
        return value
    return DoubleQuotedScalarString(value)


def _same(raw: Any, key: KeyValue, key_type: KeyType) -> bool:
    try:
        return bool(to_key(raw if isinstance(raw, (str, int)) else str(raw), key_type) == key)
    except ValueError:
        return False


def write_atomically(path: str, text: str) -> None:
    """Replace the file in one step (a proxy reloading meanwhile reads the old or the new)."""
    directory = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(prefix=".shardwire-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
