"""Against the real jail: output collection, escape and privilege, the network, jobs seeing each other, failing closed.

The escape table runs tests/probes/escape.py inside one job; every row has
an exact expected answer, and the allowed twins prove the jail is not
simply broken.
"""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
from conftest import ROOT, Server, alive, descendants, eventually, proc_stat

PROBE = os.path.join(os.path.dirname(__file__), "probes", "escape.py")

EXPECTED = {
    "mount": "EPERM", "umount2": "EPERM", "unshare_user": "EPERM", "unshare_net": "EPERM",
    "clone_newuser": "EPERM", "clone_newns": "EPERM", "setns": "EPERM", "ptrace_traceme": "EPERM",
    "keyctl": "EPERM", "add_key": "EPERM", "bpf": "EPERM", "perf_event_open": "EPERM",
    "userfaultfd": "EPERM", "io_uring_setup": "EPERM", "open_by_handle_at": "EPERM", "chroot": "EPERM",
    "pivot_root": "EPERM", "setuid_root": "EPERM", "personality": "EPERM", "syncfs": "EPERM",
    "inotify_init1": "EPERM", "inotify_add_watch": "EPERM",
    "tiocsti": "EPERM", "tiocsti_high_bits": "EPERM",
    "socket_vsock": "EAFNOSUPPORT", "socket_packet": "EAFNOSUPPORT", "socket_netlink": "EAFNOSUPPORT",
    "clone3": "ENOSYS", "kcmp": "ENOSYS", "sync": "ENOSYS", "fsync_work": "ok",
    "read_shadow": "ENOENT", "read_host_root_home": "ENOENT", "write_usr": "EROFS", "write_root": "EROFS",
    "write_etc_passwd": "EROFS", "write_proc_sys": "EROFS", "create_in_dev": "EROFS", "mknod_char_device": "EPERM",
    "connect_host_server": "ECONNREFUSED",
    "thread": "ok", "fork": "ok", "socket_unix": "ok", "socket_inet6": "ok", "loopback_inside": "ok",
    "ioctl_fionread": "ok", "write_work": "ok", "write_tmp": "ok", "write_dev_shm": "ok", "write_dev_null": "ok",
    "read_etc_passwd": "ok", "mkfifo_tmp": "ok",
}


@pytest.fixture(scope="module")
def probe(server):
    with open(PROBE, "rb") as f:
        code, _, body = server.submit_files([("escape.py", f.read())], {"entrypoint": "escape.py", "args": [str(server.port)]})
    doc = json.loads(body)
    _, _, logs = server.json("GET", f"/logs/{doc['job_id']}")
    assert doc["status"] == "completed", (doc, logs)
    return json.loads(logs["stdout"])


@pytest.mark.parametrize("row", sorted(EXPECTED))
def test_escape_table(probe, row):
    assert probe[row] == EXPECTED[row], f"{row}: got {probe[row]}, want {EXPECTED[row]}"


def test_identity_and_privileges_read_back(probe):
    status = probe["status"]
    assert status["Uid"].split() == ["61000"] * 4 and status["Gid"].split() == ["61000"] * 4 and status["Groups"] == ""
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, (field, status[field])
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"


def test_namespaces_hide_the_host(probe):
    assert probe["pids"] == [1, 2], probe["pids"]  # the jail's init and the job itself
    assert probe["interfaces"] == ["lo"] and probe["hostname"] == "sandbox"
    assert probe["root"] == ["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr", "work"]
    mounts = probe["mounts"]
    assert "ro" in mounts["/usr"].split(",") and "nosuid" in mounts["/usr"].split(",")
    assert "ro" in mounts["/"].split(",") and "rw" in mounts["/work"].split(",")


def test_the_job_holds_its_three_standard_streams_and_nothing_else(server):
    # listdir opens the lowest free fd itself: 3, if 0, 1 and 2 are all the job inherited
    doc, logs = server.run("import os\nprint(sorted(os.listdir('/proc/self/fd')), os.readlink('/proc/self/fd/1')[:5])")
    assert logs["stdout"] == "['0', '1', '2', '3'] pipe:\n", logs


def test_the_jobs_own_cgroup_is_the_root_of_its_cgroup_namespace(server):
    """Joined before the namespace was made: a job cannot even name the host's cgroup tree."""
    doc, logs = server.run("print(open('/proc/self/cgroup').read(), end='')")
    lines = logs["stdout"].splitlines()
    assert lines and all(line.endswith(":/") for line in lines), lines


def test_jobs_cannot_see_each_other(server):
    """Class F: two jobs at once; the second looks for every trace of the first."""
    first = server.submit_code(
        "import os, socket, time\nopen('/tmp/secret', 'w').write('s'); open('/dev/shm/secret', 'w').write('s')\n"
        "s = socket.socket(socket.AF_UNIX); s.bind('\\0sandrun-test'); s.listen()\nprint('ready', flush=True); time.sleep(5)",
        wait=0,
    )
    # The first job holds its traces while the second looks (without this, the test could pass on an ended job).
    eventually(lambda: server.json("GET", f"/logs/{first['job_id']}")[2]["stdout"] == "ready\n", 20, "the first job's traces")
    doc, logs = server.run(
        "import os, socket\nprint(os.listdir('/tmp'), os.listdir('/dev/shm'), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "s = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect('\\0sandrun-test'); print('connected')\nexcept OSError as e: print(e.errno)"
    )
    assert logs["stdout"] == "[] [] [1, 2]\n111\n", logs  # 111: ECONNREFUSED, the abstract socket is the other netns's
    server.json("DELETE", f"/jobs/{first['job_id']}")


