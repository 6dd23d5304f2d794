"""The HF Trainer, specialised only where this pipeline needs it.

- optimizer: the projector gets its own learning rate (trainable.projector_lr) through a parameter group; the
  schedule scales every group alike. With DeepSpeed optimizer offload, DeepSpeedCPUAdam runs the step on CPU.
- saving: an adapter run saves through `save_milora` (PEFT adapter + the frozen MiLoRA factors; under ZeRO-3 it
  gathers the partitioned adapter itself), an adapter-free run saves the full model as the Trainer does; every
  save adds the processor / tokenizer and the resolved recipe. The Trainer adds optimizer, scheduler, RNG and
  trainer state to checkpoints, so each checkpoint can be evaluated and resumed as is.
- skipped records: popped from each batch and counted (milora_vlm.train.skips); totals join every log line.
- sampler: LLaVA's modality/length grouping when data.group_by_modality_length is set.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from milora_vlm.config import Recipe
from milora_vlm.data.collator import SKIPS_KEY

from .sampler import ModalityLengthGroupedSampler
from .skips import SkipCounter

logger = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"


def optimizer_groups(model: torch.nn.Module, decay_names: set[str], lr: float, projector_lr: float | None, weight_decay: float) -> list[dict]:
    """Trainable parameters in up to four groups: (projector or not) x (weight decay or not)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_proj = projector_lr is not None and PROJECTOR in name.split(".")
        groups.setdefault((is_proj, name in decay_names), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": projector_lr if is_proj else lr}
        for (is_proj, decay), params in sorted(groups.items())
    ]


class MiLoRATrainer(Trainer):
    def __init__(self, *args, recipe: Recipe, skip_counter: SkipCounter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.skip_counter = skip_counter

    # ---- optimizer -----------------------------------------------------------------------------------------

    def _optimizer_offloaded(self) -> bool:
        if not self.is_deepspeed_enabled:
            return False
        offload = self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {})
        return offload.get("device", "none") not in ("none", None)

    def create_optimizer(self, model=None):
        offloaded = self._optimizer_offloaded()
        if self.optimizer is not None or (self.recipe.trainable.projector_lr is None and not offloaded):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = optimizer_groups(
            opt_model,
            set(self.get_decay_parameter_names(opt_model)),
            self.args.learning_rate,
            self.recipe.trainable.projector_lr,
            self.args.weight_decay,
        )
        if offloaded:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # the CPU step DeepSpeed's offload is built for

            self.optimizer = DeepSpeedCPUAdam(
                groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay, adamw_mode=True,
            )
        else:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    # ---- batches -------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skips = inputs.pop(SKIPS_KEY, None)
        if self.skip_counter is not None:
            self.skip_counter.update(skips)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(SKIPS_KEY, None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _get_train_sampler(self, train_dataset=None):
        if self.recipe.data.group_by_modality_length:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return ModalityLengthGroupedSampler(
                dataset.lengths,
                batch_size=self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    # ---- logging -------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.skip_counter is not None:  # every rank logs at the same steps: the totals are gathered here
            logs.update(self.skip_counter.log_entries())
        super().log(logs, *args, **kwargs)

    # ---- saving --------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from peft import PeftModel

        from milora_vlm.milora import save_milora

        output_dir = output_dir or self.args.output_dir
        if isinstance(self.model, PeftModel):
            save_milora(self.model, output_dir)  # every rank: gathers ZeRO-3 shards, rank 0 writes
            if self.args.should_save:
                self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.recipe.save(output_dir)
