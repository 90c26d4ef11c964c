#!/usr/bin/python
# -*- coding: utf-8 -*-
# Why a module of our own instead of copy/synchronize + stat(checksum): weights are tens of GB and
# the kit must read them once. This module copies (from a folder on the host, e.g. a shared mount,
# or from a URL) and hashes in the same pass, with the hashing on a second thread so it overlaps the
# I/O and several files in flight at once so that every core hashes; it resumes a partial file
# (re-hashing only the prefix already there, HTTP Range for URLs); it stages next to the final folder
# and renames, so a half-copied model never appears under its final name; and it keeps a stamp of
# sizes and mtimes so a second run reads no weight at all.
from __future__ import annotations

DOCUMENTATION = r"""
---
module: cla2_weights
short_description: Place a model or dataset folder, verified against a sha256 manifest, read once
description:
  - C(state=query) reports whether I(dest) is placed and matches its stamp (sizes and mtimes) and the
    given manifest, reading no file data (or hashing every file with I(verify=full)).
  - C(state=placed) copies the source into a staging folder beside I(dest) while hashing, checks each
    file against the manifest, writes the manifest and the stamp, then renames the staging folder
    to I(dest). A bad checksum removes the staging copy and leaves a previous I(dest) untouched.
  - Before writing anything, the free space of the file system of I(dest) is checked against what is still
    to copy (sizes from the source folder, or from HEAD for URL files); a copy already at I(dest) stays
    until the new one is complete, so replacing it needs room for both. A disk that fills up all the same
    (ENOSPC) makes the module remove the partial copy and say so.
  - Files in the staging folder are opened without following symlinks; a symlink there is removed and its
    file fetched again (refused for C(staged) sources). A URL file already whole in staging that the server
    answers with 416 is re-hashed, and downloaded again when it does not match the manifest.
options:
  dest: {description: Final folder, type: path, required: true}
  source_type:
    description: C(path) a folder on the host, C(url) a base URL (files listed by the manifest),
      C(staged) files already transferred into the staging folder (controller sources, by rsync).
    type: str
    choices: [path, url, staged]
    default: path
  source:
    description: Folder on the host or base URL. In a folder, a symlink is followed only to a file inside the
      folder; one to a file elsewhere is refused (the module reads as root). A URL's query (a token, a
      signature) is sent with every file's request. Credentials in a URL (C(user:password@), or query
      parameters such as C(token=), C(X-Amz-Signature=), C(sig=)) are masked in everything the module
      prints or returns. Redirects are followed from http to http or https and from https to https
      only; one from https to http is refused.
    type: str
  manifest:
    description: Text of an operator manifest (sha256sum format, one C(<64 hex digits>  <file>) line per
      file). Empty (and no I(manifest_file)) means look for I(manifest_name) in the source, and without
      one the kit writes the manifest. A manifest that lists no file (empty, comments only), a hash
      that is not 64 hex digits, a name outside the folder or a name listed twice is refused, and a
      copy already placed stays untouched.
    type: str
  manifest_file:
    description: Where I(manifest) was read from (the item's manifest file on the controller), named in
      errors. When it is set, I(manifest) must list files; an empty one is refused instead of being taken
      for "no manifest given".
    type: str
  manifest_name:
    description: Name of an operator manifest inside the source folder (sha256sum format), used
      when I(manifest) is empty.
    type: str
    default: SHA256SUMS
  source_stamp: {description: Digest of the source listing computed by the caller, type: str}
  source_label: {description: How to name the source in messages (the controller folder for staged sources), type: str}
  state:
    description: C(query) reports whether I(dest) is placed and current and changes nothing; C(placed) places it.
    type: str
    choices: [query, placed]
    default: placed
  verify:
    description: C(stamp) compares sizes and mtimes with the stamp; C(full) also re-hashes every placed file.
    type: str
    choices: [stamp, full]
    default: stamp
  timeout: {description: Seconds for each URL request to answer, type: int, default: 60}
  validate_certs: {description: Check the TLS certificates of URL sources, type: bool, default: true}
  mode: {description: Mode of the placed files, type: str, default: "0644"}
  workers:
    description: Files copied and hashed at once; 0 is one per CPU core of the host, at most 8.
    type: int
    default: 0
"""

import concurrent.futures
import errno
import hashlib
import http.client
import json
import mmap
import os
import queue
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url
from ansible_collections.cla2.mlu.plugins.module_utils import cla2_urls