def test_every_job_gets_a_jail_of_its_own_even_one_after_another(server):
    """Jails are built ahead of their jobs (a spare waits); none is ever handed a second job."""
    leave = "import os\nopen('/tmp/left', 'w').write('x'); open('/work/left', 'w').write('x'); print(os.getpid())"
    look = "import os\nprint(os.listdir('/tmp'), 'left' in os.listdir('/work'), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    for _ in range(3):
        assert server.run(leave)[0]["status"] == "completed"
        assert server.run(look)[1]["stdout"] == "[] False [1, 2]\n"


def test_a_spare_jail_holds_only_its_own_descriptors(server):
    """A clone copies all of the runner's descriptors, the running jobs' included; a spare drops them."""
    job_id = server.start_sleeper()
    try:
        spares = eventually(lambda: [pid for pid in descendants(server.runner_pid())  # jails waiting for a job: they have no child
                                     if alive(pid) and open(f"/proc/{pid}/comm").read().strip() == "sandrun-jail" and not descendants(pid)],
                            10, "a spare jail")
        for pid in spares:
            # 0, 1, 2 and its five ends: output pipes, setup socket, the runner's liveness pipe, status pipe
            assert len(os.listdir(f"/proc/{pid}/fd")) <= 8, sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    finally:
        server.request("DELETE", f"/jobs/{job_id}")


def test_a_spare_jail_that_died_is_replaced_before_a_job_needs_it(server):
    def spares():  # no job runs: every jail of this server's runner is a spare
        found = []
        for pid in descendants(server.runner_pid()):
            try:
                if open(f"/proc/{pid}/comm").read().strip() == "sandrun-jail" and alive(pid):
                    found.append(pid)
            except FileNotFoundError:
                continue
        return found

    killed = eventually(spares, 10, "a spare jail")
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):  # a jail of the previous test's job, ending just now
            os.kill(pid, signal.SIGKILL)
    # A spare that died a while ago (one dying just as it gets a job fails closed).
    eventually(lambda: not any(map(alive, killed)), 10, "the spares' death", interval=0.01)
    doc, logs = server.run("print('fresh')")
    assert (doc["status"], logs["stdout"]) == ("completed", "fresh\n"), (doc, logs)


def test_setuid_binaries_do_not_elevate(server):
    doc, logs = server.run("su root -c id; echo rc=$?", "bash")
    assert "rc=1" in logs["stdout"] or "rc=126" in logs["stdout"], logs
    assert "uid=0" not in logs["stdout"]


def test_job_cannot_signal_its_init(server):
    doc, logs = server.run("kill -KILL 1; echo still here", "bash")
    assert doc["status"] == "completed" and logs["stdout"] == "still here\n", (doc, logs)


# Class B: what a job leaves behind is hostile ----------------------------------

LEAVE_BEHIND = """
import os, socket
open('real.txt', 'w').write('real')
os.symlink('/etc/passwd', 'link_to_host')
os.symlink('/', 'link_to_root')
open('twice.txt', 'w').write('t'); os.link('twice.txt', 'twice_again.txt')
os.mkfifo('fifo')
s = socket.socket(socket.AF_UNIX); s.bind('sock')
with open('sparse.bin', 'wb') as f: f.truncate(90 * 1024 * 1024)
os.makedirs('d'); os.symlink('../real.txt', 'd/up')
"""


def test_outputs_are_regular_single_link_files_only(server):
    doc, logs = server.run(LEAVE_BEHIND)
    assert doc["status"] == "completed", (doc, logs)
    assert sorted(doc["output_files"]) == ["real.txt", "sparse.bin"], doc["output_files"]
    _, _, listing = server.json("GET", f"/outputs/{doc['job_id']}")
    assert sorted(f["name"] for f in listing["files"]) == ["real.txt", "sparse.bin"]
    assert {f["name"]: f["size"] for f in listing["files"]}["sparse.bin"] == 90 * 1024 * 1024
    for name in ("link_to_host", "link_to_root/etc/passwd", "twice.txt", "fifo", "sock", "d/up"):
        status, _, _ = server.request("GET", f"/download/{doc['job_id']}/{name}")
        assert status == 404, name
    status, _, data = server.request("GET", f"/download/{doc['job_id']}/real.txt")
    assert (status, data) == (200, b"real")


@pytest.mark.parametrize("path", ["./real.txt", "d/../real.txt", "/real.txt", "real.txt/", "REAL.TXT", "%2e%2e/real.txt"])
def test_download_paths_are_never_normalised(server, path):
    doc, _ = server.run("import os; os.makedirs('d'); open('real.txt', 'w').write('r')")
    status, _, body = server.request("GET", f"/download/{doc['job_id']}/{path}")
    assert status == 404, (path, body)


