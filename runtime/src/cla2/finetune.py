"""`cla2 finetune`: LoRA instruction tuning of a (Chinese-)LLaMA-2 model on Alpaca-format data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cla2 import settings, status, training
from cla2.settings import InstructionData, Lora, Train


@status.tracked("finetune")
@settings.grouped
def main(
    model: Path,
    data: Path,
    out: Path,
    tokenizer: Path | None = None,
    *,
    train: Train = Train(),
    lora: Lora = Lora(),
    examples: InstructionData = InstructionData(),
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
        train: How to train (cla2.settings.Train: --max-steps, --lr, --deepspeed, --resume, ...).
        lora: The adapters (cla2.settings.Lora: --lora-rank, --lora-targets, --modules-to-save, ...).
        examples: How records become examples (cla2.settings.InstructionData: --max-seq-length, --system-prompt,
            --group-by-length).
    """
    from cla2.data import instruction_dataset

    def make_dataset(tok):
        return instruction_dataset(data, tok, examples.max_seq_length, examples.system_prompt)

    return training.run(job="finetune", model=model, out=out, tokenizer=tokenizer, train=train, lora=lora,
                        make_dataset=make_dataset, args={"model": model, "data": data, "out": out,
                                                         "tokenizer": tokenizer, "train": train, "lora": lora,
                                                         "examples": examples},
                        seq_len=examples.max_seq_length, group_by_length=examples.group_by_length,
                        callbacks=_callbacks)
