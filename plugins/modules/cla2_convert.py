#!/usr/bin/python
# -*- coding: utf-8 -*-
# Why a module of our own: the published Chinese-LLaMA-2 / Alpaca-2 folders are PyTorch .bin shards, and the
# runtime image's transformers does not read them under torch < 2.6 (CVE-2025-32434). This converts a placed
# folder to safetensors on the host, with the host's python3 and no torch, never running the files' pickles.
# The code is the runtime's own (runtime/src/cla2/torchbin.py, which `cla2 convert` runs):
# module_utils/cla2_torchbin.py is a link to it, and Ansible ships it to the host with this module.
from __future__ import annotations

DOCUMENTATION = r"""
---
module: cla2_convert
short_description: Convert a model folder's PyTorch .bin weights to safetensors, pickle-free
description:
  - Reads every .bin file's pickle without running it (only plain tensors are accepted) and checks the folder
    is complete, then streams each tensor into C(model-0000N-of-0000M.safetensors) beside the .bin files (the
    same sharding, C(model.safetensors) when unsharded) and writes C(model.safetensors.index.json), under
    temporary names renamed at the end.
  - A stamp (C(.cla2-convert.json)) records the .bin files' sizes, mtimes and sha256 and the outputs' sizes and
    mtimes; a folder whose stamp matches is not converted again (changed=false).
  - A folder without .bin weights, or that already holds safetensors weights not written by the kit, is left
    alone (changed=false, see C(reason)).
options:
  path: {description: Model folder, type: path, required: true}
"""

from pathlib import Path

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.cla2.mlu.plugins.module_utils.cla2_torchbin import TorchBinError, bin_shards, convert_folder


def main():
    module = AnsibleModule(argument_spec=dict(path=dict(type="path", required=True)), supports_check_mode=True)
    path = module.params["path"]
    result = {"changed": False, "path": path, "outputs": [], "bytes": 0, "tensors": 0}
    try:
        try:
            bin_shards(Path(path))
        except TorchBinError as exc:
            if "holds no PyTorch .bin weights" in str(exc):
                result["reason"] = "no PyTorch .bin weights: nothing to convert"
                module.exit_json(**result)
            raise
        result.update(convert_folder(path, check=module.check_mode))
    except (TorchBinError, OSError) as exc:
        module.fail_json(msg="model_weights: %s: converting its .bin weights to safetensors: %s" % (path, exc),
                         **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
