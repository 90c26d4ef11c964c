"""`cla2 pretrain`: LoRA continued pre-training on raw text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cla2 import settings, status, training
from cla2.settings import Lora, TextData, Train


@status.tracked("pretrain")
@settings.grouped
def main(
    model: Path,
    data: Path,
    out: Path,
    tokenizer: Path | None = None,
    *,
    blocks: TextData = TextData(),
    train: Train = Train(lr=2e-4, warmup_ratio=0.05),
    lora: Lora = Lora(),
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
        blocks: How the text becomes blocks (cla2.settings.TextData: --block-size, --cache-dir).
        train: How to train (cla2.settings.Train: --max-steps, --lr, --deepspeed, --resume, ...).
        lora: The adapters (cla2.settings.Lora: --lora-rank, --lora-targets, --modules-to-save, ...).
    """
    from cla2.data import text_dataset

    def make_dataset(tok):
        return text_dataset(data, tok, blocks.block_size, blocks.cache_dir)

    return training.run(job="pretrain", model=model, out=out, tokenizer=tokenizer, train=train, lora=lora,
                        make_dataset=make_dataset, args={"model": model, "data": data, "out": out,
                                                         "tokenizer": tokenizer, "blocks": blocks, "train": train,
                                                         "lora": lora},
                        seq_len=blocks.block_size, group_by_length=False, callbacks=_callbacks)
