"""sandrun_client.py against the real server: the module's functions and the command."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandrun_client import SandrunClient, SandrunError
from conftest import Server

CLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sandrun_client.py")


@pytest.fixture(scope="module")
def client(server):
    return SandrunClient(f"http://127.0.0.1:{server.port}")


def test_run_and_wait_code(client):
    result = client.run_and_wait(code="open('out.txt', 'w').write('hi')\nprint(6 * 7)", interpreter="python3")
    assert result["status"]["status"] == "completed" and result["logs"] == {"stdout": "42\n", "stderr": ""}
    assert [f["name"] for f in result["output_files"]] == ["out.txt"]
    assert client.download_file(result["job_id"], "out.txt") == b"hi"


def test_run_and_wait_directory_and_downloads(client, tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "in.csv").write_text("1,2\n")
    (project / "main.py").write_text("import sys\nrow = open('data/in.csv').read().strip()\n"
                                     "open('sum.txt', 'w').write(str(sum(map(int, row.split(',')))))\nprint(sys.argv[1:])")
    result = client.run_and_wait(directory=str(project), entrypoint="main.py", args=["a", "b"], outputs=["*.txt"])
    assert result["logs"]["stdout"] == "['a', 'b']\n" and [f["name"] for f in result["output_files"]] == ["sum.txt"]
    saved = client.download_file(result["job_id"], "sum.txt", str(tmp_path))
    assert open(saved).read() == "3"


def test_submit_status_logs_follow_delete(client):
    job = client.submit_code("import sys\nprint('out')\nprint('err', file=sys.stderr)", "python3")
    assert job["status"] == "queued"
    events = list(client.follow(job["job_id"]))
    assert "".join(text for event, text in events if event == "stdout") == "out\n" and events[-1][0] == "status"
    assert client.wait_for_completion(job["job_id"])["status"] == "completed"
    assert client.get_logs(job["job_id"])["stderr"] == "err\n"
    client.delete(job["job_id"])
    with pytest.raises(SandrunError) as caught:
        client.get_status(job["job_id"])
    assert caught.value.status == 404 and caught.value.error == "not found"


def test_errors_carry_the_servers_words(client):
    with pytest.raises(SandrunError) as caught:
        client.submit_code("print(1)", "cobol")
    assert caught.value.status == 400 and caught.value.error and caught.value.details


def test_a_429_carries_retry_after():

    srv = Server({"SANDRUN_RATE_JOBS_PER_HOUR": "1"}, "client").start()
    try:
        client = SandrunClient(f"http://127.0.0.1:{srv.port}")
        client.run_and_wait(code="pass", interpreter="python3")
        with pytest.raises(SandrunError) as caught:
            client.submit_code("pass", "python3")
        assert caught.value.status == 429 and isinstance(caught.value.retry_after, int) and caught.value.retry_after > 0
    finally:
        srv.stop()


def cli(server, *args, stdin=None, cwd=None):
    env = {**os.environ, "SANDRUN_URL": f"http://127.0.0.1:{server.port}"}
    return subprocess.run(["/usr/bin/python3", CLIENT, *args], input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_cli_runs_a_file_and_exits_with_the_jobs_status(server, tmp_path):
    (tmp_path / "main.py").write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(7)")
    done = cli(server, "run", "main.py", "x", "--y", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (7, "args ['x', '--y']\n"), done.stderr
    (tmp_path / "hello.sh").write_text("echo from bash")
    assert cli(server, "run", "hello.sh", cwd=tmp_path).stdout == "from bash\n"


def test_cli_stdin_dir_follow_and_downloads(server, tmp_path):
    done = cli(server, "run", "--interpreter", "bash", "-", stdin="echo piped; exit 3")
    assert (done.returncode, done.stdout) == (3, "piped\n")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "main.py").write_text("import sys\nprint('live')\nprint('e', file=sys.stderr)\n"
                                               "open('a.png', 'wb').write(b'png')\nopen('b.txt', 'w').write('t')")
    out = tmp_path / "out"
    done = cli(server, "run", "--follow", "--outputs", "*.png", "--download-to", str(out), "--dir", str(tmp_path / "proj"), "--entrypoint", "main.py")
    assert (done.returncode, done.stdout, done.stderr) == (0, "live\n", "e\n")
    assert os.listdir(out) == ["a.png"] and (out / "a.png").read_bytes() == b"png"


def test_cli_reports_a_refusal(server, tmp_path):
    (tmp_path / "x.unknown").write_text("?")
    done = cli(server, "run", "x.unknown", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("sandrun: ")


def test_the_curl_examples_run_against_the_server(server):
    script = os.path.join(os.path.dirname(CLIENT), "examples", "curl_examples.sh")
    done = subprocess.run(["bash", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SANDRUN_URL": f"http://127.0.0.1:{server.port}"})
    assert done.returncode == 0, done.stderr
    for expected in ('"status": "completed"', "wrote result.txt", "result.txt says: hello sandrun",
                     "event: stdout", "data: 2", '"error": "', "DELETE: 204"):
        assert expected in done.stdout, (expected, done.stdout)


def test_an_early_413_reaches_the_client(tmp_path):
    """The server answers 413 from Content-Length and closes while the client still sends: the
    client reads that answer instead of dying of a broken pipe."""

    srv = Server({"SANDRUN_UPLOAD_MAX_BYTES": str(16 << 20), "SANDRUN_UNPACKED_MAX_BYTES": str(16 << 20)}, "early").start()
    try:
        (tmp_path / "main.py").write_text("print(1)")
        (tmp_path / "big.bin").write_bytes(os.urandom(40 << 20))
        client = SandrunClient(f"http://127.0.0.1:{srv.port}")
        for _ in range(5):
            with pytest.raises(SandrunError) as caught:
                client.submit_directory(str(tmp_path), "main.py")
            assert (caught.value.status, caught.value.error) == (413, "body too large"), caught.value
    finally:
        srv.stop()
