"""The HTTP contract: routes, methods, shapes, errors, CORS."""

import collections
import json
import os
import pwd
import socket
import threading
import time

import pytest

import sandrun
from conftest import descendants, eventually, multipart

JOB_ID = "job-" + "0" * 32


def test_info(server):
    status, headers, doc = server.json("GET", "/")
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    assert doc["service"] == "sandrun" and doc["status"] == "running"
    assert {"python3", "node", "bash"} <= set(doc["interpreters"])
    assert all(isinstance(v, str) and v for v in doc["interpreters"].values())
    assert set(doc["limits"]) == {"timeout_seconds_max", "memory_mb_max", "cpu_seconds_per_minute",
                                  "concurrent_jobs_per_ip", "jobs_per_hour_per_ip", "upload_bytes_max"}
    assert set(doc["queue"]) == {"queued", "running"}
    assert doc["node"] == "" and set(doc["languages"]) == set(doc["interpreters"])  # a lone server; its languages (test_data_stack)


def test_submit_202_shape_and_location(server):
    status, headers, doc = server.json("POST", "/submit", {"code": "print(1)", "interpreter": "python3"})
    assert status == 202, doc
    assert set(doc) == {"job_id", "status", "position", "status_url"} and doc["status"] == "queued"
    assert len(doc["job_id"]) == 36 and doc["job_id"].startswith("job-")
    assert headers["location"] == doc["status_url"] == f"/status/{doc['job_id']}"
    assert server.wait(doc["job_id"])["status"] == "completed"


def test_status_shape(server):
    doc = server.submit_code("print(1)")
    assert set(doc) == {"job_id", "status", "queue_position", "reason", "exit_code", "signal", "execution_metadata",
                        "output_files", "created_at", "started_at", "finished_at", "expires_at"}
    assert set(doc["execution_metadata"]) == {"cpu_seconds", "memory_peak_bytes", "wall_time_ms", "exit_code", "interpreter"}


def test_submit_wait_returns_202_if_the_job_is_still_running(server):
    status, _, doc = server.json("POST", "/submit?wait=0.5", {"code": "import time; time.sleep(3)", "interpreter": "python3"})
    assert status == 202 and doc["status"] == "queued"
    status, _, running = server.json("GET", f"/status/{doc['job_id']}?wait=0.2")
    assert status == 200 and running["status"] in ("queued", "running") and running["reason"] is None
    assert server.wait(doc["job_id"])["status"] == "completed"


@pytest.mark.parametrize("wait", ["-1", "61", "abc", "nan"])
def test_bad_wait_is_400(server, wait):
    status, _, doc = server.json("GET", f"/status/{JOB_ID}?wait={wait}")
    assert status == 400 and "wait" in doc["details"]


@pytest.mark.parametrize("route", ["/status/", "/logs/", "/outputs/", "/download/"])
@pytest.mark.parametrize("job_id", [JOB_ID, "job-xyz", "../etc", "job-" + "0" * 31 + "g"])
def test_unknown_job_is_404_on_every_route(server, route, job_id):
    status, _, body = server.request("GET", route + job_id)
    assert status == 404 and json.loads(body)["error"] == "not found"


def test_unknown_route_404_and_wrong_method_405(server):
    status, _, doc = server.json("GET", "/nope")
    assert status == 404 and set(doc) == {"error", "details"}
    status, headers, doc = server.json("GET", "/submit")
    assert status == 405 and "POST" in headers["allow"] and doc["error"] == "method not allowed"
    status, headers, _ = server.json("POST", "/health")
    assert status == 405
    status, _, _ = server.request("DELETE", f"/status/{JOB_ID}")
    assert status == 405


def test_wrong_content_type_is_415(server):
    status, _, body = server.request("POST", "/submit", b"print(1)", {"Content-Type": "text/plain"})
    assert status == 415 and json.loads(body)["error"] == "unsupported media type"
    status, _, body = server.request("POST", "/submit", b"")
    assert status == 415


def test_multipart_without_manifest_or_files_is_400(server):

    body, ctype = multipart({"manifest": '{"entrypoint": "a.py"}'}, [])
    status, _, data = server.request("POST", "/submit", body, {"Content-Type": ctype})
    assert status == 400 and b"'files'" in data
    body, ctype = multipart({}, [("a.py", b"1")])
    status, _, data = server.request("POST", "/submit", body, {"Content-Type": ctype})
    assert status == 400 and b"'manifest'" in data
    body, ctype = multipart({"manifest": '{"entrypoint": "a.py"}', "extra": "1"}, [("a.py", b"1")])
    status, _, data = server.request("POST", "/submit", body, {"Content-Type": ctype})
    assert status == 400 and b"extra" in data
    status, _, data = server.request("POST", "/submit", b"garbage", {"Content-Type": "multipart/form-data; boundary=zz"})
    assert status == 400


