"""One real server per configuration: gunicorn with the real config on loopback.

Nothing is mocked: jobs run in the real jail on this kernel. Teardown proves
nothing leaked: no process of the server or of a job, no mount under the
state directory, no job cgroup, no state entry.
"""

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sandrun  # noqa: E402  (only for constants; the server runs in its own process)

def eventually(check, timeout=30, what="it", interval=0.05):
    """check() until it returns something true, which is returned; past `timeout` s, fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s (last: {value!r})"
        time.sleep(interval)
    return value


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """HTTP to a Sandrun server, or to nginx before one or more: at 127.0.0.1:self.port, or at
    the UNIX socket that self.env["SANDRUN_BIND"] names."""

    env, port = {}, None

    def request(self, method, path, body=None, headers=None, source="127.0.0.1", timeout=90):
        bind = self.env.get("SANDRUN_BIND", "")
        if bind.startswith("unix:"):
            conn = UnixHTTPConnection(bind[len("unix:"):], timeout=timeout)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, source_address=(source, 0))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method, path, doc=None, source="127.0.0.1", headers=None):
        body = json.dumps(doc).encode() if doc is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})} if doc is not None else headers
        status, headers, data = self.request(method, path, body, hdrs, source)
        return status, headers, json.loads(data) if data else None

    def submit_code(self, code, interpreter="python3", wait=60, source="127.0.0.1", **manifest):
        status, headers, doc = self.json("POST", f"/submit?wait={wait}", {"code": code, "interpreter": interpreter, **manifest}, source)
        assert status in (200, 202), (status, doc)
        return doc

    def submit_files(self, files, manifest, wait=60, source="127.0.0.1"):
        """files: [(filename, bytes)]; manifest: dict or raw string."""
        body, ctype = multipart({"manifest": manifest if isinstance(manifest, str) else json.dumps(manifest)}, files)
        return self.request("POST", f"/submit?wait={wait}", body, {"Content-Type": ctype}, source)

    def run(self, code, interpreter="python3", source="127.0.0.1", **manifest):
        """Submit, wait for the end, return (status doc, logs doc)."""
        doc = self.submit_code(code, interpreter, source=source, **manifest)
        doc = self.wait(doc["job_id"]) if doc["status"] not in ("completed", "failed") else doc
        _, _, logs = self.json("GET", f"/logs/{doc['job_id']}")
        return doc, logs

    def run_files(self, files, manifest):
        """Upload files (as submit_files), wait for the end, return (status doc, logs doc)."""
        status, _, body = self.submit_files(files, manifest)
        doc = json.loads(body)
        assert status in (200, 202), (status, doc)
        doc = self.wait(doc["job_id"]) if doc["status"] not in ("completed", "failed") else doc
        return doc, self.json("GET", f"/logs/{doc['job_id']}")[2]

    def start_sleeper(self, seconds=60, source="127.0.0.1"):
        """A job that is running (it has said so) and will sleep for `seconds`; its id."""
        doc = self.submit_code(f"import time\nprint('up', flush=True)\ntime.sleep({seconds})", wait=0, source=source)
        eventually(lambda: self.json("GET", f"/logs/{doc['job_id']}")[2]["stdout"] == "up\n", what="the sleeper's start")
        return doc["job_id"]

    def wait(self, job_id, seconds=60):
        """The job's status document once it has ended (each look a long-poll)."""

        def ended():
            status, _, doc = self.json("GET", f"/status/{job_id}?wait=60")
            assert status == 200, (status, doc)
            return doc if doc["status"] in ("completed", "failed") else None

        return eventually(ended, seconds + 30, f"the end of job {job_id}", interval=0)


