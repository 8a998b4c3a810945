"""GET /metrics: Prometheus text, aggregates only, counted across all workers and the runner."""

import os
import re
import signal

from conftest import Server, eventually

SAMPLE = re.compile(r'([a-z_]+)(\{(?:[a-z_]+="[^"\\\n]*",?)*\})? (-?[0-9.e+]+|\+Inf)\Z')


def scrape(server):
    """{(name, labels): value} from a real scrape; checks the text format on the way."""
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("# HELP "):
            match = SAMPLE.match(line)
            assert match, f"not a Prometheus sample: {line!r}"
            name, labels, value = match.groups()
            assert re.sub(r"_(bucket|sum|count)\Z", "", name) in typed or name in typed, f"{name} has no TYPE line"
            samples[name, labels or ""] = float(value)
    assert "job-" not in text and "127.0.0." not in text  # no job ids, no addresses
    return samples


def delta(before, after, name, labels=""):
    return after.get((name, labels), 0) - before.get((name, labels), 0)


def test_counters_and_histograms_move_when_jobs_run(server):
    before = scrape(server)
    assert server.run("print(1)")[0]["status"] == "completed"
    assert server.run("raise SystemExit(3)")[0]["status"] == "failed"
    after = scrape(server)
    assert delta(before, after, "sandrun_jobs_submitted_total") == 2
    assert delta(before, after, "sandrun_jobs_finished_total", '{reason="exit_code",status="completed"}') == 1
    assert delta(before, after, "sandrun_jobs_finished_total", '{reason="exit_code",status="failed"}') == 1
    for histogram in ("sandrun_job_wall_seconds", "sandrun_job_cpu_seconds"):
        assert delta(before, after, histogram + "_count") == 2
        assert delta(before, after, histogram + "_bucket", '{le="+Inf"}') == 2
        assert delta(before, after, histogram + "_sum") > 0


def test_gauges_show_a_running_job(server):
    job_id = server.start_sleeper(30)
    assert scrape(server)["sandrun_jobs_running", ""] >= 1
    server.json("DELETE", f"/jobs/{job_id}")


def test_rejections_and_runner_restarts_are_counted():

    srv = Server({"SANDRUN_RATE_JOBS_PER_HOUR": "1"}, "metrics").start()
    try:
        assert scrape(srv).get(("sandrun_runner_restarts_total", "")) == 0
        srv.run("print(1)")
        assert srv.json("POST", "/submit", {"code": "print(2)", "interpreter": "python3"})[0] == 429
        assert scrape(srv)["sandrun_http_rejected_total", '{code="429"}'] == 1
        runner = next(pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                      if _in_group(pid, srv.proc.pid) and open(f"/proc/{pid}/comm").read().strip() == "sandrun-runner")
        os.kill(runner, signal.SIGKILL)
        eventually(lambda: scrape(srv).get(("sandrun_runner_restarts_total", "")) == 1, what="the restart's count", interval=0.2)
        # counts kept in the state directory outlive the runner that made them
        assert scrape(srv)["sandrun_jobs_finished_total", '{reason="exit_code",status="completed"}'] == 1
    finally:
        srv.stop()


def _in_group(pid, pgid):
    try:
        return os.getpgid(pid) == pgid
    except ProcessLookupError:
        return False
