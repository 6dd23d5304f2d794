"""Saving and restoring a MiLoRA adapter: PEFT's own adapter files plus the frozen initial factors.

An adapter directory holds
  adapter_config.json, adapter_model.safetensors   PEFT's LoRA files (A, B, modules_to_save); the config's
                                                   task_type is REFUSAL (below) unless init is "lora"
  milora_init.safetensors                          "<module>.A0" (r x in), "<module>.B0" (out x r), fp32
  milora_config.json                               {"format": ..., "milora": MiLoRAConfig fields, "targets": [...],
                                                    "peft_task_type": the LoRA config's real task_type}
With B0 A0 and the original base weights, load_milora rebuilds the exact trained function in either residual
form (the subtract form's W_res is recomputed from W, not stored: it would be a full copy of the targets).

A plain PEFT load of these files alone would give W x + s B A x, without the - s B0 A0 x term: silently wrong
outputs. So the saved adapter_config.json carries a task_type that PEFT's own config check (PeftConfig.__post_init__,
run by PeftModel.from_pretrained, load_adapter, transformers' load_adapter, AutoPeftModel, PeftConfig.from_pretrained)
rejects, with REFUSAL in its error message: use load_milora, or milora_vlm.export for a plain rank-2r LoRA /
merged checkpoint. init="lora" adapters (B0 A0 = 0) are plain LoRA adapters and stay loadable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from milora_vlm import dist as ranks
from milora_vlm import jsontext

from .apply import ADAPTER, install_residual
from .combine import enable_weighted_combination
from .config import MiLoRAConfig
from .distributed import Factors
from .offset import frozen_factors, has_offset
from .targets import find_targets, is_partitioned

INIT_FILE = "milora_init.safetensors"
META_FILE = "milora_config.json"
PEFT_CONFIG_FILE = "adapter_config.json"
FORMAT = "milora-vlm/1"
# The task_type written into a MiLoRA adapter_config.json: PEFT refuses it and prints it ("Invalid task type: ...").
REFUSAL = (
    "MILORA_ADAPTER -- not a plain LoRA adapter: its function W + s(BA - B0A0) needs the frozen factors in "
    f"{INIT_FILE}, which plain PEFT would drop (silently wrong outputs). Load it with "
    "milora_vlm.milora.load_milora(base_model, adapter_dir), or export it with scripts/export_adapter.py "
    "(--to lora: a plain rank-2r LoRA that PeftModel.from_pretrained loads exactly; --to merged: a full model)"
)


def initial_factors(peft_model: PeftModel) -> Factors:
    """{target name: (A0, B0)} as fp32 CPU tensors, from the offset buffers or the subtract-mode record."""
    config = _config_of(peft_model)
    if config.init == "lora":
        return {}
    if config.residual == "subtract":
        return dict(peft_model.milora_subtract_factors)
    out = {}
    for t in find_targets(peft_model, ADAPTER):
        if not has_offset(t.layer, ADAPTER):
            raise RuntimeError(f"target '{t.name}' has no frozen B0/A0: was the model built by apply_milora?")
        A0, B0 = frozen_factors(t.layer, ADAPTER)
        out[t.name] = (A0.detach().to("cpu", torch.float32), B0.detach().to("cpu", torch.float32))
    return out


def write_init_files(peft_model: PeftModel, output_dir: str | os.PathLike) -> None:
    """milora_init.safetensors + milora_config.json into output_dir (next to PEFT's files). Call on one rank."""
    config = _config_of(peft_model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    factors = initial_factors(peft_model)
    if factors:
        tensors = {}
        for name, (A0, B0) in factors.items():
            tensors[f"{name}.A0"] = A0.contiguous()
            tensors[f"{name}.B0"] = B0.contiguous()
        save_file(tensors, str(output_dir / INIT_FILE), metadata={"format": FORMAT})
    peft_config = peft_model.peft_config[ADAPTER]
    meta = {
        "format": FORMAT,
        "milora": dataclasses.asdict(config),
        "targets": [t.name for t in find_targets(peft_model, ADAPTER)],
        "peft_task_type": None if peft_config.task_type is None else str(peft_config.task_type),
    }
    (output_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if config.init != "lora":
        _mark_refused(output_dir / PEFT_CONFIG_FILE)


def _mark_refused(path: Path) -> None:
    """Rewrite PEFT's adapter_config.json with task_type = REFUSAL (atomically: never a half-written config)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: write PEFT's adapter files before the MiLoRA ones")
    d = json.loads(path.read_text())
    d["task_type"] = REFUSAL
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True))
    os.replace(tmp, path)


class AdapterFileError(ValueError):
    """An adapter directory whose files cannot be used as they are; the message names the file and what is wrong."""


def damaged_file(path, error: Exception) -> AdapterFileError:
    """The error for a safetensors file of an adapter that safetensors cannot read (header, offsets, size)."""
    return AdapterFileError(f"{path}: damaged or not a safetensors file ({error})")


def read_lora_config(adapter_dir: str | os.PathLike, meta: dict | None = None) -> LoraConfig:
    """The adapter's real LoraConfig (task_type restored from milora_config.json); what load_milora hands PEFT."""
    meta = read_milora_meta(adapter_dir) if meta is None else meta
    path = Path(adapter_dir) / PEFT_CONFIG_FILE
    try:
        d = jsontext.read_object(path, "adapter config")
    except jsontext.InputFileError as e:
        raise AdapterFileError(str(e)) from None
    if d.get("task_type") == REFUSAL:
        d["task_type"] = meta.get("peft_task_type")
    r, alpha = d.get("r"), d.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFileError(f"{path}: r = {r!r} is not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterFileError(f"{path}: lora_alpha = {alpha!r} is not a positive number")
    if r != meta["milora"].get("r"):
        raise AdapterFileError(f"{path}: r = {r} but {META_FILE} says r = {meta['milora'].get('r')!r}: the files are "
                               "from different adapters")
    try:
        return LoraConfig.from_peft_type(**d)
    except (TypeError, ValueError) as e:  # an unknown key, or a value LoraConfig's own checks refuse
        raise AdapterFileError(f"{path}: not a LoRA config PEFT accepts: {e}") from None


def check_factor_shapes(path, name: str, A0: torch.Tensor, B0: torch.Tensor, A_shape, B_shape) -> None:
    """A0 / B0 of target `name` must have lora_A's (r x in) and lora_B's (out x r) shapes, or the adapter's
    function is not what was trained (a mismatch would otherwise fail deep in a GEMM, or broadcast)."""
    if tuple(A0.shape) != tuple(A_shape) or tuple(B0.shape) != tuple(B_shape):
        raise AdapterFileError(f"{path}: target {name!r}: A0 {tuple(A0.shape)} / B0 {tuple(B0.shape)} do not match "
                               f"lora_A {tuple(A_shape)} / lora_B {tuple(B_shape)}: the files are from different "
                               "adapters, or damaged")


def load_adapter_weights(peft_model: PeftModel, adapter_dir: str | os.PathLike) -> None:
    """Load a saved adapter's trainable tensors (A, B, modules_to_save) into a model built by apply_milora with the
    same settings: the non-DeepSpeed resume path (the Trainer's own uses PEFT's config loader, which refuses)."""
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter_dir)), adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise KeyError(f"{adapter_dir}: tensors this model has no place for, e.g. {result.unexpected_keys[:3]}")


def save_milora(peft_model: PeftModel, output_dir: str | os.PathLike, state_dict: dict | None = None,
                is_main_process: bool | None = None) -> None:
    """PEFT save_pretrained + the MiLoRA files; a directory that load_milora (or export) can use as is.

    Call it on every rank under torch.distributed: ZeRO-3 partitioned adapter weights are gathered (collectively)
    unless a gathered `state_dict` is given, and rank 0 writes (or every rank given is_main_process=True: one per
    node when each node saves on its own disk).
    """
    _config_of(peft_model)
    rank = ranks.rank()
    writes = rank == 0 if is_main_process is None else is_main_process
    adapter_params = [p for n, p in peft_model.named_parameters() if "lora_" in n or "modules_to_save" in n]
    if state_dict is None and any(is_partitioned(p) for p in adapter_params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(adapter_params, modifier_rank=None):
            peft_model.save_pretrained(str(output_dir), is_main_process=writes)
    else:
        peft_model.save_pretrained(str(output_dir), state_dict=state_dict, is_main_process=writes)
    if writes:
        write_init_files(peft_model, output_dir)
    ranks.barrier()


def read_milora_meta(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {adapter_dir} is not a MiLoRA adapter directory (save it with save_milora); a plain "
            "LoRA adapter loads with peft.PeftModel.from_pretrained"
        )
    try:
        meta = jsontext.read_object(path, "MiLoRA config")
    except jsontext.InputFileError as e:
        raise AdapterFileError(str(e)) from None
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: format {str(meta.get('format'))[:80]!r}, this version reads {FORMAT!r}")
    targets = meta.get("targets")
    if not isinstance(meta.get("milora"), dict):
        raise AdapterFileError(f"{path}: `milora` (the MiLoRAConfig fields) is missing or not an object")
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterFileError(f"{path}: `targets` is missing or not a list of module names")
    return meta


def read_init_factors(adapter_dir: str | os.PathLike, names: list[str]) -> Factors:
    path = Path(adapter_dir) / INIT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the adapter's frozen initial factors B0/A0 are missing")
    factors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for name in names:
                if f"{name}.A0" not in keys or f"{name}.B0" not in keys:
                    raise KeyError(f"{path} has no factors for target '{name}' (keys '{name}.A0' / '{name}.B0')")
                factors[name] = (f.get_tensor(f"{name}.A0"), f.get_tensor(f"{name}.B0"))
    except SafetensorError as e:  # a damaged file (header, offsets, size)
        raise damaged_file(path, e) from None
    return factors


def load_milora(
    base_model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False, residual: str | None = None
) -> PeftModel:
    """Restore a saved MiLoRA adapter onto the *original* base model: the exact trained function.

    residual: None keeps the saved form; "offset" rebuilds a subtract-mode adapter in offset form (the same
    function relative to the original W, computed without W_res's rounding; export uses it).
    """
    meta = read_milora_meta(adapter_dir)
    config = MiLoRAConfig.from_dict(meta["milora"])
    if residual is not None:
        config = dataclasses.replace(config, residual=residual)
    lora_config = read_lora_config(adapter_dir, meta)
    try:
        peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir), config=lora_config,
                                               is_trainable=is_trainable)
    except SafetensorError as e:
        raise damaged_file(Path(adapter_dir) / "adapter_model.safetensors", e) from None
    except RuntimeError as e:  # load_state_dict's size mismatches (not any RuntimeError: out of memory is one too)
        if "size mismatch" not in str(e):
            raise
        raise AdapterFileError(f"{adapter_dir}: its adapter weights do not fit this base model ({e})") from None
    targets = find_targets(peft_model, ADAPTER)
    if config.init != "lora":
        names = [t.name for t in targets]
        if sorted(names) != sorted(meta["targets"]):
            raise ValueError(
                f"{adapter_dir}: the adapter's targets ({len(meta['targets'])}) do not match the LoRA layers built "
                f"on this base model ({len(names)}): is this the base model it was trained on?"
            )
        factors = read_init_factors(adapter_dir, names)
        for t in targets:
            A, B = t.layer.lora_A[ADAPTER].weight, t.layer.lora_B[ADAPTER].weight
            check_factor_shapes(Path(adapter_dir) / INIT_FILE, t.name, *factors[t.name],
                                getattr(A, "ds_shape", A.shape), getattr(B, "ds_shape", B.shape))  # ZeRO-3: full shape
        install_residual(peft_model, targets, factors, config, trainable=is_trainable)
    enable_weighted_combination(peft_model)
    peft_model.milora_config = config
    return peft_model


class MiLoRACheckpointCallback(TrainerCallback):
    """Adds milora_init.safetensors + milora_config.json to every Trainer checkpoint, so that each checkpoint
    directory loads with load_milora as is (the Trainer itself writes only PEFT's files), and marks its
    adapter_config.json so that plain PEFT refuses it."""

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_init_files(self.peft_model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return control


def _config_of(peft_model: nn.Module) -> MiLoRAConfig:
    config = getattr(peft_model, "milora_config", None)
    if not isinstance(config, MiLoRAConfig):
        raise TypeError("this model carries no MiLoRA adapter: build it with apply_milora or load_milora")
    return config
