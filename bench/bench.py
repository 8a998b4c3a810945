"""make bench: Sandrun's speed and memory beside its yardsticks, measured in one run.

This machine is shared and noisy, so only ratios measured in the same run
mean anything; absolute times are printed for orientation. Four parts:

1. Jail overhead per job. Programs are run interleaved round-robin three ways:
   bare fork+exec, bwrap (Debian's bubblewrap with read-only binds of the
   same system directories), and Sandrun's own jail called directly with no
   HTTP (cgroup, namespaces, mounts, seccomp, init, and the cleanup).
2. Service throughput: the real server (real gunicorn config) on loopback.
   Trivial python3 and bash jobs are submitted from several client addresses
   (127.0.0.x) at concurrency 1, 2, 4 and 8. Beside it: the bare spawn rate
   of the same program, at the same concurrency. Where the CPU goes: the
   machine's busy time per job, and the service's processes by name.
3. Latency for one person: POST /submit?wait= of print(1) on an idle server.
4. Memory: proportional set size (PSS, shared pages split fairly) of the
   idle service, and the extra per running job.
5. A cluster on this machine: throughput of trivial python3 jobs from 8
   client addresses, straight to one node, then through nginx with the
   shipped cluster site before 1, 2 and 3 nodes. All share this machine's
   CPUs, so the ratios show what the front costs, not how a cluster scales.

Run as root: `make bench`. Writes bench/results/<UTC time>.json and prints a
table. Rate limits are raised for the benchmark's own server only.
"""

import collections
import concurrent.futures
import datetime
import functools
import http.client
import io
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

#: Part 1's programs: each does as little as its runtime allows.
PROGRAMS = {
    "/bin/true": ["/usr/bin/true"],
    "bash -c true": ["/usr/bin/bash", "-c", "true"],
    "python3 -c pass": ["/usr/bin/python3", "-c", "pass"],
    "node -e 0": ["/usr/bin/node", "-e", "0"],
}
JAIL_RUNS = int(os.environ.get("BENCH_JAIL_RUNS", "100"))
SERVICE_JOBS = int(os.environ.get("BENCH_SERVICE_JOBS", "48"))  # per program and concurrency level
LATENCY_RUNS = int(os.environ.get("BENCH_LATENCY_RUNS", "200"))
CONCURRENCY = (1, 2, 4, 8)
SERVICE_CODE = {"python3": "print(1)", "bash": "echo 1"}
BARE_SERVICE = {"python3": ["/usr/bin/python3", "-c", "print(1)"], "bash": ["/usr/bin/bash", "-c", "echo 1"]}
SUITE_LIMITS = {
    "SANDRUN_RATE_JOBS_PER_HOUR": "1000000", "SANDRUN_RATE_CONCURRENT_JOBS": "64",
    "SANDRUN_RATE_CPU_S_PER_MIN": "1000000", "SANDRUN_MAX_QUEUED": "100",
}


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values):
    return {"median": statistics.median(values), "p90": percentile(values, 90), "n": len(values)}


class CpuMeter:
    """CPU seconds of this process and all its descendants, from a cgroup of their own.

    getrusage() would miss processes that are never waited for by us (bwrap's
    pid 1 reaps the program). A jail's own processes live in the job's cgroup;
    DirectJail adds their time before removing it.
    """

    def __init__(self, sandrun):
        cg = sandrun._CGROUPS
        if cg.version == 2:
            self.path, self.home = os.path.join(cg.base["v2"], "http"), None  # where server_start put us
        else:
            self.home = os.path.join(cg.base["cpuacct"], "..")
            self.path = os.path.join(cg.base["cpuacct"], "bench")
            os.mkdir(self.path)
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        self.extra = 0.0

    def now(self):
        if self.home is None:
            with open(os.path.join(self.path, "cpu.stat")) as f:
                return int(f.readline().split()[1]) / 1e6 + self.extra
        with open(os.path.join(self.path, "cpuacct.usage")) as f:
            return int(f.read()) / 1e9 + self.extra

    def close(self):
        if self.home is not None:
            with open(os.path.join(self.home, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            os.rmdir(self.path)


def timed(run, meter):
    """Wall time until the result is known (the jail's way says when: what it does after
    that, the runner does while idle), and the CPU of everything."""
    wall, cpu = time.perf_counter(), meter.now()
    done = run() or time.perf_counter()
    return done - wall, meter.now() - cpu


# 1. Jail overhead -------------------------------------------------------------


def bare(argv, env=None):
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)


def bwrap_argv(sandrun):
    """bwrap with what Sandrun's jail shows a job: /usr, the same /etc entries, proc, dev, tmpfs."""
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + name):
            argv += ["--symlink", os.readlink("/" + name), "/" + name]
    for name in sandrun.JAIL_ETC_BINDS:
        if os.path.exists("/etc/" + name):
            argv += ["--ro-bind", "/etc/" + name, "/etc/" + name]
    return argv + ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/work", "--chdir", "/work"]


