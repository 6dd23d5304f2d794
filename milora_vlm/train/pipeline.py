"""One training run from a recipe: the body of `deepspeed scripts/train_vlm.py --config RECIPE [--key value ...]`.

Order matters: the recipe is checked before anything heavy; the process group exists before TrainingArguments;
TrainingArguments (with the DeepSpeed config) exist before from_pretrained, so ZeRO-3 loads the model partitioned;
the adapter is applied (MiLoRA decomposes each target once across ranks) before the Trainer wraps the model.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch

from milora_vlm.config import ConfigError, Recipe, describe_keys, load_recipe, parse_overrides, resolve_hardware
from milora_vlm.data.dataset import NoTrainableRecords
from milora_vlm.data.records import RecordFileError

from . import distributed
from .callbacks import REFERENCE_ENV, LossCurveCallback, ReferenceLogitsCallback, StartupTimes, StitchedScheduleNote
from .checkpoint import check_resume_compatible, resolve_resume, run_signature
from .guards import DiskFull, TrainingStopped
from .skips import SkipCounter

logger = logging.getLogger("milora_vlm.train")

HELP = """usage: deepspeed [--num_gpus N | --hostfile H] scripts/train_vlm.py --config RECIPE.yaml [--key value ...]

Trains what the recipe declares (configs/ has the paper's recipes and tiny CPU ones). Overrides use the recipe's
keys (--adapter.r 64, --data.train_file x.jsonl) or TrainingArguments names (--output_dir, --max_steps,
--save_steps, --seed, --learning_rate, --resume_from_checkpoint DIR|auto).
"""


def _setup_logging() -> None:
    level = logging.INFO if distributed.rank() == 0 else logging.WARNING
    logging.basicConfig(format=f"[%(asctime)s rank{distributed.rank()}] %(levelname)s %(name)s: %(message)s", level=level)
    logging.getLogger("milora_vlm").setLevel(level)


def prepare_model_and_data(recipe: Recipe) -> None:
    """On one process: build what `bootstrap: tiny` promises and compose a LLaVA that does not exist yet."""
    if recipe.bootstrap == "tiny":
        from .bootstrap import bootstrap_tiny

        bootstrap_tiny(recipe)
    m = recipe.model
    if m.kind == "llava" and m.language_model is not None and not os.path.exists(m.path):
        from milora_vlm.model.build import compose_llava

        compose_llava(m.language_model, m.vision_tower, m.path, m.projector, m.vision_feature_layer,
                      m.vision_feature_select_strategy, m.projector_weights)


def training_arguments(recipe: Recipe, node_local: bool = False):
    """TrainingArguments from the recipe's `training` section plus this pipeline's defaults (written back into the
    recipe, so the saved milora_recipe.yaml shows what ran). On node-local disks DeepSpeed is told so
    (checkpoint.use_node_local_storage: each node's local rank 0 also writes the shared model states)."""
    from transformers import TrainingArguments

    kw = dict(recipe.training)
    kw.pop("resume_from_checkpoint", None)
    cuda = torch.cuda.is_available()
    kw.setdefault("report_to", ["tensorboard"])
    kw.setdefault("logging_steps", 10)
    if not cuda:
        kw.setdefault("use_cpu", True)
    if "bf16" not in kw and "fp16" not in kw:
        kw["bf16"] = bool(cuda and torch.cuda.is_bf16_supported())
    if kw.get("gradient_checkpointing") and "activation_checkpointing_kwargs" not in kw:
        kw.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    if kw.get("activation_checkpointing") and "gradient_checkpointing_kwargs" not in kw:
        kw.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    for key, value in kw.items():
        recipe.training.setdefault(key, value)
    kw["remove_unused_columns"] = False  # the collator's keys are exactly the model's inputs
    kw["deepspeed"] = recipe.deepspeed
    if node_local and recipe.deepspeed is not None:
        with open(recipe.deepspeed, encoding="utf-8") as f:
            ds = json.load(f)
        ds.setdefault("checkpoint", {})["use_node_local_storage"] = True
        kw["deepspeed"] = ds
    return TrainingArguments(**kw)


def _saved_max_steps(checkpoint: str) -> int | None:
    import json

    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # resume checks (checkpoint.py) report a damaged checkpoint


def model_dtype(recipe: Recipe, args) -> torch.dtype:
    from milora_vlm.model.load import resolve_dtype

    if recipe.model.dtype != "auto":
        return resolve_dtype(recipe.model.dtype)
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def run(recipe: Recipe) -> str:
    """Train; returns the output directory (final adapter or model, recipe, logs, loss_curve.png)."""
    try:
        return _run(recipe)
    finally:
        # transformers keeps "ZeRO-3 is on" process-wide (a reference the Trainer holds); cleared here so that a
        # model loaded later in the same process (compare_inits' evaluation) is not loaded partitioned.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _run(recipe: Recipe) -> str:
    from milora_vlm.data.collator import ConversationCollator, packed_row_tokens
    from milora_vlm.data.dataset import ConversationDataset
    from milora_vlm.model.load import load_for_training
    from milora_vlm.model.trainable import apply_trainable, count_parameters

    from .trainer import MiLoRATrainer

    t0 = time.time()
    startup = StartupTimes()
    startup.mark("imports")
    distributed.init_distributed(recipe.deepspeed is not None)
    startup.mark("process_group")
    _setup_logging()
    for note in resolve_hardware(recipe):  # before any loading: never a traceback minutes later
        if distributed.rank() == 0:
            logger.warning(note)
    if distributed.rank() == 0:
        prepare_model_and_data(recipe)
    distributed.barrier()
    startup.mark("bootstrap")

    os.makedirs(recipe.output_dir, exist_ok=True)
    storage = distributed.storage_layout(recipe.output_dir, bool(recipe.training.get("save_on_each_node", False)))
    if storage.node_local:
        logger.info("output_dir %s is node-local: each node saves and resumes its own copy of every checkpoint "
                    "(this disk: ranks %s)", recipe.output_dir, list(storage.ranks))
    world = distributed.world_size()
    resume = resolve_resume(recipe.training.get("resume_from_checkpoint"), recipe.output_dir,
                            rank=distributed.rank() if world > 1 else None, hashes=storage.publisher,
                            gather=distributed.gather_object)
    signature = run_signature(recipe, world)
    if resume is not None:
        check_resume_compatible(recipe, resume, signature)
    args = training_arguments(recipe, storage.node_local)  # before from_pretrained: ZeRO-3 loads partitioned
    startup.mark("training_arguments")
    loaded = load_for_training(recipe.model, model_dtype(recipe, args))
    startup.mark("model_load")
    if loaded.num_image_tokens >= recipe.data.max_length:
        raise ConfigError(
            f"data.max_length {recipe.data.max_length} cannot hold one image ({loaded.num_image_tokens} image tokens)"
        )
    if recipe.data.packing:
        from milora_vlm.model.packed_attention import use_packed_sdpa

        if use_packed_sdpa(loaded.model):
            logger.info("packed batches: sdpa attention runs per sample (milora_vlm.model.packed_attention)")
    model = apply_trainable(loaded.model, recipe)
    startup.mark("adapter_and_decomposition")
    if getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False):
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps the adapter's grads flowing.
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))

    d = recipe.data
    is_llava = recipe.model.kind == "llava"
    dataset = ConversationDataset(
        d.train_file, loaded.tokenizer, d.template, d.max_length,
        image_folder=d.image_folder,
        image_processor=loaded.image_processor,
        image_token_id=loaded.image_token_id,
        num_image_tokens=loaded.num_image_tokens,
        image_aspect_ratio=d.image_aspect_ratio,
        too_long=d.too_long,
        leading_assistant=d.leading_assistant,
        image_to_front=d.image_to_front,
        max_image_pixels=d.max_image_pixels,
        allow_images_outside_folder=d.allow_images_outside_folder,
    )
    vcfg = loaded.model.config.vision_config if is_llava else None
    collator = ConversationCollator(
        pad_token_id=loaded.tokenizer.pad_token_id,
        image_token_id=loaded.image_token_id,
        num_image_tokens=loaded.num_image_tokens,
        image_shape=(3, vcfg.image_size, vcfg.image_size) if is_llava else None,
        vision_keepalive=is_llava and distributed.world_size() > 1,
        packing=d.packing,
        row_tokens=packed_row_tokens(d.max_length, loaded.model.config.get_text_config()._attn_implementation),
    )
    callbacks = [LossCurveCallback(title=os.path.basename(os.path.abspath(recipe.output_dir))), startup]
    if resume is not None:
        saved = _saved_max_steps(resume)
        if saved is not None:
            callbacks.append(StitchedScheduleNote(resume, saved))
    if os.environ.get(REFERENCE_ENV):
        callbacks.append(ReferenceLogitsCallback(dataset, collator, int(os.environ[REFERENCE_ENV])))
    trainer = MiLoRATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=loaded.processing_class,
        recipe=recipe,
        skip_counter=SkipCounter(dataset.load_skips if distributed.rank() == 0 else ()),
        storage=storage,
        run_signature=signature,
        callbacks=callbacks,
    )
    if args.should_save:
        recipe.save(recipe.output_dir)
    startup.mark("data_and_trainer")
    trainer.train(resume_from_checkpoint=resume)
    trainer.nonfinite.raise_if_tripped(recipe.output_dir, trainer.state.global_step)
    samples, reasons = trainer.skip_counter.totals()
    trainer.check_skips()
    trainer.save_model()
    trainer.save_state()
    if distributed.rank() == 0:
        logger.info("skipped %d of %d records looked at%s", sum(reasons.values()), samples,
                    "".join(f"; {r}: {n}" for r, n in sorted(reasons.items())))
        for reason, n in sorted(trainer.skip_counter.last_notes.items()):
            logger.info("trained on %d records changed by %s (see data.max_length)", n, reason)
    distributed.barrier()
    if recipe.export != "none" and distributed.rank() == 0:
        from milora_vlm.export import export_adapter

        out = os.path.join(recipe.output_dir, f"export-{recipe.export}")
        export_adapter(recipe.output_dir, recipe.model.path, recipe.export, out, overwrite=True)  # this run's own
        logger.info("exported (%s) to %s", recipe.export, out)
    logger.info("done in %.1f s: %s", time.time() - t0, recipe.output_dir)
    return recipe.output_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(HELP + "\nRecipe keys (each also settable as --key value):\n" + describe_keys())
        return 0
    try:
        config, pairs = parse_overrides(argv)
        if config is None:
            raise ConfigError("--config RECIPE.yaml is required (see configs/)")
        recipe = load_recipe(config, pairs)
    except ConfigError as e:
        print(f"train_vlm: error: {e}", file=sys.stderr)
        return 2
    try:
        run(recipe)
    except (ConfigError, RecordFileError) as e:  # checks that need the model (adapter targets, rank, ...), or a
        print(f"train_vlm: error: {e}", file=sys.stderr)  # data file that cannot be read at all (UTF-16, a cut array)
        return 2
    except (TrainingStopped, NoTrainableRecords) as e:  # a guard (milora_vlm.train.guards) stopped the run
        print(f"train_vlm: stopped: {e}", file=sys.stderr)
        return 3
    except DiskFull as e:
        print(f"train_vlm: error: {e.strerror}", file=sys.stderr)
        return 1
    return 0
