"""Export a trained MiLoRA adapter to formats that need no milora_vlm to run.

- merged: a full checkpoint of the model's own class with W' = W + s (B A - B0 A0), computed in fp32 from the
  *original* W and cast once (also for subtract-mode adapters, whose W_res was rounded); modules_to_save (e.g. the
  LLaVA projector) take their trained values; the tokenizer / processor is copied along.
- lora: a plain PEFT LoRA of rank 2r, A' = [A; A0], B' = [B, -B0], alpha' = 2 alpha (so alpha'/r' = s), that
  vanilla `PeftModel.from_pretrained` (or vLLM) loads onto the original, unmodified base. modules_to_save
  tensors are kept; PEFT's own PiSSA-to-LoRA conversion drops them, which is why this is done here.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, AutoTokenizer

from .milora.persist import (
    INIT_FILE,
    AdapterFileError,
    check_factor_shapes,
    damaged_file,
    load_milora,
    read_init_factors,
    read_lora_config,
    read_milora_meta,
)
from .model.load import adapter_base, has_processor_files, has_tokenizer_files, load_base

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMATS = ("merged", "lora")


def copy_processor(base: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """Save the base's processor (LLaVA) or tokenizer (causal LM) next to the exported weights."""
    if has_processor_files(base):
        AutoProcessor.from_pretrained(base).save_pretrained(output_dir)
        return "processor"
    if has_tokenizer_files(base):
        AutoTokenizer.from_pretrained(base).save_pretrained(output_dir)
        return "tokenizer"
    logger.warning("no tokenizer or processor found in %s; the export has weights only", base)
    return "none"


def export_merged(adapter_dir: str | os.PathLike, base: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write a merged full checkpoint to output_dir; plain `from_pretrained` of the base's class loads it."""
    model = load_base(base, "auto")  # the stored dtype, in the class the base was trained in
    # Offset form on the original W: merging then gives W + s (B A - B0 A0) via the offset variant's merge_safe
    # (fp32, one cast) for either residual mode.
    peft_model = load_milora(model, adapter_dir, residual="offset")
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(output_dir)
    copy_processor(base, output_dir)
    logger.info("merged checkpoint written to %s", output_dir)
    return Path(output_dir)


def export_lora(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write the rank-2r plain LoRA adapter (A' = [A; A0], B' = [B, -B0], alpha' = 2 alpha) to output_dir."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    meta = read_milora_meta(adapter_dir)
    lora_cfg = read_lora_config(adapter_dir, meta)  # the real config: PEFT's loader refuses a MiLoRA one
    if lora_cfg.rank_pattern or lora_cfg.alpha_pattern or lora_cfg.use_rslora:
        raise ValueError(f"{adapter_dir}: rank_pattern / alpha_pattern / rslora adapters are not MiLoRA's; cannot export")
    try:
        state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except SafetensorError as e:
        raise damaged_file(adapter_dir / ADAPTER_WEIGHTS, e) from None
    except FileNotFoundError:
        raise AdapterFileError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (PEFT's adapter weights)") from None
    output_dir.mkdir(parents=True, exist_ok=True)

    if meta["milora"]["init"] == "lora":  # B0 A0 = 0: the adapter already is a plain LoRA
        shutil.copyfile(adapter_dir / ADAPTER_WEIGHTS, output_dir / ADAPTER_WEIGHTS)
        lora_cfg.save_pretrained(str(output_dir))
        return output_dir

    factors = read_init_factors(adapter_dir, meta["targets"])
    out: dict[str, torch.Tensor] = {}
    done = set()
    for name, (A0, B0) in factors.items():
        A, B = (state.get(f"{PEFT_PREFIX}{name}.{part}.weight") for part in ("lora_A", "lora_B"))
        if A is not None and B is not None:
            check_factor_shapes(adapter_dir / INIT_FILE, name, A0, B0, A.shape, B.shape)
            if A.shape[0] != lora_cfg.r:
                raise AdapterFileError(f"{adapter_dir / ADAPTER_WEIGHTS}: {name}.lora_A has {A.shape[0]} rows, the "
                                       f"config says r = {lora_cfg.r}")
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix) and key.startswith(PEFT_PREFIX):
                name = key[len(PEFT_PREFIX) : -len(suffix)]
                if name not in factors:
                    raise KeyError(f"{adapter_dir}: adapter tensor {key} has no initial factors for '{name}'")
                A0, B0 = factors[name]
                if part == "lora_A":
                    out[key] = torch.cat([value.float(), A0.float()], dim=0).contiguous()
                else:
                    out[key] = torch.cat([value.float(), -B0.float()], dim=1).contiguous()
                done.add((name, part))
                break
        else:
            out[key] = value  # modules_to_save tensors (projector, ...) and anything else PEFT saved
    missing = [n for n in factors for p in ("lora_A", "lora_B") if (n, p) not in done]
    if missing:
        raise KeyError(f"{adapter_dir}: {ADAPTER_WEIGHTS} lacks lora_A/lora_B for {sorted(set(missing))[:3]}...")

    lora_cfg.r = 2 * lora_cfg.r
    lora_cfg.lora_alpha = 2 * lora_cfg.lora_alpha
    lora_cfg.init_lora_weights = True
    lora_cfg.save_pretrained(str(output_dir))
    save_file(out, str(output_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (output_dir / "README.md").write_text(
        "Plain PEFT LoRA exported from a MiLoRA adapter (rank 2r: A' = [A; A0], B' = [B, -B0], alpha' = 2 alpha).\n"
        f"Load it onto the original base model with peft.PeftModel.from_pretrained. Source: {adapter_dir}\n"
    )
    logger.info("rank-%d LoRA adapter written to %s", lora_cfg.r, output_dir)
    return output_dir


def copy_recipe(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """The training recipe goes with the export, so generation finds its template (model.load.recipe_template)."""
    from .config import RECIPE_FILENAME

    for where in (Path(adapter_dir), Path(adapter_dir).parent):  # a run's output_dir, or a checkpoint-N in it
        if (where / RECIPE_FILENAME).is_file():
            shutil.copyfile(where / RECIPE_FILENAME, Path(output_dir) / RECIPE_FILENAME)
            return


def export_adapter(adapter_dir, base, to: str, output_dir, overwrite: bool = False) -> Path:
    """Export to output_dir, which must be new or empty (a merged checkpoint and a LoRA adapter in one directory
    would be ambiguous to every loader); overwrite=True replaces what an earlier export left there. The export is
    written next to output_dir and moved in place only once complete, so a failed export (a damaged adapter)
    leaves an earlier one as it was."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: choose one of {FORMATS}")
    output_dir = Path(output_dir)
    occupied = output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir()))
    if occupied and not overwrite:
        raise ValueError(f"--output {output_dir} exists and is not empty; give a new directory (or --overwrite "
                         "to replace an earlier export)")
    if output_dir.resolve() in (Path(adapter_dir).resolve(), *Path(adapter_dir).resolve().parents):
        raise ValueError(f"--output {output_dir} holds the adapter being exported; give another directory")
    staging = output_dir.with_name(output_dir.name + ".exporting")
    _remove(staging)  # left by an export that was killed
    try:
        if to == "merged":
            export_merged(adapter_dir, base if base is not None else adapter_base(adapter_dir), staging)
        else:
            export_lora(adapter_dir, staging)
        copy_recipe(adapter_dir, staging)
    except BaseException:
        _remove(staging)
        raise
    _remove(output_dir)
    os.replace(staging, output_dir)
    return output_dir


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
