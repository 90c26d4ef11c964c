"""Write a tiny random LLaMA model folder, for tests, benchmarks and the sandbox demo.

The folder looks like a published one (config.json, safetensors shards with an index, tokenizer files),
so every job runs on it unchanged. The tokenizer is either copied from a real folder (``--tokenizer``,
e.g. the 55296-piece Chinese-LLaMA-2 one) or a small SentencePiece BPE model trained here on a bundled
corpus with the same settings as the real one (byte fallback, split digits, unk 0 / bos 1 / eos 2), so
no download is ever needed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"


def train_tokenizer(out: Path, vocab_size: int = 1000, corpus: Path | None = None) -> Path:
    """Train a LLaMA-style SentencePiece tokenizer into ``out`` and write the transformers configs."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    text = (corpus or ASSETS / "corpus.txt").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.txt"
        # Repeat the corpus so SentencePiece sees enough sentences to reach the vocabulary size.
        src.write_text((text + "\n") * 20, encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(src), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, minloglevel=2,
        )
        shutil.copy(Path(tmp) / "tokenizer.model", out / "tokenizer.model")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 4096, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def main(
    out: Path,
    tokenizer: Path | None = None,
    vocab_size: int = 1000,
    layers: int = 2,
    hidden_size: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate_size: int = 176,
    max_position_embeddings: int = 1024,
    shards: int = 2,
    dtype: str = "fp32",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random LLaMA model (config, safetensors shards, tokenizer) to OUT.

    Args:
        out: Folder to write; refused if it exists and is not empty, unless --overwrite.
        tokenizer: Copy the tokenizer from this folder (e.g. the 55296-piece Chinese-LLaMA-2 one)
            instead of training a small one.
        vocab_size: Pieces of the trained tokenizer (ignored with --tokenizer).
        layers: Decoder layers.
        hidden_size: Hidden size.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention); default = heads.
        intermediate_size: MLP size.
        max_position_embeddings: Context window.
        shards: Number of safetensors shards to split the weights into.
        dtype: Weight dtype: fp32, fp16 or bf16.
        seed: Random seed of the weights.
        overwrite: Replace a non-empty OUT.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cla2.compat import dtype_key
    from cla2.io import atomic_output_dir, save_sharded

    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if tokenizer is not None:
            for f in Path(tokenizer).iterdir():
                if f.is_file() and (f.name.startswith("tokenizer") or f.name == "special_tokens_map.json"):
                    shutil.copyfile(f, tmp / f.name)
        else:
            train_tokenizer(tmp, vocab_size=vocab_size)
        tok = AutoTokenizer.from_pretrained(tmp)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
            max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        model.to(torch_dtype)
        setattr(config, dtype_key(), torch_dtype)
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_sharded(dict(model.state_dict()), tmp, shards=shards)
    return out
