"""No job can stop the runner: each attack runs beside a victim job of another client.

The victim must end correctly and on time, /health must stay 200 (or come
back within the stated bound when the runner itself is stopped), the runner
must not have restarted unless the test stopped it, and a fresh job must
complete afterwards. Every server's log is checked for tracebacks at stop.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from conftest import SUITE_ENV, Bystander, Server, descendants, eventually, fill, leftovers

import sandrun

def _runner_unchanged(server, before):
    assert server.runner_pid() == before, "the runner restarted"


def _log_lacks(server, *texts):
    with open(server.log_path, errors="replace") as f:
        log = f.read()
    for text in texts:
        assert text not in log, f"job content {text[:40]!r} reached the log"


# The end of a job, as one pure function of what the runner saw ------------------

W_EXIT = lambda code: code << 8  # noqa: E731
W_SIG = lambda sig: sig  # noqa: E731
BASE = {"exec_done": True, "setup_error": None, "forced_reason": None, "oom_kills": 0, "cpu_s": 0.1, "timeout_s": 10}
JOB_ENDS = [
    # (wait status, changes to BASE, expected (state, reason, exit code, signal))
    (W_EXIT(0), {}, ("completed", "exit_code", 0, None)),
    (W_EXIT(3), {}, ("failed", "exit_code", 3, None)),
    (W_EXIT(1), {"compiler": True}, ("failed", "compile_error", 1, None)),  # the compiler's status: no program ran
    (W_SIG(9), {"compiler": True, "oom_kills": 1}, ("failed", "memory_limit", None, 9)),
    (W_SIG(9), {"compiler": True, "forced_reason": "timeout"}, ("failed", "timeout", None, 9)),
    (W_SIG(15), {}, ("failed", "signal", None, 15)),
    (W_SIG(9), {"forced_reason": "timeout"}, ("failed", "timeout", None, 9)),
    (W_SIG(9), {"forced_reason": "output_limit"}, ("failed", "output_limit", None, 9)),
    (W_SIG(9), {"forced_reason": "killed"}, ("failed", "killed", None, 9)),
    (W_SIG(9), {"oom_kills": 1}, ("failed", "memory_limit", None, 9)),
    (W_EXIT(0), {"oom_kills": 1}, ("failed", "memory_limit", 0, None)),  # a child was OOM-killed
    (W_SIG(signal.SIGXCPU), {}, ("failed", "cpu_limit", None, signal.SIGXCPU)),
    (W_SIG(9), {"cpu_s": 10.0}, ("failed", "cpu_limit", None, 9)),
    (W_SIG(9), {"cpu_s": 9.9}, ("failed", "signal", None, 9)),
    (W_EXIT(125), {"exec_done": False}, ("failed", "internal_error", None, None)),  # died before its execve
    (W_SIG(9), {"exec_done": False, "forced_reason": "killed"}, ("failed", "killed", None, 9)),  # deleted while starting
    (None, {"exec_done": False, "setup_error": "the queued request was malformed"}, ("failed", "internal_error", None, None)),
    (W_EXIT(0), {"setup_error": "cgroup accounting unreadable"}, ("failed", "internal_error", None, None)),
]


@pytest.mark.parametrize("wait_status, changes, expected", JOB_ENDS)
def test_job_end_is_a_table(wait_status, changes, expected):
    assert sandrun.job_end(wait_status, **{**BASE, **changes}) == expected


# Bounded work: globs, output walks, records --------------------------------------

HOSTILE_GLOBS = [
    ("*a" * 16 + "*b", "import os\nopen('a' * 250, 'w').write('x')"),
    ("/".join(["**", "*a*a*a*c"] * 4), "import os\nfor i in range(6):\n    os.makedirs('/'.join(['a' * 40] * (i + 1)), exist_ok=True)\n"
                                       "    open('/'.join(['a' * 40] * (i + 1)) + '/' + 'a' * 200, 'w').write('x')"),
    ("?" * 30 + "*", "import os\nfor i in range(2000):\n    open(f'{i:0250d}', 'w').write('x')"),
]


@pytest.mark.parametrize("glob, code", HOSTILE_GLOBS, ids=["stars", "double-stars", "many-files"])
def test_hostile_globs_cost_the_runner_linear_time(server, glob, code):
    runner = server.runner_pid()
    bystander = Bystander(server)
    started = time.monotonic()
    doc, _ = server.run(code, outputs=[glob] * 64)
    assert doc["status"] == "completed", doc
    assert time.monotonic() - started < 20, "collecting the outputs took the runner too long"
    bystander.check()
    _runner_unchanged(server, runner)


def test_a_glob_with_too_many_wildcards_is_refused(server):
    status, _, doc = server.json("POST", "/submit", {"code": "1", "interpreter": "python3", "outputs": ["*" * 33]})
    assert (status, doc["error"]) == (400, "invalid manifest"), doc
    assert server.run("open('x.txt', 'w')", outputs=["*" * 32])[0]["status"] == "completed"


def test_globs_match_as_documented(server):
    code = ("import os\nfor p in ['a.csv', 'x/y/b.csv', 'results/r1', 'results/sub/r2', 'z/results', 'q.txt', 'qq.txt']:\n"
            "    os.makedirs(os.path.dirname(p) or '.', exist_ok=True)\n    open(p, 'w').write(p)")
    doc, _ = server.run(code, outputs=["**/*.csv", "results/", "?.txt"])
    assert sorted(doc["output_files"]) == ["a.csv", "q.txt", "results/r1", "results/sub/r2", "x/y/b.csv"], doc


DEEP_TREES = [
    # (what the job leaves, outputs it must get, whether anything was left out)
    ("long names, 10 kB deep", "n = 'd' * 250\nfor i in range(40):\n    os.mkdir(n); os.chdir(n); open('f.txt', 'w').write('x')", 4, True),
    ("short names, 100 deep", "for i in range(100):\n    os.mkdir('d'); os.chdir('d'); open('f', 'w').write('x')", 31, True),
    ("within every cap", "for i in range(10):\n    os.mkdir('d'); os.chdir('d'); open('f', 'w').write('x')", 10, False),
]


@pytest.mark.parametrize("label, code, collected, truncated", DEEP_TREES, ids=[t[0] for t in DEEP_TREES])
def test_deep_trees_are_collected_within_caps(server, label, code, collected, truncated):
    runner = server.runner_pid()
    bystander = Bystander(server)
    doc, _ = server.run("import os\nos.chdir('/work')\n" + code)
    assert doc["status"] == "completed", doc
    listing = server.json("GET", f"/outputs/{doc['job_id']}")[2]
    assert (listing["total_files"], listing["outputs_truncated"]) == (collected, truncated), listing
    for name in list(doc["output_files"])[:3]:
        status, _, body = server.request("GET", f"/download/{doc['job_id']}/{name}")
        assert (status, body) == (200, b"x"), status
    bystander.check()
    _runner_unchanged(server, runner)
    _log_lacks(server, "d" * 250)


def test_many_long_output_names_keep_the_record_bounded(server):
    runner = server.runner_pid()
    bystander = Bystander(server)
    code = "for i in range(5000):\n    open(f'{i:0200d}', 'w').write('x')"
    doc, _ = server.run(code)
    assert doc["status"] == "completed", doc
    assert len(doc["output_files"]) == sandrun.OUTPUT_FILES_MAX
    listing = server.json("GET", f"/outputs/{doc['job_id']}")[2]
    assert listing["outputs_truncated"] is True
    record = os.path.join(server.state_dir, "runner", "jobs", doc["job_id"], "status.json")
    assert os.path.getsize(record) <= sandrun.STATUS_RECORD_MAX_BYTES
    with open(record) as f:
        text = f.read()
    assert text.count('"name": ') == sandrun.OUTPUT_FILES_MAX and "sha256_hash" not in text, "the list is held once"
    bystander.check()
    _runner_unchanged(server, runner)


def test_a_flood_of_files_does_not_stall_other_jobs(server):
    """The inode cap bounds the flood; the walk runs in slices while the victim runs and ends."""
    runner = server.runner_pid()
    bystander = Bystander(server)
    code = ("import os\nn = 0\ntry:\n    while True:\n        open(f'/work/{n}', 'w').close(); n += 1\n"
            "except OSError as e:\n    print(n, e.errno)\nfor d in ('/tmp', '/dev/shm'):\n    try:\n"
            "        for i in range(100000): open(f'{d}/{i}', 'w').close()\n    except OSError as e: print(d, e.errno)")
    doc, logs = server.run(code)
    assert doc["status"] == "completed", (doc, logs)
    made, err = logs["stdout"].split("\n")[0].split()
    assert int(made) < sandrun.JOB_WORKDIR_INODES_MAX and err == "28", logs  # ENOSPC: out of inodes
    assert "/tmp 28" in logs["stdout"] and "/dev/shm 28" in logs["stdout"], logs
    bystander.check()
    _runner_unchanged(server, runner)


# Recovery: nothing in the state directory can stop a runner start -------------------


def _restart_runner(server):
    old = server.runner_pid()
    os.kill(old, signal.SIGKILL)

    def new_and_healthy():
        try:
            return server.runner_pid() != old and server.request("GET", "/health")[0] == 200
        except ValueError:
            return False  # a new runner is starting: its pid is not written yet

    eventually(new_and_healthy, what="a new, healthy runner", interval=0.1)


def test_recovery_erases_what_it_cannot_read(server):
    jobs = os.path.join(server.state_dir, "runner", "jobs")
    finished = server.run("print('kept')")[0]
    junk = {
        "job-" + "1" * 32: b"{not json",
        "job-" + "2" * 32: b"[1, 2, 3]",
        "job-" + "3" * 32: b" " * (sandrun.STATUS_RECORD_MAX_BYTES + 1),
        "job-" + "4" * 32: json.dumps({"public": {"status": "completed"}}).encode(),
        "not-a-job": b"{}",
        "job-" + "5" * 32: None,  # a directory without a record
    }
    for name, data in junk.items():
        os.mkdir(os.path.join(jobs, name))
        if data is not None:
            with open(os.path.join(jobs, name, "status.json"), "wb") as f:
                f.write(data)
    expired = "job-" + "6" * 32
    os.mkdir(os.path.join(jobs, expired))
    with open(os.path.join(jobs, expired, "status.json"), "w") as f:
        f.write("x" * 100)  # never parsed: expired by its time stamp
    os.utime(os.path.join(jobs, expired, "status.json"), (0, 0))
    _restart_runner(server)
    # The new runner beats (healthy) before its recovery pass ends.
    eventually(lambda: not set(os.listdir(jobs)) & (set(junk) | {expired}), 10, "the recovery pass")
    status, _, doc = server.json("GET", f"/status/{finished['job_id']}")
    assert (status, doc["status"]) == (200, "completed")
    assert server.run("print('after')")[0]["status"] == "completed"


def test_poisoned_queue_entries_end_only_themselves(server):
    """What a compromised worker could queue: each entry is dropped, the runner carries on."""
    runner = server.runner_pid()
    bystander = Bystander(server)
    queue = os.path.join(server.state_dir, "http", "queue")
    entries = {}
    for i, kind in enumerate(("not an object", "deep tree", "fifo", "symlink")):
        name = f"{i:016d}.job-{0xbad0000 + i:032x}"  # never an id other tests use
        # Built beside the queue and renamed in whole, as a worker queues: the runner
        # must never see a half-built entry (it would erase it under our hands).
        path = os.path.join(server.state_dir, "http", "tmp", name)
        entries[name] = kind
        if kind == "symlink":
            os.symlink("/etc", path)
            os.rename(path, os.path.join(queue, name))
            continue
        os.mkdir(path)
        if kind == "not an object":
            with open(os.path.join(path, "request.json"), "w") as f:
                f.write("[]")
        elif kind == "fifo":
            os.mkfifo(os.path.join(path, "request.json"))
        else:
            fd = os.open(path, os.O_RDONLY)
            for _ in range(3000):  # deeper than any recursion limit
                os.mkdir("d", dir_fd=fd)
                sub = os.open("d", os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = sub
            os.close(fd)
        os.rename(path, os.path.join(queue, name))
    server.run("print('wake')")
    eventually(lambda: not set(os.listdir(queue)) & set(entries), what="the forged entries' removal", interval=0.1)
    bystander.check()
    _runner_unchanged(server, runner)


# The runner's own writes on a full state tmpfs -----------------------------------

SMALL_STATE = {
    **SUITE_ENV, "SANDRUN_STATE_TMPFS_BYTES": str(64 << 20), "SANDRUN_MAX_RUNNING": "1",
    "SANDRUN_JOB_WORKDIR_MAX_BYTES": str(16 << 20), "SANDRUN_OUTPUT_STREAM_MAX_BYTES": str(8 << 20),
    "SANDRUN_UPLOAD_MAX_BYTES": str(4 << 20), "SANDRUN_UNPACKED_MAX_BYTES": str(4 << 20), "SANDRUN_RESULT_TTL_S": "2",
}
BIG_JOB = ("import sys\nsys.stdout.write('o' * (7 << 20)); sys.stderr.write('e' * (7 << 20))\n"
           "open('big', 'wb').write(b'b' * (15 << 20))")


def _metric(server, name):
    body = server.request("GET", "/metrics")[2].decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def _stray_temporaries(server):
    return [os.path.join(root, n) for root, _, names in os.walk(os.path.join(server.state_dir, "runner")) for n in names if n.endswith(".tmp")]


def test_queued_jobs_cannot_fill_the_state():
    """Five queued jobs whose results together are far over the state's size: each starts
    when its share is free (earlier results expire), all of them end, nothing is left over."""
    srv = Server(SMALL_STATE, "small-state").start()
    try:
        runner = srv.runner_pid()
        ids = []
        while len(ids) < 5:  # intake may answer 503 while results take the space; the runner's record is what is tested
            status, _, doc = srv.json("POST", "/submit", {"code": BIG_JOB, "interpreter": "python3"})
            assert status in (202, 503), (status, doc)
            ids += [doc["job_id"]] if status == 202 else []
            time.sleep(0 if status == 202 else 0.5)
        for job_id in ids:
            doc = srv.wait(job_id, 120) if srv.json("GET", f"/status/{job_id}")[0] == 200 else None
            assert doc is None or doc["status"] == "completed", doc  # None: done and already expired
        eventually(lambda: os.listdir(os.path.join(srv.state_dir, "runner", "jobs")) == [], what="the expired results' erasing", interval=0.2)
        assert _metric(srv, "sandrun_jobs_finished_total") == 5
        assert _stray_temporaries(srv) == []
        assert _metric(srv, "sandrun_runner_restarts_total") == 0
        _runner_unchanged(srv, runner)
    finally:
        srv.stop()


def test_a_full_state_ends_jobs_not_the_runner():
    """The state tmpfs fills while a job writes (as a racing intake could fill it): the job ends
    with a clear reason, the runner stays, and once the space is back, jobs run again."""
    srv = Server(SMALL_STATE, "full-state").start()
    filler = os.path.join(srv.state_dir, "http", "tmp", "filler")
    try:
        runner = srv.runner_pid()
        job_id = srv.submit_code("import sys, time\nprint('up', flush=True)\ntime.sleep(1)\n" + BIG_JOB, wait=0)["job_id"]
        eventually(lambda: srv.json("GET", f"/logs/{job_id}")[2]["stdout"] == "up\n", what="the job's start")  # before the state is full
        fill(filler)
        doc = srv.wait(job_id)
        assert (doc["status"], doc["reason"]) in (("failed", "output_limit"), ("failed", "internal_error")), doc
        assert srv.json("GET", f"/logs/{job_id}")[0] == 200
        _runner_unchanged(srv, runner)
        assert srv.request("GET", "/health")[0] == 200
        os.unlink(filler)
        assert srv.run("print('again')")[0]["status"] == "completed"
        assert _stray_temporaries(srv) == []
        assert _metric(srv, "sandrun_runner_restarts_total") == 0
        _runner_unchanged(srv, runner)
    finally:
        if os.path.exists(filler):
            os.unlink(filler)
        srv.stop()


# A runner that stops beating is replaced ------------------------------------------


def test_a_stopped_runner_is_replaced_within_the_bound():
    stall_s = 3
    srv = Server({**SUITE_ENV, "SANDRUN_RUNNER_STALL_S": str(stall_s)}, "stall").start()
    try:
        old = srv.runner_pid()
        os.kill(old, signal.SIGSTOP)
        stopped = time.monotonic()
        while time.monotonic() - stopped < stall_s + 10:
            try:
                if srv.runner_pid() != old and srv.request("GET", "/health")[0] == 200:
                    break
            except ValueError:
                pass  # the new runner has not written its pid yet
            time.sleep(0.1)
        took = time.monotonic() - stopped
        assert srv.runner_pid() != old and took < stall_s + 3, took  # the bound README states
        assert not os.path.exists(f"/proc/{old}") or open(f"/proc/{old}/stat").read().split(") ")[1][0] == "Z"
        assert srv.run("print('after')")[0]["status"] == "completed"
        assert _metric(srv, "sandrun_runner_restarts_total") == 1
    finally:
        srv.stop()


# A jail's pid 1 holds no one else's data --------------------------------------------


def _memory_holds(pid, needle):
    """Whether any readable private mapping of a process holds `needle` (root reads /proc/pid/mem)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or fields[4] != "0" or (len(fields) > 5 and fields[5].startswith("[v")):
                continue  # unreadable, a file's pages, or the kernel's
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue  # a guard page
    return False


