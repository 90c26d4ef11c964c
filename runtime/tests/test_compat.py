"""cla2.compat: the version workarounds, in one module, doing what the versions at hand need."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cla2 import compat

SRC = Path(compat.__file__).parent


def test_version_tests_live_in_compat_only():
    """Dropping an old transformers or torch means editing compat.py: no other module compares versions."""
    offenders = [f"{p.name}:{n}" for p in sorted(SRC.glob("*.py")) if p.name != "compat.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"\bVersion\(|__version__\s*[<>]=?|version_info\s*[<>]", line)]
    assert offenders == []


def test_each_workaround_names_the_versions_it_serves():
    names = [n for n, f in vars(compat).items() if callable(f) and getattr(f, "__module__", None) == compat.__name__]
    assert len(names) >= 12
    for name in names:
        doc = vars(compat)[name].__doc__ or ""
        assert re.match(r"\s*(transformers|torch)\b", doc), f"{name}'s docstring does not open with its versions"
        assert f"``{name}``" in compat.__doc__, f"{name} is missing from the module's table"


def test_dtype_key_is_what_from_pretrained_takes():
    import transformers
    from packaging.version import Version

    want = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    assert compat.dtype_key() == want


def test_filled_cache_holds_the_layers_given():
    from transformers import DynamicCache

    layers = [(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)) for _ in range(3)]
    cache = compat.filled_cache(DynamicCache, layers)
    assert cache.get_seq_length() == 3
    k, v = layers[0]
    got = cache.layers[0] if hasattr(cache, "layers") else None
    keys = got.keys if got is not None else cache.key_cache[0]
    assert torch.equal(keys, k)


def test_new_static_cache_is_one_sequence_of_the_length_asked():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100, max_position_embeddings=512)
    cache = compat.new_static_cache(config, 256, torch.device("cpu"), torch.float32)
    assert compat.static_cache_class() is not None and isinstance(cache, compat.static_cache_class())
    k = torch.zeros(1, 4, 1, 16)
    cache.update(k, k, 0, {"cache_position": torch.tensor([0])})
    layers = compat.static_layers(cache)
    assert len(layers) == 2 and layers[0][0].shape == (1, 4, 256, 16)


def test_training_arguments_drops_what_this_transformers_lacks(tmp_path):
    args = compat.training_arguments(output_dir=str(tmp_path), warmup_ratio=0.1, gradient_checkpointing=False,
                                     gradient_checkpointing_kwargs=None, use_cpu=True, no_such_field=1,
                                     report_to=[])
    assert not hasattr(args, "no_such_field")
    assert getattr(args, "warmup_ratio", None) == 0.1 or args.warmup_steps == 0.1


def test_own_checkpoints_loadable_switches_the_check_off_only_inside():
    import transformers.trainer as hf_trainer

    before = getattr(hf_trainer, "check_torch_load_is_safe", None)
    with compat.own_checkpoints_loadable(Path("checkpoint-1")):
        if before is not None:
            assert hf_trainer.check_torch_load_is_safe() is None
    assert getattr(hf_trainer, "check_torch_load_is_safe", None) is before
