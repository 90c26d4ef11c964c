"""Download URLs that carry credentials (user:password@host, a token query) are never logged (issue 14).

Runs the download of roles/mlu_driver (tasks_from: install) and of roles/container_image (tasks_from: load)
with ansible-playbook on localhost against a URL that carries a password and a token and cannot be reached:
the run must fail with a useful message naming the redacted URL, and the secrets must appear nowhere in
its output, even at -vvv (task arguments, results, the error). A URL without a secret keeps its full form
in the error.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from kit_ansible import ansible_playbook, include_role_play

PASSWORD = "s3cretPW42"
TOKEN = "t0kenXYZ99"



def closed_port() -> int:
    """A local TCP port nothing listens on (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_playbook(tmp_path: Path, role: str, tasks_from: str, role_vars: dict) -> subprocess.CompletedProcess:
    play = include_role_play(tmp_path / "play.yml", role, role_vars, tasks_from, gather_facts=tasks_from == "main")
    return ansible_playbook(play, "-vvv")


def driver_vars(tmp_path: Path, url: str) -> dict:
    return {"mlu_driver_package_url": url, "mlu_driver_package_checksum": "sha256:" + "0" * 64,
            "mlu_driver_staging_dir": str(tmp_path / "staging"), "mlu_driver__package_extension": "deb",
            "mlu_driver__broken": []}


def image_vars(tmp_path: Path, url: str) -> dict:
    return {"container_image_name": "cla2/test", "container_image_tag": "v1", "container_image_url": url,
            "container_image_sha256": "0" * 64, "container_image_staging_dir": str(tmp_path / "staging")}


CASES = [
    ("mlu_driver", "install", driver_vars, "mlu_driver: could not get driver package"),
    # the whole role: its argument validation and every task before the download see the URL too
    ("mlu_driver", "main", driver_vars, "mlu_driver: could not get driver package"),
    ("container_image", "load", image_vars, "container_image: could not download"),
]


@pytest.mark.parametrize(("role", "tasks_from", "make_vars", "error"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_a_credentialed_url_that_fails_is_never_logged(tmp_path, role, tasks_from, make_vars, error):
    port = closed_port()
    url = f"http://cla2user:{PASSWORD}@127.0.0.1:{port}/pkg/file.deb?token={TOKEN}&x=1"
    result = run_playbook(tmp_path, role, tasks_from, make_vars(tmp_path, url))
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert PASSWORD not in out
    assert TOKEN not in out
    assert "cla2user" not in out
    assert error in out, out
    assert f"http://***@127.0.0.1:{port}/pkg/file.deb?***" in out, out
    assert not (tmp_path / "staging" / "file.deb").exists()


@pytest.mark.parametrize(("role", "tasks_from", "make_vars", "error"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_a_plain_url_that_fails_is_named_in_full(tmp_path, role, tasks_from, make_vars, error):
    port = closed_port()
    url = f"http://127.0.0.1:{port}/pkg/file.deb"
    result = run_playbook(tmp_path, role, tasks_from, make_vars(tmp_path, url))
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert f"{error} {url}" in out, out
