"""The one way files cross the tool's boundary: bounded JSON and YAML reading, schema validation
that turns every problem into one line naming the file, the field and what was expected, and
atomic writes (a reader, or a re-run after a crash, never sees half a file or folder).

Python's JSON and YAML parsers recurse, so a deeply nested document would end in RecursionError:
nesting is bounded (and the parsers' own recursion caught); a file's size is checked before it is
read; YAML aliases, which can expand a small file into billions of values, are counted expanded
before the document is built.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, get_args

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import DitcError

MAX_FILE_BYTES = 64 * 2 ** 20  # reports, cards, configs and recipes are kilobytes; 64 MiB is generous
MAX_DEPTH = 64                 # nesting of objects/lists; the deepest file the tool writes has ~8
MAX_YAML_NODES = 200_000       # values in a YAML document after aliases are expanded
MAX_LINES = 8                  # validation problems listed per file (then "and N more")


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def read_bytes(path: str | Path, what: str, error: type[DitcError], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path`, refusing a missing file, a folder, or one larger than `max_bytes`
    before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if path.is_dir():
        raise error(f"{path}: a folder, not {_a(what)}")
    if size > max_bytes:
        raise error(f"{path}: {size} bytes; {_a(what)} is at most {max_bytes} bytes")
    try:
        return path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """The nesting of dicts and lists in `value` (iterative; stops counting past `limit`)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, depth)
            stack += [(c, depth + 1) for c in (v.values() if isinstance(v, dict) else v)]
    return deepest


def parse_json(data: bytes | str, where: str, what: str, error: type[DitcError], max_depth: int = MAX_DEPTH) -> Any:
    """JSON text -> Python values, or `error` naming `where`: not UTF-8, not JSON, nested too deeply."""
    too_deep = error(f"{where}: nested more than {max_depth} levels deep; not {_a(what)}")
    try:
        value = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not {_a(what)} (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not {_a(what)} (not valid JSON: {e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:  # the parser recurses per level; Python stops it at its recursion limit
        raise too_deep from None
    if nesting_depth(value, max_depth) > max_depth:
        raise too_deep
    return value


def read_json(path: str | Path, what: str, error: type[DitcError], max_bytes: int = MAX_FILE_BYTES) -> Any:
    return parse_json(read_bytes(path, what, error, max_bytes), str(path), what, error)


class _Loader(yaml.SafeLoader):
    """safe_load that also reads `1e-4` as a number (YAML 1.2; PyYAML's 1.1 rule needs a dot), so
    that strict validation can refuse strings where numbers belong without refusing `lr: 1e-4`."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _check_yaml_size(node: yaml.Node, where: str, what: str, error: type[DitcError]) -> None:
    """Count values as the constructed document will hold them (aliases counted each time)."""
    count, stack = 0, [(node, 1)]
    while stack:
        n, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise error(f"{where}: nested more than {MAX_DEPTH} levels deep; not {_a(what)}")
        if count > MAX_YAML_NODES:
            raise error(f"{where}: more than {MAX_YAML_NODES} values (YAML aliases expanded); not {_a(what)}")
        if isinstance(n, yaml.SequenceNode):
            stack += [(c, depth + 1) for c in n.value]
        elif isinstance(n, yaml.MappingNode):
            stack += [(c, depth + 1) for kv in n.value for c in kv]


def parse_yaml(text: bytes | str, where: str, what: str, error: type[DitcError]) -> Any:
    """YAML text -> Python values (safe types only), with the same bounds as JSON."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not {_a(what)} (not UTF-8 text: {e.reason} at byte {e.start})") from None
    try:
        depth = 0  # PyYAML's parser is iterative, its composer recursive: nesting is bounded in between
        for event in yaml.parse(text, Loader=_Loader):
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_DEPTH:
                raise error(f"{where}: nested more than {MAX_DEPTH} levels deep; not {_a(what)}")
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, where, what, error)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply; not {_a(what)}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str, error: type[DitcError], max_bytes: int = MAX_FILE_BYTES) -> Any:
    return parse_yaml(read_bytes(path, what, error, max_bytes), str(path), what, error)


def yaml_value(text: str, where: str, error: type[DitcError]) -> Any:
    """One `--set key=VALUE` value, read as the recipe's YAML reads values."""
    return parse_yaml(text, where, "value", error)


# -- schema validation -------------------------------------------------------------------------

def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _field_names(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` (a pydantic error location) inside `cls`, for "did you mean"."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            break
        nested = [a for a in (field.annotation, *get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        nested += [b for a in get_args(field.annotation) for b in get_args(a)
                   if isinstance(b, type) and issubclass(b, BaseModel)]  # list[Model] | None
        if not nested:
            break
        cls = nested[0]
    return list(cls.model_fields)


def did_you_mean(word: str, choices) -> str:
    """'; did you mean `x`?' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def describe_errors(e: ValidationError, where: str, cls: type | None = None, skip=frozenset()) -> list[str]:
    """One line per pydantic error: the location in the file, what is wrong, what was given, and for
    unknown keys the closest allowed name. `skip`: (location, error type) pairs reported otherwise."""
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        if (".".join(map(str, loc)), err["type"]) in skip:
            continue
        path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        sep = " " if where.endswith(":") else "" if path.startswith("[") else "."
        field = f"{where}{sep}{path}" if path else where.rstrip(":")
        if err["type"] == "extra_forbidden":
            model = cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None
            allowed = _field_names(model, loc[:-1]) if model else []
            hint = f"{did_you_mean(loc[-1], allowed)} (allowed: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{field}: unknown key{hint}")
        elif err["type"] == "value_error" or not loc:  # a model's own consistency rule
            lines.append(f"{field}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{field}: {err['msg']} (got {_short(err.get('input'))})")
    return lines


def validate(schema: Any, data: Any, where: str, error: type[DitcError]) -> Any:
    """`data` validated by `schema` (a pydantic model or any type), or `error` with one line per
    problem (at most MAX_LINES), each naming `where`, the field and what was expected."""
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as e:
        lines = describe_errors(e, f"{where}:", schema)
        more = len(lines) - MAX_LINES
        raise error("\n".join(lines[:MAX_LINES] + ([f"{where}: ... and {more} more"] if more > 0 else []))) from None


# -- atomic writes ----------------------------------------------------------------------------

def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `path` through a temporary sibling renamed into place: complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_folder(dest: str | Path) -> Iterator[Path]:
    """`with atomic_folder(out) as tmp:` write into `tmp`; on success it replaces `out` whole, on
    an error it is removed and `out` is left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = dest.with_name(f".{dest.name}.partial"), dest.with_name(f".{dest.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure written atomically as PNG (complete or absent)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_atomic(path, buf.getvalue())


def save_image(image, path: str | Path) -> Path:
    """A PIL image written atomically as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_atomic(path, buf.getvalue())


def save_array(array, path: str | Path) -> Path:
    """A numpy array written atomically as .npy."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return write_atomic(path, buf.getvalue())