CHUNK = 8 << 20
MAX_WORKERS = 8


def _sync_file_range():
    """libc's sync_file_range (Linux), to start writing each chunk to disk as soon as it is copied,
    so the disk works while the next chunks are copied and hashed; None where it is not available."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (ImportError, OSError, AttributeError):
        return None


SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2
META_MANIFEST = ".cla2-manifest.sha256"
META_STAMP = ".cla2-stamp.json"
META_PROGRESS = ".cla2-progress.json"
# Written by cla2_convert after placement (the .bin weights converted to safetensors, beside them): the files
# it lists are the conversion's, checked by it, not part of what was placed.
META_CONVERT = ".cla2-convert.json"
META = (META_MANIFEST, META_STAMP, META_PROGRESS, META_CONVERT)
CONVERT_TEMP = re.compile(r"\.[^/]+\.cla2-tmp-\d+$")  # a conversion killed mid-way; removed by the next one


class PlaceError(Exception):
    pass


MAX_REDIRECTS = 10
REDIRECTS = (301, 302, 303, 307, 308)
def redact(url):
    """url without its credentials, for messages: https://***@host/path?token=*** (module_utils/cla2_urls.py)."""
    return cla2_urls.redact(url, whole_query=False)


class Stopped(Exception):
    """A file's copy was abandoned because another file failed."""


def worker_count(wanted, files):
    """Files in flight at once: `wanted`, or with 0 one per CPU core this process may run on."""
    if wanted <= 0:
        try:
            wanted = min(len(os.sched_getaffinity(0)), MAX_WORKERS)
        except AttributeError:
            wanted = min(os.cpu_count() or 1, MAX_WORKERS)
    return max(1, min(wanted, files))


def for_each_file(names, work, workers, stop):
    """work(rel) for every name, `workers` files at a time, largest first where the caller sorted them.

    One sha256 stream runs on one core at about the speed of a disk copy, so hashing file after file
    cannot keep up with `cp` on a fast disk; hashlib and the copy system calls release the GIL, so
    threads put every core to work. The first error sets `stop`: files not yet started are skipped,
    files in flight give up at their next chunk, and once every thread has stopped the error is raised.
    """
    def guarded(rel):
        if stop.is_set():
            return
        try:
            work(rel)
        except Stopped:
            pass
        except BaseException:
            stop.set()
            raise

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(guarded, rel) for rel in names]
    for future in futures:
        if future.exception() is not None:
            raise future.exception()


MANIFEST_LINE = "'<64 hex digits of sha256>  <file name>' (what `sha256sum FILE` prints)"
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}$")


def parse_manifest(text, label="the manifest"):
    """name -> sha256 of a sha256sum-format manifest; `label` names it in errors.

    Refused, naming the line: a hash that is not 64 hex digits, a name outside the folder (absolute,
    `..`) or one of the kit's own files, and a name listed twice (which line would win is a guess).
    Refused as a whole: a manifest without any file line (empty, or comments only): placing it would
    replace a good copy with an empty folder."""
    entries = {}
    lines = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not SHA256_HEX.match(parts[0]):
            raise PlaceError("%s, line %d: %r is not a manifest line; a valid line is %s"
                             % (label, number, line, MANIFEST_LINE))
        name = parts[1].lstrip("*").strip()
        if name.startswith("./"):
            name = name[2:]
        try:
            name = safe_rel(name)
        except PlaceError as exc:
            raise PlaceError("%s, line %d: %s" % (label, number, exc))
        if name in lines:
            raise PlaceError("%s lists %s twice, on lines %d and %d: keep one line per file"
                             % (label, name, lines[name], number))
        lines[name] = number
        entries[name] = parts[0].lower()
    if not entries:
        raise PlaceError("%s lists no file (it is empty or holds only comments): nothing would be placed, "
                         "and a copy already placed would be replaced by an empty folder; a valid line is %s"
                         % (label, MANIFEST_LINE))
    return entries


def format_manifest(entries):
    return "".join("%s  %s\n" % (entries[k], k) for k in sorted(entries))


def safe_rel(rel):
    norm = os.path.normpath(rel)
    if os.path.isabs(norm) or norm in (".", "", "..") or norm.startswith("../"):
        raise PlaceError("%r is a path outside the folder (absolute or through '..'): name files relative "
                         "to the folder" % rel)
    if norm in META:
        raise PlaceError("%r is a name the kit keeps for its own records in the placed folder" % rel)
    return norm


