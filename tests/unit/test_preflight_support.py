"""The preflight role's support gate (plugins/filter/preflight.py, preflight_os_support and
preflight_probe; roles/preflight/files/cla2_probe.sh): every case of the support matrix
(roles/preflight/vars/support_matrix.yml) and every refusal message, on fake os-release files and fake
interpreters, without such hosts. docs/support.md's table must be the matrix's, row for row.

ansible-core 2.19 runs modules with Python 3.8 or newer only (module_utils/basic.py, _PY_MIN = (3, 8)).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "preflight"
PLUGIN = ROOT / "plugins" / "filter" / "preflight.py"
PROBE = ROLE / "files" / "cla2_probe.sh"
MATRIX_FILE = ROLE / "vars" / "support_matrix.yml"
DOC = ROOT / "docs" / "support.md"


def load_plugin():
    spec = importlib.util.spec_from_file_location("preflight_filters_support", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pf = load_plugin()
MATRIX = yaml.safe_load(MATRIX_FILE.read_text())["preflight__support_matrix"]
BY_NAME = {e["name"]: e for e in MATRIX}


def os_release(os_id: str, version: str, pretty: str = "", like: str = "") -> dict:
    info = {"ID": os_id, "VERSION_ID": version, "PRETTY_NAME": pretty or f"{os_id} {version}"}
    if like:
        info["ID_LIKE"] = like
    return info


def decide(os_id, version, python="3.11.2", like="", **kw):
    host = {"os_release": os_release(os_id, version, like=like), "python_source": "probe"}
    host["python"] = None if python is None else {"version": python, "path": "/usr/bin/python3"}
    return pf.preflight_os_support(host, MATRIX, **kw)


def check(answer, gate):
    return next(c for c in answer["checks"] if c["gate"] == gate)


# every os-release a matrix entry is meant to match: (ID, VERSION_ID, entry name)
CASES = [
    ("debian", "12", "Debian 12 (bookworm)"),
    ("debian", "11", "Debian 11 (bullseye)"),
    ("ubuntu", "22.04", "Ubuntu 22.04 (jammy)"),
    ("ubuntu", "20.04", "Ubuntu 20.04 (focal)"),
    ("rhel", "9.4", "RHEL / Rocky Linux / AlmaLinux 9"),
    ("rocky", "9.3", "RHEL / Rocky Linux / AlmaLinux 9"),
    ("almalinux", "9.5", "RHEL / Rocky Linux / AlmaLinux 9"),
    ("kylin", "V10", "Kylin Linux Advanced Server V10"),
    ("ubuntu", "18.04", "Ubuntu 18.04 (bionic)"),
    ("debian", "10", "Debian 10 (buster)"),
    ("centos", "7", "CentOS 7 / RHEL 7"),
    ("rhel", "7.9", "CentOS 7 / RHEL 7"),
    ("centos", "8", "CentOS / RHEL / Rocky Linux / AlmaLinux 8"),
    ("rocky", "8.10", "CentOS / RHEL / Rocky Linux / AlmaLinux 8"),
    ("rhel", "8.9", "CentOS / RHEL / Rocky Linux / AlmaLinux 8"),
]


def test_every_matrix_entry_has_a_case_and_the_fields_the_docs_promise():
    assert {name for _, _, name in CASES} == set(BY_NAME)
    for e in MATRIX:
        for key in ("name", "os_release_ids", "versions", "os_family", "package_manager", "driver_package", "python",
                    "status", "tested"):
            assert e.get(key) not in (None, "", []), (e["name"], key)
        assert e["status"] in ("supported", "refused")
        assert e["tested"] in ("sandbox", "no (written only)")
        assert e["os_family"] in pf.CODE_PATH_FAMILIES
        assert e["driver_package"] == {"Debian": "deb", "RedHat": "rpm"}[e["os_family"]]
        if e["status"] == "refused":
            assert e.get("reason") and e.get("remedy"), e["name"]
    # honest: only the sandbox's Debian 12 is tested
    assert [e["name"] for e in MATRIX if e["tested"] == "sandbox"] == ["Debian 12 (bookworm)"]


def test_the_code_paths_the_matrix_claims_exist():
    for family in {e["os_family"] for e in MATRIX if e["status"] == "supported"}:
        for role in ("mlu_driver", "container_engine"):
            assert (ROOT / "roles" / role / "tasks" / f"install-{family}.yml").is_file(), (role, family)
            assert (ROOT / "roles" / role / "vars" / f"{family}.yml").is_file(), (role, family)
    for e in MATRIX:
        if e["status"] == "supported":
            assert e["package_manager"] == {"Debian": "apt", "RedHat": "dnf"}[e["os_family"]], e["name"]


def test_no_os_release_matches_two_entries():
    for os_id, version, name in CASES:
        hits = [e["name"] for e in MATRIX if pf._matches(e, os_id, version)]
        assert hits == [name], (os_id, version, hits)


@pytest.mark.parametrize(("os_id", "version", "name"), [c for c in CASES if BY_NAME[c[2]]["status"] == "supported"])
def test_a_supported_os_with_a_new_enough_python_passes(os_id, version, name):
    answer = decide(os_id, version)
    assert answer["ok"] and answer["python_usable"] and answer["manageable"]
    assert answer["entry"]["name"] == name
    assert all(c["ok"] for c in answer["checks"])
    entry = BY_NAME[name]
    assert answer["summary"] == (
        f"{name} ({entry['package_manager']}, {entry['driver_package']} driver, tested: {entry['tested']})"
    )
    if entry["tested"] == "sandbox":
        assert answer["notes"] == []
    else:
        note = (
            f"{name} is in the support matrix but tested: no (written only): the kit's "
            f"{entry['package_manager']}/{entry['driver_package']} code path has not been run on it (docs/support.md)"
        )
        assert answer["notes"] == [note]


@pytest.mark.parametrize(("os_id", "version", "name"), [c for c in CASES if BY_NAME[c[2]]["status"] == "refused"])
@pytest.mark.parametrize("ignore_os", [False, True], ids=["plain", "ignore_os"])
def test_a_refused_os_is_refused_with_its_reason_and_remedy_and_no_override(os_id, version, name, ignore_os):
    entry = BY_NAME[name]
    answer = decide(os_id, version, ignore_os=ignore_os)
    assert not answer["ok"] and not answer["manageable"]
    gate = check(answer, "os")
    assert not gate["ok"] and not gate["ignored"]
    assert gate["message"].startswith(f"{os_id} {version} (os-release ID {os_id}, VERSION_ID {version}) is {name}, "
                                      "which this kit cannot manage: ")
    assert " ".join(entry["reason"].split()) in " ".join(gate["message"].split())
    remedy = " ".join(entry["remedy"].split()).rstrip(".")
    assert f"{entry['reason'].split()[-1]}. {remedy[:1].upper()}{remedy[1:]}. See docs/support.md" in " ".join(
        gate["message"].split()
    )
    assert gate["message"].endswith("See docs/support.md; no override (the roles would fail half way)")


def test_refusal_messages_name_the_concrete_problem():
    msg = {name: check(decide(i, v), "os")["message"] for i, v, name in CASES if BY_NAME[name]["status"] == "refused"}
    assert "yum but no dnf" in msg["CentOS 7 / RHEL 7"] and "end of life in June 2024" in msg["CentOS 7 / RHEL 7"]
    assert "python3 is 3.6" in msg["Ubuntu 18.04 (bionic)"] and "Ubuntu 22.04 or 20.04" in msg["Ubuntu 18.04 (bionic)"]
    assert "python3 is 3.7" in msg["Debian 10 (buster)"] and "Debian 12 or 11" in msg["Debian 10 (buster)"]
    el8 = msg["CentOS / RHEL / Rocky Linux / AlmaLinux 8"]
    assert "python3-dnf" in el8 and "ansible/ansible#83357" in el8 and "Upgrade the host to EL 9" in el8


@pytest.mark.parametrize("python", ["3.6.9", "3.7.17", "2.7.5"])
@pytest.mark.parametrize("ignore_python", [False, True], ids=["plain", "ignore_python"])
def test_a_python_older_than_ansible_cores_floor_is_unusable_and_has_no_override(python, ignore_python):
    answer = decide("ubuntu", "22.04", python=python, ignore_python=ignore_python)
    assert not answer["python_usable"] and not answer["ok"] and not answer["manageable"]
    gate = check(answer, "python")
    assert not gate["ok"] and not gate["ignored"]
    assert gate["message"] == (
        f"target Python {python} (/usr/bin/python3) is older than 3.8, the oldest Python ansible-core 2.19 runs "
        "modules with (fact gathering and every module fail on it): install Python 3.8 or newer on the host and "
        "point ansible_python_interpreter at it (its package manager's Python bindings must exist for that "
        "Python), or use a supported OS. No override"
    )
    assert check(answer, "os")["ok"]


def test_ubuntu_1804_with_its_python_36_gets_both_problems_and_the_os_remedy():
    answer = decide("ubuntu", "18.04", python="3.6.9")
    assert not answer["python_usable"]
    assert [c["gate"] for c in answer["checks"] if not c["ok"]] == ["os", "python"]
    assert "upgrade the host to Ubuntu 22.04 or 20.04" in check(answer, "python")["message"]
    failure = pf.preflight_support_failure(answer, "mlu-07")
    assert failure.startswith("preflight refused mlu-07 before gathering facts, nothing was changed: 2 problem(s): [1] ")
    assert "[2] target Python 3.6.9 (/usr/bin/python3) is older than 3.8" in failure


def test_no_python_at_all_is_refused():
    host = {"os_release": os_release("debian", "12"), "python": None,
            "python_tried": ["/usr/bin/python3"]}
    answer = pf.preflight_os_support(host, MATRIX)
    assert not answer["python_usable"]
    assert check(answer, "python")["message"].startswith(
        "no Python interpreter found on the target (tried /usr/bin/python3): ansible-core 2.19 needs Python 3.8 "
        "or newer there to run any module: "
    )


def test_a_python_that_does_not_say_its_version_is_refused():
    answer = decide("debian", "12", python="unknown")
    assert not answer["python_usable"]
    assert check(answer, "python")["message"].startswith(
        "the target's Python /usr/bin/python3 did not say its version (unknown)"
    )


def test_a_raised_minimum_python_is_a_site_rule_with_an_override():
    answer = decide("ubuntu", "20.04", python="3.8.10", min_python="3.10")
    gate = check(answer, "python")
    assert answer["python_usable"] and not answer["ok"]
    assert gate["message"] == (
        "target Python 3.8.10 (/usr/bin/python3) is older than 3.10 (preflight_min_python_version, override "
        "preflight_ignore_python)"
    )
    overridden = decide("ubuntu", "20.04", python="3.8.10", min_python="3.10", ignore_python=True)
    assert overridden["ok"] and check(overridden, "python")["ignored"]
    assert decide("ubuntu", "20.04", python="3.8.10", min_python="3.8")["ok"]


@pytest.mark.parametrize(("os_id", "version", "like", "family"), [
    ("debian", "13", "", "Debian"),
    ("ubuntu", "24.04", "debian", "Debian"),
    ("linuxmint", "21.3", "ubuntu debian", "Debian"),
    ("centos", "9", "rhel fedora", "RedHat"),
    ("openEuler", "22.03", "", ""),
])
def test_an_os_the_matrix_does_not_name(os_id, version, like, family):
    answer = decide(os_id, version, like=like)
    gate = check(answer, "os")
    assert not gate["ok"] and not answer["ok"] and answer["entry"] is None
    assert answer["summary"] == f"{os_id} {version} (os-release ID {os_id.lower()}, VERSION_ID {version}) (not in the support matrix)"
    overridden = decide(os_id, version, like=like, ignore_os=True)
    if family:
        # a family the roles have a code path for: refused unless preflight_ignore_os, then a loud warning
        assert gate["message"].startswith(f"UNSUPPORTED OS: {os_id} {version} (os-release ID {os_id}, VERSION_ID "
                                          f"{version}) is not in the support matrix")
        assert f"code path for its {family} family but nobody has checked this release" in gate["message"]
        assert "Supported: Debian 12 (bookworm), Debian 11 (bullseye), Ubuntu 22.04 (jammy)" in gate["message"]
        assert gate["message"].endswith("set preflight_ignore_os: true to run anyway (override preflight_ignore_os)")
        assert overridden["ok"] and overridden["manageable"] and check(overridden, "os")["ignored"]
    else:
        assert "the roles have no code path for its family (unknown)" in gate["message"]
        assert "apt (Debian family) or dnf (RedHat family) only" in gate["message"]
        assert gate["message"].endswith("no override")
        assert not overridden["ok"] and not check(overridden, "os")["ignored"]


def test_no_os_release_is_refused_without_override():
    host = {"os_release": {}, "os_release_path": "", "python": {"version": "3.11.2", "path": "/usr/bin/python3"}}
    answer = pf.preflight_os_support(host, MATRIX, ignore_os=True)
    gate = check(answer, "os")
    assert not answer["ok"] and not gate["ignored"]
    assert gate["message"].startswith("cannot tell which OS this is: no /etc/os-release")


def test_facts_stand_in_when_there_is_no_os_release():
    host = {"os_release": {}, "facts": {"distribution": "Debian", "distribution_version": "12", "os_family": "Debian"},
            "python": {"version": "3.11.2", "path": "/usr/bin/python3"}}
    answer = pf.preflight_os_support(host, MATRIX)
    assert answer["ok"] and answer["entry"]["name"] == "Debian 12 (bookworm)"


def test_os_release_parsing():
    text = 'PRETTY_NAME="CentOS Linux 7 (Core)"\nNAME="CentOS Linux"\nID="centos"\nID_LIKE="rhel fedora"\n' \
           'VERSION_ID="7"\n# comment\n\nANSI_COLOR=\'0;31\'\n'
    info = pf.preflight_os_release(text)
    assert info == {"PRETTY_NAME": "CentOS Linux 7 (Core)", "NAME": "CentOS Linux", "ID": "centos",
                    "ID_LIKE": "rhel fedora", "VERSION_ID": "7", "ANSI_COLOR": "0;31"}


# ---- the probe script itself, on fake files ----------------------------------------------------------------


def fake_python(folder: Path, name: str, version: str) -> Path:
    """An executable that answers the probe's version question like a Python of that version would."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\nprintf '%s' '{version}'\n")
    path.chmod(0o755)
    return path


