"""container_image: the expected repo:tag is in the docker store, nothing half loaded, no archive left
on the data disk. Sandbox and real servers alike (see test_container_engine.py)."""

import pytest
from _infra import ansible_var


@pytest.fixture(scope="module")
def image_ref(host):
    name = ansible_var(host, "container_image_name")
    tag = ansible_var(host, "container_image_tag")
    assert name and tag, "container_image_name and container_image_tag must be set in the inventory"
    return "%s:%s" % (name, tag)


def test_image_present(host, image_ref):
    with host.sudo():
        out = host.run("docker image inspect --format '{{json .RepoTags}}' %s", image_ref)
    assert out.rc == 0, "%s is not in the docker store: %s" % (image_ref, out.stderr)
    assert image_ref in out.stdout


def test_no_dangling_image(host):
    with host.sudo():
        dangling = host.check_output("docker images --filter dangling=true --quiet")
    assert dangling == "", "dangling images left: %s" % dangling


def test_staged_archive_removed(host):
    data_root = ansible_var(host, "cla2_data_root", "/data")
    staging = ansible_var(host, "container_image_staging_dir", data_root + "/.staging/container_image")
    if ansible_var(host, "container_image_keep_archive", False):
        pytest.skip("container_image_keep_archive is set")
    with host.sudo():
        d = host.file(staging)
        leftovers = host.check_output("ls -A %s", staging) if d.exists else ""
    assert leftovers == "", "archive left in %s: %s" % (staging, leftovers)