class DirectJail:
    """Sandrun's jail without HTTP, as the runner drives it, from a built jail to its cleanup.

    Like the runner, it keeps SPARE_JAILS jails built ahead. Once the
    current job has started it builds the next at once if none is left,
    else when nothing happened for SPARE_IDLE_S: during the job, or after a
    job that ended at once. The wall time ends when the job's result is
    known; the CPU of the builds is counted too.
    """

    def __init__(self, sandrun, meter):
        self.sandrun, self.meter = sandrun, meter
        # As the runner does: jails come from a factory forked before any job (they are our children).
        self.factory_pid, self.factory = sandrun.factory_start(sandrun._CGROUPS)
        manifest = sandrun.manifest_parse({"entrypoint": "main.sh", "interpreter": "sh"}, code_form=False)
        payload = io.BytesIO()
        writer = sandrun.PayloadWriter(payload)
        writer.add_file("main.sh", io.BytesIO(b"true\n"), 5, False, "bench")
        writer.finish("main.sh")
        self.manifest, self.payload = manifest, payload.getvalue()
        # What a job's environment holds; bare and bwrap runs get the same (node reads NODE_* at start, say).
        self.env = sandrun.JailSpec(manifest, -1).env
        self.spares = collections.deque()

    def _build(self):
        if len(self.spares) < self.sandrun.SPARE_JAILS:
            self.spares.append(self.sandrun.jail_build(self.factory, self.sandrun._CGROUPS))

    def run(self, argv):
        sr = self.sandrun
        payload_fd = os.memfd_create("payload")
        os.write(payload_fd, self.payload)
        os.lseek(payload_fd, 0, os.SEEK_SET)
        handle = self.spares.popleft() if self.spares else sr.jail_build(self.factory, sr._CGROUPS)
        try:
            spec = sr.JailSpec(self.manifest, payload_fd)
            spec.argv = list(argv)
            sr.jail_assign(handle, spec, sr._CGROUPS)
            while True:  # the runner builds no jail while a job starts
                data, fds = sr.recv_fds(handle.setup, 4096, 1)
                for fd in fds:
                    os.close(fd)  # /work: the runner reads outputs from it; nothing to read here
                if data == sr.MSG_STARTED or not data or data.startswith(sr.MSG_FAILED):
                    error = data
                    break
            if not self.spares or not select.select([handle.pidfd], [], [], sr.SPARE_IDLE_S)[0]:  # none left, or idle
                self._build()
            for fd in (handle.stdout_r, handle.stderr_r):
                os.set_blocking(fd, True)
                while os.read(fd, 65536):
                    pass
            _, init_status = os.waitpid(handle.pid, 0)
            status, _ = sr.jail_job_status(handle, init_status)
            self.meter.extra += sr._CGROUPS.cpu_seconds(handle.cgroup)  # the runner reads these three too
            sr._CGROUPS.memory_peak_bytes(handle.cgroup), sr._CGROUPS.oom_kills(handle.cgroup)
            handle.close()
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"{argv} failed in the jail: status {status} {error!r}")
        finally:
            os.close(payload_fd)
            sr._CGROUPS.kill_and_remove(handle.cgroup)
        done = time.perf_counter()
        while len(self.spares) < sr.SPARE_JAILS:  # the runner's idle moments before the next job
            self._build()
        return done

    def close(self):
        while self.spares:
            self.sandrun.jail_discard(self.spares.popleft(), self.sandrun._CGROUPS)
        self.factory.close()
        os.waitpid(self.factory_pid, 0)


