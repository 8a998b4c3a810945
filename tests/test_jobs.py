"""Jobs that should work: every submit form, interpreter and manifest field."""

import collections
import concurrent.futures
import gzip
import hashlib
import io
import json
import os
import tarfile
import zipfile

import pytest

from conftest import make_tar


def test_python_json_form_with_args_stdin_env(server):
    code = "import os, sys\nprint(sys.argv[1:], sys.stdin.read(), os.environ['GREETING'], os.getcwd())"
    doc, logs = server.run(code, args=["a", "b c"], stdin="from stdin", env={"GREETING": "hello"})
    assert doc["status"] == "completed" and doc["reason"] == "exit_code" and doc["exit_code"] == 0, doc
    assert logs["stdout"] == "['a', 'b c'] from stdin hello /work\n"
    meta = doc["execution_metadata"]
    assert meta["interpreter"] == "python3" and meta["exit_code"] == 0
    assert meta["cpu_seconds"] > 0 and meta["memory_peak_bytes"] > 0 and meta["wall_time_ms"] > 0
    for field in ("created_at", "started_at", "finished_at", "expires_at"):
        assert doc[field].endswith("Z"), (field, doc[field])


def test_node_job(server):
    doc, logs = server.run("const os = require('os'); console.log(os.userInfo().username, 6 * 7)", "node")
    assert doc["status"] == "completed", (doc, logs)
    assert logs["stdout"] == "sandbox 42\n"


def test_node_worker_threads(server):
    code = ("const { Worker } = require('worker_threads');"
            "new Worker('require(\"worker_threads\").parentPort.postMessage(7)', { eval: true })"
            ".on('message', m => console.log('worker said', m));")
    doc, logs = server.run(code, "node")
    assert logs["stdout"] == "worker said 7\n", (doc, logs)


def test_bash_pipeline_and_coreutils(server):
    doc, logs = server.run("yes | head -1; echo ${PIPESTATUS[@]}; printf 'b\\na\\n' | sort | tr a-z A-Z | paste -sd,; awk 'BEGIN{print 2+2}'", "bash")
    assert logs["stdout"] == "y\n141 0\nA,B\n4\n", (doc, logs)


def test_python_threads_subprocess_and_multiprocessing(server):
    code = (
        "import subprocess, threading, multiprocessing as mp\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())\n"
        "if __name__ == '__main__':\n"
        "    with mp.Pool(2) as p: print(sum(p.map(abs, [-1, -2])))\n"
    )
    doc, logs = server.run(code)
    assert logs["stdout"] == "thread\nchild\n3\n", (doc, logs)


def test_nonzero_exit_is_failed_with_exit_code(server):
    doc, logs = server.run("import sys; print('bye'); sys.exit(3)")
    assert (doc["status"], doc["reason"], doc["exit_code"], doc["signal"]) == ("failed", "exit_code", 3, None)


