"""Checks across fields and files that need no model: paths, contradictory settings, the DeepSpeed JSON, run
settings that TrainingArguments accepts but that fail later, and (at the start of a run) what this machine's
hardware can honour. Each error names the key and the fix.
"""

from __future__ import annotations

import difflib
import functools
import os
from typing import Any, Optional

import torch

from milora_vlm import jsontext

from .schema import RESUME_AUTO, ConfigError, Recipe, _did_you_mean


# ----------------------------------------------------------------------------------------------------------------
# whole-recipe checks

def looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and not os.path.isabs(value)


def _check_model_source(key: str, value: Optional[str]) -> None:
    if value is None or os.path.exists(value) or looks_like_hub_id(value):
        return
    raise ConfigError(f"{key}: {value!r} does not exist (give a local directory or a hub id such as org/name)")


def _did_you_mean_path(path: str) -> str:
    """ " (did you mean 'x'?)" for a sibling directory whose name is close to `path`'s, else ""."""
    parent, name = os.path.split(os.path.normpath(path))
    try:
        siblings = [e for e in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent or ".", e))]
    except OSError:
        return "; if it should be an existing checkpoint, check its spelling"
    close = difflib.get_close_matches(name, siblings, n=1)
    if close:
        return f"; did you mean {os.path.join(parent, close[0])!r}?"
    return "; if it should be an existing checkpoint, check its spelling"


def _check_paths(r: Recipe) -> None:
    m, d = r.model, r.data
    composing = m.language_model is not None or m.vision_tower is not None
    if m.path is None:
        raise ConfigError("model.path is required: the checkpoint to load (or, for llava, where to save the composed model)")
    if not os.path.exists(m.path) and not looks_like_hub_id(m.path) and not composing and r.bootstrap is None:
        raise ConfigError(
            f"model.path: {m.path!r} does not exist; give an existing checkpoint, or model.language_model + "
            "model.vision_tower to compose a LLaVA there, or bootstrap: tiny to build a tiny one there"
        )
    if composing and not os.path.exists(m.path):  # the sources matter only while model.path is still to be built
        try:
            _check_model_source("model.language_model", m.language_model)
            _check_model_source("model.vision_tower", m.vision_tower)
            if m.projector_weights is not None and not os.path.isfile(m.projector_weights):
                raise ConfigError(f"model.projector_weights: no such file {m.projector_weights!r}")
        except ConfigError as e:  # the real cause may be a misspelt model.path that sent the recipe composing
            raise ConfigError(f"{e}; it is needed because model.path {m.path!r} does not exist, so the recipe would "
                              f"compose a new LLaVA there{_did_you_mean_path(m.path)}") from None
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
            ds = jsontext.read_file(r.deepspeed, "DeepSpeed config")
        except jsontext.InputFileError as e:
            raise ConfigError(f"deepspeed: {e}") from None
        stage = _check_zero(r.deepspeed, ds)
        if stage == 3 and r.adapter is not None and r.adapter.offset_backward == "residual_copy":
            raise ConfigError(f"adapter.offset_backward: 'residual_copy' keeps a whole copy of each adapted weight, "
                              f"which ZeRO-3 ({r.deepspeed}) partitions; use 'factors' (the default) under ZeRO-3, "
                              "or a ZeRO-2 config")
    resume = r.training.get("resume_from_checkpoint")
    if resume not in (None, RESUME_AUTO) and not os.path.isdir(resume):
        raise ConfigError(
            f"training.resume_from_checkpoint: no such directory {resume!r} (give a checkpoint dir or 'auto')"
        )


def _section(path: str, parent: dict, key: str, where: str = "") -> dict:
    """parent[key] as a mapping ({} when absent or null); any other value is an error naming the key."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"deepspeed: {path}: `{where}{key}` must be a JSON object such as "
                          f'{{"enabled": true}} or {{"device": "cpu"}}, not {type(value).__name__} {str(value)[:80]!r}')
    return value


def _check_zero(path: str, ds: Any) -> int:
    """ZeRO settings DeepSpeed would refuse (or silently ignore) only after the model is loaded; returns the stage."""
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {path}: expected a JSON object with a `zero_optimization` mapping")
    zero = _section(path, ds, "zero_optimization")
    _check_deepspeed_keys(path, ds)
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):  # true == 1 in Python: DeepSpeed would run stage 1
        raise ConfigError(f"deepspeed: {path}: zero_optimization.stage {stage!r} is not one of 0, 1, 2, 3")
    offloaded = lambda key: _section(path, zero, key, "zero_optimization.").get("device", "none") not in (  # noqa: E731
        "none", None)
    if offloaded("offload_param") and stage != 3:
        raise ConfigError(f"deepspeed: {path}: offload_param needs zero_optimization.stage 3 (it is {stage})")
    if offloaded("offload_optimizer") and stage == 0:
        raise ConfigError(f"deepspeed: {path}: offload_optimizer needs zero_optimization.stage 1, 2 or 3")
    if _section(path, ds, "fp16").get("enabled") is True and _section(path, ds, "bf16").get("enabled") is True:
        raise ConfigError(f"deepspeed: {path}: fp16 and bf16 are both enabled; choose one (or 'auto')")
    return stage


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed keys and run settings that would fail (or silently do the wrong thing) only after minutes of loading

@functools.lru_cache(maxsize=1)
def _deepspeed_known_keys() -> frozenset[str]:
    """Top-level keys DeepSpeed reads: the keys its config parser asks for, plus the string constants of its
    modules (which name the keys read elsewhere, e.g. optimizer, scheduler, activation_checkpointing). Derived
    from the installed DeepSpeed, so a newer version's keys are known without a list here."""
    import re
    import sys

    from deepspeed.runtime.config import DeepSpeedConfig
    import deepspeed.runtime.engine  # noqa: F401  (loads the modules whose constants name the other keys)

    class Recording(dict):
        def get(self, key, default=None):
            asked.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            asked.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            asked.add(key)
            return super().__contains__(key)

    asked: set = set()
    try:
        DeepSpeedConfig.__new__(DeepSpeedConfig)._initialize_params(Recording())
    except Exception:  # an older or newer parser that wants more than an empty config: the constants still count
        pass
    word = re.compile(r"[a-z][a-z0-9_]*")
    for name, module in list(sys.modules.items()):
        if name.startswith("deepspeed.") and module is not None:
            asked.update(v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and word.fullmatch(v))
    return frozenset(asked)


