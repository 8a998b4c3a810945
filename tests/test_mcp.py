"""sandrun_mcp.py, driven by the MCP SDK's own client over stdio (and once over streamable HTTP),
against a real Sandrun server: the jobs run in the real jail."""

import base64
import http.client
import json
import os
import subprocess
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters

from conftest import ROOT, SUITE_ENV, Server, _free_port, eventually

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sandrun_server():
    """Two jobs at once per client, so that a 429 is in reach; the MCP server is one client."""
    srv = Server({**SUITE_ENV, "SANDRUN_RATE_CONCURRENT_JOBS": "2"}, "mcp").start()
    yield srv
    srv.stop()


def over_stdio(server, scenario):
    """Launch sandrun_mcp.py as an MCP client launches it, and run `scenario(client)` against it."""
    params = StdioServerParameters(command=sys.executable, args=[os.path.join(ROOT, "sandrun_mcp.py")], cwd=ROOT,
                                   env={**os.environ, "SANDRUN_URL": f"http://127.0.0.1:{server.port}"})

    async def main():
        async with Client(params, read_timeout_seconds=120) as client:
            return await scenario(client)

    return anyio.run(main)


def text_of(result):
    return "\n".join(block.text for block in result.content if block.type == "text")


def test_the_tools_and_their_schemas(sandrun_server):
    languages = sandrun_server.json("GET", "/")[2]["languages"]

    async def scenario(client):
        return {tool.name: tool for tool in (await client.list_tools()).tools}

    tools = over_stdio(sandrun_server, scenario)
    assert set(tools) == {"run_code", "get_job", "read_output", "cancel_job"}
    run = tools["run_code"]
    assert run.input_schema["required"] == ["code", "language"]
    assert run.input_schema["properties"]["language"]["enum"] == sorted(languages)  # this server's list
    assert {"stdin", "args", "files", "binary_files", "outputs", "timeout", "memory_mb", "wait_seconds"} <= set(run.input_schema["properties"])
    assert {"job_id", "status", "reason", "exit_code", "stdout", "stderr", "stdout_truncated", "outputs"} <= set(run.output_schema["required"])
    python = languages["python3"]
    assert f"python3 {python['version']} with numpy {python['packages']['numpy']}" in run.description  # what this server offers
    assert tools["get_job"].output_schema == run.output_schema
    assert tools["read_output"].output_schema is None  # text or an image, as it is
    assert tools["cancel_job"].annotations.destructive_hint and tools["get_job"].annotations.read_only_hint
    assert tools["get_job"].input_schema["properties"]["job_id"]["pattern"]


def test_python_and_bash_with_stdin_and_args(sandrun_server):
    async def scenario(client):
        py = await client.call_tool("run_code", {"code": "import sys\nprint(sys.stdin.read().upper(), sys.argv[1:])",
                                                 "language": "python3", "stdin": "hello", "args": ["a", "b c"]})
        sh = await client.call_tool("run_code", {"code": 'read x; echo "$x-$1"; echo oops >&2; exit 3',
                                                 "language": "bash", "stdin": "in\n", "args": ["arg"]})
        return py, sh

    py, sh = over_stdio(sandrun_server, scenario)
    assert not py.is_error, text_of(py)
    assert py.structured_content["status"] == "completed" and py.structured_content["stdout"] == "HELLO ['a', 'b c']\n"
    assert py.structured_content["job_id"] in text_of(py) and "completed" in text_of(py)
    assert json.loads(py.content[1].text) == py.structured_content  # the same, as text, for clients without structured content
    job = sh.structured_content
    assert not sh.is_error and (job["status"], job["reason"], job["exit_code"]) == ("failed", "exit_code", 3)
    assert (job["stdout"], job["stderr"]) == ("in-arg\n", "oops\n")


