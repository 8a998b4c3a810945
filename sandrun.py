"""Sandrun: anonymous, ephemeral, sandboxed code execution over HTTP.

A client POSTs code (a snippet, files or an archive) with a JSON manifest;
Sandrun runs it in a Linux jail and the client reads status, logs and output
files until the job expires. No accounts, nothing kept past expiry or restart.

Threat model
    Untrusted: every HTTP client, and everything a job does or leaves behind
    (filenames, archive members, manifests, symlinks, FIFOs, hard links, huge
    or sparse files). Trusted: the kernel, the operator, this file, the host's
    /usr. The HTTP workers are unprivileged and may be compromised by a parser
    bug; the runner therefore treats the state directory as hostile too.

Processes and data flow
    gunicorn master (root, single-threaded)
      |- HTTP workers (user SANDRUN_HTTP_USER, threads): parse, validate, rate
      |    limit, write each job to STATE/http/queue/, wake the runner.
      `- runner keeper (root) -> runner (root, single-threaded)
           claims jobs FIFO, gets one jail per job from its jail factory
           (forked first, before it reads any job), supervises all of them
           in one selector loop, writes results to STATE/runner/jobs/<id>/.

    client --HTTP--> worker --STATE/http/queue/<seq>.<id>/--> runner
    factory --clone--> C2 = pid 1 of new namespaces (the runner's child), then of the jail's cgroup:
    mounts, pivot_root, network, then drops privileges and loads seccomp;
    built ahead ("spare"), it then waits for its job; given one, unpacks it
    as the job's user, spawns C3, which execs the interpreter, and stays as
    the jail's init until C3 ends.
    worker <--STATE/runner/jobs/<id>/ (status.json, stdout, stderr, files/)--

Invariants
    * The host never follows a path a client or a job controls: state-dir
      walks use directory fds and O_NOFOLLOW, outputs are copied from a
      directory fd of the job's own tmpfs, regular single-link files only.
    * Fail closed: a jail step that fails ends the job with reason
      internal_error before execve; a host that cannot jail refuses to serve.
    * No state in a worker's memory: jobs, queue order and rate-limit ledgers
      live in STATE_DIR, a size-capped tmpfs; client addresses appear only as
      keyed hashes whose key lives in memory.
    * Logs carry one key=value line per job transition; never job content,
      never a client address; an exception is logged by its type and place.
    * One job's failure ends that job, never the runner (Runner._guard), and
      what a job or a client controls costs bounded, linear work.

Contents (grep -n '^# [0-9]')
    1. Settings and limits
    2. Errors, 2.1 process state, 2.2 helpers used everywhere
    3. HTTP intake: 3.1 client identity and rate limits, 3.2 manifests,
       3.3 uploads, 3.4 multipart bodies, 3.5 from a request to a queued job
    4. Job spool and queue: 4.1 metrics, 4.2 state files, 4.3 the lock, the
       queue's protocol and quotas, 4.4 admission, 4.5 status records
    5. Sandbox: 5.1 kernel bindings, 5.2 seccomp, 5.3 cgroups, 5.4 the jail,
       5.5 host check and languages
    6. Runner: 6.1 a job and how it ends, 6.2 the Runner: 6.3 start
       and loop, 6.4 claiming, 6.5 spare jails, 6.6 supervision, 6.7 results,
       6.8 deletion, expiry and shutdown
    7. WSGI application: 7.1 answers and waits, 7.2 routes, 7.3 routing,
       7.4 the metric families and the OpenAPI document, 7.5 the HTTP worker
    8. Process management and command line
"""

import array
import base64
import bz2
import codecs
import collections
import contextlib
import ctypes
import ctypes.util
import email.message
import email.utils
import errno
import fcntl
import functools
import gc
import grp
import gzip
import hashlib
import heapq
import hmac
import io
import ipaddress
import itertools
import json
import logging
import lzma
import mimetypes
import os
import pwd
import re
import resource
import secrets
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.parse
import zipfile
import zlib

import gunicorn.workers.gthread
import prctl
import webob
import webob.exc
import webob.static

__all__ = ["HostError", "app", "main", "runner_launch", "server_start", "server_stop", "worker_start"]

VERSION = "1.0.0"
log = logging.getLogger("sandrun")


# 1. Settings and limits ------------------------------------------------------
# Every limit is a SANDRUN_<NAME> environment variable, read and checked when
# the module is imported (a bad value stops the server before it serves).
# Units are in the names. There is no "0 means unlimited".


KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class SettingsError(Exception):
    """A SANDRUN_* setting is malformed or inconsistent."""


#: Every SANDRUN_* setting and its default, for the docs test and `sandrun.py check`.
SETTINGS = {}


def _setting(name):
    """SANDRUN_<name> from the environment; else, under systemd, the credential sandrun.<name in
    lower case> (how a booted image is configured without changing its disk); else None."""
    raw = os.environ.get("SANDRUN_" + name)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if raw is not None or not credentials:
        return raw
    try:
        with open(os.path.join(credentials, "sandrun." + name.lower()), "rb") as f:
            data = f.read(4 * KiB + 1)
    except FileNotFoundError:
        return None  # no such credential: the setting keeps its default
    except OSError as exc:
        raise SettingsError(f"credential sandrun.{name.lower()}: {exc}") from None
    if len(data) > 4 * KiB:
        raise SettingsError(f"credential sandrun.{name.lower()} is over {4 * KiB} bytes")  # never cut to a shorter value
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise SettingsError(f"credential sandrun.{name.lower()} is not UTF-8") from None


