"""From text to a typed Recipe: the YAML file (read with a loader that refuses duplicate keys), command-line
overrides of the same keys, and each value checked against its field's type and choices. Cross-field checks
are in checks.py; build_recipe runs them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Optional, Union

import yaml

from milora_vlm import jsontext
from milora_vlm.milora import MiLoRAConfig
from milora_vlm.registry import Registry

from .checks import _absolute_paths, _check_combinations, _check_paths, _check_run_settings
from .schema import (
    _ADAPTER_DERIVED,
    _MANAGED_TRAINING_KEYS,
    _SCALARS,
    _SECTIONS,
    _TOP_LEVEL,
    ConfigError,
    DataSection,
    GuardsSection,
    ModelSection,
    Recipe,
    TrainableSection,
    _did_you_mean,
    _section_types,
    _type_name,
)


# ----------------------------------------------------------------------------------------------------------------
# typed values

def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp` (int/float/bool/str/list[str]/dict/Optional/Union)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a {' or '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(tp)}")
    if tp is Any or tp is typing.Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if not isinstance(value, int) or abs(value) < 2 ** 1023 else math.inf
        elif isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no recipe number means "unlimited": .nan / .inf only fail later, mid-run
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    if isinstance(tp, type) and issubclass(tp, str):  # str-valued enums of TrainingArguments
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value  # anything richer (TrainingArguments' own objects): TrainingArguments checks it




def _check_choice(value: Any, choices, key: str) -> Any:
    if choices is None or value is None or value in choices:
        return value
    if isinstance(choices, Registry):  # its own message: "unknown template 'x'; registered: ..."
        try:
            choices[value]
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def _build_section(cls, name: str, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    specs = _section_types(cls)
    values = {}
    for key, value in raw.items():
        if name == "adapter" and key in _ADAPTER_DERIVED:
            raise ConfigError(f"adapter.{key} is derived by the pipeline: {_ADAPTER_DERIVED[key]}")
        if key not in specs:
            shown = [k for k in specs if not (name == "adapter" and k in _ADAPTER_DERIVED)]
            raise ConfigError(
                f"unknown key {name}.{key}{_did_you_mean(key, shown)} (known {name} keys: {', '.join(shown)})"
            )
        tp, choices = specs[key]
        values[key] = _check_choice(_coerce(value, tp, f"{name}.{key}"), choices, f"{name}.{key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # MiLoRAConfig's own checks name the field and the fix
        raise ConfigError(f"{name}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# TrainingArguments

def training_argument_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    return {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.init}


def _check_training(raw: Any) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"training: expected a mapping of TrainingArguments names, got {raw!r}")
    known = training_argument_types()
    out = {}
    for key, value in raw.items():
        if key in _MANAGED_TRAINING_KEYS:
            raise ConfigError(f"training.{key} is not set in a recipe: {_MANAGED_TRAINING_KEYS[key]}")
        if key == "warmup_ratio" and key not in known:
            # transformers 5 folded warmup_ratio into warmup_steps (a value < 1 is a ratio)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"training.warmup_ratio: expected a number in [0, 1), got {value!r}")
            out["warmup_steps"] = float(value)
            continue
        if key not in known:
            raise ConfigError(
                f"unknown key training.{key}: not a transformers TrainingArguments field{_did_you_mean(key, list(known))}"
            )
        tp = known[key]
        out[key] = value if isinstance(tp, str) else _coerce(value, tp, f"training.{key}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# overrides

def parse_overrides(argv: list[str]) -> tuple[Optional[str], list[tuple[str, str]]]:
    """Split `--config PATH --key value --flag --k=v ...` into the config path and (key, raw value) pairs.

    A `--key` followed by another `--option` (or nothing) is a true flag. `--local_rank` (added by the deepspeed
    launcher) is dropped: LOCAL_RANK in the environment says the same.
    """
    config, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value (e.g. --adapter.r 64)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        i += 1
        if key == "local_rank":
            continue
        if key == "config":
            config = value
        else:
            pairs.append((key.replace("-", "_") if "." not in key else key, value))
    return config, pairs


def _parse_value(raw: str, tp) -> Any:
    """A command-line string as YAML (64 -> int, [a, b] -> list, null -> None), kept verbatim for str fields."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    plain_str = tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)
                              and list not in [typing.get_origin(a) for a in typing.get_args(tp)])
    if plain_str and value is not None and not isinstance(value, str):
        return raw
    return value


