"""Per-client limits with the default settings; 127.0.0.x are distinct clients."""

import os
import time

import pytest

import sandrun
from conftest import Server, eventually

SLEEP = "import time; time.sleep(20)"


def submit(srv, code, source):
    return srv.json("POST", "/submit", {"code": code, "interpreter": "python3"}, source)


def test_defaults_are_advertised(default_server):
    _, _, doc = default_server.json("GET", "/")
    assert doc["limits"] == {"timeout_seconds_max": 300, "memory_mb_max": 512, "cpu_seconds_per_minute": 10,
                             "concurrent_jobs_per_ip": 2, "jobs_per_hour_per_ip": 20, "upload_bytes_max": 104857600}


def test_concurrent_jobs_per_client(default_server):
    srv = default_server
    jobs = [submit(srv, SLEEP, "127.0.0.2") for _ in range(2)]
    assert [j[0] for j in jobs] == [202, 202], jobs
    status, headers, doc = submit(srv, "print(1)", "127.0.0.2")
    assert status == 429 and doc["reason"] == "concurrent_jobs" and doc["retry_after"] >= 1
    assert int(headers["retry-after"]) == doc["retry_after"] and set(doc) >= {"error", "details"}
    _, _, stats = srv.json("GET", "/stats", source="127.0.0.2")
    assert stats["your_quota"]["active_jobs"] == 2 and stats["your_quota"]["can_submit"] is False
    # another client is not affected, and sees nothing of the first
    status, _, doc = submit(srv, "print(1)", "127.0.0.3")
    assert status == 202
    _, _, stats = srv.json("GET", "/stats", source="127.0.0.4")
    assert stats["your_quota"]["active_jobs"] == 0 and stats["your_quota"]["jobs_this_hour"] == 0
    for _, _, job in jobs:
        assert srv.request("DELETE", f"/jobs/{job['job_id']}", source="127.0.0.9")[0] == 204
    eventually(lambda: submit(srv, "print(1)", "127.0.0.2")[0] == 202, 10, "deleted jobs' leaving the count", interval=0.1)


def test_jobs_per_hour(default_server):
    srv = default_server
    for i in range(20):
        status, _, doc = srv.json("POST", "/submit?wait=30", {"code": "pass", "interpreter": "python3"}, "127.0.0.5")
        assert status == 200, (i, doc)
    status, headers, doc = submit(srv, "pass", "127.0.0.5")
    assert status == 429 and doc["reason"] == "jobs_per_hour" and 3500 <= doc["retry_after"] <= 3600, doc
    assert submit(srv, "pass", "127.0.0.6")[0] == 202


def test_cpu_seconds_per_minute(default_server):
    srv = default_server
    burn = "import time\nend = time.process_time() + 10.5\nwhile time.process_time() < end: pass"
    status, _, doc = srv.json("POST", "/submit?wait=60", {"code": burn, "interpreter": "python3"}, "127.0.0.7")
    assert status == 200 and doc["execution_metadata"]["cpu_seconds"] >= 10, doc  # a client's only job runs whole
    status, headers, doc = submit(srv, "pass", "127.0.0.7")
    assert status == 429 and doc["reason"] == "cpu_seconds_per_minute" and 1 <= doc["retry_after"] <= 60, doc
    _, _, stats = srv.json("GET", "/stats", source="127.0.0.7")
    assert stats["your_quota"]["cpu_seconds_used"] >= 10


def test_forwarded_for_is_ignored_from_untrusted_peers(default_server):
    srv = default_server
    jobs = [submit(srv, SLEEP, "127.0.0.8") for _ in range(2)]
    try:
        assert [status for status, _, _ in jobs] == [202, 202], jobs
        status, _, _ = srv.json("POST", "/submit", {"code": "pass", "interpreter": "python3"}, "127.0.0.8", headers={"X-Forwarded-For": "10.1.2.3"})
        assert status == 429
    finally:
        for status, _, job in jobs:
            if status == 202:
                srv.request("DELETE", f"/jobs/{job['job_id']}")


def test_ipv6_clients_count_by_64():

    sandrun._CLIENT_KEY = b"k" * 32
    key = sandrun.client_key
    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff::9") != key("2001:db8:1:3::1")
    assert key("::ffff:127.0.0.2") == key("127.0.0.2") != key("127.0.0.3")


def test_results_expire(default_server):
    srv = default_server
    status, _, doc = srv.json("POST", "/submit?wait=30", {"code": "open('o','w').write('1')", "interpreter": "python3"}, "127.0.0.10")
    assert status == 200 and doc["status"] == "completed"
    assert srv.request("GET", f"/status/{doc['job_id']}")[0] == 200
    time.sleep(3.5)
    for route in ("/status/", "/logs/", "/outputs/", "/download/"):
        assert srv.request("GET", route + doc["job_id"])[0] == 404, route
    eventually(lambda: not os.path.exists(os.path.join(srv.state_dir, "runner", "jobs", doc["job_id"])), 5, "the expired job's erasing")


def test_forwarded_for_is_believed_only_from_a_trusted_proxy():

    srv = Server({"SANDRUN_FORWARDED_ALLOW_IPS": "127.0.0.1"}, "proxy").start()
    try:
        proxied = {"X-Forwarded-For": "198.51.100.7"}
        status, _, doc = srv.json("POST", "/submit?wait=30", {"code": "pass", "interpreter": "python3"}, "127.0.0.1", headers=proxied)
        assert status == 200
        assert srv.json("GET", "/stats", source="127.0.0.1", headers=proxied)[2]["your_quota"]["jobs_this_hour"] == 1
        assert srv.json("GET", "/stats", source="127.0.0.1")[2]["your_quota"]["jobs_this_hour"] == 0
        # a hop the client itself wrote in front of the proxy's is not believed: the nearest untrusted hop counts
        spoofed = {"X-Forwarded-For": "203.0.113.1, 198.51.100.7"}
        assert srv.json("GET", "/stats", source="127.0.0.1", headers=spoofed)[2]["your_quota"]["jobs_this_hour"] == 1
        # from an untrusted peer the header is ignored
        assert srv.json("GET", "/stats", source="127.0.0.2", headers=proxied)[2]["your_quota"]["jobs_this_hour"] == 0
    finally:
        srv.stop()