def _env_int(name, default, low, high):
    SETTINGS["SANDRUN_" + name] = default
    raw = _setting(name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise SettingsError(f"SANDRUN_{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"SANDRUN_{name}={value} is outside {low}..{high}")
    return value


def _env_str(name, default):
    SETTINGS["SANDRUN_" + name] = default
    raw = _setting(name)
    return default if raw is None else raw

#: Where jobs, the queue and rate-limit ledgers live; mounted as a tmpfs if it is not one.
STATE_DIR = os.path.abspath(_env_str("STATE_DIR", "/run/sandrun"))
#: Size of that tmpfs: bounds everything the service keeps (uploads, logs, outputs).
STATE_TMPFS_BYTES = _env_int("STATE_TMPFS_BYTES", 2 * GiB, 64 * MiB, 64 * GiB)
#: Listen address of the HTTP server (gunicorn "bind").
HTTP_BIND = _env_str("BIND", "127.0.0.1:8443")
#: The unprivileged account the HTTP workers run as.
HTTP_USER = _env_str("HTTP_USER", "sandrun")
#: This node's name in a cluster (README: "Run a cluster"): in every job id, in GET / and in
#: /metrics, so that the front routes a job's requests to the node that holds it. Empty: a lone server.
NODE = _env_str("NODE", "")
if not re.fullmatch(r"[a-z0-9]{0,16}", NODE):
    raise SettingsError(f"SANDRUN_NODE={NODE!r}: a node name is 1 to 16 of a-z and 0-9, or empty")
#: HTTP worker processes; each holds HTTP_THREADS threads (long-polls park a thread).
HTTP_WORKERS = _env_int("HTTP_WORKERS", 2, 1, 64)
HTTP_THREADS = _env_int("HTTP_THREADS", 16, 1, 256)
#: Seconds a client may take to send a whole request to a direct bind (headers and body);
#: behind nginx, nginx reads it first. Past it the connection is closed.
REQUEST_READ_S = _env_int("REQUEST_READ_S", 30, 1, 3600)
#: Peers whose X-Forwarded-For is believed (comma-separated; gunicorn's forwarded_allow_ips).
FORWARDED_ALLOW_IPS = _env_str("FORWARDED_ALLOW_IPS", "")
#: Jobs running at once: one CPU's worth of bandwidth each.
MAX_RUNNING = _env_int("MAX_RUNNING", os.cpu_count() or 1, 1, 1024)
#: Jobs waiting at once; past it, 503.
MAX_QUEUED = _env_int("MAX_QUEUED", 100, 1, 100_000)
#: Wall-clock limit per job (and the default), also its CPU-time cap.
JOB_TIMEOUT_S = _env_int("JOB_TIMEOUT_S", 300, 1, 3600)
#: Memory per job, tmpfs files included (and the default); swap is never allowed.
JOB_MEMORY_MAX_BYTES = _env_int("JOB_MEMORY_MAX_BYTES", 512 * MiB, 16 * MiB, 64 * GiB)
#: The smallest memory limit a manifest may ask for: below it interpreters do not start.
JOB_MEMORY_MIN_BYTES = 16 * MiB
#: Processes and threads per job (pids cgroup): contains fork bombs.
JOB_PIDS_MAX = _env_int("JOB_PIDS_MAX", 32, 4, 4096)
#: Size of the job's work directory (tmpfs) and the largest file a job may write.
JOB_WORKDIR_MAX_BYTES = _env_int("JOB_WORKDIR_MAX_BYTES", 100 * MiB, 1 * MiB, 16 * GiB)
#: Size of the job's private /tmp and /dev/shm (each).
JOB_TMP_MAX_BYTES = _env_int("JOB_TMP_MAX_BYTES", 64 * MiB, 1 * MiB, 16 * GiB)
#: Files, directories and links in the job's /work, and in each of its /tmp and /dev/shm
#: (tmpfs nr_inodes): each costs the runner a step when it collects outputs.
JOB_WORKDIR_INODES_MAX = _env_int("JOB_WORKDIR_INODES_MAX", 16384, 64, 10_000_000)
JOB_TMP_INODES_MAX = _env_int("JOB_TMP_INODES_MAX", 16384, 64, 10_000_000)
#: Open files per process in a job (RLIMIT_NOFILE).
JOB_NOFILE_MAX = _env_int("JOB_NOFILE_MAX", 256, 16, 65536)
#: The uid and gid a job runs as; no host account may own it.
JOB_UID = _env_int("JOB_UID", 61000, 1000, 2**31 - 2)
#: Bytes kept per output stream; past it the job is stopped (reason output_limit).
OUTPUT_STREAM_MAX_BYTES = _env_int("OUTPUT_STREAM_MAX_BYTES", 10 * MiB, 1 * KiB, 1 * GiB)
#: Output files collected per job, and the bytes of their names: all of them go into the
#: job's status record, which every /status answer reads. Past either, files are left out.
OUTPUT_FILES_MAX = _env_int("OUTPUT_FILES_MAX", 1000, 1, 20_000)
OUTPUT_NAMES_MAX_BYTES = _env_int("OUTPUT_NAMES_MAX_BYTES", 256 * KiB, 4 * KiB, 4 * MiB)
#: Directory entries the output walk looks at per job (hard links make entries cheap to
#: make, so this is not the inode cap), and how deep it goes.
OUTPUT_ENTRIES_MAX = _env_int("OUTPUT_ENTRIES_MAX", 50_000, 100, 10_000_000)
OUTPUT_DEPTH_MAX = _env_int("OUTPUT_DEPTH_MAX", 32, 1, 128)
#: Wall time one job's output collection may take; the runner interleaves it with
#: everything else, and past it the rest is left out.
OUTPUT_COLLECT_MAX_S = _env_int("OUTPUT_COLLECT_MAX_S", 30, 1, 3600)
#: Wildcards ('*', '?') in one output glob.
OUTPUT_GLOB_WILDCARDS_MAX = 32
#: Request body size; larger bodies get 413 before they are read.
UPLOAD_MAX_BYTES = _env_int("UPLOAD_MAX_BYTES", 100 * MiB, 1 * MiB, 16 * GiB)
#: Manifest and JSON body size.
MANIFEST_MAX_BYTES = 2 * MiB
#: Bytes an upload may unpack to, counted while decompressing.
UNPACKED_MAX_BYTES = _env_int("UNPACKED_MAX_BYTES", 100 * MiB, 1 * MiB, 16 * GiB)
#: Files, directories and links an upload may unpack to.
UNPACKED_MEMBERS_MAX = _env_int("UNPACKED_MEMBERS_MAX", 10_000, 1, 1_000_000)
#: Longest relative path in an upload, in UTF-8 bytes (a component: 255); link targets too.
PATH_MAX_BYTES = 1024
#: Steps the resolution of an upload's symlinks may take (each link is resolved once).
LINK_STEPS_MAX = 1_000_000
#: Largest PAX extended header in an uploaded tar (where long names and link targets live).
TAR_PAX_MAX_BYTES = 64 * KiB
#: How long results are kept after a job ends.
RESULT_TTL_S = _env_int("RESULT_TTL_S", 600, 1, 86_400)
#: Per client address (IPv6 by /64): queued plus running jobs.
RATE_CONCURRENT_JOBS = _env_int("RATE_CONCURRENT_JOBS", 2, 1, 10_000)
#: Per client address: accepted jobs in the last hour.
RATE_JOBS_PER_HOUR = _env_int("RATE_JOBS_PER_HOUR", 20, 1, 10_000_000)
#: Per client address: CPU seconds per minute, as a token bucket of that size (see cpu_bucket).
RATE_CPU_S_PER_MIN = _env_int("RATE_CPU_S_PER_MIN", 10, 1, 10_000_000)
#: Seconds without a heartbeat after which the keeper kills the runner and starts a new one.
RUNNER_STALL_S = _env_int("RUNNER_STALL_S", 5, 2, 300)
#: Longest ?wait= a client may ask for.
WAIT_MAX_S = 60
#: Manifest bounds from the API contract.
ARGS_MAX = 256
STDIN_MAX_BYTES = 1 * MiB
OUTPUT_GLOBS_MAX = 64
ENV_VARS_MAX = 256

if UNPACKED_MAX_BYTES > JOB_WORKDIR_MAX_BYTES:
    raise SettingsError("SANDRUN_UNPACKED_MAX_BYTES exceeds SANDRUN_JOB_WORKDIR_MAX_BYTES: uploads could not fit")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")  # tmpfs gives every non-empty file whole pages
#: Largest status record: each output's name (JSON may escape a character to 3 times
#: its UTF-8 bytes) and fields, and the rest. Its readers accept exactly this much.
STATUS_RECORD_MAX_BYTES = 3 * OUTPUT_NAMES_MAX_BYTES + 512 * OUTPUT_FILES_MAX + 64 * KiB
#: The most state one job's results can take: two logs, its outputs, its record.
JOB_RESULT_MAX_BYTES = 2 * OUTPUT_STREAM_MAX_BYTES + JOB_WORKDIR_MAX_BYTES + OUTPUT_FILES_MAX * PAGE_BYTES + STATUS_RECORD_MAX_BYTES
#: State space only the runner's bookkeeping may use (heartbeat, records, charges, metrics).
RUNNER_RESERVE_BYTES = 8 * MiB
#: State space kept free for running jobs' results and the runner; intake answers 503 below it,
#: and the runner starts a job only when its share is there.
STATE_RESERVE_BYTES = MAX_RUNNING * JOB_RESULT_MAX_BYTES + RUNNER_RESERVE_BYTES
if STATE_TMPFS_BYTES < STATE_RESERVE_BYTES + UPLOAD_MAX_BYTES:
    raise SettingsError(
        f"SANDRUN_STATE_TMPFS_BYTES={STATE_TMPFS_BYTES} cannot hold {MAX_RUNNING} running jobs' logs and outputs "
        f"({STATE_RESERVE_BYTES} bytes) plus one upload: raise it or lower SANDRUN_MAX_RUNNING"
    )


# 2. Errors, process state and helpers -----------------------------------------
# At the HTTP boundary every error is a webob.exc response with a JSON body
# {"error", "details"}; anything unexpected becomes a bare 500 without a trace.
# Inside the sandbox, JailError carries the failed step to the runner.


def http_error(code, error, details, headers=None, **fields):
    """A webob.exc response for status `code` with the contract's JSON body."""
    body = {"error": error, "details": details, **fields}
    return webob.exc.status_map[code](
        body=json.dumps(body).encode(),
        content_type="application/json",
        charset="utf-8",
        headers=headers or {},
    )


class HostError(Exception):
    """The host cannot run jobs safely; the server must not start."""


class JailError(Exception):
    """A jail step failed; the job must not run. str() names the step."""


# 2.1 Process state. Sandrun is several processes forked from one master; each
# global below is set once, by the process named, before any fork that needs it.

#: The master: its cgroups (server_start), the keeper it forked (runner_launch),
#: whether it mounted the state tmpfs, and the flocked fd that makes the state its own.
_CGROUPS = None
_KEEPER = None  # (pid, pidfd)
_STATE_MOUNTED = False
_STATE_LOCK = []
#: The HMAC key for client addresses: made by the master after it forks the keeper
#: (runner_launch), so the keeper, the runner and every jail never hold it; the workers do.
_CLIENT_KEY = b""
#: Each worker (worker_start) and each runner (Runner.run): its own Metrics, written to its own file.
_METRICS = None
#: Each worker has its own _READS (7.5): the requests its threads are reading.


# 2.2 Helpers used everywhere: files written whole, JSON read with a cap, reads
# beneath a directory fd without following links, descriptors passed over a
# socket, a descriptor drained, and the mount table.

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a directory, opened without following a link


def _write_atomic(path, text, mode=0o644):
    """Write a file by rename, so readers see the old or the new, never half.

    Raises OSError (ENOSPC on a full state tmpfs) and then leaves no temporary file.
    """
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb", buffering=0) as f:
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_json_atomic(path, doc, mode=0o644):
    _write_atomic(path, json.dumps(doc), mode)


def _read_json(path, limit=4 * MiB):
    """Read a JSON file without following links; None if it is absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"{path} is over {limit} bytes")
    return json.loads(data)


def _open_beneath(parts, flags=_DIR):
    """Open STATE/http/<parts...> without following a link at any step."""
    fd = os.open(state_path("http"), _DIR)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _read_untrusted(dir_fd, name, limit):
    """A regular file's bytes from a hostile directory, or OSError."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise OSError(errno.EINVAL, f"{name}: not a regular file of at most {limit} bytes")
        return f.read(limit)


def recv_fds(sock, bufsize, maxfds, flags=0):
    """(data, fds): socket.recv_fds as it should be; Python 3.11's drops `flags`, so it can
    neither be non-blocking nor make the fds close-on-exec. A peer that closed with a message
    of ours unread makes the kernel say ECONNRESET: the same end as EOF, (b"", [])."""
    try:
        data, ancdata, _, _ = sock.recvmsg(bufsize, socket.CMSG_LEN(maxfds * 4), flags | socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        return b"", []
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def fd_drain(fd):
    """Read a non-blocking pipe, eventfd or inotify descriptor empty: its events only wake the reader."""
    try:
        while os.read(fd, 65536):
            continue
    except BlockingIOError:
        return


def mountinfo():
    """This process's mount table: (mount point, file system type, super options) per mount."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fstype, _, options = right.split()[:3]
            yield left.split()[4], fstype, options


def _is_mount_point(path, fstype):
    return any(point == path and kind == fstype for point, kind, _ in mountinfo())


# 3. HTTP intake --------------------------------------------------------------
# Runs in the unprivileged HTTP workers. Order of checks, cheapest first:
# route -> rate limit -> Content-Length -> content type -> parse and validate
# -> queue capacity. Uploads are unpacked here only to be checked and
# normalised into one plain tar of regular files, directories and in-tree
# links; the jail unpacks that tar again inside the job's own tmpfs.

# 3.1 Client identity and rate limits


def _trusted_proxies(spec):
    """SANDRUN_FORWARDED_ALLOW_IPS as gunicorn reads it: '*' (None: every peer), or addresses and networks."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if "*" in items:
        return None
    try:
        return [ipaddress.ip_network(item, strict=False) for item in items]
    except ValueError:
        raise SettingsError(f"SANDRUN_FORWARDED_ALLOW_IPS={spec!r} is not a list of addresses and networks, or '*'") from None


TRUSTED_PROXIES = _trusted_proxies(FORWARDED_ALLOW_IPS)


def _hop_address(hop):
    """An X-Forwarded-For hop as an address ('[v6]:port', 'v4:port' and brackets stripped), or None."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1 : hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return None
    return address.ipv4_mapped or address if address.version == 6 else address


def _trusted(address):
    if address is None:
        return False  # not an address: never a proxy of ours
    return TRUSTED_PROXIES is None or any(address in net for net in TRUSTED_PROXIES if net.version == address.version)


def client_address(environ):
    """The client's address: the peer, or X-Forwarded-For's nearest untrusted hop.

    A peer on a UNIX-socket bind has no address (REMOTE_ADDR is empty) and is
    always trusted, as gunicorn trusts it: it is the local reverse proxy, and
    the socket's file mode decides who else may connect. A hop that is not an
    address is the client too, and all such clients share one name.
    """
    peer = environ.get("REMOTE_ADDR") or ""
    if peer and not _trusted(_hop_address(peer)):
        return peer
    for hop in reversed([h for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]):
        address = _hop_address(hop)
        if not _trusted(address):
            return str(address) if address is not None else "unknown"
    return peer


def client_key(address):
    """A keyed hash naming the client: an IPv4 address, or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        name = "other:" + address
    else:
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip.version == 6:
            name = str(ipaddress.ip_network(f"{ip}/64", strict=False))
        else:
            name = str(ip)
    return hmac.new(_CLIENT_KEY, name.encode(), hashlib.sha256).hexdigest()[:32]


# 3.2 Manifests

#: Interpreters Sandrun knows: name -> (source extension, argv that prints a version).
INTERPRETER_CANDIDATES = {
    "python3": (".py", ["--version"]),
    "node": (".js", ["--version"]),
    "bash": (".sh", ["--version"]),
    "sh": (".sh", None),
    "perl": (".pl", ["--version"]),
    "ruby": (".rb", ["--version"]),
    "php": (".php", ["--version"]),
    "lua": (".lua", ["-v"]),
    "c": (".c", ["--version"]),
    "cpp": (".cpp", ["--version"]),
}
#: Entrypoint extension -> interpreter, when the manifest names none.
EXTENSION_INTERPRETERS = {
    ".py": "python3", ".js": "node", ".mjs": "node", ".cjs": "node", ".sh": "bash",
    ".pl": "perl", ".rb": "ruby", ".php": "php", ".lua": "lua",
    ".c": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
}
#: Languages that compile, inside the jail, before they run: name -> (compiler, flags before the
#: sources, the job's sources of that language, flags after). The program is PROGRAM_PATH.
COMPILERS = {
    "c": ("gcc", ["-std=gnu17", "-O2", "-Wall", "-pipe"], (".c",), ["-lm"]),
    "cpp": ("g++", ["-std=gnu++20", "-O2", "-Wall", "-pipe"], (".cc", ".cpp", ".cxx"), ["-lm"]),
}
PROGRAM_PATH = "/tmp/program"
#: At most this many sources are compiled, found at most this deep below /work.
COMPILE_SOURCES_MAX, COMPILE_DEPTH_MAX = 256, 16
#: What this host can run: name -> {"path", "version"}; filled in the master at start.
INTERPRETERS = {}

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _json_strict(raw, what):
    """Parse JSON refusing duplicate keys, NaN and Infinity."""

    def pairs(items):
        doc = {}
        for key, value in items:
            if key in doc:
                raise ValueError(f"duplicate key {key!r}")
            doc[key] = value
        return doc

    def constant(name):
        raise ValueError(f"{name} is not allowed")

    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise http_error(400, f"invalid {what}", f"{what} is not strict JSON: {exc}") from None


def _field(doc, name, kind, default):
    value = doc.get(name, default)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is default:
        return value
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = {str: "a string", int: "an integer", list: "an array", dict: "an object", (int, float): "a number"}
        raise http_error(400, "invalid manifest", f"'{name}' must be {names[kind]}")
    return value


def manifest_parse(doc, *, code_form):
    """Validate a manifest object; return it normalised with every default filled in.

    The runner calls this again on what a worker queued: it trusts no worker.
    """
    if not isinstance(doc, dict):
        raise http_error(400, "invalid manifest", "the manifest must be a JSON object")
    interpreter = _field(doc, "interpreter", str, None)
    entrypoint = _field(doc, "entrypoint", str, None)
    if code_form:
        if interpreter is None:
            raise http_error(400, "invalid manifest", "'interpreter' is required with 'code'")
    elif entrypoint is None:
        raise http_error(400, "invalid manifest", "'entrypoint' is required")
    if entrypoint is not None:
        entrypoint = relpath_check(entrypoint, "entrypoint")
    if interpreter is None:
        interpreter = EXTENSION_INTERPRETERS.get(os.path.splitext(entrypoint)[1])
        if interpreter is None:
            raise http_error(400, "invalid manifest", "no 'interpreter' given and none known for the entrypoint's extension")
    if interpreter not in INTERPRETERS:
        raise http_error(400, "invalid manifest", f"interpreter {interpreter!r} is not available; see GET / for the list")

    args = _field(doc, "args", list, [])
    if len(args) > ARGS_MAX:
        raise http_error(400, "invalid manifest", f"'args' has more than {ARGS_MAX} items")
    for arg in args:
        if not isinstance(arg, str) or "\0" in arg:
            raise http_error(400, "invalid manifest", "'args' must be strings without NUL bytes")

    stdin = _field(doc, "stdin", str, "")
    if len(stdin.encode("utf-8", "surrogatepass")) > STDIN_MAX_BYTES:
        raise http_error(400, "invalid manifest", f"'stdin' is over {STDIN_MAX_BYTES} bytes")

    env = _field(doc, "env", dict, {})
    if len(env) > ENV_VARS_MAX:
        raise http_error(400, "invalid manifest", f"'env' has more than {ENV_VARS_MAX} variables")
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise http_error(400, "invalid manifest", "'env' names must match [A-Za-z_][A-Za-z0-9_]*")
        if not isinstance(value, str) or "\0" in value:
            raise http_error(400, "invalid manifest", f"'env' value of {name} must be a string without NUL bytes")

    outputs = _field(doc, "outputs", list, None)
    if outputs is not None:
        if len(outputs) > OUTPUT_GLOBS_MAX:
            raise http_error(400, "invalid manifest", f"'outputs' has more than {OUTPUT_GLOBS_MAX} patterns")
        for pattern in outputs:
            if not isinstance(pattern, str) or not pattern or len(pattern) > 256 or "\0" in pattern:
                raise http_error(400, "invalid manifest", "'outputs' must be non-empty strings of at most 256 characters")
            if pattern.count("*") + pattern.count("?") > OUTPUT_GLOB_WILDCARDS_MAX:
                raise http_error(400, "invalid manifest", f"an 'outputs' pattern has more than {OUTPUT_GLOB_WILDCARDS_MAX} wildcards")

    timeout = _field(doc, "timeout", (int, float), JOB_TIMEOUT_S)
    if not 0 < timeout <= JOB_TIMEOUT_S:
        raise http_error(400, "invalid manifest", f"'timeout' must be > 0 and <= {JOB_TIMEOUT_S}")
    memory_mb = _field(doc, "memory_mb", int, JOB_MEMORY_MAX_BYTES // MiB)
    if not JOB_MEMORY_MIN_BYTES // MiB <= memory_mb <= JOB_MEMORY_MAX_BYTES // MiB:
        raise http_error(400, "invalid manifest", f"'memory_mb' must be within {JOB_MEMORY_MIN_BYTES // MiB}..{JOB_MEMORY_MAX_BYTES // MiB}")

    return {
        "entrypoint": entrypoint, "interpreter": interpreter, "args": args, "stdin": stdin,
        "env": env, "outputs": outputs, "timeout": timeout, "memory_mb": memory_mb,
    }


def output_matcher(patterns):
    """A predicate on relative paths for the manifest's 'outputs' globs.

    '*' and '?' stay within one path component; '**' as a whole component
    spans any number of them (none, unless it is last); a pattern ending in
    '/' takes everything below that directory. Matching never backtracks
    (see _glob_match), so a hostile pattern costs at most the product of its
    length and the path's, both capped.
    """
    compiled = []
    for pattern in patterns:
        parts = [p for p in pattern.split("/") if p not in ("", ".")]
        if pattern.endswith("/") or parts[-1:] == ["**"]:
            parts = (parts[:-1] if parts[-1:] == ["**"] else parts) + ["**", "*"]  # at least one component below
        compiled.append([p if p == "**" else _glob_component(p) for p in parts])
    return lambda path: any(_glob_match(globs, path.split("/")) for globs in compiled)


def _glob_component(pattern):
    """A regex for one path component's glob: '*' and '?' never cross a '/' here.

    The text between stars has a fixed length, so its leftmost place is always
    the best one: each star is an atomic group that finds it once and is never
    retried. That is linear in the name for each star, never exponential.
    """
    pieces = [re.escape(p).replace(r"\?", "[^/]") for p in pattern.split("*")]
    if len(pieces) == 1:
        return re.compile(pieces[0] + r"\Z", re.S)
    middle = "".join(f"(?>.*?{piece})" for piece in pieces[1:-1])
    return re.compile(pieces[0] + middle + ".*" + pieces[-1] + r"\Z", re.S)


def _glob_match(globs, parts):
    """Whether path components `parts` match component globs `globs`, where '**' takes any run.

    The same leftmost rule one level up: between two '**' the globs match a
    fixed number of components, so the first place they fit is the best one.
    """
    groups, group = [], []
    for g in globs:
        if g == "**":
            groups.append(group)
            group = []
        else:
            group.append(g)
    groups.append(group)
    fits = lambda group, at: all(g.match(parts[at + i]) for i, g in enumerate(group))  # noqa: E731
    if len(groups) == 1:
        return len(parts) == len(group) and fits(group, 0)
    first, *middle, last = groups
    if len(first) + len(last) > len(parts) or not fits(first, 0) or not fits(last, len(parts) - len(last)):
        return False
    at, end = len(first), len(parts) - len(last)
    for group in middle:
        while at + len(group) <= end and not fits(group, at):
            at += 1
        if at + len(group) > end:
            return False
        at += len(group)
    return True


# 3.3 Uploads

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def relpath_check(name, what):
    """Return `name` as a clean relative path, or raise 400 naming it.

    Leading './' and repeated slashes are the only things tolerated and
    dropped; absolute paths, '..', control characters and overlong names are
    refused, never rewritten.
    """
    if not isinstance(name, str) or not name:
        raise http_error(400, "unsafe path", f"{what}: empty name")
    shown = json.dumps(name[:200]) + ("..." if len(name) > 200 else "")  # a name may be megabytes: show its start
    if len(name) > PATH_MAX_BYTES * 2:  # before any work proportional to it (a dot and a slash per component at most)
        raise http_error(400, "unsafe path", f"{what} {shown}: longer than {PATH_MAX_BYTES} bytes")
    if _CONTROL_CHARS.search(name):
        raise http_error(400, "unsafe path", f"{what} {shown}: control characters are not allowed")
    if name.startswith("/"):
        raise http_error(400, "unsafe path", f"{what} {shown}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise http_error(400, "unsafe path", f"{what} {shown}: '..' is not allowed")
    if not parts:
        raise http_error(400, "unsafe path", f"{what} {shown}: names no file")
    clean = "/".join(parts)
    if len(clean.encode("utf-8", "surrogateescape")) > PATH_MAX_BYTES or any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        raise http_error(400, "unsafe path", f"{what} {shown}: longer than {PATH_MAX_BYTES} bytes or a component over 255")
    return clean


class _CappedReader(io.RawIOBase):
    """A read-only stream that raises 413 once more than `limit` bytes came through.

    It sits between a decompressor and tarfile, so a decompression bomb is
    stopped while it is unpacked, not after.
    """

    def __init__(self, raw, limit):
        self.raw, self.left = raw, limit

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.raw.read(min(len(buffer), self.left + 1))
        self.left -= len(data)
        if self.left < 0:
            raise http_error(413, "upload too large", f"the archive unpacks to more than {UNPACKED_MAX_BYTES} bytes")
        buffer[: len(data)] = data
        return len(data)


#: What the payload tar adds per member, at most: its header, a PAX header for a long name or link, padding.
PAYLOAD_MEMBER_BYTES = 3 * KiB


class PayloadWriter:
    """Collects checked upload members into the job's plain payload tar.

    Every member passes relpath_check; a path may not run through a file or
    a symlink, may not repeat, and a link must resolve inside the tree.
    Sizes and counts are charged before a member's bytes are copied.
    """

    def __init__(self, fileobj):
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)
        self.kinds = {}  # path -> "dir" | "file" | "symlink" | "hardlink"
        self.symlinks = {}  # path -> target, as uploaded
        self.resolved = {}  # path -> components it leads to, or None: each link is resolved once
        self.steps = 0  # of link resolution, against LINK_STEPS_MAX
        self.bytes = 0
        self.members = 0

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        """A rejected upload lets go of its half-written tar here, not in a garbage
        collector's __del__ after the file under it is closed."""
        self.tar.__exit__(kind, value, traceback)

    def _claim(self, name, kind, what):
        path = relpath_check(name, what)
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            seen = self.kinds.get(parent)
            if seen is None:
                self.kinds[parent] = "dir"
                self._add(tarfile.DIRTYPE, parent, mode=0o755)
            elif seen != "dir":
                raise http_error(400, "unsafe path", f"{what} {json.dumps(path)}: runs through a {seen}, not a directory")
        seen = self.kinds.get(path)
        if seen == "dir" and kind == "dir":
            return None
        if seen is not None:
            raise http_error(400, "duplicate member", f"{what} {json.dumps(path)} appears twice")
        self.members += 1
        if self.members > UNPACKED_MEMBERS_MAX:
            raise http_error(413, "upload too large", f"more than {UNPACKED_MEMBERS_MAX} files, directories and links")
        self.kinds[path] = kind
        return path

    def _add(self, kind, path, mode=0o644, size=0, linkname="", fileobj=None):
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
        self.tar.addfile(info, fileobj)

    def add_dir(self, name, what):
        if isinstance(name, str) and name and not name.startswith("/") and all(p in ("", ".") for p in name.split("/")):
            return  # "." or "./": the job directory itself, which always exists
        path = self._claim(name, "dir", what)
        if path is not None:
            self._add(tarfile.DIRTYPE, path, mode=0o755)

    def add_file(self, name, fileobj, size, executable, what):
        path = self._claim(name, "file", what)
        if self.bytes + size > UNPACKED_MAX_BYTES:
            raise http_error(413, "upload too large", f"files add up to more than {UNPACKED_MAX_BYTES} bytes at {json.dumps(path)}")
        self.bytes += size
        self._add(tarfile.REGTYPE, path, mode=0o755 if executable else 0o644, size=size, fileobj=fileobj)

    def add_symlink(self, name, target, what):
        path = self._claim(name, "symlink", what)
        if not target or "\0" in target or target.startswith("/") or len(target) > PATH_MAX_BYTES:
            raise http_error(400, "unsafe link", f"{what} {json.dumps(path)}: link target must be a relative path inside the job")
        self.symlinks[path] = target
        self._add(tarfile.SYMTYPE, path, mode=0o777, linkname=target)

    def add_hardlink(self, name, target, what):
        path = self._claim(name, "hardlink", what)
        target = relpath_check(target, f"{what} {json.dumps(path)} link target")
        if self.kinds.get(target) != "file":
            raise http_error(400, "unsafe link", f"{what} {json.dumps(path)}: hard link to something that is not an earlier file")
        self._add(tarfile.LNKTYPE, path, linkname=target)

    def _resolve(self, parts, depth=0):
        """Resolve path components through the upload's own symlinks; None if it leaves the tree.

        Each link is resolved once (its result is kept: where a link leads
        depends only on where it is), every step is paid from the upload's
        budget, and a chain deeper than 40 links (the kernel's limit) leaves.
        """
        out = []
        for part in parts:
            self.steps += 1
            if self.steps > LINK_STEPS_MAX:
                raise http_error(400, "unsafe link", f"the upload's symlinks take more than {LINK_STEPS_MAX} steps to resolve")
            if part in ("", "."):
                continue
            if part == "..":
                if not out:
                    return None
                out.pop()
                continue
            out.append(part)
            key = "/".join(out)
            if key in self.symlinks:
                if key not in self.resolved:
                    self.resolved[key] = None  # a loop through this link leaves the tree
                    if depth < 40:
                        self.resolved[key] = self._resolve(out[:-1] + self.symlinks[key].split("/"), depth + 1)
                if self.resolved[key] is None:
                    return None
                out = list(self.resolved[key])
        return out

    def finish(self, entrypoint):
        for path in self.symlinks:
            if self._resolve(path.split("/")) is None:
                raise http_error(400, "unsafe link", f"symlink {json.dumps(path[:200])} points outside the job directory")
        resolved = self._resolve(entrypoint.split("/"))
        if resolved is None or self.kinds.get("/".join(resolved)) not in ("file", "hardlink"):
            raise http_error(400, "invalid manifest", f"entrypoint {json.dumps(entrypoint)} is not an uploaded file")
        self.tar.close()


_MAGIC_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))


def _archive_kind(fileobj):
    """'tar', 'zip', ('tar', codec) or None, judged by the bytes alone."""
    head = fileobj.read(512)
    fileobj.seek(0)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    for magic, codec in _MAGIC_COMPRESSED:
        if head.startswith(magic):
            try:
                inner = _decompressor(codec, fileobj).read(512)
            except (OSError, EOFError, ValueError):
                inner = b""
            fileobj.seek(0)
            return ("tar", codec) if inner[257:262] == b"ustar" else None
    return None


def _decompressor(codec, fileobj):
    opener = {"gzip": gzip.GzipFile, "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}[codec]
    return opener(fileobj=fileobj) if codec == "gzip" else opener(fileobj)


def upload_add_part(writer, filename, fileobj):
    """Add one multipart 'files' part: unpack an archive, or store the part as one file."""
    kind = _archive_kind(fileobj)
    what = f"upload {json.dumps(filename[:200])}"
    try:
        if kind == "zip":
            _unpack_zip(writer, fileobj, what)
        elif kind is not None:
            raw = fileobj if kind == "tar" else _decompressor(kind[1], fileobj)
            slack = 2 * KiB * UNPACKED_MEMBERS_MAX + MiB  # headers and padding
            _unpack_tar(writer, _CappedReader(raw, UNPACKED_MAX_BYTES + slack), what)
        else:
            size = fileobj.seek(0, io.SEEK_END)
            fileobj.seek(0)
            writer.add_file(filename, fileobj, size, False, "file")
    except (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # our own disk, not the client's archive: handle_submit answers 503
        raise http_error(400, "invalid archive", f"{what}: {type(exc).__name__}: {exc}"[:500]) from None


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing what would cost more than its cap before tarfile
    reads it: a GNU long name or link (tarfile reads it whole, then splits it), a PAX
    header past TAR_PAX_MAX_BYTES, and sparse members (their maps)."""

    def _proc_member(self, tar):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and self.size > PATH_MAX_BYTES * 2:
            raise http_error(400, "unsafe member", f"a GNU long name or link of {self.size} bytes; at most {PATH_MAX_BYTES}")
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > TAR_PAX_MAX_BYTES:
            raise http_error(413, "upload too large", f"a PAX header of {self.size} bytes; at most {TAR_PAX_MAX_BYTES}")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise http_error(400, "unsafe member", "sparse members are not supported")
        return super()._proc_member(tar)

    def _proc_sparse_refused(self, *args):
        raise http_error(400, "unsafe member", "sparse members are not supported")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_sparse_refused


def _unpack_tar(writer, stream, what):
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it reads: a stream of them must not pile up
            label = f"{what} member"
            if member.isdir():
                writer.add_dir(member.name, label)
            elif member.isreg():
                writer.add_file(member.name, tar.extractfile(member), member.size, bool(member.mode & 0o111), label)
            elif member.issym():
                writer.add_symlink(member.name, member.linkname, label)
            elif member.islnk():
                writer.add_hardlink(member.name, member.linkname, label)
            elif member.ischr() or member.isblk() or member.isfifo():
                raise http_error(400, "unsafe member", f"{label} {json.dumps(member.name[:200])}: devices and FIFOs are not allowed")
            else:
                raise http_error(400, "unsafe member", f"{label} {json.dumps(member.name[:200])}: unsupported member type")


#: Bytes of central directory a zip may have per member: the fixed header, a name of
#: PATH_MAX_BYTES, and extra fields.
_ZIP_CD_BYTES_PER_MEMBER = 46 + PATH_MAX_BYTES + 256


def _zip_check_directory(fileobj, what):
    """Count a zip's members before zipfile parses them: from the end-of-central-directory
    record (ZIP64 too), cap the central directory's size, then walk its fixed headers."""
    size = fileobj.seek(0, io.SEEK_END)
    tail_at = max(0, size - (22 + 0xFFFF + 20))
    fileobj.seek(tail_at)
    tail = fileobj.read()
    eocd = tail.rfind(b"PK\x05\x06")
    if eocd < 0 or len(tail) - eocd < 22:
        raise http_error(400, "invalid archive", f"{what}: no end of central directory")
    cd_size = struct.unpack_from("<I", tail, eocd + 12)[0]
    cd_end = tail_at + eocd
    locator = eocd - 20
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":  # ZIP64: the real sizes are in its own record
        cd_end = tail_at + locator - 56  # the record sits right before its locator, as zipfile reads it
        fileobj.seek(max(0, cd_end))
        record = fileobj.read(56)
        if len(record) < 56 or record[:4] != b"PK\x06\x06":
            raise http_error(400, "invalid archive", f"{what}: a broken ZIP64 end record")
        cd_size = struct.unpack_from("<Q", record, 40)[0]
    if cd_size > UNPACKED_MEMBERS_MAX * _ZIP_CD_BYTES_PER_MEMBER:
        raise http_error(413, "upload too large", f"{what} has more than {UNPACKED_MEMBERS_MAX} members")
    fileobj.seek(max(0, cd_end - cd_size))
    directory = fileobj.read(cd_size)
    at = members = 0
    while at + 46 <= len(directory) and directory[at : at + 4] == b"PK\x01\x02":
        members += 1
        if members > UNPACKED_MEMBERS_MAX:
            raise http_error(413, "upload too large", f"{what} has more than {UNPACKED_MEMBERS_MAX} members")
        names, extra, comment = struct.unpack_from("<HHH", directory, at + 28)
        at += 46 + names + extra + comment
    fileobj.seek(0)


def _unpack_zip(writer, fileobj, what):
    _zip_check_directory(fileobj, what)
    with zipfile.ZipFile(fileobj) as archive:
        for info in archive.infolist():
            label = f"{what} member"
            mode = info.external_attr >> 16
            if info.flag_bits & 0x1:
                raise http_error(400, "invalid archive", f"{label} {json.dumps(info.filename[:200])}: encrypted members are not supported")
            if info.is_dir():
                writer.add_dir(info.filename, label)
            elif stat.S_ISLNK(mode):
                if info.file_size > PATH_MAX_BYTES:
                    raise http_error(400, "unsafe link", f"{label} {json.dumps(info.filename[:200])}: link target too long")
                writer.add_symlink(info.filename, archive.read(info).decode("utf-8", "replace"), label)
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: the archiver recorded no file type
                raise http_error(400, "unsafe member", f"{label} {json.dumps(info.filename[:200])}: devices, FIFOs and sockets are not allowed")
            else:
                with archive.open(info) as member:
                    writer.add_file(info.filename, member, info.file_size, bool(mode & 0o111), label)


# 3.4 Multipart bodies, read as a stream: one part at a time, each in bounded
# memory; a 'files' part goes to a spool file in the upload's own directory
# and is unpacked from there, then removed. Nothing of the body is held whole.
# (Not cgi.FieldStorage, through webob: it copies the body, spools every part
# before the first is looked at, costs about 30 times a tiny part's size in
# memory, and is gone from Python 3.13.)

#: Bytes of one part's headers, and parts per body (a manifest and the files).
MULTIPART_HEADERS_MAX_BYTES = 8 * KiB
MULTIPART_PARTS_MAX = 1 + UNPACKED_MEMBERS_MAX
_READ_BYTES = 64 * KiB


class MultipartReader:
    """multipart/form-data (RFC 7578) from a stream of known length, as it arrives."""

    def __init__(self, stream, length, boundary):
        self.stream, self.left = stream, length
        self.delimiter = b"\r\n--" + boundary
        self.buffer = bytearray(b"\r\n")  # so that the first boundary reads like every other
        self.parts_seen = 0

    def _fill(self):
        if self.left <= 0:
            raise http_error(400, "invalid multipart body", "the body ends inside a part: no closing boundary")
        chunk = self.stream.read(min(_READ_BYTES, self.left))
        if not chunk:
            raise http_error(400, "invalid multipart body", "the body is shorter than its Content-Length")
        self.left -= len(chunk)
        self.buffer += chunk

    def parts(self):
        """Each part's headers ({lowercase name: value}); read its data with read_part() before the next."""
        self.read_part(lambda data: None)  # the preamble
        while True:
            while len(self.buffer) < 2:
                self._fill()
            if self.buffer[:2] == b"--":
                return  # the closing boundary; an epilogue is ignored
            while self.buffer[:1] in (b" ", b"\t"):  # transport padding
                del self.buffer[:1]
                while len(self.buffer) < 2:
                    self._fill()
            if self.buffer[:2] != b"\r\n":
                raise http_error(400, "invalid multipart body", "a boundary is not followed by a line break")
            del self.buffer[:2]
            self.parts_seen += 1
            if self.parts_seen > MULTIPART_PARTS_MAX:
                raise http_error(413, "upload too large", f"more than {MULTIPART_PARTS_MAX} parts")
            yield self._headers()

    def _headers(self):
        while (end := self.buffer.find(b"\r\n\r\n", 0, MULTIPART_HEADERS_MAX_BYTES + 4)) < 0:
            if len(self.buffer) > MULTIPART_HEADERS_MAX_BYTES:
                raise http_error(400, "invalid multipart body", f"a part's headers are over {MULTIPART_HEADERS_MAX_BYTES} bytes")
            self._fill()
        block, self.buffer = bytes(self.buffer[:end]), self.buffer[end + 4 :]
        headers = {}
        for line in block.split(b"\r\n") if block else []:
            name, colon, value = line.partition(b":")
            if not colon:
                raise http_error(400, "invalid multipart body", "a part's header line has no name")
            try:
                headers[name.strip().lower().decode("ascii")] = value.strip().decode("utf-8")
            except UnicodeDecodeError:
                raise http_error(400, "invalid multipart body", "a part's header is not UTF-8") from None
        return headers

    def read_part(self, write):
        """Hand the current part's data to write() as it arrives, up to the next boundary."""
        keep = len(self.delimiter) - 1
        while (at := self.buffer.find(self.delimiter)) < 0:
            if len(self.buffer) > keep:
                write(bytes(self.buffer[:-keep]))
                del self.buffer[:-keep]
            self._fill()
        write(bytes(self.buffer[:at]))
        del self.buffer[: at + len(self.delimiter)]


def _header_params(header, value):
    """A header's first value (lowercase) and its parameters, with quoting and RFC 2231 undone."""
    message = email.message.Message()
    message[header] = value
    first, *params = message.get_params(header=header) or [("", "")]
    return first[0].lower(), {key.lower(): email.utils.collapse_rfc2231_value(val) for key, val in params}


def multipart_boundary(req):
    """The boundary of a multipart/form-data request, or 400."""
    _, params = _header_params("content-type", req.headers.get("Content-Type", ""))
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise http_error(400, "invalid multipart body", "the Content-Type has no valid boundary")
    return boundary.encode()


# 3.5 From a request to a queued job: POST /submit. Cheapest checks first (rate
# limit, Content-Length, media type), then room in the state for what the upload
# may write (4.4), then the body, read into the job's payload as it arrives, and
# last the queue (4.3); ?wait holds the answer (7.1).


def handle_submit(req):
    now = time.time()
    key = client_key(client_address(req.environ))
    with StateLock():
        rate_limit_check(key, now)  # cheap early answer; spool_submit checks again as it queues
    media = (req.content_type or "").lower()
    cap = MANIFEST_MAX_BYTES if media == "application/json" else UPLOAD_MAX_BYTES
    if req.content_length is not None and req.content_length > cap:
        raise http_error(413, "body too large", f"the body is {req.content_length} bytes; the limit is {cap}")
    if media not in ("application/json", "multipart/form-data"):
        raise http_error(415, "unsupported media type", "send multipart/form-data (manifest and files) or application/json (code)")
    if media == "multipart/form-data" and req.content_length is None:
        raise http_error(400, "length required", "send multipart bodies with a Content-Length")
    wait_s = _wait_param(req)
    # The most this upload writes: the JSON body is read into memory; a multipart body
    # spools one part at a time (at most the body), and the payload may unpack to its cap.
    reserve = MANIFEST_MAX_BYTES + PAYLOAD_MEMBER_BYTES if media == "application/json" else \
        req.content_length + UNPACKED_MAX_BYTES + UNPACKED_MEMBERS_MAX * PAYLOAD_MEMBER_BYTES
    job_id = JOB_ID_PREFIX + secrets.token_hex(16)
    incoming = upload_admit(job_id, key, reserve, now)
    try:
        with open(os.path.join(incoming, "payload.tar"), "xb") as payload, PayloadWriter(payload) as writer:
            if media == "application/json":
                manifest = _intake_json(req, writer)
            else:
                manifest = _intake_multipart(req, writer, incoming)
            writer.finish(manifest["entrypoint"])
        _READS.read(req.environ.get("gunicorn.socket"))  # read whole: no deadline for the answer
        request = {"manifest": manifest, "client": key, "created_ts": now}
        with open(os.path.join(incoming, "request.json"), "x") as f:
            json.dump(request, f)
        position = spool_submit(job_id, key, incoming)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _storage_full() from None
        raise
    finally:
        path_remove(incoming)  # queued, it was renamed away; refused, nothing of it stays
    metrics_count("sandrun_jobs_submitted_total")
    status_url = f"/status/{job_id}"
    if wait_s > 0:
        found = _wait_finished(job_id, wait_s, key)
        if found is not None and found[0]["status"] in ("completed", "failed"):
            return _json(found[0])
    doc = {"job_id": job_id, "status": "queued", "position": position, "status_url": status_url}
    return _json(doc, 202, {"Location": status_url})


def _storage_full():
    return http_error(503, "storage full", "the server holds as many uploads and results as it can; try again shortly", headers={"Retry-After": "30"})


def _read_body(req, cap):
    body = req.body_file_raw.read(cap + 1) if req.content_length is None else req.body_file_raw.read(req.content_length)
    if len(body) > cap:
        raise http_error(413, "body too large", f"the body is over the limit of {cap} bytes")
    return body


def _intake_json(req, writer):
    doc = _json_strict(_read_body(req, MANIFEST_MAX_BYTES), "JSON body")
    if not isinstance(doc, dict):
        raise http_error(400, "invalid manifest", "the body must be a JSON object")
    code = doc.get("code")
    if not isinstance(code, str):
        raise http_error(400, "invalid manifest", "'code' must be a string")
    manifest = manifest_parse({**doc, "entrypoint": None}, code_form=True)
    manifest["entrypoint"] = "main" + INTERPRETER_CANDIDATES[manifest["interpreter"]][0]
    data = code.encode("utf-8", "surrogatepass")
    writer.add_file(manifest["entrypoint"], io.BytesIO(data), len(data), False, "code")
    return manifest


def _intake_multipart(req, writer, incoming):
    """Read the form as it arrives: the manifest into memory, each file part through a spool
    file in the upload's directory into the payload, one at a time."""
    reader = MultipartReader(req.body_file_raw, req.content_length, multipart_boundary(req))
    manifest, files = None, 0
    for headers in reader.parts():
        kind, params = _header_params("content-disposition", headers.get("content-disposition", ""))
        name = params.get("name")
        if kind != "form-data" or name not in ("manifest", "files"):
            raise http_error(400, "invalid form", f"unexpected form field {json.dumps(str(name)[:100])}; send 'manifest' and 'files'")
        if name == "manifest":
            if manifest is not None:
                raise http_error(400, "invalid form", "send exactly one 'manifest' field")
            manifest = bytearray()
            reader.read_part(functools.partial(_manifest_extend, manifest))
            continue
        if not params.get("filename"):
            raise http_error(400, "invalid form", "each 'files' part must be a file upload with a filename")
        path = os.path.join(incoming, "part")
        with open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "w+b") as spool:
            try:
                reader.read_part(spool.write)
                spool.flush()
                spool.seek(0)
                upload_add_part(writer, params["filename"], spool)
            finally:
                os.unlink(path)  # its space is free again before the next part
        files += 1
    if manifest is None:
        raise http_error(400, "invalid form", "send exactly one 'manifest' field")
    if not files:
        raise http_error(400, "invalid form", "send at least one 'files' part")
    return manifest_parse(_json_strict(bytes(manifest), "manifest"), code_form=False)


def _manifest_extend(manifest, data):
    manifest += data
    if len(manifest) > MANIFEST_MAX_BYTES:
        raise http_error(413, "manifest too large", f"the manifest is over {MANIFEST_MAX_BYTES} bytes")


# 4. Job spool and queue ------------------------------------------------------
# STATE_DIR (tmpfs, root, 0755)
#   http/    owned by HTTP_USER, written only by workers; its flock serialises
#            submit, delete and claim (StateLock):
#     seq                  the last queue sequence number
#     incoming/<id>/       a submission being written: owner ("pid start reserved client",
#                          upload_admit), part (the file part being read), payload.tar, request.json
#     queue/<seq>.<id>/    a queued job; FIFO order is the sorted names
#     clients/<key>.json   per client: recent submit times
#     deleted/<id>         a DELETE the runner has yet to carry out
#     metrics/<pid>.json   each worker's counters (GET /metrics adds them up)
#     tmp/                 where /health proves the state is writable
#   runner/  root:HTTP_USER 0750, written only by the runner:
#     wake.sock            datagram socket: workers poke the runner here
#     alive                the runner's pid, in a page the master allocated; touched every second
#     load.json            {"running": n}
#     metrics.json         the runner's counters and histograms, across its restarts
#     charges/<key>        "level time": the client's CPU bucket (cpu_bucket); none while full
#     jobs/<id>/           status.json, stdout, stderr, files/<outputs>
#     root/                empty mount point for job roots (private per job)
# A job is queued while http/queue holds it, and known to the runner once
# runner/jobs/<id>/status.json exists; the claim writes the second before it
# removes the first, under the lock, so a reader always finds one of them.

JOB_ID_PREFIX = f"job-{NODE}-" if NODE else "job-"
JOB_ID = re.compile(JOB_ID_PREFIX + r"[0-9a-f]{32}\Z")  # only this node's: any other id is unknown here
_QUEUE_ENTRY = re.compile(r"([0-9]{16})\.(" + JOB_ID.pattern + ")")
_CLIENT_NAME = re.compile(r"[0-9a-f]{32}\Z")


def state_path(*parts):
    return os.path.join(STATE_DIR, *parts)


# 4.1 Metrics: aggregates only, never a job id or an address. Each process
# counts in memory and writes its own file after each change; GET /metrics
# adds the files up, so counts survive worker and runner restarts.

#: Histogram bucket bounds, in seconds, for job wall time and CPU time.
METRICS_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """One process's counters ({name: {labels: value}}) and histograms, kept in one file."""

    def __init__(self, path):
        self.path, self.lock, self.dirty = path, threading.Lock(), False
        try:
            self.doc = _read_json(path) or {"counters": {}, "histograms": {}}
        except (OSError, ValueError):
            self.doc = {"counters": {}, "histograms": {}}  # unreadable: count afresh rather than not at all

    def count(self, name, **labels):
        with self.lock:
            self._count(name, labels)
            self._save()

    def set(self, name, value):
        """An unlabelled counter that someone else counts (the keeper: runner starts)."""
        with self.lock:
            self.doc["counters"][name] = {"{}": value}
            self._save()

    def flush(self):
        """Save what a full state tmpfs kept unsaved."""
        with self.lock:
            if self.dirty:
                self._save()

    def job_finished(self, status, reason, wall_s, cpu_s):
        """The runner's per-job record: one counter, two histograms, one write."""
        with self.lock:
            self._count("sandrun_jobs_finished_total", {"status": status, "reason": reason})
            self._observe("sandrun_job_wall_seconds", wall_s)
            if cpu_s is not None:
                self._observe("sandrun_job_cpu_seconds", cpu_s)
            self._save()

    def _count(self, name, labels):
        series = self.doc["counters"].setdefault(name, {})
        key = json.dumps(labels, sort_keys=True)
        series[key] = series.get(key, 0) + 1

    def _observe(self, name, value):
        h = self.doc["histograms"].setdefault(name, {"buckets": [0] * len(METRICS_BUCKETS_S), "count": 0, "sum": 0.0})
        for i, bound in enumerate(METRICS_BUCKETS_S):
            h["buckets"][i] += value <= bound
        h["count"] += 1
        h["sum"] += value

    def _save(self):
        try:
            _write_json_atomic(self.path, self.doc)
        except OSError:
            if not self.dirty:
                log.warning("event=metrics_unsaved")  # a full state tmpfs must not fail a request
            self.dirty = True
        else:
            self.dirty = False


def metrics_count(name, **labels):
    if _METRICS is not None:
        _METRICS.count(name, **labels)


# 4.2 State files: times, removal of whole trees, and failures logged by type.


def _utc(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts is not None else None


def tree_remove(parent_fd, name):
    """Remove `name` below a directory fd (a file, a link, or a tree of any depth), following nothing.

    Two descriptors whatever the depth, no recursion: the entries of each
    subdirectory are renamed up into the top directory before it is removed,
    so each entry moves at most once and removing costs linear work.
    """
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    top = os.open(name, _DIR, dir_fd=parent_fd)
    try:
        while entries := os.listdir(top):
            for entry in entries:
                try:
                    sub = os.open(entry, _DIR, dir_fd=top)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):  # a file, or a link O_NOFOLLOW refused
                        raise
                    os.unlink(entry, dir_fd=top)
                    continue
                try:
                    for child in os.listdir(sub):
                        os.rename(child, "." + secrets.token_hex(12), src_dir_fd=sub, dst_dir_fd=top)
                finally:
                    os.close(sub)
                os.rmdir(entry, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=parent_fd)


def path_remove(path):
    """tree_remove() by path: the parent is one we made, the named entry may hold anything."""
    parent = os.open(os.path.dirname(path), _DIR)
    try:
        tree_remove(parent, os.path.basename(path))
    finally:
        os.close(parent)


def log_failure(event, exc, **fields):
    """Log an exception by its type and the place it was raised, never its message or
    arguments: those can carry job content, or paths that a job chose."""
    where = exc.__traceback__
    while where is not None and where.tb_next is not None:
        where = where.tb_next
    place = f"{where.tb_frame.f_code.co_name}:{where.tb_lineno}" if where is not None else "unknown"
    log.error("event=%s%s error=%s where=%s", event, "".join(f" {k}={v}" for k, v in fields.items()), type(exc).__name__, place)


# 4.3 The state lock and the queue's protocol: a worker submits (spool_submit) and
# deletes (spool_delete), the runner claims (queue_claim), each under the lock. Then
# each client's quota (concurrent jobs, jobs an hour, CPU seconds), read under it too.


class StateLock:
    """The flock on the http/ directory: one submit, delete or claim at a time.

    A directory, not a file in it: the workers own http/'s entries, and a lock
    file they removed would stop the runner; http/ itself belongs to root's STATE_DIR.
    """

    def __init__(self, blocking=True):
        self.blocking = blocking

    def __enter__(self):
        fd = os.open(state_path("http"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            self.fd = None
            return False
        self.fd = fd
        return True

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def queue_entries():
    """[(seq, job_id)] in FIFO order."""
    found = (_QUEUE_ENTRY.match(name) for name in os.listdir(state_path("http", "queue")))
    return sorted(m.groups() for m in found if m)


def spool_submit(job_id, key, incoming):
    """Move a written submission into the queue, atomically with the limit checks.

    Returns the job's queue position. Raises 429 or 503 and leaves nothing
    behind if the client or the queue is full.
    """
    now = time.time()
    with StateLock():
        submits = rate_limit_check(key, now)
        entries = queue_entries()
        if len(entries) >= MAX_QUEUED:
            raise http_error(503, "queue full", f"{len(entries)} jobs are waiting; try again shortly", headers={"Retry-After": "10"})
        seq_path = state_path("http", "seq")
        with open(seq_path) as f:
            seq = int(f.read()) + 1
        _write_atomic(seq_path, str(seq), 0o600)
        os.rename(incoming, state_path("http", "queue", f"{seq:016d}.{job_id}"))
        _write_json_atomic(state_path("http", "clients", key + ".json"), {"submits": submits + [now]}, 0o600)
        if seq % 100 == 0:
            _ledgers_sweep(now)
    runner_wake()
    return len(entries) + 1


def spool_delete(job_id):
    """Erase a job now (queued) or have the runner kill and erase it. False if unknown."""
    with StateLock():
        if job_lookup(job_id) is None:
            return False
        for seq, queued_id in queue_entries():
            if queued_id == job_id:
                path_remove(state_path("http", "queue", f"{seq}.{job_id}"))
        if _runner_status(job_id) is not None:
            os.close(os.open(state_path("http", "deleted", job_id), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    runner_wake()
    return True


def queue_claim(take):
    """Runner: hand the oldest queue entry to take(queue_fd, name, job_id) under the lock,
    then remove the entry whatever take did; take's answer. None if the queue is empty,
    the entry's name is not one of ours, or a worker holds the lock (the next tick retries)."""
    with StateLock(blocking=False) as locked:
        if not locked:
            return None
        queue_fd = _open_beneath(["queue"])
        try:
            names = sorted(os.listdir(queue_fd))
            if not names:
                return None
            match = _QUEUE_ENTRY.match(names[0])
            try:
                return take(queue_fd, names[0], match.group(2)) if match else None
            finally:
                # Whatever it held, the entry goes: a poisoned one must not stall the queue.
                tree_remove(queue_fd, names[0])
        finally:
            os.close(queue_fd)


def runner_wake():
    """Poke the runner; if it is down the job simply waits in the queue."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"w", state_path("runner", "wake.sock"))
        except (ConnectionRefusedError, FileNotFoundError, BlockingIOError):
            log.warning("event=wake_failed detail=runner_not_listening")


def _client_submits(key, now):
    """The client's accepted submissions in the last hour (times only: nothing about the jobs)."""
    doc = _read_json(state_path("http", "clients", key + ".json")) or {}
    return [t for t in doc.get("submits", []) if t > now - 3600]


def _queued_request(seq, job_id):
    """A queued job's request.json as a worker wrote it, or None if it is gone or not one
    (the runner drops such an entry when it claims it)."""
    try:
        request = _read_json(state_path("http", "queue", f"{seq}.{job_id}", "request.json"))
    except (OSError, ValueError):
        return None
    return request if isinstance(request, dict) else None


def _client_active(key):
    """The client's queued jobs plus those the runner says it is running for it."""
    queued = 0
    for seq, job_id in queue_entries():
        request = _queued_request(seq, job_id)
        queued += request is not None and request.get("client") == key
    load = _read_json(state_path("runner", "load.json")) or {}
    return queued + load.get("clients", {}).get(key, 0)


def _ledgers_sweep(now):
    """Drop the submit times of clients not seen for an hour (under the state lock)."""
    clients = state_path("http", "clients")
    for name in os.listdir(clients):
        if os.stat(os.path.join(clients, name)).st_mtime < now - 3600:
            os.unlink(os.path.join(clients, name))


def cpu_bucket(key, now, recorded=None):
    """CPU seconds in the client's bucket now; negative while the client is in debt.

    The CPU quota is a token bucket: it holds up to RATE_CPU_S_PER_MIN and
    refills at that many per minute; the runner takes each job's CPU when
    the job ends, into debt if need be, and records (level, time) in
    STATE/runner/charges/<key>. No file: a full bucket.
    """
    if recorded is None:
        try:
            with open(state_path("runner", "charges", key)) as f:
                recorded = tuple(float(field) for field in f.read(100).split())
        except (FileNotFoundError, ValueError):
            return float(RATE_CPU_S_PER_MIN)
    level, at = recorded
    return min(float(RATE_CPU_S_PER_MIN), level + (now - at) * RATE_CPU_S_PER_MIN / 60)


def quota(key, now, uploading=0):
    """The caller's quota figures and, if it may not submit now, why and for how long.

    Call it under the StateLock: a claim moves a job from the queue to the
    runner's count, and a reader between the two would count it twice.
    `uploading` counts the client's uploads in flight as active jobs.
    """
    submits = _client_submits(key, now)
    active = _client_active(key) + uploading
    cpu_left = cpu_bucket(key, now)
    cpu_used = RATE_CPU_S_PER_MIN - cpu_left
    doc = {
        "active_jobs": active, "concurrent_limit": RATE_CONCURRENT_JOBS,
        "jobs_this_hour": len(submits), "jobs_per_hour_limit": RATE_JOBS_PER_HOUR,
        "cpu_seconds_used": round(cpu_used, 3), "cpu_seconds_limit": RATE_CPU_S_PER_MIN,
        "can_submit": True, "reason": None,
    }
    retry = 0
    if active >= RATE_CONCURRENT_JOBS:
        doc["reason"], retry = "concurrent_jobs", 5
    elif len(submits) >= RATE_JOBS_PER_HOUR:
        doc["reason"] = "jobs_per_hour"
        retry = submits[-RATE_JOBS_PER_HOUR] + 3600 - now
    elif cpu_left <= 0:
        doc["reason"] = "cpu_seconds_per_minute"
        retry = -cpu_left * 60 / RATE_CPU_S_PER_MIN  # until the bucket holds some again
    doc["can_submit"] = doc["reason"] is None
    return doc, submits, max(1, int(retry + 0.999))


def rate_limit_check(key, now, uploading=0):
    """Raise 429 if the client may not submit now."""
    doc, submits, retry = quota(key, now, uploading)
    if not doc["can_submit"]:
        details = {
            "concurrent_jobs": f"at most {RATE_CONCURRENT_JOBS} queued or running jobs per client",
            "jobs_per_hour": f"at most {RATE_JOBS_PER_HOUR} jobs per hour per client",
            "cpu_seconds_per_minute": f"at most {RATE_CPU_S_PER_MIN} CPU seconds per minute per client",
        }[doc["reason"]]
        raise http_error(429, "rate limit exceeded", details, headers={"Retry-After": str(retry)},
                         retry_after=retry, reason=doc["reason"])
    return submits


# 4.4 Admission: an upload is admitted against the room the state has left, and
# the uploads in flight are accounted for (and a dead worker's swept).


def _start_time(pid):
    """A live process's start time in clock ticks (/proc/<pid>/stat field 22): None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def upload_admit(job_id, key, reserve, now):
    """Make STATE/http/incoming/<job_id>/ for an upload that may write `reserve` bytes, or answer 429 or 503.

    Under the state lock: uploads whose worker died are swept; the client's
    uploads in flight count as its active jobs; and the upload is admitted
    only if the free space, less what the uploads in flight may still write
    (what each reserved, less what it wrote), keeps STATE_RESERVE_BYTES for
    the running jobs and the runner. Its directory names its worker and client.
    """
    with StateLock():
        incoming_fd = os.open(state_path("http", "incoming"), _DIR)
        try:
            outstanding = uploading = 0
            for name in os.listdir(incoming_fd):
                reserved, written, client, alive = _upload_in_flight(incoming_fd, name)
                if alive:
                    outstanding += max(0, reserved - written)
                    uploading += client == key
                else:
                    tree_remove(incoming_fd, name)
                    log.info("event=upload_swept detail=worker_gone")
            rate_limit_check(key, now, uploading)
            vfs = os.statvfs(STATE_DIR)
            if vfs.f_bavail * vfs.f_frsize - outstanding < STATE_RESERVE_BYTES + reserve:
                raise _storage_full()
            os.mkdir(job_id, 0o700, dir_fd=incoming_fd)
            owner = os.open(f"{job_id}/owner", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=incoming_fd)
            with open(owner, "w") as f:
                f.write(f"{os.getpid()} {_start_time(os.getpid())} {reserve} {key}\n")
        finally:
            os.close(incoming_fd)
    return state_path("http", "incoming", job_id)


def _upload_in_flight(incoming_fd, name):
    """(bytes reserved, bytes written, client, whether its worker lives) of one upload in flight."""
    try:
        entry = os.open(name, _DIR, dir_fd=incoming_fd)
    except FileNotFoundError:
        return 0, 0, None, True  # its worker removed it a moment ago
    except OSError:
        return 0, 0, None, False  # not an upload's directory
    try:
        written = sum(os.stat(child, dir_fd=entry, follow_symlinks=False).st_blocks * 512 for child in os.listdir(entry))
        with open(os.open("owner", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=entry)) as f:
            pid, start, reserved, client = f.read(200).split()
        pid, start, reserved = int(pid), int(start), int(reserved)
    except FileNotFoundError:
        return 0, 0, None, True  # being removed by its worker
    except (OSError, ValueError):
        return 0, 0, None, False
    finally:
        os.close(entry)
    return reserved, written, client, _start_time(pid) == start


# 4.5 Status records, as the workers read them. The runner writes one per job
# (Runner._record), STATE/runner/jobs/<id>/status.json, replaced whole at each
# change, at most STATUS_RECORD_MAX_BYTES:
#     public             the client's status document but for output_files: job_id,
#                        status, queue_position (null), reason, exit_code, signal,
#                        execution_metadata, created_at, started_at, finished_at, expires_at
#     outputs            [{name, size, sha256}]: the output files, listed once
#     outputs_truncated  a cap or a failure left some out
#     stdout_truncated, stderr_truncated   a stream reached OUTPUT_STREAM_MAX_BYTES
#     expires_ts         when expiry erases the job (null until it ends)
# A queued job has no record; its status document is made from its queue entry.


def _runner_status(job_id):
    """The runner's record of a job, or None. The runner keeps records within
    STATUS_RECORD_MAX_BYTES; one that cannot be read is a 503, never a 500."""
    try:
        return _read_json(state_path("runner", "jobs", job_id, "status.json"), STATUS_RECORD_MAX_BYTES)
    except (OSError, ValueError):
        log.error("job=%s event=status_unreadable", job_id)
        raise http_error(503, "status unavailable", "the job's record cannot be read now; try again shortly", headers={"Retry-After": "5"}) from None


def status_public(record):
    """A client's status document from the runner's record, which holds the output list once."""
    doc = dict(record["public"])
    doc["output_files"] = {o["name"]: {"path": o["name"], "size_bytes": o["size"], "sha256_hash": o["sha256"], "type": "file"}
                           for o in record["outputs"]}
    return doc


def job_lookup(job_id):
    """(status document, runner record or None) for a visible job, else None."""
    if not JOB_ID.match(job_id) or os.path.lexists(state_path("http", "deleted", job_id)):
        return None
    record = _runner_status(job_id)
    if record is not None:
        expires = record.get("expires_ts")
        if expires is not None and expires <= time.time():
            return None
        return status_public(record), record
    for position, (seq, queued_id) in enumerate(queue_entries(), 1):
        if queued_id == job_id:
            request = _queued_request(seq, job_id)
            if request is None:
                break  # claimed in between: the runner's record exists now
            return _status_queued(job_id, request.get("created_ts"), position), None
    record = _runner_status(job_id)
    return (status_public(record), record) if record is not None else None


def _status_queued(job_id, created_ts, position):
    return {
        "job_id": job_id, "status": "queued", "queue_position": position, "reason": None,
        "exit_code": None, "signal": None, "execution_metadata": None, "output_files": {},
        "created_at": _utc(created_ts), "started_at": None, "finished_at": None, "expires_at": None,
    }


# 5. Sandbox ------------------------------------------------------------------
# Runs in the runner (root, single-threaded) and in the processes it forks.
# Per jail: the runner forks C2 with clone() straight into new namespaces.
# C2 is pid 1 of the new pid namespace; it joins the jail's fresh cgroup,
# walks jail_enter() step by step, and once the runner sends it a job,
# spawns it (C3, by vfork and execve of the interpreter) and stays as the
# jail's init. The runner builds the next jail before its job arrives. Any
# failure before execve reaches the runner over the setup socket and the job
# runs nothing. One fork of this Python process per job: with its exit and
# the copy-on-write faults of its steps, the largest part of a job's overhead.

# 5.1 Kernel bindings: only what Python 3.11's os module lacks.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
# Calls that keep the GIL, as os.fork() does around fork().
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc_gil.syscall.restype = ctypes.c_long
# <sys/inotify.h>: a long-poll sleeps on its job's directory (7.1).
IN_MODIFY, IN_MOVED_TO, IN_CREATE, IN_ONLYDIR = 0x2, 0x80, 0x100, 0x1000000
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]

# <linux/sched.h>
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x00000080
CLONE_NEW_ALL = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME
CLONE_PIDFD, CLONE_PARENT = 0x00001000, 0x00008000
# <linux/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
# <linux/prctl.h>, <linux/seccomp.h>
PR_CAPBSET_DROP, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 24, 22, 2
# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
# pivot_root and a fork-like clone have no glibc wrapper; their numbers are per architecture.
SYS_pivot_root = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
SYS_clone = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)


def _check(ret, call):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")


def unshare(flags):
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def clone(flags):
    """os.fork() into new namespaces, with a pidfd: (pid, pidfd) in the parent, (0, -1) in the child.

    The interpreter's own fork hooks run around the call, as in os.fork().
    This is clone(2), not clone3(2): clone3's flags sit in memory that no
    seccomp filter can read, so systemd's RestrictNamespaces= (and Docker's
    default profile) answer clone3 with ENOSYS. As with any raw clone, glibc's
    cached thread id in the child is its parent's; nothing here reads it.
    """
    pidfd = ctypes.c_int(-1)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc_gil.syscall(SYS_clone, ctypes.c_ulong(flags | CLONE_PIDFD | signal.SIGCHLD), None, ctypes.byref(pidfd), None, None)
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0, -1
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone({flags:#x}): {os.strerror(err)}")
    return pid, pidfd.value


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount({source} -> {target}, {fstype}, {flags:#x}, {data})")


def umount2(target, flags):
    _check(_libc.umount2(target.encode(), flags), f"umount2({target}, {flags:#x})")


def pivot_root(new_root, put_old):
    _check(_libc.syscall(SYS_pivot_root, new_root.encode(), put_old.encode()), f"pivot_root({new_root}, {put_old})")


def mount_tmpfs(target, options, flags=MS_NOSUID | MS_NODEV):
    mount("tmpfs", target, "tmpfs", flags, options)


def mount_bind_readonly(source, target, flags=MS_NOSUID | MS_NODEV):
    """Bind `source` at `target`, then make it read-only (a bind needs a second remount for that)."""
    mount(source, target, None, MS_BIND)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)


def _proc_status():
    """This process as the kernel holds it: /proc/self/status as {field: value}."""
    with open("/proc/self/status", "rb") as f:
        return {name.decode(): value.strip().decode() for name, _, value in (line.partition(b":") for line in f.read().splitlines())}


# 5.2 Seccomp: an allowlist, built once in the runner and loaded as raw BPF
# in the child just before execve. Unlisted calls fail with ENOSYS (glibc
# falls back from new calls such as clone3 on ENOSYS, not on EPERM); the
# calls below that someone would reach for to escape fail with EPERM, so a
# test can tell "explicitly denied" from "not on the list". Foreign
# architectures (i386, x32 on x86_64) are killed: their numbers differ.

#: Validated with python3, node (worker_threads), bash pipelines and coreutils;
#: started from the system calls strace saw them make on Debian 12.
#: Left off on purpose: sync (flushes every filesystem of the host: an I/O lever).
#: Denied below: syncfs (the same lever, one filesystem at a time) and inotify (on the
#: shared /usr it shows which files other tenants' jobs open; no interpreter needs it).
SECCOMP_ALLOW = sorted("""
    accept accept4 access alarm arch_prctl bind brk capget chdir chmod chown clock_getres clock_gettime
    clock_nanosleep close close_range connect copy_file_range dup dup2 dup3 epoll_create epoll_create1
    epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2 execve execveat exit exit_group
    faccessat faccessat2 fadvise64 fallocate fchdir fchmod fchmodat fchown fchownat fcntl fdatasync
    fgetxattr flistxattr flock fork fstat fstatfs fsync ftruncate futex futex_waitv futimesat get_mempolicy
    get_robust_list getcpu getcwd getdents getdents64 getegid geteuid getgid getgroups getitimer
    getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit
    getrusage getsid getsockname getsockopt gettid gettimeofday getuid getxattr kill lchown lgetxattr
    link linkat listen listxattr llistxattr lseek lstat madvise mbind membarrier memfd_create mincore mkdir mkdirat mknod mknodat
    mlock mlock2 mmap mprotect mremap msgctl msgget msgrcv msgsnd msync munlock munmap nanosleep newfstatat
    open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect
    poll ppoll prctl pread64 preadv preadv2 prlimit64 pselect6 pwrite64 pwritev pwritev2 read readahead
    readlink readlinkat readv recvfrom recvmmsg recvmsg rename renameat renameat2 restart_syscall rmdir
    rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
    rt_sigtimedwait rt_tgsigqueueinfo sched_get_priority_max sched_get_priority_min sched_getaffinity
    sched_getattr sched_getparam sched_getscheduler sched_setaffinity sched_yield select semctl semget
    semop semtimedop sendfile sendmmsg sendmsg sendto set_mempolicy set_robust_list set_tid_address
    setitimer setpgid setpriority setrlimit setsid setsockopt shmat shmctl shmdt shmget shutdown
    sigaltstack signalfd signalfd4 splice stat statfs statx symlink symlinkat sync_file_range
    sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime
    timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill truncate umask uname
    unlink unlinkat utime utimensat utimes vfork wait4 waitid write writev
""".split())
#: Denied with EPERM, each for a named reason.
SECCOMP_DENY = {
    "acct": "host accounting", "add_key": "keyrings are not namespaced: cross-job channel",
    "bpf": "kernel attack surface", "chroot": "filesystem escape tool", "delete_module": "kernel modules",
    "fanotify_init": "watches the host filesystem", "finit_module": "kernel modules", "fsconfig": "new mount API",
    "fsmount": "new mount API", "fsopen": "new mount API", "fspick": "new mount API",
    "init_module": "kernel modules", "io_uring_enter": "io_uring: frequent CVEs, bypasses socket filter",
    "io_uring_register": "io_uring", "io_uring_setup": "io_uring", "ioperm": "port I/O", "iopl": "port I/O",
    "kexec_file_load": "kexec", "kexec_load": "kexec", "keyctl": "keyrings are not namespaced",
    "mount": "remounting is an escape path", "mount_setattr": "new mount API", "move_mount": "new mount API",
    "name_to_handle_at": "file handles: the classic container breakout",
    "open_by_handle_at": "file handles: the classic container breakout", "open_tree": "new mount API",
    "perf_event_open": "kernel attack surface and side channel", "personality": "can disable ASLR",
    "pidfd_getfd": "steals fds", "pivot_root": "filesystem escape tool", "process_vm_readv": "cross-process memory",
    "process_vm_writev": "cross-process memory", "ptrace": "debugging the jail's processes, escape helper",
    "quotactl": "host quotas", "reboot": "host power", "request_key": "keyrings are not namespaced",
    "setns": "joins other namespaces", "settimeofday": "host clock", "clock_settime": "host clock",
    "adjtimex": "host clock", "swapoff": "host swap", "swapon": "host swap", "syslog": "kernel log",
    "umount2": "unmounting reveals what is beneath", "unshare": "new namespaces unlock root-only kernel paths",
    "userfaultfd": "exploit primitive for kernel races", "sethostname": "the job's name is fixed",
    "setdomainname": "the job's name is fixed", "setuid": "identity is fixed", "setgid": "identity is fixed",
    "setreuid": "identity is fixed", "setregid": "identity is fixed", "setresuid": "identity is fixed",
    "setresgid": "identity is fixed", "setgroups": "identity is fixed", "setfsuid": "identity is fixed",
    "setfsgid": "identity is fixed", "capset": "capabilities are gone for good",
    "syncfs": "flushes a host filesystem: an I/O lever, as sync",
    "inotify_init": "watches the shared /usr: which files other jobs open", "inotify_init1": "watches the shared /usr",
    "inotify_add_watch": "watches the shared /usr", "inotify_rm_watch": "watches the shared /usr",
}
#: socket() and socketpair() families allowed; the job's netns holds only its own loopback.
#: AF_VSOCK, AF_PACKET and AF_NETLINK are not (fully) namespaced, so they get EAFNOSUPPORT.
SOCKET_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
TIOCSTI = 0x5412  # <asm-generic/ioctls.h>: push bytes into a terminal's input queue


def seccomp_build():
    """Compile the job filter to raw BPF bytes (runner, once)."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ERRNO(errno.ENOSYS))
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in SECCOMP_ALLOW:
        f.add_rule(sc.ALLOW, name)
    for name in sorted(SECCOMP_DENY):
        f.add_rule(sc.ERRNO(errno.EPERM), name)
    # ioctl: allowed unless the request's low 32 bits (all the kernel reads) are TIOCSTI, so high
    # bits cannot smuggle it past (CVE-2019-10063). libseccomp lets an unconditional ALLOW shadow
    # a conditional deny, so "not TIOCSTI" is spelled as "some bit differs": one rule per bit.
    for bit in range(32):
        mask = 1 << bit
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, mask, ~TIOCSTI & mask))
    f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, TIOCSTI))
    # clone: threads and processes only; any namespace flag is an escape attempt.
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NEW_ALL, 0))
    for flag in (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME):
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory seccomp cannot read, so it stays off the list: the
    # default ENOSYS makes glibc fall back to clone (libseccomp refuses a rule equal to the default).
    for call in ("socket", "socketpair"):
        for family in SOCKET_FAMILIES:
            f.add_rule(sc.ALLOW, call, sc.Arg(0, sc.EQ, family))
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.GT, max(SOCKET_FAMILIES)))
        for family in range(0, max(SOCKET_FAMILIES)):
            if family not in SOCKET_FAMILIES:
                f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.EQ, family))
    memfd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    with open(memfd, "w+b") as out:
        f.export_bpf(out)
        out.seek(0)
        bpf = out.read()
    if not bpf or len(bpf) % 8:
        raise HostError("seccomp: libseccomp exported no usable BPF program")
    return bpf


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_load(bpf):
    """Install the raw filter on this process (needs no_new_privs, set before)."""
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(len(bpf) // 8, ctypes.cast(program, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


# 5.3 cgroups: one small interface over v1 (a hierarchy per controller) and
# v2 (one tree). Each job gets its own cgroup below the server's own, named
# with a tag derived from the state directory's device and inode, so two
# servers on one host never sweep each other's jobs, even with the same
# SANDRUN_STATE_DIR in two mount namespaces. Limits are read back after writing.

CGROUP_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
CPU_PERIOD_US = 100_000


def _write(path, value):
    with open(path, "w") as f:
        f.write(value)


def _read(path):
    with open(path) as f:
        return f.read()


def cgroup_tag(state):
    """The name of a server's cgroups, from the os.stat() of its (mounted) state directory."""
    return "sandrun-" + hashlib.sha256(f"{state.st_dev}:{state.st_ino}".encode()).hexdigest()[:8]


def cgroup_layout():
    """The cgroup mounts ({"v2": point}, or {controller: point} on v1) and this process's own cgroup in each."""
    mounts = {}
    for point, fstype, options in mountinfo():
        if fstype == "cgroup2" and point == "/sys/fs/cgroup":
            mounts["v2"] = point
        elif fstype == "cgroup":
            for controller in options.split(","):
                if controller in CGROUP_CONTROLLERS:
                    mounts[controller] = point
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else ["v2"]:
                own[controller] = path
    return mounts, own


CGROUP_SCOPE_MARK = "SANDRUN_SCOPE_PID"  # set across the re-exec only; the server's children never see it


def cgroup_delegate():
    """Master, first: on cgroup v2, be alone in a cgroup that has memory, pids and cpu.

    v2 lets a cgroup hand controllers to children only while it holds no process
    of its own, so the master moves into a leaf ("http") below its cgroup; any
    other process there (a login session's shell, `make`, pytest) forbids that.
    Under systemd, the documented way out is a transient scope with Delegate=yes
    around this process alone, asked of systemd as container managers do: exec
    through `systemd-run --scope`, which keeps the pid, terminal and environment.
    Elsewhere, refuse with the sharers' names and a command that works.
    """
    mounts, own = cgroup_layout()
    reexecuted = os.environ.pop(CGROUP_SCOPE_MARK, None) == str(os.getpid())
    if "v2" not in mounts:
        return
    base = mounts["v2"] + own["v2"].rstrip("/")
    others = [pid for pid in _read(os.path.join(base, "cgroup.procs")).split() if int(pid) != os.getpid()]
    missing = [c for c in ("memory", "pids", "cpu") if c not in _read(os.path.join(base, "cgroup.controllers")).split()]
    if not others and not missing:
        return
    with open("/proc/self/cmdline", "rb") as f:
        argv = [sys.executable] + [arg.decode(errors="surrogateescape") for arg in f.read().split(b"\0")[1:-1]]
    systemd_run = shutil.which("systemd-run")
    if systemd_run and os.path.isdir("/run/systemd/system") and not reexecuted:
        log.info("event=cgroup_scope_reexec cgroup=%s other_processes=%d", own["v2"], len(others))
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.environ[CGROUP_SCOPE_MARK] = str(os.getpid())
        os.execv(systemd_run, ["systemd-run", "--scope", "--quiet", "--collect", "-p", "Delegate=yes", "--", *argv])
    if others:
        names = [f"{pid} ({_comm(pid)})" for pid in others[:8]]
        why = f"is shared with {', '.join(names)}{f' and {len(others) - 8} more' if len(others) > 8 else ''}"
    else:
        why = f"lacks the controllers {', '.join(missing)}"
    where = "even in the scope systemd-run made" if reexecuted else "and no systemd runs here to delegate a scope"
    command = ("mkdir -p /sys/fs/cgroup/sandrun && echo '+memory +pids +cpu' > /sys/fs/cgroup/cgroup.subtree_control && "
               f"sh -c 'echo $$ > /sys/fs/cgroup/sandrun/cgroup.procs && exec \"$@\"' sh {shlex.join(argv)}")
    raise HostError(f"cgroups: {base} {why} ({where}); on cgroup v2 the server must be the only process of a cgroup "
                    f"that has memory, pids and cpu. Start it alone in a cgroup of its own, for example: {command}")


def _comm(pid):
    try:
        return _read(f"/proc/{pid}/comm").strip()
    except OSError:
        return "gone"  # exited while we looked


class Cgroups:
    """Detects the host's cgroup layout; creates, measures and removes job cgroups."""

    def __init__(self):
        mounts, own = cgroup_layout()
        self.tag = cgroup_tag(os.stat(STATE_DIR))
        if "v2" in mounts:
            self.version = 2
            self.base = {"v2": mounts["v2"] + own["v2"].rstrip("/")}
        elif all(c in mounts for c in CGROUP_CONTROLLERS):
            self.version = 1
            self.base = {c: os.path.join(mounts[c] + own[c].rstrip("/"), self.tag) for c in CGROUP_CONTROLLERS}
        else:
            missing = [c for c in CGROUP_CONTROLLERS if c not in mounts]
            raise HostError(f"cgroups: neither a cgroup2 tree at /sys/fs/cgroup nor v1 hierarchies for {missing}")

    def prepare(self):
        """Master, before any fork: make the base ready for job cgroups.

        v2: a cgroup with processes may not enable controllers for children
        ("no internal processes"), so the master moves itself into a leaf
        'http' (workers and the runner inherit it) and enables memory, pids
        and cpu for the base's children.
        """
        if self.version == 1:
            if not os.path.exists(os.path.join(self.base["memory"].rsplit("/", 1)[0], "memory.memsw.limit_in_bytes")) and _swap_enabled():
                raise HostError("cgroups: swap is on but memory.memsw is not available (boot with swapaccount=1)")
            for path in self.base.values():
                os.makedirs(path, exist_ok=True)
            return
        base = self.base["v2"]
        available = _read(os.path.join(base, "cgroup.controllers")).split()
        missing = [c for c in ("memory", "pids", "cpu") if c not in available]
        if missing:
            raise HostError(f"cgroups: {base} lacks controllers {missing}; run Sandrun in a delegated cgroup (systemd Delegate=yes)")
        leaf = os.path.join(base, "http")
        os.makedirs(leaf, exist_ok=True)
        _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids +cpu")
        except OSError as exc:
            with contextlib.suppress(OSError):  # a failed start leaves nothing in the caller's cgroup
                _write(os.path.join(base, "cgroup.procs"), str(os.getpid()))
                os.rmdir(leaf)
            raise HostError(f"cgroups: cannot enable controllers in {base} ({exc.strerror}); "
                            "it must hold no other processes (systemd Delegate=yes)") from None

    def job_dirs(self, name):
        if self.version == 2:
            return [os.path.join(self.base["v2"], f"job-{self.tag}-{name}")]
        return sorted({os.path.join(self.base[c], name) for c in CGROUP_CONTROLLERS})

    def _file(self, name, controller, filename):
        if self.version == 2:
            return os.path.join(self.job_dirs(name)[0], filename)
        return os.path.join(self.base[controller], name, filename)

    def create(self, name, memory_bytes):
        """Make a jail's cgroup(s) and set memory (no swap), pids and one CPU of bandwidth."""
        for path in self.job_dirs(name):
            os.mkdir(path, 0o700)
        if self.version == 2:
            limits = [("memory", "memory.swap.max", "0"), ("memory", "memory.oom.group", "1"),
                      ("pids", "pids.max", str(JOB_PIDS_MAX)), ("cpu", "cpu.max", f"{CPU_PERIOD_US} {CPU_PERIOD_US}")]
        else:
            limits = [("pids", "pids.max", str(JOB_PIDS_MAX)), ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
                      ("cpu", "cpu.cfs_quota_us", str(CPU_PERIOD_US))]
        self._set(name, limits)
        self.limit_memory(name, memory_bytes)

    def limit_memory(self, name, memory_bytes):
        """Memory and memory plus swap, both the same: no swap. Lowered when a built jail gets its job."""
        if self.version == 2:
            limits = [("memory", "memory.max", str(memory_bytes))]
        else:
            limits = [("memory", "memory.limit_in_bytes", str(memory_bytes))]  # first: memsw may never be below it
            if os.path.exists(self._file(name, "memory", "memory.memsw.limit_in_bytes")):
                limits.append(("memory", "memory.memsw.limit_in_bytes", str(memory_bytes)))
        self._set(name, limits)

    def _set(self, name, limits):
        for controller, filename, value in limits:
            path = self._file(name, controller, filename)
            if filename == "memory.swap.max" and not os.path.exists(path) and not _swap_enabled():
                continue
            _write(path, value)
            if _read(path).strip() != value:
                raise JailError(f"cgroup: {filename} reads back {_read(path).strip()!r}, wrote {value!r}")

    def join_self(self, name):
        """Move the calling process into the jail's cgroup(s) ("0" is the writer itself)."""
        for path in self.job_dirs(name):
            _write(os.path.join(path, "cgroup.procs"), "0")

    def cpu_seconds(self, name):
        if self.version == 2:
            stats = dict(line.split() for line in _read(self._file(name, "cpu", "cpu.stat")).splitlines())
            return int(stats["usage_usec"]) / 1e6
        return int(_read(self._file(name, "cpuacct", "cpuacct.usage"))) / 1e9

    def memory_peak_bytes(self, name):
        filename = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        path = self._file(name, "memory", filename)
        return int(_read(path)) if os.path.exists(path) else None

    def oom_kills(self, name):
        filename = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in _read(self._file(name, "memory", filename)).splitlines():
            key, value = line.split()
            if key == "oom_kill":
                return int(value)
        return 0

    def procs(self, name):
        try:
            return [int(p) for p in _read(self._file(name, "pids", "cgroup.procs")).split()]
        except FileNotFoundError:
            return []  # never created, or already removed

    def kill(self, name):
        """SIGKILL whatever is left in a job's cgroup."""
        if self.version == 2 and os.path.exists(self._file(name, "pids", "cgroup.kill")):
            _write(self._file(name, "pids", "cgroup.kill"), "1")
            return
        for pid in self.procs(name):
            with contextlib.suppress(ProcessLookupError):  # already gone: the goal
                os.kill(pid, signal.SIGKILL)

    def remove(self, name):
        """Remove a job's cgroup(s) if they are empty; False while a task is still leaving."""
        for path in self.job_dirs(name):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                return False
        return True

    def kill_and_remove(self, name):
        """Kill and remove, waiting for it (start-up, shutdown, spares): the runner's loop uses kill() and remove()."""
        deadline = time.monotonic() + 5
        while True:
            self.kill(name)
            if self.remove(name):
                return
            if time.monotonic() > deadline:
                raise JailError(f"cgroup {name}: processes survive SIGKILL")
            time.sleep(0.01)

    def release(self):
        """Master, on exit, once the runner is gone: undo prepare(), so a stopped or failed
        server leaves no cgroup behind, whoever made the cgroup it was started in."""
        self.sweep()
        if self.version == 1:
            for path in self.base.values():
                if os.path.isdir(path):
                    os.rmdir(path)
            return
        base = self.base["v2"]
        if os.path.isdir(os.path.join(base, "http")):
            with contextlib.suppress(OSError):  # a process still leaving the leaf: it goes with its cgroup's owner
                _write(os.path.join(base, "cgroup.subtree_control"), "-memory -pids -cpu")
                _write(os.path.join(base, "cgroup.procs"), str(os.getpid()))
                os.rmdir(os.path.join(base, "http"))

    def sweep(self):
        """Remove job cgroups a dead runner left behind."""
        if self.version == 2:
            prefix = f"job-{self.tag}-"
            names = {n[len(prefix):] for n in os.listdir(self.base["v2"]) if n.startswith(prefix)}
        else:
            names = {e.name for path in self.base.values() if os.path.isdir(path) for e in os.scandir(path) if e.is_dir()}  # all ours
        for name in sorted(names):
            self.kill_and_remove(name)
        return len(names)


def _swap_enabled():
    with open("/proc/swaps") as f:
        return len(f.read().splitlines()) > 1


# 5.4 The jail. The runner asks its jail factory for every jail (jail_build);
# the factory clones the jail's pid 1 (jail_clone) as the runner's child; that
# process builds the jail (jail_prepare), waits for its job (jail_run) and
# stays as the jail's init (jail_init). jail_assign() and jail_discard() run in
# the runner. A cloned child's body sits in try/finally os._exit(): no
# exception can unwind it back into the factory's loop.
#
# The runner <-> jail channel, made per jail by the factory:
#   setup   SOCK_SEQPACKET socket, one message per send:
#             jail -> runner  MSG_WORK "W" with the /work directory fd;
#                             MSG_FAILED "E<step>: <error>", then the jail exits;
#                             MSG_STARTED "X" once the job is spawned.
#             runner -> jail  MSG_JOB "J" with three fds: the job's description
#                             (a memfd), its payload tar and its stdin.
#           EOF at the runner: the jail closed its end (its job runs) or died.
#           EOF at a waiting jail: the runner does not need it; it leaves quietly.
#   go      pipe, never written: EOF at the jail means the runner is gone.
#   status  pipe, jail -> runner: 4 bytes, the job's wait status. EOF with
#           nothing: the jail's init was killed from outside.
#   stdout, stderr  pipes, job -> runner.
# The runner <-> factory channel, one SOCK_SEQPACKET socket:
#   runner -> factory  FACTORY_BUILD "B<cgroup>": clone a jail into that cgroup;
#   factory -> runner  FACTORY_BUILT "P<pid>" with the runner's six ends of the
#                      jail's channel (pidfd, stdout, stderr, setup, go, status),
#                      or MSG_FAILED "E<error>". EOF at the factory: the runner is
#                      gone; at the runner: the factory died (FactoryError).

MSG_WORK, MSG_FAILED, MSG_STARTED, MSG_JOB = b"W", b"E", b"X", b"J"
FACTORY_BUILD, FACTORY_BUILT = b"B", b"P"
FACTORY_ANSWER_S = 10  # a clone takes milliseconds; past this the factory is stuck
EXIT_JAIL_FAILED = 125  # a child's exit code when a jail step failed (the runner also gets the reason)
JAIL_ROOT_SIZE = "1m"  # the root tmpfs holds only mount points and a few /etc files
#: Host files the interpreters need, bound read-only into the jail's /etc when present
#: (python3.N: each Python version's own, /etc/python3.11 on Debian 12, 3.13 on Debian 13;
#: matplotlibrc: Debian's matplotlib will not import without it; fonts: fontconfig's).
JAIL_ETC_BINDS = ("alternatives", "fonts", "ld.so.cache", "localtime", "matplotlibrc", "nsswitch.conf", "perl", "python3",
                  *sorted(n for n in os.listdir("/etc") if re.fullmatch(r"python3\.\d+", n)), "ssl")
#: Every job's environment, under the manifest's `env`, which may override any of it. BLAS and
#: OpenMP get one thread each: they would start one per host CPU, against pids.max. matplotlib
#: gets a backend without a display and a writable config directory.
JOB_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "USER": "sandbox",
    "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
    "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/matplotlib",
    "XDG_CACHE_HOME": "/tmp/.cache",  # fontconfig's cache (matplotlib runs fc-list) is not an output
}
#: Device nodes a program expects; bound from the host, never created (no mknod).
JAIL_DEV_NODES = ("full", "null", "random", "urandom", "zero")
#: What a job reads in /proc/1/cmdline: nothing of the host's command line or paths.
JAIL_CMDLINE = b"sandrun-jail\0"


