"""YAML text to plain data, remembering the line of every dotted path.

`yaml.safe_load` forgets where values came from and silently keeps the last of two
duplicate keys. `YamlReader` composes the node tree instead and builds the data itself,
so that a later validation pass can say `mesh.yaml:14: services.cart.command: required`.
It also reads only YAML 1.2 booleans (`true`/`false`): in a manifest, `policy: no`
must stay the string "no". Problems are collected, never raised, so that one run
reports all of them.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml
import yaml.reader
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meshctl.agent.errors import Problem

MAX_NODES = 100_000  # guards against alias bombs ("billion laughs")

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_BOOL_TAG = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: yes/no/on/off are strings, not booleans."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def type_name(value: Any) -> str:
    """The user's word for the type of a YAML value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def format_path(path: tuple) -> str:
    """('services', 'a', 'upstreams', 1) -> 'services.a.upstreams[1]'."""
    text = ""
    for part in path:
        text += "[%d]" % part if isinstance(part, int) else ("." if text else "") + str(part)
    return text


class _TooLarge(Exception):
    pass


_EMPTY = object()


class YamlReader:
    """Turns YAML text into plain data, remembering the line of every path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[tuple, int] = {}
        self.problems: list[Problem] = []
        self.bad_paths: list[tuple] = []  # values already reported, not to be judged again
        self._nodes = 0
        self._active: set[int] = set()
        self._loader: _Loader | None = None

    def problem(self, path: tuple, message: str, anchor: tuple | None = None) -> Problem:
        anchor = path if anchor is None else anchor
        while anchor not in self.lines and anchor:
            anchor = anchor[:-1]
        return Problem(self.source, self.lines.get(anchor, 1), format_path(path), message)

    def read(self, text: str) -> Any:
        """The document as plain data, or None after reporting why there is none usable."""
        try:
            document = self._compose_and_build(text)
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            self._report(mark.line + 1 if mark else None, (), "invalid YAML: %s" % (error.problem or error))
            return None
        except yaml.reader.ReaderError as error:
            line = text.count("\n", 0, error.position) + 1
            self._report(line, (), "invalid YAML: character #x%04x is not allowed" % error.character)
            return None
        except yaml.YAMLError as error:
            self._report(None, (), "invalid YAML: %s" % error)
            return None
        except RecursionError:
            self._report(None, (), "invalid YAML: nested too deeply")
            return None
        except _TooLarge:
            self._report(None, (), "invalid YAML: more than %d values (recursive aliases?)" % MAX_NODES)
            return None
        if document is _EMPTY:
            self._report(1, (), "the manifest is empty: expected a mapping with mesh and services")
            return None
        if not isinstance(document, dict):
            self._report(self.lines[()], (), "top level must be a mapping, got %s" % type_name(document))
            return None
        return document

    def _compose_and_build(self, text: str) -> Any:
        self._loader = _Loader(text)
        try:
            node = self._loader.get_single_node()
            if node is None:
                return _EMPTY
            self.lines[()] = node.start_mark.line + 1
            return self._value(node, ())
        finally:
            self._loader.dispose()

    def _report(self, line: int | None, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.source, line, format_path(path), message))
        self.bad_paths.append(path)

    def _value(self, node: Node, path: tuple) -> Any:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _TooLarge
        if id(node) in self._active:
            self._report(self.lines.get(path, node.start_mark.line + 1), path, "recursive alias")
            return None
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            assert isinstance(node, SequenceNode)  # the third and last kind of YAML node
            return self._sequence(node, path)
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: ScalarNode, path: tuple) -> Any:
        assert self._loader is not None  # set for the whole of a read
        try:
            value = self._loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            self._report(node.start_mark.line + 1, path, "unsupported tag %r" % node.tag)
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self._report(node.start_mark.line + 1, path, "must be a finite number")
        return value

    def _sequence(self, node: SequenceNode, path: tuple) -> list | None:
        if node.tag != _SEQ_TAG:
            self._report(node.start_mark.line + 1, path, "unsupported tag %r" % node.tag)
            return None
        items = []
        for index, item in enumerate(node.value):
            self.lines.setdefault(path + (index,), item.start_mark.line + 1)
            items.append(self._value(item, path + (index,)))
        return items

    def _mapping(self, node: MappingNode, path: tuple) -> dict | None:
        if node.tag != _MAP_TAG:
            self._report(node.start_mark.line + 1, path, "unsupported tag %r" % node.tag)
            return None
        result: dict[str, Any] = {}
        merges = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
            elif not isinstance(key_node, ScalarNode):
                self._report(line, path, "keys must be plain strings")
            elif key_node.value in result:
                self._report(line, path + (key_node.value,), "duplicate key")
            else:
                self.lines.setdefault(path + (key_node.value,), line)
                result[key_node.value] = self._value(value_node, path + (key_node.value,))
        # Explicit keys win over merged ones (`<<: *defaults`), and come first in order.
        for merge in merges:
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in sources:
                merged = self._value(source, path) if isinstance(source, MappingNode) else None
                if not isinstance(merged, dict):
                    self._report(merge.start_mark.line + 1, path, "'<<' needs a mapping or a list of mappings")
                    continue
                for key, value in merged.items():
                    result.setdefault(key, value)
        return result


