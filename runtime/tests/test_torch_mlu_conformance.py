"""The torch_mlu TEST DOUBLE (tests/doubles/torch_mlu) held to Cambricon's real torch_mlu.

``fixtures/torch_mlu_api.json`` holds facts read from Cambricon/torch_mlu at its release branches r1.22_pt2.1.0,
r1.22_pt2.3.0 and r1.22_pt2.4.0 (for each: repository, branch, commit, file and line), and where cla2,
transformers, accelerate, peft and DeepSpeed call ``torch.mlu`` (library, version, file and line). The tests read
the fixture, never the network, and fail when

- cla2 uses a ``torch.mlu.X`` / ``torch_mlu.X`` name the fixture lacks, or one absent at one of the branches;
- the double lacks a name cla2 uses, defines a public name the real package lacks at every branch (other than
  the test-only names the fixture declares, each with its reason), or a function whose parameters (names, order,
  kinds, defaults) differ from the real one's;
- a fact misses its source.

How the fixture was made and what the double does differently from the real package: docs/torch_mlu_double.md.
The double is imported in a subprocess, as tests/test_mlu_double.py does, so that ``torch.mlu``, the cncl backend
and DS_ACCELERATOR never leak into this process.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src" / "cla2"
DOUBLES = TESTS / "doubles"
FIXTURE = TESTS / "fixtures" / "torch_mlu_api.json"
BRANCHES = ("r1.22_pt2.1.0", "r1.22_pt2.3.0", "r1.22_pt2.4.0")
REPOSITORY = "https://github.com/Cambricon/torch_mlu"
VARIADIC = ("VAR_POSITIONAL", "VAR_KEYWORD")


# --- cla2's uses of torch.mlu, found in its source -------------------------------------------------------------

def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _is_device(name: str, filename: str) -> bool:
    """A name that holds a cla2.device.Device (whose ``.module`` is torch.mlu on an MLU host): ``self`` in
    device.py, else ``dev`` / ``device`` / ``*_dev`` / ``*_device`` (how cla2 names a Device)."""
    return (name == "self" and filename == "device.py") or name in ("dev", "device") or name.endswith(
        ("_dev", "_device"))


def _mlu_name(parts: list[str], filename: str) -> str | None:
    """The torch.mlu attribute an attribute chain reads ("random.get_rng_state"), "torch_mlu.X" for the
    package's own attributes, "" for torch.mlu itself, None when the chain is not about torch.mlu."""
    if parts[:2] == ["torch", "mlu"]:
        return ".".join(parts[2:])
    if parts[0] == "torch_mlu":
        if parts[1:2] == ["mlu"]:
            return ".".join(parts[2:])
        return "torch_mlu." + ".".join(parts[1:]) if len(parts) > 1 else ""
    for k in range(1, len(parts)):
        if parts[k] == "module" and _is_device(parts[k - 1], filename):
            return ".".join(parts[k + 1:])
    return None


def mlu_uses(source: str, filename: str) -> list[dict]:
    """Every use of a torch.mlu / torch_mlu attribute in ``source``: {"name", "line", "probe"}. A probe is
    ``getattr(torch.mlu, "X", default)`` / ``hasattr(torch.mlu, "X")``: code that copes with X being absent."""
    tree = ast.parse(source)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts = _chain(node)
            name = _mlu_name(parts, filename) if parts else None
            if name:
                uses.append({"name": name, "line": node.lineno, "probe": False})
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            parts = _chain(node.args[0])
            if parts == ["torch"] and node.args[1].value == "mlu":
                continue  # getattr(torch, "mlu", None): torch.mlu itself
            base = _mlu_name(parts, filename) if parts else None
            if base is not None:
                name = f"{base}.{node.args[1].value}" if base else node.args[1].value
                probe = node.func.id == "hasattr" or len(node.args) == 3
                uses.append({"name": name, "line": node.lineno, "probe": probe})
    return uses


