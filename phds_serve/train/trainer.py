"""PHDS / oracle SFT with transformers' Trainer (accelerate underneath).

Trainer gives data parallelism, FSDP and DeepSpeed through ``accelerate
launch`` without code changes; the only PHDS-specific piece is the
:class:`KScheduleCallback` that sets k before every optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from .callback import KScheduleCallback
from .data import BlockDataset
from .routing import find_routers, install_mask_routing, remove_mask_routing, set_router_k
from .schedule import KSchedule


@dataclass
class TrainSettings:
    """Optimisation settings (PHDS-specific ones live in KSchedule)."""

    output_dir: str
    max_steps: int = 0  # 0: derive from epochs
    epochs: float = 1.0
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    lr_scheduler: str = "cosine"
    seed: int = 0
    routing: str = "topk"  # "topk" (default) or "mask" (PAPER.md's eps mask)
    aux_loss_coef: float = 0.0
    bf16: bool = False
    logging_steps: int = 10
    progress: bool = True
    extra_args: dict[str, Any] = field(default_factory=dict)


def total_steps(n_blocks: int, s: TrainSettings, world_size: int = 1) -> int:
    """Optimizer steps the run will take (needed up front to place the anchor phase)."""
    if s.max_steps > 0:
        return s.max_steps
    per_epoch = math.ceil(n_blocks / (s.batch_size * world_size * s.grad_accum))
    return max(1, math.ceil(per_epoch * s.epochs))


def prepare_model(model: PreTrainedModel, s: TrainSettings) -> None:
    """Load-balancing loss off by default (coefficient 0, as the paper's OLMoE/Qwen runs)."""
    model.config.router_aux_loss_coef = s.aux_loss_coef
    model.config.output_router_logits = s.aux_loss_coef > 0
    if getattr(model.config, "router_jitter_noise", 0):
        model.config.router_jitter_noise = 0.0
    model.config.use_cache = False


def load_checkpoint_weights(model: PreTrainedModel, checkpoint: str) -> None:
    """Load a Trainer checkpoint's weights the way from_pretrained does, strictly.

    transformers 5 saves MoE experts per expert (``experts.0.up_proj.weight``) but
    the model holds them fused (``experts.gate_up_proj``); Trainer's own resume loads
    the file non-strictly, so the experts silently stay at their initial values.
    Loading through from_pretrained first converts them; Trainer then reloads the
    rest unchanged and restores optimizer, scheduler and RNG.
    """
    loaded = type(model).from_pretrained(checkpoint, config=model.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)


def train(
    model: PreTrainedModel,
    train_blocks: torch.Tensor,
    schedule: KSchedule,
    s: TrainSettings,
    callbacks: Sequence[TrainerCallback] = (),
    resume_from_checkpoint: str | bool | None = None,
) -> tuple[KScheduleCallback, Trainer]:
    """Run SFT following ``schedule``; leaves the model routing at its native k.

    ``s.extra_args`` override any TrainingArguments field (e.g. ``save_strategy``
    and ``save_steps`` for a resumable run); ``resume_from_checkpoint`` is passed
    to ``Trainer.train`` (optimizer, scheduler, RNG and data position restored).
    After a resume, the callback's ``history`` holds only the steps run in this call.

    Returns the callback (its ``history`` is the k applied per step) and the
    Trainer (``trainer.state.log_history`` has the loss per logging step;
    ``trainer.save_model`` gathers FSDP/DeepSpeed shards when saving).
    """
    prepare_model(model, s)
    native_k = int(model.config.num_experts_per_tok)
    routers = find_routers(model)
    if s.routing == "mask":
        if max(schedule.k_train + ((schedule.anchor_k,) if schedule.anchor_k else ())) > native_k:
            raise ValueError("mask routing needs every training k <= the pretrained k")
        install_mask_routing(model)
    elif s.routing != "topk":
        raise ValueError(f"routing must be topk or mask, got {s.routing!r}")

    kwargs: dict[str, Any] = dict(
        output_dir=s.output_dir,
        max_steps=schedule.total_steps,
        learning_rate=s.lr,
        warmup_steps=round(s.warmup_ratio * schedule.total_steps),
        weight_decay=s.weight_decay,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        lr_scheduler_type=s.lr_scheduler,
        seed=s.seed,
        data_seed=s.seed,
        bf16=s.bf16,
        logging_steps=s.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=not s.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
    )
    args = TrainingArguments(**{**kwargs, **s.extra_args})
    callback = KScheduleCallback(schedule)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=BlockDataset(train_blocks),
        data_collator=default_data_collator,
        callbacks=[callback, *callbacks],
    )
    if isinstance(resume_from_checkpoint, str):
        load_checkpoint_weights(model, resume_from_checkpoint)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if s.routing == "mask":
        remove_mask_routing(model)
    set_router_k(model, native_k, routers)
    return callback, trainer
