"""A stock Debian host under qemu: `make run` typed into root's login shell.

Run by `make host-test` (after tests/host/build-vm), not by `make test`: it needs
qemu and the VM disk, SANDRUN_HOST_VM (build/host/trixie unless set). systemd is pid 1 with the unified cgroup tree, and the
shell sits in a login session's scope that `login` and `bash` share: the case
in which the server must ask systemd for a delegated scope of its own. The
console is typed into and read back; the server's port is forwarded here.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from appliance_smoke import Appliance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VM = os.environ.get("SANDRUN_HOST_VM", os.path.join(ROOT, "build", "host", "trixie"))
BOOT_TIMEOUT_S = 360  # TCG emulation reaches the login shell in about half a minute; a loaded machine takes longer
SERVE_TIMEOUT_S = 300


class StockHost:
    # The appliance suite's forwarded port and HTTP client: both VMs are reached the same way.
    forwarded, request, submit, run = Appliance.forwarded, Appliance.request, Appliance.submit, Appliance.run

    def __init__(self):
        self.forwarded("sandrun-host-")
        sock = os.path.join(self.workdir, "console.sock")
        self.proc = subprocess.Popen([
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "3072",
            "-nographic", "-nodefaults", "-no-reboot",
            "-kernel", os.path.join(VM, "vmlinuz"), "-initrd", os.path.join(VM, "initrd.img"),
            # The kernel stays quiet on the console: its OOM reports would split the lines read back.
            "-append", "root=/dev/vda rw console=ttyS0 quiet loglevel=1",
            "-drive", f"file={os.path.join(VM, 'disk.raw')},if=virtio,format=raw,snapshot=on",
            "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{self.port}-:8443",
            "-device", "virtio-rng-pci",
            "-chardev", f"socket,id=con,path={sock},server=on,wait=off,logfile={self.serial_log}",
            "-serial", "chardev:con",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and self.proc.poll() is None, "qemu did not start"
            time.sleep(0.1)
        self.console_sock = socket.socket(socket.AF_UNIX)
        self.console_sock.connect(sock)
        # The log file keeps what the console prints; the socket must still be drained, or the guest's output stalls.
        threading.Thread(target=lambda: all(iter(lambda: self.console_sock.recv(65536), b"")), daemon=True).start()
        self.marks = 0

    def console(self):
        with open(self.serial_log, "rb") as f:
            text = f.read().decode(errors="replace")
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text)

    def type(self, keys):
        self.console_sock.sendall(keys.encode())

    def expect(self, pattern, timeout, since=0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(pattern, self.console()[since:])
            if found:
                return found
            time.sleep(0.5)
        pytest.fail(f"{pattern!r} not on the console in {timeout} s:\n{self.console()[-6000:]}", pytrace=False)

    def shell(self, command, timeout=120):
        """Type a command into the login shell; its exit code and what it printed."""
        self.marks += 1
        since = len(self.console())
        # The marker is computed by the shell, so the echoed command line never matches it.
        self.type(f'{command}; echo "mark-{self.marks}:$?:$((6 * 7))"\r')
        found = self.expect(rf"mark-{self.marks}:(\d+):42", timeout, since)
        return int(found.group(1)), self.console()[since:since + found.start()]

    def wait_for_shell(self):
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.type("echo \"up-$((6 * 7))\"\r")  # typed until the login shell is there to answer
            if "up-42" in self.console():
                return
            time.sleep(5)
        pytest.fail(f"no login shell on the console in {BOOT_TIMEOUT_S} s:\n{self.console()[-20000:]}", pytrace=False)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the disk is a snapshot: nothing to flush
            self.proc.wait(timeout=30)
        self.console_sock.close()


@pytest.fixture(scope="module")
def host():
    assert os.path.exists(os.path.join(VM, "disk.raw")), f"no VM disk in {VM}: run tests/host/build-vm first"
    box = StockHost()
    box.wait_for_shell()
    assert box.shell("cd /root/sandrun")[0] == 0
    yield box
    box.stop()
    print(box.console()[-6000:])  # shown with -s or on failure
    shutil.rmtree(box.workdir)


LEFTOVERS = ("echo \"left: $(find /sys/fs/cgroup -name 'job-sandrun-*' -o -name 'sandrun-*' -o -name http | wc -l)"
             " $(systemctl list-units --all --no-legend 'run-*.scope' | wc -l)"
             " $(grep -c ' /run/sandrun ' /proc/self/mountinfo)\"")


def test_the_login_shell_shares_its_cgroup(host):
    """The premise: a session scope with login and bash in it, on a cgroup v2 tree, under systemd."""
    rc, out = host.shell("stat -fc %T /sys/fs/cgroup; cat /proc/self/cgroup; ps -o comm= -p $PPID,$$; readlink /proc/1/exe")
    assert rc == 0 and "cgroup2fs" in out and "0::/user.slice/user-0.slice/session-" in out, out
    assert "login" in out and "bash" in out and "/systemd" in out, out


def test_make_run_from_the_login_shell_serves_and_jails(host):
    since = len(host.console())
    host.type("SANDRUN_BIND=0.0.0.0:8443 make run\r")  # 0.0.0.0: qemu forwards the port to the guest's address
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while True:
        try:
            if host.request("GET", "/health", timeout=10)[0] == 200:
                break
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"make run did not serve in {SERVE_TIMEOUT_S} s:\n{host.console()[-6000:]}"
        time.sleep(2)
    log = host.console()[since:]
    # (Short needles: long console lines are read back less reliably under emulation.)
    assert "event=cgroup_scope_reexec" in log and "user-0.slice/session-" in log, log[-4000:]
    assert "event=server_ready cgroup_version=2" in log, log[-4000:]

    doc, logs = host.run("print(6 * 7)", "python3")
    assert (doc["status"], logs["stdout"]) == ("completed", "42\n"), (doc, logs)
    doc, _ = host.run("b = []\nwhile True: b.append(bytearray(1 << 24))", "python3", memory_mb=64)
    assert (doc["status"], doc["reason"]) == ("failed", "memory_limit"), doc
    code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print(n, e.errno)\n")
    doc, logs = host.run(code, "python3", timeout=30)
    assert (doc["status"], doc["reason"]) == ("completed", "exit_code"), (doc, logs)
    forked, error = map(int, logs["stdout"].split())
    assert error == 11 and 0 < forked < 32, logs  # EAGAIN from pids.max

    # Ctrl-C, as a user stops it: the server kept the terminal through its re-exec.
    since = len(host.console())
    host.type("\x03")
    host.expect(r"event=server_stopped", 60, since)
    rc, out = host.shell(LEFTOVERS)
    assert re.search(r"left: 0 0 0\b", out), out


def test_make_check_proves_the_host_and_leaves_nothing(host):
    rc, out = host.shell("make check", timeout=300)
    assert rc == 0 and "this host can jail jobs (cgroup v2" in out, out
    rc, out = host.shell(LEFTOVERS)
    assert re.search(r"left: 0 0 0\b", out), out


def test_without_systemd_it_refuses_naming_the_sharers_and_the_command_that_works(host):
    """As in a container with no systemd: no scope to ask for, so the shared cgroup is refused,
    before anything is changed; the command the refusal names works, and leaves nothing either.
    (The guest greps its own output: the console is read back for short lines only.)"""
    host.type("unshare --mount bash\r")  # a shell in a mount namespace of its own, typed into as the login shell was
    rc, out = host.shell("mount -t tmpfs none /run/systemd && test ! -e /run/systemd/system")
    assert rc == 0, out
    try:
        rc, out = host.shell(".venv/bin/python sandrun.py check 2>/tmp/refusal; echo \"refused: $?"
                             " $(grep -c 'is shared with [0-9]* (login), [0-9]* (bash)' /tmp/refusal)\"", timeout=300)
        assert "refused: 1 1" in out, out
        rc, left = host.shell(LEFTOVERS)
        assert re.search(r"left: 0 0 0\b", left), left

        rc, out = host.shell("sh -c \"$(sed -n 's/.*for example: //p' /tmp/refusal)\" | grep -c 'this host can jail jobs (cgroup v2'", timeout=300)
        assert rc == 0, out
        # The server's stop gave the cgroup back as it found it: empty, no leaf, no job cgroup.
        rc, out = host.shell("echo \"inside: $(ls /sys/fs/cgroup/sandrun | grep -c -e http -e job-)\"; rmdir /sys/fs/cgroup/sandrun")
        assert rc == 0 and "inside: 0" in out, out
    finally:
        host.type("exit\r")
        assert host.shell("test -d /run/systemd/system")[0] == 0  # back in the login shell
