"""container_engine's prune_images entry point, the one place the cla2_runtime and inference_service roles remove
the images of earlier runtime wheels (issue 16: it was a shell copied into both).

Runs the entry point with ansible-playbook on localhost against this machine's docker: of four tagged images
of one repository it keeps the one named, and one that a container still uses; the others go. Images of
another repository are not touched. A second run changes nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from kit_ansible import ansible_playbook, include_role_play


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=120)


def docker_works() -> bool:
    return shutil.which("docker") is not None and docker("info", check=False).returncode == 0


@pytest.fixture
def repo(tmp_path):
    """A repository of four images of one file each (docker import of a tiny archive: no registry), and
    an image of another repository."""
    name = f"cla2-prune-test-{uuid.uuid4().hex[:8]}"
    other = f"{name}-other"
    for ref in [f"{name}:{t}" for t in "abcd"] + [f"{other}:x"]:
        (tmp_path / "tag").write_text(ref)
        archive = subprocess.run(["tar", "-c", "-C", str(tmp_path), "tag"], capture_output=True, check=True).stdout
        subprocess.run(["docker", "import", "-", ref], input=archive, capture_output=True, check=True, timeout=120)
    container = docker("create", "--name", name, f"{name}:d", "/none").stdout.strip()
    yield name, other
    docker("rm", "-f", container, check=False)
    for ref in [f"{name}:{t}" for t in "abcd"] + [f"{other}:x"]:
        docker("image", "rm", "-f", ref, check=False)


def prune(tmp_path: Path, repo: str, keep: str | None) -> subprocess.CompletedProcess:
    role_vars = {"container_engine_prune_repo": repo}
    if keep is not None:
        role_vars["container_engine_prune_keep"] = keep
    return ansible_playbook(include_role_play(tmp_path / "play.yml", "container_engine", role_vars, "prune_images"))


def tags(repo: str) -> set[str]:
    out = docker("image", "ls", "--format", "{{.Tag}}", repo).stdout.split()
    return set(out)


@pytest.mark.skipif(not docker_works(), reason="needs a running docker (CI starts one)")
def test_prune_keeps_the_named_image_and_one_in_use_and_removes_the_rest(tmp_path, repo):
    name, other = repo
    first = prune(tmp_path, name, f"{name}:b")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "changed=1" in first.stdout
    assert tags(name) == {"b", "d"}  # b: kept; d: a container uses it
    assert tags(other) == {"x"}

    again = prune(tmp_path, name, f"{name}:b")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "changed=0" in again.stdout
    assert tags(name) == {"b", "d"}


def test_prune_refuses_a_call_without_what_to_keep(tmp_path):
    """The entry point's argument spec: without container_engine_prune_keep it would remove every tag."""
    result = prune(tmp_path, "cla2-prune-test-none", None)
    assert result.returncode != 0
    assert "container_engine_prune_keep" in result.stdout