def test_cors_on_every_response_and_preflight(server):
    for method, path in (("GET", "/"), ("GET", "/nope"), ("GET", f"/status/{JOB_ID}"), ("POST", "/health")):
        _, headers, _ = server.request(method, path)
        assert headers["access-control-allow-origin"] == "*", (method, path)
    for path in ("/", "/submit", f"/status/{JOB_ID}", f"/download/{JOB_ID}/a/b.txt", f"/jobs/{JOB_ID}", "/stats", "/health"):
        status, headers, _ = server.request("OPTIONS", path, headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST"})
        assert status == 204 and headers["access-control-allow-origin"] == "*", path
        assert "OPTIONS" in headers["access-control-allow-methods"]
    _, headers, _ = server.request("OPTIONS", "/submit")
    assert "POST" in headers["access-control-allow-methods"] and "Content-Type" in headers["access-control-allow-headers"]


def test_head_follows_get(server):
    status, headers, body = server.request("HEAD", "/health")
    assert status == 200 and body == b""


def test_health_and_stats(server):
    status, _, doc = server.json("GET", "/health")
    assert (status, doc) == (200, {"status": "healthy"})
    status, _, doc = server.json("GET", "/stats")
    assert set(doc["your_quota"]) == {"active_jobs", "concurrent_limit", "jobs_this_hour", "jobs_per_hour_limit",
                                      "cpu_seconds_used", "cpu_seconds_limit", "can_submit", "reason"}
    assert set(doc["system"]) == {"queued", "running"}


def test_delete_finished_job_erases_everything(server):
    doc, _ = server.run("open('o.txt','w').write('x'); print('hi')")
    job = doc["job_id"]
    status, _, body = server.request("DELETE", f"/jobs/{job}")
    assert status == 204 and body == b""
    for route in ("/status/", "/logs/", "/outputs/", "/download/"):
        assert server.request("GET", route + job)[0] == 404
    assert server.request("GET", f"/download/{job}/o.txt")[0] == 404
    assert server.request("DELETE", f"/jobs/{job}")[0] == 404
    eventually(lambda: not os.path.exists(os.path.join(server.state_dir, "runner", "jobs", job)), 10, "the runner's erasing the job")


def test_delete_running_job_kills_it(server):
    job_id = server.start_sleeper()
    assert server.request("DELETE", f"/jobs/{job_id}")[0] == 204
    assert server.request("GET", f"/status/{job_id}")[0] == 404
    eventually(lambda: server.json("GET", "/stats")[2]["system"]["running"] == 0, 10, "the deleted job's end")


def test_delete_at_any_moment_of_a_start_leaves_the_runner_alone(server):
    """A job deleted before its jail has read its job message kills only that jail.

    Back-to-back starts take spare jails that are still being built, so the
    deletes land in every phase: queued, assigned, reading, running.
    """
    for i in range(30):
        docs = [server.submit_code("import time; time.sleep(20)", wait=0) for _ in range(3)]
        time.sleep(i % 5 * 0.005)
        for doc in docs:
            assert server.request("DELETE", f"/jobs/{doc['job_id']}")[0] == 204
    doc, logs = server.run("print('still here')")
    assert (doc["status"], logs["stdout"]) == ("completed", "still here\n"), doc
    with open(server.log_path) as f:
        assert "runner_died" not in f.read()


def test_logs_while_running(server):
    doc = server.submit_code("import time\nprint('one', flush=True)\ntime.sleep(2)\nprint('two')", wait=0)
    eventually(lambda: server.json("GET", f"/logs/{doc['job_id']}")[2]["stdout"] == "one\n", 20, "the first line")
    assert server.json("GET", f"/status/{doc['job_id']}")[2]["status"] == "running"
    assert server.wait(doc["job_id"])["status"] == "completed"
    assert server.json("GET", f"/logs/{doc['job_id']}")[2]["stdout"] == "one\ntwo\n"


def test_download_headers_are_safe(server):
    doc, _ = server.run("open('page.html', 'w').write('<script>alert(1)</script>'); open('we\"ird name;.txt', 'w').write('w')")
    job = doc["job_id"]
    _, headers, _ = server.request("GET", f"/download/{job}/page.html")
    assert headers["content-security-policy"].startswith("sandbox") and headers["x-content-type-options"] == "nosniff"
    assert headers["content-disposition"].startswith("attachment;")
    status, headers, data = server.request("GET", f"/download/{job}/we%22ird%20name%3B.txt")
    assert status == 200 and data == b"w"
    assert headers["content-disposition"] == "attachment; filename=\"we_ird_name_.txt\"; filename*=UTF-8''we%22ird%20name%3B.txt"


def test_no_client_address_or_job_content_in_the_log(server):
    doc, _ = server.run("print('SECRET-CONTENT-1234')", source="127.0.0.5")
    # Written just after the answer.
    eventually(lambda: f"job={doc['job_id']} state=completed" in server.output(), 10, "the log line of the job's end")
    log = server.output()
    assert "127.0.0.5" not in log and "SECRET-CONTENT-1234" not in log


# Class G: service-layer abuse ---------------------------------------------------------


def test_oversized_request_line_and_headers_are_refused(server):
    status, _, _ = server.request("GET", "/status/" + "a" * 9000)
    assert status in (400, 414)
    # gunicorn answers these itself, before the app: 400 or 431, in its own plain-text form
    status, _, _ = server.request("GET", "/health", headers={f"X-H{i}": "v" for i in range(100)})
    assert status in (400, 431)
    status, _, _ = server.request("GET", "/health", headers={"X-Big": "v" * 9000})
    assert status in (400, 431)
    assert server.json("GET", "/health")[0] == 200


def test_content_length_larger_than_the_body_does_not_hang_a_worker(server):

    with socket.create_connection(("127.0.0.1", server.port), timeout=40) as s:
        s.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"code\"")
        s.shutdown(socket.SHUT_WR)
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert server.json("GET", "/health")[0] == 200