def part1(sandrun):
    import prctl

    prctl.set_child_subreaper(True)  # the jail's init is re-parented to us, as to the runner
    meter = CpuMeter(sandrun)
    jail = DirectJail(sandrun, meter)
    bwrap = bwrap_argv(sandrun)
    ways = {"bare": lambda argv: bare(argv, jail.env), "bwrap": lambda argv: bare(bwrap + argv, jail.env), "sandrun": jail.run}
    samples = {(prog, way): ([], []) for prog in PROGRAMS for way in ways}
    try:
        for argv in PROGRAMS.values():  # warm the page cache: the first run of each is not the benchmark
            for run in ways.values():
                run(argv)
        for _ in range(JAIL_RUNS):
            for prog, argv in PROGRAMS.items():
                for way, run in ways.items():
                    wall, cpu = timed(functools.partial(run, argv), meter)
                    samples[prog, way][0].append(wall * 1000)
                    samples[prog, way][1].append(cpu * 1000)
    finally:  # the factory and the spare jails live in the bench's cgroup: server_stop() removes it
        jail.close()
        meter.close()
    result = {}
    for prog in PROGRAMS:
        row = {way: {"wall_ms": summary(samples[prog, way][0]), "cpu_ms": summary(samples[prog, way][1])} for way in ways}
        base = row["bare"]["wall_ms"]["median"]
        for way in ("bwrap", "sandrun"):
            row[way]["overhead_wall_ms"] = row[way]["wall_ms"]["median"] - base
            row[way]["overhead_cpu_ms"] = row[way]["cpu_ms"]["median"] - row["bare"]["cpu_ms"]["median"]
        row["sandrun_overhead_over_bwrap_overhead"] = row["sandrun"]["overhead_wall_ms"] / row["bwrap"]["overhead_wall_ms"]
        result[prog] = row
    return result


# 2-4. The service -------------------------------------------------------------


class Server:
    """The real server, as make run starts it, on a free loopback port."""

    def __init__(self, env):
        self.workdir = tempfile.mkdtemp(prefix="sandrun-bench-")
        os.chmod(self.workdir, 0o755)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = {**os.environ, "SANDRUN_STATE_DIR": os.path.join(self.workdir, "state"),
                    "SANDRUN_BIND": f"127.0.0.1:{self.port}", **env}
        self.log = open(os.path.join(self.workdir, "server.log"), "wb")
        self.proc = subprocess.Popen([os.path.join(ROOT, ".venv", "bin", "gunicorn"), "-c", "gunicorn.conf.py", "sandrun:app"],
                                     cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server did not start")

    def request(self, method, path, doc=None, source="127.0.0.1"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120, source_address=(source, 0))
        try:
            body = json.dumps(doc).encode() if doc is not None else None
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def run_job(self, code, interpreter, source):
        """Submit and hold until the job has completed; the latency a client sees."""
        start = time.perf_counter()
        status, doc = self.request("POST", "/submit?wait=60", {"code": code, "interpreter": interpreter}, source)
        while status == 202 or doc.get("status") not in ("completed", "failed"):
            status, doc = self.request("GET", f"/status/{doc['job_id']}?wait=60", source=source)
        if doc["status"] != "completed" or doc["exit_code"] != 0:
            raise RuntimeError(f"bench job did not complete: {doc}")
        return time.perf_counter() - start

    def pids(self):
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) == self.proc.pid:
                    found.append(int(pid))
            except ProcessLookupError:
                pass
        return found

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.workdir)


