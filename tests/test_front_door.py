"""The front door holds: what anonymous requests can cost the server is bounded.

Each attack runs beside a victim job of another client (conftest.Bystander):
the attacking request gets a clean 4xx or 503 quickly, /health from another
address answers within a second, the victim completes, and afterwards the
state tmpfs and the workers are back where they were.
"""

import concurrent.futures
import gzip
import io
import json
import os
import socket
import struct
import tarfile
import time
import zipfile

import pytest
from conftest import SUITE_ENV, Bystander, Nginx, Server, alive, eventually, fill, make_tar, multipart

import sandrun

MAIN = ("main.py", "file", b"print('ok')")


@pytest.fixture(scope="module")
def front():
    """A server of its own, so that its workers' peak memory is this module's doing."""
    srv = Server(SUITE_ENV, "front").start()
    yield srv
    srv.stop()


def _workers(server):
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _comm(pid) == "sandrun-http" and os.getpgid(pid) == server.proc.pid]


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _state_used(server):
    vfs = os.statvfs(server.state_dir)
    return (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize


def _attack(server, files, manifest=None, seconds=10):
    """Submit an upload beside a victim; its status and body, once it was answered within `seconds`."""
    bystander = Bystander(server)
    peaks = {pid: _peak_rss(pid) for pid in _workers(server)}
    started = time.monotonic()
    status, _, body = server.submit_files(files, manifest or {"entrypoint": "main.py"})
    took = time.monotonic() - started
    bystander.check()
    grown = max(_peak_rss(pid) - peak for pid, peak in peaks.items() if os.path.exists(f"/proc/{pid}"))
    assert took < seconds, f"the answer took {took:.1f} s"
    assert grown < 64 << 20, f"a worker's peak memory grew by {grown >> 20} MiB"
    return status, json.loads(body)


# 1. Every parser does bounded work --------------------------------------------------


def _link_bomb(levels, fanout):
    """l0 -> l1/l1/..., l1 -> l2/l2/...: expanding it naively takes fanout**levels steps."""
    members = [MAIN, ("d", "dir", None), (f"l{levels}", "symlink", "d")]
    members += [(f"l{i}", "symlink", "/".join([f"l{i + 1}"] * fanout)) for i in reversed(range(levels))]
    return make_tar(members)


def test_a_symlink_expansion_bomb_is_resolved_once_per_link(front):
    status, doc = _attack(front, [("bomb.tgz", _link_bomb(40, 8))])
    assert status == 200, doc  # every link stays inside: a fine upload, cheap to check


def test_a_symlink_loop_is_refused(front):
    status, doc = _attack(front, [("loop.tgz", make_tar([MAIN, ("a", "symlink", "b"), ("b", "symlink", "a/x")]))])
    assert (status, doc["error"]) == (400, "unsafe link"), doc


def test_symlink_resolution_has_a_budget(front):
    target = "/".join(["d", ".."] * 500)[:1000]
    members = [MAIN, ("d", "dir", None)] + [(f"l{i}", "symlink", target) for i in range(3000)]
    status, doc = _attack(front, [("links.tgz", make_tar(members))])
    assert (status, doc["error"]) == (400, "unsafe link") and "steps" in doc["details"], doc


def test_a_link_target_over_the_path_cap_is_refused(front):
    status, doc = _attack(front, [("long.tgz", make_tar([MAIN, ("l", "symlink", "a/" * 600)]))])
    assert (status, doc["error"]) == (400, "unsafe link"), doc


def _gnu_long_name_bomb(name_bytes):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("x" * name_bytes)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


def test_a_gnu_long_name_is_refused_before_it_is_read(front):
    bomb = _gnu_long_name_bomb(100 << 20)
    assert len(bomb) < 1 << 20
    status, doc = _attack(front, [("name.tgz", bomb)])
    assert (status, doc["error"]) == (400, "unsafe member") and "GNU long name" in doc["details"], doc


def test_a_name_just_over_the_cap_is_refused_and_one_at_the_cap_accepted(front):
    for length, expected in ((1024, 200), (1025, 400)):
        name = ("d" * 200 + "/") * 4 + "e" * (length - 804 - 3) + ".py"
        status, doc = _attack(front, [("n.tgz", make_tar([(name, "file", b"print(1)")]))], {"entrypoint": name})
        assert status == expected, (length, doc)


def test_a_zip_directory_is_counted_before_it_is_parsed(front):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("main.py", "print(1)")
        for i in range(sandrun.UNPACKED_MEMBERS_MAX + 1):
            archive.writestr(f"{i}", "")
    data = bytearray(buf.getvalue())
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, eocd + 8, 1, 1)  # the end record lies: one member
    status, doc = _attack(front, [("many.zip", bytes(data))])
    assert (status, doc["error"]) == (413, "upload too large"), doc


