"""container_engine: docker installed and running, the kit's keys merged into daemon.json, the
operator's keys kept. Runs on sandbox hosts (molecule verify) and unchanged on real servers:
    pytest --hosts=ansible://mlu-hosts --ansible-inventory=inventory/production molecule/default/tests
"""

import json

import pytest
from _infra import ansible_var

DAEMON_JSON = "/etc/docker/daemon.json"
# Written by molecule/default/prepare.yml with the keys daemon.json had before the kit ran.
PREEXISTING = "/etc/docker/cla2-test-preexisting.json"


@pytest.fixture(scope="module")
def daemon_json(host):
    with host.sudo():
        f = host.file(DAEMON_JSON)
        assert f.exists, "%s is missing" % DAEMON_JSON
        return json.loads(f.content_string)


def test_docker_installed_and_running(host):
    assert host.exists("docker") or host.file("/usr/bin/docker").exists
    docker = host.service("docker")
    assert docker.is_running
    assert docker.is_enabled


def test_kit_keys_merged(host, daemon_json):
    data_root = ansible_var(host, "cla2_data_root", "/data")
    expected_root = ansible_var(host, "container_engine_data_root", data_root + "/docker")
    assert daemon_json["data-root"] == expected_root
    assert daemon_json["live-restore"] is True
    assert daemon_json["log-driver"] == "json-file"
    assert daemon_json["log-opts"]["max-size"]
    assert int(daemon_json["log-opts"]["max-file"]) >= 1


def test_docker_uses_the_merged_configuration(host, daemon_json):
    with host.sudo():
        root = host.check_output("docker info --format '{{.DockerRootDir}}'")
        live = host.check_output("docker info --format '{{json .LiveRestoreEnabled}}'")
    assert root == daemon_json["data-root"]
    assert live == "true"


def test_preexisting_keys_kept(host, daemon_json):
    with host.sudo():
        before = host.file(PREEXISTING)
        if not before.exists:
            pytest.skip("no record of a daemon.json written before the kit (only the sandbox's prepare writes one)")
        kept = json.loads(before.content_string)
    for key, value in kept.items():
        assert daemon_json.get(key) == value, "daemon.json lost or changed the operator's key %r" % key
