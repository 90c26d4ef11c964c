"""Failure paths of container_image and model_weights: every bad input fails with a clear error and
leaves nothing half done. CASES is the table (role, variables, expected error, what must be unchanged);
the tests after it are the good runs the failure cases are measured against (resume, .bin conversion).

Runs in molecule's verify only: each case is one ansible-playbook run against the scenario's host
(molecule/resources/failure_cases.py), on the host converge.yml set up (docker, the shared mount, the
stand-in .bin models).
"""

from __future__ import annotations

import pytest
from failure_cases import Case, passed, run_case

IMAGE = "yellow.hub.cambricon.com/pytorch/pytorch"
FIXTURES = "{{ cla2_sandbox_fixtures }}"
GOOD_MANIFEST = f"{FIXTURES}/weights/tiny-llama.sha256"
GOOD_COPIES = ("from-controller", "from-share")


def docker_images(host) -> list[str]:
    """Every image id, dangling ones too: a failed load must leave exactly these."""
    return sorted(host.check_output("docker images -a -q --no-trunc").split())


def good_copies_untouched(host, _outcome) -> None:
    """The copies placed before a bad new version still match their manifest, and no staging folder of
    the bad copy is left."""
    for name in GOOD_COPIES:
        res = host.run(f"cd /data/models/{name} && sha256sum --quiet -c /srv/share/tiny-llama.sha256")
        assert res.rc == 0, f"{name} damaged: {res.stdout}{res.stderr}"
    leftovers = host.check_output(r"find /data/models -maxdepth 1 \( -name '*.cla2-partial' -o -name '*.cla2-old' \)")
    assert not leftovers, f"left behind: {leftovers}"


@pytest.fixture(scope="module")
def good_copies(host) -> None:
    """Good copies of the model from both kinds of source, to be left untouched by a bad new version."""
    passed("model_weights", {"model_weights_models": [
        {"name": "from-controller", "src": f"{FIXTURES}/weights/tiny-llama", "manifest": GOOD_MANIFEST},
        {"name": "from-share", "path": "/srv/share/tiny-llama", "manifest": GOOD_MANIFEST}]})


CASES = [
    Case("corrupt_image", "container_image",
         {"container_image_name": IMAGE, "container_image_tag": "cla2-corrupt",
          "container_image_tarball": f"{FIXTURES}/image/pytorch-sandbox-corrupt.tar"},
         expect=["pytorch-sandbox-corrupt.tar", "nothing was left loaded"],
         same=docker_images, absent=["/data/.staging/container_image/pytorch-sandbox-corrupt.tar"]),
    Case("wrong_tag_image", "container_image",
         {"container_image_name": IMAGE, "container_image_tag": "not-in-this-archive",
          "container_image_tarball": f"{FIXTURES}/image/pytorch-sandbox-tiny.tar.gz"},
         expect=["pytorch-sandbox-tiny.tar.gz", "cla2-sandbox-tiny"], same=docker_images),
    Case("bad_checksum_controller", "model_weights",
         {"model_weights_models": [{"name": "from-controller", "src": f"{FIXTURES}/weights/tiny-llama-v2",
                                    "manifest": f"{FIXTURES}/weights/tiny-llama-v2.bad.sha256"}]},
         expect=["checksum mismatch", "model-00002-of-00002.safetensors", "is untouched"],
         needs=["good_copies"], check=good_copies_untouched),
    Case("bad_checksum_shared", "model_weights",
         {"model_weights_models": [{"name": "from-share", "path": "/srv/share/tiny-llama-v2",
                                    "manifest": f"{FIXTURES}/weights/tiny-llama-v2.bad.sha256"}]},
         expect=["checksum mismatch", "model-00002-of-00002.safetensors"],
         needs=["good_copies"], check=good_copies_untouched),
    Case("unsafe_pickle", "model_weights",
         {"model_weights_models": [{"name": "evil-bin", "path": "/srv/share/bin/evil-bin", "convert": True}]},
         expect=["not plain tensors: refusing to load", "pytorch_model.bin", "system"],
         absent=["/srv/share/bin/pwned"]),
    Case("misspelt_variable", "container_image",
         {"container_image_name": IMAGE, "container_image_tag": "cla2-sandbox-tiny",
          "container_image_tarbal": f"{FIXTURES}/image/pytorch-sandbox-tiny.tar.gz"},
         expect=["container_image_tarbal"], same=docker_images),
    Case("mistyped_variable", "model_weights", {"model_weights_verify": "ful"}, expect=["model_weights_verify"]),
    Case("misspelt_item_key", "model_weights",
         {"model_weights_models": [{"name": "typo", "source": f"{FIXTURES}/weights/tiny-llama"}]},
         expect=["source"], absent=["/data/models/typo"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_and_changes_nothing(case: Case, host, request) -> None:
    run_case(case, host, request)


def test_interrupted_copy_resumes_where_it_stopped(host) -> None:
    """Half of a shard in staging, as an interrupted copy leaves it, is continued, not started over."""
    host.check_output(
        "rm -rf /data/models/resumed && mkdir -p /data/models/.resumed.cla2-partial && "
        "head -c 1572864 /srv/share/tiny-llama/model-00001-of-00002.safetensors"
        " > /data/models/.resumed.cla2-partial/model-00001-of-00002.safetensors")
    placed = passed("model_weights", {"model_weights_models": [
        {"name": "resumed", "path": "/srv/share/tiny-llama", "manifest": GOOD_MANIFEST}]},
        facts=["model_weights__placed"])["model_weights__placed"]
    assert placed["bytes_resumed"] == 1572864 and placed["changed"], placed
    res = host.run("cd /data/models/resumed && sha256sum --quiet -c /srv/share/tiny-llama.sha256")
    assert res.rc == 0, res.stdout + res.stderr


def test_bin_model_is_converted_once(host) -> None:
    """A PyTorch .bin model asking to be converted is turned into safetensors holding the same tensors,
    and a second run neither places nor converts it again (the safetensors are not taken for damage)."""
    item = {"model_weights_models": [{"name": "hfl-bin", "path": "/srv/share/bin/hfl-bin", "convert": True}]}
    host.check_output("rm -rf /data/models/hfl-bin")
    converted = passed("model_weights", item, facts=["model_weights__converted"])["model_weights__converted"]
    assert converted["changed"], converted
    assert sorted(converted["outputs"]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                            "model.safetensors.index.json"], converted
    res = host.run("cd /data/models/hfl-bin && sha256sum --quiet -c /srv/share/bin/hfl-bin.expected.sha256")
    assert res.rc == 0, res.stdout + res.stderr
    again = passed("model_weights", item, facts=["model_weights__query", "model_weights__converted"])
    assert again["model_weights__query"]["up_to_date"], again["model_weights__query"]["reason"]
    assert not again["model_weights__converted"]["changed"], again["model_weights__converted"]
