"""The recipe's schema: its sections as dataclasses, each field's meaning and choices declared once, next to the
field (`metadata={"help": ..., "choices": ...}`), which `train_vlm.py --help` prints (describe_keys).

A recipe has the sections `model`, `data`, `adapter` (milora_vlm.milora.MiLoRAConfig; null for no adapter),
`trainable`, `guards`, `training` (a mapping of HF TrainingArguments names, checked against the installed
TrainingArguments), and the scalars `deepspeed`, `export` and `bootstrap`. Reading and typing a recipe is in
parsing.py, the checks across fields and files in checks.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from milora_vlm.data.images import DEFAULT_MAX_IMAGE_PIXELS
from milora_vlm.data.templates import TEMPLATES
from milora_vlm.milora import MiLoRAConfig
from milora_vlm.model.projectors import PROJECTORS

RECIPE_FILENAME = "milora_recipe.yaml"
RESUME_AUTO = "auto"


class ConfigError(ValueError):
    """A recipe or override that cannot work; the message names the key and how to fix it."""


@dataclass
class ModelSection:
    """Which model to train and how to obtain it."""

    kind: str = field(default="llava", metadata={
        "help": "llava: a llava-hf checkpoint; causal_lm: a text-only causal LM", "choices": ("llava", "causal_lm")})
    path: Optional[str] = field(default=None, metadata={
        "help": "the model to load with from_pretrained (a local directory or a hub id). For kind llava it may not "
                "exist yet when language_model and vision_tower are given: it is then composed from them once "
                "(as scripts/build_llava.py does) and saved there, so every later load, ZeRO-3's partitioned one "
                "included, is a plain from_pretrained"})
    language_model: Optional[str] = field(default=None, metadata={
        "help": "composing only: the causal LM of the LLaVA to compose at path"})
    vision_tower: Optional[str] = field(default=None, metadata={
        "help": "composing only: the CLIP or SigLIP vision tower of the LLaVA to compose at path"})
    projector: str = field(default="mlp2x_gelu", metadata={
        "help": "composing only: the projector between vision tower and LM (registered in "
                "milora_vlm.model.projectors.PROJECTORS)", "choices": PROJECTORS})
    projector_weights: Optional[str] = field(default=None, metadata={
        "help": "composing only: a stage-1 projector to start from (LLaVA's mm_projector.bin or a safetensors file "
                "with llava-hf key names)"})
    vision_feature_layer: int = field(default=-2, metadata={
        "help": "composing only: the vision tower layer whose features feed the projector (LLaVA-1.5: -2)"})
    vision_feature_select_strategy: str = field(default="default", metadata={
        "help": "composing only: default drops the CLS token (CLIP), full keeps every token (SigLIP has no CLS)",
        "choices": ("default", "full")})
    dtype: str = field(default="auto", metadata={
        "help": "weights' dtype; auto = bfloat16 on a GPU that supports it, float32 on CPU",
        "choices": ("auto", "float32", "bfloat16", "float16")})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "attention kernel passed to from_pretrained (null: transformers' default)",
        "choices": ("eager", "sdpa", "flash_attention_2")})


@dataclass
class DataSection:
    """The training conversations (LLaVA JSON / JSONL) and how they become tokens."""

    train_file: Optional[str] = field(default=None, metadata={
        "help": "the LLaVA conversation file (.json array or .jsonl)"})
    image_folder: Optional[str] = field(default=None, metadata={
        "help": "the folder that records' `image` paths are relative to"})
    template: str = field(default="vicuna_v1", metadata={
        "help": "conversation template (registered in milora_vlm.data.templates.TEMPLATES)", "choices": TEMPLATES})
    max_length: int = field(default=2048, metadata={
        "help": "model_max_length; longer samples are truncated (never through an image; a sample left without an "
                "answer token is skipped and counted)"})
    image_aspect_ratio: str = field(default="pad", metadata={
        "help": "pad: expand each image to a square filled with the processor's mean colour (LLaVA-1.5); resize: "
                "stretch it to the processor's size; native: leave it to the processor (CLIP: centre crop)",
        "choices": ("pad", "resize", "native")})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "LLaVA's sampler: each optimizer step sees image samples on every rank or text-only samples on "
                "every rank, grouped by (estimated) length"})
    too_long: str = field(default="truncate", metadata={
        "help": "a sample longer than max_length is cut there (truncate, LLaVA) or skipped and counted (drop)",
        "choices": ("truncate", "drop")})
    leading_assistant: str = field(default="drop_turn", metadata={
        "help": "an assistant turn before any question is dropped and the record kept (drop_turn, LLaVA and "
                "data_prep) or the whole record is skipped and counted (skip_record)",
        "choices": ("drop_turn", "skip_record")})
    image_to_front: bool = field(default=True, metadata={
        "help": "move <image> to the front of its turn (\"<image>\\n\" + text), as LLaVA's preprocess_multimodal"})
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={
        "help": "an image declaring more pixels is skipped and counted (image_too_large) before decoding"})
    allow_images_outside_folder: bool = field(default=False, metadata={
        "help": "false skips and counts records whose image path resolves outside image_folder (../x.png, absolute "
                "paths, symlinks out: image_outside_folder)"})
    packing: bool = field(default=False, metadata={
        "help": "padding-free batches: each batch's samples laid end to end in rows (at most 2 x max_length tokens; "
                "one row under flash-attention), attention confined to each sample by per-sample position_ids; same "
                "samples, labels and loss as the padded batch (milora_vlm.data.collator)"})


@dataclass
class TrainableSection:
    """What trains besides the adapter (declared here, never coded per recipe)."""

    projector: str = field(default="frozen", metadata={
        "help": "frozen; full (trained in full, saved with the adapter as a PEFT modules_to_save); milora "
                "(adapters on its linear_1 / linear_2 too)", "choices": ("frozen", "full", "milora")})
    projector_lr: Optional[float] = field(default=None, metadata={
        "help": "the projector's own learning rate (LLaVA-1.5: 2e-5); null: training.learning_rate"})
    vision_tower: str = field(default="frozen", metadata={
        "help": "frozen or full (trained in full, saved with the adapter)", "choices": ("frozen", "full")})
    language_model: str = field(default="frozen", metadata={
        "help": "frozen (only adapters change it) or full (full finetuning: no adapter section)",
        "choices": ("frozen", "full")})


@dataclass
class GuardsSection:
    """Limits that stop a run that is going wrong instead of letting it train on quietly (milora_vlm.train.guards)."""

    max_skip_fraction: float = field(default=0.05, metadata={
        "help": "the run stops with an error (counts by reason, example records) once the records skipped at train "
                "time exceed this fraction both of the records looked at and of the training file"})
    max_consecutive_nonfinite: int = field(default=3, metadata={
        "help": "a step whose loss (or, outside fp16, gradient norm) is NaN/inf is skipped and counted; this many "
                "in a row stop the run after saving a checkpoint of the last good state"})

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
    deepspeed: Optional[str] = field(default=None, metadata={
        "help": "path to a DeepSpeed JSON (configs/zero2.json, configs/zero3.json); null: no DeepSpeed"})
    export: str = field(default="none", metadata={
        "help": "after training, also export the adapter to output_dir/export-<kind>: merged (a full checkpoint "
                "with the adapter merged in), lora (a plain PEFT LoRA of rank 2r that vanilla PEFT loads onto the "
                "unmodified base), none", "choices": ("merged", "lora", "none")})
    bootstrap: Optional[str] = field(default=None, metadata={
        "help": "tiny: where model.path or data.train_file does not exist, build a tiny random model and a "
                "synthetic data set there (runs on a bare CPU machine, no downloads); null: they must exist",
        "choices": ("tiny",)})
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
_TRAINING_HELP = "any transformers TrainingArguments field (--output_dir, --max_steps, --learning_rate, ...)"


def _section_types(cls) -> dict[str, tuple[Any, Optional[tuple]]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("choices")) for f in dataclasses.fields(cls)}


# The recipe's top-level values that are not sections: {key: (type, choices)}, declared on Recipe.
_SCALARS = {key: spec for key, spec in _section_types(Recipe).items() if key in ("deepspeed", "export", "bootstrap")}
_TOP_LEVEL = [*_SECTIONS, "training", *_SCALARS]
# The recipe key `adapter` maps onto MiLoRAConfig; these of its fields are derived from other sections.
_ADAPTER_DERIVED = {"modules_to_save": "set trainable.projector / trainable.vision_tower to 'full' instead"}


# ----------------------------------------------------------------------------------------------------------------
# names and types, for messages and --help

def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


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


def _wrap(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, width=118, initial_indent=" " * indent, subsequent_indent=" " * indent)


def _describe_field(key: str, f: dataclasses.Field, tp, choices) -> list[str]:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    kind = "|".join(choices) if choices else _type_name(tp)
    lines = [f"  {key}: {kind}" + ("" if default is dataclasses.MISSING else f" = {default!r}")]
    lines += _wrap(f.metadata.get("help", ""), 6)
    entries = [(c, getattr(choices[c], "help", None)) for c in choices] if hasattr(choices, "names") else []
    for name, text in entries:  # a registry's entries say what each does
        if text:
            lines += _wrap(f"{name}: {text}", 8)
    return lines


def describe_keys() -> str:
    """Every recipe key with its type or choices, default and help, for `train_vlm.py --help`."""
    lines = []
    for name, cls in _SECTIONS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"{name}:  {doc}" + ("  (null for no adapter)" if name == "adapter" else ""))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, (tp, choices) in _section_types(cls).items():
            if name == "adapter" and key in _ADAPTER_DERIVED:
                continue
            lines += _describe_field(f"{name}.{key}", fields[key], tp, choices)
    lines.append(f"training:  {_TRAINING_HELP}")
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    for key, (tp, choices) in _SCALARS.items():
        lines += [line[2:] for line in _describe_field(key, fields[key], tp, choices)]
    return "\n".join(lines)
