"""Every transformers / torch version workaround of the package, in one place.

The kit runs on Cambricon's image (torch 2.1, so transformers up to 4.55) and on current CPU / CUDA
stacks (torch 2.6+, transformers 4.56 .. 5.x). Where those differ, the code calls a function here
instead of testing a version itself. Each function's docstring opens with the versions it serves, so
dropping an old transformers or torch means reading this file top to bottom and deleting what only the
dropped versions needed (and nothing else in the package changes).

The functions and the versions they serve:

=============================  ======================================================================
``dtype_key``                  transformers < 4.56: ``torch_dtype`` (renamed ``dtype``)
``torch_load_refused``         transformers >= 4.50 with torch < 2.6: ``torch.load`` refused (CVE-2025-32434)
``torch_load_is_safe``         torch < 2.6: ``torch.load(weights_only=True)`` bypassable (CVE-2025-32434)
``cache_kwarg``                transformers 5.x: the forward's ``past_key_values`` is ``cache``
``output_cache``               transformers 5.x: the output's ``past_key_values`` is ``cache``
``filled_cache``               transformers 4.55: ``DynamicCache(ddp_cache_data)`` keeps an empty first layer
``static_cache_class``         transformers without ``StaticCache`` (< 4.38)
``init_params``                transformers 4.55: ``StaticCache`` takes its arguments through ``**kwargs``
``new_static_cache``           transformers < 4.56: ``StaticCache`` allocates at once (batch size, device, dtype)
``static_layers``              transformers < 4.56: ``key_cache`` / ``value_cache`` instead of ``layers``
``cudagraph_thread_state``     torch < 2.13: CUDA graph trees only on the importing thread (pytorch#123177)
``training_arguments``         transformers 4.40 .. 5.x: renamed and removed ``TrainingArguments`` fields
``own_checkpoints_loadable``   transformers >= 4.50 with torch < 2.6: resuming from this job's own checkpoint
=============================  ======================================================================

Not here, because they are a line inside a class or a function that other code owns (listed so that a
version bump finds them):

- ``engine.Engine.__init__``: ``_cache_position`` (transformers < 5.0 takes ``cache_position``);
  ``Engine._static_logits``: ``hasattr(torch.compiler, "cudagraph_mark_step_begin")`` (older torch has none).
- ``training``: ``logging_dir`` passed to TrainingArguments (transformers < 5) and set on the TensorBoard
  callback (5.x has no ``TrainingArguments.logging_dir``).
- ``eval.Scorer._run``: an all-ones attention mask (transformers 4.55 on torch < 2.5 writes into a
  batch-expanded causal mask without one).
- ``merge.ST_DTYPES``: the float8 dtypes only where this torch has them.
- ``webui.build``: gradio's idle polling intervals, set only where its queue has them (a private attribute).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

# ---- loading -----------------------------------------------------------------------------------------


def dtype_key() -> str:
    """transformers < 4.56 (torch 2.1 images cannot go past 4.55): what this transformers calls the
    weight dtype, in ``from_pretrained`` and in the config: ``dtype`` from 4.56 on, ``torch_dtype`` before
    (renamed in 4.56; the old name still works there, with a deprecation warning)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def torch_load_refused() -> bool:
    """transformers >= 4.50 with torch < 2.6 (Cambricon's image has torch 2.1): whether this transformers
    refuses every ``torch.load``, and so PyTorch .bin weights (CVE-2025-32434: ``weights_only=True`` can be
    bypassed by a crafted file before torch 2.6). False where transformers has no such check (< 4.50)."""
    from transformers.utils import import_utils

    if not hasattr(import_utils, "check_torch_load_is_safe"):
        return False
    try:
        import_utils.check_torch_load_is_safe()
    except ValueError:
        return True
    return False


def torch_load_is_safe() -> bool:
    """torch < 2.6: whether ``torch.load(weights_only=True)`` is to be trusted with a file from elsewhere
    (from torch 2.6 on; before, a crafted file bypasses it, CVE-2025-32434). Where it is not, .bin files
    are read with cla2.torchbin, which never runs their pickle."""
    from packaging.version import Version

    return Version(torch.__version__.split("+")[0]).release >= (2, 6)


# ---- KV caches and the forward's arguments -----------------------------------------------------------


def cache_kwarg(module) -> str:
    """transformers 5.x renamed the forward's `past_key_values` to `cache`; older ones (MLU images) have
    only the first."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out):
    """transformers 5.x: the forward's output carries its KV cache as ``cache``; older ones as
    ``past_key_values``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def filled_cache(cls, layers) -> object:
    """transformers 4.55: a ``cls`` (DynamicCache) holding these (keys, values) per layer. Filled through
    ``update`` rather than the constructor's ``ddp_cache_data``, which transformers 4.55 appends after an
    empty first layer (every version takes ``update``)."""
    cache = cls()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def static_cache_class():
    """transformers < 4.38 (no ``StaticCache``): transformers' StaticCache, or None where this transformers
    has none (the engine then decodes eagerly)."""
    try:
        from transformers import StaticCache
    except ImportError:
        return None
    return StaticCache


