"""Loading a model for inference: the weights (with a LoRA adapter merged in), the tokenizer and the
device, on one device or with the layers of a replica spread over several (the plan's split).

``Engine.from_pretrained``, ``cla2 eval`` and the tests load through ``load_model``.
"""

from __future__ import annotations

from pathlib import Path

from cla2.compat import dtype_key


def replica_device_map(net_skeleton, layer_groups: list[list[int]], torch_devices: list) -> dict:
    """accelerate's device_map for a replica: decoder layer i on the device whose group holds it, the
    embedding (and whatever else sits beside the layers, e.g. the rotary embedding) on the first device,
    the final norm and the output layer on the last (on the first when the output layer is tied to the
    embedding). The groups come from the plan, so what loads is what the plan counted."""
    where = {i: torch_devices[d] for d, group in enumerate(layer_groups) for i in group}
    first, last = torch_devices[0], torch_devices[-1]
    tied = bool(getattr(net_skeleton.config, "tie_word_embeddings", False))
    base = net_skeleton.base_model_prefix  # "model"
    device_map: dict = {}
    for name, _ in getattr(net_skeleton, base).named_children():
        if name == "layers":
            for i in range(len(getattr(net_skeleton, base).layers)):
                device_map[f"{base}.layers.{i}"] = where[i]
        else:
            device_map[f"{base}.{name}"] = last if name == "norm" and not tied else first
    for name, _ in net_skeleton.named_children():
        if name != base:
            device_map[name] = first if tied else last
    return device_map


def tokenizer_dir(model: Path, adapter: Path | None) -> Path:
    """The adapter's folder when it ships a tokenizer (the seed's adapters do), else the model's."""
    if adapter is not None and any((Path(adapter) / n).exists() for n in ("tokenizer.model", "tokenizer.json")):
        return Path(adapter)
    return Path(model)


def load_model(model: Path, adapter: Path | None = None, device: str | None = None, dtype: str | None = None,
               devices: list[int] | None = None, layer_groups: list[list[int]] | None = None):
    """Load (model, tokenizer, torch device) from a Hugging Face folder, with an optional LoRA adapter
    merged in. The tokenizer comes from the adapter folder when it ships one (the seed's adapters do). An
    adapter whose vocabulary (its saved embed_tokens / lm_head rows, its tokenizer) is not the model's
    vocab_size is refused before any weight loads: it was trained on another base.

    ``devices``: the device indices of the replica (default: the current device alone). With more than one,
    the layers are spread over them as ``layer_groups`` says (the plan's split; default: even), each weight
    loaded straight onto its device, and accelerate's hooks carry the hidden states from device to device;
    the returned torch device is the first one, where inputs go in and logits come out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cla2 import device as devices_mod
    from cla2.io import check_loadable, load_pretrained

    check_loadable(model)  # a clear error for a wrong folder or unreadable weights, before transformers' own
    dev = devices_mod.pick(device)
    torch_dtype = devices_mod.parse_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(model, adapter)))
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter folder {adapter} has no adapter_config.json: point --adapter at "
                                "the folder `cla2 finetune` wrote")
    if adapter is not None:
        # An adapter of another base whose layer shapes fit would load; its vocabulary tells (see merge).
        from cla2.merge import adapter_tensors, check_adapter_vocab

        ships_tokenizer = tokenizer_dir(model, adapter) == Path(adapter)
        check_adapter_vocab(Path(adapter), adapter_tensors(adapter)[0], Path(model),
                            len(tokenizer) if ships_tokenizer else None)
    if devices is not None and len(devices) > 1:
        net = _load_split(AutoModelForCausalLM, model, torch_dtype, [dev.torch_device(i) for i in devices],
                          layer_groups)
        torch_device = dev.torch_device(devices[0])
    else:
        net = load_pretrained(AutoModelForCausalLM, model, torch_dtype)
        torch_device = dev.torch_device(devices[0] if devices else None)
    if adapter is not None:
        from peft import PeftModel

        # The adapter's tensors are read to the CPU and copied into the LoRA layers wherever their base layers
        # live (one device, or a split replica's several); left to itself peft reads them to the device it infers
        # (torch.mlu's current card on an MLU host, not each layer's).
        net = PeftModel.from_pretrained(net, str(adapter), torch_device="cpu").merge_and_unload()
    if getattr(net, "hf_device_map", None) is None or len(devices or []) <= 1:
        net.to(torch_device)
    net.eval()
    return net, tokenizer, torch_device


def _load_split(auto_cls, model: Path, torch_dtype, torch_devices: list, layer_groups: list[list[int]] | None):
    """The model with its layers spread over ``torch_devices`` (see ``load_model``)."""
    import accelerate
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model))
    with accelerate.init_empty_weights():
        skeleton = auto_cls.from_config(config)
    n = config.num_hidden_layers
    if layer_groups is None:
        k = len(torch_devices)
        layer_groups = [list(range(d * n // k, (d + 1) * n // k)) for d in range(k)]
    device_map = replica_device_map(skeleton, layer_groups, torch_devices)
    del skeleton
    net = auto_cls.from_pretrained(str(model), device_map=device_map, **{dtype_key(): torch_dtype})
    if getattr(net, "_hf_hook", None) is None:
        # Every device of the replica is the same torch device (the CPU, or a test double's devices):
        # transformers then skips accelerate's hooks. Add them anyway, so the replica runs the same code.
        net = accelerate.dispatch_model(net, device_map=device_map, main_device=torch_devices[0], force_hooks=True)
    return net