def _check_deepspeed_keys(path: str, ds: dict) -> None:
    unknown = [k for k in ds if k not in _deepspeed_known_keys()]
    if unknown:
        key = unknown[0]
        hint = _did_you_mean(key, sorted(_deepspeed_known_keys()))
        raise ConfigError(f"deepspeed: {path}: unknown top-level key {key!r}{hint} (DeepSpeed would silently ignore "
                          "it); fix the spelling or remove it")


def _check_run_settings(r: Recipe) -> None:
    """TrainingArguments values and an output_dir that TrainingArguments accepts but that fail or do nothing later."""
    t = r.training
    if t.get("fp16") and t.get("bf16"):
        raise ConfigError("training.fp16 and training.bf16 are both true; keep one (bf16 where the GPU supports it)")
    lr = t.get("learning_rate")
    if lr is not None and lr < 0:
        raise ConfigError(f"training.learning_rate: {lr} is negative (it would train away from the data); "
                          "give a positive rate such as 2e-4")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if key in t and t[key] < 1:
            raise ConfigError(f"training.{key}: {t[key]} must be at least 1")
    if t.get("max_steps") == 0:  # transformers would still run one step and save that adapter
        raise ConfigError("training.max_steps: 0 trains nothing; give max_steps > 0, or -1 (the default) to train "
                          "for num_train_epochs")
    if t.get("num_train_epochs", 1) <= 0 and t.get("max_steps", -1) <= 0:
        raise ConfigError(f"training.num_train_epochs: {t['num_train_epochs']} trains nothing (max_steps is not set) "
                          "and would save an untrained adapter; give num_train_epochs > 0 or max_steps > 0")
    out = r.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"training.output_dir: {out!r} is a file, not a directory; give a directory (--output_dir)")
    parent = out
    while not os.path.isdir(parent):  # the run creates what is missing: the nearest existing folder must be writable
        parent = os.path.dirname(parent) or "."
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"training.output_dir: cannot write in {parent!r} ({e.strerror}); give a writable "
                          "directory (--output_dir)") from None


def _check_combinations(r: Recipe) -> None:
    m, d, t, a = r.model, r.data, r.trainable, r.adapter
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
        if p is None or (not always and not os.path.exists(p) and looks_like_hub_id(p)):
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


# ----------------------------------------------------------------------------------------------------------------
# hardware: settled at the start of a run, before anything loads

def _device_name() -> str:
    if not torch.cuda.is_available():
        return "CPU only"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def resolve_hardware(recipe: Recipe) -> list[str]:
    """Precision settings this machine cannot honour, settled before anything is loaded.

    tf32 only changes how float32 matmuls run, so where it does not exist (CPU, pre-Ampere GPU) it is switched
    off and said so; bf16 / fp16 change the numbers a run produces, so those are refused with the fix.
    Returns the lines saying what was changed (the recipe is updated, so the saved recipe shows what ran).
    """
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_tf32_available

    t, notes = recipe.training, []
    cuda = torch.cuda.is_available()
    if t.get("tf32") and not is_torch_tf32_available():
        t["tf32"] = False
        notes.append(f"training.tf32: true needs an Ampere or newer NVIDIA GPU ({_device_name()}): running with "
                     "tf32 false (it only changes float32 matmul speed)")
    no_bf16 = cuda and not is_torch_bf16_gpu_available()
    if t.get("bf16") and no_bf16:
        raise ConfigError(f"training.bf16: true but this GPU has no bfloat16 ({_device_name()}); "
                          "pass --training.bf16 false --training.fp16 true (or leave both unset to pick automatically)")
    if recipe.model.dtype == "bfloat16" and no_bf16:
        raise ConfigError(f"model.dtype: bfloat16 but this GPU has no bfloat16 ({_device_name()}); "
                          "use --model.dtype auto (or float16 / float32)")
    if t.get("fp16") and not cuda:
        raise ConfigError("training.fp16: true needs a CUDA GPU (fp16 mixed precision has no CPU path); "
                          "pass --training.fp16 false (a CPU run trains in float32)")
    return notes
