"""Every molecule platform drops its anonymous volumes on destroy.

The sandbox hosts mount /var/lib/docker and /data as anonymous volumes: each holds a loaded PyTorch
image or model weights, GBs a run. A scenario's `platforms:` replaces the base config's list (it is not
merged item by item), so a scenario that declares its own hosts must say `keep_volumes: false` itself;
one that did not left 43 GB behind after a few CI runs and filled the disk of the machine CI runs on.
"""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / ".config/molecule/config.yml", *sorted(ROOT.glob("molecule/*/molecule.yml"))]


def platforms(path):
    return (yaml.safe_load(path.read_text()) or {}).get("platforms") or []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_platforms_drop_their_volumes(path):
    for platform in platforms(path):
        if platform.get("volumes"):
            assert platform.get("keep_volumes") is False, (
                f"{path.relative_to(ROOT)}: platform {platform['name']} mounts anonymous volumes; "
                "add `keep_volumes: false` so that destroy removes them")


def test_some_scenario_declares_its_own_platforms():
    # the guard above must look at something: the scenarios that replace the base list
    assert sum(bool(platforms(p)) for p in CONFIGS[1:]) >= 3