class FactoryError(Exception):
    """The jail factory died or stopped answering: a fault of the runner's own machinery."""


class JailSpec:
    """A job as a jail receives it (jail_assign), resolved by the runner from its manifest."""

    def __init__(self, manifest, payload_fd):
        self.payload_fd = payload_fd
        self.memory_bytes = manifest["memory_mb"] * MiB
        self.timeout_s = manifest["timeout"]
        interpreter = INTERPRETERS[manifest["interpreter"]]
        self.compile = None
        if manifest["interpreter"] in COMPILERS:
            _, before, extensions, after = COMPILERS[manifest["interpreter"]]
            self.compile = {"argv": [interpreter["path"], *before], "entrypoint": manifest["entrypoint"],
                            "extensions": extensions, "after": ["-o", PROGRAM_PATH, *after]}
            self.argv = [PROGRAM_PATH, *manifest["args"]]
        else:
            self.argv = [interpreter["path"]]
            if manifest["interpreter"] == "node":
                # Node sizes its heap from host RAM, not the cgroup: without this it is OOM-killed instead of throwing.
                self.argv.append(f"--max-old-space-size={max(8, manifest['memory_mb'] * 3 // 4)}")
            self.argv += [manifest["entrypoint"], *manifest["args"]]
        self.env = {**JOB_ENV, **manifest["env"]}
        self.stdin = manifest["stdin"].encode("utf-8", "surrogatepass")