class Front(Server):
    """nginx with the shipped cluster site (the tests' harness) before `nodes`, Servers with SANDRUN_NODE."""

    def __init__(self, nodes):
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import Nginx

        self.nodes, self.workdir = nodes, tempfile.mkdtemp(prefix="sandrun-bench-front-")
        listing = subprocess.run(["sh", os.path.join(ROOT, "image", "nginx", "sandrun-cluster-nodes"),
                                  *(f"{node.env['SANDRUN_NODE']}=127.0.0.1:{node.port}" for node in nodes)],
                                 check=True, capture_output=True, text=True).stdout
        self.nginx = Nginx(self.workdir, "sandrun-cluster.conf", {}, files={"sandrun-nodes.conf": listing})
        self.port = self.nginx.port

    def pids(self):
        return [self.nginx.proc.pid, *_children(self.nginx.proc.pid)] + [pid for node in self.nodes for pid in node.pids()]

    def stop(self):
        self.nginx.stop()
        shutil.rmtree(self.workdir)


def part5():
    """Throughput at concurrency 8 straight to one node, and through the front before 1, 2 and 3."""
    env = {**SUITE_LIMITS, "SANDRUN_FORWARDED_ALLOW_IPS": "127.0.0.1"}
    nodes = [Server({**env, "SANDRUN_NODE": name}) for name in ("a", "b", "c")]
    try:
        result = {}
        for name, target in [("direct, 1 node", None), *((f"front, {n} node{'s' * (n > 1)}", n) for n in (1, 2, 3))]:
            server = nodes[0] if target is None else Front(nodes[:target])
            try:
                server.run_job("print(1)", "python3", "127.0.0.2")  # warm-up
                level = throughput(server, "python3", 8)
            finally:
                if target is not None:
                    server.stop()
            result[name] = {"jobs_per_s": level["jobs_per_s"], "latency_ms": level["latency_ms"],
                            "nginx_cpu_ms_per_job": level["cpu_ms_per_job"].get("nginx", 0.0)}
        return result
    finally:
        for node in nodes:
            node.stop()


def pss_bytes(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0


def throughput(server, interpreter, concurrency):
    sources = [f"127.0.0.{2 + i}" for i in range(concurrency)]  # one client address per connection
    latencies = []
    lock = threading.Lock()
    remaining = [SERVICE_JOBS]

    def client(source):
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            seconds = server.run_job(SERVICE_CODE[interpreter], interpreter, source)
            with lock:
                latencies.append(seconds * 1000)

    start, cpu = time.perf_counter(), cpu_by_role(server)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, sources))
    elapsed = time.perf_counter() - start
    cpu = {role: seconds * 1000 / SERVICE_JOBS for role, seconds in (cpu_by_role(server) - cpu).items()}
    return {"jobs_per_s": SERVICE_JOBS / elapsed, "latency_ms": {"p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95), "p99": percentile(latencies, 99)}, "cpu_ms_per_job": cpu}


def cpu_by_role(server=None):
    """CPU seconds so far: the whole machine's busy time, and the service's processes by name.

    The runner's reaped children are its jails' inits, and through them their
    jobs (each init reaps its job): "jails and jobs".
    """
    with open("/proc/stat") as f:
        ticks = [int(n) for n in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    roles = collections.Counter({"machine": (sum(ticks) - ticks[3] - ticks[4]) / hz})  # all but idle and iowait
    for pid in server.pids() if server else ():
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        roles[name] += (int(fields[11]) + int(fields[12])) / hz
        if name == "sandrun-runner":
            roles["jails and jobs"] += (int(fields[13]) + int(fields[14])) / hz
    return roles


def bare_rate(argv, concurrency):
    """Spawns per second, and the machine's CPU per spawn in ms."""
    start, cpu = time.perf_counter(), cpu_by_role()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: bare(argv), range(SERVICE_JOBS)))
    return SERVICE_JOBS / (time.perf_counter() - start), (cpu_by_role() - cpu)["machine"] * 1000 / SERVICE_JOBS


def part2(server):
    result = {}
    for interpreter in SERVICE_CODE:
        server.run_job(SERVICE_CODE[interpreter], interpreter, "127.0.0.2")  # warm-up
        levels = {}
        for concurrency in CONCURRENCY:
            level = levels[concurrency] = throughput(server, interpreter, concurrency)
            level["bare_spawns_per_s"], level["bare_cpu_ms_per_spawn"] = bare_rate(BARE_SERVICE[interpreter], concurrency)
        best = max(levels.values(), key=lambda level: level["jobs_per_s"])
        best_bare = max(level["bare_spawns_per_s"] for level in levels.values())
        result[interpreter] = {"levels": levels, "best_jobs_per_s": best["jobs_per_s"], "best_bare_spawns_per_s": best_bare,
                               "ratio": best["jobs_per_s"] / best_bare}
    return result


def part3(server):
    latencies = [server.run_job("print(1)", "python3", "127.0.0.1") * 1000 for _ in range(LATENCY_RUNS)]
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "n": len(latencies)}