def walk_files(root):
    """Relative paths of the regular files under root, without the kit's own files."""
    out = []
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(base, name)
            rel = os.path.relpath(full, root)
            if rel in META or not os.path.isfile(full):
                continue
            out.append(rel)
    return out


def source_file(root, rel):
    """The file to read for `rel` of a host source folder. A symlink in the folder is followed only to a
    file inside the folder itself: the module runs as root, so a link to a file elsewhere (a root-only
    key, /etc/shadow) would otherwise be read with root's rights and placed with I(mode) for anyone to
    read. The link is refused, naming it and its target, before anything is written."""
    path = os.path.join(root, rel)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise PlaceError("%s in the source folder %s is a symlink to %s, outside the folder: the kit follows "
                         "links only to files inside the source folder (it reads as root and would place the "
                         "target for anyone to read). Copy the file itself into the folder (cp -L), or name the "
                         "folder that holds the real files as the source" % (rel, root, real))
    return real


def listing_stamp(root, names):
    """Sizes and mtimes of the files: the cheap identity that a re-run compares."""
    items = {}
    for rel in names:
        st = os.stat(os.path.join(root, rel))
        items[rel] = [st.st_size, st.st_mtime_ns]
    return items


def human(n):
    """Bytes for a message: 26.4 GiB (26400000000 bytes)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return "%.1f %s (%d bytes)" % (n / size, unit, n)
    return "%d bytes" % n


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def open_nofollow(path, flags, mode=0o600):
    """os.open that never goes through a symlink at `path` (ELOOP instead): the staging folder is
    written by root, and a link planted in it must not make the kit write over what it points to."""
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


def write_file_durable(path, data):
    tmp = path + ".tmp"
    if os.path.islink(tmp):
        os.unlink(tmp)
    with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "w") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Hasher(object):
    """sha256 on its own thread: hashlib releases the GIL, so hashing overlaps the copy."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.q = queue.Queue(maxsize=6)
        self.t = threading.Thread(target=self._run)
        self.t.daemon = True
        self.t.start()

    def _run(self):
        while True:
            buf = self.q.get()
            if buf is None:
                self.q.task_done()
                return
            self.h.update(buf)
            if isinstance(buf, memoryview):
                buf.release()
            self.q.task_done()

    def update(self, buf):
        self.q.put(buf)

    def wait(self):
        """Every queued buffer is hashed (and a memoryview released)."""
        self.q.join()

    def close(self):
        """End the thread (after what is queued); safe to call twice."""
        if self.t.is_alive():
            self.q.put(None)
            self.t.join()

    def hexdigest(self):
        self.close()
        return self.h.hexdigest()


def kernel_copy_hashed(src, target, have, hasher, stop):
    """Copy src into target from offset `have`, hashing as it goes; returns the bytes copied.

    Each chunk is copied by the kernel (copy_file_range, as `cp` does: no pass through a Python
    buffer), then hashed on the hasher's thread from a read-only mapping of the source while the
    kernel copies the next chunk. The source is fetched from its storage once; the hash is of the
    source bytes, which the manifest is about. Without copy_file_range (older kernels or Pythons,
    some cross-file-system pairs) the chunk is written from the mapping with pwrite.
    """
    with open(src, "rb", buffering=0) as fin:
        size = os.fstat(fin.fileno()).st_size
        try:
            os.posix_fadvise(fin.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        fd = open_nofollow(target, os.O_WRONLY | os.O_CREAT)
        try:
            os.ftruncate(fd, have)
            if size > have:
                mm = mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ)
                view = memoryview(mm)
                kernel = hasattr(os, "copy_file_range")
                try:
                    off = have
                    while off < size:
                        if stop.is_set():
                            raise Stopped()
                        n = min(CHUNK, size - off)
                        done = 0
                        while done < n:
                            k = 0
                            if kernel:
                                try:
                                    k = os.copy_file_range(fin.fileno(), fd, n - done, off + done, off + done)
                                except OSError as exc:
                                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                                        raise
                                    kernel = False
                                    continue
                            else:
                                k = os.pwrite(fd, view[off + done:off + n], off + done)
                            if k == 0:
                                raise PlaceError("%s shrank while it was copied" % src)
                            done += k
                        hasher.update(view[off:off + n])
                        if SYNC_FILE_RANGE is not None:
                            SYNC_FILE_RANGE(fd, off, n, SYNC_FILE_RANGE_WRITE)
                        off += n
                finally:
                    hasher.wait()
                    view.release()
                    mm.close()
            os.fsync(fd)
        finally:
            os.close(fd)
    return size - have


