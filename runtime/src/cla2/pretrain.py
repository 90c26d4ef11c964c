"""`cla2 pretrain`: LoRA continued pre-training on raw text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cla2 import status, training


@status.tracked("pretrain")
def main(
    model: Path,
    data: Path,
    out: Path,
    tokenizer: Path | None = None,
    block_size: int = 1024,
    cache_dir: Path | None = None,
    max_steps: int = -1,
    epochs: float = 1.0,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 8,
    lr: float = 2e-4,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.0,
    lora_rank: int = 64,
    lora_alpha: float = 128.0,
    lora_dropout: float = 0.05,
    lora_targets: tuple[str, ...] = training.LORA_TARGETS,
    modules_to_save: tuple[str, ...] = training.MODULES_TO_SAVE,
    deepspeed: str | None = "auto",
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto",
    gradient_checkpointing: bool | None = None,
    save_steps: int = 200,
    save_total_limit: int = 3,
    logging_steps: int = 10,
    resume: bool = False,
    overwrite: bool = False,
    device: Literal["auto", "mlu", "cuda", "cpu"] = "auto",
    seed: int = 42,
    _callbacks: Sequence | None = None,
) -> dict:
    """LoRA continued pre-training on a folder of .txt files, grouped into blocks of --block-size tokens.

    Every non-empty line is tokenized (with <s>), the lines are joined and cut into blocks; the tail that
    does not fill a block is dropped. The blocks are cached under --cache-dir, keyed by tokenizer, block
    size and data, so a re-run (or --resume) does not tokenize again. Outputs as `cla2 finetune`.

    Args:
        model: Base model folder (Hugging Face layout: config.json, weights, tokenizer).
        data: Folder of UTF-8 *.txt files (searched recursively).
        out: Output folder. Refused if not empty, unless --resume (continue its last checkpoint) or --overwrite.
        tokenizer: Tokenizer folder, if not the model's; its size must equal the model's vocabulary.
        block_size: Tokens per training block.
        cache_dir: Where tokenized blocks are cached (default $CLA2_CACHE or ~/.cache/cla2).
        max_steps: Optimizer steps to train; overrides --epochs when > 0.
        epochs: Passes over the data (used when --max-steps is not given).
        batch_size: Blocks per device per step (halved, and the accumulation doubled, until the plan fits it).
        gradient_accumulation_steps: Micro-batches accumulated per optimizer step.
        lr: Peak learning rate (cosine schedule after warm-up).
        warmup_ratio: Fraction of the steps spent warming the learning rate up.
        weight_decay: AdamW weight decay.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scaling = alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_targets: Module names that get LoRA adapters.
        modules_to_save: Modules trained and saved in full (embed_tokens, lm_head); empty for LoRA only.
        deepspeed: DeepSpeed ZeRO: auto (the stage the plan picks: none, zero2 or zero3; see `cla2 plan`), none,
            zero2 or zero3 (bundled configs with "auto" fields) or a JSON config file.
        dtype: Training precision: auto (bf16 if the device supports it, else fp16; fp32 on CPU), fp32, fp16, bf16.
        gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower; default:
            on when the plan needs it to fit).
        save_steps: Save a checkpoint every N steps (and at the last step).
        save_total_limit: Keep at most this many checkpoint-* folders.
        logging_steps: Log the loss every N steps.
        resume: Continue from the last checkpoint-* in OUT; a fresh start when there is none.
        overwrite: Write into a non-empty OUT.
        device: Device kind: auto (mlu, then cuda, then cpu), mlu, cuda or cpu.
        seed: Random seed (LoRA init, data order, dropout).
    """
    args = {k: v for k, v in locals().items() if not k.startswith("_")}
    from cla2.data import text_dataset

    def make_dataset(tok):
        return text_dataset(data, tok, block_size, cache_dir)

    return training.run(job="pretrain", make_dataset=make_dataset, args=args, callbacks=_callbacks,
                        group_by_length=False, **training.run_options(args))