def part4(server, sleepers):
    time.sleep(2)  # idle: workers booted, the runner waiting
    runner = next(pid for pid in server.pids() if open(f"/proc/{pid}/comm").read().strip() == "sandrun-runner")
    # Jails are the runner's children in sessions of their own: the spares are among them.
    idle = {pid: (pss_bytes(pid), rss_bytes(pid)) for pid in set(server.pids()) | set(_children(runner))}
    jobs = [server.request("POST", "/submit", {"code": "sleep 60", "interpreter": "bash"}, f"127.0.0.{10 + i}")[1]["job_id"]
            for i in range(sleepers)]
    deadline = time.monotonic() + 60
    while any(server.request("GET", f"/status/{job}")[1]["status"] != "running" for job in jobs):
        if time.monotonic() > deadline:
            raise RuntimeError("the sleeping jobs did not start")
        time.sleep(0.2)
    time.sleep(1)
    # Each job's init (pid 1 of its namespace, a fork of the runner) is the runner's child; the job itself is the init's.
    inits = _children(runner)  # and the spares
    service = sum(pss_bytes(pid) for pid in set(server.pids()) | set(inits))
    idle_pss = sum(pss for pss, _ in idle.values())
    for job in jobs:
        server.request("DELETE", f"/jobs/{job}")
    return {
        "idle_pss_bytes": idle_pss, "idle_rss_sum_bytes": sum(rss for _, rss in idle.values()),
        "processes": len(idle), "running_jobs": sleepers, "job_inits_seen": len(inits),
        "extra_pss_per_running_job_bytes": (service - idle_pss) / sleepers,
    }


def _children(pid):
    return [int(child) for child in os.listdir("/proc") if child.isdigit() and _ppid(int(child)) == pid]


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


