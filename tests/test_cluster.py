"""Past one machine: three real Sandrun nodes behind a real nginx with the shipped cluster site
(image/nginx/sandrun-cluster.conf, its node list written by image/nginx/sandrun-cluster-nodes).

Clients are told apart by their loopback source address; every request goes through the front.
"""

import http.client
import json
import os
import subprocess
import threading
import time

import pytest
from conftest import ROOT, SUITE_ENV, Nginx, Server, eventually

NODES = ("a", "b", "c")
#: Small enough to reach in a test: 2 jobs at once and 8 an hour per client, on whichever node.
LIMITS = {"SANDRUN_RATE_CONCURRENT_JOBS": "2", "SANDRUN_RATE_JOBS_PER_HOUR": "8"}


def node_of(job_id):
    return job_id.split("-")[1]


@pytest.fixture(scope="module")
def cluster():
    nodes = {}
    try:
        for name in NODES:  # each believes the front's address (loopback) for X-Forwarded-For
            nodes[name] = Server({**SUITE_ENV, **LIMITS, "SANDRUN_NODE": name, "SANDRUN_FORWARDED_ALLOW_IPS": "127.0.0.1"},
                                 f"node-{name}").start()
        listing = subprocess.run(["sh", f"{ROOT}/image/nginx/sandrun-cluster-nodes", *(f"{n}=127.0.0.1:{s.port}" for n, s in nodes.items())],
                                 check=True, capture_output=True, text=True).stdout
        front = Nginx(nodes["a"].workdir, "sandrun-cluster.conf", {}, files={"sandrun-nodes.conf": listing})
        yield front, nodes
        front.stop()
    finally:
        for server in nodes.values():
            if server.proc.poll() is None:
                server.stop()


def test_a_job_is_read_and_deleted_through_the_front(cluster):
    front, nodes = cluster
    doc = front.submit_code("open('out.txt', 'w').write('hi')\nprint('done')", source="127.0.20.1")
    job_id = doc["job_id"]
    assert doc["status"] == "completed" and job_id.startswith("job-") and node_of(job_id) in NODES, doc
    assert len(job_id) == len("job-a-") + 32
    assert front.json("GET", f"/logs/{job_id}")[2]["stdout"] == "done\n"
    assert [f["name"] for f in front.json("GET", f"/outputs/{job_id}")[2]["files"]] == ["out.txt"]
    assert front.request("GET", f"/download/{job_id}/out.txt")[2] == b"hi"
    assert front.request("GET", f"/download/{job_id}")[0] == 200
    assert nodes[node_of(job_id)].json("GET", f"/status/{job_id}")[0] == 200  # it lives on the node its id names
    for other in set(NODES) - {node_of(job_id)}:
        assert nodes[other].json("GET", f"/status/{job_id}")[0] == 404  # and nowhere else
    assert front.request("DELETE", f"/jobs/{job_id}")[0] == 204
    assert front.json("GET", f"/status/{job_id}")[0] == 404
    status, _, doc = front.json("GET", "/status/job-zz-" + "0" * 32)  # no such node: no such job, in the contract's shape
    assert status == 404 and doc["error"] == "not found", doc
    blob = os.urandom(3 << 20)  # an upload, buffered by the front and passed to the client's node
    status, _, body = front.submit_files([("main.py", b"print(len(open('blob.bin', 'rb').read()))"), ("blob.bin", blob)],
                                         {"entrypoint": "main.py"}, source="127.0.20.1")
    doc = json.loads(body)
    assert status == 200 and node_of(doc["job_id"]) == node_of(job_id), doc
    assert front.json("GET", f"/logs/{doc['job_id']}")[2]["stdout"] == f"{len(blob)}\n"


def test_each_node_says_its_name(cluster):
    _, nodes = cluster
    for name, server in nodes.items():
        assert server.json("GET", "/")[2]["node"] == name
        metrics = server.request("GET", "/metrics")[2].decode()
        assert f'sandrun_jobs_queued{{node="{name}"}} ' in metrics, metrics
        assert f'sandrun_job_wall_seconds_bucket{{le="+Inf",node="{name}"}} ' in metrics, metrics


def test_clients_spread_over_every_node_and_each_stays_on_one(cluster):
    front, _ = cluster
    placed = {}
    for i in range(1, 31):
        source = f"127.0.21.{i}"
        first = front.submit_code("print(1)", wait=0, source=source)["job_id"]
        second = front.submit_code("print(2)", wait=0, source=source)["job_id"]
        assert node_of(first) == node_of(second), (first, second)  # one client, one node
        placed[source] = node_of(first)
        assert front.json("GET", "/stats", source=source)[2]["your_quota"]["jobs_this_hour"] == 2  # its node's count
        for job_id in (first, second):
            front.wait(job_id)
    assert set(placed.values()) == set(NODES), placed


