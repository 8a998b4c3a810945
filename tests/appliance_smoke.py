"""Smoke suite for the appliance: boot the real disk image and talk to it through nginx.

Run by `make image-test` (after `make image`), not by `make test`: it needs
qemu and a built image. The disk boots under UEFI with snapshot=on; nginx's
port 80 is forwarded to a loopback port here. This is where the cgroup v2
code path is proven, and the hardened units with it.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "build", "image", "sandrun.raw")
BOOT_TIMEOUT_S = 360  # TCG emulation boots in about a minute; a loaded 2-core machine takes longer


class Appliance:
    def __init__(self, credentials=()):
        """Boot the image; `credentials` are "name=value" system credentials (SMBIOS type 11)."""
        self.forwarded("sandrun-appliance-")
        self.proc = subprocess.Popen([os.path.join(ROOT, "image", "qemu"), IMAGE, str(self.port), self.serial_log, *credentials],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)

    def forwarded(self, prefix):
        """A free loopback port for qemu to forward, its URL, and a work directory for the serial log."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = tempfile.mkdtemp(prefix=prefix)
        self.serial_log = os.path.join(self.workdir, "serial.log")

    def console(self):
        """The serial console so far, without terminal colour codes."""
        try:
            with open(self.serial_log, "rb") as f:
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)

    def wait_until_up(self, banner="sandrun: process", timeout=BOOT_TIMEOUT_S):
        """Until /health answers 200 through nginx and the console shows `banner` (the boot is done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.request("GET", "/health")[0] == 200 and banner in self.console():
                    return
            except OSError:
                pass  # qemu forwards the port before the guest listens
            time.sleep(2)
        self.stop()
        console = self.console()
        shutil.rmtree(self.workdir)
        pytest.fail(f"the appliance did not come up in {timeout} s (qemu: {self.proc.returncode}); "
                    f"serial console:\n{console[-20000:]}", pytrace=False)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # qemu and the script that started it
            self.proc.wait(timeout=30)

    def request(self, method, path, doc=None, body=None, headers=None, timeout=90):
        if doc is not None:
            body, headers = json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def submit(self, code, interpreter, wait=0, **manifest):
        for _ in range(10):
            status, headers, body = self.request("POST", f"/submit?wait={wait}", {"code": code, "interpreter": interpreter, **manifest})
            if status != 429:
                break
            time.sleep(int(headers["Retry-After"]) + 1)
        doc = json.loads(body)
        assert status in (200, 202), (status, doc)
        return doc

    def run(self, code, interpreter, **manifest):
        """Submit and wait for the end, waiting out the appliance's own rate limits as a client should.

        Every request reaches it from one address (qemu's gateway), with the
        default quotas; under emulation node alone spends seconds of CPU.
        """
        doc = self.submit(code, interpreter, wait=60, **manifest)
        while doc["status"] not in ("completed", "failed"):
            status, _, body = self.request("GET", f"/status/{doc['job_id']}?wait=60")
            doc = json.loads(body)
            assert status == 200, doc
        logs = json.loads(self.request("GET", f"/logs/{doc['job_id']}")[2])
        return doc, logs


@pytest.fixture(scope="module")
def appliance():
    assert os.path.exists(IMAGE), "no image: run make image first"
    box = Appliance()
    box.wait_until_up()
    yield box
    box.stop()
    print(box.console()[-4000:])  # shown with -s or on failure
    shutil.rmtree(box.workdir)


def console_facts(appliance, prefix):
    return [line.split(f"sandrun: {prefix} ", 1)[1].strip() for line in appliance.console().splitlines() if f"sandrun: {prefix} " in line]


def test_health_through_nginx(appliance):
    status, headers, body = appliance.request("GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "healthy"}
    assert headers["Server"] == "nginx"  # no version: server_tokens off


def test_python_node_and_bash_jobs_run(appliance):
    cases = [("python3", "import sys; print('py', sys.version_info[0])", "py 3\n"),
             ("node", "console.log('js', 6 * 7)", "js 42\n"),
             ("bash", "echo \"sh $((6 * 7))\"", "sh 42\n")]
    for interpreter, code, expected in cases:
        doc, logs = appliance.run(code, interpreter)
        assert (doc["status"], doc["reason"], logs["stdout"]) == ("completed", "exit_code", expected), (doc, logs)


def test_the_data_stack_computes_and_plots(appliance):
    """Debian 13's numpy, pandas, scipy, sympy and matplotlib in the appliance's jail, within the default limits."""
    code = ("import numpy as np, pandas as pd, scipy.linalg, sympy\nimport matplotlib.pyplot as plt\n"
            "a = np.array([[4.0, 1.0], [2.0, 3.0]])\ndf = pd.DataFrame({'x': [1, 2, 3]})\n"
            "plt.plot(df.x, df.x ** 2)\nplt.savefig('plot.png', dpi=40)\n"
            "print(np.linalg.solve(a, [1.0, 2.0]).round(6).tolist(), int(df.x.sum()), round(float(scipy.linalg.det(a)), 6),"
            " sympy.factor(sympy.Symbol('x') ** 2 - 1))")
    doc, logs = appliance.run(code, "python3", timeout=120)
    assert (doc["status"], logs["stdout"]) == ("completed", "[0.1, 0.6] 6 10.0 (x - 1)*(x + 1)\n"), (doc, logs)
    assert list(doc["output_files"]) == ["plot.png"] and doc["output_files"]["plot.png"]["size_bytes"] > 1000, doc
    _, _, body = appliance.request("GET", "/")
    languages = json.loads(body)["languages"]  # as the appliance's jail answered at start
    assert set(languages["python3"]["packages"]) == {"numpy", "pandas", "matplotlib", "scipy", "PIL", "sympy"}, languages
    assert languages["c"]["compiles"] and languages["cpp"]["compiles"] and not languages["python3"]["compiles"], languages


def test_c_and_cpp_compile_and_run_in_the_jail(appliance):
    doc, logs = appliance.run('#include <stdio.h>\nint main(int c, char **v) { printf("c %s\\n", v[1]); return 0; }\n', "c",
                              args=["ok"], timeout=120)
    assert (doc["status"], logs["stdout"]) == ("completed", "c ok\n"), (doc, logs)
    doc, logs = appliance.run("#include <iostream>\nint main() { std::cout << \"cpp \" << 6 * 7 << std::endl; }\n", "cpp", timeout=120)
    assert (doc["status"], logs["stdout"]) == ("completed", "cpp 42\n"), (doc, logs)
    doc, logs = appliance.run("int main() { return nope; }\n", "c", timeout=120)
    assert (doc["status"], doc["reason"]) == ("failed", "compile_error") and "nope" in logs["stderr"], (doc, logs)


def test_a_job_has_its_loopback_and_no_network(appliance):
    """The unit's IP firewall (localhost only) and the job's own network namespace, together."""
    code = ("import socket\ns = socket.create_server(('127.0.0.1', 0))\nc = socket.create_connection(s.getsockname())\n"
            "s.accept()[0].sendall(b'lo')\nprint(c.recv(2).decode())\n"
            "try:\n    socket.create_connection(('10.0.2.2', 80), timeout=5)\nexcept OSError as e:\n    print(e.errno)\n")
    doc, logs = appliance.run(code, "python3")
    assert logs["stdout"] == "lo\n101\n", (doc, logs)  # ENETUNREACH: only lo exists


def test_memory_bomb_ends_with_memory_limit(appliance):
    doc, _ = appliance.run("b = []\nwhile True: b.append(bytearray(1 << 24))", "python3", memory_mb=64)
    assert (doc["status"], doc["reason"]) == ("failed", "memory_limit"), doc
    assert doc["execution_metadata"]["memory_peak_bytes"] <= 64 << 20


def test_fork_bomb_is_contained_by_the_pids_limit(appliance):
    code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print(n, e.errno)\n")
    doc, logs = appliance.run(code, "python3", timeout=30)
    assert (doc["status"], doc["reason"]) == ("completed", "exit_code"), (doc, logs)
    forked, error = map(int, logs["stdout"].split())
    assert error == 11 and 0 < forked < 32, logs  # EAGAIN from pids.max (32 per job, the interpreter included)
    # the sleeping children died with the job: the next one runs at once
    assert appliance.run("print('after')", "python3")[1]["stdout"] == "after\n"


def test_live_logs_stream_through_nginx_unbuffered(appliance):
    job_id = appliance.submit("import time\nprint('first', flush=True)\ntime.sleep(5)\nprint('second')", "python3")["job_id"]
    with urllib.request.urlopen(f"{appliance.url}/logs/{job_id}?follow=1", timeout=120) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        seen = ""
        while "first" not in seen:
            seen += stream.readline().decode()
        # nginx passed it on while the job still runs
        assert json.loads(appliance.request("GET", f"/status/{job_id}")[2])["status"] == "running"
        rest = stream.read().decode()
    assert "data: second" in rest and "event: status" in rest


def test_errors_nginx_answers_itself_are_the_contracts_json(appliance):
    status, _, body = appliance.request("POST", "/submit", body=b"x" * 1024, headers={
        "Content-Type": "application/json", "Content-Length": str(100 * 1024 * 1024 + 1)}, timeout=30)
    assert status == 413 and json.loads(body)["error"] == "body too large"


def test_the_console_says_where_the_api_is(appliance):
    assert re.search(r"sandrun: ready: http://\d+\.\d+\.\d+\.\d+:80/", appliance.console()), appliance.console()[-3000:]


def test_browsers_get_the_page_through_nginx(appliance):
    status, headers, body = appliance.request("GET", "/", headers={"Accept": "text/html"})
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8" and b"<title>Sandrun</title>" in body


def test_the_root_is_a_tmpfs_overlay_and_the_state_a_tmpfs(appliance):
    assert console_facts(appliance, "mount /")[0].startswith("overlay ")
    assert console_facts(appliance, "mount / upper layer on") == ["tmpfs"]
    assert console_facts(appliance, "mount /run/sandrun")[0].startswith("tmpfs ")


def test_only_the_http_workers_are_unprivileged_and_nothing_else_runs(appliance):
    processes = [tuple(fact.split(" uid ")) for fact in console_facts(appliance, "process")]
    assert sorted(name for name, uid in processes if uid == "0") == ["sandrun-factory", "sandrun-keeper", "sandrun-master", "sandrun-runner"]
    workers = [uid for name, uid in processes if name == "sandrun-http"]
    assert len(workers) == 2 and all(uid != "0" for uid in workers), processes
