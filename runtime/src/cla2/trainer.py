"""The parts of a training run that plug into transformers' Trainer: the sampler choice, the callbacks and
the token-counting collator. A module of its own so that they are plain classes, defined once, and that
transformers is imported only when a job trains (``cla2 finetune --help`` does not need it)."""

from __future__ import annotations

import time

from transformers import Trainer, TrainerCallback

from cla2 import status


class TokenCounter:
    """The data collator, counting the real (non-padding) tokens of every batch it makes: the tokens/s of the
    status file are of tokens trained on, not of padding. Each rank counts its own batches."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0

    def __call__(self, batch):
        out = self.collator(batch)
        mask = out.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(out["input_ids"].numel())
        return out


class GroupedTrainer(Trainer):
    """The Trainer, drawing batches of examples of similar length (--group-by-length) when the dataset knows
    its lengths; ``group_by_length`` and ``sampler_seed`` are set on it after construction."""

    group_by_length = False
    sampler_seed = 42

    def _get_train_sampler(self, *a, **kw):
        from cla2.data import LengthGroupedSampler

        lengths = getattr(self.train_dataset, "lengths", None)
        if self.group_by_length and lengths is not None:
            return LengthGroupedSampler(lengths, self._train_batch_size, seed=self.sampler_seed)
        return super()._get_train_sampler(*a, **kw)


class SaveAtEnd(TrainerCallback):
    """A checkpoint at the last step, so that --resume of a finished run trains nothing more."""

    def on_step_end(self, args, state, control, **kw):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control


class SyncCheckpoints(TrainerCallback):
    """fsyncs each checkpoint-N folder (its files, itself, and --out's entry for it) once the Trainer has saved
    it, so a power loss after a save leaves that checkpoint whole (the Trainer itself never fsyncs); each rank
    fsyncs what it sees, its own files among them. Keeps the step the Trainer is at: a save that fails is that
    step's (see training.drop_half_checkpoint)."""

    step: int | None = None

    def on_step_end(self, args, state, control, **kw):
        self.step = state.global_step

    def on_save(self, args, state, control, **kw):
        from pathlib import Path

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from cla2 import io

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            io.fsync_tree(folder, missing_ok=True)  # another rank may be rotating old checkpoints away
            io.fsync_path(folder.parent)


class StatusCallback(TrainerCallback):
    """Keeps the job's status file at the Trainer's step (of max_steps, counting on from a resumed checkpoint's
    step), with the last logged loss and the tokens/s since training began here. tokens/s is rank 0's count
    times the world size (the ranks get equal batches; no collective per step)."""

    def __init__(self, counter: TokenCounter, world_size: int):
        self.counter, self.world_size = counter, world_size
        self.status = status.current()
        self.began = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.began, self.counter.tokens = time.time(), 0
        self.status.update("training", step=state.global_step, total=state.max_steps, unit="step", force=True)

    def on_step_end(self, args, state, control, **kw):
        spent = time.time() - self.began
        self.status.update(step=state.global_step,
                           tokens_per_s=self.counter.tokens * self.world_size / spent if spent > 0 else None)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.status.update(loss=logs["loss"])