def test_one_clients_limits_hold_across_the_cluster(cluster):
    front, _ = cluster
    source = "127.0.22.1"
    sleepers = [front.start_sleeper(30, source=source) for _ in range(2)]
    status, headers, doc = front.json("POST", "/submit", {"code": "print(3)", "interpreter": "python3"}, source=source)
    assert status == 429 and doc["reason"] == "concurrent_jobs" and "retry-after" in headers, doc
    for job_id in sleepers:
        assert front.request("DELETE", f"/jobs/{job_id}")[0] == 204
    eventually(lambda: front.json("GET", "/stats", source=source)[2]["your_quota"]["active_jobs"] == 0, what="the deleted jobs' end")
    for _ in range(6):  # 8 an hour: 2 sleepers and 6 more
        front.submit_code("print(4)", source=source)
    status, _, doc = front.json("POST", "/submit", {"code": "print(5)", "interpreter": "python3"}, source=source)
    assert status == 429 and doc["reason"] == "jobs_per_hour", doc


def test_live_logs_and_long_polls_pass_through_the_front(cluster):
    front, _ = cluster
    source = "127.0.23.1"
    doc = front.submit_code("import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('last')", wait=0, source=source)
    conn_started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30, source_address=(source, 0))
    conn.request("GET", f"/logs/{doc['job_id']}?follow=1")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    seen = b""
    while b"first" not in seen:
        seen += response.read1(4096)
    assert time.monotonic() - conn_started < 3  # the front passed it on while the job still ran
    status, _, done = front.json("GET", f"/status/{doc['job_id']}?wait=30", source=source)
    assert status == 200 and done["status"] == "completed", done
    while chunk := response.read1(4096):
        seen += chunk
    conn.close()
    assert b"last" in seen and b"event: status" in seen


def test_a_node_down_answers_503_for_its_jobs_and_new_jobs_go_elsewhere(cluster):
    """Last: it stops node b for good."""
    front, nodes = cluster
    placed = {}
    for i in range(1, 31):
        source = f"127.0.24.{i}"
        placed[source] = front.submit_code("print('kept')", source=source)["job_id"]
    lost = {s: job_id for s, job_id in placed.items() if node_of(job_id) == "b"}
    assert lost, placed
    bystander_done = threading.Event()

    def bystander():  # a client of node a keeps running jobs while b goes
        source = next(s for s, job_id in placed.items() if node_of(job_id) == "a")
        for _ in range(3):
            assert front.submit_code("print('still')", source=source)["status"] == "completed"
        bystander_done.set()

    thread = threading.Thread(target=bystander)
    thread.start()
    nodes["b"].stop()
    thread.join(60)
    assert bystander_done.is_set()
    for source, job_id in lost.items():
        status, headers, doc = front.json("GET", f"/status/{job_id}", source=source)
        assert status == 503 and doc["error"] == "unavailable" and headers["retry-after"] == "5", (status, doc)
        assert front.json("GET", f"/logs/{job_id}", source=source)[0] == 503
    for source in lost:  # b's clients start afresh on the nodes that are up
        doc = front.submit_code("print('moved')", source=source)
        assert doc["status"] == "completed" and node_of(doc["job_id"]) in ("a", "c"), doc
    for job_id in placed.values():
        if node_of(job_id) != "b":
            assert json.loads(front.request("GET", f"/logs/{job_id}")[2])["stdout"] == "kept\n"


def test_settings_come_from_systemd_credentials_when_the_environment_lacks_them(tmp_path):
    """How an appliance is made a node without changing its disk: credentials sandrun.<setting>."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    for name, value in {"node": "cred", "rate_jobs_per_hour": "7\n", "rate_concurrent_jobs": "9"}.items():
        (creds / f"sandrun.{name}").write_text(value)
    env = {k: v for k, v in SUITE_ENV.items() if k != "SANDRUN_RATE_JOBS_PER_HOUR"}
    server = Server({**env, "CREDENTIALS_DIRECTORY": str(creds), "SANDRUN_RATE_CONCURRENT_JOBS": "3"}, "credentials")
    server.env.pop("SANDRUN_RATE_JOBS_PER_HOUR", None)  # nor from this shell
    server.start()
    try:
        info = server.json("GET", "/")[2]
        assert info["node"] == "cred" and info["limits"]["concurrent_jobs_per_ip"] == 3, info  # the environment wins
        assert info["limits"]["jobs_per_hour_per_ip"] == 7, info
        assert node_of(server.submit_code("print(1)")["job_id"]) == "cred"
    finally:
        server.stop()
    (creds / "sandrun.node").write_text("a" * 5000)  # refused whole, never cut to a shorter value
    with pytest.raises(AssertionError, match="credential sandrun.node is over 4096 bytes"):
        Server({**env, "CREDENTIALS_DIRECTORY": str(creds)}, "credentials-long").start()