def init_params(cls) -> set[str]:
    """transformers 4.55 (its StaticCache passes everything on to Cache through ``**kwargs``): the keyword
    arguments ``cls(...)`` takes, following ``**kwargs`` up the class hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        names |= {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def new_static_cache(config, length: int, device: torch.device, dtype: torch.dtype,
                     layer_devices: list[torch.device] | None = None, batch_size: int = 1):
    """transformers < 4.56: an empty StaticCache for ``batch_size`` sequences (the engine's batch bucket)
    of up to ``length`` tokens. transformers
    4.56+ takes (config, max_cache_len) and allocates on the first update; older ones allocate at once and
    want the batch size (``batch_size`` or ``max_batch_size``; 4.55, the one tested, takes them through
    ``**kwargs``), the device and the dtype (and, for a model split over devices, each layer's device)."""
    cls = static_cache_class()
    params = init_params(cls)
    kwargs: dict = {"config": config, "max_cache_len": length}
    if "batch_size" in params:
        kwargs["batch_size"] = batch_size
    elif "max_batch_size" in params:
        kwargs["max_batch_size"] = batch_size
    if "device" in params:
        kwargs["device"] = device
    if "dtype" in params:
        kwargs["dtype"] = dtype
    if layer_devices is not None and "layer_device_map" in params:
        kwargs["layer_device_map"] = dict(enumerate(layer_devices))
    return cls(**kwargs)


def static_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """transformers < 4.56 (``key_cache`` / ``value_cache`` lists; 4.56+ has ``layers``): (keys, values)
    per layer of a StaticCache, each [batch, heads, max_cache_len, head_dim]."""
    if hasattr(cache, "layers"):  # transformers 4.56+
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


# ---- torch.compile -----------------------------------------------------------------------------------


def cudagraph_thread_state() -> None:
    """torch < 2.13: let this (the engine's) thread use CUDA graph trees. torch before 2.13 keeps their
    state in thread-local storage set up only on the importing thread and autograd's threads, and fails
    with a bare AssertionError in ``cudagraph_trees.get_obj`` anywhere else (pytorch#123177, fixed there
    by initializing it lazily, which is what this does for older versions)."""
    try:
        from torch._inductor import cudagraph_trees as trees
    except Exception:  # noqa: BLE001 - no inductor: torch.compile fails later and the engine falls back
        return
    local = getattr(trees, "local", None)
    if local is None or hasattr(local, "tree_manager_containers"):
        return
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    init = getattr(trees, "_initialize_tls", None)
    if init is not None:
        init(local)
    else:
        local.tree_manager_containers = {}
        local.tree_manager_locks = collections.defaultdict(threading.Lock)


# ---- training ----------------------------------------------------------------------------------------


def training_arguments(**kwargs):
    """transformers 4.40 .. 5.x: TrainingArguments across renamed and removed fields (5.x: ``warmup_ratio``
    folded into ``warmup_steps``, gradient checkpointing renamed activation checkpointing; older ones'
    ``no_cuda`` where there is no ``use_cpu``); a field this transformers does not have is dropped."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = kwargs.pop("warmup_ratio")
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = warmup
    else:
        kwargs["warmup_steps"] = warmup  # 5.x: a float below 1 is a ratio
    if "activation_checkpointing" in fields:  # 5.x renamed gradient checkpointing
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    if kwargs.pop("use_cpu"):
        kwargs["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    unknown = [k for k in kwargs if k not in fields]
    for k in unknown:
        kwargs.pop(k)
    return TrainingArguments(**kwargs)


@contextlib.contextmanager
def own_checkpoints_loadable(resume_from: Path | None) -> Iterator[None]:
    """transformers >= 4.50 with torch < 2.6 (Cambricon's image has 2.1): let the Trainer read back the
    optimizer, scheduler and RNG state of this job's own checkpoint. transformers 4.50+ refuses every
    ``torch.load`` there because of CVE-2025-32434 (``weights_only=True`` can be bypassed by a crafted
    file). The files read here are the ones this job wrote into its own output folder, not files from
    elsewhere, so the check is switched off for that one call. Everything else (a base model's .bin
    weights) still goes through it."""
    import transformers.trainer as hf_trainer

    if resume_from is None or not hasattr(hf_trainer, "check_torch_load_is_safe"):
        yield
        return
    check = hf_trainer.check_torch_load_is_safe
    hf_trainer.check_torch_load_is_safe = lambda: None
    try:
        yield
    finally:
        hf_trainer.check_torch_load_is_safe = check
