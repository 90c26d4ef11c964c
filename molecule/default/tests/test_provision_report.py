"""provision.json: each provisioning run writes <reports>/<host>/provision.json on the controller (here the
scenario's ephemeral folder, molecule/default/converge.yml) and appends it to provision-history.jsonl. The
converge's report lists what it changed, per role; the idempotence run's report lists nothing."""

import json
import os
from pathlib import Path

import pytest
from _infra import ansible_var
from _play import molecule_only

KEYS = {"host", "time", "ansible_version", "versions", "devices", "changed", "ok"}


@pytest.fixture(scope="module")
def reports(host):
    molecule_only()
    return Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "reports" / host.backend.host


@pytest.fixture(scope="module")
def history(reports):
    path = reports / "provision-history.jsonl"
    assert path.exists(), f"no {path}"
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(runs) >= 2, "expected the converge and the idempotence run, found %d report(s)" % len(runs)
    return runs


def test_provision_json_has_the_summary(host, reports):
    report = json.loads((reports / "provision.json").read_text())
    assert set(report) == KEYS
    assert report["host"] == host.backend.host
    assert report["ok"] is True
    assert report["time"].endswith("Z") and "T" in report["time"]
    versions = report["versions"]
    assert versions["driver"]["package"] == ansible_var(host, "mlu_driver_version")
    image = "{}:{}".format(ansible_var(host, "container_image_name"), ansible_var(host, "container_image_tag"))
    with host.sudo():
        docker = host.check_output("docker version --format '{{.Server.Version}}'")
        image_id = host.check_output("docker image inspect --format '{{.Id}}' %s", image)
    assert versions["docker"] == docker
    assert versions["image"] == {"name": image, "id": image_id}
    # the runtime site.yml deployed after provisioning, as the cla2_runtime role recorded it on the host
    runtime = json.loads(host.file("/etc/ansible/facts.d/cla2_runtime.fact").content_string)
    assert versions["runtime"] == runtime and runtime.get("image"), versions["runtime"]
    for item in ansible_var(host, "model_weights_models"):
        entry = versions["models"][item["name"]]
        manifest = host.file(entry["path"] + "/.cla2-manifest.sha256")
        assert entry["manifest_sha256"] == manifest.sha256sum
        assert entry["bytes"] > 0
    devices = report["devices"]
    assert devices["count"] == ansible_var(host, "mlu_driver_expected_devices") == len(devices["memory_mib"])
    assert devices["kind"] and all(m and m > 0 for m in devices["memory_mib"])


def test_the_converge_report_lists_what_it_changed(history):
    converge = history[-2]
    assert converge["ok"] is True
    for role in ("mlu_driver", "container_engine", "container_image", "model_weights", "cla2_runtime"):
        assert converge["changed"].get(role), "converge changed nothing in {}: {}".format(role, converge["changed"])
    assert "Install the driver package (.deb)" in converge["changed"]["mlu_driver"]
    assert "Load the archive" in converge["changed"]["container_image"]


def test_the_idempotence_report_lists_no_change(reports, history):
    assert history[-1]["changed"] == {}
    assert history[-1]["ok"] is True
    assert json.loads((reports / "provision.json").read_text()) == history[-1]