def apply_overrides(raw: dict, pairs: list[tuple[str, str]]) -> dict:
    """Set each override in the raw recipe dict; keys are dotted recipe keys or bare TrainingArguments names."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    targs = training_argument_types()
    for key, text in pairs:
        section, _, name = key.partition(".")
        if name and section in _SECTIONS:
            specs = _section_types(_SECTIONS[section])
            if name not in specs:
                raise ConfigError(f"unknown option --{key}{_did_you_mean(name, list(specs))}")
            sec = raw.get(section)
            raw[section] = dict(sec) if isinstance(sec, dict) else {}
            raw[section][name] = _parse_value(text, specs[name][0])
        elif name and section == "training":
            if name not in targs and name != "warmup_ratio":
                raise ConfigError(f"unknown option --{key}: not a TrainingArguments field{_did_you_mean(name, list(targs))}")
            raw.setdefault("training", {})
            raw["training"] = dict(raw["training"] or {})
            raw["training"][name] = _parse_value(text, targs.get(name, float))
        elif not name and key == "adapter":
            if yaml.safe_load(text) is not None:
                raise ConfigError("--adapter takes only null (no adapter); set its keys as --adapter.r 64 etc.")
            raw["adapter"] = None
        elif not name and key in _SCALARS:
            raw[key] = _parse_value(text, _SCALARS[key][0])
        elif not name and (key in targs or key == "warmup_ratio"):
            raw["training"] = dict(raw.get("training") or {})
            raw["training"][key] = _parse_value(text, targs.get(key, float))
        else:
            known = [f"{s}.{f}" for s, c in _SECTIONS.items() for f in _section_types(c)] + list(_SCALARS) + list(targs)
            raise ConfigError(f"unknown option --{key}{_did_you_mean(key, known)}")
    return raw



# ----------------------------------------------------------------------------------------------------------------
# the YAML file and the whole recipe

class _BadYaml(ValueError):
    pass


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000  # values after anchors and aliases are expanded: a recipe has a few hundred


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last), a key that
    is not a scalar, and a document that anchors and aliases expand past MAX_RECIPE_NODES values ("billion
    laughs": a kilobyte of YAML that expands to gigabytes once anything walks it) or into a cycle."""

    def construct_document(self, node):
        _check_expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _BadYaml(f"line {line}: a key must be a plain name, not a {key_node.id}")
                key = self.construct_object(key_node, deep=deep)
                if key == "<<":  # merge keys may repeat
                    continue
                if key in seen:
                    raise _BadYaml(f"key {key!r} is given twice (lines {seen[key]} and {line}); YAML would "
                                   "silently keep the last one: delete one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values the node graph stands for once aliases are expanded (shared nodes counted once per use),
    without expanding it: sizes are summed bottom-up over the graph, which is small even when the count is not."""
    def children(node):
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return node.value if isinstance(node, yaml.SequenceNode) else []

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the current path from the root
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(MAX_RECIPE_NODES + 1, 1 + sum(sizes[id(c)] for c in children(node)))
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise _BadYaml(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it (a cycle)")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in sizes)
    if sizes[id(root)] > MAX_RECIPE_NODES:
        raise _BadYaml(f"anchors and aliases expand it to more than {MAX_RECIPE_NODES} values; a recipe needs a "
                       "few hundred: write the values out")


def build_recipe(raw: dict, source: Optional[str] = None) -> Recipe:
    """Typed, checked Recipe from a raw dict (a parsed YAML file with overrides applied)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source or 'recipe'}: expected a mapping with sections {_TOP_LEVEL}")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"unknown top-level key {key!r}{_did_you_mean(key, _TOP_LEVEL)} (known: {', '.join(_TOP_LEVEL)})")
    scalars = {}
    for key, (tp, choices) in _SCALARS.items():
        if key in raw:
            scalars[key] = _check_choice(_coerce(raw[key], tp, key), choices, key)
    recipe = Recipe(
        model=_build_section(ModelSection, "model", raw.get("model")),
        data=_build_section(DataSection, "data", raw.get("data")),
        adapter=None if raw.get("adapter") is None else _build_section(MiLoRAConfig, "adapter", raw["adapter"]),
        trainable=_build_section(TrainableSection, "trainable", raw.get("trainable")),
        training=_check_training(raw.get("training")),
        guards=_build_section(GuardsSection, "guards", raw.get("guards")),
        source=source,
        **scalars,
    )
    _check_combinations(recipe)
    _check_paths(recipe)
    _absolute_paths(recipe)
    _check_run_settings(recipe)
    return recipe



def read_yaml(path: str | os.PathLike, what: str = "recipe") -> Any:
    """The YAML document in `path`, read with _UniqueKeyLoader; anything that stops it (too large, not UTF-8, not
    YAML, a duplicate or non-scalar key, anchors that expand too far) is a ConfigError naming the file."""
    path = os.fspath(path)
    try:
        text = jsontext.read_utf8(path, what, MAX_RECIPE_BYTES)
    except jsontext.InputFileError as e:
        raise ConfigError(str(e)) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except _BadYaml as e:
        raise ConfigError(f"{path}: {e}") from None


def load_recipe(path: str | os.PathLike, overrides: list[tuple[str, str]] = ()) -> Recipe:
    """Read a YAML recipe, apply (key, raw value) overrides and check everything that needs no model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {_TOP_LEVEL}, got a YAML {type(raw).__name__}")
    return build_recipe(apply_overrides(raw, list(overrides)), source=path)