def test_many_tiny_parts_cost_little(front):
    parts = [(f"f{i}.txt", b"x") for i in range(sandrun.UNPACKED_MEMBERS_MAX + 10)]
    status, doc = _attack(front, [("main.py", b"print(1)")] + parts)
    assert (status, doc["error"]) == (413, "upload too large"), doc
    status, doc = _attack(front, [("main.py", b"print(1)")] + parts[:2000])
    assert status == 200, doc


def test_repeated_headers_are_stopped_by_the_stream_cap(front):
    """Directory headers that repeat are no new member: only the decompressed-bytes counter stops them."""
    header = tarfile.TarInfo("d")
    header.type = tarfile.DIRTYPE
    block = header.tobuf(tarfile.USTAR_FORMAT)
    buf = io.BytesIO()

    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        g.write(make_tar([MAIN], "w")[:1024])
        for _ in range(300 << 20 >> 19):
            g.write(block * 1024)
    status, doc = _attack(front, [("dirs.tgz", buf.getvalue())])
    assert (status, doc["error"]) == (413, "upload too large"), doc


# 2. No one can fill the state tmpfs from outside ---------------------------------------

SMALL = {**SUITE_ENV, "SANDRUN_STATE_TMPFS_BYTES": str(512 << 20), "SANDRUN_UPLOAD_MAX_BYTES": str(16 << 20),
         "SANDRUN_UNPACKED_MAX_BYTES": str(16 << 20), "SANDRUN_RATE_CONCURRENT_JOBS": "2"}


