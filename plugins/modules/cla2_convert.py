#!/usr/bin/python
# -*- coding: utf-8 -*-
# Why a module of our own: the published Chinese-LLaMA-2 / Alpaca-2 folders are PyTorch .bin shards, and the
# runtime image's transformers does not read them under torch < 2.6 (CVE-2025-32434). This converts a placed
# folder to safetensors on the host, with the host's python3 and no torch, never running the files' pickles.
# The code is the runtime's own (runtime/src/cla2/torchbin.py, which `cla2 convert` runs):
# module_utils/cla2_torchbin.py is a link to it, and Ansible ships it to the host with this module.
# The conversion runs in a forked child, so that a file that crashes or exhausts the reader still gets a JSON
# answer (failed, msg) instead of a MODULE FAILURE with no result.
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

import json
import os
import signal
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.cla2.mlu.plugins.module_utils.cla2_torchbin import TorchBinError, bin_shards, convert_folder


def isolated(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in a forked child: (its JSON-able result, None), or (None, why it failed).

    The .bin files come from elsewhere: whatever reading one does to the child (an exception of any kind, a
    crash of the interpreter, the kernel's OOM kill), this process lives to say so as the module's JSON."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(rfd)
            try:
                out = {"result": fn(*args, **kwargs)}
            except TorchBinError as exc:
                out = {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001  (reported, not raised: the parent says what went wrong)
                out = {"error": "%s: %s" % (type(exc).__name__, exc)}
            with os.fdopen(wfd, "w") as fh:
                json.dump(out, fh)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd) as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "signal %d" % sig
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        return None, "the converter was killed by %s%s while reading the files: not weights cla2 reads; " \
                     "re-download them, or get the model as safetensors" % (name, hint)
    try:
        out = json.loads(data)
    except ValueError:
        return None, "the converter exited with status %s and no result" % os.WEXITSTATUS(status)
    if "error" in out:
        return None, out["error"]
    return out["result"], None


def main():
    module = AnsibleModule(argument_spec=dict(path=dict(type="path", required=True)), supports_check_mode=True)
    path = module.params["path"]
    result = {"changed": False, "path": path, "outputs": [], "bytes": 0, "tensors": 0}
    try:
        bin_shards(Path(path))
    except TorchBinError as exc:
        if "holds no PyTorch .bin weights" in str(exc):
            result["reason"] = "no PyTorch .bin weights: nothing to convert"
            module.exit_json(**result)
    except Exception:  # noqa: BLE001  (said again, with the path, by the conversion below)
        pass
    converted, error = isolated(convert_folder, path, check=module.check_mode)
    if error is not None:
        module.fail_json(msg="model_weights: %s: converting its .bin weights to safetensors: %s" % (path, error),
                         **result)
    result.update(converted)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
