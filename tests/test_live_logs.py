"""GET /logs/{id}?follow=1: Server-Sent Events over a real HTTP connection, as the job writes."""

import http.client
import json

import pytest

from conftest import SUITE_ENV, Server

SLOW = "import time, sys\nprint('first', flush=True)\ntime.sleep(2)\nprint('second', flush=True)\nprint('oops', file=sys.stderr)"


class Events:
    """Reads a text/event-stream answer one event at a time."""

    def __init__(self, server, job_id, timeout=60):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.conn.request("GET", f"/logs/{job_id}?follow=1")
        self.response = self.conn.getresponse()

    def next(self):
        """(event, data) of the next event; None when the stream has closed."""
        event, data = None, []
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if line == "" and event is not None:
                return event, "\n".join(data)
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])

    def rest(self):
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events

    def close(self):
        self.conn.close()


def test_output_arrives_while_the_job_runs_then_its_status(server):
    job = server.submit_code(SLOW, wait=0)
    stream = Events(server, job["job_id"])
    try:
        assert stream.response.status == 200
        assert stream.response.getheader("Content-Type").startswith("text/event-stream")
        assert stream.response.getheader("X-Accel-Buffering") == "no" and stream.response.getheader("Cache-Control") == "no-cache"
        seen = ""
        while seen != "first\n":  # print() may write the line and its newline apart
            event, data = stream.next()
            assert event == "stdout", (event, data)
            seen += data
        # the job is still running: the text came as it was written, not after the end
        assert server.json("GET", f"/status/{job['job_id']}")[2]["status"] in ("queued", "running")
        events = stream.rest()
    finally:
        stream.close()
    text = {name: "".join(data for event, data in events if event == name) for name in ("stdout", "stderr")}
    assert text == {"stdout": "second\n", "stderr": "oops\n"}, events
    assert events[-1][0] == "status"
    final = json.loads(events[-1][1])
    assert (final["status"], final["exit_code"]) == ("completed", 0)


def test_a_late_client_gets_everything_so_far(server):
    doc, _ = server.run("import sys\nprint('a\\nb')\nprint('é', file=sys.stderr)\nprint('c', end='')")
    stream = Events(server, doc["job_id"])
    try:
        events = stream.rest()
    finally:
        stream.close()
    text = {name: "".join(data for event, data in events if event == name) for name in ("stdout", "stderr")}
    assert text == {"stdout": "a\nb\nc", "stderr": "é\n"}, events
    assert [event for event, _ in events][-1] == "status" and json.loads(events[-1][1])["job_id"] == doc["job_id"]


@pytest.mark.parametrize("query, status", [("follow=yes", 400), ("follow=0", 200)])
def test_follow_takes_0_or_1(server, query, status):
    doc, _ = server.run("print(1)")
    got, headers, body = server.request("GET", f"/logs/{doc['job_id']}?{query}")
    assert got == status and headers["content-type"].startswith("application/json"), body


def test_follow_of_an_unknown_job_is_404(server):
    assert server.request("GET", "/logs/job-" + "0" * 32 + "?follow=1")[0] == 404


def test_streams_per_worker_are_capped_and_a_deleted_job_ends_its_stream():

    srv = Server({**SUITE_ENV, "SANDRUN_HTTP_WORKERS": "1", "SANDRUN_HTTP_THREADS": "2"}, "streams").start()
    try:
        job = srv.submit_code("import time\nprint('up', flush=True)\ntime.sleep(60)", wait=0)
        stream = Events(srv, job["job_id"])
        try:
            assert stream.next()[0] == "stdout"
            status, headers, body = srv.request("GET", f"/logs/{job['job_id']}?follow=1")
            assert status == 503 and json.loads(body)["error"] == "busy" and headers["retry-after"] == "5"
            assert srv.request("GET", f"/logs/{job['job_id']}")[0] == 200  # a plain read still works
            assert srv.request("DELETE", f"/jobs/{job['job_id']}")[0] == 204
            assert "status" not in [event for event, _ in stream.rest()]  # it ends with the job, which has no status to send
        finally:
            stream.close()
        assert srv.request("GET", f"/logs/{job['job_id']}?follow=1")[0] == 404
        job = srv.submit_code("print('again')", wait=30)
        again = Events(srv, job["job_id"])  # the slot was freed
        try:
            assert "".join(data for event, data in again.rest() if event == "stdout") == "again\n"
        finally:
            again.close()
    finally:
        srv.stop()