class JailHandle:
    """The runner's side of one jail: built first (jail_build), then given its job (jail_assign)."""

    def __init__(self, cgroup, pid, pidfd, stdout_r, stderr_r, setup, go_w, status_r):
        self.cgroup, self.pid, self.pidfd = cgroup, pid, pidfd
        self.stdout_r, self.stderr_r, self.setup, self.go_w, self.status_r = stdout_r, stderr_r, setup, go_w, status_r
        self.reaped = False

    def close(self):
        """Close the runner's ends, once; the setup socket first, so a spare jail waiting on it leaves."""
        self.setup.close()
        for name in ("stdout_r", "stderr_r", "pidfd", "status_r", "go_w"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


class JailEnds:
    """The children's ends of the runner's pipes and socket."""

    def __init__(self, stdout_w, stderr_w, go_r, setup, status_w):
        self.stdout_w, self.stderr_w, self.go_r, self.setup, self.status_w = stdout_w, stderr_w, go_r, setup, status_w


def factory_start(cgroups):
    """Fork the jail factory: the runner does it first thing, before it reads any job (and
    the start-up probe does the same). Returns (pid, socket to it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            factory_main(theirs, cgroups, parent)
        except BaseException as exc:
            log_failure("factory_failed", exc)
        finally:
            os._exit(1)
    theirs.close()
    ours.settimeout(FACTORY_ANSWER_S)
    return pid, ours


def factory_main(sock, cgroups, parent):
    """The jail factory: clones jails on request, and does nothing else. Never returns.

    Every jail's pid 1 is a copy of this process, so it must hold nothing of
    anyone's: it is forked before any job is read, gets no key, and never
    touches a job's data. Idle between requests, its pages stay as they
    were, and a clone copies only what the jail itself writes.
    """
    prctl.set_name("sandrun-factory")
    prctl.set_pdeathsig(signal.SIGKILL)  # it serves one runner, and goes with it
    if os.getppid() != parent:
        return
    os.closerange(3, sock.fileno())
    os.closerange(sock.fileno() + 1, 1 << 20)
    bpf = seccomp_build()
    gc.collect()
    gc.freeze()  # collections in the jails would otherwise write to every object, copying its page
    while True:
        data, fds = recv_fds(sock, 256, 0)
        if not data:
            os._exit(0)  # the runner is gone
        if data[:1] != FACTORY_BUILD:
            sock.send(MSG_FAILED + b"unknown request")
            continue
        try:
            pid, ends = jail_clone(cgroups, data[1:].decode(), bpf)
        except OSError as exc:
            sock.send(MSG_FAILED + f"clone: {exc.strerror}".encode())
            continue
        try:
            socket.send_fds(sock, [FACTORY_BUILT + struct.pack("i", pid)], ends)
        finally:
            for fd in ends:
                os.close(fd)


def jail_clone(cgroups, cgroup, bpf):
    """Factory: clone a jail's pid 1 into new namespaces; returns (pid, the runner's six ends).

    CLONE_PARENT makes the jail the runner's child, not the factory's: the
    runner reaps it, and its death signal fires when the runner dies.
    New mount, pid, network, IPC and UTS namespaces: the job sees none of the
    host's mounts, processes, interfaces, SysV IPC or name. (The cgroup
    namespace comes in jail_prepare, once the jail is inside its cgroup.)
    """
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    setup_parent, setup_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ends = JailEnds(stdout_w, stderr_w, go_r, setup_child, status_w)
    try:
        pid, pidfd = clone(CLONE_PARENT | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    except OSError:
        for fd in (stdout_r, stdout_w, stderr_r, stderr_w, go_r, go_w, status_r, status_w):
            os.close(fd)
        setup_parent.close()
        setup_child.close()
        raise
    if pid == 0:
        try:
            for fd in (go_w, stdout_r, stderr_r, status_r):
                os.close(fd)  # so that EOF on each pipe means what it should
            setup_parent.close()
            jail_enter(cgroups, cgroup, bpf, ends)
        finally:
            os._exit(EXIT_JAIL_FAILED)
    for fd in (stdout_w, stderr_w, go_r, status_w):
        os.close(fd)
    setup_child.close()
    for fd in (stdout_r, stderr_r, status_r):
        os.set_blocking(fd, False)
    return pid, [pidfd, stdout_r, stderr_r, setup_parent.detach(), go_w, status_r]


def jail_build(factory, cgroups):
    """Runner: a new jail, built as far as it goes without a job; returns a JailHandle.

    All of it is the same for every job, so the runner builds the next jail
    while it waits or while jobs run, and a job waits only for jail_assign().
    The jail has its own fresh cgroup, with the largest memory limit until
    jail_assign() lowers it. Raises JailError if the cgroup or the clone
    fails, FactoryError if the factory does not answer.
    """
    cgroup = "jail-" + secrets.token_hex(8)
    try:
        cgroups.create(cgroup, JOB_MEMORY_MAX_BYTES)
    except (OSError, JailError) as exc:
        cgroups.kill_and_remove(cgroup)
        raise JailError(f"cgroup: {exc}") from None
    try:
        factory.send(FACTORY_BUILD + cgroup.encode())
        data, fds = recv_fds(factory, 64, 6)
    except OSError as exc:  # a timeout too
        cgroups.kill_and_remove(cgroup)
        raise FactoryError(f"the jail factory does not answer ({type(exc).__name__})") from None
    if data[:1] == FACTORY_BUILT and len(data) == 5 and len(fds) == 6:
        pidfd, stdout_r, stderr_r, setup, go_w, status_r = fds
        (pid,) = struct.unpack("i", data[1:])
        return JailHandle(cgroup, pid, pidfd, stdout_r, stderr_r, socket.socket(fileno=setup), go_w, status_r)
    for fd in fds:
        os.close(fd)
    cgroups.kill_and_remove(cgroup)
    if not data:
        raise FactoryError("the jail factory died")
    raise JailError(data[1:].decode(errors="replace"))


def _memfd(name, data):
    fd = os.memfd_create(name)
    with open(fd, "wb", closefd=False) as f:
        f.write(data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def jail_assign(handle, spec, cgroups):
    """Runner: give a built jail its job: its memory limit, then argv, env, timeout, payload and stdin.

    The job travels as file descriptors (its description in a memfd), so no
    manifest is too large for one message. Raises JailError if the jail is gone.
    """
    cgroups.limit_memory(handle.cgroup, spec.memory_bytes)
    description = _memfd("job", json.dumps({"argv": spec.argv, "env": spec.env, "timeout_s": spec.timeout_s,
                                            "compile": spec.compile}).encode())
    stdin = _memfd("stdin", spec.stdin) if spec.stdin else os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        socket.send_fds(handle.setup, [MSG_JOB], [description, spec.payload_fd, stdin])
    except OSError as exc:
        raise JailError(f"jail gone before its job: {exc}") from None
    finally:
        os.close(description)
        os.close(stdin)


def jail_discard(handle, cgroups):
    """Runner: end a built jail that gets no job. Closing its socket makes it leave quietly
    if it was waiting (or die, if it had failed); then reap it and remove its cgroup."""
    handle.setup.close()
    os.waitpid(handle.pid, 0)
    handle.close()
    cgroups.kill_and_remove(handle.cgroup)


JAIL_STATUS = struct.Struct("ii")  # jail init -> runner: the wait status, and 1 if it is the compiler's


def jail_job_status(handle, init_status):
    """Runner: (wait status, compiler's) as the job's init reported it, else the init's own (killed from outside)."""
    try:
        data = os.read(handle.status_r, JAIL_STATUS.size)
    except BlockingIOError:
        data = b""
    return JAIL_STATUS.unpack(data) if len(data) == JAIL_STATUS.size else (init_status, 0)


class _JailSteps:
    """The jail step under way, so that a failure can name it to the runner, which logs it.

    From "wait for the job" on, an error's text can carry the job's data (an
    archive member's name, say): only its type is told then.
    """

    def __init__(self):
        self.name, self.job_data = "start", False

    def __call__(self, name):
        self.name = name
        self.job_data = self.job_data or name == "wait for the job"

    def failure(self, exc):
        return f"{self.name}: {type(exc).__name__ if self.job_data else exc}"[:4000]


def jail_enter(cgroups, cgroup, bpf, ends):
    """C2: pid 1 of the job's namespaces, root until the drop. Never returns.

    jail_prepare() builds the jail: every step the same for every job, so a
    spare jail waits for its job already unprivileged and under seccomp.
    jail_run() takes the job and spawns it (C3). C2 then stays as the jail's
    init (jail_init): the job has ordinary signal semantics and its orphans
    are reaped. On any failure the runner is told which step failed, and
    nothing runs.
    """
    step = _JailSteps()
    try:
        jail_prepare(cgroups, cgroup, bpf, ends, step)
        job_pid, stdin_fd, job = jail_run(ends, step)
    except BaseException as exc:
        ends.setup.send(MSG_FAILED + step.failure(exc).encode(errors="replace"))
        os._exit(EXIT_JAIL_FAILED)
    try:
        jail_init(job_pid, ends, stdin_fd, job)
    finally:
        os._exit(EXIT_JAIL_FAILED)


def jail_prepare(cgroups, cgroup, bpf, ends, step):
    """C2, root: build the jail, one step per line in the order the security argument needs."""
    prctl.set_name("sandrun-jail")  # in ps on the host: a jail's init, spare or running a job
    gc.disable()  # a collection would touch, and so copy, the factory's pages: memory charged to the job
    step("death signal")
    # If the runner dies, the kernel kills pid 1 and with it the whole job.
    prctl.set_pdeathsig(signal.SIGKILL)
    if select_readable(ends.go_r):
        raise JailError("runner died before the death signal was armed")
    step("own descriptors only")
    _jail_fds(ends)
    step("cgroup")
    # First thing, before C2 creates anything a job could use.
    cgroups.join_self(cgroup)
    step("cgroup namespace")
    # From inside the job's cgroup, so that cgroup is the root of all the job can see.
    unshare(CLONE_NEWCGROUP)
    step("private mounts")
    # Otherwise mounts below could propagate back to the host (systemd makes / shared).
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    step("root tmpfs")
    root = state_path("runner", "root")
    mount_tmpfs(root, f"size={JAIL_ROOT_SIZE},mode=0755")
    step("filesystem tree")
    _jail_tree(root)
    step("bind /usr")
    # Read-only, nosuid (setuid binaries do not elevate), nodev.
    mount_bind_readonly("/usr", root + "/usr")
    step("/etc")
    _jail_etc(root)
    step("/proc")
    # Mounted by pid 1 of the new pid namespace, so it shows the job's processes only.
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    step("/dev")
    _jail_dev(root)
    step("/tmp")
    # Private, size-capped and charged to the job's memory: no cross-job /tmp.
    mount_tmpfs(root + "/tmp", f"size={JOB_TMP_MAX_BYTES},nr_inodes={JOB_TMP_INODES_MAX},mode=1777")
    step("/work")
    # Its inode cap bounds the entries the runner walks when it collects outputs.
    mount_tmpfs(root + "/work", f"size={JOB_WORKDIR_MAX_BYTES},nr_inodes={JOB_WORKDIR_INODES_MAX},mode=0755,uid={JOB_UID},gid={JOB_UID}")
    step("hand over /work")
    # The runner copies outputs from this fd after the job ends; the tmpfs
    # lives as long as the fd does, and the runner never needs a path into it.
    work_fd = os.open(root + "/work", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    socket.send_fds(ends.setup, [MSG_WORK], [work_fd])
    os.close(work_fd)
    step("pivot_root")
    # Swap the root for the tmpfs; detaching the old root makes the host's files unreachable.
    pivot_root(root, root + "/oldroot")
    os.chdir("/")
    umount2("/oldroot", MNT_DETACH)
    os.rmdir("/oldroot")
    step("read-only root")
    # After pivot_root and the rmdir: nothing else is created at the top.
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    mount_bind_readonly("/proc/sys", "/proc/sys", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    step("hostname")
    socket.sethostname("sandbox")
    step("loopback")
    # The new network namespace has only 'lo', down; up, a job can talk to itself and nothing else.
    _jail_loopback_up()
    step("command line")
    # /proc/1/cmdline is readable by every job: make it say what this is, not the
    # server's command line with the checkout's path.
    _jail_cmdline()
    step("rlimits")
    _jail_rlimits()
    step("setsid")
    # No controlling terminal: TIOCSTI has nothing to inject into (seccomp denies it too).
    os.setsid()
    step("drop bounding set")
    # Needs CAP_SETPCAP, so before the uid change; afterwards nothing can regain a capability.
    _jail_drop_bounding_set()
    step("drop identity")
    # No groups, then gid, then uid: changing uid away from 0 clears permitted and effective caps.
    os.setgroups([])
    os.setresgid(JOB_UID, JOB_UID, JOB_UID)
    os.setresuid(JOB_UID, JOB_UID, JOB_UID)
    _jail_verify_unprivileged()
    step("death signal again")
    # The uid change cleared it; without it a job would outlive a runner that dies.
    prctl.set_pdeathsig(signal.SIGKILL)
    if select_readable(ends.go_r):
        raise JailError("runner died before the death signal was armed again")
    step("no_new_privs")
    # execve can never grant privileges again (setuid bits, file caps); seccomp requires it.
    prctl.set_no_new_privs(True)
    if (seen := _proc_status().get("NoNewPrivs")) != "1":
        raise JailError(f"NoNewPrivs reads back {seen}")
    step("signals")
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive execve.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    step("seccomp")
    # Last of the steps that need calls the filter denies. Loaded here, in
    # pid 1, so the init that outlives the job is confined too, and so is
    # everything below, which handles the job's input.
    seccomp_load(bpf)
    if (seen := _proc_status().get("Seccomp")) != "2":
        raise JailError(f"Seccomp reads back {seen}")


def jail_run(ends, step):
    """C2, unprivileged and under seccomp: take the job and spawn it; (job pid, stdin fd)."""
    step("wait for the job")
    # Everything below depends on the job, and runs unprivileged under seccomp.
    # The runner closing the socket instead means this jail is not needed:
    # leave quietly, and the kernel undoes it all.
    job, payload_fd, stdin_fd = _jail_receive(ends.setup)
    step("cpu limit")
    # SIGXCPU at the job's timeout, SIGKILL a second later (reason cpu_limit); only lowered.
    cpu_s = int(job["timeout_s"] + 0.999)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    step("unpack payload")
    # As the job's user, inside the jail: a hostile archive can only touch the job's own tmpfs.
    os.chdir("/work")
    _jail_unpack(payload_fd)  # and closes it
    step("file descriptors")
    # Only stdin, stdout and stderr cross execve: everything else is closed or close-on-exec.
    _jail_fds(ends, stdin_fd)
    step("execve")
    # vfork and execve (posix_spawn): the job starts without a copy of this process.
    # A compiled language starts with its compiler, whose messages go to stderr; jail_init runs the program.
    if job["compile"]:
        argv = [*job["compile"]["argv"], *_jail_sources(job["compile"]), *job["compile"]["after"]]
        pid = os.posix_spawn(argv[0], argv, job["env"], setsigmask=(), file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0), (os.POSIX_SPAWN_DUP2, ends.stderr_w, 1),
            (os.POSIX_SPAWN_DUP2, ends.stderr_w, 2)])
    else:
        pid = _jail_spawn(job, ends, stdin_fd)
    ends.setup.send(MSG_STARTED)  # the job runs: a jail that dies before this line ran nothing
    return pid, stdin_fd, job


def _jail_spawn(job, ends, stdin_fd):
    return os.posix_spawn(job["argv"][0], job["argv"], job["env"], setsigmask=(), file_actions=[
        (os.POSIX_SPAWN_DUP2, stdin_fd, 0), (os.POSIX_SPAWN_DUP2, ends.stdout_w, 1), (os.POSIX_SPAWN_DUP2, ends.stderr_w, 2)])


def _jail_sources(compile_job):
    """The entrypoint, then the job's other sources of its language under /work, sorted: at most
    COMPILE_SOURCES_MAX, at most COMPILE_DEPTH_MAX deep, never through a link."""
    found, todo = [], [("", 0)]
    while todo and len(found) < COMPILE_SOURCES_MAX:
        folder, depth = todo.pop()
        try:
            entries = list(os.scandir(folder or "."))
        except OSError:
            continue  # what cannot be listed holds no source: the compiler says what is missing
        for entry in entries:
            path = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_dir(follow_symlinks=False) and depth < COMPILE_DEPTH_MAX:
                todo.append((path, depth + 1))
            elif entry.is_file(follow_symlinks=False) and entry.name.endswith(tuple(compile_job["extensions"])):
                found.append(path)
    entrypoint = compile_job["entrypoint"]
    return [entrypoint, *sorted(p for p in found if p != entrypoint)[:COMPILE_SOURCES_MAX - 1]]


def jail_init(job_pid, ends, stdin_fd, job):
    """C2 after the fork: the jail's init, unprivileged and under seccomp.

    Holds nothing of the job's: closes its ends of the output pipes and the
    setup socket (so the runner sees EOF when the job execs), reaps every
    child, and when the job ends hands its wait status to the runner and
    exits, which makes the kernel kill whatever the job left running. For a
    compiled language the first child is the compiler: once it succeeds, the
    program is spawned with the job's stdin and outputs, which are kept open
    until then; if it fails, its status is what the runner gets.
    """
    compiling = bool(job["compile"])
    ends.setup.close()
    os.close(ends.go_r)
    if not compiling:
        for fd in (ends.stdout_w, ends.stderr_w, stdin_fd):
            os.close(fd)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid != job_pid:
            continue  # an orphan of the job's, reaped
        if compiling and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            job_pid, compiling = _jail_spawn(job, ends, stdin_fd), False
            for fd in (ends.stdout_w, ends.stderr_w, stdin_fd):
                os.close(fd)
            continue
        os.write(ends.status_w, JAIL_STATUS.pack(status, int(compiling)))
        os._exit(0)


def select_readable(fd):
    return bool(select.select([fd], [], [], 0)[0])


def _jail_tree(root):
    for name in ("usr", "etc", "proc", "dev", "tmp", "work", "oldroot"):
        os.mkdir(f"{root}/{name}", 0o755)
    # Merged /usr: /bin, /lib, ... are links into /usr on the host, so they are links here too.
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), f"{root}/{name}")
        elif os.path.isdir(host):
            raise JailError(f"{host} is a directory, not a link into /usr: this host is not merged-/usr")


