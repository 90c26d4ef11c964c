"""The model_weights role's placement module (roles/model_weights/library/cla2_weights.py), run as
Ansible runs it (a JSON file of arguments, a JSON answer), against real folders and a real HTTP server
on 127.0.0.1: URL sources, resuming a broken download or a killed run with HTTP Range (and starting
over where the server ignores Range), parallel copies, a bad checksum with several files in flight,
and a full verify.

The molecule scenarios cover the role on sandbox hosts (controller and shared-mount sources); these
cover what needs a web server or an interrupted transfer, in seconds.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[2] / "roles" / "model_weights" / "library" / "cla2_weights.py"
MB = 1 << 20


def run_module(tmp_path: Path, **args) -> dict:
    """Run the module with these arguments; its JSON answer (with `failed` set on failure)."""
    argfile = tmp_path / "args.json"
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    proc = subprocess.run([sys.executable, str(MODULE), str(argfile)], capture_output=True, text=True, timeout=120,
                          check=False)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"the module printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def make_source(folder: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Files of the given sizes with distinct contents; returns name -> sha256."""
    sums = {}
    for i, (name, size) in enumerate(sizes.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (bytes([i + 1]) * 4096 + os.urandom(4096)) * (size // 8192) + os.urandom(size % 8192)
        path.write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def manifest_text(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def placed_sums(folder: Path) -> dict[str, str]:
    out = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith(".cla2-"):
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Server:
    """A static file server on 127.0.0.1 that honours `Range: bytes=N-` (when `ranges`), counts the
    bytes it sends and the ranges asked for, and can break the connection off after `cut` bytes of a
    named file (once), as a dropped link would, or stall after `stall` bytes until told to go on."""

    def __init__(self, root: Path, ranges: bool = True):
        self.root, self.ranges = root, ranges
        self.cut: dict[str, int] = {}
        self.stall: dict[str, int] = {}  # file -> bytes sent before the server waits for `resume`
        self.resume = threading.Event()
        self.sent = 0
        self.range_requests: list[tuple[str, int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                rel = self.path.lstrip("/")
                path = server.root / rel
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m and server.ranges:
                    start = int(m.group(1))
                    server.range_requests.append((rel, start))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                limit = server.cut.pop(rel, None)
                if limit is not None:
                    body = body[:limit]
                    self.close_connection = True
                stall = server.stall.pop(rel, None)
                if stall is not None:
                    self.wfile.write(body[:stall])
                    self.wfile.flush()
                    server.sent += stall
                    server.resume.wait(60)
                    body = body[stall:]
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed meanwhile
                    return
                server.sent += len(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


SIZES = {"config.json": 300, "model-00001-of-00002.safetensors": 3 * MB + 17,
         "model-00002-of-00002.safetensors": 2 * MB + 5, "sub/tokenizer.model": 50_000}


def test_url_source_is_placed_bit_identical_and_rerun_reads_nothing(tmp_path):
    src = tmp_path / "mirror" / "m"
    sums = make_source(src, SIZES)
    (src / "SHA256SUMS").write_text(manifest_text(sums))
    dest = tmp_path / "data" / "models" / "m"
    with Server(tmp_path / "mirror") as server:
        res = run_module(tmp_path, dest=str(dest), source_type="url", source=server.url + "m")
        assert not res.get("failed"), res
        assert res["changed"] and res["bytes_copied"] == sum(SIZES.values())
        assert placed_sums(dest) == sums
        assert (dest / ".cla2-manifest.sha256").read_text() == manifest_text(sums)
        sent = server.sent
        again = run_module(tmp_path, dest=str(dest), source_type="url", source=server.url + "m")
        assert not again.get("failed") and not again["changed"] and again["reason"] == "up to date"
        assert server.sent - sent < 4096  # the manifest only, no weight
    assert not (dest.parent / ".m.cla2-partial").exists()


def test_url_source_without_manifest_is_refused(tmp_path):
    src = tmp_path / "mirror" / "m"
    make_source(src, {"config.json": 100})
    with Server(tmp_path / "mirror") as server:
        res = run_module(tmp_path, dest=str(tmp_path / "data" / "m"), source_type="url", source=server.url + "m")
    assert res.get("failed")
    assert "needs a manifest" in res["msg"] and "SHA256SUMS" in res["msg"]
    assert not (tmp_path / "data" / "m").exists()


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_broken_download_is_kept_and_resumed(tmp_path, ranges):
    src = tmp_path / "mirror" / "m"
    sums = make_source(src, SIZES)
    big = "model-00001-of-00002.safetensors"
    dest = tmp_path / "data" / "m"
    args = {"dest": str(dest), "source_type": "url", "manifest": manifest_text(sums), "workers": 1}
    with Server(tmp_path / "mirror", ranges=ranges) as server:
        args["source"] = server.url + "m"
        server.cut["m/" + big] = 2 * MB + 123
        res = run_module(tmp_path, **args)
        assert res.get("failed"), res
        assert "broke off" in res["msg"] and big in res["msg"] and "resumes" in res["msg"], res["msg"]
        assert not dest.exists()
        partial = dest.parent / ".m.cla2-partial" / big
        assert 0 < partial.stat().st_size < SIZES[big]
        sent = server.sent
        res = run_module(tmp_path, **args)
        assert not res.get("failed"), res
        assert placed_sums(dest) == sums
        if ranges:
            # the broken file continued from where it stopped; the files already done were not fetched again
            assert [r for r in server.range_requests if r[0].endswith(big)] and res["bytes_resumed"] > 0
            assert server.sent - sent < SIZES[big] + SIZES["model-00002-of-00002.safetensors"] + 100_000
        else:
            assert res["bytes_resumed"] == 0  # the server ignored Range: the file started over


def test_killed_mid_transfer_resumes_where_it_stopped(tmp_path):
    """kill -9 of the module (a lost SSH session, an OOM kill) in the middle of a file: the next run keeps
    the files already done and continues the broken one from its last whole chunk."""
    src = tmp_path / "mirror" / "m"
    sizes = {"config.json": 300, "big.safetensors": 12 * MB + 1, "small.safetensors": MB}
    sums = make_source(src, sizes)
    dest = tmp_path / "data" / "m"
    args = {"dest": str(dest), "source_type": "url", "manifest": manifest_text(sums)}
    partial = dest.parent / ".m.cla2-partial"
    with Server(tmp_path / "mirror") as server:
        args["source"] = server.url + "m"
        server.stall["m/big.safetensors"] = 8 * MB + 4096  # the module writes whole 8 MB chunks
        argfile = tmp_path / "args-kill.json"
        argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
        proc = subprocess.Popen([sys.executable, str(MODULE), str(argfile)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                done = partial / ".cla2-progress.json"
                big = partial / "big.safetensors"
                if big.exists() and big.stat().st_size >= 8 * MB and done.exists() \
                        and len(json.loads(done.read_text() or "{}").get("files", {})) == 2:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the module never got 8 MB into the big file")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            server.resume.set()
        assert not dest.exists()
        sent = server.sent
        res = run_module(tmp_path, **args)
        assert not res.get("failed"), res
        assert placed_sums(dest) == sums
        assert res["bytes_resumed"] == 8 * MB
        assert res["bytes_copied"] == sizes["big.safetensors"] - 8 * MB  # nothing else fetched again
        assert server.sent - sent == res["bytes_copied"]
        assert server.range_requests == [("m/big.safetensors", 8 * MB)]


def test_parallel_and_serial_placement_agree(tmp_path):
    src = tmp_path / "share" / "m"
    sums = make_source(src, SIZES)
    results = {}
    for workers in (1, 4):
        dest = tmp_path / f"data-{workers}" / "m"
        res = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src), workers=workers)
        assert not res.get("failed"), res
        assert res["bytes_copied"] == sum(SIZES.values())
        results[workers] = (dest / ".cla2-manifest.sha256").read_text()
        assert placed_sums(dest) == sums
    assert results[1] == results[4] == manifest_text(sums)


def test_bad_checksum_with_files_in_flight_keeps_the_previous_copy(tmp_path):
    src = tmp_path / "share" / "m"
    sums = make_source(src, SIZES)
    dest = tmp_path / "data" / "m"
    res = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src), workers=4)
    assert not res.get("failed"), res
    before = placed_sums(dest)
    # a new version whose manifest is wrong for one file
    sums2 = make_source(src, SIZES)
    sums2["model-00002-of-00002.safetensors"] = "0" * 64
    res = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src), workers=4,
                     manifest=manifest_text(sums2))
    assert res.get("failed"), res
    assert "checksum mismatch for model-00002-of-00002.safetensors" in res["msg"]
    assert "is untouched" in res["msg"]
    assert placed_sums(dest) == before == sums
    assert not (dest.parent / ".m.cla2-partial").exists()


def test_full_verify_finds_a_changed_byte(tmp_path):
    src = tmp_path / "share" / "m"
    make_source(src, SIZES)
    dest = tmp_path / "data" / "m"
    assert not run_module(tmp_path, dest=str(dest), source_type="path", source=str(src)).get("failed")
    shard = dest / "model-00002-of-00002.safetensors"
    st = shard.stat()
    with open(shard, "r+b") as fh:  # flip one byte, keep size and mtime: only a full verify can tell
        fh.seek(MB)
        b = fh.read(1)
        fh.seek(MB)
        fh.write(bytes([b[0] ^ 1]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    q = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src), state="query")
    assert q["up_to_date"]
    q = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src), state="query", verify="full")
    assert not q["up_to_date"] and "model-00002-of-00002.safetensors" in q["reason"]
    assert q["bytes_hashed"] == sum(SIZES.values())
