"""The model_weights role's placement module (plugins/modules/cla2_weights.py), run as
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
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[2]
MODULE = KIT / "plugins" / "modules" / "cla2_weights.py"
# the module's module_utils (ansible_collections.cla2.mlu...) from the kit's collections/ link, as Ansible ships them
MODULE_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(KIT / "collections"), os.environ.get("PYTHONPATH", "")])}
MB = 1 << 20


def run_module(tmp_path: Path, **args) -> dict:
    """Run the module with these arguments; its JSON answer (with `failed` set on failure)."""
    argfile = tmp_path / "args.json"
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    proc = subprocess.run([sys.executable, str(MODULE), str(argfile)], capture_output=True, text=True, timeout=120,
                          check=False, env=MODULE_ENV)
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

    def __init__(self, root: Path, ranges: bool = True, head: bool = True, ssl_dir: Path | None = None):
        self.root, self.ranges, self.head = root, ranges, head
        self.redirect: dict[str, str] = {}  # path prefix -> base URL it is redirected to (302)
        self.cut: dict[str, int] = {}
        self.stall: dict[str, int] = {}  # file -> bytes sent before the server waits for `resume`
        self.resume = threading.Event()
        self.sent = 0
        self.range_requests: list[tuple[str, int]] = []
        self.token: str | None = None  # when set, every request must carry ?token=<it> (else 403)
        self.queries: list[str] = []  # the query of every request
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def refused(self) -> bool:
                """Split the query off the path (self.path is the file's path after it); 403 without the token."""
                self.path, _, query = self.path.partition("?")
                server.queries.append(query)
                if server.token is not None and query != f"token={server.token}":
                    self.send_error(403)
                    return True
                return False

            def redirected(self) -> bool:
                rel = self.path.lstrip("/")
                for prefix, target in server.redirect.items():
                    if rel.startswith(prefix):
                        self.send_response(302)
                        self.send_header("Location", target + rel[len(prefix):])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return True
                return False

            def do_HEAD(self):
                if not server.head:
                    self.send_error(501)
                    return
                if self.refused() or self.redirected():
                    return
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()

            def do_GET(self):
                if self.refused() or self.redirected():
                    return
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
                    if start >= len(data):  # as nginx and S3 answer a range past the end
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
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
        scheme = "http"
        if ssl_dir is not None:  # https with a self-signed certificate (the module runs with validate_certs off)
            key, cert = ssl_dir / "key.pem", ssl_dir / "cert.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                            "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/"
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
                                stderr=subprocess.DEVNULL, env=MODULE_ENV)
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


# ---- issue 14: bad manifests, symlinks in staging, 416, free space, redirects, credentials -----------------