class Server(Client):
    def __init__(self, env_overrides, name):
        self.workdir = tempfile.mkdtemp(prefix=f"sandrun-{name}-")
        self.cgroup_tag = None  # known once it serves: the tag names its state tmpfs's device and inode
        os.chmod(self.workdir, 0o755)  # the unprivileged HTTP workers must reach the state dir
        self.state_dir = os.path.join(self.workdir, "state")
        self.port = _free_port()
        self.env = {**os.environ, "SANDRUN_STATE_DIR": self.state_dir, "SANDRUN_BIND": f"127.0.0.1:{self.port}", **env_overrides}
        self.log_path = os.path.join(self.workdir, "server.log")

    def start(self):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [os.path.join(ROOT, ".venv/bin/gunicorn"), "-c", "gunicorn.conf.py", "sandrun:app"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

        def healthy():
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}"
            try:
                return self.request("GET", "/health")[0] == 200
            except OSError:
                return False  # not listening yet

        try:
            eventually(healthy, 30, "the server's health", interval=0.1)
        except AssertionError as exc:
            output = self.output()
            if self.proc.poll() is None:
                self.stop()
            else:
                self.log.close()
                shutil.rmtree(self.workdir)
            raise AssertionError(f"{exc}:\n{output}") from None
        self.cgroup_tag = sandrun.cgroup_tag(os.stat(self.state_dir))  # its tmpfs, mounted by now
        return self

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-6000:]

    def stop(self):
        """SIGTERM to the master only, as an operator would; then check for leftovers."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        finally:
            self.log.close()
        leaks = leftovers(self)
        with open(self.log_path, "rb") as f:
            log = f.read().decode(errors="replace")
        shutil.rmtree(self.workdir)
        assert not leaks, f"leaked after shutdown: {leaks}\n{log[-6000:]}"
        # an exception no code path expected (a runner that died of one, say) fails the suite
        # even when every request still got its answer
        crash = log.find("Traceback")
        assert crash < 0, f"the server logged a traceback:\n{log[max(0, crash - 500):crash + 3000]}"

    def runner_pid(self):
        with open(os.path.join(self.state_dir, "runner", "alive")) as f:
            return int(f.read())


class Nginx(Client):
    """A shipped site file (image/nginx/<site>) in a real nginx (Debian's, unpacked by make test)
    on a free loopback port. Only addresses and paths change: `edits` maps each text to its
    replacement; `files` are written beside the site (as /etc/nginx/<name> is included)."""

    BINARY = os.path.join(ROOT, "build", "nginx", "usr", "sbin", "nginx")

    def __init__(self, workdir, site, edits, files=None):
        self.dir, self.port = os.path.join(workdir, "nginx"), _free_port()
        os.makedirs(self.dir)
        with open(os.path.join(ROOT, "image", "nginx", site)) as f:
            text = f.read()
        edits = {"listen 80 default_server;": f"listen 127.0.0.1:{self.port} default_server;", "listen [::]:80 default_server;\n": "",
                 "/var/log/nginx/error.log": f"{self.dir}/error.log", **edits}
        for name, content in (files or {}).items():
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(content)
            edits[f"/etc/nginx/{name}"] = os.path.join(self.dir, name)
        for old, new in edits.items():
            assert old in text, f"{site} no longer says {old!r}"
            text = text.replace(old, new)
        with open(os.path.join(self.dir, "site.conf"), "w") as f:
            f.write(text)
        temps = "".join(f"{kind}_temp_path {self.dir}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(f"daemon off;\nuser root;\nworker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.dir}/error.log crit;\n"
                    f"events {{ worker_connections 1024; }}\nhttp {{\n{temps}include {self.dir}/site.conf;\n}}\n")
        self.proc = subprocess.Popen([self.BINARY, "-p", self.dir, "-c", f"{self.dir}/nginx.conf"])

        def up():
            assert self.proc.poll() is None, "nginx exited"
            return self.get("/health")[0] == 200

        eventually(up, 10, "nginx's /health", interval=0.1)

    def get(self, path, source="127.0.0.1"):
        """(status, body) of a GET, or (None, b"") if the connection failed."""
        try:
            status, _, body = self.request("GET", path, source=source, timeout=5)
            return status, body
        except OSError:
            return None, b""

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a UNIX socket, as nginx reaches the appliance's gunicorn."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def multipart(fields, files):
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() if isinstance(value, str) else value)
        out.write(b"\r\n")
    for filename, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def make_tar(members, mode="w:gz"):
    """members: [(name, kind, data_or_target)] with kind in file, dir, symlink, hardlink, fifo, chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = data
            tar.addfile(info)
    return buf.getvalue()


def proc_stat(pid):
    """(state, parent pid) of a process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


def descendants(pid):
    """Every process below pid."""
    children = {}
    for entry in map(int, filter(str.isdigit, os.listdir("/proc"))):
        if (stat := proc_stat(entry)) is not None:
            children.setdefault(stat[1], []).append(entry)
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def alive(pid):
    """Running, or at least not yet a zombie waiting to be reaped."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def leftovers(server):
    found = []
    tag = server.cgroup_tag or "sandrun-never-served"
    with open("/proc/self/mountinfo") as f:
        found += [line.split()[4] for line in f if line.split()[4].startswith(server.workdir)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
            pgid = os.getpgid(int(pid))
            with open(f"/proc/{pid}/cgroup") as f:
                cgroups = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        uid = int(status.split("Uid:")[1].split()[0])
        if pgid == server.proc.pid or tag in cgroups:  # the server's processes, or its jobs'
            found.append(f"process {pid} uid={uid} state={status.split('State:')[1].split()[0]}")
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(root, d) for d in dirs if d == tag or d.startswith(f"job-{tag}")]
        dirs[:] = [d for d in dirs if d != tag]
    if os.path.isdir(server.state_dir) and os.listdir(server.state_dir):
        found.append(f"state entries {os.listdir(server.state_dir)}")
    return found


def fill(path):
    """Write `path` until its file system is full, as root (past any reserve): ENOSPC ends it."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"f" * (1 << 20))
                f.flush()
        except OSError:
            return


class Bystander:
    """A victim job of another client, and /health asked from a third address while an attack runs."""

    VICTIM_S = 2

    def __init__(self, server):
        self.server = server
        doc = server.submit_code(f"import time; time.sleep({self.VICTIM_S}); print('victim ok')", wait=0, source="127.0.0.2")
        self.job_id, self.submitted = doc["job_id"], time.monotonic()
        self.health, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status = self.server.request("GET", "/health", source="127.0.0.3", timeout=5)[0]
            except OSError:
                status = None
            self.health.append((status, time.monotonic() - started))
            self.stop.wait(0.2)

    def check(self, health_may_fail_for_s=0.0):
        """The victim ended as it should, on time; /health answered 200 within a second (but for the stated gap)."""
        doc = self.server.wait(self.job_id)
        self.stop.set()
        self.thread.join()
        logs = self.server.json("GET", f"/logs/{self.job_id}")[2]
        assert (doc["status"], logs["stdout"]) == ("completed", "victim ok\n"), (doc, logs)
        assert doc["execution_metadata"]["wall_time_ms"] < (self.VICTIM_S + 5) * 1000, doc
        failed = [h for h in self.health if h[0] != 200 or h[1] > 1.0]
        assert len(failed) * 0.2 <= health_may_fail_for_s + 0.5, self.health
        fresh = self.server.run("print('fresh')", source="127.0.0.4")
        assert (fresh[0]["status"], fresh[1]["stdout"]) == ("completed", "fresh\n"), fresh


#: Generous client quotas so the suite's many jobs from 127.0.0.1 are not rate limited;
#: the rate-limit tests use their own server with the defaults.
SUITE_ENV = {
    "SANDRUN_RATE_JOBS_PER_HOUR": "100000", "SANDRUN_RATE_CONCURRENT_JOBS": "64",
    "SANDRUN_RATE_CPU_S_PER_MIN": "100000", "SANDRUN_MAX_QUEUED": "50",
}


@pytest.fixture(scope="session")
def server():
    srv = Server(SUITE_ENV, "suite").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def default_server():
    """Default limits, except results expire after 3 s so expiry can be watched."""
    srv = Server({"SANDRUN_RESULT_TTL_S": "3"}, "defaults").start()
    yield srv
    srv.stop()