def _stalled_upload(server, source, length=16 << 20, sent=1 << 20):
    """A multipart upload that sends its headers and the start of its body, then waits."""
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
    boundary = "b" * 20
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n\r\n").encode()
    sock.sendall(f"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + head + b"x" * sent)
    return sock


def _incoming(server):
    return os.listdir(os.path.join(server.state_dir, "http", "incoming"))


def test_stalled_uploads_cannot_fill_the_state():
    srv = Server(SMALL, "stalled").start()
    socks = []
    try:
        before = _state_used(srv)
        bystander = Bystander(srv)
        answers = []
        for i in range(12):  # each reserves what it may write: the body and what it may unpack to
            socks.append(_stalled_upload(srv, f"127.0.1.{i + 1}"))
            time.sleep(0.3)
        for sock in socks:
            sock.settimeout(0.5)
            try:
                answers.append(sock.recv(200).split(b"\r\n")[0])
            except TimeoutError:
                answers.append(b"waiting")
        assert b"waiting" in answers and any(b" 503 " in a for a in answers), answers
        assert len(_incoming(srv)) == answers.count(b"waiting")
        vfs = os.statvfs(srv.state_dir)
        assert vfs.f_bavail * vfs.f_frsize >= sandrun.STATE_RESERVE_BYTES - (64 << 20)  # the running jobs' room stays
        bystander.check()
        for sock in socks:
            sock.close()
        eventually(lambda: _incoming(srv) == [], what="the uploads' sweep", interval=0.2)
        assert _state_used(srv) - before < 1 << 20
    finally:
        for sock in socks:
            sock.close()
        srv.stop()


def test_one_client_has_at_most_its_concurrency_in_flight():
    srv = Server(SMALL, "inflight").start()
    socks = [_stalled_upload(srv, "127.0.2.1") for _ in range(2)]
    try:
        time.sleep(0.5)
        status, _, doc = srv.json("POST", "/submit", {"code": "1", "interpreter": "python3"}, source="127.0.2.1")
        assert (status, doc.get("reason")) == (429, "concurrent_jobs"), doc
        assert srv.json("POST", "/submit", {"code": "1", "interpreter": "python3"}, source="127.0.2.2")[0] == 202
    finally:
        for sock in socks:
            sock.close()
        srv.stop()


def test_an_answered_upload_holds_no_space(front):
    before = _state_used(front)
    payload = os.urandom(30 << 20)
    for _ in range(3):
        status, _, body = front.submit_files([("main.py", b"print(1)"), ("blob.bin", payload)], {"entrypoint": "main.py"})
        doc = json.loads(body)
        assert status == 200, doc
        assert front.request("DELETE", f"/jobs/{doc['job_id']}")[0] == 204
    eventually(lambda: _state_used(front) - before <= 2 << 20, 10, "the uploads' space back", interval=0.2)


def test_a_dead_workers_upload_is_swept(front):
    sock = _stalled_upload(front, "127.0.3.1")
    try:
        (name,) = eventually(lambda: _incoming(front), 10, "the stalled upload", interval=0.1)
        with open(os.path.join(front.state_dir, "http", "incoming", name, "owner")) as f:
            worker = int(f.read().split()[0])
        os.kill(worker, 9)  # as the OOM killer or a timeout kill would
        # A dying process is still alive (its threads are leaving); dead is the case.
        eventually(lambda: not alive(worker), what="the worker's death", interval=0.01)

        def submitted():  # gunicorn starts a new worker; the next upload sweeps the dead one's
            try:
                return front.json("POST", "/submit?wait=30", {"code": "1", "interpreter": "python3"}, source="127.0.3.2")[0] == 200
            except OSError:
                return False

        eventually(submitted, what="a job through the new worker", interval=0.2)
        assert name not in _incoming(front)
    finally:
        sock.close()


def test_a_full_state_is_a_503_at_every_step():
    srv = Server(SMALL, "full-intake").start()
    filler = os.path.join(srv.state_dir, "http", "tmp", "filler")
    try:
        fill(filler)
        body, ctype = multipart({"manifest": json.dumps({"entrypoint": "main.py"})}, [("main.py", b"print(1)")])
        status, headers, data = srv.request("POST", "/submit", body, {"Content-Type": ctype})
        assert (status, json.loads(data)["error"]) == (503, "storage full") and "retry-after" in headers, data
        status, _, data = srv.json("POST", "/submit", {"code": "1", "interpreter": "python3"})
        assert (status, data["error"]) == (503, "storage full"), data
    finally:
        os.unlink(filler)
        srv.stop()


# 3, 4. Answers that hold a thread are capped; /logs is bounded and streamed -----------------


def _raw_get(server, path, source):
    """A GET whose answer is never read: the server's thread blocks writing it."""
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def _health_is_quick(server):
    started = time.monotonic()
    status = server.request("GET", "/health", source="127.0.9.9", timeout=5)[0]
    return status == 200 and time.monotonic() - started < 1.0


def test_logs_of_invalid_utf8_are_bounded_and_streamed(front):
    doc, _ = front.run("import sys; sys.stdout.buffer.write(b'\\xff' * (10 << 20))")
    peaks = {pid: _peak_rss(pid) for pid in _workers(front)}
    status, headers, body = front.request("GET", f"/logs/{doc['job_id']}")
    assert status == 200 and headers.get("content-type") == "application/json; charset=utf-8"
    assert len(body) <= 3 * (10 << 20) + 1024, len(body)  # U+FFFD is three bytes; nothing is escaped to six
    logs = json.loads(body)
    assert logs["stdout"] == "\ufffd" * (10 << 20) and logs["stdout_truncated"] is True and logs["stderr"] == ""
    grown = max(_peak_rss(pid) - peak for pid, peak in peaks.items())
    assert grown < 32 << 20, f"a worker held the answer: +{grown >> 20} MiB"


def test_slow_readers_cannot_take_every_thread():
    # One worker: its shares are the server's.
    srv = Server({**SUITE_ENV, "SANDRUN_RATE_CONCURRENT_JOBS": "2", "SANDRUN_HTTP_WORKERS": "1"}, "readers").start()
    socks = []
    try:
        doc, _ = srv.run("import sys; sys.stdout.write('x' * (10 << 20))")
        logs = f"/logs/{doc['job_id']}"
        socks = [_raw_get(srv, logs, "127.0.4.1") for _ in range(2)]  # a client's share of transfers, both stuck
        time.sleep(0.5)
        status, _, body = srv.request("GET", logs, source="127.0.4.1")
        assert (status, json.loads(body)["error"]) == (503, "busy"), body
        assert srv.request("GET", logs, source="127.0.4.2")[0] == 200  # another client is served
        socks += [_raw_get(srv, logs, f"127.0.5.{i}") for i in range(1, 20)]  # every worker's share, stuck
        time.sleep(1)
        assert all(_health_is_quick(srv) for _ in range(5))
        assert srv.json("GET", f"/status/{doc['job_id']}")[0] == 200
    finally:
        for sock in socks:
            sock.close()
        srv.stop()


def test_long_polls_cannot_take_every_thread(front):

    job_id = front.start_sleeper(20)
    bystander = Bystander(front)

    def poll(i):
        started = time.monotonic()
        status, _, doc = front.json("GET", f"/status/{job_id}?wait=10", source=f"127.0.6.{i + 1}")
        return status, doc["status"], time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        polls = [pool.submit(poll, i) for i in range(40)]
        time.sleep(1)
        assert all(_health_is_quick(front) for _ in range(5))
        answers = [p.result() for p in polls]
    assert all(status == 200 and state == "running" for status, state, _ in answers), answers
    assert any(took < 2 for *_, took in answers) and any(took > 9 for *_, took in answers), answers  # some waited, the rest at once
    bystander.check()
    assert front.request("DELETE", f"/jobs/{job_id}")[0] == 204


def test_the_archive_of_all_outputs_is_made_as_it_is_sent(front):
    code = "import os\nfor i in range(3):\n    open(f'o{i}.bin', 'wb').write(os.urandom(30 << 20))"
    doc, _ = front.run(code, timeout=60)
    assert doc["status"] == "completed", doc
    before = _state_used(front)
    sock = _raw_get(front, f"/download/{doc['job_id']}", "127.0.7.1")
    try:
        time.sleep(1)
        assert _state_used(front) - before < 1 << 20  # nothing spilled while the client does not read
    finally:
        sock.close()
    status, _, body = front.request("GET", f"/download/{doc['job_id']}")
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["o0.bin", "o1.bin", "o2.bin"]
        assert all(m.size == 30 << 20 for m in tar.getmembers())


# 7. Nothing names a client --------------------------------------------------------------


def test_no_log_line_names_a_client_or_a_request(front):
    marker = "sentinel-" + os.urandom(6).hex()
    for request in (f"GET /{marker} HTTP/1.1\r\nHost: x\r\nBad Header {marker}\r\n\r\n".encode(),
                    f"NOT-HTTP {marker}\r\n\r\n".encode(), b"GET /" + marker.encode() + b"\x00 HTTP/1.1\r\n\r\n"):
        sock = socket.create_connection(("127.0.0.1", front.port), source_address=("127.0.8.77", 0))
        sock.sendall(request)
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 4")
        sock.close()
    time.sleep(0.5)
    with open(front.log_path, errors="replace") as f:
        log = f.read()
    assert "event=invalid_request" in log
    assert "127.0.8.77" not in log and marker not in log


def test_results_are_readable_by_the_http_user_only(front):
    doc, _ = front.run("open('out.txt', 'w').write('secret')")
    pid = os.fork()
    if pid == 0:  # another local user
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.listdir(os.path.join(front.state_dir, "runner", "jobs"))
            os._exit(1)
        except PermissionError:
            os._exit(0)
        finally:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0, "another user could list the results"
    assert front.request("GET", f"/download/{doc['job_id']}/out.txt")[2] == b"secret"  # the workers still can


# 3. No client can drain the pool (the direct bind) ------------------------------------------


def test_slow_senders_cannot_take_every_thread():
    """One byte and then silence, or a multipart body trickled: an address holds at most its
    share of a worker's threads, and every request is cut at SANDRUN_REQUEST_READ_S."""
    srv = Server({**SUITE_ENV, "SANDRUN_REQUEST_READ_S": "3"}, "slowloris").start()
    socks = []
    try:
        bystander = Bystander(srv)
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", srv.port), source_address=("127.0.10.1", 0))
            sock.sendall(b"G")
            socks.append(sock)
        for _ in range(64):
            socks.append(_stalled_upload(srv, "127.0.10.2", sent=10))
        started = time.monotonic()
        assert all(_health_is_quick(srv) for _ in range(5))
        bystander.check()
        for sock in socks:  # every one answered "busy", or cut at the deadline
            sock.settimeout(max(0.1, started + 10 - time.monotonic()))
            answer = sock.recv(100)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
        assert time.monotonic() - started < 10
    finally:
        for sock in socks:
            sock.close()
        srv.stop()


def test_a_request_trickled_a_byte_at_a_time_is_cut_at_the_deadline():
    srv = Server({**SUITE_ENV, "SANDRUN_REQUEST_READ_S": "2"}, "trickle").start()
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                sock.send(bytes([byte]))
                time.sleep(0.3)
                sock.setblocking(False)
                try:
                    if sock.recv(100) == b"":
                        raise ConnectionResetError("closed")
                except BlockingIOError:
                    pass
                sock.setblocking(True)
        assert 2 <= time.monotonic() - started < 5
        sock.close()
        assert srv.request("GET", "/health")[0] == 200
    finally:
        srv.stop()


# 3. ... and through nginx with the shipped site file -----------------------------------------


def test_through_nginx_slow_clients_never_reach_a_thread():
    srv = Server(SUITE_ENV, "nginx")
    srv.env["SANDRUN_BIND"] = f"unix:{srv.workdir}/http.sock"
    srv.start()
    proxy = Nginx(srv.workdir, "sandrun.conf", {"unix:/run/sandrun/http.sock": srv.env["SANDRUN_BIND"]})
    socks = []
    try:
        bystander = Bystander(srv)
        for i in range(1, 41):  # one byte each, from many addresses: past nginx's per-address limits
            sock = socket.create_connection(("127.0.0.1", proxy.port), source_address=(f"127.0.12.{i}", 0))
            sock.sendall(b"G")
            socks.append(sock)
        for i in range(1, 65):  # a multipart body trickled: nginx holds it, Sandrun never sees it
            sock = socket.create_connection(("127.0.0.1", proxy.port), source_address=(f"127.0.13.{i}", 0))
            sock.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 1000000\r\n\r\n--b\r\n")
            socks.append(sock)
        for _ in range(5):
            started = time.monotonic()
            assert proxy.get("/health", source="127.0.14.1")[0] == 200 and time.monotonic() - started < 1.0
        assert _incoming(srv) == []  # no upload reached Sandrun
        bystander.check()
        limited = [proxy.get("/health", source="127.0.15.1")[0] for _ in range(60)]  # past 20/s with a burst of 40
        assert 429 in limited and 200 in limited, limited
        status, body = proxy.get("/nope", source="127.0.15.1")
        assert status in (404, 429) and "error" in json.loads(body), (status, body)
    finally:
        for sock in socks:
            sock.close()
        proxy.stop()
        srv.stop()