def hash_prefix(hasher, path, length, stop):
    with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb", buffering=0) as fh:
        left = length
        while left:
            if stop.is_set():
                raise Stopped()
            buf = fh.read(min(CHUNK, left))
            if not buf:
                raise PlaceError("%s shrank while resuming" % path)
            hasher.update(buf)
            left -= len(buf)


def pump(reader, out, hasher, stop):
    n = 0
    while True:
        if stop.is_set():
            raise Stopped()
        buf = reader(CHUNK)
        if not buf:
            return n
        hasher.update(buf)
        out.write(buf)
        n += len(buf)


class Placer(object):
    def __init__(self, module):
        self.m = module
        p = module.params
        self.dest = p["dest"].rstrip("/")
        self.parent = os.path.dirname(self.dest)
        self.name = os.path.basename(self.dest)
        self.staging = os.path.join(self.parent, "." + self.name + ".cla2-partial")
        self.source_type = p["source_type"]
        self.source = p["source"]
        self.mode = int(p["mode"], 8)
        self.workers = p["workers"]
        self.result = {"changed": False, "dest": self.dest, "staging": self.staging, "bytes_copied": 0,
                       "bytes_resumed": 0, "bytes_hashed": 0, "seconds": 0.0, "files": 0}

    # ---- source side -------------------------------------------------------------------------
    def url_of(self, rel):
        """The URL of one file of a URL source: the file's name after the source's path, with the source's
        query (a token, a signature) kept on every request."""
        parts = urllib.parse.urlsplit(self.source)
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return urllib.parse.urlunsplit(parts._replace(path=path + urllib.parse.quote(rel), fragment=""))

    def open_url(self, url, offset=0, method="GET"):
        """open_url with redirects followed here, so each hop is checked: a redirect from https to
        anything else (plain http) is refused, since the manifest may then come over a link anyone on
        the way can alter. Credentials in the URL go to later hops only on the same scheme, host and port."""
        headers = {"Range": "bytes=%d-" % offset} if offset else {}
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                return open_url(url, method=method, headers=headers, timeout=self.m.params["timeout"],
                                validate_certs=self.m.params["validate_certs"], follow_redirects="none")
            except urllib.error.HTTPError as exc:
                location = exc.headers.get("Location") if exc.code in REDIRECTS and exc.headers else None
                if not location:
                    raise
                exc.close()
                nxt = urllib.parse.urljoin(url, location)
                old, new = urllib.parse.urlsplit(url), urllib.parse.urlsplit(nxt)
                if new.scheme not in ("http", "https") or (old.scheme == "https" and new.scheme != "https"):
                    raise PlaceError("refused the redirect from %s to %s: a URL source may be redirected from "
                                     "https only to https, never to %s (a download over it could be altered on "
                                     "the way); give the item the final https URL or fix the mirror"
                                     % (redact(url), redact(nxt), new.scheme or "a relative URL"))
                if old.username is not None and new.username is None and \
                        (old.scheme, old.hostname, old.port) == (new.scheme, new.hostname, new.port):
                    nxt = urllib.parse.urlunsplit(new._replace(netloc=old.netloc))
                url = nxt
        raise PlaceError("%s redirected more than %d times" % (redact(url), MAX_REDIRECTS))

    def operator_manifest(self):
        """The operator's manifest: given, or a file named manifest_name in the source, or None.

        One that is given must list files: an empty one (an item's manifest file with nothing in it) is
        refused rather than taken for "none given"."""
        p = self.m.params
        if p["manifest"] or p["manifest_file"]:
            label = "manifest %s" % p["manifest_file"] if p["manifest_file"] else "the given manifest"
            return parse_manifest(p["manifest"] or "", label)
        mname = p["manifest_name"]
        if self.source_type == "path":
            path = os.path.join(self.source, mname)
            if os.path.isfile(path):
                with open(path) as fh:
                    return parse_manifest(fh.read(), "manifest %s" % path)
        elif self.source_type == "url":
            try:
                text = self.open_url(self.url_of(mname)).read().decode()
            except PlaceError:
                raise
            except Exception as exc:
                raise PlaceError("a URL source needs a manifest: none given and %s could not be read: %s"
                                 % (redact(self.url_of(mname)), exc))
            return parse_manifest(text, "manifest %s" % redact(self.url_of(mname)))
        elif self.source_type == "staged":
            path = os.path.join(self.staging, mname)
            if os.path.isfile(path):
                with open(path) as fh:
                    return parse_manifest(fh.read(), "manifest %s" % os.path.join(
                        p["source_label"] or self.staging, mname))
        return None

    def source_identity(self, manifest):
        """What identifies the source without reading its data."""
        if self.m.params["source_stamp"]:
            return self.m.params["source_stamp"]
        if self.source_type == "path":
            if not os.path.isdir(self.source):
                raise PlaceError("source folder %s is not there on the host" % self.source)
            return digest(listing_stamp(self.source, walk_files(self.source)))
        return digest(manifest or {})

    # ---- destination side --------------------------------------------------------------------
    def query(self, manifest, identity):
        """None when dest is placed and current, else the reason it is not."""
        stamp = read_json(os.path.join(self.dest, META_STAMP))
        if not os.path.isdir(self.dest):
            return "not placed"
        if stamp is None:
            return "unmanaged"
        if manifest is not None and manifest != stamp.get("manifest"):
            return "manifest changed"
        if identity != stamp.get("source"):
            return "source changed"
        converted = (read_json(os.path.join(self.dest, META_CONVERT)) or {}).get("outputs") or {}
        names = [n for n in walk_files(self.dest) if n not in converted and not CONVERT_TEMP.match(n)]
        if listing_stamp(self.dest, names) != stamp.get("files"):
            return "files changed since placed (sizes or mtimes)"
        if self.m.params["verify"] == "full":
            bad = self.verify_all(self.dest, stamp.get("manifest") or {})
            if bad:
                return "checksum mismatch: " + ", ".join(bad)
        return None

    def verify_all(self, root, manifest):
        """Names of the files under root that are missing or do not match the manifest."""
        bad = []
        lock = threading.Lock()

        def check(rel):
            h = hashlib.sha256()
            n = 0
            try:
                with open(os.path.join(root, rel), "rb", buffering=0) as fh:
                    for buf in iter(lambda: fh.read(CHUNK), b""):
                        h.update(buf)
                        n += len(buf)
            except OSError:
                with lock:
                    bad.append(rel + " (missing)")
                return
            with lock:
                self.result["bytes_hashed"] += n
                if h.hexdigest() != manifest[rel]:
                    bad.append(rel)

        names = self.largest_first(root, manifest)
        for_each_file(names, check, worker_count(self.workers, len(names)), threading.Event())
        return sorted(bad)

    @staticmethod
    def largest_first(root, names):
        """Names ordered by the size of root/name, largest first (missing files last), so that the
        workers finish together instead of one big file starting last."""
        def size(rel):
            try:
                return os.path.getsize(os.path.join(root, rel))
            except OSError:
                return -1
        return sorted(sorted(names), key=size, reverse=True)

    def copy_one(self, rel, progress, expected_size, expected_sha, stop):
        """Copy one file into staging, hashing as it goes; resume a partial copy. Returns
        (sha256, bytes copied, bytes resumed, bytes hashed from staging).

        A partial file is continued only when a manifest will check the result (expected_sha):
        otherwise a prefix damaged by a crash would end up in the kit's own manifest."""
        target = os.path.join(self.staging, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        done = progress.get(rel)
        if done and os.path.isfile(target) and os.path.getsize(target) == done["size"] \
                and (expected_size is None or expected_size == done["size"]):
            return done["sha256"], 0, 0, 0
        h = Hasher()
        try:
            if self.source_type == "staged":
                try:
                    size = os.path.getsize(target)
                    hash_prefix(h, target, size, stop)
                except OSError:
                    raise PlaceError("%s was not transferred into %s" % (rel, self.staging))
                return h.hexdigest(), 0, 0, size
            have = os.path.getsize(target) if os.path.isfile(target) else 0
            if (expected_size is not None and have > expected_size) or not expected_sha:
                have = 0
            if have:
                hash_prefix(h, target, have, stop)
            if self.source_type == "path":
                src = source_file(self.source, rel)
                if not os.path.isfile(src):
                    raise PlaceError("%s is listed in the manifest but missing from %s" % (rel, self.source))
                n = kernel_copy_hashed(src, target, have, h, stop)
            else:
                url = self.url_of(rel)
                try:
                    resp = self.open_url(url, have)
                except urllib.error.HTTPError as exc:
                    if not (have and exc.code == 416):
                        raise PlaceError("could not download %s: %s" % (redact(url), exc))
                    # 416: nothing at or past the byte asked for, so the copy in staging is as long as the
                    # file (or longer), e.g. complete but not yet in the progress record (nginx and S3 answer
                    # so). Its hash decides: the same as the manifest's, it is complete; else start over.
                    total = (exc.headers.get("Content-Range") or "").rpartition("/")[2] if exc.headers else ""
                    exc.close()
                    if (not total.isdigit() or int(total) == have) and h.hexdigest() == expected_sha:
                        os.chmod(target, self.mode)
                        return expected_sha, 0, have, 0
                    h.close()
                    h = Hasher()
                    have = 0
                    try:
                        resp = self.open_url(url)
                    except urllib.error.HTTPError as exc2:
                        raise PlaceError("could not download %s: %s" % (redact(url), exc2))
                if have and getattr(resp, "status", getattr(resp, "code", 200)) != 206:
                    # The server ignored the Range: start this file over.
                    h.close()
                    h = Hasher()
                    have = 0
                length = resp.headers.get("Content-Length")
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if have else os.O_TRUNC)
                with os.fdopen(open_nofollow(target, flags), "ab" if have else "wb", buffering=0) as fout:
                    try:
                        n = pump(resp.read, fout, h, stop)
                        # http.client ends a body that stops short of its Content-Length as if it were
                        # complete: a connection that broke off must be told from the end of the file.
                        if length is not None and length.isdigit() and n != int(length):
                            raise http.client.IncompleteRead(b"", int(length) - n)
                    except http.client.HTTPException as exc:
                        raise PlaceError("the download of %s broke off after %d bytes (%s); the partial copy in "
                                         "%s is kept and the next run resumes it" % (
                                             redact(url), os.fstat(fout.fileno()).st_size, type(exc).__name__,
                                             self.staging))
                    os.fsync(fout.fileno())
            os.chmod(target, self.mode)
            return h.hexdigest(), n, have, 0
        finally:
            h.close()

    def remove_staging(self):
        shutil.rmtree(self.staging, ignore_errors=True)

    def drop_links(self):
        """Symlinks in the staging folder are never the kit's own (it writes regular files and folders
        only); one there could make a copy write over what it points to. For a host or URL source each is
        removed (never followed) and its file fetched again; a transfer from the controller (rsync, no
        links) that holds one is refused."""
        if os.path.islink(self.staging):
            os.unlink(self.staging)
        removed = []
        for base, dirs, files in os.walk(self.staging):
            for name in dirs + files:
                full = os.path.join(base, name)
                if os.path.islink(full):
                    rel = os.path.relpath(full, self.staging)
                    if self.source_type == "staged":
                        raise PlaceError("%s in the staging folder is a symlink (to %s), which the transfer from "
                                         "the controller does not make: remove %s and re-run"
                                         % (rel, os.readlink(full), self.staging))
                    os.unlink(full)
                    removed.append(rel)
        if removed:
            self.result["symlinks_removed"] = sorted(removed)
        return removed

    def url_sizes(self, names):
        """Sizes of the URL files from HEAD (Content-Length), where the server answers it; None if not."""
        sizes = {}
        for rel in names:
            try:
                resp = self.open_url(self.url_of(rel), method="HEAD")
                length = resp.headers.get("Content-Length")
                resp.close()
            except PlaceError:
                raise
            except Exception:
                length = None
            sizes[rel] = int(length) if length and length.isdigit() else None
        return sizes

    def check_space(self, names, sizes, keep_staged):
        """Refuse before writing anything when the data disk cannot hold the new copy.

        What is still to write is the files' sizes less what a resumable copy in staging already holds.
        A copy already placed stays in place until the new one is complete (and is removed after the
        rename), so replacing one takes room for both at once: twice the size of the model."""
        known = [rel for rel in names if sizes.get(rel) is not None]
        total = sum(sizes[rel] for rel in known)
        staged = 0
        for rel in known:
            path = os.path.join(self.staging, rel)
            if keep_staged and os.path.isfile(path) and not os.path.islink(path):
                staged += min(os.path.getsize(path), sizes[rel])
        needed = total - staged + 4096 * len(known) + (1 << 20)  # block rounding and the kit's records
        st = os.statvfs(self.parent)
        free = st.f_bavail * st.f_frsize
        if not known:
            return
        self.result.update(bytes_needed=needed, bytes_free=free)
        if needed <= free:
            return
        mount = os.path.realpath(self.parent)
        while not os.path.ismount(mount):
            mount = os.path.dirname(mount)
        placed = 0
        if os.path.isdir(self.dest):
            for rel in walk_files(self.dest):
                placed += os.path.getsize(os.path.join(self.dest, rel))
        raise PlaceError(
            "not enough free space in %s (the file system mounted at %s): the new copy needs %s free "
            "(%d files, %s in all%s, and a margin for the file system), %s is free%s; nothing was written: "
            "free %s there or point model_weights_data_root at a larger disk" % (
                self.parent, mount, human(needed), len(known), human(total),
                ", %s of it already in %s" % (human(staged), self.staging) if staged else "",
                human(free),
                "; the placed copy at %s (%s) stays until the new one is complete, so replacing it takes "
                "room for both (twice the size)" % (self.dest, human(placed)) if placed else "",
                human(needed - free)))

    def place(self, manifest, identity):
        try:
            self._place(manifest, identity)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The disk filled up (sizes unknown up front, or something else wrote to it meanwhile): a partial
            # copy that cannot be finished only keeps the disk full. Remove it.
            self.remove_staging()
            if self.result.get("bytes_needed"):
                before = "%s was free before the copy, %s needed" % (
                    human(self.result["bytes_free"]), human(self.result["bytes_needed"]))
            else:
                before = "the sizes were not known before the copy%s" % (
                    ": the server does not answer HEAD with a Content-Length" if self.source_type == "url" else "")
            raise PlaceError("the file system of %s filled up while copying (%s; %s): the partial copy in %s was "
                             "removed to free the disk%s; free space there and re-run" % (
                                 self.parent, exc.strerror, before, self.staging,
                                 ", the previous copy at %s is untouched" % self.dest
                                 if os.path.isdir(self.dest) else ""))

    def _place(self, manifest, identity):
        start = time.time()
        os.makedirs(self.parent, exist_ok=True)
        if os.path.islink(self.staging):
            os.unlink(self.staging)
        progress_path = os.path.join(self.staging, META_PROGRESS)
        progress = read_json(progress_path) if not os.path.islink(progress_path) else None
        if self.source_type != "staged" and os.path.isdir(self.staging):
            # A partial copy resumes when it is of this very source, or, when its origin is unknown,
            # if a manifest will catch a stale prefix. Otherwise it cannot be trusted: start over.
            if (progress or {}).get("source") != identity and not (progress is None and manifest is not None):
                self.remove_staging()
                progress = None
        sizes = {}
        if manifest is not None:
            names = sorted(manifest)
        elif self.source_type == "path":
            names = walk_files(self.source)
        elif self.source_type == "staged":
            names = walk_files(self.staging)
        else:
            raise PlaceError("a URL source needs a manifest")
        if self.source_type == "path":
            for rel in names:
                src = source_file(self.source, rel)
                if not os.path.isfile(src):
                    raise PlaceError("%s is listed in the manifest but missing from %s" % (rel, self.source))
                sizes[rel] = os.path.getsize(src)
        if self.source_type != "staged":
            self.check_space(names, sizes if self.source_type == "path" else self.url_sizes(names),
                             manifest is not None)
        os.makedirs(self.staging, exist_ok=True)
        for rel in self.drop_links():
            (progress or {}).get("files", {}).pop(rel, None)
        files = (progress or {}).get("files", {}) if (progress or {}).get("source") == identity else {}
        write_file_durable(progress_path, json.dumps({"source": identity, "files": files}))
        if self.source_type == "staged" and manifest is not None:
            missing = [n for n in names if not os.path.isfile(os.path.join(self.staging, n))]
            if missing:
                raise PlaceError("missing from the source folder: " + ", ".join(missing))
        computed = {}
        bad = []
        lock = threading.Lock()
        stop = threading.Event()

        def place_one(rel):
            sha, copied, resumed, hashed = self.copy_one(rel, files, sizes.get(rel), (manifest or {}).get(rel), stop)
            size = os.path.getsize(os.path.join(self.staging, rel))
            with lock:
                computed[rel] = sha
                self.result["bytes_copied"] += copied
                self.result["bytes_resumed"] += resumed
                self.result["bytes_hashed"] += hashed
                if manifest is not None and manifest[rel] != sha:
                    bad.append(rel)
                    stop.set()  # the item fails: the other files need not be finished
                    return
                files[rel] = {"size": size, "sha256": sha}
                write_file_durable(progress_path, json.dumps({"source": identity, "files": files}))

        root = self.source if self.source_type == "path" else self.staging
        order = self.largest_first(root, names) if self.source_type != "url" else names
        self.result["workers"] = worker_count(self.workers, len(names))
        for_each_file(order, place_one, self.result["workers"], stop)
        bad.sort()
        if bad:
            self.remove_staging()
            label = self.m.params["source_label"] or self.source or self.staging
            raise PlaceError("checksum mismatch for %s (from %s): the manifest says %s, the copy has %s; the bad "
                             "copy was removed%s" % (
                                 bad[0], os.path.join(label, bad[0]), manifest[bad[0]], computed[bad[0]],
                                 ", the previous copy at %s is untouched" % self.dest
                                 if os.path.isdir(self.dest) else ""))
        if self.source_type == "staged" and manifest is not None:
            # rsync brought everything in the source folder: keep what the manifest names.
            for rel in walk_files(self.staging):
                if rel not in manifest:
                    os.unlink(os.path.join(self.staging, rel))
        os.unlink(progress_path)
        write_file_durable(os.path.join(self.staging, META_MANIFEST), format_manifest(computed))
        final_names = walk_files(self.staging)
        stamp = {"manifest": computed if manifest is None else manifest, "source": identity,
                 "files": listing_stamp(self.staging, final_names),
                 "kit_manifest": manifest is None}
        write_file_durable(os.path.join(self.staging, META_STAMP), json.dumps(stamp, sort_keys=True))
        fsync_dir(self.staging)
        old = os.path.join(self.parent, "." + self.name + ".cla2-old")
        if os.path.isdir(self.dest):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.dest, old)
        os.rename(self.staging, self.dest)
        fsync_dir(self.parent)
        shutil.rmtree(old, ignore_errors=True)
        self.result.update(changed=True, files=len(final_names), seconds=round(time.time() - start, 3))


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            source_type=dict(type="str", choices=["path", "url", "staged"], default="path"),
            source=dict(type="str"),
            manifest=dict(type="str", no_log=False),
            manifest_file=dict(type="str"),
            manifest_name=dict(type="str", default="SHA256SUMS"),
            source_stamp=dict(type="str"),
            source_label=dict(type="str"),
            state=dict(type="str", choices=["query", "placed"], default="placed"),
            verify=dict(type="str", choices=["stamp", "full"], default="stamp"),
            timeout=dict(type="int", default=60),
            validate_certs=dict(type="bool", default=True),
            mode=dict(type="str", default="0644"),
            workers=dict(type="int", default=0),
        ),
        required_if=[("source_type", "path", ["source"]), ("source_type", "url", ["source"])],
        supports_check_mode=True,
    )
    if module.params["source_type"] == "url":
        # Credentials in the URL: Ansible masks these strings in all that the module returns, and every
        # message names the URL through redact() besides.
        module.no_log_values.update(cla2_urls.url_secrets(module.params["source"]))
    placer = Placer(module)
    try:
        manifest = placer.operator_manifest()
        identity = placer.source_identity(manifest)
        reason = placer.query(manifest, identity)
        placer.result["reason"] = reason or "up to date"
        placer.result["up_to_date"] = reason is None
        if reason == "unmanaged":
            raise PlaceError("%s exists but was not placed by the kit (no %s): move it away or remove it"
                             % (placer.dest, META_STAMP))
        if module.params["state"] == "query" or reason is None:
            module.exit_json(**placer.result)
        if module.check_mode:
            placer.result["changed"] = True
            module.exit_json(**placer.result)
        placer.place(manifest, identity)
    except PlaceError as exc:
        module.fail_json(msg="model_weights: %s: %s" % (placer.dest, exc), **placer.result)
    except (OSError, IOError) as exc:
        module.fail_json(msg="model_weights: %s: %s (the partial copy in %s is kept so the next run resumes)"
                         % (placer.dest, exc, placer.staging), **placer.result)
    module.exit_json(**placer.result)


if __name__ == "__main__":
    main()
