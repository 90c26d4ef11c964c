"""model_weights: every model and dataset is in place under the data root, matches its manifest, and
is bit-identical to its source; no staging copy is left. Sandbox and real servers alike (see
test_container_engine.py). Sources on the controller are hashed here, sources on a shared mount on
the host itself; URL sources are checked against the manifest."""

import hashlib
import json
import os

from _infra import ansible_var

KIT_FILES = {".cla2-manifest.sha256", ".cla2-stamp.json"}





def items(host):
    models = ansible_var(host, "model_weights_models", []) or []
    data_root = ansible_var(host, "model_weights_data_root", ansible_var(host, "cla2_data_root", "/data"))
    dirs = {
        "model": ansible_var(host, "model_weights_models_dir", data_root + "/models"),
        "dataset": ansible_var(host, "model_weights_datasets_dir", data_root + "/datasets"),
    }
    return [(item, "%s/%s" % (dirs[item.get("kind", "model")], item["name"])) for item in models]


def host_sums(host, folder):
    """relative path -> sha256 of the files of a folder on the host (kit files left out)."""
    with host.sudo():
        out = host.check_output("cd %s && find . -type f -printf '%%P\\0' | sort -z | xargs -0 -r sha256sum", folder)
    sums = {}
    for line in out.splitlines():
        digest, rel = line.split(None, 1)
        if rel not in KIT_FILES:
            sums[rel] = digest
    return sums


def controller_sums(folder):
    sums = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for buf in iter(lambda: fh.read(1 << 20), b""):
                    h.update(buf)
            sums[os.path.relpath(path, folder)] = h.hexdigest()
    return sums


def parse_manifest(text):
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            digest, rel = line.split(None, 1)
            out[rel.lstrip("*").removeprefix("./").strip()] = digest.lower()
    return out


def test_something_to_check(host):
    assert items(host), "model_weights_models is empty in the inventory"


def test_items_placed_verified_and_identical_to_source(host):
    problems = []
    for item, dest in items(host):
        problems += check_item(host, item, dest)
    assert not problems, "\n".join(problems)


def check_item(host, item, dest):
    with host.sudo():
        if not host.file(dest).is_directory:
            return ["%s is not placed" % dest]
        if not host.file(dest + "/.cla2-stamp.json").exists:
            return ["%s has no stamp: not placed by the kit" % dest]
        check = host.run("cd %s && sha256sum --quiet --strict -c .cla2-manifest.sha256", dest)
        stamp = json.loads(host.file(dest + "/.cla2-stamp.json").content_string)
    problems = []
    if check.rc != 0:
        problems.append("%s does not match its manifest: %s%s" % (dest, check.stdout, check.stderr))
    placed = host_sums(host, dest)
    if placed != stamp["manifest"]:
        problems.append("files of %s differ from the manifest they were placed with" % dest)

    if item.get("src"):
        src = item["src"]
        if not os.path.isabs(src):
            src = os.path.join(os.path.dirname(__file__), "..", "..", "..", "files", src)
        if not os.path.isdir(src):
            return problems  # the controller running the tests is not the one that holds the source
        source = controller_sums(src)
    elif item.get("path"):
        source = host_sums(host, item["path"])
    else:
        return problems  # URL: the manifest check above is the comparison with the source
    if item.get("manifest") or "SHA256SUMS" in source:
        source = {k: v for k, v in source.items() if k in placed}
    if placed != source:
        differ = sorted(k for k in set(placed) | set(source) if placed.get(k) != source.get(k))
        problems.append("%s is not bit-identical to its source: %s" % (dest, ", ".join(differ)))
    return problems


def test_no_staging_left(host):
    parents = {os.path.dirname(dest) for _, dest in items(host)}
    with host.sudo():
        for parent in parents:
            left = host.run("ls -A %s | grep -E '[.]cla2-(partial|old)$'", parent)
            assert left.stdout == "", "staging copies left in %s: %s" % (parent, left.stdout)
