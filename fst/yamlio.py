"""Reading YAML that a user (or anyone who can write a file) gave us, safely.

Every YAML the project reads goes through here: config files (`fst train|eval -c`), TaskStream
manifests (`fst stream`), and `--override key=value` values. On top of PyYAML's safe loader:

- size: a file is read up to MAX_YAML_BYTES (1 MiB, about the largest object Kubernetes
  stores, and a TaskStream file is also a custom resource); a larger one is refused before
  it is parsed;
- encoding: UTF-8 only; an invalid byte is reported with its line and byte offset;
- aliases: anchors and aliases are allowed, but the document's size with every alias expanded
  is counted on the parsed node graph (shared nodes counted once per use, in time linear in the
  text) and a document above MAX_YAML_NODES nodes is refused: a "billion laughs" alias bomb is
  rejected in milliseconds instead of expanding to gigabytes downstream (pydantic, deepcopy and
  repr all walk the expanded tree). A recursive alias is refused too;
- duplicate keys in a mapping are an error naming both lines (PyYAML silently keeps the last);
- errors are ConfigErrors of one line, `file:line:column: problem`, that never quote more than a
  few dozen characters of the input.

A leaf module: it imports only fst.schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fst.schema import ConfigError
from fst.schema import short_repr as short

MAX_YAML_BYTES = 1 << 20  # 1 MiB
MAX_YAML_NODES = 100_000  # expanded; a 100-stage TaskStream has a few thousand
MAX_YAML_DEPTH = 64  # nesting of collections; a config uses 4
MAX_YAML_EXPANDED_CHARS = 4 * MAX_YAML_BYTES  # text of all scalars, aliases expanded

_MERGE_TAG = "tag:yaml.org,2002:merge"

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present


class _Loader(_Base):
    """PyYAML's safe loader; mappings refuse duplicate keys."""

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue  # `<<: *base` merges; explicit keys may override merged ones
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if seen is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {short(key)} (first at line {seen}); a key may appear "
                        "once in a mapping",
                        key_node.start_mark,
                    )
                first[key] = key_node.start_mark.line + 1
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return result


def _where(source: str, node: Node | None) -> str:
    if node is None or node.start_mark is None:
        return source
    return f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _check_expansion(root: Node, source: str, max_nodes: int) -> None:
    """Measure the document with every alias expanded (a shared node counted as often as it is
    used): refuse more than `max_nodes` nodes or MAX_YAML_EXPANDED_CHARS characters of scalar
    text, nesting deeper than MAX_YAML_DEPTH, or a node that contains itself. Linear in the
    number of distinct nodes (memoised)."""
    sizes: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()

    def too_large(node: Node, what: str) -> ConfigError:
        return ConfigError(
            f"{_where(source, node)}: YAML document too large with its aliases expanded "
            f"(more than {what}; an alias bomb?)"
        )

    def size(node: Node, depth: int) -> tuple[int, int]:
        """(nodes, scalar characters) of `node` expanded."""
        key = id(node)
        if key in sizes:
            return sizes[key]
        if isinstance(node, ScalarNode):
            return 1, len(node.value)
        if key in open_nodes:
            raise ConfigError(f"{_where(source, node)}: a YAML alias refers to itself (recursive)")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(
                f"{_where(source, node)}: YAML nested more than {MAX_YAML_DEPTH} levels deep"
            )
        open_nodes.add(key)
        nodes, chars = 1, 0
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        for child in children:
            n, c = size(child, depth + 1)
            nodes, chars = nodes + n, chars + c
            if nodes > max_nodes:
                raise too_large(node, f"{max_nodes} nodes")
            if chars > MAX_YAML_EXPANDED_CHARS:
                raise too_large(node, f"{MAX_YAML_EXPANDED_CHARS} characters")
        open_nodes.discard(key)
        sizes[key] = (nodes, chars)
        return nodes, chars

    size(root, 0)


def _yaml_error(e: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if isinstance(e, yaml.constructor.ConstructorError) and "duplicate key" in problem:
        return ConfigError(f"{source}{at}: {problem}")
    context = getattr(e, "context", None)
    detail = f"{problem} ({context})" if context and problem != context else problem
    return ConfigError(f"{source}{at}: YAML syntax error: {detail}")


def load_yaml(text: str, source: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """Parse one YAML document (None when empty) with the checks of this module.

    `source` names the input in errors (a file path, or e.g. `--override slow.lr`)."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{source}: {len(text)} characters of YAML; at most {MAX_YAML_BYTES} are read"
        )
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: YAML nested too deeply") from None
        if node is None:
            return None
        _check_expansion(node, source, max_nodes)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source) from None
    finally:
        loader.dispose()


def read_text_file(path: str | Path, max_bytes: int, what: str) -> str:
    """The UTF-8 text of a file of at most `max_bytes` (a BOM is dropped). Errors are
    ConfigErrors naming the file (and, for an invalid byte, its line)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        try:
            size = f"{path.stat().st_size} bytes"
        except OSError:
            size = f"more than {max_bytes} bytes"
        raise ConfigError(f"{path}: {size} is too large for a {what} (at most {max_bytes} bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """Read and parse a YAML file with every check of this module."""
    return load_yaml(read_text_file(path, MAX_YAML_BYTES, what), str(path))