def test_spare_jails_hold_nothing_of_running_jobs(server):
    secret = "secret-" + os.urandom(12).hex()
    job_id = server.submit_code("import time\nprint('up', flush=True)\ntime.sleep(30)", wait=0, env={"MARK": secret}, stdin=secret)["job_id"]
    eventually(lambda: server.json("GET", f"/logs/{job_id}")[2]["stdout"] == "up\n", what="the job's start")
    server.run("print(1)")  # another job: the spare it used is rebuilt while the first one runs
    time.sleep(0.5)
    runner = server.runner_pid()
    assert _memory_holds(runner, secret.encode()), "the runner holds the job: the test would prove nothing"
    spares = [pid for pid in descendants(runner) if open(f"/proc/{pid}/comm").read().strip() == "sandrun-jail"
              and f"Uid:\t{sandrun.JOB_UID}\t" in open(f"/proc/{pid}/status").read() and not descendants(pid)]
    assert spares, "no spare jail to look at"
    for pid in spares:
        assert not _memory_holds(pid, secret.encode()), "a spare jail holds another job's data"
    assert server.json("DELETE", f"/jobs/{job_id}")[0] == 204


def test_a_job_sees_nothing_of_the_host_in_its_init(server):
    code = ("print(open('/proc/1/cmdline', 'rb').read())\ntry:\n    open('/proc/1/environ', 'rb').read(); print('environ readable')\n"
            "except OSError as e:\n    print('environ', e.errno)")
    doc, logs = server.run(code)
    assert logs["stdout"] == "b'sandrun-jail\\x00'\nenviron 13\n", logs


