"""`cla2 convert`: a model folder's PyTorch .bin weights to safetensors, without torch.load, in constant memory.

hfl publishes Chinese-LLaMA-2 / Alpaca-2 as ``pytorch_model-0000N-of-0000M.bin`` shards; transformers >= 4.50
does not read them under torch < 2.6 (Cambricon's image has 2.1). The conversion (cla2/torchbin.py, pure
standard library) never runs the files' pickles: anything but plain tensors is refused. It keeps each
tensor's dtype and the folder's sharding, writes ``model-0000N-of-0000M.safetensors`` and
``model.safetensors.index.json`` under temporary names and renames them when all are complete, and leaves
a stamp (``.cla2-convert.json``: sizes, mtimes and sha256 of the .bin files) so a re-run converts nothing.
The model_weights role runs the same code on the host when it places a .bin model.
"""

from __future__ import annotations

from pathlib import Path

from cla2 import torchbin


def main(model: Path, out: Path | None = None, dry_run: bool = False) -> dict:
    """Convert a model folder's PyTorch .bin weights to safetensors shards (pickle-free, constant memory).

    Reads every .bin file's pickle without running it (only plain tensors are accepted) and checks the
    folder is complete before writing anything; then streams each tensor's bytes into
    model-0000N-of-0000M.safetensors (the .bin files' sharding, one model.safetensors when unsharded) and
    writes model.safetensors.index.json. Dtypes are kept. A re-run on an unchanged folder converts nothing.

    Args:
        model: Model folder holding pytorch_model.bin or pytorch_model-*.bin shards with their index.
        out: Folder for the safetensors files; default: MODEL itself, beside the .bin files. Another folder
            also gets the config and tokenizer files.
        dry_run: Check the .bin files and say what would be written, writing nothing.
    """
    from tqdm.auto import tqdm

    model = Path(model)
    planned = torchbin.convert_folder(model, out, check=True)  # reads the pickles only: the bar's total
    if dry_run or not planned["changed"]:
        result = planned
    else:
        check_space(model, planned)
        with tqdm(total=planned["bytes"], unit="B", unit_scale=True, desc="converting") as bar:
            result = torchbin.convert_folder(model, out, progress=bar.update)
    where = result["out"]
    if not result["changed"]:
        print(f"{where}: {result['reason']}; nothing converted")
    elif dry_run:
        print(f"would convert {result['tensors']} tensors ({result['bytes'] / 1e9:.2f} GB) from {model} to {where}: "
              f"{', '.join(result['outputs'])}")
    else:
        print(f"converted {result['tensors']} tensors ({result['bytes'] / 1e9:.2f} GB) from {model} to {where}: "
              f"{', '.join(result['outputs'])}")
    return result


def check_space(model: Path, planned: dict) -> None:
    """Refuse before writing when the safetensors files do not fit the free space of the output's file system:
    the tensors' bytes (from the .bin files' pickles), a header per tensor, the files copied beside them and a
    margin for block rounding. The .bin files stay, so converting in place needs the same room."""
    # cla2.io imports torch: only when there is something to write
    from cla2.io import check_free_space, human

    side = [model / name for name in planned["outputs"]
            if not name.endswith(".safetensors") and name != torchbin.ST_INDEX and (model / name).is_file()]
    copied = sum(f.stat().st_size for f in side)
    files = len(planned["outputs"]) + 1  # and the stamp
    extra = copied + 256 * planned["tensors"] + 4096 * files + (1 << 20)
    check_free_space(Path(planned["out"]), planned["bytes"] + extra,
                     f"{planned['tensors']} tensors ({human(planned['bytes'])}) in safetensors files, their headers, "
                     f"{len(side)} file(s) copied beside them and a margin")