def _jail_etc(root):
    """A synthetic /etc: no host accounts, no host names; read-only binds of what interpreters read."""
    files = {
        "passwd": f"root:x:0:0::/:/usr/sbin/nologin\nsandbox:x:{JOB_UID}:{JOB_UID}::/work:/bin/sh\n",
        "group": f"root:x:0:\nsandbox:x:{JOB_UID}:\n",
        "hostname": "sandbox\n",
        "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
    }
    for name, text in files.items():
        with open(f"{root}/etc/{name}", "w") as f:
            f.write(text)
    for name in JAIL_ETC_BINDS:
        host = "/etc/" + name
        if os.path.isdir(host) and not os.path.islink(host):
            os.mkdir(f"{root}/etc/{name}")
        elif os.path.isfile(host):
            open(f"{root}/etc/{name}", "w").close()
        else:
            continue
        mount_bind_readonly(host, f"{root}/etc/{name}")


def _jail_dev(root):
    """A read-only tmpfs /dev with a few host nodes bound in, and a private /dev/shm."""
    dev = root + "/dev"
    mount_tmpfs(dev, "size=64k,mode=0755", MS_NOSUID | MS_NOEXEC)
    for name in JAIL_DEV_NODES:
        open(f"{dev}/{name}", "w").close()
        mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(dev + "/shm")
    mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    # Private per job: a shared /dev/shm was a cross-sandbox channel in isolate (2.6).
    mount_tmpfs(dev + "/shm", f"size={JOB_TMP_MAX_BYTES},nr_inodes={JOB_TMP_INODES_MAX},mode=1777")


def _jail_loopback_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        (flags,) = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, request), 16)
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _jail_cmdline():
    """Overwrite this process's argument strings with JAIL_CMDLINE, and read it back.

    The area is the process's own memory (its stack, where execve put argv).
    With its last byte not NUL, the kernel reads it as setproctitle(3) leaves
    it: up to the first NUL. No privilege is needed for any of it.
    """
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
    if arg_end - arg_start < len(JAIL_CMDLINE) + 1:
        raise JailError(f"the argument area has {arg_end - arg_start} bytes: too short to overwrite")
    area = JAIL_CMDLINE + b"." * (arg_end - arg_start - len(JAIL_CMDLINE))
    ctypes.memmove(arg_start, area, len(area))
    with open("/proc/self/cmdline", "rb") as f:
        if (seen := f.read()) != JAIL_CMDLINE:
            raise JailError(f"/proc/self/cmdline reads back {seen[:64]!r}")


def _jail_rlimits():
    """The limits every job gets; the CPU limit comes with the job."""
    limits = (
        (resource.RLIMIT_CORE, 0, "no core dumps of job memory"),
        (resource.RLIMIT_NOFILE, JOB_NOFILE_MAX, "bounded kernel objects per process"),
        (resource.RLIMIT_FSIZE, JOB_WORKDIR_MAX_BYTES, "no file larger than the work dir, sparse ones included"),
        (resource.RLIMIT_STACK, 8 * MiB, "bounded stack"),
    )
    for which, value, _why in limits:
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def _jail_drop_bounding_set():
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    prctl.cap_inheritable.limit()


def _jail_verify_unprivileged():
    """Read back what the kernel holds: no uid 0 anywhere, no capability in any set."""
    if os.getresuid() != (JOB_UID,) * 3 or os.getresgid() != (JOB_UID,) * 3 or os.getgroups():
        raise JailError(f"identity reads back uid={os.getresuid()} gid={os.getresgid()} groups={os.getgroups()}")
    status = _proc_status()
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if int(status.get(field, "1"), 16) != 0:  # a kernel that does not say counts as a capability held
            raise JailError(f"{field} reads back {status.get(field)}")


def _jail_unpack(payload_fd):
    """Unpack the worker-made payload tar into the cwd (/work). Input files get mtime 0,
    which is how the runner tells them from files the job created or changed."""
    with open(payload_fd, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            name = member.name
            if name.startswith("/") or ".." in name.split("/"):
                raise JailError(f"payload member {name!r} leaves /work")
            if member.isdir():
                os.makedirs(name, 0o755, exist_ok=True)
            elif member.isreg():
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, member.mode & 0o755)
                with open(fd, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(member), out, 1 * MiB)
            elif member.issym():
                os.symlink(member.linkname, name)
                continue
            elif member.islnk():
                os.link(member.linkname, name, follow_symlinks=False)
            else:
                raise JailError(f"payload member {name!r} has type {member.type!r}")
            os.utime(name, (0, 0), follow_symlinks=False)


def _jail_receive(setup):
    """C2: the job jail_assign() sent: (description, payload fd, stdin fd), or a quiet exit on EOF."""
    data, fds = recv_fds(setup, 16, 3)
    if not data and not fds:
        os._exit(0)
    if data != MSG_JOB or len(fds) != 3:
        raise JailError(f"malformed job message ({len(data)} bytes, {len(fds)} fds)")
    description, payload_fd, stdin_fd = fds
    with open(description, "rb") as f:
        job = json.loads(f.read())
    return job, payload_fd, stdin_fd


def _jail_fds(ends, *received):
    """C2 keeps 0, 1, 2, its own pipes and socket, and what it received, all close-on-exec.

    First thing in a jail, because a clone copies every descriptor of the
    runner, other jails' included: a spare holding them would keep another
    job's /work alive, and another spare's socket from ever seeing its end.
    Again before the spawn, where C3 gets stdin, stdout and stderr by dup2.
    """
    keep = {ends.stdout_w, ends.stderr_w, ends.go_r, ends.status_w, ends.setup.fileno(), *received}
    if min(keep) <= 2:
        raise JailError("a job pipe is fd 0, 1 or 2: the runner must keep its standard streams open")
    last = 3
    for fd in sorted(keep):
        os.closerange(last, fd)
        if os.get_inheritable(fd):
            raise JailError(f"fd {fd} would cross execve")
        last = fd + 1
    os.closerange(last, 1 << 20)


# 5.5 Host check: refuse to serve on a host that cannot jail; then ask each
# interpreter, inside a jail, what it is and (python3) what it imports.


def interpreters_find():
    """{name: {"path"}} for each interpreter (or compiler) found under /usr, the only host tree the jail sees."""
    found = {}
    for name in INTERPRETER_CANDIDATES:
        path = shutil.which(COMPILERS[name][0] if name in COMPILERS else name, path="/usr/local/bin:/usr/bin:/bin")
        if path is None or not os.path.realpath(path).startswith("/usr/"):
            continue
        path = path.replace("/bin/", "/usr/bin/", 1) if path.startswith("/bin/") else path
        found[name] = {"path": path}
    return found


