"""Every lock is tied to what it is made from (locks/lock.py): a declared requirement that changes without
`make lock` fails here, and every lock satisfies what its sources declare, at the versions it lists."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "locks" / "lock.py"


def load(root: Path = ROOT):
    spec = importlib.util.spec_from_file_location("lock", root / "locks" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_lock_is_made_from_what_is_declared_now():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("path", "edit"), [
    ("runtime/pyproject.toml", lambda t: t.replace('"tqdm>=4.60",', '"tqdm>=4.60",\n  "rich>=13",')),
    ("requirements.txt", lambda t: t.replace("yamllint==1.38.0", "yamllint==1.37.1")),
    ("roles/cla2_runtime/files/locks/stacks.yml", lambda t: t.replace("- numpy<2", "- numpy<1.26")),
])
def test_a_declared_requirement_changed_without_make_lock_is_named(tmp_path, path, edit):
    for part in ("locks", "roles/cla2_runtime/files", "runtime/pyproject.toml", "requirements.txt"):
        src, dst = ROOT / part, tmp_path / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    assert subprocess.run([sys.executable, str(tmp_path / "locks" / "lock.py"), "--check"],
                          capture_output=True, check=False).returncode == 0
    (tmp_path / path).write_text(edit((tmp_path / path).read_text()))
    proc = subprocess.run([sys.executable, str(tmp_path / "locks" / "lock.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "its declared inputs changed since it was made; run `make lock`" in proc.stderr
    stale = {line.split(":")[0] for line in proc.stderr.splitlines()}
    expect = {"requirements.txt": {"locks/controller.txt"},
              "runtime/pyproject.toml": {"roles/cla2_runtime/files/locks/py3.11-torch2.13.txt",
                                         "roles/cla2_runtime/files/locks/py3.10-torch2.1.txt",
                                         "locks/runtime-torch2.13.txt", "locks/runtime-torch2.1.txt"},
              "roles/cla2_runtime/files/locks/stacks.yml": {"roles/cla2_runtime/files/locks/py3.10-torch2.1.txt"}}
    assert stale == expect[path], proc.stderr


def requirements_of(source: str, extras: tuple[str, ...]) -> list[Requirement]:
    text = (ROOT / source).read_text()
    if source.endswith("pyproject.toml"):
        project = tomllib.loads(text)["project"]
        lines = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    else:
        lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return [Requirement(line) for line in lines if line]


@pytest.mark.parametrize("lock", load().locks(), ids=lambda lk: lk.name)
def test_each_lock_satisfies_what_it_declares_and_is_hashed(lock):
    lk = load()
    text = (ROOT / lock.path).read_text()
    got = lk.versions(ROOT / lock.path)
    env = {**default_environment(), "python_version": lock.python, "python_full_version": lock.python + ".0"}
    wanted = [r for s in lock.sources for r in requirements_of(s, lock.extras)]
    wanted += [Requirement(line) for line in lock.requirements]
    for req in wanted:
        if req.marker and not req.marker.evaluate(env):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in got, f"{lock.path}: {req} is not in the lock"
        assert req.specifier.contains(got[name], prereleases=True), f"{lock.path}: {name}=={got[name]} is not {req}"
    for shipped in lock.provided:
        assert shipped.split("==")[0] not in got, f"{lock.path} lists {shipped}, which the image ships"
    # every requirement is pinned with at least one hash (pip's --require-hashes)
    blocks = [b for b in text.split("\n") if b and not b.startswith((" ", "#"))]
    assert len(blocks) == len(got)
    assert text.count("==") >= len(got) and text.count("--hash=sha256:") >= len(got)


def test_make_lock_remakes_a_stale_lock_keeping_the_rest_and_lists_the_change_in_the_changelog(tmp_path):
    """locks/lock.py as `make lock` runs it, with uv, on a copy of the kit whose requirements.txt changed."""
    for part in ("locks", "roles/cla2_runtime/files", "runtime/pyproject.toml", "requirements.txt", "CHANGELOG.md"):
        src, dst = ROOT / part, tmp_path / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    req = tmp_path / "requirements.txt"
    req.write_text(req.read_text() + "six==1.17.0\n")
    before = load().versions(ROOT / "locks" / "controller.txt")
    uv = Path(sys.executable).with_name("uv")
    proc = subprocess.run([sys.executable, str(tmp_path / "locks" / "lock.py"), "--uv", str(uv)],
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "locks/controller.txt: six (new) → 1.17.0" in proc.stdout
    assert "roles/cla2_runtime/files/locks/py3.10-torch2.1.txt: current" in proc.stdout
    after = load().versions(tmp_path / "locks" / "controller.txt")
    assert after == {**before, "six": "1.17.0"}, "a remake keeps every version that still fits"
    changelog = (tmp_path / "CHANGELOG.md").read_text()
    assert "- Locks: `locks/controller.txt`: six (new) → 1.17.0." in changelog.split("\n## 0.")[0]
    assert subprocess.run([sys.executable, str(tmp_path / "locks" / "lock.py"), "--check"],
                          capture_output=True, check=False).returncode == 0