def run_probe(tmp_path: Path, release_text: str | None, pythons: list[str], path_dirs: list[Path] = ()) -> dict:
    env = {"PATH": os.pathsep.join([str(p) for p in path_dirs] + ["/usr/bin", "/bin"]), "CLA2_PYTHONS": " ".join(pythons)}
    release = tmp_path / "os-release"
    if release_text is not None:
        release.write_text(release_text)
    env["CLA2_OS_RELEASE"] = str(release)
    out = subprocess.run(["sh", str(PROBE)], env=env, capture_output=True, text=True, check=True).stdout
    return pf.preflight_probe(out)


UBUNTU_1804 = 'NAME="Ubuntu"\nVERSION="18.04.6 LTS (Bionic Beaver)"\nID=ubuntu\nID_LIKE=debian\n' \
              'PRETTY_NAME="Ubuntu 18.04.6 LTS"\nVERSION_ID="18.04"\n'


def test_probe_reads_os_release_and_the_first_interpreter_discovery_would_take(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_python(bin_dir, "python3.8", "3.8.0")
    fake_python(bin_dir, "python3", "3.6.9")
    probe = run_probe(tmp_path, UBUNTU_1804, ["python3.13", "python3.8", "python3"], [bin_dir])
    assert probe["complete"] and probe["os_release"]["ID"] == "ubuntu" and probe["os_release"]["VERSION_ID"] == "18.04"
    assert [(p["name"], p["version"]) for p in probe["pythons"]] == [("python3.8", "3.8.0"), ("python3", "3.6.9")]
    assert probe["pythons"][0]["path"] == str(bin_dir / "python3.8")
    # a new enough python3.8 does not save Ubuntu 18.04: its apt bindings are 3.6 only
    answer = pf.preflight_os_support({"os_release": probe["os_release"], "python": probe["pythons"][0]}, MATRIX)
    assert answer["python_usable"] and not answer["ok"] and "python3-apt" in check(answer, "os")["message"]


def test_probe_with_an_old_python_only_refuses_before_facts(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_python(bin_dir, "python3", "3.6.9")
    probe = run_probe(tmp_path, UBUNTU_1804, ["python3.99", "python3"], [bin_dir])
    answer = pf.preflight_os_support({"os_release": probe["os_release"], "python": probe["pythons"][0]}, MATRIX)
    assert not answer["python_usable"]
    assert "target Python 3.6.9" in pf.preflight_support_failure(answer, "h")


def test_probe_without_os_release_or_python(tmp_path):
    probe = run_probe(tmp_path, None, ["/nonexistent/python3"])
    assert probe["complete"] and probe["os_release"] == {} and probe["pythons"] == []
    answer = pf.preflight_os_support({"os_release": probe["os_release"], "python": None,
                                      "python_tried": ["/nonexistent/python3"]}, MATRIX)
    assert [c["gate"] for c in answer["checks"] if not c["ok"]] == ["os", "python"]


def test_probe_on_this_machine_finds_a_real_python():
    out = subprocess.run(["sh", str(PROBE)], env={"PATH": "/usr/bin:/bin", "CLA2_PYTHONS": "python3"},
                         capture_output=True, text=True, check=True).stdout
    probe = pf.preflight_probe(out)
    assert probe["complete"] and probe["pythons"] and pf._version_tuple(probe["pythons"][0]["version"]) >= (3, 8)


# ---- docs/support.md is the matrix ------------------------------------------------------------------------


def doc_table(name: str) -> str:
    """The generated table of docs/support.md between its <!-- NAME:start --> and <!-- NAME:end --> markers."""
    text = DOC.read_text()
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    assert start in text and end in text, f"docs/support.md lost its {name} table markers"
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def test_docs_support_table_is_the_matrix():
    table = doc_table("support-matrix")
    assert table == pf.preflight_support_table(MATRIX), (
        "docs/support.md's table differs from roles/preflight/vars/support_matrix.yml: regenerate it with "
        "python3 plugins/filter/preflight.py --support-table"
    )


def test_preflight_readme_links_the_support_doc():
    assert "docs/support.md" in (ROLE / "README.md").read_text()


def test_refused_means_no_override_can_help():
    assert decide("centos", "7")["refused"]
    assert decide("debian", "12", python="3.6.9")["refused"]
    assert not decide("debian", "13")["refused"] and not decide("debian", "13")["ok"]
    assert not decide("debian", "12")["refused"]
    assert not decide("ubuntu", "20.04", python="3.8.10", min_python="3.10")["refused"]