# Containment when the runner's own step for a job fails ------------------------------


def test_a_failed_step_ends_only_its_job(server):
    """A real fault from outside (the job's results directory removed under the runner):
    the runner's step for that job fails, the job ends, the runner and every other job go on."""

    runner = server.runner_pid()
    bystander = Bystander(server)
    job_id = server.start_sleeper(2)
    shutil.rmtree(os.path.join(server.state_dir, "runner", "jobs", job_id))
    eventually(lambda: server.json("GET", f"/status/{job_id}")[0] == 404, what="the job's end", interval=0.2)
    bystander.check()
    _runner_unchanged(server, runner)
    with open(server.log_path) as f:
        log = f.read()
    assert f"event=job_step_failed job={job_id}" in log, log[-3000:]


# Nothing outlives the master ---------------------------------------------------------


def test_ctrl_c_stops_the_server_in_order():
    """A terminal's ^C signals the whole foreground process group: only the master acts on it,
    and it stops the runner itself; no part of the server treats it as a crash."""
    srv = Server(SUITE_ENV, "ctrl-c").start()
    job_id = srv.start_sleeper(60)
    os.killpg(srv.proc.pid, signal.SIGINT)
    srv.proc.wait(timeout=30)
    log = srv.output()
    srv.stop()  # exited already: this checks that nothing is left
    assert "event=runner_died" not in log and "event=server_stopped" in log, (job_id, log)


