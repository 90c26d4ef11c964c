"""The model_weights role's tasks (roles/model_weights/tasks/item.yml) around the placement module, run by
ansible-playbook on 127.0.0.1: an item's manifest file that is empty is refused (not replaced by a manifest
the kit computes), and a URL that carries credentials is neither printed nor logged (its tasks are
no_log; the module's masked message is shown instead).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import threading
from pathlib import Path

import yaml
from kit_ansible import ansible_playbook

SECRET = "Pa55-w0rd-role"


def run_role(tmp_path: Path, items: list, verbosity: int = 0) -> subprocess.CompletedProcess:
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False,
        "vars": {"model_weights_models": items, "model_weights_models_dir": str(tmp_path / "models"),
                 "model_weights_datasets_dir": str(tmp_path / "datasets"), "model_weights_convert": "never"},
        "roles": ["model_weights"]}], sort_keys=False))
    return ansible_playbook(play, *(["-" + "v" * verbosity] if verbosity else []), inventory="127.0.0.1,")


def make_model(folder: Path) -> str:
    """A two-file model folder; returns its manifest text."""
    folder.mkdir(parents=True)
    lines = []
    for name, data in (("config.json", b'{"model_type": "llama"}\n'), ("model.safetensors", os.urandom(50_000))):
        (folder / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    return "".join(lines)


class Mirror:
    """Static files of `root` over HTTP on 127.0.0.1 (GET, HEAD)."""

    def __init__(self, root: Path):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_empty_manifest_file_of_an_item_is_refused(tmp_path):
    make_model(tmp_path / "share" / "m")
    (tmp_path / "m.sha256").write_text("")
    res = run_role(tmp_path, [{"name": "m", "path": str(tmp_path / "share" / "m"),
                               "manifest": str(tmp_path / "m.sha256")}])
    assert res.returncode != 0, res.stdout[-3000:]
    assert f"manifest {tmp_path / 'm.sha256'} lists no file" in res.stdout, res.stdout[-3000:]
    assert not (tmp_path / "models" / "m").exists()


def test_url_with_credentials_is_not_printed_and_failures_still_say_why(tmp_path):
    manifest = make_model(tmp_path / "mirror" / "m" / "files")
    (tmp_path / "mirror" / "m" / "SHA256SUMS").write_text(manifest.replace("  ", "  files/"))
    with Mirror(tmp_path / "mirror") as mirror:
        good = {"name": "m", "url": f"http://deploy:{SECRET}@{mirror.host}/m/"}
        res = run_role(tmp_path, [good], verbosity=3)
        assert res.returncode == 0, res.stdout[-3000:]
        assert SECRET not in res.stdout + res.stderr
        assert "the output has been hidden" in res.stdout  # the tasks that pass the URL are no_log
        assert (tmp_path / "models" / "m" / "files" / "model.safetensors").is_file()
        bad = {"name": "x", "url": f"http://deploy:{SECRET}@{mirror.host}/nothing-here/"}
        res = run_role(tmp_path, [bad], verbosity=1)
        assert res.returncode != 0
        assert SECRET not in res.stdout + res.stderr
        assert f"needs a manifest: none given and http://***@{mirror.host}/nothing-here/SHA256SUMS" in res.stdout, \
            res.stdout[-3000:]


def test_controller_source_with_its_manifest_file_is_placed_and_stays_current(tmp_path):
    """The staged (rsync) flow with an item's manifest file: placed, then a re-run changes nothing."""
    manifest = make_model(tmp_path / "files" / "c")
    (tmp_path / "c.sha256").write_text("# the controller's manifest\n" + manifest)
    items = [{"name": "c", "src": str(tmp_path / "files" / "c"), "manifest": str(tmp_path / "c.sha256")}]
    res = run_role(tmp_path, items)
    assert res.returncode == 0, res.stdout[-3000:]
    assert (tmp_path / "models" / "c" / ".cla2-manifest.sha256").read_text() == manifest
    res = run_role(tmp_path, items)
    assert res.returncode == 0 and "changed=0" in res.stdout, res.stdout[-3000:]