def test_download_of_another_jobs_file_by_traversal_is_404(server):
    one, _ = server.run("open('mine.txt', 'w').write('1')")
    two, _ = server.run("open('other.txt', 'w').write('2')")
    for path in (f"../{two['job_id']}/other.txt", f"..%2f{two['job_id']}%2fother.txt"):
        status, _, _ = server.request("GET", f"/download/{one['job_id']}/{path}")
        assert status == 404, path


# Class H: fail closed -------------------------------------------------------------


def test_forged_queue_entry_with_symlinked_payload_runs_nothing(server):
    """A compromised worker plants a queue entry whose payload is a link to a host file."""
    job_id = "job-" + "f" * 32
    entry = os.path.join(server.state_dir, "http", "queue", f"{9999999999999999:016d}.{job_id}")
    staged = os.path.join(server.state_dir, "http", "tmp", job_id)  # renamed in whole, as a worker queues
    os.mkdir(staged)
    with open(os.path.join(staged, "request.json"), "w") as f:
        json.dump({"manifest": {"entrypoint": "x.sh", "interpreter": "bash"}, "client": "0" * 32, "created_ts": time.time()}, f)
    os.symlink("/etc/shadow", os.path.join(staged, "payload.tar"))
    os.chown(staged, 0, 0)
    os.rename(staged, entry)
    doc = server.wait(job_id, 30)
    assert (doc["status"], doc["reason"]) == ("failed", "internal_error"), doc
    _, _, logs = server.json("GET", f"/logs/{job_id}")
    assert logs == {"stdout": "", "stderr": "", "stdout_truncated": False, "stderr_truncated": False}
    assert not os.path.exists(entry)


def test_runner_death_kills_its_jobs_and_health_follows(server):
    running = {"job_id": server.start_sleeper()}
    runner_pid = server.runner_pid()
    jails = descendants(runner_pid)  # the running job's init and the job; the spare jail
    assert len(jails) >= 3, jails
    keeper = proc_stat(runner_pid)[1]
    os.kill(runner_pid, signal.SIGKILL)
    # The kernel kills them with the runner (their death signal), not the next runner's sweep.
    eventually(lambda: not any(map(alive, jails)), 10, "the jails' death with their runner", interval=0.01)
    assert [pid for pid in descendants(keeper) if alive(pid)] == [], "jails were left for the next runner to kill"
    seen = []
    for _ in range(20):  # the keeper waits 1 s before it restarts the runner
        status, _, health = server.json("GET", "/health")
        seen.append((status, health.get("details")))
        if status == 503:
            break
        time.sleep(0.02)
    assert seen[-1] == (503, "the runner is not alive"), seen
    queued = server.submit_code("print('after restart')", wait=0)
    doc = server.wait(running["job_id"], 30)
    assert (doc["status"], doc["reason"]) == ("failed", "internal_error"), doc
    done = server.wait(queued["job_id"], 30)
    assert done["status"] == "completed", done
    assert server.json("GET", "/health")[0] == 200
    assert server.runner_pid() != runner_pid


@pytest.mark.parametrize("env,words", [
    ({"SANDRUN_JOB_UID": "65534"}, "belongs to host account"),
    ({"SANDRUN_HTTP_USER": "no-such-user-here"}, "No such user"),
    ({"SANDRUN_JOB_TIMEOUT_S": "0"}, "outside 1..3600"),
    ({"SANDRUN_UNPACKED_MAX_BYTES": str(200 * 1024 * 1024)}, "exceeds"),
])
def test_server_refuses_to_start_when_it_cannot_jail_safely(env, words):

    srv = Server(env, "refuse")
    with pytest.raises(AssertionError, match=words):
        srv.start()
    assert srv.proc.returncode != 0


def test_a_second_server_on_the_same_state_dir_refuses_and_harms_nothing(server):

    doc, _ = server.run("print('kept')")
    second = Server({"SANDRUN_STATE_DIR": server.state_dir}, "second")
    second.state_dir = server.state_dir
    with pytest.raises(AssertionError, match="another Sandrun server is using"):
        second.start()
    assert server.json("GET", "/health")[0] == 200
    assert server.json("GET", f"/logs/{doc['job_id']}")[2]["stdout"] == "kept\n"


def test_the_same_state_path_in_another_mount_namespace_never_sweeps_this_servers_jobs(server):
    """A chroot or container may name the same SANDRUN_STATE_DIR: its server is another
    instance, and its start and stop (a `check`) must leave this one's jobs and cgroups alone."""

    job_id = server.start_sleeper(30)
    jails = descendants(server.runner_pid())
    script = ('umount -l "$SANDRUN_STATE_DIR" && exec .venv/bin/python sandrun.py check')  # its own, new tmpfs
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "this host can jail jobs" in done.stdout
    assert all(map(alive, jails)), "the other instance's check swept this server's jails"
    doc = server.json("GET", f"/status/{job_id}")[2]
    assert doc["status"] == "running", doc
