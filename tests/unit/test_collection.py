"""The kit is the cla2.mlu collection (issue 16): `ansible-galaxy collection build` works and leaves out the
machinery, the installed collection answers `ansible-doc` for every module and role, every role's
argument specs show the defaults of its defaults/main.yml, and every role README has an example playbook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

KIT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLES = sorted(p.parent.parent.name for p in KIT.glob("roles/*/meta/argument_specs.yml"))
MODULES = sorted(p.stem for p in (KIT / "plugins" / "modules").glob("*.py"))
FILTERS = sorted(p.stem for p in (KIT / "plugins" / "filter").glob("*.py"))


def run(*cmd: str, cwd: Path = KIT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=cwd, env={**os.environ, "ANSIBLE_NOCOLOR": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The collection built from the kit and installed into a folder of its own: (tarball, collections path)."""
    tmp = tmp_path_factory.mktemp("collection")
    res = run("ansible-galaxy", "collection", "build", "--output-path", str(tmp / "dist"))
    assert res.returncode == 0, res.stdout + res.stderr
    tarball = next((tmp / "dist").glob("cla2-mlu-*.tar.gz"))
    # --force: a copy of cla2.mlu found elsewhere (~/.ansible/collections) must not make the install a no-op
    res = run("ansible-galaxy", "collection", "install", "--no-deps", "--force", "-p", str(tmp / "installed"),
              str(tarball), cwd=tmp, env={"ANSIBLE_COLLECTIONS_PATH": str(tmp / "installed")})
    assert res.returncode == 0, res.stdout + res.stderr
    return tarball, tmp / "installed"


def doc(installed, kind: str, name: str) -> subprocess.CompletedProcess:
    # the installed copy only: no kit ansible.cfg (whose collections/ link would be found first)
    cfg = installed[1] / "ansible.cfg"
    cfg.write_text("[defaults]\n")
    env = {"ANSIBLE_CONFIG": str(cfg), "ANSIBLE_COLLECTIONS_PATH": str(installed[1])}
    return run("ansible-doc", "--json", "-t", kind, f"cla2.mlu.{name}", cwd=installed[1], env=env)


def test_the_build_leaves_out_the_link_back_caches_and_artifacts(installed):
    with tarfile.open(installed[0]) as tar:
        names = tar.getnames()
        link = tar.getmember("plugins/module_utils/cla2_torchbin.py")
    assert "galaxy.yml" not in names and "MANIFEST.json" in names
    for bad in ("collections/", ".venv", ".cache/", "__pycache__", ".pytest_cache", "runtime/build/", ".git/"):
        assert not [n for n in names if bad in n + "/"], bad
    for need in ("roles/preflight/meta/argument_specs.yml", "plugins/modules/cla2_weights.py",
                 "plugins/action/known_vars.py", "runtime/src/cla2/torchbin.py", "requirements.yml"):
        assert need in names, need
    # one copy of the converter: the module_utils is a link to the runtime's file, kept as a link
    assert link.issym() and link.linkname == "../../runtime/src/cla2/torchbin.py"


def test_the_installed_link_reaches_the_runtime_file(installed):
    path = installed[1] / "ansible_collections" / "cla2" / "mlu" / "plugins" / "module_utils" / "cla2_torchbin.py"
    assert path.resolve().read_text() == (KIT / "runtime" / "src" / "cla2" / "torchbin.py").read_text()


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_on_every_module(installed, module):
    res = doc(installed, "module", module)
    assert res.returncode == 0 and not res.stderr.strip(), res.stdout + res.stderr
    spec = json.loads(res.stdout)[f"cla2.mlu.{module}"]["doc"]
    for name, option in (spec.get("options") or {}).items():
        assert option.get("description"), f"{module}: option {name} has no description"


@pytest.mark.parametrize("role", ROLES)
def test_ansible_doc_on_every_role(installed, role):
    res = doc(installed, "role", role)
    assert res.returncode == 0 and not res.stderr.strip(), res.stdout + res.stderr
    assert json.loads(res.stdout)[f"cla2.mlu.{role}"]["entry_points"]["main"]["options"]


def test_ansible_doc_on_the_redaction_filter(installed):
    res = doc(installed, "filter", "redact_url")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("role", ROLES)
def test_argument_spec_defaults_are_the_role_defaults(role):
    """ansible-doc shows what defaults/main.yml sets, never `default: null` for a variable that has one."""
    specs = yaml.safe_load((KIT / "roles" / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    defaults = yaml.safe_load((KIT / "roles" / role / "defaults" / "main.yml").read_text()) or {}
    for entry in specs.values():
        for name, option in (entry.get("options") or {}).items():
            if name in defaults and not option.get("required"):
                assert "default" in option, f"{role}: {name} has no default in its argument spec"
                value = defaults[name]
                if isinstance(value, str) and "{{" in value:
                    continue  # a template: the spec may show what it usually resolves to (/data/docker)
                if isinstance(option["default"], int) and isinstance(value, str):
                    value = int(value, 0)  # preflight_pci_vendor_id: 0xcabc
                assert option["default"] == value, f"{role}: {name}: spec and defaults/main.yml differ"


@pytest.mark.parametrize("role", ROLES)
def test_every_role_readme_has_an_example_playbook(role):
    text = (KIT / "roles" / role / "README.md").read_text()
    assert "## Example playbook" in text
    example = text.split("## Example playbook", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    play = yaml.safe_load(example)
    assert play[0]["roles"][0]["role"] == f"cla2.mlu.{role}"


def test_requirements_name_every_collection_the_roles_call():
    used = set()
    for path in list(KIT.glob("roles/*/tasks/*.yml")) + list(KIT.glob("roles/*/handlers/*.yml")):
        for word in path.read_text().split():
            parts = word.rstrip(":").split(".")
            if len(parts) == 3 and parts[0] in ("community", "ansible", "containers") and parts[1] not in (
                    "builtin", "legacy"):
                used.add(".".join(parts[:2]))
    required = {c["name"] for c in yaml.safe_load((KIT / "requirements.yml").read_text())["collections"]}
    galaxy = set(yaml.safe_load((KIT / "galaxy.yml").read_text())["dependencies"])
    assert used <= required == galaxy, (used, required, galaxy)