def test_a_unix_socket_peer_is_the_trusted_proxy():
    """The appliance's nginx reaches gunicorn over a UNIX socket: its X-Forwarded-For names the client."""

    srv = Server({}, "unix")
    srv.env["SANDRUN_BIND"] = f"unix:{srv.workdir}/http.sock"
    srv.start()
    try:
        first, second = {"X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.8"}
        status, _, doc = srv.json("POST", "/submit?wait=30", {"code": "pass", "interpreter": "python3"}, headers=first)
        assert status == 200 and doc["status"] == "completed"
        assert srv.json("GET", "/stats", headers=first)[2]["your_quota"]["jobs_this_hour"] == 1
        assert srv.json("GET", "/stats", headers=second)[2]["your_quota"]["jobs_this_hour"] == 0
        assert srv.json("GET", "/stats")[2]["your_quota"]["jobs_this_hour"] == 0  # no header: not the client's bucket
    finally:
        srv.stop()


def test_trusted_proxies_are_networks_and_hops_are_addresses():
    """As gunicorn reads SANDRUN_FORWARDED_ALLOW_IPS: a network trusts every proxy in it; a hop
    with a port or in brackets is its address; a hop that is not an address is an untrusted client."""

    srv = Server({"SANDRUN_FORWARDED_ALLOW_IPS": "127.0.0.0/29, ::1"}, "proxies").start()
    try:
        def used(source, hops):
            return srv.json("GET", "/stats", source=source, headers={"X-Forwarded-For": hops})[2]["your_quota"]["jobs_this_hour"]

        status, _, _ = srv.json("POST", "/submit?wait=30", {"code": "pass", "interpreter": "python3"}, "127.0.0.5",
                                headers={"X-Forwarded-For": "198.51.100.7"})
        assert status == 200
        assert used("127.0.0.3", "198.51.100.7") == 1  # another proxy of the same network: the same client
        assert used("127.0.0.3", "198.51.100.7:40000") == 1  # a port is not part of the client
        assert used("127.0.0.3", "198.51.100.7, 127.0.0.2") == 1  # a trusted proxy's own hop is skipped
        assert used("127.0.0.3", "198.51.100.8") == 0  # another client has its own quota
        assert used("127.0.0.9", "198.51.100.7") == 0  # outside the network: the header is not believed
        srv.json("POST", "/submit?wait=30", {"code": "pass", "interpreter": "python3"}, "127.0.0.5",
                 headers={"X-Forwarded-For": "[2001:db8::1]:443"})
        assert used("127.0.0.3", "2001:db8::2") == 1  # the same /64, brackets and port stripped
        srv.json("POST", "/submit?wait=30", {"code": "pass", "interpreter": "python3"}, "127.0.0.5",
                 headers={"X-Forwarded-For": "not-an-address"})
        assert used("127.0.0.3", "junk, 127.0.0.4") == 1  # every hop that is not an address: one client
    finally:
        srv.stop()


def test_a_bad_proxy_list_stops_the_server():

    srv = Server({"SANDRUN_FORWARDED_ALLOW_IPS": "10.0.0.0/33"}, "badproxies")
    with pytest.raises(AssertionError, match="FORWARDED_ALLOW_IPS"):
        srv.start()


def test_the_cpu_quota_bounds_cpu_even_with_concurrent_jobs():
    """A token bucket: of two CPU-burning jobs started at once, the first is the one job's worth
    the quota allows beyond the bucket; the second gets what is left of the bucket (at least a
    second) and is stopped there; the next submission waits for the bucket to refill."""

    srv = Server({"SANDRUN_RATE_CPU_S_PER_MIN": "6"}, "cpu").start()
    try:
        burn = {"code": "while True: pass", "interpreter": "python3", "timeout": 8}
        first = srv.json("POST", "/submit", burn)[2]
        second = srv.json("POST", "/submit", burn)[2]
        ends = [srv.wait(doc["job_id"]) for doc in (first, second)]
        assert [doc["reason"] for doc in ends] == ["timeout", "cpu_limit"], ends
        assert ends[1]["execution_metadata"]["cpu_seconds"] < 2.5, ends[1]  # a second, read four times a second
        status, headers, doc = srv.json("POST", "/submit", burn)
        assert (status, doc["reason"]) == (429, "cpu_seconds_per_minute"), doc
        assert 1 <= int(headers["retry-after"]) <= 60, headers
        quota = srv.json("GET", "/stats")[2]["your_quota"]
        assert quota["cpu_seconds_used"] >= 6 and quota["can_submit"] is False, quota
    finally:
        srv.stop()


def test_a_client_low_on_cpu_may_still_wait():
    """A budget caps CPU, not wall time: a job that sleeps beside a running one is not cut short."""

    srv = Server({"SANDRUN_RATE_CPU_S_PER_MIN": "2"}, "cpu-wait").start()
    try:
        sleeper = srv.submit_code("import time; time.sleep(4)", wait=0)
        doc = srv.json("POST", "/submit?wait=60", {"code": "import time; time.sleep(3); print('done')", "interpreter": "python3"})[2]
        assert doc["status"] == "completed", doc  # its budget was a second of CPU; it used almost none
        assert srv.wait(sleeper["job_id"])["status"] == "completed"
    finally:
        srv.stop()