def place_good_copy(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A source folder with a SHA256SUMS and its copy placed under data/m: (source, dest, stamp text)."""
    src = tmp_path / "share" / "m"
    sums = make_source(src, {"config.json": 300, "model.safetensors": 70_000})
    (src / "SHA256SUMS").write_text(manifest_text(sums))
    dest = tmp_path / "data" / "m"
    res = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src))
    assert not res.get("failed") and res["changed"], res
    return src, dest, {"sums": placed_sums(dest), "stamp": (dest / ".cla2-stamp.json").read_text()}


def assert_untouched(dest: Path, before: dict) -> None:
    assert placed_sums(dest) == before["sums"] and (dest / ".cla2-stamp.json").read_text() == before["stamp"]
    assert not (dest.parent / ".m.cla2-partial").exists()


COMMENTS = "# sha256 of the files\n# (none yet)\n"


# (an empty `manifest` without manifest_file means "none given": the next test is the explicit empty file)
@pytest.mark.parametrize("where, text", [("given", COMMENTS), ("given", "\n  \n"), ("source-file", COMMENTS),
                                         ("source-file", ""), ("source-file", "\n  \n")],
                         ids=["given-comments", "given-blank", "file-comments", "file-empty", "file-blank"])
def test_manifest_that_lists_no_file_is_refused_and_the_placed_copy_stays(tmp_path, where, text):
    src, dest, before = place_good_copy(tmp_path)
    args = {"dest": str(dest), "source_type": "path", "source": str(src)}
    if where == "given":
        args["manifest"] = text
    else:
        (src / "SHA256SUMS").write_text(text)
    res = run_module(tmp_path, **args)
    assert res.get("failed"), res
    assert "lists no file" in res["msg"] and "64 hex digits" in res["msg"], res["msg"]
    if where == "source-file":
        assert str(src / "SHA256SUMS") in res["msg"]
    assert_untouched(dest, before)


def test_explicit_empty_manifest_file_is_refused_not_replaced_by_a_computed_one(tmp_path):
    src, dest, before = place_good_copy(tmp_path)
    (src / "SHA256SUMS").unlink()
    make_source(src, {"config.json": 300, "model.safetensors": 70_000})  # a new version: it would be placed
    res = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src), manifest="",
                     manifest_file="/srv/kit/files/m.sha256")
    assert res.get("failed"), res
    assert "/srv/kit/files/m.sha256" in res["msg"] and "lists no file" in res["msg"], res["msg"]
    assert_untouched(dest, before)


@pytest.mark.parametrize("line3, expect", [
    ("%s  model.safetensors" % ("a" * 63), "line 3"),
    ("%s  model.safetensors" % ("g" * 64), "line 3"),
    ("%s  config.json" % ("b" * 64), "config.json twice, on lines 2 and 3"),
    ("%s  ./config.json" % ("b" * 64), "config.json twice, on lines 2 and 3"),
    ("%s  ../outside.bin" % ("c" * 64), "line 3"),
    ("%s  /etc/passwd" % ("c" * 64), "line 3"),
    ("%s  .cla2-stamp.json" % ("c" * 64), "line 3"),
], ids=["63-digits", "not-hex", "duplicate", "duplicate-dot-slash", "dotdot", "absolute", "kit-record"])
def test_malformed_manifest_line_is_refused_naming_the_line(tmp_path, line3, expect):
    src, dest, before = place_good_copy(tmp_path)
    good = (src / "SHA256SUMS").read_text().splitlines()
    text = f"# manifest\n{good[0]}\n{line3}\n{good[1]}\n"
    res = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src), manifest=text)
    assert res.get("failed"), res
    assert expect in res["msg"], res["msg"]
    assert_untouched(dest, before)


@pytest.mark.parametrize("source_type", ["path", "url"])
def test_symlink_planted_in_staging_is_never_written_through(tmp_path, source_type):
    src = tmp_path / "mirror" / "m"
    sums = make_source(src, SIZES)
    victim = tmp_path / "etc" / "precious.conf"
    victim.parent.mkdir()
    victim.write_bytes(b"do not touch\n" * 10)
    staging = tmp_path / "data" / ".m.cla2-partial"
    (staging / "sub").mkdir(parents=True)
    (staging / "config.json").symlink_to(victim)
    (staging / "sub" / "tokenizer.model").symlink_to(victim)
    dest = tmp_path / "data" / "m"
    args = {"dest": str(dest), "source_type": source_type, "manifest": manifest_text(sums)}
    with Server(tmp_path / "mirror") as server:
        args["source"] = server.url + "m" if source_type == "url" else str(src)
        res = run_module(tmp_path, **args)
    assert not res.get("failed"), res
    assert victim.read_bytes() == b"do not touch\n" * 10
    assert placed_sums(dest) == sums
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert res["symlinks_removed"] == ["config.json", "sub/tokenizer.model"]


def test_symlink_in_a_source_folder_is_followed_only_inside_the_folder(tmp_path):
    # issue 24 row 8: the module runs as root; a link in a shared source folder to a root-only file must not
    # be read and placed world-readable. A link to another file of the folder is followed.
    src = tmp_path / "mirror" / "m"
    sums = make_source(src, {"config.json": 300, "sub/tokenizer.model": 5000})
    (src / "tokenizer.model").symlink_to("sub/tokenizer.model")
    sums["tokenizer.model"] = sums["sub/tokenizer.model"]
    dest = tmp_path / "data" / "m"
    res = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src))
    assert not res.get("failed"), res
    assert placed_sums(dest) == sums and not (dest / "tokenizer.model").is_symlink()
    secret = tmp_path / "root-only" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    secret.chmod(0o600)
    (src / "generation_config.json").symlink_to(secret)
    (src / "sub" / "escape.json").symlink_to("../../../root-only/id_rsa")
    for manifest in ("", manifest_text({**sums, "generation_config.json": "0" * 64})):
        dest2 = tmp_path / "data" / "m2"
        res = run_module(tmp_path, dest=str(dest2), source_type="path", source=str(src), manifest=manifest)
        assert res.get("failed"), res
        assert f"generation_config.json in the source folder {src} is a symlink to {secret}, outside the folder" \
            in res["msg"] and "cp -L" in res["msg"], res["msg"]
        assert not dest2.exists() and not (tmp_path / "data" / ".m2.cla2-partial").exists()
    # the placed copy is untouched by the refused re-run of its source
    res = run_module(tmp_path, dest=str(dest), source_type="path", source=str(src))
    assert res.get("failed") and "outside the folder" in res["msg"], res
    assert placed_sums(dest) == sums


def test_a_token_in_the_url_query_goes_with_every_file(tmp_path):
    # issue 24 row 9: `…/models/m?token=…` fetched `/models/SHA256SUMS` without the token
    src = tmp_path / "mirror" / "m"
    sums = make_source(src, SIZES)
    (src / "SHA256SUMS").write_text(manifest_text(sums))
    with Server(tmp_path / "mirror") as server:
        server.token = "tok-9f8e7d"
        res = run_module(tmp_path, dest=str(tmp_path / "data" / "m"), source_type="url",
                         source=server.url + "m?token=tok-9f8e7d")
        assert not res.get("failed"), res
        assert placed_sums(tmp_path / "data" / "m") == sums
        assert server.queries and set(server.queries) == {"token=tok-9f8e7d"}
        assert "tok-9f8e7d" not in json.dumps(res)
        res = run_module(tmp_path, dest=str(tmp_path / "data" / "m2"), source_type="url", source=server.url + "m")
        assert res.get("failed") and "403" in res["msg"], res


def test_symlink_in_a_controller_transfer_is_refused(tmp_path):
    victim = tmp_path / "precious.conf"
    victim.write_text("secret\n")
    staging = tmp_path / "data" / ".m.cla2-partial"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"x" * 1000)
    (staging / "config.json").symlink_to(victim)
    res = run_module(tmp_path, dest=str(tmp_path / "data" / "m"), source_type="staged", source_stamp="s1")
    assert res.get("failed"), res
    assert "config.json" in res["msg"] and "symlink" in res["msg"], res["msg"]
    assert not (tmp_path / "data" / "m").exists() and victim.read_text() == "secret\n"


@pytest.mark.parametrize("staged", ["complete", "same-size-but-bad"])
def test_416_on_a_complete_file_missing_from_the_progress_record(tmp_path, staged):
    """A whole file in staging that the progress record does not list (a run killed between the file's
    fsync and the record) is resumed at its size; nginx and S3 answer 416. Its hash decides."""
    src = tmp_path / "mirror" / "m"
    sums = make_source(src, SIZES)
    big = "model-00001-of-00002.safetensors"
    staging = tmp_path / "data" / ".m.cla2-partial"
    staging.mkdir(parents=True)
    data = (src / big).read_bytes()
    (staging / big).write_bytes(data if staged == "complete" else data[:-1] + bytes([data[-1] ^ 1]))
    dest = tmp_path / "data" / "m"
    with Server(tmp_path / "mirror") as server:
        args = {"dest": str(dest), "source_type": "url", "source": server.url + "m", "manifest": manifest_text(sums)}
        res = run_module(tmp_path, **args)
        assert not res.get("failed"), res
        assert ("m/" + big, SIZES[big]) in server.range_requests
        if staged == "complete":
            assert res["bytes_resumed"] == SIZES[big]
            assert res["bytes_copied"] == sum(SIZES.values()) - SIZES[big]
        else:  # the copy was not the file: downloaded again from its first byte
            assert res["bytes_resumed"] == 0 and res["bytes_copied"] == sum(SIZES.values())
        assert placed_sums(dest) == sums
        again = run_module(tmp_path, **args)
        assert not again.get("failed") and not again["changed"], again


def run_in_small_fs(tmp_path: Path, mount: Path, size_mb: int, runs: list[dict]) -> tuple[list[dict], Path]:
    """Run the module once per argument set, in order, with `mount` a tmpfs of size_mb (in a private mount
    namespace: unshare -m as root, a user namespace otherwise). Returns the answers and a copy of what the
    tmpfs held at the end."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to mount a small file system")
    mount.mkdir(parents=True, exist_ok=True)
    snapshot = tmp_path / "snapshot"
    shutil.rmtree(snapshot, ignore_errors=True)
    script = [f"mount -t tmpfs -o size={size_mb}m cla2-test {mount} || exit 99"]
    for i, args in enumerate(runs):
        argfile = tmp_path / f"args-{i}.json"
        argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
        script.append(f"{sys.executable} {MODULE} {argfile} > {tmp_path}/out-{i}.json")
    script.append(f"mkdir {snapshot} && cp -a {mount}/. {snapshot}/")
    ns = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    proc = subprocess.run(ns + ["sh", "-c", "\n".join(script)], capture_output=True, text=True, timeout=300,
                          check=False, env=MODULE_ENV)
    if proc.returncode == 99 or "unshare failed" in proc.stderr:
        pytest.skip("cannot mount a tmpfs here: " + proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    return [json.loads((tmp_path / f"out-{i}.json").read_text()) for i in range(len(runs))], snapshot


def test_not_enough_space_is_refused_up_front_twice_the_size_while_replacing(tmp_path):
    v1, v2 = tmp_path / "share" / "v1", tmp_path / "share" / "v2"
    sums1 = make_source(v1, {"model.safetensors": 5 * MB})
    make_source(v2, {"model.safetensors": 5 * MB, "config.json": 300})
    fresh = tmp_path / "data" / "fresh"
    dest = tmp_path / "data" / "m"
    results, snap = run_in_small_fs(tmp_path, tmp_path / "data", 8, [
        {"dest": str(fresh), "source_type": "path", "source": str(v2)},   # 5 MB fits in 8 MB
        {"dest": str(dest), "source_type": "path", "source": str(v1)},    # fails: the first one holds 5
    ])
    assert not results[0].get("failed"), results[0]
    assert results[1].get("failed") and "not enough free space" in results[1]["msg"], results[1]
    results, snap = run_in_small_fs(tmp_path, tmp_path / "data", 8, [
        {"dest": str(dest), "source_type": "path", "source": str(v1)},    # placed: 5 of 8 MB
        {"dest": str(dest), "source_type": "path", "source": str(v2)},    # replacing needs 5 more: refused
    ])
    assert not results[0].get("failed"), results[0]
    msg = results[1].get("msg", "")
    assert results[1].get("failed"), results[1]
    assert "not enough free space in " + str(tmp_path / "data") in msg and "nothing was written" in msg, msg
    assert "twice the size" in msg and results[1]["bytes_needed"] > results[1]["bytes_free"], results[1]
    assert placed_sums(snap / "m") == sums1 and not (snap / ".m.cla2-partial").exists()


def test_disk_full_mid_copy_removes_the_partial_copy(tmp_path):
    """Sizes unknown up front (no HEAD), the disk fills up: the partial copy is removed, not kept."""
    src = tmp_path / "mirror" / "m"
    small = make_source(tmp_path / "mirror" / "m1", {"config.json": 300})
    sums = make_source(src, {"config.json": 300, "model.safetensors": 12 * MB})
    dest = tmp_path / "data" / "m"
    with Server(tmp_path / "mirror", head=False) as server:
        results, snap = run_in_small_fs(tmp_path, tmp_path / "data", 8, [
            {"dest": str(dest), "source_type": "url", "source": server.url + "m1", "manifest": manifest_text(small)},
            {"dest": str(dest), "source_type": "url", "source": server.url + "m", "manifest": manifest_text(sums)},
        ])
    assert not results[0].get("failed"), results[0]
    msg = results[1].get("msg", "")
    assert results[1].get("failed") and "filled up" in msg and "was removed" in msg, results[1]
    assert f"previous copy at {dest} is untouched" in msg, msg
    assert not (snap / ".m.cla2-partial").exists() and placed_sums(snap / "m") == small


def test_redirect_from_https_to_http_is_refused(tmp_path):
    src = tmp_path / "mirror" / "m"
    sums = make_source(src, {"config.json": 300})
    (src / "SHA256SUMS").write_text(manifest_text(sums))
    with Server(tmp_path / "mirror") as plain, Server(tmp_path / "mirror", ssl_dir=tmp_path) as tls:
        tls.redirect["m/"] = plain.url + "m/"
        res = run_module(tmp_path, dest=str(tmp_path / "data" / "m"), source_type="url", source=tls.url + "m",
                         validate_certs=False)
        assert res.get("failed"), res
        assert f"refused the redirect from {tls.url}m/SHA256SUMS to {plain.url}m/SHA256SUMS" in res["msg"], res["msg"]
        assert not (tmp_path / "data" / "m").exists()
        # http -> http, and https -> https, are followed
        plain.redirect["old/"] = plain.url + "m/"
        res = run_module(tmp_path, dest=str(tmp_path / "data" / "m"), source_type="url", source=plain.url + "old")
        assert not res.get("failed"), res
        tls.redirect = {"old/": tls.url + "m/"}
        res = run_module(tmp_path, dest=str(tmp_path / "data" / "m2"), source_type="url", source=tls.url + "old",
                         validate_certs=False)
        assert not res.get("failed"), res
        assert placed_sums(tmp_path / "data" / "m2") == sums


def run_module_raw(tmp_path: Path, **args) -> str:
    argfile = tmp_path / "args.json"
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    proc = subprocess.run([sys.executable, str(MODULE), str(argfile)], capture_output=True, text=True, timeout=120,
                          check=False, env=MODULE_ENV)
    return proc.stdout + proc.stderr


def test_url_credentials_are_never_printed_nor_returned(tmp_path):
    src = tmp_path / "mirror" / "m"
    sums = make_source(src, {"config.json": 300})
    (src / "SHA256SUMS").write_text(manifest_text(sums))
    with Server(tmp_path / "mirror") as server:
        host = server.url.split("//")[1]
        ok = f"http://deploy:Pa55-w0rd-x@{host}m"
        out = run_module_raw(tmp_path, dest=str(tmp_path / "data" / "m"), source_type="url", source=ok)
        assert '"changed": true' in out and "Pa55-w0rd-x" not in out, out
        # failures name the URL without its credentials: a missing manifest, a bad checksum
        out = run_module_raw(tmp_path, dest=str(tmp_path / "data" / "x"), source_type="url",
                             source=f"http://deploy:Pa55-w0rd-x@{host}nothing-here")
        assert "needs a manifest" in out and f"http://***@{host}nothing-here/SHA256SUMS" in out, out
        assert "Pa55-w0rd-x" not in out, out
        out = run_module_raw(tmp_path, dest=str(tmp_path / "data" / "y"), source_type="url",
                             source=f"http://{host}nothing-here?X-Amz-Signature=f00dfeedcafe&token=tok-123456")
        assert "needs a manifest" in out and "f00dfeedcafe" not in out and "tok-123456" not in out, out