# Report -----------------------------------------------------------------------


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    versions = {name: subprocess.run([path, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
                for name, path in (("python3", "/usr/bin/python3"), ("node", "/usr/bin/node"), ("bwrap", "bwrap"))}
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(), "versions": versions}


def report(results):
    print(f"\nSandrun benchmark, {results['time']} on {results['machine']['cpus']} x {results['machine']['cpu']}, "
          f"kernel {results['machine']['kernel']}")
    print("\n1. Jail overhead per job: wall median / p90 and CPU median, in ms; overhead over bare fork+exec")
    print(f"   {'program':<16} {'bare':>15} {'bwrap':>15} {'sandrun':>15} {'+bwrap':>8} {'+sandrun':>9} {'ratio':>6}")
    for prog, row in results["jail"].items():
        cells = [f"{row[w]['wall_ms']['median']:6.1f}/{row[w]['wall_ms']['p90']:5.1f} {row[w]['cpu_ms']['median']:4.1f}"
                 for w in ("bare", "bwrap", "sandrun")]
        print(f"   {prog:<16} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {row['bwrap']['overhead_wall_ms']:8.1f} "
              f"{row['sandrun']['overhead_wall_ms']:9.1f} {row['sandrun_overhead_over_bwrap_overhead']:5.2f}x")
    print("\n2. Service throughput (jobs/s) and submit->completed latency p50/p95/p99 (ms); bare spawns/s of the same program")
    for interpreter, row in results["service"].items():
        for concurrency, level in row["levels"].items():
            lat = level["latency_ms"]
            print(f"   {interpreter:<8} c={concurrency}  {level['jobs_per_s']:6.1f} jobs/s   "
                  f"{lat['p50']:6.1f} {lat['p95']:6.1f} {lat['p99']:6.1f} ms   bare {level['bare_spawns_per_s']:6.1f}/s")
        print(f"   {interpreter:<8} best {row['best_jobs_per_s']:.1f} jobs/s = {row['ratio']:.2f} x the best bare rate "
              f"{row['best_bare_spawns_per_s']:.1f}/s")
        best = max(row["levels"].values(), key=lambda level: level["jobs_per_s"])
        cpu = dict(best["cpu_ms_per_job"])
        print(f"   {'':<8} CPU per job there, ms: machine {cpu.pop('machine'):.1f} (bare spawn {best['bare_cpu_ms_per_spawn']:.1f}); "
              + ", ".join(f"{name} {ms:.1f}" for name, ms in sorted(cpu.items(), key=lambda item: -item[1])))
    lat = results["latency"]
    print(f"\n3. POST /submit?wait= print(1), idle server: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms ({lat['n']} runs)")
    mem = results["memory"]
    print(f"\n4. Memory: idle service {mem['idle_pss_bytes'] / 2**20:.1f} MiB PSS ({mem['processes']} processes; "
          f"RSS summed {mem['idle_rss_sum_bytes'] / 2**20:.1f} MiB); "
          f"+{mem['extra_pss_per_running_job_bytes'] / 2**20:.2f} MiB PSS per running job")
    print("\n5. A cluster on this one machine (python3 print(1), 8 clients): jobs/s, latency p50/p95 (ms), nginx CPU per job (ms)")
    direct = results["cluster"]["direct, 1 node"]["jobs_per_s"]
    for name, row in results["cluster"].items():
        lat = row["latency_ms"]
        print(f"   {name:<16} {row['jobs_per_s']:6.1f} jobs/s = {row['jobs_per_s'] / direct:4.2f} x direct   "
              f"{lat['p50']:6.1f} {lat['p95']:6.1f} ms   nginx {row['nginx_cpu_ms_per_job']:.2f}")


def main():
    if os.geteuid() != 0:
        sys.exit("bench: run as root (the jail needs it), e.g. make bench")
    results = {"time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine()}
    # Part 1 runs the jail in this process: Sandrun's settings are read at import, so set them first.
    state = tempfile.mkdtemp(prefix="sandrun-bench-jail-")
    os.chmod(state, 0o755)
    os.environ["SANDRUN_STATE_DIR"] = os.path.join(state, "state")
    sys.path.insert(0, ROOT)
    import sandrun

    started = time.monotonic()
    sandrun.server_start()
    sandrun._heap_settle()  # as the master does before it forks the runner: jails are forked from a settled heap
    try:
        results["jail"] = part1(sandrun)
    finally:
        sandrun.server_stop()
        shutil.rmtree(state)
    print(f"bench: part 1 took {time.monotonic() - started:.0f} s", file=sys.stderr)
    del os.environ["SANDRUN_STATE_DIR"]
    server = Server(SUITE_LIMITS)  # the default configuration but for the clients' quotas
    try:
        results["service"] = part2(server)
        results["latency"] = part3(server)
        results["memory"] = part4(server, sleepers=os.cpu_count())  # MAX_RUNNING's default
    finally:
        server.stop()
    results["cluster"] = part5()
    print(f"bench: all parts took {time.monotonic() - started:.0f} s", file=sys.stderr)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, results["time"].replace(":", "") + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    report(results)
    print(f"\n(written to {os.path.relpath(path, ROOT)})")


if __name__ == "__main__":
    main()
