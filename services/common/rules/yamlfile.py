"""Safe YAML that remembers where each mapping and list item came from, so that every error in a
rule file can be reported as ``FILE:LINE: message``."""

from pathlib import Path

import yaml

MAX_FILE_BYTES = 1_000_000  # a rule file is a page of text; a 50 MB one is an attack or a mistake
# Nesting of YAML lists and mappings. A condition 12 levels deep (conditions.MAX_DEPTH) is about 30
# levels of YAML; without a limit, a few hundred levels exhaust Python's recursion limit.
MAX_YAML_DEPTH = 50


class LineDict(dict):
    line: int = 0
    key_lines: dict


class LineList(list):
    line: int = 0
    item_lines: list


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a rule file may not contain."""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader (no tags that build Python objects) whose mappings and lists know their line.

    Aliases (``*name``) are refused: a few lines of them expand to billions of values ("billion
    laughs") in whatever walks or prints the result. Nesting is limited to ``MAX_YAML_DEPTH``."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed in rule files: write the value out",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _mapping(loader, node):
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise yaml.constructor.ConstructorError(None, None, "mapping keys must be plain text", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _sequence(loader, node):
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


class YamlFileError(ValueError):
    def __init__(self, path, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.message = str(path), line, message


def line_of(node, key=None, default: int = 1) -> int:
    if key is not None and isinstance(node, LineDict) and key in node.key_lines:
        return node.key_lines[key]
    if isinstance(node, LineList) and isinstance(key, int) and key < len(node.item_lines):
        return node.item_lines[key]
    return getattr(node, "line", default) or default


def _read_limited(path: Path) -> bytes:
    """At most ``MAX_FILE_BYTES`` (+1, to tell) of the file: refused on its size before it is read,
    and never more than the limit read even if it grows meanwhile."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise YamlFileError(path, 1, f"file is {size:,} bytes; rule files are limited to {MAX_FILE_BYTES:,}")
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise YamlFileError(path, 1, f"cannot read: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise YamlFileError(path, 1, f"file is over {MAX_FILE_BYTES:,} bytes; rule files are limited to that")
    return data


def load(path: Path):
    path = Path(path)
    data = _read_limited(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise YamlFileError(path, 1, "not UTF-8 text") from None
    try:
        loader = _LineLoader(text)  # a SafeLoader: no tag can build a Python object
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as exc:
        raise YamlFileError(path, exc.problem_mark.line + 1, exc.problem) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise YamlFileError(path, line, f"not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise YamlFileError(path, 1, f"not valid YAML: {exc}") from None
    except RecursionError:  # not expected with MAX_YAML_DEPTH; never a crash if it happens
        raise YamlFileError(path, 1, "nested too deeply") from None
