"""Training recipes: YAML files with typed, validated sections, and command-line overrides of the same keys.

A recipe has the sections `model`, `data`, `adapter` (the MiLoRA settings; null for no adapter), `trainable`,
`training` (a mapping of HF TrainingArguments names, checked against the installed TrainingArguments), and the
scalars `deepspeed` (path to a DeepSpeed JSON), `export` (merged | lora | none) and `bootstrap` (tiny | null).

Everything that can be checked without loading a model is checked in `load_recipe`: unknown keys (with a
"did you mean"), wrong types, choices, missing paths and contradictory settings; each error names the key and
the fix. The one check that needs the model (adapter rank against each target matrix) is in
milora_vlm.model.targets. Command-line overrides go through the same typed parser:
    --adapter.r 64  --data.train_file x.jsonl  --max_steps 10  --training.seed 3  --deepspeed configs/zero2.json
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from milora_vlm.data.templates import template_names
from milora_vlm.milora import MiLoRAConfig

RECIPE_FILENAME = "milora_recipe.yaml"
RESUME_AUTO = "auto"


class ConfigError(ValueError):
    """A recipe or override that cannot work; the message names the key and how to fix it."""


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class ModelSection:
    """Which model to train and how to obtain it.

    path: the model to load with from_pretrained: a llava-hf checkpoint (kind llava) or a causal LM (kind
      causal_lm), a local directory or a hub id. For kind llava it may not exist yet when `language_model` and
      `vision_tower` are given: it is then composed from them once (scripts/build_llava.py does the same) and
      saved there, so every later load, ZeRO-3's partitioned one included, is a plain from_pretrained.
    projector / projector_weights / vision_feature_*: used only when composing. projector_weights is a stage-1
      projector to start from (LLaVA's mm_projector.bin or a safetensors file with llava-hf key names).
    dtype: "auto" = bfloat16 on a GPU that supports it, float32 on CPU.
    """

    kind: str = field(default="llava", metadata=_choices("llava", "causal_lm"))
    path: Optional[str] = None
    language_model: Optional[str] = None
    vision_tower: Optional[str] = None
    projector: str = field(default="mlp2x_gelu", metadata=_choices("linear", "mlp2x_gelu"))
    projector_weights: Optional[str] = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = field(default="default", metadata=_choices("default", "full"))
    dtype: str = field(default="auto", metadata=_choices("auto", "float32", "bfloat16", "float16"))
    attn_implementation: Optional[str] = field(default=None, metadata=_choices("eager", "sdpa", "flash_attention_2"))


@dataclass
class DataSection:
    """The training conversations (LLaVA JSON / JSONL) and how they become tokens.

    max_length: model_max_length; longer samples are truncated (never through an image; a sample left
      without an answer token is skipped and counted).
    image_aspect_ratio: "pad" expands each image to a square filled with the processor's mean colour (LLaVA-1.5);
      "resize" stretches it to the processor's size; "native" leaves it to the processor (CLIP: centre crop).
    group_by_modality_length: LLaVA's sampler: each optimizer step sees image samples on every rank or text-only
      samples on every rank, grouped by (estimated) length.
    packing: padding-free batches: each batch's samples laid end to end in rows of at most max_length tokens
      (one row under flash_attention_2), attention confined to each sample by per-sample position_ids; same
      samples, labels and loss as the padded batch (milora_vlm.data.collator).
    """

    train_file: Optional[str] = None
    image_folder: Optional[str] = None
    template: str = "vicuna_v1"
    max_length: int = 2048
    image_aspect_ratio: str = field(default="pad", metadata=_choices("pad", "resize", "native"))
    group_by_modality_length: bool = False
    packing: bool = False


@dataclass
class TrainableSection:
    """What trains besides the adapter (declared here, never coded per recipe).

    projector: frozen | full (trained in full, saved with the adapter as a PEFT modules_to_save) | milora
      (adapters on its linear_1 / linear_2 too). projector_lr: its own learning rate (LLaVA-1.5: 2e-5).
    vision_tower: frozen | full.  language_model: frozen (only adapters change it) | full (full finetuning,
      no adapter).
    """

    projector: str = field(default="frozen", metadata=_choices("frozen", "full", "milora"))
    projector_lr: Optional[float] = None
    vision_tower: str = field(default="frozen", metadata=_choices("frozen", "full"))
    language_model: str = field(default="frozen", metadata=_choices("frozen", "full"))


@dataclass
class GuardsSection:
    """Limits that stop a run that is going wrong instead of letting it train on quietly (milora_vlm.train.guards).

    max_skip_fraction: the run stops with an error (counts by reason, example records) once the records skipped at
      train time exceed this fraction both of the records looked at and of the training file.
    max_consecutive_nonfinite: a step whose loss (or, outside fp16, gradient norm) is NaN/inf is skipped and
      counted; this many in a row stop the run after saving a checkpoint of the last good state.
    """

    max_skip_fraction: float = 0.05
    max_consecutive_nonfinite: int = 3

    def __post_init__(self):
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction: {self.max_skip_fraction} must be between 0 and 1")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite: {self.max_consecutive_nonfinite} must be at least 1")


# Keys of `training` that this pipeline sets itself; a recipe must not fight them.
_MANAGED_TRAINING_KEYS = {
    "deepspeed": "use the recipe's top-level `deepspeed:` key (a path to a DeepSpeed JSON)",
    "remove_unused_columns": "the collator's inputs are all used; the pipeline sets it to false",
    "train_sampling_strategy": "use data.group_by_modality_length (the pipeline supplies its own sampler)",
    "group_by_length": "use data.group_by_modality_length (the pipeline supplies its own sampler)",
    "local_rank": "the deepspeed launcher sets it",
}


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    adapter: Optional[MiLoRAConfig]
    trainable: TrainableSection
    training: dict
    deepspeed: Optional[str] = None
    export: str = "none"
    bootstrap: Optional[str] = None
    guards: GuardsSection = field(default_factory=GuardsSection)
    source: Optional[str] = None  # the YAML file it came from (not saved)

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]

    def to_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "adapter": None if self.adapter is None else {
                k: v for k, v in self.adapter.to_dict().items() if k not in _ADAPTER_DERIVED
            },
            "trainable": dataclasses.asdict(self.trainable),
            "training": dict(self.training),
            "deepspeed": self.deepspeed,
            "export": self.export,
            "bootstrap": self.bootstrap,
            "guards": dataclasses.asdict(self.guards),
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write the resolved recipe as `milora_recipe.yaml` (read back by eval's loader and by load_recipe)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, RECIPE_FILENAME)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        return path


_SECTIONS = {"model": ModelSection, "data": DataSection, "adapter": MiLoRAConfig, "trainable": TrainableSection,
             "guards": GuardsSection}
_SCALARS = {
    "deepspeed": (Optional[str], None),
    "export": (str, ("merged", "lora", "none")),
    "bootstrap": (Optional[str], ("tiny",)),
}
_TOP_LEVEL = [*_SECTIONS, "training", *_SCALARS]
# The recipe key `adapter` maps onto MiLoRAConfig; these of its fields are derived from other sections.
_ADAPTER_DERIVED = {"modules_to_save": "set trainable.projector / trainable.vision_tower to 'full' instead"}


# ----------------------------------------------------------------------------------------------------------------
# typed values

def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    if isinstance(tp, type) and issubclass(tp, str):  # str-valued enums of TrainingArguments
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value  # anything richer (TrainingArguments' own objects): TrainingArguments checks it


# Names people reach for that difflib cannot connect to ours.
_ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
            "lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
            "model_max_length": "max_length", "data_path": "train_file", "image_dir": "image_folder"}


def _did_you_mean(key: str, known: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    alias = _ALIASES.get(leaf)
    if alias is not None:
        match = [k for k in known if k == alias or k.endswith("." + alias)]
        if match:
            return f"; did you mean {match[0]!r}?"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _section_types(cls) -> dict[str, tuple[Any, Optional[tuple]]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("choices")) for f in dataclasses.fields(cls)}


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
        value = _coerce(value, tp, f"{name}.{key}")
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(f"{name}.{key}: {value!r} is not one of {list(choices)}")
        values[key] = value
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
# whole-recipe checks

def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and not os.path.isabs(value)


def _check_model_source(key: str, value: Optional[str]) -> None:
    if value is None or os.path.exists(value) or _looks_like_hub_id(value):
        return
    raise ConfigError(f"{key}: {value!r} does not exist (give a local directory or a hub id such as org/name)")


def _check_paths(r: Recipe) -> None:
    m, d = r.model, r.data
    composing = m.language_model is not None or m.vision_tower is not None
    if m.path is None:
        raise ConfigError("model.path is required: the checkpoint to load (or, for llava, where to save the composed model)")
    if not os.path.exists(m.path) and not _looks_like_hub_id(m.path) and not composing and r.bootstrap is None:
        raise ConfigError(
            f"model.path: {m.path!r} does not exist; give an existing checkpoint, or model.language_model + "
            "model.vision_tower to compose a LLaVA there, or bootstrap: tiny to build a tiny one there"
        )
    if composing and not os.path.exists(m.path):  # the sources matter only while model.path is still to be built
        _check_model_source("model.language_model", m.language_model)
        _check_model_source("model.vision_tower", m.vision_tower)
        if m.projector_weights is not None and not os.path.isfile(m.projector_weights):
            raise ConfigError(f"model.projector_weights: no such file {m.projector_weights!r}")
    if d.train_file is None:
        raise ConfigError("data.train_file is required (LLaVA conversation .json or .jsonl)")
    if not d.train_file.endswith((".json", ".jsonl")):
        raise ConfigError(f"data.train_file: {d.train_file!r} must be a .json (array) or .jsonl file")
    if not os.path.isfile(d.train_file) and r.bootstrap is None:
        raise ConfigError(f"data.train_file: no such file {d.train_file!r}")
    if d.image_folder is not None and not os.path.isdir(d.image_folder) and r.bootstrap is None:
        raise ConfigError(f"data.image_folder: no such directory {d.image_folder!r}")
    if r.deepspeed is not None:
        if not os.path.isfile(r.deepspeed):
            raise ConfigError(f"deepspeed: no such file {r.deepspeed!r} (see configs/zero2.json, configs/zero3.json)")
        try:
            with open(r.deepspeed, encoding="utf-8") as f:
                ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed: {r.deepspeed} is not valid JSON: line {e.lineno}: {e.msg}") from None
        _check_zero(r.deepspeed, ds)
    resume = r.training.get("resume_from_checkpoint")
    if resume not in (None, RESUME_AUTO) and not os.path.isdir(resume):
        raise ConfigError(
            f"training.resume_from_checkpoint: no such directory {resume!r} (give a checkpoint dir or 'auto')"
        )


def _check_zero(path: str, ds: Any) -> None:
    """ZeRO settings DeepSpeed would refuse (or silently ignore) only after the model is loaded."""
    zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else None
    if not isinstance(zero, dict):
        raise ConfigError(f"deepspeed: {path}: expected a JSON object with a `zero_optimization` mapping")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: {path}: zero_optimization.stage {stage!r} is not one of 0, 1, 2, 3")
    offloaded = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    if offloaded("offload_param") and stage != 3:
        raise ConfigError(f"deepspeed: {path}: offload_param needs zero_optimization.stage 3 (it is {stage})")
    if offloaded("offload_optimizer") and stage == 0:
        raise ConfigError(f"deepspeed: {path}: offload_optimizer needs zero_optimization.stage 1, 2 or 3")
    if (ds.get("fp16") or {}).get("enabled") is True and (ds.get("bf16") or {}).get("enabled") is True:
        raise ConfigError(f"deepspeed: {path}: fp16 and bf16 are both enabled; choose one (or 'auto')")


def _check_combinations(r: Recipe) -> None:
    m, d, t, a = r.model, r.data, r.trainable, r.adapter
    if d.template not in template_names():
        raise ConfigError(f"data.template: unknown template {d.template!r}; known: {template_names()}")
    if d.max_length < 8:
        raise ConfigError(f"data.max_length: {d.max_length} is too small to hold a prompt and an answer")
    if m.kind == "causal_lm":
        for key, value, default in [
            ("trainable.projector", t.projector, "frozen"),
            ("trainable.vision_tower", t.vision_tower, "frozen"),
            ("data.group_by_modality_length", d.group_by_modality_length, False),
        ]:
            if value != default:
                raise ConfigError(f"{key}: {value!r} needs a vision model; model.kind is causal_lm (remove the key)")
        for key in ("language_model", "vision_tower", "projector_weights"):
            if getattr(m, key) is not None:
                raise ConfigError(f"model.{key} composes a LLaVA; model.kind is causal_lm (remove it)")
        if d.template == "plain":
            raise ConfigError("data.template: 'plain' drops the human text (LLaVA stage 1); a causal LM needs a chat template")
        if d.image_folder is not None:
            raise ConfigError("data.image_folder: a causal_lm recipe has no images (remove the key)")
    composing = m.language_model is not None or m.vision_tower is not None
    if composing and (m.language_model is None or m.vision_tower is None):
        raise ConfigError("composing a LLaVA needs both model.language_model and model.vision_tower")
    if a is None:
        if t.projector == "milora":
            raise ConfigError("trainable.projector: 'milora' puts adapters on the projector; add an `adapter:` section")
        if t.projector == "frozen" and t.vision_tower == "frozen" and t.language_model == "frozen":
            raise ConfigError(
                "nothing to train: no adapter and trainable.projector / vision_tower / language_model all frozen; "
                "add an `adapter:` section or set trainable.projector: full (LLaVA stage 1)"
            )
    else:
        if t.language_model == "full":
            raise ConfigError("trainable.language_model: 'full' is full finetuning; remove the `adapter:` section (or use 'frozen')")
    if t.projector_lr is not None:
        if t.projector == "frozen":
            raise ConfigError("trainable.projector_lr is set but trainable.projector is frozen (set it to full or milora)")
        if not t.projector_lr > 0:
            raise ConfigError(f"trainable.projector_lr: {t.projector_lr} must be positive")
    if r.export != "none" and a is None:
        raise ConfigError(f"export: {r.export!r} exports an adapter; this recipe has none (the output is already a full model)")
    if "output_dir" not in r.training or not r.training["output_dir"]:
        raise ConfigError("training.output_dir is required (or pass --output_dir DIR)")


def _absolute_paths(r: Recipe) -> None:
    """Local paths become absolute, so the saved recipe and the adapter's base_model_name_or_path work from any
    directory; hub ids stay as they are. model.path is always local when it is to be composed or bootstrapped."""
    def local(p: Optional[str], always: bool = False) -> Optional[str]:
        if p is None or (not always and not os.path.exists(p) and _looks_like_hub_id(p)):
            return p
        return os.path.abspath(os.path.expanduser(p))

    m, d = r.model, r.data
    m.path = local(m.path, always=m.language_model is not None or r.bootstrap is not None)
    m.language_model, m.vision_tower, m.projector_weights = local(m.language_model), local(m.vision_tower), local(m.projector_weights)
    d.train_file, d.image_folder = local(d.train_file, True), local(d.image_folder, True)
    r.deepspeed = local(r.deepspeed, True)
    r.training["output_dir"] = local(r.training["output_dir"], True)
    if r.adapter is not None and r.adapter.cache_dir is not None:
        r.adapter.cache_dir = local(r.adapter.cache_dir, True)


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
            value = _coerce(raw[key], tp, key)
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
            scalars[key] = value
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
    return recipe


def describe_keys() -> str:
    """Every recipe key with its type and default, for `train_vlm.py --help`."""
    lines = []
    for name, cls in _SECTIONS.items():
        lines.append(f"{name}:" + ("  (null for no adapter)" if name == "adapter" else ""))
        defaults = {f.name: f for f in dataclasses.fields(cls)}
        for key, (tp, choices) in _section_types(cls).items():
            if name == "adapter" and key in _ADAPTER_DERIVED:
                continue
            f = defaults[key]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind = "|".join(choices) if choices else _type_name(tp)
            lines.append(f"  {name}.{key}: {kind} = {default!r}")
    lines.append("training:  any transformers TrainingArguments field (--output_dir, --max_steps, --learning_rate, ...)")
    for key, (tp, choices) in _SCALARS.items():
        lines.append(f"{key}: {'|'.join(choices) if choices else _type_name(tp)}")
    return "\n".join(lines)


def load_recipe(path: str | os.PathLike, overrides: list[tuple[str, str]] = ()) -> Recipe:
    """Read a YAML recipe, apply (key, raw value) overrides and check everything that needs no model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return build_recipe(apply_overrides(raw, list(overrides)), source=path)
