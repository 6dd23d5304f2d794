"""The HF Trainer, specialised only where this pipeline needs it.

- optimizer: the projector gets its own learning rate (trainable.projector_lr) through a parameter group; the
  schedule scales every group alike. With DeepSpeed optimizer offload, DeepSpeedCPUAdam runs the step on CPU.
- saving: an adapter run saves through `save_milora` (PEFT adapter + the frozen MiLoRA factors; under ZeRO-3 it
  gathers the partitioned adapter itself), an adapter-free run saves the full model as the Trainer does; every
  save adds the processor / tokenizer and the resolved recipe. The Trainer adds optimizer, scheduler, RNG and
  trainer state to checkpoints, so each checkpoint can be evaluated and resumed as is.
- skipped records: popped from each batch and counted (milora_vlm.train.skips); totals join every log line.
- sampler: LLaVA's modality/length grouping when data.group_by_modality_length is set.
- guards (milora_vlm.train.guards): a non-finite loss skips the backward (so the step changes nothing), a
  non-finite gradient norm drops the step's gradients; the records of each batch are passed to the guard so that
  it can name them; too many skipped records stop the run at a log step.
- checkpoints are written into a staging folder and, once every rank has finished, one process per disk writes
  the manifest and renames the folder into place (milora_vlm.train.checkpoint), so `--resume_from_checkpoint auto`
  never meets a half-written one; on node-local disks (save_on_each_node) each node does so for its own copy.
- resuming reads DeepSpeed's pickles with weights_only=True (checkpoint.trusted_deepspeed_loads).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import rotate_checkpoints

from milora_vlm.config import Recipe
from milora_vlm.data.collator import SKIPS_KEY

from . import distributed
from .checkpoint import (clear_staging, publish, run_signature as signature_of, staging_dir, trusted_deepspeed_loads,
                         write_deepspeed_latest, write_manifest)
from .guards import DiskFull, NonFiniteGuard, check_skip_fraction, naming_disk_full
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
    def __init__(self, *args, recipe: Recipe, skip_counter: SkipCounter | None = None,
                 storage: distributed.Storage | None = None, run_signature: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        # who publishes checkpoints on this rank's disk, and what the manifest records about the run
        self.storage = storage or distributed.Storage(tuple(range(self.args.world_size)), False)
        self.run_signature = run_signature or signature_of(recipe, self.args.world_size)
        self.skip_counter = skip_counter
        # fp16: DeepSpeed's / the AMP loss scaler owns gradient overflow skips, so only the loss is judged
        self.nonfinite = NonFiniteGuard(recipe.guards.max_consecutive_nonfinite, judge_grads=not self.args.fp16)
        self.add_callback(self.nonfinite)
        self._skip_backward = False
        self._staging: str | None = None  # set while _save_checkpoint writes into the staging folder
        # The Trainer's training_step always runs the backward (and, under DeepSpeed, the engine's step inside it);
        # this wrapper is the smallest way to leave both out for a step whose loss is non-finite on some rank.
        backward = self.accelerator.backward

        def guarded_backward(loss, **kw):
            if not self._skip_backward:
                backward(loss, **kw)

        self.accelerator.backward = guarded_backward

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
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            if skips is not None:
                self.nonfinite.note_batch(skips.records)
            step = self.state.global_step + 1
            loss = self.nonfinite.poison(out[0] if return_outputs else out, step)
            self._skip_backward = not self.nonfinite.loss_is_finite(loss, step)
            out = (loss, *out[1:]) if return_outputs else loss
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._skip_backward = False
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite.note_loss(loss)
        if self.accelerator.sync_gradients and not self._skip_backward and self.nonfinite.judge_grads:
            self._drop_nonfinite_grads(model)
        self._skip_backward = False
        return loss

    def _drop_nonfinite_grads(self, model) -> None:
        """After the last backward of a step: a non-finite gradient norm skips the step (guards.py)."""
        step = self.state.global_step + 1
        if self.is_deepspeed_enabled:  # the engine has stepped (and skipped an invalid norm) inside the backward
            norm = self.model_wrapped.get_global_grad_norm()
            self.nonfinite.grad_norm_is_finite(None if norm is None else float(norm), step)
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
        if not self.nonfinite.grad_norm_is_finite(norm, step):
            for p in model.parameters():
                p.grad = None  # torch optimizers leave a parameter without a gradient untouched

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
        logs["nonfinite_steps_skipped"] = float(self.nonfinite.skipped_total)
        if "loss" in logs:  # a training log (every rank logs at the same steps): skipped steps are not a loss
            loss, skipped = self.nonfinite.interval_loss(self.args.device)
            if skipped:
                logs["nonfinite_steps_in_interval"] = float(skipped)
                if loss is None:
                    del logs["loss"]
                else:
                    logs["loss"] = loss
            if self.nonfinite.last_step_skipped:
                logs.pop("grad_norm", None)  # no backward ran: the Trainer's 0.0 is not a gradient norm
        super().log(logs, *args, **kwargs)
        self.check_skips()

    def check_skips(self) -> None:
        """guards.max_skip_fraction against the latest gathered skip totals (the same on every rank)."""
        if self.skip_counter is not None:
            samples, reasons = self.skip_counter.last_totals
            file_records = len(self.train_dataset) + len(getattr(self.train_dataset, "load_skips", ()))
            check_skip_fraction(samples, reasons, self.skip_counter.last_examples, file_records,
                                self.recipe.guards.max_skip_fraction)

    # ---- saving --------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        # While _save_checkpoint runs, the Trainer's own save (every rank: weights, DeepSpeed shards, RNG states,
        # trainer state) writes into the staging folder instead of output_dir.
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def train(self, *args, **kwargs):
        with trusted_deepspeed_loads():  # a resume reads DeepSpeed's optimizer / model-state pickles weights-only
            return super().train(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into output_dir/.saving/checkpoint-N by every rank; once all have
        finished, the publisher of each disk (storage.publisher) writes the manifest and renames the folder to
        output_dir/checkpoint-N (checkpoint.publish), so a killed save is never resumed."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = staging_dir(run_dir)
        staged, target = os.path.join(staging, name), os.path.join(run_dir, name)
        publisher = self.storage.publisher
        if publisher:
            clear_staging(run_dir)  # leftovers of a save killed in an earlier run
            os.makedirs(staged)
        distributed.barrier()  # the staging folder is fresh before any rank writes into it
        push, self.args.push_to_hub = self.args.push_to_hub, False  # pushed below, from its final place
        self._staging = staging
        try:
            with naming_disk_full(staged):
                super()._save_checkpoint(model, trial)  # its checkpoint rotation only sees the staging folder
        finally:
            self._staging, self.args.push_to_hub = None, push
        distributed.barrier()  # every rank's files are written
        if self.state.best_model_checkpoint == staged:  # this checkpoint is the best so far: name its real place
            self.state.best_model_checkpoint = target
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        error = None
        if publisher:
            try:
                with naming_disk_full(staged):
                    if self.storage.node_local and self.is_deepspeed_enabled:
                        write_deepspeed_latest(staged)
                    write_manifest(staged, self.run_signature, list(self.storage.ranks))  # the save's last write
                    publish(staged, target)
                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
                clear_staging(run_dir)  # emptied by publish: no .saving/ is left behind
            except (OSError, RuntimeError) as e:
                error = e
        # every rank stops, none waits forever
        mine = None if error is None else f"rank {distributed.rank()}: {error}"
        errors = [e for e in distributed.gather_object(mine) if e]
        if isinstance(error, DiskFull):
            raise error
        if errors:
            raise RuntimeError(f"saving {name} failed: {'; '.join(errors)}")
        if push:
            self._push_from_checkpoint(target)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Resume without DeepSpeed: the Trainer would call PEFT's load_adapter, which refuses a MiLoRA checkpoint
        (milora.persist.REFUSAL); the model already carries B0 A0 from apply_milora, so only A, B load."""
        from peft import PeftModel

        from milora_vlm.milora.persist import META_FILE, load_adapter_weights

        model = self.model if model is None else model
        if isinstance(model, PeftModel) and os.path.isfile(os.path.join(resume_from_checkpoint, META_FILE)):
            load_adapter_weights(model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        with naming_disk_full(output_dir):
            self._save_adapter_or_model(output_dir, _internal_call)

    def _save_adapter_or_model(self, output_dir: str, _internal_call: bool) -> None:
        from peft import PeftModel

        from milora_vlm.milora import save_milora

        if isinstance(self.model, PeftModel):
            # every rank: gathers ZeRO-3 shards; each disk's saving process writes (should_save)
            save_milora(self.model, output_dir, is_main_process=self.args.should_save)
            if self.args.should_save:
                self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.recipe.save(output_dir)
