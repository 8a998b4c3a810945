"""Every per-job limit is enforced, each with its twin."""

import json
import time

from conftest import SUITE_ENV, Server, eventually, make_tar


def test_timeout_kills_the_whole_job(server):
    started = time.monotonic()
    doc, logs = server.run("(sleep 100 &); sleep 100 & echo started; sleep 100", "bash", timeout=1)
    assert (doc["status"], doc["reason"], doc["signal"], doc["exit_code"]) == ("failed", "timeout", 9, None), doc
    assert logs["stdout"] == "started\n"
    assert 1000 <= doc["execution_metadata"]["wall_time_ms"] < 10_000
    assert time.monotonic() - started < 30


def test_fractional_timeout_is_honoured_and_short_jobs_finish(server):
    doc, _ = server.run("import time; time.sleep(0.1)", timeout=5)
    assert doc["status"] == "completed", doc
    doc, _ = server.run("import time; time.sleep(5)", timeout=0.5)
    assert doc["reason"] == "timeout", doc


def test_memory_limit_is_reported(server):
    doc, _ = server.run("x = bytearray(200 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])", memory_mb=64)
    assert (doc["status"], doc["reason"]) == ("failed", "memory_limit"), doc
    assert doc["execution_metadata"]["memory_peak_bytes"] <= 64 * 1024 * 1024
    doc, _ = server.run("x = bytearray(20 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])", memory_mb=64)
    assert doc["status"] == "completed", doc


def test_tmpfs_writes_count_against_memory(server):
    doc, _ = server.run("dd if=/dev/zero of=/dev/shm/fill bs=1M count=60 2>/dev/null; echo done", "bash", memory_mb=32)
    assert doc["reason"] == "memory_limit", doc


def test_node_heap_blowup_is_contained(server):
    doc, logs = server.run("const a = []; for (;;) a.push(new Array(1e6).fill(1));", "node", memory_mb=128, timeout=30)
    # node gives up at its own heap limit (abort) or the cgroup kills it; either way it ends, not the host
    assert doc["status"] == "failed" and doc["reason"] in ("memory_limit", "signal", "exit_code"), (doc, logs)
    assert doc["execution_metadata"]["memory_peak_bytes"] <= 128 * 1024 * 1024
    assert server.json("GET", "/health")[0] == 200


def test_fork_bomb_is_contained_by_pids(server):
    doc, logs = server.run("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30); os._exit(0)\n"
                           "        n += 1\nexcept OSError as e:\n    print('stopped at', n, e.errno)", timeout=20)
    assert doc["status"] == "completed", (doc, logs)
    count, err = logs["stdout"].split()[2:]
    assert int(count) < 32 and err == "11", logs  # EAGAIN from the pids cgroup
    status, _, health = server.json("GET", "/health")
    assert status == 200


def test_shell_fork_bomb_ends_by_timeout_and_leaves_nothing(server):
    doc, _ = server.run(":(){ :|:& };:; sleep 5", "bash", timeout=3)
    assert doc["status"] == "failed" and doc["reason"] in ("timeout", "exit_code"), doc


def test_output_flood_is_cut_at_the_cap(server):
    doc, logs = server.run("yes sandrun", "bash", timeout=60)
    assert (doc["status"], doc["reason"]) == ("failed", "output_limit"), doc
    assert logs["stdout_truncated"] is True and logs["stderr_truncated"] is False
    assert len(logs["stdout"].encode()) == 10 * 1024 * 1024


def test_output_under_the_cap_is_whole(server):
    doc, logs = server.run("import sys; sys.stdout.write('x' * (9 * 1024 * 1024))")
    assert doc["status"] == "completed" and len(logs["stdout"]) == 9 * 1024 * 1024 and not logs["stdout_truncated"]


def test_stderr_flood_is_cut_too(server):
    doc, logs = server.run("yes err >&2", "bash")
    assert doc["reason"] == "output_limit" and logs["stderr_truncated"] is True


def test_disk_fill_is_stopped(server):
    code = ("import errno\ntry:\n    with open('big', 'wb') as f:\n        for _ in range(200): f.write(b'0' * (1 << 20))\n"
            "except OSError as e: print('stopped', errno.errorcode[e.errno])")
    doc, logs = server.run(code, outputs=[])
    assert logs["stdout"] in ("stopped ENOSPC\n", "stopped EFBIG\n"), (doc, logs)
    doc, logs = server.run("open('/tmp/t', 'wb').write(b'0' * (100 << 20))", memory_mb=512, outputs=[])
    assert doc["status"] == "failed" and "No space left" in logs["stderr"], (doc, logs)


def test_sparse_file_cannot_outgrow_the_work_dir(server):
    doc, logs = server.run("import os\nwith open('s', 'wb') as f:\n    try: f.truncate(1 << 40)\n    except OSError as e: print(e.errno)", outputs=[])
    assert logs["stdout"] == "27\n", (doc, logs)  # EFBIG from RLIMIT_FSIZE; SIGXFSZ would have killed it


