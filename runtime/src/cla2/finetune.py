"""`cla2 finetune`: LoRA instruction tuning of a (Chinese-)LLaMA-2 model on Alpaca-format data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cla2 import status, training
from cla2.prompts import DEFAULT_SYSTEM_PROMPT


@status.tracked("finetune")
def main(
    model: Path,
    data: Path,
    out: Path,
    tokenizer: Path | None = None,
    max_steps: int = -1,
    epochs: float = 1.0,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 8,
    lr: float = 1e-4,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_seq_length: int = 1024,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    lora_rank: int = 64,
    lora_alpha: float = 128.0,
    lora_dropout: float = 0.05,
    lora_targets: tuple[str, ...] = training.LORA_TARGETS,
    modules_to_save: tuple[str, ...] = training.MODULES_TO_SAVE,
    deepspeed: str | None = "auto",
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto",
    gradient_checkpointing: bool | None = None,
    group_by_length: bool = True,
    save_steps: int = 200,
    save_total_limit: int = 3,
    logging_steps: int = 10,
    resume: bool = False,
    overwrite: bool = False,
    device: Literal["auto", "mlu", "cuda", "cpu"] = "auto",
    seed: int = 42,
    _callbacks: Sequence | None = None,
) -> dict:
    """LoRA instruction tuning on Alpaca-format data (instruction, input, output) with the Alpaca-2 template.

    Each record becomes "[INST] <<SYS>>\\n{system prompt}\\n<</SYS>>\\n\\n{instruction}[\\n{input}] [/INST]"
    followed by " {output}</s>"; the loss is on the output and </s> only. Writes a PEFT adapter
    (adapter_config.json, adapter_model.safetensors), the tokenizer, run.json, loss.png, TensorBoard events
    (runs/) and checkpoint-*/ to OUT. Multi-device / multi-node: start it with torchrun or the deepspeed
    launcher.

    Args:
        model: Base model folder (Hugging Face layout: config.json, weights, tokenizer).
        data: Alpaca-format data: a JSON array file, a JSON Lines file, or a folder of *.json / *.jsonl files.
            Each record has "instruction" and "output" strings and an optional "input".
        out: Output folder. Refused if not empty, unless --resume (continue its last checkpoint) or --overwrite.
        tokenizer: Tokenizer folder, if not the model's; its size must equal the model's vocabulary.
        max_steps: Optimizer steps to train; overrides --epochs when > 0.
        epochs: Passes over the data (used when --max-steps is not given).
        batch_size: Examples per device per step (halved, and the accumulation doubled, until the plan fits it).
        gradient_accumulation_steps: Micro-batches accumulated per optimizer step.
        lr: Peak learning rate (cosine schedule after warm-up).
        warmup_ratio: Fraction of the steps spent warming the learning rate up.
        weight_decay: AdamW weight decay.
        max_seq_length: Examples are cut to this many tokens.
        system_prompt: System prompt put into the template.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scaling = alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_targets: Module names that get LoRA adapters.
        modules_to_save: Modules trained and saved in full (the extended vocabulary's embed_tokens, lm_head).
            Give an empty value to train LoRA only.
        deepspeed: DeepSpeed ZeRO: auto (the stage the plan picks: none, zero2 or zero3; see `cla2 plan`), none,
            zero2 or zero3 (bundled configs with "auto" fields) or a JSON config file.
        dtype: Training precision: auto (bf16 if the device supports it, else fp16; fp32 on CPU), fp32, fp16, bf16.
        gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower; default:
            on when the plan needs it to fit).
        group_by_length: Batch examples of similar length together (far less padding); --no-group-by-length
            draws random batches.
        save_steps: Save a checkpoint every N steps (and at the last step).
        save_total_limit: Keep at most this many checkpoint-* folders.
        logging_steps: Log the loss every N steps.
        resume: Continue from the last checkpoint-* in OUT; a fresh start when there is none.
        overwrite: Write into a non-empty OUT.
        device: Device kind: auto (mlu, then cuda, then cpu), mlu, cuda or cpu.
        seed: Random seed (LoRA init, data order, dropout).
    """
    args = {k: v for k, v in locals().items() if not k.startswith("_")}
    from cla2.data import instruction_dataset

    def make_dataset(tok):
        return instruction_dataset(data, tok, max_seq_length, system_prompt)

    return training.run(job="finetune", make_dataset=make_dataset, args=args, callbacks=_callbacks,
                        **training.run_options(args))
