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


def test_some_config_declares_platforms():
    # the guard above must look at something: the base config and the scenario that replaces its list
    assert platforms(CONFIGS[0])
    assert sum(bool(platforms(p)) for p in CONFIGS[1:]) >= 1


def test_the_sandbox_host_is_defined_once():
    # the base config's host serves every one-host scenario; a scenario with more hosts lists copies of it
    # (molecule replaces lists), which differ from it in their name and host name only
    base = platforms(CONFIGS[0])
    assert len(base) == 1
    expected = {k: v for k, v in base[0].items() if k not in ("name", "hostname")}
    assert "${MOLECULE_SCENARIO_NAME}" in base[0]["name"]
    for path in CONFIGS[1:]:
        for platform in platforms(path):
            got = {k: v for k, v in platform.items() if k not in ("name", "hostname")}
            assert got == expected, f"{path.relative_to(ROOT)}: platform {platform['name']} differs from the base host"