def test_open_files_are_capped(server):
    doc, logs = server.run("import os\nn = 0\ntry:\n    while True: os.open('/dev/null', os.O_RDONLY); n += 1\n"
                           "except OSError as e: print(n < 256, e.errno)")
    assert logs["stdout"] == "True 24\n", logs  # EMFILE


def test_one_cpu_of_bandwidth(server):
    code = ("import threading, time, resource\ndef spin():\n    end = time.time() + 2\n    while time.time() < end: pass\n"
            "ts = [threading.Thread(target=spin) for _ in range(2)]\n[t.start() for t in ts]; [t.join() for t in ts]")
    doc, _ = server.run(code)
    meta = doc["execution_metadata"]
    assert meta["cpu_seconds"] <= meta["wall_time_ms"] / 1000 * 1.15 + 0.1, meta


def test_queue_is_fifo_with_real_positions_and_deletable(server):
    sleepers = [server.submit_code("import time; time.sleep(30)", wait=0) for _ in range(2)]
    eventually(lambda: all(server.json("GET", f"/status/{s['job_id']}")[2]["status"] == "running" for s in sleepers), 20, "both sleepers' start")
    first = server.submit_code("print('first')", wait=0)
    second = server.submit_code("print('second')", wait=0)
    assert (first["status"], first["position"], second["position"]) == ("queued", 1, 2), (first, second)
    assert server.json("GET", f"/status/{second['job_id']}")[2]["queue_position"] == 2
    _, _, stats = server.json("GET", "/stats")
    assert stats["system"] == {"queued": 2, "running": 2}, stats
    assert server.request("DELETE", f"/jobs/{first['job_id']}")[0] == 204
    assert server.json("GET", f"/status/{second['job_id']}")[2]["queue_position"] == 1
    for route in (f"/status/{first['job_id']}", f"/logs/{first['job_id']}", f"/outputs/{first['job_id']}"):
        assert server.request("GET", route)[0] == 404
    for s in sleepers:
        assert server.request("DELETE", f"/jobs/{s['job_id']}")[0] == 204
    assert server.wait(second["job_id"])["status"] == "completed"


def test_full_state_storage_is_503_not_an_error_and_recovers():
    """Queued uploads fill a small state tmpfs: intake answers 503 'storage full', never 400 or 500."""

    # 320 MiB: room for one running job's results and the runner (133 MiB) and what one upload may write (129 MiB)
    srv = Server({**SUITE_ENV, "SANDRUN_STATE_TMPFS_BYTES": str(320 << 20), "SANDRUN_MAX_RUNNING": "1"}, "small").start()
    try:
        sleeper = srv.submit_code("import time; time.sleep(60)", wait=0)
        zeros = make_tar([("main.py", "file", b"pass"), ("zeros", "file", bytes(99 << 20))], "w:gz")
        answers, queued = [], []
        for _ in range(4):
            status, _, body = srv.submit_files([("z.tar.gz", zeros)], {"entrypoint": "main.py"}, wait=0)
            answers.append(status)
            if status == 202:
                queued.append(json.loads(body)["job_id"])
            else:
                doc = json.loads(body)
                assert doc["error"] == "storage full", doc
        assert answers[0] == 202 and answers[-1] == 503, answers
        for job_id in queued + [sleeper["job_id"]]:
            assert srv.request("DELETE", f"/jobs/{job_id}")[0] == 204
        status, _, body = srv.submit_files([("z.tar.gz", zeros)], {"entrypoint": "main.py", "outputs": []}, wait=30)
        assert status == 200 and json.loads(body)["status"] == "completed", body
    finally:
        srv.stop()


def test_full_queue_is_503_with_retry_after():

    srv = Server({**SUITE_ENV, "SANDRUN_MAX_QUEUED": "1", "SANDRUN_MAX_RUNNING": "1"}, "queue").start()
    try:
        running = srv.submit_code("import time; time.sleep(60)", wait=0)
        eventually(lambda: srv.json("GET", f"/status/{running['job_id']}")[2]["status"] == "running", 20, "the first job's start")
        queued = srv.submit_code("print('waited')", wait=0)
        status, headers, doc = srv.json("POST", "/submit", {"code": "print(1)", "interpreter": "python3"})
        assert status == 503 and doc["error"] == "queue full" and int(headers["retry-after"]) > 0, doc
        assert srv.request("DELETE", f"/jobs/{running['job_id']}")[0] == 204
        assert srv.wait(queued["job_id"])["status"] == "completed"
        assert srv.json("POST", "/submit", {"code": "print(1)", "interpreter": "python3"})[0] == 202
    finally:
        srv.stop()