def host_check(cgroups):
    """Master, at start: run one real job through the whole jail, then ask each interpreter,
    inside a jail, what it is (languages_probe). Raises HostError if the jail fails;
    returns {name: {"version", and for python3 "packages"}} for those that answered."""
    if os.geteuid() != 0:
        raise HostError("the server must start as root: only the runner keeps privileges, to build jails")
    if SYS_pivot_root is None or SYS_clone is None:
        raise HostError(f"unsupported architecture {os.uname().machine}")
    try:
        owner = pwd.getpwuid(JOB_UID).pw_name
    except KeyError:
        owner = None
    if owner is not None:
        raise HostError(f"SANDRUN_JOB_UID={JOB_UID} belongs to host account {owner!r}; pick an unused uid")
    if "sh" not in INTERPRETERS:
        raise HostError("no /usr/bin/sh: the start-up probe job needs it")
    factory_pid, factory = factory_start(cgroups)  # the same way the runner builds jails
    try:
        script = b"test -r /work/probe.sh && test ! -e /etc/shadow && exit 0; exit 1\n"
        status, _ = _probe_job(factory, cgroups, script, timeout=10, memory_mb=min(64, JOB_MEMORY_MAX_BYTES // MiB))
        if os.waitstatus_to_exitcode(status) != 0:
            raise HostError(f"the start-up probe job failed inside the jail (status {status})")
        return languages_probe(factory, cgroups)
    finally:
        factory.close()  # EOF: the factory leaves
        os.waitpid(factory_pid, 0)


#: Python packages GET / reports, by import name, when python3 imports them inside the jail.
PYTHON_PACKAGES = ("numpy", "pandas", "matplotlib", "scipy", "PIL", "sympy")
#: The languages probe's limits: the imports above take about 2 s and 110 MiB here.
LANGUAGE_PROBE_TIMEOUT_S, LANGUAGE_PROBE_MEMORY_MB = min(JOB_TIMEOUT_S, 120), min(JOB_MEMORY_MAX_BYTES // MiB, 256)
_PROBE_ANSWER = re.compile(rb"\n@@ (lang|package) (\S+)\n(.*?)\n@@ end (\d+)\n", re.S)


def languages_probe(factory, cgroups):
    """Ask, in one job inside a jail, each interpreter for its version and python3 for PYTHON_PACKAGES.

    A job sees what this answers, not what the host's files say: an interpreter
    whose version does not run in the jail is not offered, and a package is
    listed only if it imports there under the probe's limits.
    """
    lines = []
    for name, (_, version_args) in INTERPRETER_CANDIDATES.items():
        if name in INTERPRETERS and version_args is not None:
            argv = " ".join(shlex.quote(arg) for arg in (INTERPRETERS[name]["path"], *version_args))
            lines.append(f"printf '\\n@@ lang {name}\\n'; {argv} 2>&1; printf '\\n@@ end %d\\n' $?")
    if "python3" in INTERPRETERS:
        for module in PYTHON_PACKAGES:
            code = shlex.quote(f"import {module}; print({module}.__version__)")
            lines.append(f"printf '\\n@@ package {module}\\n'; {INTERPRETERS['python3']['path']} -c {code} 2>/dev/null; printf '\\n@@ end %d\\n' $?")
    status, out = _probe_job(factory, cgroups, ("\n".join(lines) + "\n").encode(), timeout=LANGUAGE_PROBE_TIMEOUT_S,
                             memory_mb=LANGUAGE_PROBE_MEMORY_MB)
    if os.waitstatus_to_exitcode(status) != 0:
        log.warning("event=language_probe_incomplete status=%d", status)  # what answered still counts
    found = {"sh": {"version": os.path.basename(os.path.realpath(INTERPRETERS["sh"]["path"]))}}  # the probe ran in it
    packages = {}
    for kind, name, text, code in _PROBE_ANSWER.findall(out):
        if code != b"0":
            continue
        if kind == b"lang":
            match = re.search(rb"\d+\.\d+(?:\.\d+)?", text)
            found[name.decode()] = {"version": match.group().decode() if match else "unknown"}
        elif re.fullmatch(rb"[0-9A-Za-z.+-]{1,40}", text.strip()):
            packages[name.decode()] = text.strip().decode()
    if "python3" in found:
        found["python3"]["packages"] = packages
    return found


def _probe_job(factory, cgroups, script, timeout, memory_mb):
    """Run a start-up sh script as a job in a jail built by factory: (its wait status, its stdout
    and stderr, at most 64 KiB). Raises HostError if the jail cannot be built."""
    manifest = manifest_parse({"entrypoint": "probe.sh", "interpreter": "sh", "timeout": timeout, "memory_mb": memory_mb}, code_form=False)
    payload = io.BytesIO()
    writer = PayloadWriter(payload)
    writer.add_file("probe.sh", io.BytesIO(script), len(script), False, "probe")
    writer.finish("probe.sh")
    payload_fd = _memfd("probe-payload", payload.getvalue())
    handle = None
    try:
        handle = jail_build(factory, cgroups)
        jail_assign(handle, JailSpec(manifest, payload_fd), cgroups)
        out, open_fds = bytearray(), [handle.stdout_r, handle.stderr_r]  # non-blocking; the jail's end closes both
        while open_fds:
            for fd in select.select(open_fds, [], [])[0]:
                chunk = os.read(fd, 64 * KiB)
                out += chunk[: 64 * KiB - len(out)]
                if not chunk:
                    open_fds.remove(fd)
        _, init_status = os.waitpid(handle.pid, 0)
        status, _ = jail_job_status(handle, init_status)
        message = b""
        while True:
            chunk, fds = recv_fds(handle.setup, 4096, 1)
            for fd in fds:
                os.close(fd)
            if not chunk:
                break
            message = chunk if chunk.startswith(MSG_FAILED) else message
        handle.close()
        if message:
            raise HostError(f"the jail cannot be built on this host: {message[1:].decode(errors='replace')}")
        return status, bytes(out)
    except (OSError, JailError, FactoryError) as exc:
        raise HostError(f"the jail cannot be built on this host: {exc}") from None
    finally:
        os.close(payload_fd)
        if handle is not None:
            cgroups.kill_and_remove(handle.cgroup)


# 6. Runner -------------------------------------------------------------------
# One privileged, single-threaded process (forking from a threaded process is
# unsafe). It claims jobs FIFO, starts up to MAX_RUNNING jails and supervises
# them all in one selector loop: output pipes, setup sockets, pidfds and
# deadlines. Everything it reads from STATE/http is hostile: it walks there
# with directory fds and O_NOFOLLOW, and it writes only below STATE/runner.
#
# Containment: every step the runner takes for one job or one queue entry
# runs behind Runner._guard(), which turns an exception into that job ending
# internal_error (its jail killed, its files removed) while every other job
# carries on. Only a fault of the runner's own machinery (its selector, its
# lock, its factory) ends the runner, and the keeper starts a new one. Work
# whose size a job controls (collecting outputs) is done in small slices
# between looks at everything else, within caps and a time budget.

READ_CHUNK_BYTES = 64 * KiB
SCAN_INTERVAL_S = 0.5  # a missed wake-up delays a job by at most this much
SPARE_IDLE_S = 0.010  # more spares are built once the runner has had nothing to do for this long
#: Jails built ahead. A jail takes about 20 ms of wall time to build here (joining a v1
#: cgroup alone waits for an RCU grace period), so with two, jobs that come one right
#: after another still find one ready.
SPARE_JAILS = 2
HEARTBEAT_S = 1.0  # how often the runner tells the keeper (and /health) it is alive
COLLECT_SLICE_S = 0.02  # output collection runs this long at most between two looks at the rest
COPY_CHUNK_BYTES = 1 * MiB  # one step of an output copy
CPU_CHECK_S = 0.25  # how often a job with a CPU budget has its cgroup's CPU read


# 6.1 A job as the runner holds it, and how it ends.


def _pages(size):
    """What `size` bytes take in a tmpfs."""
    return -(-size // PAGE_BYTES) * PAGE_BYTES


class JobLog:
    """One output stream of a running job: its log file, the bytes kept, whether any were dropped."""

    def __init__(self, fd):
        self.fd, self.kept, self.truncated = fd, 0, False


class Collected:
    """What an output collection has copied so far (it may be stopped at any step)."""

    def __init__(self):
        self.files, self.truncated, self.bytes, self.names_bytes, self.entries = [], False, 0, 0, 0
        self.state_bytes = 0  # what the copies take in the state tmpfs, whole pages


class Job:
    """A claimed job, as the runner tracks it from its claim to its record."""

    def __init__(self, job_id, client, manifest, created_ts):
        self.id, self.client, self.manifest, self.created_ts = job_id, client, manifest, created_ts
        self.started_ts = time.time()
        self.started = time.monotonic()
        self.deadline = self.started + (manifest["timeout"] if manifest else 0)
        self.handle = None
        self.payload_fd = None
        self.work_fd = None
        self.setup_error = None
        self.forced_reason = None  # timeout, output_limit or killed, set when the runner kills
        self.deleted = False
        self.exec_done = False
        self.logs = {}  # 1, 2 -> JobLog
        self.wait_status = None  # once the jail is gone
        self.compiler = False  # the wait status is the compiler's: it failed, no program ran
        self.cpu_s = self.memory_peak = None
        self.oom_kills = 0
        self.cpu_budget = None  # CPU seconds it may use, when it started beside others of its client (_cpu_budget)
        self.collector = None  # the output collection under way: a generator, and when it must stop
        self.collect_deadline = 0.0
        self.collected = Collected()

    def state_bytes(self):
        """What its results take in the state tmpfs so far."""
        return sum(_pages(log.kept) for log in self.logs.values()) + self.collected.state_bytes


def job_end(wait_status, *, exec_done, setup_error, forced_reason, oom_kills, cpu_s, timeout_s, compiler=False):
    """(state, reason, exit_code, signal) of an ended job, from what the runner saw of it.

    A job whose jail failed, or died before its job was spawned without the
    runner killing it, ran nothing: internal_error, whatever else is known.
    `compiler`: the status is its compiler's, which failed (compile_error
    when it exited non-zero; a limit or signal reads as for any process).
    """
    exit_code = signum = None
    if wait_status is not None:
        if os.WIFSIGNALED(wait_status):
            signum = os.WTERMSIG(wait_status)
        elif os.WIFEXITED(wait_status):
            exit_code = os.WEXITSTATUS(wait_status)
    if setup_error is not None or (wait_status is not None and not exec_done and forced_reason is None):
        return "failed", "internal_error", None, None
    if forced_reason is not None:
        reason = forced_reason
    elif oom_kills > 0:
        reason = "memory_limit"
    elif signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s is not None and cpu_s >= timeout_s):
        reason = "cpu_limit"
    elif signum is not None:
        reason = "signal"
    elif compiler:
        reason = "compile_error"
    else:
        reason = "exit_code"
    return ("completed" if reason == "exit_code" and exit_code == 0 else "failed"), reason, exit_code, signum


# 6.2 The Runner: its start and loop, claiming and starting jobs, spare jails,
# supervision, results, and deletion, expiry and shutdown (6.3 to 6.8, within it).


class Runner:
    """The runner: claims queued jobs, runs each in a jail of its own, records how each ended.

    run() is the loop; the keeper restarts a runner that dies or stops
    beating. Jails come from the factory forked first thing, so none of them
    is a copy of this process and what it holds of other jobs.
    """

    def __init__(self, cgroups, heartbeat_fd, starts):
        self.cgroups = cgroups
        self.heartbeat_fd, self.starts = heartbeat_fd, starts
        self.jobs = {}  # job_id -> Job: claimed, and not yet recorded as ended
        self.expiry = {}  # job_id -> expires_ts, recorded as ended
        self.expiry_heap = []  # (expires_ts, job_id), the next expiry first; stale entries are skipped
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.beaten = 0.0
        self.next_scan = 0.0  # when to look at the queue and tombstones again without a wake-up
        self.charges_swept = 0.0
        self.spares = collections.deque()  # jails built ahead, oldest first, waiting for jobs (jail_build)
        self.spare_retry = 0.0
        self.doomed = set()  # cgroups of ended jails still being emptied by the kernel
        self.buckets = {}  # client -> (CPU seconds in its bucket, when): what this runner charged
        self.budgets_checked = 0.0
        self.unsaved = {}  # bookkeeping writes that met a full state tmpfs: name -> retry function
        self.waiting_for_space = False

# 6.3 Start and the loop

    def run(self):
        global _METRICS
        prctl.set_child_subreaper(True)  # a job's orphans, should its init ever leave them
        # First, while this process has read nothing of any job: every jail is a copy of the factory.
        self.factory_pid, self.factory = factory_start(self.cgroups)
        # The master made this file a page long: rewriting it in place needs no free space.
        self.alive_fd = os.open(state_path("runner", "alive"), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.pwrite(self.alive_fd, f"{os.getpid():<15}\n".encode(), 0)
        _METRICS = Metrics(state_path("runner", "metrics.json"))
        _METRICS.set("sandrun_runner_starts_total", self.starts)  # the keeper counts starts, even unsaved ones
        self.cgroups.sweep()
        self._beat()
        self._recover()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)  # SIGINT stays ignored: a terminal's ^C is for the master
        self.selector.register(wake_r, selectors.EVENT_READ, ("signal", None))
        self.wake = self._wake_socket()
        self.selector.register(self.wake, selectors.EVENT_READ, ("wake", None))
        log.info("event=runner_started cgroup_version=%d max_running=%d", self.cgroups.version, MAX_RUNNING)
        while not self.stopping:
            self._tick()
            collecting = any(job.collector is not None for job in self.jobs.values())
            timeout = 0.0 if collecting else min([HEARTBEAT_S] + [max(0.0, j.deadline - time.monotonic()) for j in self.jobs.values()])
            if not self.spares and self._spare_wanted():
                self._spare_build()  # none left: the next job would wait for a whole build
            spare_wanted = self._spare_wanted()
            events = self.selector.select(min(timeout, SPARE_IDLE_S) if spare_wanted else timeout)
            if spare_wanted and not events and not collecting:
                self._spare_build()  # idle: the build delays no job's start, end or answer
            for key, _ in events:
                self._dispatch(key)
            if collecting:
                self._collect_slice()
        self._shutdown()

    def _on_stop(self, signum, frame):
        self.stopping = True

    def _dispatch(self, key):
        kind, job = key.data
        if job is None:
            fd_drain(key.fd)
            if kind == "wake":
                self.next_scan = 0.0
            return
        if self.jobs.get(job.id) is not job:
            return  # ended earlier in this batch: its fds are closed already
        handler = {"out": self._on_output, "setup": self._on_setup, "exit": self._on_exit}[kind]
        self._guard(job, kind, handler, job, key.fd)

    def _guard(self, job, step, fn, *args):
        """One step for one job: if it fails, that job ends with internal_error, and nothing else."""
        try:
            return fn(*args)
        except FactoryError:
            raise  # the runner's own machinery: end the runner, the keeper starts another
        except Exception as exc:
            log_failure("job_step_failed", exc, job=job.id, step=step)
            self._abort(job)
            return None

    def _wake_socket(self):
        path = state_path("runner", "wake.sock")
        if os.path.lexists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        sock.bind(path)
        user = pwd.getpwnam(HTTP_USER)
        os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(path, 0o600)
        return sock

    def _tick(self):
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.forced_reason is not None or job.handle is None or job.handle.reaped:
                continue
            if now >= job.deadline:
                self._guard(job, "timeout", self._kill, job, "timeout")
            elif job.cpu_budget is not None and job.exec_done and now - self.budgets_checked >= CPU_CHECK_S:
                self._guard(job, "cpu budget", self._cpu_check, job)
        if now - self.budgets_checked >= CPU_CHECK_S:
            self.budgets_checked = now
        if now >= self.next_scan:
            self.next_scan = now + SCAN_INTERVAL_S
            self._quietly("deletions", self._deletions)
            self._claim_while_room()
        wall = time.time()
        while self.expiry_heap and self.expiry_heap[0][0] <= wall:
            expires, job_id = heapq.heappop(self.expiry_heap)
            if self.expiry.get(job_id) == expires:
                self._quietly("erase", self._erase, job_id)
        if now - self.charges_swept >= 60:
            self.charges_swept = now
            self._quietly("charges_sweep", self._charges_sweep, wall)
        if now - self.beaten >= HEARTBEAT_S:
            self.beaten = now
            for name in list(self.doomed):
                try:
                    if self.cgroups.remove(name):
                        self.doomed.discard(name)
                except OSError as exc:
                    log_failure("cgroup_remove_failed", exc)
                    self.doomed.discard(name)
            for name, retry in list(self.unsaved.items()):
                self.unsaved.pop(name)
                retry()
            _METRICS.flush()
            self._beat()

    def _beat(self):
        """Tell the keeper, and /health, that this runner is not stuck; neither needs free space."""
        os.utime(self.alive_fd)
        with contextlib.suppress(BlockingIOError):  # the keeper reads behind: it has seen a beat already
            os.write(self.heartbeat_fd, b".")

    def _quietly(self, what, fn, *args):
        """A step that belongs to no job (expiry, sweeps): on failure, log it and go on."""
        try:
            return fn(*args)
        except Exception as exc:
            log_failure("runner_step_failed", exc, step=what)
            return False

    def _save(self, name, write):
        """A bookkeeping write; if the state tmpfs is full, it is tried again on the next tick."""
        try:
            write()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if name not in self.unsaved:
                log.warning("event=state_full detail=%s_unsaved", name)
            self.unsaved[name] = lambda: self._save(name, write)

    def _spare_wanted(self):
        """Fewer spares than SPARE_JAILS, no pause after a failed build, and no job between its claim
        and its execve (a build, a fork and then the kernel's namespace work, would compete with a start for the CPU)."""
        if len(self.spares) >= SPARE_JAILS or self.stopping or time.monotonic() < self.spare_retry:
            return False
        return not any(j.handle is not None and not j.exec_done and j.setup_error is None and j.forced_reason is None
                       for j in self.jobs.values())

    def _recover(self):
        """Results of a runner that died: jobs it ran are failed; the rest expire as usual.

        Nothing in the directory can stop a start: a record that is expired
        (by its time stamp, before it is parsed), oversized, unreadable or
        malformed is erased.
        """
        jobs_fd = os.open(state_path("runner", "jobs"), _DIR)
        try:
            for name in os.listdir(jobs_fd):
                self._beat()
                try:
                    self._recover_one(jobs_fd, name)
                except Exception as exc:
                    log_failure("recover_failed", exc)
                    self._quietly("recover_erase", tree_remove, jobs_fd, name)
        finally:
            os.close(jobs_fd)
        self._load()

    def _recover_one(self, jobs_fd, name):
        now = time.time()
        path = state_path("runner", "jobs", name, "status.json")
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if not JOB_ID.match(name) or st is None or st.st_mtime + RESULT_TTL_S <= now or st.st_size > STATUS_RECORD_MAX_BYTES:
            tree_remove(jobs_fd, name)
            return
        record = _read_json(path, STATUS_RECORD_MAX_BYTES)
        state = record["public"]["status"]
        status_public(record)  # a record its readers cannot turn into a document is malformed
        if state == "running":
            record["public"].update(status="failed", reason="internal_error", finished_at=_utc(now), expires_at=_utc(now + RESULT_TTL_S))
            record["expires_ts"] = now + RESULT_TTL_S
            _write_json_atomic(path, record)
            log.info("job=%s state=failed reason=internal_error detail=runner_restarted", name)
        elif state not in ("completed", "failed") or not isinstance(record["expires_ts"], (int, float)):
            raise ValueError("not a record")
        self._expire_at(name, record["expires_ts"])

    def _expire_at(self, job_id, expires):
        self.expiry[job_id] = expires
        heapq.heappush(self.expiry_heap, (expires, job_id))

    def _load(self):
        """Publish how many jobs run, in all and per client (for the concurrency quota)."""
        clients = collections.Counter(job.client for job in self.jobs.values())
        doc = {"running": len(self.jobs), "clients": clients}
        self._save("load", lambda: _write_json_atomic(state_path("runner", "load.json"), doc))

# 6.4 Claiming and starting

    def _room_for_a_job(self):
        """Whether the state tmpfs holds what one more job's results may take, after what the
        running jobs may still write and the runner's own reserve. Else the job waits queued."""
        vfs = os.statvfs(STATE_DIR)
        promised = sum(max(0, JOB_RESULT_MAX_BYTES - job.state_bytes()) for job in self.jobs.values())
        room = vfs.f_bavail * vfs.f_frsize >= RUNNER_RESERVE_BYTES + promised + JOB_RESULT_MAX_BYTES
        if not room and not self.waiting_for_space:
            log.warning("event=waiting_for_space running=%d", len(self.jobs))
        self.waiting_for_space = not room
        return room

    def _claim_while_room(self):
        while len(self.jobs) < MAX_RUNNING and self._room_for_a_job():
            try:
                job = self._claim()
            except FactoryError:
                raise
            except Exception as exc:
                log_failure("claim_failed", exc)
                return
            if job is None:
                return
            self._guard(job, "start", self._start, job)

    def _claim(self):
        """Take the oldest queued job (under the state lock), or None."""
        return queue_claim(self._take)

    def _take(self, queue_fd, name, job_id):
        job = self._claim_entry(queue_fd, name, job_id)
        if job is not None:
            # Counted as running before the lock goes, so no submit sees it nowhere.
            self.jobs[job.id] = job
            self._load()
        return job

    def _claim_entry(self, queue_fd, name, job_id):
        if os.path.lexists(state_path("runner", "jobs", job_id)):
            log.error("job=%s event=duplicate_queue_entry", job_id)  # only a forged entry can repeat an id
            return None
        entry_fd = None
        try:
            entry_fd = os.open(name, _DIR, dir_fd=queue_fd)
            request = _json_strict(_read_untrusted(entry_fd, "request.json", 2 * MANIFEST_MAX_BYTES), "request")
            if not isinstance(request, dict):
                raise ValueError("the request is not an object")
            manifest = manifest_parse(request.get("manifest"), code_form=False)
            if not _CLIENT_NAME.match(str(request.get("client"))) or not isinstance(request.get("created_ts"), float):
                raise ValueError("malformed request fields")
            job = Job(job_id, request["client"], manifest, request["created_ts"])
            job.payload_fd = os.open("payload.tar", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry_fd)
            if not stat.S_ISREG(os.fstat(job.payload_fd).st_mode):
                raise ValueError("payload is not a regular file")
        except (OSError, ValueError, webob.exc.HTTPException) as exc:
            log.error("job=%s state=failed reason=internal_error detail=bad_queue_entry error=%s", job_id, type(exc).__name__)
            job = Job(job_id, "0" * 32, None, time.time())
            job.setup_error = "the queued request was malformed"
        finally:
            if entry_fd is not None:
                os.close(entry_fd)
        os.mkdir(state_path("runner", "jobs", job_id), 0o755)
        try:
            self._write_record(job, "running")
        except OSError:
            os.rmdir(state_path("runner", "jobs", job_id))  # untracked, it must leave no trace either
            if job.payload_fd is not None:
                os.close(job.payload_fd)
            raise
        return job

    def _start(self, job):
        if job.setup_error is not None:
            self._ended(job)
            return
        job.cpu_budget = self._cpu_budget(job)
        for fd in (1, 2):
            path = state_path("runner", "jobs", job.id, "stdout" if fd == 1 else "stderr")
            job.logs[fd] = JobLog(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644))
        try:
            job.handle = self._spare_take()
            jail_assign(job.handle, JailSpec(job.manifest, job.payload_fd), self.cgroups)
        except JailError as exc:
            job.setup_error = str(exc)
        finally:
            os.close(job.payload_fd)
            job.payload_fd = None
        if job.setup_error is not None:
            self._ended(job)  # a jail that could not take its job is killed and reaped there
            return
        h = job.handle
        self.selector.register(h.stdout_r, selectors.EVENT_READ, ("out", job))
        self.selector.register(h.stderr_r, selectors.EVENT_READ, ("out", job))
        self.selector.register(h.setup, selectors.EVENT_READ, ("setup", job))
        self.selector.register(h.pidfd, selectors.EVENT_READ, ("exit", job))
        log.info("job=%s state=running interpreter=%s memory_mb=%d timeout_s=%s",
                 job.id, job.manifest["interpreter"], job.manifest["memory_mb"], job.manifest["timeout"])

# 6.5 Spare jails: the part of each jail that is the same for every job is
# built before the job comes, while the runner waits or jobs run.

    def _spare_build(self):
        try:
            self.spares.append(jail_build(self.factory, self.cgroups))
        except JailError as exc:
            log.error("event=jail_build_failed detail=%s", json.dumps(str(exc)))
            self.spare_retry = time.monotonic() + 1.0

    def _spare_take(self):
        """The oldest spare jail that is still alive, else a new one; more are built when the runner is idle."""
        while self.spares:
            handle = self.spares.popleft()
            if not select_readable(handle.pidfd):
                return handle
            try:  # it died waiting: a failed step says why
                message = handle.setup.recv(4096, socket.MSG_DONTWAIT)
            except OSError:
                message = b""
            detail = message[1:].decode(errors="replace") if message.startswith(MSG_FAILED) else ""
            log.error("event=spare_jail_died detail=%s", json.dumps(detail))
            jail_discard(handle, self.cgroups)
        return jail_build(self.factory, self.cgroups)

# 6.6 Supervision

    def _kill(self, job, reason):
        if job.forced_reason is None:
            job.forced_reason = reason
        # Killing pid 1 from outside its namespace takes every process of the job with it.
        if job.handle is not None and not job.handle.reaped:
            signal.pidfd_send_signal(job.handle.pidfd, signal.SIGKILL)

    def _on_output(self, job, fd):
        stream = 1 if fd == job.handle.stdout_r else 2
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(fd)
            return
        self._log_append(job, stream, data)

    def _log_append(self, job, stream, data):
        log_ = job.logs[stream]
        room = OUTPUT_STREAM_MAX_BYTES - log_.kept
        if len(data) > room:
            data, log_.truncated = data[:room], True
            self._kill(job, "output_limit")
        if data:
            try:
                os.write(log_.fd, data)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log_.truncated = True  # the state tmpfs is full: stop the job as if it hit its cap
                self._kill(job, "output_limit")
                return
            log_.kept += len(data)

    def _on_setup(self, job, fd=None):
        self._setup_read(job)

    def _setup_read(self, job):
        """One message from the jail's setup socket (see the channel in 5.4); False once nothing more is waiting."""
        sock = job.handle.setup
        try:
            data, fds = recv_fds(sock, 4096, 1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        for fd in fds:
            if job.work_fd is None and data == MSG_WORK:
                job.work_fd = fd
            else:
                os.close(fd)
        if data.startswith(MSG_FAILED):
            job.setup_error = data[1:].decode(errors="replace")
        elif data == MSG_STARTED:
            job.exec_done = job.setup_error is None
        elif not data:
            self.selector.unregister(sock)
            os.close(job.handle.go_w)
            job.handle.go_w = None
            return False
        return True

    def _on_exit(self, job, fd=None):
        """The jail's pid 1 is gone, and with it every process of the job: read what is left, measure, collect."""
        h = job.handle
        _, init_status = os.waitpid(h.pid, 0)
        h.reaped = True
        job.wait_status, job.compiler = jail_job_status(h, init_status)
        self.selector.unregister(h.pidfd)
        for fd, stream in ((h.stdout_r, 1), (h.stderr_r, 2)):  # the pipes hold their last bytes
            while True:
                try:
                    data = os.read(fd, READ_CHUNK_BYTES)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._log_append(job, stream, data)
        while h.go_w is not None and self._setup_read(job):
            continue  # messages and EOF the loop has not seen yet
        try:
            job.cpu_s = self.cgroups.cpu_seconds(h.cgroup)
            job.memory_peak = self.cgroups.memory_peak_bytes(h.cgroup)
            job.oom_kills = self.cgroups.oom_kills(h.cgroup)
        except (OSError, ValueError, KeyError):
            job.setup_error = job.setup_error or "cgroup accounting unreadable"
        self._release_jail(job)
        if job.work_fd is not None and job.exec_done and not job.deleted and job.manifest["outputs"] != []:
            files = state_path("runner", "jobs", job.id, "files")
            os.mkdir(files, 0o755)
            files_fd = os.open(files, _DIR)
            job.collector = outputs_collect(job.work_fd, files_fd, job.manifest["outputs"], job.collected)
            job.collect_deadline = time.monotonic() + OUTPUT_COLLECT_MAX_S
        else:
            self._ended(job)

    def _collect_slice(self):
        """Advance every output collection under way, for COLLECT_SLICE_S at most in all."""
        until = time.monotonic() + COLLECT_SLICE_S
        for job in [j for j in self.jobs.values() if j.collector is not None]:
            self._guard(job, "collect", self._collect_some, job, until)

    def _collect_some(self, job, until):
        try:
            while time.monotonic() < until:
                next(job.collector)
        except StopIteration:
            self._ended(job)
            return
        if time.monotonic() >= job.collect_deadline:
            log.warning("job=%s event=collection_cut detail=time_budget", job.id)
            job.collected.truncated = True
            self._ended(job)

# 6.7 Results

    def _ended(self, job):
        """Record a job that ended (its jail gone, its outputs copied or given up), and let it go."""
        if job.collector is not None:
            job.collector.close()  # its copies so far stay, a partial one is removed
            job.collector = None
        state, reason, exit_code, signum = job_end(
            job.wait_status, exec_done=job.exec_done, setup_error=job.setup_error, forced_reason=job.forced_reason,
            oom_kills=job.oom_kills, cpu_s=job.cpu_s, timeout_s=job.manifest["timeout"] if job.manifest else 0,
            compiler=bool(job.compiler))
        if reason == "internal_error":
            log.error("job=%s event=jail_failed detail=%s", job.id, json.dumps(job.setup_error or "jail died before execve"))
        finished = time.time()
        wall_ms = int((time.monotonic() - job.started) * 1000)
        meta = {
            "cpu_seconds": round(job.cpu_s, 3) if job.cpu_s is not None else None, "memory_peak_bytes": job.memory_peak,
            "wall_time_ms": wall_ms, "exit_code": exit_code,
            "interpreter": job.manifest["interpreter"] if job.manifest else None,
        }
        self._release(job)
        if job.deleted:
            self._erase(job.id)
        else:
            self._write_final(job, state, reason=reason, exit_code=exit_code, signum=signum, meta=meta, finished=finished)
        if job.cpu_s:
            self._charge(job.client, finished, job.cpu_s)
        _METRICS.job_finished("deleted" if job.deleted else state, reason, wall_ms / 1000, job.cpu_s)
        log.info("job=%s state=%s reason=%s exit_code=%s signal=%s oom_kill=%d wall_ms=%d cpu_ms=%s outputs=%d",
                 job.id, "deleted" if job.deleted else state, reason, exit_code, signum, job.oom_kills, wall_ms,
                 int(job.cpu_s * 1000) if job.cpu_s is not None else None, len(job.collected.files))

    def _abort(self, job):
        """A step for this job failed: kill its jail, drop its results, record internal_error, let it go.
        Each part is tried whatever the others do."""
        job.setup_error = job.setup_error or "the runner failed at a step of this job"
        job.forced_reason = None
        collector = job.collector
        parts = (
            ("kill", lambda: self._kill(job, "killed")),
            ("collection", lambda: collector is not None and collector.close()),
            ("release", lambda: self._release(job)),
            ("results", lambda: self._drop_results(job.id)),
            ("record", lambda: None if job.deleted else self._write_final(job, "failed", reason="internal_error", finished=time.time())),
        )
        job.collector = None
        failed = set()
        for what, part in parts:
            try:
                part()
            except Exception as exc:
                log_failure("job_abort_step_failed", exc, job=job.id, step=what)
                failed.add(what)
        if job.deleted or "record" in failed:  # no record of it may stay "running"
            self._quietly("erase", self._erase, job.id)
        self.jobs.pop(job.id, None)
        log.info("job=%s state=failed reason=internal_error detail=runner_step_failed", job.id)

    def _release_jail(self, job):
        """Let go of a job's jail: its descriptors, and its cgroup once the kernel has emptied it."""
        h = job.handle
        if h is None or h.pidfd is None:
            return  # none, or let go of already
        for fileobj in (h.stdout_r, h.stderr_r, h.pidfd, h.setup):
            key = fileobj if isinstance(fileobj, int) else fileobj.fileno()
            if key is not None and key >= 0 and key in self.selector.get_map():
                self.selector.unregister(fileobj)
        if not h.reaped:  # killed mid-step: it is a zombie at most a moment from now
            signal.pidfd_send_signal(h.pidfd, signal.SIGKILL)
            os.waitpid(h.pid, 0)
            h.reaped = True
        h.close()
        self.cgroups.kill(h.cgroup)
        if not self.cgroups.remove(h.cgroup):
            self.doomed.add(h.cgroup)  # emptied by the kernel in a moment: removed on a later tick

    def _release(self, job):
        """Forget a job that ended: its jail, its descriptors, and its place among those running."""
        self._release_jail(job)
        for log_ in job.logs.values():
            if log_.fd is not None:
                os.close(log_.fd)
                log_.fd = None
        for name in ("work_fd", "payload_fd"):
            if getattr(job, name) is not None:
                os.close(getattr(job, name))
                setattr(job, name, None)
        self.jobs.pop(job.id, None)
        self.next_scan = 0.0  # a slot is free: look at the queue now
        self._load()

    def _record(self, job, state, reason=None, exit_code=None, signum=None, meta=None, finished=None):
        """The job's status record; its fields are written down in 4.5, where the workers read it."""
        expires = finished + RESULT_TTL_S if finished is not None else None
        public = {
            "job_id": job.id, "status": state, "queue_position": None, "reason": reason,
            "exit_code": exit_code, "signal": signum, "execution_metadata": meta,
            "created_at": _utc(job.created_ts), "started_at": _utc(job.started_ts),
            "finished_at": _utc(finished), "expires_at": _utc(expires),
        }
        return {
            "public": public, "outputs": job.collected.files, "outputs_truncated": job.collected.truncated,
            "stdout_truncated": bool(job.logs.get(1) and job.logs[1].truncated),
            "stderr_truncated": bool(job.logs.get(2) and job.logs[2].truncated), "expires_ts": expires,
        }

    def _write_record(self, job, state, **fields):
        """Write a job's record; OSError if the state tmpfs is full, ValueError if it is over its bound."""
        text = json.dumps(self._record(job, state, **fields))
        if len(text) > STATUS_RECORD_MAX_BYTES:
            raise ValueError("status record over its bound")
        _write_atomic(state_path("runner", "jobs", job.id, "status.json"), text)

    def _write_final(self, job, state, **fields):
        """The final record, whatever the space: without the outputs if need be, then without
        anything but the failure; a job whose record cannot be kept at all is erased."""
        for attempt in ("whole", "without outputs", "as a failure"):
            try:
                self._write_record(job, state, **fields)
                self._expire_at(job.id, fields["finished"] + RESULT_TTL_S)
                return
            except (OSError, ValueError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warning("job=%s event=record_unsaved attempt=%s", job.id, attempt.replace(" ", "_"))
            if attempt == "whole":
                self._drop_outputs(job)
            else:
                self._drop_results(job.id)
                state, fields = "failed", {"reason": "internal_error", "finished": fields["finished"]}
        log.error("job=%s event=record_lost", job.id)
        self._erase(job.id)

    def _drop_outputs(self, job):
        job.collected.files, job.collected.truncated = [], True
        path_remove(state_path("runner", "jobs", job.id, "files"))

    def _drop_results(self, job_id):
        """Remove a job's logs and outputs, keeping its directory and record."""
        with contextlib.suppress(FileNotFoundError):
            job_fd = os.open(state_path("runner", "jobs", job_id), _DIR)
            try:
                for name in ("stdout", "stderr", "files"):
                    tree_remove(job_fd, name)
            finally:
                os.close(job_fd)

    def _bucket(self, client, now):
        """The client's CPU bucket now, as this runner last recorded it (even if that is unsaved)."""
        return cpu_bucket(client, now, self.buckets.get(client))

    def _charge(self, client, finished, cpu):
        """Take a job's CPU from its client's bucket, into debt if need be."""
        self.buckets[client] = (self._bucket(client, finished) - cpu, finished)
        level, at = self.buckets[client]
        self._save(f"charge_{client}", lambda: _write_atomic(state_path("runner", "charges", client), f"{level:.6f} {at:.3f}\n"))

    def _charges_sweep(self, wall):
        """Forget the buckets that are full again: no file, a full bucket."""
        charges_fd = os.open(state_path("runner", "charges"), _DIR)
        try:
            for client in os.listdir(charges_fd):
                if self._bucket(client, wall) >= RATE_CPU_S_PER_MIN or not _CLIENT_NAME.match(client):
                    os.unlink(client, dir_fd=charges_fd)
                    self.buckets.pop(client, None)
        finally:
            os.close(charges_fd)

    def _cpu_budget(self, job):
        """The CPU a job that starts beside others of its client may use: what the bucket holds,
        less what those may still use (one CPU each, up to their deadlines), at least a second.
        None for a client's only job (it is the "one job's worth" the quota allows beyond the
        bucket), or when its timeout caps its CPU anyway."""
        others = [j for j in self.jobs.values() if j is not job and j.client == job.client and j.handle is not None and not j.handle.reaped]
        if not others:
            return None
        budget = max(1.0, self._bucket(job.client, time.time()) - sum(max(0.0, j.deadline - time.monotonic()) for j in others))
        return budget if budget < job.manifest["timeout"] else None

    def _cpu_check(self, job):
        """End a job that has used its CPU budget (reason cpu_limit); its wall-clock timeout stays."""
        if self.cgroups.cpu_seconds(job.handle.cgroup) >= job.cpu_budget:
            self._kill(job, "cpu_limit")

# 6.8 Deletion, expiry and shutdown

    def _deletions(self):
        """Carry out DELETEs. A tombstone stays until the job is erased, so the job never reappears."""
        deleted_fd = _open_beneath(["deleted"])
        try:
            names = os.listdir(deleted_fd)
        finally:
            os.close(deleted_fd)
        for name in names:
            job = self.jobs.get(name)
            if job is None:
                self._quietly("erase", self._erase, name)
            elif not job.deleted:
                job.deleted = True
                if job.collector is not None:
                    self._guard(job, "delete", self._ended, job)  # _ended erases a deleted job
                elif job.handle is not None:
                    self._guard(job, "delete", self._kill, job, "killed")  # _ended erases it when the jail is gone

    def _erase(self, job_id):
        """Erase a job's results and its tombstone; `job_id` may be any name a worker wrote."""
        self.expiry.pop(job_id, None)
        if JOB_ID.match(job_id) and os.path.lexists(state_path("runner", "jobs", job_id)):
            path_remove(state_path("runner", "jobs", job_id))
            log.info("job=%s state=erased", job_id)
        deleted_fd = _open_beneath(["deleted"])
        try:
            tree_remove(deleted_fd, job_id)
        finally:
            os.close(deleted_fd)

    def _shutdown(self):
        for job in list(self.jobs.values()):
            self._guard(job, "shutdown", self._kill, job, "killed")
            self._guard(job, "shutdown", self._release, job)
        while self.spares:
            jail_discard(self.spares.popleft(), self.cgroups)
        for name in self.doomed:
            self._quietly("cgroup_remove", self.cgroups.kill_and_remove, name)
        self.factory.close()  # EOF: the factory leaves
        os.waitpid(self.factory_pid, 0)
        log.info("event=runner_stopped")


class _WalkDir:
    """One directory of the output walk: its fd, its path in /work, the names left to look
    at (last first), and the fd of its copy once one is made."""

    def __init__(self, fd, parts, names, dest=None):
        self.fd, self.parts, self.names, self.dest = fd, parts, names, dest


def outputs_collect(work_fd, files_fd, patterns, got):
    """Copy the job's outputs out of its work dir into files_fd, a step at a time.

    A generator: each next() does one small step (looks at one directory
    entry, or copies one chunk of a file), so the runner interleaves it with
    everything else; `got` (Collected) holds what was copied so far, whenever
    it is stopped. It takes over files_fd.

    The work dir is hostile: it is walked through directory fds, nothing is
    followed, and only regular files with one link are copied (a hard link
    could be another file's second name; a FIFO would block; a symlink could
    point anywhere). Copies are made relative to directory fds too, so no
    path length matters. Without 'outputs' globs, the files the job created
    or changed (inputs were unpacked with mtime 0) are taken. Past a cap
    (entries looked at, depth, files, a name over PATH_MAX_BYTES, bytes of
    names, bytes), or on an error
    with one file, that file is left out and got.truncated is set.
    """
    match = output_matcher(patterns) if patterns is not None else None
    stack = [_WalkDir(os.dup(work_fd), [], [], files_fd)]
    try:
        stack[0].names = _dir_names(stack[0].fd, got)
        while stack:
            top = stack[-1]
            if not top.names:
                stack.pop()
                os.close(top.fd)
                if top.dest is not None:
                    os.close(top.dest)
                continue
            yield
            name = top.names.pop()
            parts = top.parts + [name]
            rel = "/".join(parts)
            if _CONTROL_CHARS.search(name) or not _utf8(name):
                continue  # not nameable in JSON or a URL; documented
            try:
                st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if len(parts) >= OUTPUT_DEPTH_MAX:
                        got.truncated = True
                        continue
                    sub = _WalkDir(os.open(name, _DIR, dir_fd=top.fd), parts, [])
                    stack.append(sub)
                    sub.names = _dir_names(sub.fd, got)
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not (match(rel) if match else st.st_mtime != 0):
                    continue
                size_name = len(rel.encode())
                if (len(got.files) >= OUTPUT_FILES_MAX or size_name > PATH_MAX_BYTES or got.names_bytes + size_name > OUTPUT_NAMES_MAX_BYTES
                        or got.bytes + st.st_size > JOB_WORKDIR_MAX_BYTES):
                    got.truncated = True
                    continue
                copied = yield from _output_copy(top.fd, name, st, _dest_dir(stack), rel)
            except OSError as exc:
                got.truncated = True
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    return  # the state tmpfs is full: keep what was copied
                continue  # this file or directory only
            if copied is not None:
                got.files.append(copied)
                got.bytes += copied["size"]
                got.names_bytes += size_name
                got.state_bytes += _pages(copied["size"])
    finally:
        for walk in stack:
            os.close(walk.fd)
            if walk.dest is not None:
                os.close(walk.dest)


def _dir_names(fd, got):
    """The names in a directory, last first, within what is left of OUTPUT_ENTRIES_MAX."""
    left = OUTPUT_ENTRIES_MAX - got.entries
    with os.scandir(fd) as entries:
        names = [entry.name for entry in itertools.islice(entries, left + 1)]
    if len(names) > left:
        got.truncated, names = True, names[:left]
    got.entries += len(names)
    return sorted(names, reverse=True)


def _dest_dir(stack):
    """The copy of the walk's current directory, made (and of its parents) when first needed."""
    for depth, walk in enumerate(stack):
        if walk.dest is None:
            parent, name = stack[depth - 1].dest, walk.parts[-1]
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
            walk.dest = os.open(name, _DIR, dir_fd=parent)
    return stack[-1].dest


def _utf8(name):
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _output_copy(dir_fd, name, st, dest_fd, rel):
    """Copy one file a chunk per step (a generator); its output entry, or None if it changed under us."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with open(fd, "rb", buffering=0) as src:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode) or now.st_nlink != 1:
            return None  # swapped since the listing: not the file we looked at
        digest, size = hashlib.sha256(), 0
        out_fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dest_fd)
        try:
            with open(out_fd, "wb", buffering=0) as out:
                while size < st.st_size:
                    chunk = src.read(min(COPY_CHUNK_BYTES, st.st_size - size))
                    if not chunk:
                        break
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[out.write(view):]
                    size += len(chunk)
                    yield
        except BaseException:
            os.unlink(name, dir_fd=dest_fd)  # a partial copy, or one stopped midway, is not an output
            raise
    mime = mimetypes.guess_type(rel)[0] or "application/octet-stream"
    return {"name": rel, "size": size, "sha256": digest.hexdigest(), "mime_type": mime}


# 7. WSGI application ---------------------------------------------------------
# Handlers raise http_error() responses; app() is the one boundary that turns
# anything unexpected into a bare 500 and adds CORS to every answer.

JSON_TYPE = "application/json; charset=utf-8"
#: A long-poll wakes on inotify events; this timer only backs them up (an event
#: could be missed if the job's directory appears between two looks).
WAIT_BACKSTOP_S = 0.5


# 7.1 Answers, long waits and their shares.


def _json(doc, status=200, headers=None):
    response = webob.Response(json.dumps(doc).encode(), status=status, content_type="application/json", charset="utf-8")
    response.headers.update(headers or {})
    return response


def _wait_param(req):
    raw = req.GET.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= WAIT_MAX_S:
        raise http_error(400, "invalid parameter", f"wait must be a number of seconds from 0 to {WAIT_MAX_S}")
    return wait


def _lookup_or_404(job_id):
    found = job_lookup(job_id)
    if found is None:
        raise http_error(404, "not found", "no such job (it may have expired or been deleted)")
    return found


#: Answers that hold a worker thread for long, in two kinds: waits (?wait long-polls
#: and live logs), which last by design, and transfers (whole logs, all outputs as
#: one archive), which last as long as the client takes to read them. Each kind has
#: its share of a worker's threads, so that at least a quarter of them always
#: answers everything else, and a few per client, so that one client cannot take
#: a share for itself.
WAITS_MAX = max(1, HTTP_THREADS // 2)
TRANSFERS_MAX = max(1, HTTP_THREADS // 4)
LONG_ANSWERS_PER_CLIENT = max(2, RATE_CONCURRENT_JOBS)


class _Shares:
    """This worker's count of something its threads hold, in all and per client, each with a cap."""

    def __init__(self, limit, per_client):
        self.limit, self.per_client, self.lock, self.clients = limit, per_client, threading.Lock(), collections.Counter()

    def take(self, client):
        """A share for `client`, or False if this worker or this client has none left."""
        with self.lock:
            if sum(self.clients.values()) >= self.limit or self.clients[client] >= self.per_client:
                return False
            self.clients[client] += 1
            return True

    def give(self, client):
        with self.lock:
            self.clients[client] -= 1
            if not self.clients[client]:
                del self.clients[client]


_WAITS, _TRANSFERS = _Shares(WAITS_MAX, LONG_ANSWERS_PER_CLIENT), _Shares(TRANSFERS_MAX, LONG_ANSWERS_PER_CLIENT)


def _long_answer_refused(what):
    return http_error(503, "busy", f"this client or worker already has as many {what} as it may; try again shortly",
                      headers={"Retry-After": "5"})


class _SlotIter:
    """A response body that gives its long-answer slot back when the server closes it, whatever happened."""

    def __init__(self, chunks, slots, client, close=None):
        self.chunks, self.slots, self.client, self.on_close = chunks, slots, client, close

    def __iter__(self):
        return (chunk for chunk in self.chunks if chunk)  # an empty chunk could end a chunked answer

    def close(self):
        try:
            if hasattr(self.chunks, "close"):
                self.chunks.close()
            if self.on_close is not None:
                self.on_close()
        finally:
            self.slots.give(self.client)


class _JobWatch:
    """Sleeps until the runner touches a job: claims it (its directory appears), appends output, or renames a new status in.

    inotify where it can, so answers leave as soon as there is something to
    say; where inotify instances run out (max_user_instances), a 50 ms timer.
    Each thread keeps one inotify instance for its life and only adds and
    removes watches: closing an instance waits for the kernel's SRCU grace
    period (several ms here), and every answer would wait with it.
    """

    _threads = threading.local()

    def __init__(self, job_id, events):
        self.jobs, self.job_id, self.events = state_path("runner", "jobs"), job_id, events | IN_ONLYDIR
        self.fd = getattr(self._threads, "fd", -1)
        if self.fd < 0:
            self.fd = self._threads.fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        self.watches, self.watching_job = [], False
        if self.fd >= 0:
            fd_drain(self.fd)  # events of this thread's earlier watches
            self._add(self.jobs, IN_CREATE | IN_ONLYDIR)

    def _add(self, path, events):
        wd = _libc.inotify_add_watch(self.fd, path.encode(), events)
        if wd >= 0:
            self.watches.append(wd)
        return wd >= 0

    def arm(self):
        """Before each look, so that nothing can happen between the look and the sleep unseen."""
        if self.fd >= 0 and not self.watching_job:
            self.watching_job = self._add(os.path.join(self.jobs, self.job_id), self.events)

    def sleep(self, seconds):
        if self.fd < 0:
            time.sleep(min(seconds, 0.05))
        elif select.select([self.fd], [], [], seconds)[0]:
            fd_drain(self.fd)  # events only wake us: the next look says what changed

    def close(self):
        for wd in self.watches:
            _libc.inotify_rm_watch(self.fd, wd)  # fails harmlessly if the directory went first
        self.watches = []


def _wait_finished(job_id, wait_s, client):
    """Look up the job until it is finished or wait_s passed; the last lookup (or None).

    Without a long-answer slot for the client, it looks once and answers at once.
    """
    if not JOB_ID.match(job_id):
        return None  # before any path is made of it
    if not _WAITS.take(client):
        return job_lookup(job_id)  # no slot: an answer now, as if the wait had run out
    deadline = time.monotonic() + wait_s
    watch = _JobWatch(job_id, IN_MOVED_TO)
    try:
        while True:
            watch.arm()
            found = job_lookup(job_id)
            left = deadline - time.monotonic()
            if found is None or found[0]["status"] in ("completed", "failed") or left <= 0:
                return found
            watch.sleep(min(left, WAIT_BACKSTOP_S))
    finally:
        watch.close()
        _WAITS.give(client)


# 7.2 The routes: GET / (the page, or the service and its languages), status,
# logs, metrics, OpenAPI, outputs, downloads, delete, stats, health (submit: 3.5).


def _page():
    """The web page (sandrun.html, one self-contained file) and its Content-Security-Policy.

    Its one script and one style sheet are allowed by their hashes, nothing
    else: not even an injected inline script could run.
    """
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandrun.html"), "rb") as f:
        page = f.read()
    digest = lambda tag: base64.b64encode(hashlib.sha256(re.search(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.S).group(1)).digest()).decode()  # noqa: E731
    csp = (f"default-src 'none'; script-src 'sha256-{digest(b'script')}'; style-src 'sha256-{digest(b'style')}'; "
           "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, csp


PAGE, PAGE_CSP = _page()  # read once, in the master: workers need no access to the checkout


def languages_describe():
    """GET /'s languages: for each interpreter, its version (as the jail answered), the
    entrypoint extensions that choose it, whether it compiles (and how), and python3's packages."""
    doc = {}
    for name, info in sorted(INTERPRETERS.items()):
        entry = {"version": info["version"], "extensions": [ext for ext, lang in EXTENSION_INTERPRETERS.items() if lang == name],
                 "compiles": name in COMPILERS}
        if name in COMPILERS:
            compiler, before, _, after = COMPILERS[name]
            entry["compile_command"] = " ".join([compiler, *before, "<entrypoint>", "<sources...>", "-o", PROGRAM_PATH, *after])
        if "packages" in info:
            entry["packages"] = info["packages"]
        doc[name] = entry
    return doc


def _language_label(name, info):
    """One language in words, as the OpenAPI description and the page say it: "c 12.2.0 (compiled)"."""
    label = f"{name} {info['version']}" + (" (compiled)" if info["compiles"] else "")
    packages = info.get("packages")
    return label + (" with " + ", ".join(f"{p} {v}" for p, v in packages.items()) if packages else "")


def handle_info(req):
    if req.accept.best_match(["application/json", "text/html"]) == "text/html":  # a browser; curl and clients get JSON
        response = webob.Response(body=PAGE, content_type="text/html", charset="utf-8")
        response.headers.update({"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})
        return response
    return _json({
        "service": "sandrun", "version": VERSION, "status": "running", "node": NODE,
        "interpreters": {name: info["version"] for name, info in sorted(INTERPRETERS.items())},
        "languages": languages_describe(),
        "limits": {
            "timeout_seconds_max": JOB_TIMEOUT_S, "memory_mb_max": JOB_MEMORY_MAX_BYTES // MiB,
            "cpu_seconds_per_minute": RATE_CPU_S_PER_MIN, "concurrent_jobs_per_ip": RATE_CONCURRENT_JOBS,
            "jobs_per_hour_per_ip": RATE_JOBS_PER_HOUR, "upload_bytes_max": UPLOAD_MAX_BYTES,
        },
        "queue": _system_load(),
    })


def _system_load():
    load = _read_json(state_path("runner", "load.json")) or {"running": 0}
    return {"queued": len(queue_entries()), "running": load["running"]}


def handle_status(req, job_id):
    wait_s = _wait_param(req)
    found = _wait_finished(job_id, wait_s, client_key(client_address(req.environ))) if wait_s > 0 else job_lookup(job_id)
    if found is None:
        raise http_error(404, "not found", "no such job (it may have expired or been deleted)")
    return _json(found[0])


def handle_logs(req, job_id):
    follow = req.GET.get("follow", "0")
    if follow not in ("0", "1"):
        raise http_error(400, "invalid parameter", "follow must be 0 or 1")
    public, record = _lookup_or_404(job_id)
    client = client_key(client_address(req.environ))
    slots = _WAITS if follow == "1" else _TRANSFERS
    if not slots.take(client):
        raise _long_answer_refused("live log streams" if follow == "1" else "log and archive transfers")
    if follow == "1":
        stream = LogStream(job_id)
        response = webob.Response(content_type="text/event-stream", charset="utf-8", app_iter=_SlotIter(stream, slots, client))
        response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # nginx: pass it on at once
        return response
    files, sizes = {}, {}
    try:
        for name in ("stdout", "stderr"):
            with contextlib.suppress(FileNotFoundError):  # not started yet, or erased a moment ago
                files[name] = open(os.open(state_path("runner", "jobs", job_id, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")
                sizes[name] = os.fstat(files[name].fileno()).st_size
    except BaseException:
        for f in files.values():
            f.close()
        slots.give(client)
        raise
    truncated = {name: bool(record and record.get(name + "_truncated")) or sizes.get(name, 0) >= OUTPUT_STREAM_MAX_BYTES
                 for name in ("stdout", "stderr")}
    body = _SlotIter(_logs_json(files, truncated), slots, client, lambda: [f.close() for f in files.values()])
    return webob.Response(app_iter=body, content_type="application/json", charset="utf-8")


def _logs_json(files, truncated):
    """GET /logs as JSON made as it is sent: each stream read a chunk at a time and decoded as
    it goes, bytes that are not UTF-8 replaced. The answer is at most a few times the stored
    bytes (U+FFFD is 3 bytes, a control character 6) and never whole in memory."""
    for i, name in enumerate(("stdout", "stderr")):
        yield ('{"' if i == 0 else ', "').encode() + name.encode() + b'": "'
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        left = OUTPUT_STREAM_MAX_BYTES
        f = files.get(name)
        while f is not None and left > 0 and (chunk := f.read(min(READ_CHUNK_BYTES, left))):
            left -= len(chunk)
            yield json.dumps(decoder.decode(chunk), ensure_ascii=False)[1:-1].encode()
        yield json.dumps(decoder.decode(b"", final=True), ensure_ascii=False)[1:-1].encode() + b'"'
    yield (", " + ", ".join(f'"{name}_truncated": {json.dumps(value)}' for name, value in truncated.items()) + "}").encode()


#: A comment line this often keeps proxies from closing a quiet stream.
FOLLOW_KEEPALIVE_S = 15
#: A stream ends at the latest this long after the job's timeout would end it.
FOLLOW_GRACE_S = 30


class LogStream:
    """GET /logs/{id}?follow=1: the job's output as Server-Sent Events, as it is written.

    Events: 'stdout' and 'stderr' with the new text (one 'data:' line per
    line of it; a lone carriage return arrives as a line break, which SSE
    cannot carry), then one 'status' with the final status document. A late
    client first gets all that was written so far. The stream ends when the
    job ends, or FOLLOW_GRACE_S after the longest the job could still take.
    The WSGI server calls close() whatever happens (through _SlotIter, which frees the slot).
    """

    def __init__(self, job_id):
        self.job_id = job_id
        self.watch = _JobWatch(job_id, IN_MODIFY | IN_MOVED_TO)

    def __iter__(self):
        offsets = {"stdout": 0, "stderr": 0}
        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in offsets}
        deadline = time.monotonic() + JOB_TIMEOUT_S + FOLLOW_GRACE_S
        quiet_since = time.monotonic()
        yield b"retry: 2000\n\n"
        while True:
            self.watch.arm()
            found = job_lookup(self.job_id)
            ended = found is None or found[0]["status"] in ("completed", "failed") or time.monotonic() >= deadline
            for name in offsets:  # after the lookup: a finished job's files are complete
                while True:
                    data = self._read(name, offsets)
                    text = decoders[name].decode(data, final=ended and len(data) < READ_CHUNK_BYTES)
                    if text:
                        quiet_since = time.monotonic()
                        yield _sse(name, text)
                    if len(data) < READ_CHUNK_BYTES:
                        break
            if ended:
                if found is not None:
                    yield _sse("status", json.dumps(found[0]))
                return
            if time.monotonic() - quiet_since >= FOLLOW_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            self.watch.sleep(min(WAIT_BACKSTOP_S, deadline - time.monotonic()))

    def _read(self, name, offsets):
        try:
            with open(state_path("runner", "jobs", self.job_id, name), "rb") as f:
                f.seek(offsets[name])
                data = f.read(min(READ_CHUNK_BYTES, OUTPUT_STREAM_MAX_BYTES - offsets[name]))
        except FileNotFoundError:
            return b""  # not started yet, or erased
        offsets[name] += len(data)
        return data

    def close(self):
        self.watch.close()


def _sse(event, text):
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return (f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


#: What GET /metrics shows: (name, type, help), each family always, zero or not.


def handle_metrics(req):
    counters, histograms = collections.defaultdict(collections.Counter), {}
    metrics_dir = state_path("http", "metrics")
    for path in [state_path("runner", "metrics.json")] + [os.path.join(metrics_dir, n) for n in sorted(os.listdir(metrics_dir))]:
        try:
            doc = _read_json(path) or {}
        except (OSError, ValueError):
            continue  # being replaced this instant, or not ours: counts come back on the next scrape
        for name, series in doc.get("counters", {}).items():
            counters[name].update(series)
        for name, h in doc.get("histograms", {}).items():
            total = histograms.setdefault(name, {"buckets": [0] * len(METRICS_BUCKETS_S), "count": 0, "sum": 0.0})
            total["buckets"] = [a + b for a, b in zip(total["buckets"], h["buckets"], strict=True)]
            total["count"] += h["count"]
            total["sum"] += h["sum"]
    load = _system_load()
    starts = sum(counters.pop("sandrun_runner_starts_total", {}).values())
    gauges = {"sandrun_jobs_queued": load["queued"], "sandrun_jobs_running": load["running"], "sandrun_runner_restarts_total": max(0, starts - 1)}
    node = {"node": NODE} if NODE else {}  # in a cluster, every series says whose it is

    def series(name, labels, value):
        labels = ",".join(f'{k}="{v}"' for k, v in {**labels, **node}.items())
        return f"{name}{{{labels}}} {value}" if labels else f"{name} {value}"

    lines = []
    for name, kind, text in METRIC_FAMILIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        if name in gauges:
            lines.append(series(name, {}, gauges[name]))
        elif kind == "histogram":
            h = histograms.get(name, {"buckets": [0] * len(METRICS_BUCKETS_S), "count": 0, "sum": 0.0})
            lines += [series(f"{name}_bucket", {"le": bound}, n) for bound, n in zip(METRICS_BUCKETS_S, h["buckets"], strict=True)]
            lines += [series(f"{name}_bucket", {"le": "+Inf"}, h["count"]), series(f"{name}_sum", {}, f"{h['sum']:.6f}"),
                      series(f"{name}_count", {}, h["count"])]
        elif not counters[name]:
            lines += [series(name, {}, 0)] if name == "sandrun_jobs_submitted_total" else []  # labelled: no series until one happens
        else:
            for key, value in sorted(counters[name].items()):
                lines.append(series(name, json.loads(key), value))
    body = ("\n".join(lines) + "\n").encode()
    return webob.Response(body=body, content_type="text/plain; version=0.0.4", charset="utf-8")


def handle_openapi(req):
    return _json(openapi_document())


def handle_outputs(req, job_id):
    public, record = _lookup_or_404(job_id)
    files = [
        {"name": o["name"], "size": o["size"], "sha256": o["sha256"], "mime_type": o["mime_type"],
         "download_url": f"/download/{job_id}/{_url_path(o['name'])}"}
        for o in (record or {}).get("outputs", [])
    ]
    return _json({"job_id": job_id, "status": public["status"], "total_files": len(files),
                  "total_bytes": sum(f["size"] for f in files), "files": files,
                  "outputs_truncated": bool((record or {}).get("outputs_truncated"))})


def _url_path(name):
    return urllib.parse.quote(name, safe="/")


def _attachment(name):
    """A Content-Disposition that no filename can break out of."""
    ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "download"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


def handle_download(req, job_id, path=None):
    public, record = _lookup_or_404(job_id)
    outputs = {o["name"]: o for o in (record or {}).get("outputs", [])}
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"}
    if path is None:
        return _download_archive(job_id, outputs, headers, client_key(client_address(req.environ)))
    output = outputs.get(path)
    if output is None:
        raise http_error(404, "not found", "no output file at that exact path")
    fd = os.open(state_path("runner", "jobs", job_id, "files", path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    f = open(fd, "rb")
    response = webob.Response(app_iter=webob.static.FileIter(f), content_type=output["mime_type"], content_length=os.fstat(fd).st_size)
    response.headers.update(headers)
    response.headers["Content-Disposition"] = _attachment(os.path.basename(path))
    return response


def _download_archive(job_id, outputs, headers, client):
    if not _TRANSFERS.take(client):
        raise _long_answer_refused("log and archive transfers")
    response = webob.Response(app_iter=_SlotIter(_tar_gz(job_id, outputs), _TRANSFERS, client), content_type="application/gzip")
    response.headers.update(headers)
    response.headers["Content-Disposition"] = _attachment(f"{job_id}-outputs.tar.gz")
    return response


def _tar_gz(job_id, outputs):
    """Every output in one tar.gz, made as it is sent, a chunk of a file at a time: nothing is spilled."""
    gz, now = zlib.compressobj(6, zlib.DEFLATED, 31), int(time.time())  # 31: a gzip header
    for name in sorted(outputs):
        try:
            fd = os.open(state_path("runner", "jobs", job_id, "files", name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            log.info("job=%s event=download_cut detail=erased", job_id)
            return  # erased while it was sent: the archive ends short, as the client will see
        with open(fd, "rb") as f:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = os.fstat(fd).st_size, 0o644, now
            yield gz.compress(info.tobuf(tarfile.PAX_FORMAT))
            sent = 0
            while sent < info.size and (chunk := f.read(min(COPY_CHUNK_BYTES, info.size - sent))):
                sent += len(chunk)
                yield gz.compress(chunk)
            yield gz.compress(bytes(info.size - sent + -info.size % 512))  # the record's padding
    yield gz.compress(bytes(2 * 512)) + gz.flush()  # the end-of-archive marker


def handle_delete(req, job_id):
    if not spool_delete(job_id):
        raise http_error(404, "not found", "no such job (it may have expired or been deleted)")
    return webob.Response(status=204)


def handle_stats(req):
    key = client_key(client_address(req.environ))
    with StateLock():
        doc, _, _ = quota(key, time.time())
    return _json({"your_quota": doc, "system": _system_load()})


def _runner_alive():
    """The runner's heartbeat is fresh and the process that wrote it still exists."""
    try:
        with open(state_path("runner", "alive")) as f:
            fresh = time.time() - os.fstat(f.fileno()).st_mtime < 5
            pid = int(f.read())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return fresh  # it exists; a worker may not signal the root runner
    return fresh


def handle_health(req):
    alive = _runner_alive()
    try:
        with tempfile.TemporaryFile(dir=state_path("http", "tmp")):
            writable = True
    except OSError:
        writable = False
    if alive and writable:
        return _json({"status": "healthy"})
    details = "the runner is not alive" if not alive else "the state directory is not writable"
    return _json({"status": "unhealthy", "error": "unhealthy", "details": details}, 503, {"Retry-After": "5"})


_JOB = r"(?P<job_id>[^/]+)"
#: (path regex, {method: handler}). HEAD follows GET; OPTIONS is answered for every route.
ROUTES = [
    (re.compile(r"/\Z"), {"GET": handle_info}),
    (re.compile(r"/submit\Z"), {"POST": handle_submit}),
    (re.compile(rf"/status/{_JOB}\Z"), {"GET": handle_status}),
    (re.compile(rf"/logs/{_JOB}\Z"), {"GET": handle_logs}),
    (re.compile(rf"/outputs/{_JOB}\Z"), {"GET": handle_outputs}),
    (re.compile(rf"/download/{_JOB}\Z"), {"GET": handle_download}),
    (re.compile(rf"/download/{_JOB}/(?P<path>.+)\Z", re.S), {"GET": handle_download}),
    (re.compile(rf"/jobs/{_JOB}\Z"), {"DELETE": handle_delete}),
    (re.compile(r"/stats\Z"), {"GET": handle_stats}),
    (re.compile(r"/health\Z"), {"GET": handle_health}),
    (re.compile(r"/metrics\Z"), {"GET": handle_metrics}),
    (re.compile(r"/openapi\.json\Z"), {"GET": handle_openapi}),
]
CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "Location, Retry-After"}


# 7.3 Routing and the WSGI entry point.


def _dispatch(req):
    try:
        path = req.path_info
    except UnicodeDecodeError:
        raise http_error(404, "not found", "no such route") from None
    for pattern, methods in ROUTES:
        match = pattern.match(path)
        if match is None:
            continue
        allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()) | {"OPTIONS"})
        if req.method == "OPTIONS":
            return webob.Response(status=204, headers={
                "Access-Control-Allow-Methods": ", ".join(allowed),
                "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "86400", "Allow": ", ".join(allowed),
            })
        handler = methods.get("GET" if req.method == "HEAD" else req.method)
        if handler is None:
            raise http_error(405, "method not allowed", f"{req.method} is not allowed here; use {', '.join(allowed)}",
                             headers={"Allow": ", ".join(allowed)})
        return handler(req, **match.groupdict())
    raise http_error(404, "not found", "no such route")


def app(environ, start_response):
    """The WSGI entry point (gunicorn: sandrun:app)."""
    req = webob.Request(environ)
    if not (req.method == "POST" and req.path_info == "/submit"):
        _READS.read(environ.get("gunicorn.socket"))  # no body to wait for; /submit says so itself
    try:
        response = _dispatch(req)
    except webob.exc.HTTPException as exc:
        response = exc
    except Exception as exc:
        where = exc.__traceback__
        while where.tb_next is not None:
            where = where.tb_next
        log.error("event=request_failed method=%s error=%s line=%d", req.method, type(exc).__name__, where.tb_lineno)
        response = http_error(500, "internal error", "the server failed to answer; nothing about it is in the response")
    if response.status_code in (429, 503):
        metrics_count("sandrun_http_rejected_total", code=str(response.status_code))
    if response.headers.get("Content-Type", "").startswith("application/json"):
        response.headers["Content-Type"] = JSON_TYPE
    response.headers.update(CORS_HEADERS)
    # Not response(environ, start_response): webob would rewrite Location into an absolute
    # URL built from the Host header, and the contract promises the path.
    start_response(response.status, response.headerlist)
    if req.method == "HEAD":
        if hasattr(response.app_iter, "close"):
            response.app_iter.close()
        return []
    return response.app_iter


# 7.4 Data the routes serve: the metric families (GET /metrics) and the OpenAPI
# document (GET /openapi.json), built from the live settings so that its limits are true.

METRIC_FAMILIES = (
    ("sandrun_jobs_submitted_total", "counter", "Jobs accepted (answered 202, or 200 with ?wait)."),
    ("sandrun_jobs_finished_total", "counter", "Jobs that ended, by status (completed, failed, deleted) and reason."),
    ("sandrun_jobs_queued", "gauge", "Jobs waiting for a slot now."),
    ("sandrun_jobs_running", "gauge", "Jobs running now."),
    ("sandrun_job_wall_seconds", "histogram", "Wall time of ended jobs, from start to end."),
    ("sandrun_job_cpu_seconds", "histogram", "CPU time of ended jobs, all their processes."),
    ("sandrun_http_rejected_total", "counter", "Answers 429 (rate limited) and 503 (full, busy or unhealthy), by code."),
    ("sandrun_runner_restarts_total", "counter", "Times the runner died and was started again."),
)


def openapi_document():
    """The OpenAPI 3.1 description of every route, built from the live settings so its limits are true."""
    null = lambda schema: {"oneOf": [schema, {"type": "null"}]}  # noqa: E731
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    string, integer, boolean, number = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
    no_nul = {"type": "string", "pattern": "^[^\\u0000]*$"}
    obj = lambda props, required=None, more=False: {  # noqa: E731
        "type": "object", "properties": props, "required": sorted(props) if required is None else required, "additionalProperties": more}
    job_id = {"type": "string", "pattern": "^" + JOB_ID.pattern.removesuffix("\\Z") + "$"}
    languages = languages_describe()
    reasons = ["exit_code", "compile_error", "signal", "timeout", "memory_limit", "output_limit", "cpu_limit", "killed",
               "internal_error"]
    schemas = {
        "Error": obj({"error": string, "details": string, "retry_after": integer, "reason": string}, ["error", "details"]),
        "Manifest": obj({
            "entrypoint": {"type": "string", "description": "relative path of an uploaded file; required for multipart"},
            "interpreter": {"enum": sorted(INTERPRETERS), "description": "one of GET / interpreters; from the entrypoint's extension if absent. "
                            "Here: " + "; ".join(_language_label(name, info) for name, info in languages.items())},
            "args": {"type": "array", "items": no_nul, "maxItems": ARGS_MAX},
            "stdin": {"type": "string", "maxLength": STDIN_MAX_BYTES // 4, "description": f"at most {STDIN_MAX_BYTES} bytes as UTF-8"},
            "env": {"type": "object", "additionalProperties": no_nul, "maxProperties": ENV_VARS_MAX,
                    "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}},
            "outputs": {"type": "array", "maxItems": OUTPUT_GLOBS_MAX, "description": "globs; absent: every file the job created or changed",
                        "items": {"type": "string", "minLength": 1, "maxLength": 256,
                                  "pattern": f"^[^\\u0000*?]*([*?][^\\u0000*?]*){{0,{OUTPUT_GLOB_WILDCARDS_MAX}}}$"}},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": JOB_TIMEOUT_S, "default": JOB_TIMEOUT_S},
            "memory_mb": {"type": "integer", "minimum": JOB_MEMORY_MIN_BYTES // MiB, "maximum": JOB_MEMORY_MAX_BYTES // MiB,
                          "default": JOB_MEMORY_MAX_BYTES // MiB},
        }, [], more=True),
        "CodeSubmission": {"allOf": [ref("Manifest"), {"type": "object", "required": ["code", "interpreter"],
                                                       "properties": {"code": string}}]},
        "Accepted": obj({"job_id": job_id, "status": {"const": "queued"}, "position": integer, "status_url": string}),
        "Status": obj({
            "job_id": job_id, "status": {"enum": ["queued", "running", "completed", "failed"]},
            "queue_position": null(integer), "reason": null({"enum": reasons}),
            "exit_code": null(integer), "signal": null(integer),
            "execution_metadata": null(obj({"cpu_seconds": null(number), "memory_peak_bytes": null(integer),
                                            "wall_time_ms": integer, "exit_code": null(integer), "interpreter": null(string)})),
            "output_files": {"type": "object", "additionalProperties": obj({"path": string, "size_bytes": integer,
                                                                           "sha256_hash": string, "type": {"const": "file"}})},
            "created_at": string, "started_at": null(string), "finished_at": null(string), "expires_at": null(string),
            "outputs_truncated": boolean,
        }, ["job_id", "status", "queue_position", "reason", "exit_code", "signal", "execution_metadata", "output_files",
            "created_at", "started_at", "finished_at", "expires_at"]),
        "Logs": obj({"stdout": string, "stderr": string, "stdout_truncated": boolean, "stderr_truncated": boolean}),
        "Outputs": obj({"job_id": job_id, "status": string, "total_files": integer, "total_bytes": integer, "outputs_truncated": boolean,
                        "files": {"type": "array", "items": obj({"name": string, "size": integer, "sha256": string,
                                                                 "mime_type": string, "download_url": string})}}),
        "Stats": obj({"your_quota": obj({"active_jobs": integer, "concurrent_limit": integer, "jobs_this_hour": integer,
                                         "jobs_per_hour_limit": integer, "cpu_seconds_used": number, "cpu_seconds_limit": number,
                                         "can_submit": boolean, "reason": null(string)}),
                      "system": obj({"queued": integer, "running": integer})}),
        "Info": obj({"service": {"const": "sandrun"}, "version": string, "status": string,
                     "node": {"type": "string", "pattern": "^[a-z0-9]{0,16}$", "description": "this node's name in a cluster; empty alone"},
                     "interpreters": {"type": "object", "additionalProperties": string},
                     "languages": {"type": "object", "examples": [languages], "additionalProperties": obj({
                         "version": string, "extensions": {"type": "array", "items": string}, "compiles": boolean,
                         "compile_command": {"type": "string", "description": "how a language that compiles builds /tmp/program"},
                         "packages": {"type": "object", "additionalProperties": string,
                                      "description": "python3: importable packages and their versions"},
                     }, ["version", "extensions", "compiles"])},
                     "limits": obj({"timeout_seconds_max": number, "memory_mb_max": integer, "cpu_seconds_per_minute": number,
                                    "concurrent_jobs_per_ip": integer, "jobs_per_hour_per_ip": integer, "upload_bytes_max": integer}),
                     "queue": obj({"queued": integer, "running": integer})}),
        "Health": obj({"status": {"const": "healthy"}}),
        "Unhealthy": obj({"status": {"const": "unhealthy"}, "error": string, "details": string}),
    }

    def answer(description, schema=None, media="application/json", headers=None):
        doc = {"description": description}
        if schema is not None:
            doc["content"] = {media: {"schema": schema}}
        if headers:
            doc["headers"] = {name: {"schema": string, "description": text} for name, text in headers.items()}
        return doc

    error = lambda description, **kw: answer(description, ref("Error"), **kw)  # noqa: E731
    retry = {"Retry-After": "seconds to wait"}
    wait = {"name": "wait", "in": "query", "required": False,
            "description": "hold the answer up to this many seconds until the job has ended",
            "schema": {"type": "number", "minimum": 0, "maximum": WAIT_MAX_S}}
    job = {"name": "job_id", "in": "path", "required": True, "schema": job_id}
    job_links = {name: {"operationId": name, "parameters": {"job_id": "$response.body#/job_id"}}
                 for name in ("getStatus", "getLogs", "getOutputs", "getArchive", "deleteJob")}
    not_found = error("no such job (never, expired or deleted)")
    paths = {
        "/": {"get": {"summary": "Service info: interpreters, limits, queue", "responses": {"200": answer("info", ref("Info"))}}},
        "/submit": {"post": {
            "summary": "Submit a job", "parameters": [wait],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": ref("CodeSubmission")},
                "multipart/form-data": {"schema": {"type": "object", "required": ["manifest", "files"], "additionalProperties": False, "properties": {
                    "manifest": {"type": "string", "description": "the manifest, as JSON"},
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": "files, or tar/tgz/tbz2/txz/zip archives recognised by their bytes"}}}}}},
            "responses": {
                "202": {**answer("queued", ref("Accepted"), headers={"Location": "/status/{job_id}"}), "links": job_links},
                "200": answer("ended within ?wait", ref("Status")),
                "400": error("bad manifest, upload or parameter"), "413": error(f"body over {UPLOAD_MAX_BYTES} bytes, or unpacks to too much"),
                "415": error("not multipart/form-data or application/json"),
                "429": error("the client's quota is used up", headers=retry), "503": error("queue or storage full", headers=retry)}}},
        "/status/{job_id}": {"get": {"operationId": "getStatus", "summary": "A job's status document", "parameters": [job, wait],
                                     "responses": {"200": answer("status", ref("Status")), "400": error("bad parameter"), "404": not_found}}},
        "/logs/{job_id}": {"get": {
            "operationId": "getLogs", "summary": "stdout and stderr so far; ?follow=1 streams them as Server-Sent Events",
            "parameters": [job, {"name": "follow", "in": "query", "required": False, "schema": {"enum": ["0", "1"]}}],
            "responses": {"200": {"description": "logs; with follow=1, Server-Sent Events: 'stdout' and 'stderr' events whose data "
                                                 "lines are the new text, then one 'status' event whose data is the Status document",
                                  "content": {"application/json": {"schema": ref("Logs")},
                                              "text/event-stream": {"schema": {"type": "object", "required": ["event", "data"], "properties": {
                                                  "event": {"enum": ["stdout", "stderr", "status"]}, "data": string}}}}},
                          "400": error("bad parameter"), "404": not_found,
                          "503": error("this client or worker has as many log answers as it may", headers=retry)}}},
        "/outputs/{job_id}": {"get": {"operationId": "getOutputs", "summary": "A job's output files", "parameters": [job],
                                      "responses": {"200": answer("outputs", ref("Outputs")), "404": not_found}}},
        "/download/{job_id}": {"get": {"operationId": "getArchive", "summary": "All output files as one .tar.gz", "parameters": [job],
                                       "responses": {"200": answer("archive", {"type": "string", "format": "binary"}, "application/gzip"),
                                                     "404": not_found,
                                                     "503": error("this client or worker has as many transfers as it may", headers=retry)}}},
        "/download/{job_id}/{path}": {"get": {
            "summary": "One output file, as an attachment",
            "parameters": [job, {"name": "path", "in": "path", "required": True, "schema": string}],
            "responses": {"200": answer("the file, with the media type its name suggests", {"type": "string", "format": "binary"}, "*/*"),
                          "404": error("no such job or file")}}},
        "/jobs/{job_id}": {"delete": {"operationId": "deleteJob", "summary": "Kill the job if it runs and erase everything about it",
                                      "parameters": [job],
                                      "responses": {"204": answer("erased"), "404": not_found}}},
        "/stats": {"get": {"summary": "The caller's quota and the queue", "responses": {"200": answer("stats", ref("Stats"))}}},
        "/metrics": {"get": {"summary": "Prometheus text: aggregates only",
                             "responses": {"200": answer("metrics", string, "text/plain")}}},
        "/health": {"get": {"summary": "Whether the server can run jobs",
                            "responses": {"200": answer("healthy", ref("Health")),
                                          "503": answer("unhealthy", ref("Unhealthy"), headers=retry)}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": answer("OpenAPI 3.1", {"type": "object"})}}},
    }
    return {"openapi": "3.1.0", "info": {"title": "Sandrun", "version": VERSION,
                                         "description": "Anonymous, ephemeral, sandboxed code execution over HTTP."},
            "paths": paths, "components": {"schemas": schemas}}


# 7.5 The HTTP worker: gunicorn's gthread worker reads a request's headers and
# body in one of its threads, blocking, so a client that sends slowly holds
# that thread. Behind nginx that is nginx's problem (it reads the whole
# request first); on a direct bind, two guards: a deadline for reading each
# whole request, and a cap on the threads one address holds in a worker.

#: Threads one address may hold in one worker at once (a direct bind only).
HTTP_THREADS_PER_ADDRESS = max(2, HTTP_THREADS // 4)
_BUSY_BODY = json.dumps({"error": "busy", "details": "this address has as many requests open as it may"}).encode()
_BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Retry-After: 5\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s") % (len(_BUSY_BODY), _BUSY_BODY)


class _Reads:
    """The requests this worker's threads are reading: each one's deadline, and each address's share."""

    def __init__(self):
        self.lock, self.reading = threading.Lock(), {}
        self.addresses = _Shares(float("inf"), HTTP_THREADS_PER_ADDRESS)

    def begin(self, sock, address):
        """A thread starts to read a request from `sock`; False if its address has its share.
        `address` None (a UNIX socket: nginx, which reads requests first) has no cap."""
        if address is not None and not self.addresses.take(address):
            return False
        with self.lock:
            self.reading[sock] = (time.monotonic() + REQUEST_READ_S, address)
        return True

    def read(self, sock):
        """The request is read, or its thread is done: no deadline, and no longer its address's."""
        with self.lock:
            _, address = self.reading.pop(sock, (None, None))
        if address is not None:
            self.addresses.give(address)

    def watch(self):
        """A thread of each worker: shut a socket past its deadline, so that its blocked read ends."""
        while True:
            time.sleep(0.5)
            with self.lock:
                late = [sock for sock, (deadline, _) in self.reading.items() if deadline <= time.monotonic()]
            for sock in late:
                with contextlib.suppress(OSError):  # closed meanwhile: its thread is done
                    sock.shutdown(socket.SHUT_RDWR)


_READS = _Reads()


class ThreadWorker(gunicorn.workers.gthread.ThreadWorker):
    """gunicorn's gthread worker (gunicorn.conf.py: worker_class), with the two guards above."""

    def handle(self, conn):
        address = conn.client[0] if isinstance(conn.client, tuple) else None  # None: a UNIX socket, nginx
        if address is not None and _trusted(_hop_address(address)):
            address = None  # a trusted proxy (a cluster's front) reads requests first, and speaks for many clients
        if not _READS.begin(conn.sock, address):
            with contextlib.suppress(OSError):
                conn.sock.sendall(_BUSY_ANSWER)
                # Shut here: gunicorn's graceful close would otherwise wait on this client
                # for up to 2 s, in the worker's main loop, for each such connection.
                conn.sock.shutdown(socket.SHUT_RDWR)
            return False  # gunicorn closes the connection
        try:
            return super().handle(conn)
        finally:
            _READS.read(conn.sock)


# 8. Process management and command line ----------------------------------------
# gunicorn.conf.py calls server_start() (master, before any fork),
# runner_launch() (master, when ready), worker_start() (each worker) and
# server_stop() (master, on exit). The keeper restarts the runner if it dies;
# both die with the master (PR_SET_PDEATHSIG), and every job dies with the
# runner, so nothing outlives the server.

LOG_FORMAT = "%(asctime)s sandrun[%(process)d] %(levelname)s %(message)s"


def _state_empty():
    state_fd = os.open(STATE_DIR, _DIR)
    try:
        for name in os.listdir(state_fd):
            tree_remove(state_fd, name)
    finally:
        os.close(state_fd)


def state_prepare():
    """Master: a fresh, size-capped tmpfs state directory with its layout and owners."""
    global _STATE_MOUNTED
    os.makedirs(STATE_DIR, 0o755, exist_ok=True)
    parent = os.path.dirname(STATE_DIR)
    while parent != "/":
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise HostError(f"the HTTP workers cannot reach {STATE_DIR}: {parent} is not searchable by others")
        parent = os.path.dirname(parent)
    if not _is_mount_point(STATE_DIR, "tmpfs"):
        mount_tmpfs(STATE_DIR, f"size={STATE_TMPFS_BYTES},mode=0755", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        _STATE_MOUNTED = True
    # Held for the master's life: a second server (or `sandrun.py check`) on the same
    # directory would otherwise empty the first one's state below.
    fd = os.open(STATE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HostError(f"another Sandrun server is using {STATE_DIR}") from None
    _STATE_LOCK[:] = [fd]
    _state_empty()  # nothing survives a restart
    os.chmod(STATE_DIR, 0o755)
    user = pwd.getpwnam(HTTP_USER)
    os.mkdir(state_path("http"), 0o700)
    for name in ("incoming", "queue", "clients", "deleted", "metrics", "tmp"):
        os.mkdir(state_path("http", name), 0o700)
    _write_atomic(state_path("http", "seq"), "0", 0o600)
    for root, dirs, files in os.walk(state_path("http")):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, user.pw_uid, user.pw_gid)
    for name in ("runner", "runner/jobs", "runner/charges", "runner/root"):
        os.mkdir(state_path(name), 0o755)
    # Results are for the HTTP workers to read, and for no other local user.
    os.chown(state_path("runner"), 0, user.pw_gid)
    os.chmod(state_path("runner"), 0o750)
    # A page taken now: the runner rewrites its pid here in place and touches it, which needs no space later.
    _write_atomic(state_path("runner", "alive"), " " * 15 + "\n")


class GunicornLogScrub(logging.Filter):
    """gunicorn's own error log without what names a client or a job: it writes the client's
    address and bytes of its request for a malformed one, and the URI (a job id is a bearer
    secret) with a traceback for a failed one. Those lines keep their event only."""

    def filter(self, record):
        message = str(record.msg)
        if message.startswith("Invalid request from ip="):
            record.msg, record.args = "event=invalid_request", ()
        elif message.startswith("Error handling request"):
            kind = record.exc_info[1] if record.exc_info else None
            record.msg, record.args = f"event=request_failed error={type(kind).__name__}", ()
            record.exc_info = record.exc_text = None
        return True


def server_start():
    """Master, on start: check the host, prepare state and cgroups; HostError if it cannot serve."""
    global _CGROUPS
    prctl.set_name("sandrun-master")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("gunicorn.error").addFilter(GunicornLogScrub())  # the workers are forked with it
    if os.geteuid() != 0:
        raise HostError("the server must start as root: only the runner keeps privileges, to build jails")
    try:
        pwd.getpwnam(HTTP_USER)
        grp.getgrnam(HTTP_USER)
    except KeyError:
        raise HostError(f"no user and group {HTTP_USER!r} for the HTTP workers (make setup creates them)") from None
    try:
        cgroup_delegate()  # may exec: before anything is opened, mounted or forked
    except OSError as exc:
        raise HostError(f"cgroups: {exc}") from None
    INTERPRETERS.clear()
    INTERPRETERS.update(interpreters_find())
    if not INTERPRETERS:
        raise HostError("no interpreter found under /usr")
    try:
        state_prepare()
        _CGROUPS = Cgroups()
        _CGROUPS.prepare()
        languages = _host_probe()
    except (OSError, HostError) as exc:
        server_stop()
        raise HostError(f"cannot prepare {STATE_DIR} or the cgroups: {exc}") if isinstance(exc, OSError) else exc from None
    for name in set(INTERPRETERS) - set(languages):
        log.warning("event=interpreter_unusable interpreter=%s", name)  # found on the host, but not working in the jail
        del INTERPRETERS[name]
    for name, info in languages.items():
        INTERPRETERS[name].update(info)
    log.info("event=server_ready cgroup_version=%d interpreters=%s state_dir=%s", _CGROUPS.version, ",".join(sorted(INTERPRETERS)), STATE_DIR)


def _host_probe():
    """Run host_check() in a child (it must be a subreaper; the master must not become one); its answer."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            prctl.set_child_subreaper(True)
            try:
                languages = host_check(_CGROUPS)
            except (HostError, OSError, RuntimeError) as exc:
                where = traceback.extract_tb(exc.__traceback__)[-1]  # the operator's first clue on a new host
                os.write(write_fd, f"{type(exc).__name__}: {exc} (in {where.name}, line {where.lineno})".encode()[:4000])
                os._exit(1)
            with open(write_fd, "wb") as f:
                f.write(json.dumps(languages).encode())
            os._exit(0)
        finally:
            os._exit(2)
    os.close(write_fd)
    with open(read_fd, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise HostError(message or f"the host probe died (status {status})")
    return json.loads(message)


def _process_reset():
    """Forked from the gunicorn master: drop its signal handlers and every inherited fd but stdio."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM, signal.SIGTTIN, signal.SIGTTOU,
                signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.closerange(3, 1 << 20)


def _heap_settle():
    """Master, before its first fork: leave the heap as every child will share it.

    Where no .pyc can be written (a read-only install, PYTHONDONTWRITEBYTECODE)
    importing this module compiles it, and the compiler's freed memory (about
    7 MiB) stays in malloc's heap, to be copied by every fork. malloc_trim
    hands it back to the kernel. gc.freeze() keeps later collections from
    writing to the objects that exist now, so children share those pages longer.
    """
    gc.collect()
    gc.freeze()
    _libc.malloc_trim(0)


def runner_launch():
    """Master: fork the keeper, which runs (and restarts) the runner; then make the key
    for client addresses, so that the keeper, the runner, the factory and every jail,
    all forked from the keeper, never hold it. The workers, forked after this, do."""
    global _KEEPER, _CLIENT_KEY
    _heap_settle()  # the keeper, the runner, every jail and every worker start from here
    master = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            _process_reset()
            _keeper_main(master)
        except BaseException as exc:
            log_failure("keeper_failed", exc)
        finally:
            os._exit(1)
    _KEEPER = (pid, os.pidfd_open(pid))
    _CLIENT_KEY = secrets.token_bytes(32)


#: After SIGTERM, how long the keeper lets the runner stop its jobs before it kills it.
RUNNER_STOP_GRACE_S = 5


def _keeper_main(master):
    prctl.set_name("sandrun-keeper")  # what ps and top show: each process says what it is
    prctl.set_pdeathsig(signal.SIGTERM)  # the master died: stop the runner, then go
    # A dead runner's jails and factory die with it (their death signals); as our orphans they are reaped here.
    prctl.set_child_subreaper(True)
    if os.getppid() != master:
        return
    stopping = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)  # a SIGTERM wakes the watch at once
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the master, which stops us
    keeper, starts = os.getpid(), 0
    while not stopping:
        starts += 1
        beat_r, beat_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for fd in (beat_r, wake_r, wake_w):
                    os.close(fd)
                _runner_main(keeper, beat_w, starts)
            except BaseException as exc:
                log_failure("runner_failed", exc)
            finally:
                os._exit(1)
        os.close(beat_w)
        status = _keeper_watch(pid, beat_r, wake_r, stopping)
        os.close(beat_r)
        if not stopping:
            log.error("event=runner_died status=%d restart_in_s=1", status)
            time.sleep(1)
    os._exit(0)


def _keeper_watch(pid, beat_r, wake_r, stopping):
    """Keeper: watch one runner until it is gone, and return its wait status.

    A runner that has not beaten for RUNNER_STALL_S is stuck (in C code no
    signal handler interrupts, say) and is killed; one asked to stop gets
    SIGTERM, then SIGKILL after RUNNER_STOP_GRACE_S. Orphaned jails and
    factories of earlier runners are reaped on the way.
    """
    pidfd = os.pidfd_open(pid)
    last_beat, asked_at, killed = time.monotonic(), None, False
    try:
        while True:
            ready = select.select([pidfd, beat_r, wake_r], [], [], 1.0)[0]
            now = time.monotonic()
            if beat_r in ready:
                fd_drain(beat_r)
                last_beat = now
            if wake_r in ready:
                fd_drain(wake_r)
            while True:
                reaped, status = os.waitpid(-1, os.WNOHANG)
                if reaped == pid:
                    return status
                if reaped == 0:
                    break
            if stopping and asked_at is None:
                asked_at = now
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            elif not killed and (asked_at is not None and now - asked_at > RUNNER_STOP_GRACE_S or now - last_beat > RUNNER_STALL_S):
                log.error("event=runner_killed detail=%s", "stop_timed_out" if asked_at is not None else "heartbeat_stale")
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed = True
    finally:
        os.close(pidfd)


def _runner_main(keeper, beat_w, starts):
    prctl.set_name("sandrun-runner")
    # SIGKILL, not SIGTERM: a runner stuck in C code would never run a handler, and must not outlive us.
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != keeper:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Runner(_CGROUPS, beat_w, starts).run()
    os._exit(0)


def worker_start():
    """Each HTTP worker, after fork: its name and its metrics file."""
    global _METRICS
    prctl.set_name("sandrun-http")
    _METRICS = Metrics(state_path("http", "metrics", f"{os.getpid()}.json"))
    threading.Thread(target=_READS.watch, name="sandrun-deadlines", daemon=True).start()


def server_stop():
    """Master, on exit: stop the runner (it kills its jobs), then erase the state directory."""
    if _KEEPER is not None:
        pid, pidfd = _KEEPER
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            log.info("event=keeper_already_gone")  # killed along with the master's process group
        if not select.select([pidfd], [], [], 10)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 5)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            log.info("event=keeper_reaped_by_gunicorn")
        os.close(pidfd)
    if _CGROUPS is not None:
        _CGROUPS.release()
    if _STATE_LOCK:  # only the owner of the state directory erases it
        if _STATE_MOUNTED:
            umount2(STATE_DIR, MNT_DETACH)
        else:
            _state_empty()
        os.close(_STATE_LOCK.pop())
    log.info("event=server_stopped")


def main(argv):
    """`python3 sandrun.py check`: prove this host can jail, as the server does at start."""
    if argv[1:] != ["check"]:
        print("usage: sandrun.py check", file=sys.stderr)
        return 2
    try:
        server_start()
    except (HostError, SettingsError) as exc:
        print(f"sandrun: cannot serve: {exc}", file=sys.stderr)
        return 1
    server_stop()
    print(f"sandrun: this host can jail jobs (cgroup v{_CGROUPS.version}; interpreters: {', '.join(sorted(INTERPRETERS))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