def test_signal_is_reported(server):
    doc, _ = server.run("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert (doc["status"], doc["reason"], doc["exit_code"], doc["signal"]) == ("failed", "signal", None, 15), doc


def test_non_utf8_output_is_replaced_not_dropped(server):
    doc, logs = server.run("import sys; sys.stdout.buffer.write(b'a\\xffb\\n')")
    assert logs["stdout"] == "a\ufffdb\n"


def test_multipart_tar_gz_with_outputs_glob_and_download(server):
    archive = make_tar([
        ("main.py", "file", b"import csv\nrows = list(csv.reader(open('data.csv')))\n"
                            b"open('plot.png','wb').write(b'\\x89PNG' + str(len(rows)).encode())\nopen('notes.txt','w').write('x')\n"),
        ("data.csv", "file", b"a,b\n1,2\n"),
    ])
    status, _, body = server.submit_files([("job.tar.gz", archive)], {"entrypoint": "main.py", "interpreter": "python3", "outputs": ["*.png"]})
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "completed", doc
    assert list(doc["output_files"]) == ["plot.png"]
    expected = b"\x89PNG2"
    assert doc["output_files"]["plot.png"]["sha256_hash"] == hashlib.sha256(expected).hexdigest()
    status, _, listing = server.json("GET", f"/outputs/{doc['job_id']}")
    assert listing["total_files"] == 1 and listing["files"][0]["mime_type"] == "image/png"
    status, headers, data = server.request("GET", listing["files"][0]["download_url"])
    assert status == 200 and data == expected and headers["content-type"] == "image/png"
    assert headers["content-disposition"].startswith("attachment;")
    status, headers, data = server.request("GET", f"/download/{doc['job_id']}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["plot.png"] and tar.extractfile("plot.png").read() == expected


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_every_tar_compression_is_recognised_by_its_bytes(server, mode):
    archive = make_tar([("src/app.py", "file", b"print('from', __file__)")], mode)
    status, _, body = server.submit_files([("upload.bin", archive)], {"entrypoint": "src/app.py"})
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "completed", doc
    _, _, logs = server.json("GET", f"/logs/{doc['job_id']}")
    assert logs["stdout"] == "from /work/src/app.py\n"


def test_zip_archive_and_plain_files_with_relative_names(server):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/mod.py", "VALUE = 5\n")
    files = [("bundle.zip", buf.getvalue()), ("main.py", b"from pkg.mod import VALUE\nfrom lib.util import f\nprint(VALUE + f())"),
             ("lib/util.py", b"def f(): return 1")]
    status, _, body = server.submit_files(files, {"entrypoint": "main.py"})
    doc = json.loads(body)
    assert doc["status"] == "completed", doc
    _, _, logs = server.json("GET", f"/logs/{doc['job_id']}")
    assert logs["stdout"] == "6\n"


def test_gzip_of_a_plain_file_is_stored_as_a_file(server):

    files = [("main.py", b"import gzip; print(gzip.open('data.gz').read().decode())"), ("data.gz", gzip.compress(b"not a tar"))]
    status, _, body = server.submit_files(files, {"entrypoint": "main.py"})
    doc = json.loads(body)
    _, _, logs = server.json("GET", f"/logs/{doc['job_id']}")
    assert logs["stdout"] == "not a tar\n", (doc, logs)


def test_default_outputs_are_files_created_or_changed(server):
    archive = make_tar([("main.py", "file", b"open('changed.txt','a').write('+')\n"
                                            b"open('new/deep.txt','w').write('n') if __import__('os').makedirs('new') is None else 0\n"),
                        ("changed.txt", "file", b"old"), ("untouched.txt", "file", b"same")])
    status, _, body = server.submit_files([("a.tar", archive)], {"entrypoint": "main.py"})
    doc = json.loads(body)
    assert sorted(doc["output_files"]) == ["changed.txt", "new/deep.txt"], doc
    status, _, data = server.request("GET", f"/download/{doc['job_id']}/new/deep.txt")
    assert (status, data) == (200, b"n")


def test_outputs_globs_directory_and_recursive(server):
    code = ("import os\nos.makedirs('results/sub'); os.makedirs('x/y')\n"
            "for p in ['results/a.txt', 'results/sub/b.txt', 'x/y/c.csv', 'top.csv', 'skip.log']: open(p, 'w').write(p)")
    doc, _ = server.run(code, outputs=["results/", "**/*.csv"])
    assert sorted(doc["output_files"]) == ["results/a.txt", "results/sub/b.txt", "top.csv", "x/y/c.csv"], doc
    doc, _ = server.run(code, outputs=[])
    assert doc["output_files"] == {}


def test_interpreter_from_entrypoint_extension(server):
    status, _, body = server.submit_files([("run.sh", b"echo $0 ${BASH_VERSION%%.*}")], {"entrypoint": "run.sh"})
    doc = json.loads(body)
    _, _, logs = server.json("GET", f"/logs/{doc['job_id']}")
    assert logs["stdout"] == "run.sh 5\n", (doc, logs)


def test_node_heap_follows_memory_limit(server):
    doc, logs = server.run("console.log(require('v8').getHeapStatistics().heap_size_limit < 100 * 1024 * 1024)", "node", memory_mb=64)
    assert logs["stdout"] == "true\n", (doc, logs)


@pytest.mark.parametrize("interpreter,code,expected", [
    ("sh", "echo sh $((6 * 7))", "sh 42\n"),
    ("perl", "print 'perl ', 6 * 7, \"\\n\";", "perl 42\n"),
])
def test_other_interpreters(server, interpreter, code, expected):
    doc, logs = server.run(code, interpreter)
    assert (doc["status"], logs["stdout"]) == ("completed", expected), (doc, logs)


def test_many_quick_jobs_at_once_all_succeed_and_the_runner_never_restarts(server):
    """Concurrent submits contend for the state lock with the runner's claims: nothing may fail."""

    jobs = [("pass", "python3"), ("true", "bash"), ("0", "node"), ("exit 3", "sh")]

    def one(i):
        code, interpreter = jobs[i % 4]
        status, _, doc = server.json("POST", "/submit?wait=60", {"code": code, "interpreter": interpreter})
        return status, interpreter, doc.get("reason"), doc.get("exit_code")

    log_before = os.path.getsize(server.log_path)  # other tests may have stopped the runner on purpose
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outcomes = collections.Counter(pool.map(one, range(160)))
    assert outcomes == {(200, "python3", "exit_code", 0): 40, (200, "bash", "exit_code", 0): 40,
                        (200, "node", "exit_code", 0): 40, (200, "sh", "exit_code", 3): 40}, outcomes
    with open(server.log_path) as f:
        f.seek(log_before)
        assert "runner_died" not in f.read()