def test_parked_long_polls_do_not_starve_the_service(server):

    doc = server.submit_code("import time; time.sleep(4)", wait=0)
    results = []
    poll = lambda: results.append(server.json("GET", f"/status/{doc['job_id']}?wait=60")[2]["status"])  # noqa: E731
    pollers = [threading.Thread(target=poll) for _ in range(12)]
    for t in pollers:
        t.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert server.json("GET", "/health")[0] == 200
    assert time.monotonic() - started < 2
    for t in pollers:
        t.join(60)
    assert results == ["completed"] * 12


def test_long_poll_outlasts_the_worker_timeout(server):
    """gunicorn's worker timeout is 30 s; a ?wait may hold a request for up to 60 s."""
    started = time.monotonic()
    status, _, doc = server.json("POST", "/submit?wait=60", {"code": "import time; time.sleep(35)", "interpreter": "python3"})
    assert status == 200 and doc["status"] == "completed", doc
    assert 35 <= time.monotonic() - started < 60
    with open(server.log_path) as f:
        assert "WORKER TIMEOUT" not in f.read()


def test_each_process_names_its_role_and_only_four_keep_root(server):
    """Master, keeper, runner and the runner's jail factory are root; the workers are the HTTP
    user; a spare jail (its own session, the runner's child) has dropped to the job's user before any job."""

    def roles():
        found = collections.Counter()
        group = []
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                if os.getpgid(pid) == server.proc.pid:
                    group.append(pid)
            except ProcessLookupError:
                continue  # exited while we looked
        for pid in set(group) | set(descendants(server.runner_pid())):  # no job runs: the runner's are the spare's
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(line.split(":\t", 1) for line in f.read().splitlines())
            except FileNotFoundError:
                continue
            found[status["Name"], int(status["Uid"].split()[1])] += 1  # effective uid
        return found

    http_uid = pwd.getpwnam(sandrun.HTTP_USER).pw_uid
    expected = {("sandrun-master", 0): 1, ("sandrun-keeper", 0): 1, ("sandrun-runner", 0): 1, ("sandrun-factory", 0): 1,
                ("sandrun-jail", sandrun.JOB_UID): sandrun.SPARE_JAILS, ("sandrun-http", http_uid): sandrun.HTTP_WORKERS}  # spare jails, built ahead
    # A worker that has not served yet may still be starting.
    eventually(lambda: roles() == expected, 10, f"the roles {expected}", interval=0.1)