def cla2_uses() -> dict[str, list[dict]]:
    """{name: [{"where": "runtime/src/cla2/device.py:32", "probe": bool}]} over all of cla2's sources."""
    out: dict[str, list[dict]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for use in mlu_uses(path.read_text(encoding="utf-8"), path.name):
            where = f"runtime/src/cla2/{path.relative_to(SRC).as_posix()}:{use['line']}"
            out.setdefault(use["name"], []).append({"where": where, "probe": use["probe"]})
    return out


# --- what the double defines, asked in a subprocess ------------------------------------------------------------

INTROSPECT = textwrap.dedent('''
    import __future__, inspect, json, os, sys, types
    import torch
    import torch.distributed as dist
    import torch_mlu
    from torch_mlu import mlu

    def params(obj):
        out = []
        for p in inspect.signature(obj).parameters.values():
            d = {"name": p.name, "kind": p.kind.name, "has_default": p.default is not inspect.Parameter.empty}
            if d["has_default"]:
                ok = isinstance(p.default, (type(None), bool, int, float, str))
                d["default_value"] = p.default if ok else repr(p.default)
            out.append(d)
        return out

    def public(space, module, prefix=""):
        out = {}
        for k, v in space.items():
            if k.startswith("_") or v is __future__.annotations:
                continue
            if inspect.ismodule(v) and not v.__name__.startswith("torch_mlu"):
                continue  # torch, os, re: imported, not defined
            if (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ != module:
                continue  # SimpleNamespace and the like: imported, not defined
            kind = ("module" if inspect.ismodule(v) else "class" if inspect.isclass(v) else "function"
                    if callable(v) else "namespace" if isinstance(v, types.SimpleNamespace) else "value")
            out[prefix + k] = {"kind": kind, **({"params": params(v)} if kind in ("class", "function") else {})}
            if kind == "namespace":
                out.update(public(vars(v), module, prefix + k + "."))
        return out

    print(json.dumps({
        "file": torch_mlu.__file__, "version": torch_mlu.__version__,
        "top": public(vars(torch_mlu), "torch_mlu"), "mlu": public(vars(mlu), "torch_mlu.mlu"),
        "torch.mlu is torch_mlu.mlu": torch.mlu is mlu, "sys.modules": sys.modules.get("torch.mlu") is mlu,
        "nn.Module.mlu": params(torch.nn.Module.mlu),
        "cncl": dist.is_available() and "cncl" in dist.Backend.backend_list,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR")}))
''')


@pytest.fixture(scope="module")
def api() -> dict:
    if not FIXTURE.exists():
        pytest.fail(f"{FIXTURE} is missing: it holds the facts of the real torch_mlu (docs/torch_mlu_double.md)")
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def double() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DS_ACCELERATOR", "MLU_VISIBLE_DEVICES") and not k.startswith("CLA2_FAKE_MLU")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DOUBLES), env.get("PYTHONPATH")) if p)
    p = subprocess.run([sys.executable, "-c", INTROSPECT], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(DOUBLES)), got["file"]
    return got


# --- comparisons --------------------------------------------------------------------------------------------------

def real_params(fact: dict) -> list[dict] | None:
    """The parameters a call passes to the real attribute: a function's, or a class's __init__ less self."""
    if fact["kind"] == "function":
        return fact["params"]
    if fact["kind"] == "class":
        return fact.get("init_params")
    return None


def signature_differences(real: list[dict], double: list[dict]) -> list[str]:
    """What differs between the real parameters (from the fixture) and the double's (from inspect.signature):
    names, order, kinds, whether each has a default, and the default where the real one is a constant.

    Tolerance: where the real function takes ``**kwargs``, the double must take ``**kwargs`` too and may also name
    some of those keywords (keyword-only parameters the real one does not list)."""
    double = list(double)
    if any(p["kind"] == "VAR_KEYWORD" for p in real):
        named = {p["name"] for p in real}
        double = [p for p in double if p["kind"] != "KEYWORD_ONLY" or p["name"] in named]
    want = [(p["name"], p["kind"]) for p in real]
    have = [(p["name"], p["kind"]) for p in double]
    if want != have:
        return [f"parameters {have} where the real one has {want}"]
    problems = []
    for r, d in zip(real, double, strict=True):
        if r["kind"] in VARIADIC:
            continue
        if ("default" in r) != d["has_default"]:
            problems.append(f"{r['name']}: the real one has {'the default ' + r['default'] if 'default' in r else 'no default'}"
                            f", the double {'a default' if d['has_default'] else 'none'}")
        elif "default_value" in r and d.get("default_value") != r["default_value"]:
            problems.append(f"{r['name']}: default {d.get('default_value')!r}, the real one's is {r['default']}")
    return problems


def _public_names(double: dict) -> dict[str, dict]:
    """The double's public names as the fixture spells them: "get_rng_state", "random.seed", "torch_mlu.mlu"."""
    names = {f"torch_mlu.{k}": v for k, v in double["top"].items()}
    names.update(double["mlu"])
    return names


# --- the tests ----------------------------------------------------------------------------------------------------

def test_every_fact_names_its_source(api):
    """Repository, branch, commit and path on every fact of the real package; library, version, file and line
    on every use; the three branches, each at one commit."""
    assert api["upstream"]["repository"] == REPOSITORY
    commits = api["upstream"]["branches"]
    assert sorted(commits) == sorted(BRANCHES)
    assert all(re.fullmatch(r"[0-9a-f]{40}", c) for c in commits.values()), commits

    def sourced(fact: dict, where: str) -> None:
        missing = [k for k in ("repository", "branch", "commit", "path") if not fact.get(k)]
        assert not missing, f"{where}: the fact lacks {missing}"
        assert fact["repository"] == REPOSITORY, where
        assert fact["commit"] == commits[fact["branch"]], f"{where}: commit is not {fact['branch']}'s"
        if fact.get("present", True):
            assert isinstance(fact.get("line"), int), f"{where}: no line"

    libraries = {f"{lib['name']}=={lib['version']}" for lib in api["libraries"]}
    for lib in api["libraries"]:
        assert lib.get("lock") and lib.get("read_from"), lib
    assert {"transformers", "accelerate", "peft", "deepspeed"} <= {lib["name"] for lib in api["libraries"]}
    for name, entry in api["attributes"].items():
        assert sorted(entry["real"]) == sorted(BRANCHES), f"{name}: not every branch"
        for branch, fact in entry["real"].items():
            assert fact["branch"] == branch
            sourced(fact, f"attributes.{name}.real.{branch}")
        assert entry["used_by"] or entry.get("listed_because"), f"{name}: listed for no reason"
        for user, places in entry["used_by"].items():
            assert user == "cla2" or user in libraries, f"{name}: {user} is not a library the fixture read"
            for place in places:
                assert re.fullmatch(r"[\w./-]+\.py:\d+( .+)?", place), f"{name}: {user}: {place!r} has no file:line"
    for branch in BRANCHES:
        for fact in api["registration"][branch]:
            sourced(fact, f"registration.{branch}.{fact.get('what')}")
        sourced(api["torch_mlu_top_level"][branch], f"torch_mlu_top_level.{branch}")
    assert api["nn_module_mlu"], "nn.Module.mlu: no facts"
    for fact in api["nn_module_mlu"]:
        assert fact["repository"] == "https://github.com/pytorch/pytorch" and fact["version"], fact
        assert fact["path"] and isinstance(fact["line"], int), fact


def test_the_fixture_read_the_libraries_installed_here(api):
    """The uses recorded are those of the versions this environment runs (the kit's locks): a lock that moves a
    library to another version makes this fail until its uses are read again."""
    read = {(lib["name"], lib["version"]) for lib in api["libraries"]}
    for name in ("transformers", "accelerate", "peft", "deepspeed"):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # DeepSpeed is not in the torch 2.1 stack's lock
        assert (name, installed) in read, (f"{name} {installed} is installed, but {FIXTURE.name} records the uses "
                                           f"of {sorted(v for n, v in read if n == name)}: read its torch.mlu uses again")


def test_cla2_uses_only_names_the_real_package_has_at_every_branch(api):
    """A torch.mlu name cla2 reads must be in the fixture and present at all three branches; a probe (getattr
    with a default) may read a name that is absent only where the fixture says why."""
    problems = []
    for name, uses in sorted(cla2_uses().items()):
        where = ", ".join(u["where"] for u in uses)
        if name.startswith("torch_mlu."):
            top = name.split(".")[1]
            absent = [b for b in BRANCHES if top not in api["torch_mlu_top_level"][b]["public"]]
        elif name not in api["attributes"]:
            problems.append(f"torch.mlu.{name} ({where}) is not in {FIXTURE.name}: add its facts at each branch")
            continue
        else:
            absent = [b for b, f in api["attributes"][name]["real"].items() if not f["present"]]
        probes_only = all(u["probe"] for u in uses)
        if absent and not (probes_only and name in api["double_only"]):
            problems.append(f"torch.mlu.{name} ({where}) is absent from the real torch_mlu at {absent}")
    assert not problems, "\n".join(problems)


def test_the_fixture_lists_exactly_what_cla2_uses(api):
    """The fixture's record of cla2's uses is cla2's source as it is now, so the double is held to all of it."""
    scanned = {name: sorted(u["where"] for u in uses) for name, uses in cla2_uses().items()}
    recorded = {name: sorted(e["used_by"]["cla2"]) for name, e in api["attributes"].items() if "cla2" in e["used_by"]}
    assert scanned == recorded, "update attributes.*.used_by.cla2 in the fixture (and the facts of any new name)"
    assert {"is_available", "device_count", "mem_get_info", "set_device"} <= set(scanned)


def test_the_double_has_every_name_cla2_uses(api, double):
    names = _public_names(double)
    missing = [n for n, e in api["attributes"].items() if "cla2" in e["used_by"] and n not in names]
    assert not missing, f"cla2 uses torch.mlu.{missing}, which the double lacks"


def test_the_double_defines_no_public_name_the_real_package_lacks(api, double):
    """Every public name of the double is in the fixture and present at some branch, or is one of the
    fixture's double_only names (each with its reason), which the real package lacks at every branch."""
    problems = []
    for name in sorted(_public_names(double)):
        if name in api["double_only"]:
            continue
        if name.startswith("torch_mlu."):
            top = name.split(".", 1)[1]
            if not any(top in api["torch_mlu_top_level"][b]["public"] for b in BRANCHES):
                problems.append(f"{name}: the real torch_mlu has no such attribute at any branch")
        elif name not in api["attributes"]:
            problems.append(f"torch.mlu.{name}: not in {FIXTURE.name} (add its facts, or make it private)")
        elif not any(f["present"] for f in api["attributes"][name]["real"].values()):
            problems.append(f"torch.mlu.{name}: the real torch_mlu has no such attribute at any branch")
    for name, reason in api["double_only"].items():
        assert len(reason) > 20, f"{name}: say why the double has it"
        if name.startswith("torch_mlu."):
            present = [b for b in BRANCHES if name.split(".", 1)[1] in api["torch_mlu_top_level"][b]["public"]]
        else:
            assert name in api["attributes"], f"{name}: double_only, but without its facts at each branch"
            present = [b for b, f in api["attributes"][name]["real"].items() if f["present"]]
        assert not present, f"{name} is double_only, but the real torch_mlu has it at {present}"
    assert not problems, "\n".join(problems)


def test_the_double_signatures_are_the_real_ones(api, double):
    problems = []
    for name, mine in sorted(_public_names(double).items()):
        if mine["kind"] not in ("function", "class") or name not in api["attributes"]:
            continue
        for branch, fact in api["attributes"][name]["real"].items():
            real = real_params(fact) if fact["present"] else None
            if real is None:
                continue
            for problem in signature_differences(real, mine["params"]):
                problems.append(f"torch.mlu.{name} at {branch} ({fact['path']}:{fact['line']}): {problem}")
    assert not problems, "\n".join(problems)


def test_the_double_registers_as_the_real_package_does(api, double):
    """What importing torch_mlu does that cla2 and the libraries rely on: torch.mlu is torch_mlu.mlu (also in
    sys.modules), nn.Module.mlu(device=None) exists, cncl is a distributed backend, __version__ is set."""
    assert double["torch.mlu is torch_mlu.mlu"] and double["sys.modules"]
    assert double["cncl"]
    assert double["version"] == "0.0.0+testdouble"
    assert all(api["torch_mlu_top_level"][b]["__version__"] for b in BRANCHES)
    whats = {b: {f["what"] for f in api["registration"][b]} for b in BRANCHES}
    for b in BRANCHES:
        assert {"torch.mlu", "nn.Module.mlu", "cncl"} <= whats[b], b
    # torch_mlu has torch generate nn.Module.mlu (generate_methods_for_privateuse1_backend(for_module=True)):
    # its signature is torch's, at each torch the kit runs.
    for real in api["nn_module_mlu"]:
        assert not signature_differences(real["params"], double["nn.Module.mlu"]), real
    # DeepSpeed's MLU accelerator puts tensors on "mlu", which the double cannot hold: it picks the CPU one.
    assert double["DS_ACCELERATOR"] == "cpu"


def test_the_scanner_and_the_comparison_catch_what_they_are_for():
    """So that the tests above can fail: a new use of each spelling is found, and a changed signature shows."""
    source = textwrap.dedent("""
        import torch, torch_mlu
        torch.mlu.new_thing(1)
        x = torch.mlu.random.get_rng_state()
        torch_mlu.mlu.memory_stats()
        torch_mlu.get_version()
        getattr(torch.mlu, "maybe", None)
        getattr(torch, "mlu", None)
        self.module.synchronize()
        prep.dev.module.empty_cache()
        hasattr(dev.module, "cnpx")
        model.module.config
    """)
    got = sorted((u["name"], u["probe"]) for u in mlu_uses(source, "device.py"))
    assert got == [("cnpx", True), ("empty_cache", False), ("maybe", True), ("memory_stats", False),
                   ("new_thing", False), ("random.get_rng_state", False), ("synchronize", False),
                   ("torch_mlu.get_version", False)]
    assert "synchronize" not in {u["name"] for u in mlu_uses(source, "other.py")}  # self is a Device in device.py
    real = [{"name": "new_state", "kind": "POSITIONAL_OR_KEYWORD"},
            {"name": "device", "kind": "POSITIONAL_OR_KEYWORD", "default": "'mlu'", "default_value": "mlu"}]
    same = [{"name": "new_state", "kind": "POSITIONAL_OR_KEYWORD", "has_default": False},
            {"name": "device", "kind": "POSITIONAL_OR_KEYWORD", "has_default": True, "default_value": "mlu"}]
    assert signature_differences(real, same) == []
    renamed = [dict(same[0], name="state"), same[1]]
    assert signature_differences(real, renamed)
    assert signature_differences(real, [same[0], dict(same[1], default_value=None)])
    assert signature_differences(real, [dict(same[0], has_default=True, default_value=None), same[1]])
    assert signature_differences([], [{"name": "args", "kind": "VAR_POSITIONAL", "has_default": False}])
    kw_real = [{"name": "callable", "kind": "POSITIONAL_OR_KEYWORD"}, {"name": "kwargs", "kind": "VAR_KEYWORD"}]
    kw_double = [{"name": "callable", "kind": "POSITIONAL_OR_KEYWORD", "has_default": False},
                 {"name": "seed", "kind": "KEYWORD_ONLY", "has_default": True, "default_value": False},
                 {"name": "kwargs", "kind": "VAR_KEYWORD", "has_default": False}]
    assert signature_differences(kw_real, kw_double) == []  # the documented **kwargs tolerance
    assert signature_differences(kw_real, kw_double[:2])  # but it must take **kwargs itself
