"""The cla2_runtime role's wheelhouse builder (roles/cla2_runtime/files/wheelhouse.py), run as the role runs it, for
an image other than the sandbox's: Cambricon's PyTorch image for the MLU370 ships torch 2.1 and Python
3.10, so the wheelhouse must hold exactly that stack's lock (transformers before 4.56, NumPy 1), never torch
itself, each file checked against the lock's hash, and an image whose torch cla2 cannot use or that no lock
covers must be refused before anything is downloaded.

The molecule `jobs` scenario covers the role with the sandbox's torch 2.13 image; these download the real
lock's files from PyPI for the real cla2 wheel, as the controller does.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "roles" / "cla2_runtime" / "files" / "wheelhouse.py"


def load_script():
    spec = importlib.util.spec_from_file_location("wheelhouse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The cla2 wheel, built from runtime/ as the role builds it."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                    str(ROOT / "runtime")], check=True, timeout=300)
    (found,) = out.glob("cla2-*.whl")
    return found


def run(wheel: Path, dest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--wheel", str(wheel), "--dest", str(dest),
                           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64", *args],
                          capture_output=True, text=True, timeout=900, check=False)


def versions(dest: Path) -> dict[str, str]:
    out = {}
    for whl in dest.glob("*.whl"):
        name, version = whl.name.split("-")[:2]
        out[name.lower()] = version
    return out


def test_the_wheel_declares_the_torch_it_needs(wheel):
    assert load_script().torch_requirement(wheel) == ">=2.1"


LOCKS = ROOT / "roles" / "cla2_runtime" / "files" / "locks"


@pytest.mark.parametrize(("python", "torch", "lock"), [
    ("3.10", "2.1.0", "py3.10-torch2.1.txt"),
    ("3.10.12", "2.1.0a0+git1234", "py3.10-torch2.1.txt"),  # a vendor's build of 2.1
    ("3.11", "2.13.0", "py3.11-torch2.13.txt"),
])
def test_each_image_gets_the_lock_of_its_stack(python, torch, lock):
    assert load_script().pick_lock(python, torch) == LOCKS / lock


def test_torch_2_1_image_gets_exactly_its_lock_with_deepspeed_built_as_pure_python(wheel, tmp_path):
    dest = tmp_path / "wheelhouse"
    proc = run(wheel, dest, "--python-version", "3.10", "--provided", "torch==2.1.0", "--provided",
               "torch_mlu==1.22.0", "--deepspeed", "pypi")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["lock"] == str(LOCKS / "py3.10-torch2.1.txt") and report["deepspeed"] == "deepspeed"
    got = versions(dest)
    assert sorted(report["wheels"]) == sorted(p.name for p in dest.glob("*.whl"))
    assert "torch" not in got and "torch_mlu" not in got, "the image's own torch must never be downloaded"
    assert not list(dest.glob("cla2-*")), "the wheel travels on its own"
    # exactly what the lock lists, at its versions (what stacks.yml pins for torch 2.1 included)
    locked = load_script().read_lock(LOCKS / "py3.10-torch2.1.txt")
    assert {load_script().normalise(n): v for n, v in got.items()} == {n: v for n, (v, _) in locked.items()}
    assert tuple(int(x) for x in got["transformers"].split(".")[:2]) < (4, 56), got["transformers"]
    assert got["numpy"].startswith("1."), got["numpy"]
    (ds,) = dest.glob("deepspeed-*.whl")
    assert ds.name.endswith("-py3-none-any.whl"), ds.name  # its ops are compiled just in time on the host
    # Every wheel installs on CPython 3.10 (the image's Python): pure Python, abi3, or built for 3.10.
    for name in report["wheels"]:
        py, abi, _ = name[:-len(".whl")].split("-")[-3:]
        assert "cp310" in py.split(".") or abi in ("none", "abi3"), name
    # What the image installs with --require-hashes: every wheel, with the hash of the file that is there.
    import hashlib
    lines = (dest / "requirements.txt").read_text().split("\n")
    hashes = {line.split("==")[0]: line.split("sha256:")[1] for line in lines if line}
    assert len(hashes) == len(report["wheels"])
    for whl in dest.glob("*.whl"):
        assert hashes[whl.name.split("-")[0]] == hashlib.sha256(whl.read_bytes()).hexdigest(), whl.name
    # And the requirements of the wheel and of DeepSpeed are met by what is there (no dependency left out).
    for path in (wheel, ds):
        with zipfile.ZipFile(path) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            required = [line.split(":", 1)[1].strip() for line in zf.read(meta).decode().splitlines()
                        if line.startswith("Requires-Dist:") and "extra ==" not in line]
        for req in required:
            name = re.split(r"[<>=!~ ;\[(]", req, maxsplit=1)[0].lower().replace("-", "_")
            assert name == "torch" or name in got, f"{req} of {path.name} is not in the wheelhouse"


def test_an_image_no_lock_covers_is_refused_before_any_download(wheel, tmp_path):
    dest = tmp_path / "wheelhouse"
    proc = run(wheel, dest, "--python-version", "3.10", "--provided", "torch==2.4.1")
    assert proc.returncode == 2
    assert "no wheelhouse lock covers this image (Python 3.10, torch 2.4.1)" in proc.stderr
    assert "py3.10-torch2.1 (Python 3.10, torch 2.1" in proc.stderr and "py3.11-torch2.13" in proc.stderr
    assert not dest.exists(), "nothing may be downloaded for an image no lock covers"


def test_a_file_whose_hash_differs_from_the_lock_stops_the_build_naming_the_package(wheel, tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("six==1.17.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via python-dateutil\n")
    proc = run(wheel, tmp_path / "wheelhouse", "--python-version", "3.10", "--provided", "torch==2.1.0",
               "--lock", str(lock))
    assert proc.returncode == 1
    assert "six" in proc.stderr and "0" * 64 in proc.stderr and "do not match the hashes" in proc.stderr.lower()
    assert not list((tmp_path / "wheelhouse").glob("*.whl")) and not (tmp_path / "wheelhouse" / "requirements.txt").exists()


@pytest.mark.parametrize(("provided", "message"), [
    (["--provided", "torch==1.13.1"], "the image ships torch 1.13.1, but cla2-"),
    ([], "no --provided torch==VERSION was given"),
])
def test_an_image_cla2_cannot_run_on_is_refused_before_any_download(wheel, tmp_path, provided, message):
    dest = tmp_path / "wheelhouse"
    proc = run(wheel, dest, "--python-version", "3.10", *provided)
    assert proc.returncode == 2
    assert message in proc.stderr
    if provided:
        assert "needs torch>=2.1" in proc.stderr and "torch 2.1.0 / Python 3.10 image" in proc.stderr
    assert not dest.exists(), "nothing may be downloaded for an image that cannot run cla2"


def test_the_vendors_deepspeed_wheel_goes_in_as_it_is(wheel, tmp_path):
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    stub = load_script().stub_wheel(vendor, "deepspeed", "0.8.0")  # deepspeed-0.8.0+provided-py3-none-any.whl
    cndsp = vendor / "deepspeed-0.8.0+cndsp-cp310-cp310-linux_x86_64.whl"  # as a vendor tags a local build
    stub.rename(cndsp)
    dest = tmp_path / "wheelhouse"
    proc = run(wheel, dest, "--python-version", "3.10", "--provided", "torch==2.1.0", "--deepspeed", str(cndsp))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["deepspeed"] == "deepspeed"
    assert [p.name for p in dest.glob("deepspeed-*.whl")] == [cndsp.name], "PyPI's DeepSpeed must not come in"


def test_a_vendor_deepspeed_that_is_not_a_wheel_is_refused(wheel, tmp_path):
    proc = run(wheel, tmp_path / "wheelhouse", "--python-version", "3.10", "--provided", "torch==2.1.0",
               "--deepspeed", str(tmp_path / "cndsp-0.8.0.tar.gz"))
    assert proc.returncode == 2
    assert "not a wheel file" in proc.stderr
    assert not (tmp_path / "wheelhouse").exists()