def test_a_data_file_in_and_a_table_and_a_plot_out(sandrun_server):
    code = ("import csv\nimport matplotlib.pyplot as plt\nrows = list(csv.DictReader(open('data.csv')))\n"
            "total = sum(float(r['v']) for r in rows)\nopen('out/total.txt', 'w').write(f'{total}\\n')\n"
            "plt.plot([float(r['v']) for r in rows])\nplt.savefig('out/plot.png', dpi=40)\n"
            "open('out/raw.bin', 'wb').write(bytes(range(256)))\nprint(len(rows))")

    async def scenario(client):
        run = await client.call_tool("run_code", {"code": code, "language": "python3", "outputs": ["out/"],
                                                  "files": {"data.csv": "v\n1.5\n2.5\n"},
                                                  "binary_files": {"out/.keep": base64.b64encode(b"").decode()}})
        job_id = run.structured_content["job_id"]
        text = await client.call_tool("read_output", {"job_id": job_id, "path": "out/total.txt"})
        image = await client.call_tool("read_output", {"job_id": job_id, "path": "out/plot.png"})
        raw = await client.call_tool("read_output", {"job_id": job_id, "path": "out/raw.bin"})
        missing = await client.call_tool("read_output", {"job_id": job_id, "path": "nope.txt"})
        return run, text, image, raw, missing

    run, text, image, raw, missing = over_stdio(sandrun_server, scenario)
    job = run.structured_content
    assert not run.is_error and (job["status"], job["stdout"]) == ("completed", "2\n"), text_of(run)
    assert {f["name"]: f["mime_type"] for f in job["outputs"]} == {"out/.keep": "application/octet-stream", "out/total.txt": "text/plain",
                                                                   "out/plot.png": "image/png", "out/raw.bin": "application/octet-stream"}
    images = [block for block in run.content if block.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png" and base64.b64decode(images[0].data).startswith(PNG)
    assert text.content[0].text == "4.0\n"
    assert image.content[0].type == "image" and base64.b64decode(image.content[0].data).startswith(PNG)
    doc = json.loads(raw.content[0].text)  # not UTF-8: base64 with its type
    assert base64.b64decode(doc["base64"]) == bytes(range(256)) and doc["mime_type"] == "application/octet-stream"
    assert missing.is_error and "no output file 'nope.txt'" in text_of(missing)


def test_server_errors_are_tool_errors_that_quote_the_server(sandrun_server):
    sleepers = [sandrun_server.start_sleeper(60) for _ in range(2)]  # this client's two jobs at once

    async def scenario(client):
        too_many = await client.call_tool("run_code", {"code": "print(1)", "language": "python3"})
        return too_many

    try:
        too_many = over_stdio(sandrun_server, scenario)
    finally:
        for job_id in sleepers:
            sandrun_server.request("DELETE", f"/jobs/{job_id}")
    assert too_many.is_error and "429 rate limit exceeded" in text_of(too_many) and "Retry after 5 s" in text_of(too_many), text_of(too_many)
    eventually(lambda: sandrun_server.json("GET", "/stats")[2]["your_quota"]["active_jobs"] == 0, what="the sleepers' end")

    async def scenario(client):
        return await client.call_tool("run_code", {"code": "print(1)", "language": "python3", "memory_mb": 100000})

    bad = over_stdio(sandrun_server, scenario)
    assert bad.is_error and "400 invalid manifest" in text_of(bad) and "memory_mb" in text_of(bad), text_of(bad)


def test_a_long_run_returns_its_id_and_can_be_cancelled(sandrun_server):
    async def scenario(client):
        started = await client.call_tool("run_code", {"code": "import time\nprint('up', flush=True)\ntime.sleep(60)",
                                                      "language": "python3", "wait_seconds": 0})
        job_id = started.structured_content["job_id"]
        for _ in range(100):
            running = await client.call_tool("get_job", {"job_id": job_id})
            if running.structured_content["stdout"] == "up\n":
                break
            await anyio.sleep(0.1)
        cancelled = await client.call_tool("cancel_job", {"job_id": job_id})
        gone = await client.call_tool("get_job", {"job_id": job_id})
        return started, running, cancelled, gone

    started, running, cancelled, gone = over_stdio(sandrun_server, scenario)
    assert started.structured_content["status"] in ("queued", "running") and "still" in text_of(started)
    assert running.structured_content["status"] == "running" and running.structured_content["stdout"] == "up\n"
    assert cancelled.structured_content == {"job_id": started.structured_content["job_id"], "deleted": True}
    assert gone.is_error and "404 not found" in text_of(gone)


def test_over_streamable_http_with_host_checks(sandrun_server, tmp_path):
    port, log = _free_port(), tmp_path / "mcp.log"
    env = {**os.environ, "SANDRUN_URL": f"http://127.0.0.1:{sandrun_server.port}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sandrun_mcp.py"), "--http", f"127.0.0.1:{port}"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def post(headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("POST", "/mcp", body=b"{}", headers={"Content-Type": "application/json", **headers})
            return conn.getresponse().status
        finally:
            conn.close()

    def first_answer():
        assert proc.poll() is None, log.read_text()
        try:
            return post({"Host": "evil.example"})
        except OSError:
            return None  # not listening yet

    try:
        assert eventually(first_answer, 30, "the MCP server's first answer", interval=0.2) == 421  # a Host it does not serve
        assert post({"Origin": "https://evil.example"}) == 403  # nor a browser page of another origin

        async def main():
            async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=120) as client:
                return await client.call_tool("run_code", {"code": "print(6 * 7)", "language": "python3"})

        result = anyio.run(main)
        assert not result.is_error and result.structured_content["stdout"] == "42\n", text_of(result)
    finally:
        proc.terminate()
        proc.wait(10)
    assert "POST /mcp" not in log.read_text() and "127.0.0.1:" not in log.read_text(), log.read_text()  # no request lines