def test_nothing_outlives_a_killed_master_even_a_stuck_runner():


    srv = Server(SUITE_ENV, "orphans").start()
    job_id = srv.start_sleeper(60)
    runner = srv.runner_pid()
    ours = set(descendants(srv.proc.pid))
    assert len(ours) >= 6, ours  # workers, keeper, runner, factory, spares and the job's jail
    os.kill(runner, signal.SIGSTOP)  # stuck: it runs no handler
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    # The keeper's grace for a runner that ignores SIGTERM, and a margin.
    living = lambda: [p for p in ours if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"]  # noqa: E731
    eventually(lambda: not living(), 15, f"the death of every process of job {job_id} with the master", interval=0.2)
    # The master could not clean up: do what its exit would have done, then check nothing else is left.
    subprocess.run(["umount", "-l", srv.state_dir], check=True)
    for top in (p for p in leftovers(srv) if p.startswith("/sys/fs/cgroup")):
        for path in [os.path.join(top, d) for d in next(os.walk(top))[1]] + [top]:  # job cgroups, then the server's
            for _ in range(100):  # the killed jails' cgroups empty in a moment
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    time.sleep(0.05)
    srv.log.close()
    # Zombies are left to whoever adopted them (this machine's pid 1); they hold nothing.
    assert [p for p in leftovers(srv) if not p.startswith("state entries") and not p.endswith("state=Z")] == []
    shutil.rmtree(srv.workdir)
