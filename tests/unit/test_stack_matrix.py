"""The stack matrix (roles/preflight/vars/stack_matrix.yml) and the preflight_stack_support filter
(plugins/filter/preflight.py): every fact of the matrix names a public source (a URL; a repository file at a
40-hex commit) or is null with a reason, docs/support.md's image table is the matrix's row for row, and the
filter refuses a refused image, an image the matrix does not list and a driver older than the image's minimum,
naming the image's versions and what to load instead.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "plugins" / "filter" / "preflight.py"
MATRIX_FILE = ROOT / "roles" / "preflight" / "vars" / "stack_matrix.yml"
DOC = ROOT / "docs" / "support.md"
STACKS = ROOT / "roles" / "cla2_runtime" / "files" / "locks" / "stacks.yml"
EXAMPLE = ROOT / "inventory" / "production.example" / "group_vars" / "mlu-hosts" / "container_image.yml"


def load_plugin():
    spec = importlib.util.spec_from_file_location("preflight_filters_stack", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pf = load_plugin()
MATRIX = yaml.safe_load(MATRIX_FILE.read_text())["preflight__stack_matrix"]
BY_NAME = {e["name"]: e for e in MATRIX}
SUPPORTED = [e for e in MATRIX if e["status"] == "supported"]
TORCH21 = "Cambricon PyTorch, torch_mlu 1.22 on torch 2.1.0 (Python 3.10, CTR 2.15)"
V117 = "Cambricon PyTorch v1.17.0 (torch 1.13.1, Python 3.10)"
V115 = "Cambricon PyTorch v1.15.0 (torch 1.9, Python 3.7), the seed's image"
TORCH24 = "Cambricon PyTorch, torch_mlu 1.22 on torch 2.4.0 (Python 3.10, CTR 2.15)"

# a source: a URL; one into a GitHub repository must name its file at a 40-hex commit
GITHUB = re.compile(r"^https://github\.com/[^/\s]+/[^/\s]+/blob/[0-9a-f]{40}/\S+$")
URL = re.compile(r"^https://[^\s/]+\.[^\s/]+/\S*$")


def source_problem(source: object) -> str:
    """Why a source does not name where the fact comes from ('' when it does)."""
    if not isinstance(source, str) or not URL.match(source):
        return f"{source!r} is not a URL"
    if source.startswith("https://github.com/") and not GITHUB.match(source):
        return f"{source!r} names no 40-hex commit (https://github.com/<owner>/<repo>/blob/<commit>/<path>)"
    return ""


def fact_problems(entry: dict) -> list[str]:
    """Every fact of an entry is null with a reason in `unknown`, or names sources that say where it comes from."""
    problems = []
    sources, unknown = entry.get("sources") or {}, entry.get("unknown") or {}
    for extra in sorted(set(sources) - set(pf.STACK_FACTS)) + sorted(set(unknown) - set(pf.STACK_FACTS)):
        problems.append(f"{extra}: not a fact of the stack matrix")
    for fact in pf.STACK_FACTS:
        if fact not in entry:
            problems.append(f"{fact}: missing (give it, or null with a reason in unknown)")
        elif entry[fact] is None:
            if not str(unknown.get(fact) or "").strip():
                problems.append(f"{fact}: null without a reason in unknown")
            if fact in sources:
                problems.append(f"{fact}: null but has sources")
        else:
            cited = sources.get(fact)
            cited = [cited] if isinstance(cited, str) else list(cited or [])
            if not cited:
                problems.append(f"{fact}: {entry[fact]!r} has no source")
            problems += [f"{fact}: {p}" for p in map(source_problem, cited) if p]
            if fact in unknown:
                problems.append(f"{fact}: known but listed in unknown")
    return problems


# ---- the matrix -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", MATRIX, ids=[e["name"] for e in MATRIX])
def test_every_fact_names_its_source_or_is_null_with_a_reason(entry):
    assert fact_problems(entry) == []


@pytest.mark.parametrize(("change", "expected"), [
    (lambda e: e["sources"].pop("torch"), "torch: '1.13.1' has no source"),
    (lambda e: e["sources"].update(torch=["https://github.com/jklincn/cambricon-pytorch/blob/main/README.md"]),
     "names no 40-hex commit"),
    (lambda e: e["sources"].update(torch=["github.com/jklincn/cambricon-pytorch README.md"]), "is not a URL"),
    (lambda e: e["sources"].update(torch="the vendor said so"), "is not a URL"),
    (lambda e: e.update(cntoolkit=None), "cntoolkit: null without a reason in unknown"),
    (lambda e: e.pop("min_driver"), "min_driver: missing"),
    (lambda e: e["sources"].update(version=["https://example.com/x"]), "version: not a fact"),
])
def test_the_source_check_catches_a_missing_or_vague_source(change, expected):
    entry = yaml.safe_load(yaml.safe_dump(BY_NAME[V117]))
    assert fact_problems(entry) == []
    change(entry)
    assert any(expected in p for p in fact_problems(entry)), fact_problems(entry)


def test_a_source_outside_github_is_a_plain_url():
    assert source_problem("https://sdk.cambricon.com/download?component_name=PyTorch") == ""
    assert source_problem("https://github.com/Cambricon/torch_mlu/blob/" + "a" * 40 + "/README.md#L107") == ""
    assert source_problem("https://github.com/Cambricon/torch_mlu/blob/r1.22_pt2.1.0/README.md") != ""


def test_entries_have_the_fields_the_header_documents():
    header = MATRIX_FILE.read_text().split("preflight__stack_matrix:", 1)[0]
    documented = {name for line in re.findall(r"^#   ([a-z_0-9]+(?:, [a-z_0-9]+)*)  ", header, re.MULTILINE)
                  for name in line.split(", ")}
    assert documented == set(pf.STACK_FACTS) | {"name", "status", "reason", "remedy", "notes", "sources", "unknown"}
    assert documented >= {key for e in MATRIX for key in e}
    assert len(BY_NAME) == len(MATRIX)
    for e in MATRIX:
        assert e["status"] in ("supported", "refused"), e["name"]
        assert e["mlu370"] is True, e["name"]
        if e["status"] == "refused":
            assert e.get("reason") and e.get("remedy"), e["name"]
        for key in ("python", "torch", "torch_mlu", "cntoolkit", "min_driver"):
            assert e[key] is None or isinstance(e[key], str), (e["name"], key, "quote it: YAML reads 3.10 as 3.1")


def test_supported_means_the_runtime_has_a_lock_for_the_images_python_and_torch():
    stacks = yaml.safe_load(STACKS.read_text())
    locked = {(pf._release(s["python"])[:2], pf._release(s["torch"])[:2]) for s in stacks}
    for e in MATRIX:
        has_lock = (pf._release(e["python"])[:2], pf._release(e["torch"])[:2]) in locked
        runs_cla2 = pf._release(e["python"]) >= (3, 10) and pf._release(e["torch"]) >= (2, 1)
        assert (e["status"] == "supported") == (has_lock and runs_cla2), e["name"]
    assert [e["name"] for e in SUPPORTED] == [TORCH21]


def test_the_header_says_which_torch_ci_tests():
    header = MATRIX_FILE.read_text().split("preflight__stack_matrix:", 1)[0]
    makefile = (ROOT / "Makefile").read_text()
    assert "locks/runtime-torch2.13.txt" in makefile and "locks/runtime-torch2.1.txt" in makefile
    assert "torch 2.13" in header and "torch 2.1 " in header and "No Cambricon image and no MLU is tested" in header


def test_the_production_example_names_no_image_the_matrix_refuses_or_lacks():
    example = yaml.safe_load(EXAMPLE.read_text())
    assert "v1.17.0-torch2.1.0" not in EXAMPLE.read_text()
    ref = f"{example['container_image_name']}:{example['container_image_tag']}"
    entry = pf.preflight_stack_entry(MATRIX, ref)
    assert entry is None or entry["status"] == "supported", ref


# ---- docs/support.md is the matrix --------------------------------------------------------------------------


def test_docs_stack_table_is_the_matrix():
    from test_preflight_support import doc_table

    table = doc_table("stack-matrix")
    assert table == pf.preflight_stack_table(MATRIX), (
        "docs/support.md's image table differs from roles/preflight/vars/stack_matrix.yml: regenerate it with "
        "python3 plugins/filter/preflight.py --stack-table"
    )


def test_the_table_has_a_row_per_entry_and_says_unknown_for_null():
    rows = pf.preflight_stack_table(MATRIX).splitlines()[2:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [e["name"] for e in MATRIX]
    torch21 = rows[[e["name"] for e in MATRIX].index(TORCH21)]
    assert "not public (ask Cambricon)" in torch21 and "| 6.2.0 | supported |" in torch21
    v115 = rows[[e["name"] for e in MATRIX].index(V115)]
    assert "`pytorch-v1.15.0-torch1.9-ubuntu18.04-py37.tar.gz`" in v115 and "| unknown |" in v115


# ---- the filter ----------------------------------------------------------------------------------------------


def stack(image, driver="6.2.10", ignore=False):
    return pf.preflight_stack_support(MATRIX, image, driver, ignore)


TORCH21_PROBE = {"ref": "cambricon/pytorch:torch2.1", "python": "3.10.12", "torch": "2.1.0",
                 "torch_mlu": "1.22.2+torch2.1.0"}
V117_REF = "yellow.hub.cambricon.com/pytorch/pytorch:v1.17.0-torch1.13.1-ubuntu20.04-py310"


def test_the_supported_image_passes_on_a_new_enough_driver():
    answer = stack(TORCH21_PROBE)
    assert answer["ok"] and not answer["ignored"] and answer["message"] == "" and answer["notes"] == []
    assert answer["entry"]["name"] == TORCH21 and answer["gate"] == "stack" and answer["overridable"]
    assert answer["summary"] == f"{TORCH21} (supported)"
    # its versions are what identify it: any patch release of Python, a local torch build, torch_mlu 1.22.x
    assert stack({"python": "3.10.4", "torch": "2.1.0+cpu", "torch_mlu": "v1.22.0"})["ok"]
    assert stack({"python": "3.10.4", "torch": "2.1.0"}, driver="6.2.0-1")["ok"]


def test_the_driver_is_not_checked_before_it_is_read():
    answer = stack(TORCH21_PROBE, driver="")
    assert answer["ok"] and answer["message"] == ""
    assert answer["notes"] == [
        f"{TORCH21} needs MLU driver 6.2.0 or newer; the host's driver version is not known yet, so it is not checked"
    ]
    assert stack(TORCH21_PROBE, driver=None)["ok"]


@pytest.mark.parametrize("driver", ["5.10.22", "6.1.99", "6.1.3-1", "not-a-version"])
@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore_stack"])
def test_a_driver_older_than_the_images_minimum_is_refused(driver, ignore):
    answer = stack(TORCH21_PROBE, driver=driver, ignore=ignore)
    assert not answer["ok"] and answer["ignored"] is ignore
    assert answer["message"].startswith(
        "image cambricon/pytorch:torch2.1 (Python 3.10.12, torch 2.1.0, torch_mlu 1.22.2+torch2.1.0) is "
        f"{TORCH21}, whose torch_mlu 1.22.2 needs MLU driver 6.2.0 or newer, and the host's driver is {driver}: "
        "install driver 6.2.0 or newer (mlu_driver)"
    )
    assert answer["message"].endswith("set preflight_ignore_stack: true to run anyway (override preflight_ignore_stack)")


@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore_stack"])
def test_a_refused_image_is_refused_with_its_reason_and_what_to_load(ignore):
    answer = stack(V117_REF, ignore=ignore)
    entry = BY_NAME[V117]
    assert not answer["ok"] and answer["ignored"] is ignore and answer["entry"] is entry
    message = answer["message"]
    assert message.startswith(f"image {V117_REF} (its versions not read) is {V117}, which the kit's runtime refuses: "
                              "its torch is 1.13.1, and cla2 needs torch 2.1 or newer")
    assert "Ask Cambricon for its PyTorch image with torch 2.1.0 and Python 3.10 (torch_mlu 1.22, CTR 2.15)" in message
    assert (f"Supported: {TORCH21} (ask Cambricon for it: its file name is not public, MLU driver 6.2.0 or newer)"
            in message)
    assert message.endswith("(docs/support.md); set preflight_ignore_stack: true to run anyway (override "
                            "preflight_ignore_stack)")


def test_the_seeds_image_is_refused_by_its_probed_versions_too():
    answer = stack({"python": "3.7.16", "torch": "1.9.0", "torch_mlu": "1.15.0"}, driver="5.10.13")
    assert answer["entry"]["name"] == V115 and not answer["ok"]
    assert answer["message"].startswith("image (no repo:tag) (Python 3.7.16, torch 1.9.0, torch_mlu 1.15.0) is "
                                        f"{V115}, which the kit's runtime refuses: its torch is 1.9 and its Python 3.7")
    # no minimum driver is known for it: its driver is not what refuses it
    assert "needs MLU driver" not in answer["message"]


def test_a_torch_without_a_lock_is_refused_with_the_lock_override_named():
    answer = stack({"python": "3.10.12", "torch": "2.4.0", "torch_mlu": "1.22.2+torch2.4.0"})
    assert answer["entry"]["name"] == TORCH24 and not answer["ok"]
    assert "no wheelhouse lock for Python 3.10 with torch 2.4" in answer["message"]
    assert "Load the torch 2.1.0 variant of the same release" in answer["message"]
    assert "give it as cla2_runtime_lock" in answer["message"]


@pytest.mark.parametrize("image", [
    "yellow.hub.cambricon.com/pytorch/pytorch:v1.17.0-torch2.1.0-ubuntu20.04-py310",
    {"ref": "cambricon-base/pytorch:v25.01-torch2.5.0-torchmlu1.24.1-ubuntu22.04-py310", "python": "3.10.15",
     "torch": "2.5.0", "torch_mlu": "1.24.1+torch2.5.0"},
    {"python": "3.11.9", "torch": "2.1.0", "torch_mlu": "1.22.2"},
    {"python": "3.10.12", "torch": "2.1.0", "torch_mlu": "1.23.0"},
    {},
])
@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore_stack"])
def test_an_image_the_matrix_does_not_list_is_refused_naming_the_supported_ones(image, ignore):
    answer = stack(image, ignore=ignore)
    assert not answer["ok"] and answer["entry"] is None and answer["ignored"] is ignore
    ref = image if isinstance(image, str) else image.get("ref") or "(no repo:tag)"
    assert answer["message"].startswith(f"UNSUPPORTED IMAGE: image {ref} (")
    assert "is not in the stack matrix (roles/preflight/vars/stack_matrix.yml, docs/support.md). Load a supported " \
           f"image: {TORCH21} (ask Cambricon for it" in answer["message"]
    if isinstance(image, dict) and image.get("torch"):
        assert f"torch {image['torch']}" in answer["message"] and f"Python {image['python']}" in answer["message"]
    assert answer["summary"].endswith("(not in the stack matrix)")


def test_a_matrix_without_a_supported_image_says_so():
    refused_only = [e for e in MATRIX if e["status"] == "refused"]
    answer = pf.preflight_stack_support(refused_only, V117_REF)
    assert "Supported: none (the stack matrix lists no supported image)" in answer["message"]


def test_a_supported_image_known_by_its_tag_and_without_a_known_minimum_driver():
    matrix = [dict(SUPPORTED[0], repo="example.com/pytorch", tag="t21", min_driver=None)]
    answer = pf.preflight_stack_support(matrix, "example.com/pytorch:t21", "1.0.0")
    assert answer["ok"] and answer["notes"] == [
        f"{TORCH21}: no public source gives its minimum MLU driver, so the driver is not checked"
    ]


@pytest.mark.parametrize(("text", "release"), [
    ("2.1.0+cpu", (2, 1, 0)), ("5.10.22-1", (5, 10, 22)), ("v1.22.2+torch2.1.0", (1, 22, 2)), ("3.10", (3, 10)),
    ("", None), (None, None), ("unknown", None),
])
def test_release_numbers(text, release):
    assert pf._release(text) == release


def test_the_filter_is_registered():
    filters = pf.FilterModule().filters()
    assert filters["preflight_stack_support"] is pf.preflight_stack_support
    assert filters["preflight_stack_table"] is pf.preflight_stack_table
