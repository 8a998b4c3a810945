#!/usr/bin/env python3
"""Sandrun's Python client: one file, standard library only. A module and a command.

As a module:

    from sandrun_client import SandrunClient
    result = SandrunClient("http://127.0.0.1:8443").run_and_wait(code="print(6 * 7)", interpreter="python3")
    result["logs"]["stdout"]                      # '42\\n'
    SandrunClient(url).run_and_wait(directory="project/", entrypoint="main.py")

As a command (SANDRUN_URL names the server; the exit status is the job's):

    python3 sandrun_client.py run main.py [args...]          # the interpreter from the extension
    python3 sandrun_client.py run --dir project/ --entrypoint main.py
    python3 sandrun_client.py run - --interpreter bash < script.sh
    python3 sandrun_client.py run --follow --outputs '*.png' --download-to out/ plot.py

Options come before the program: whatever follows it is the program's own.

Every error the server answers raises SandrunError, which carries the HTTP
status, the server's `error` and `details`, and on a 429 `retry_after`.
"""

import argparse
import http.client
import io
import json
import os
import sys
import tarfile
import time
import urllib.parse
import uuid

DEFAULT_URL = "http://127.0.0.1:8443"
WAIT_S = 60  # the longest long-poll the server holds


class SandrunError(Exception):
    """An answer other than success: `status` (HTTP), `error`, `details`, and `retry_after` on a 429."""

    def __init__(self, status, error, details, retry_after=None):
        super().__init__(f"{status} {error}: {details}")
        self.status, self.error, self.details, self.retry_after = status, error, details, retry_after


class SandrunClient:
    def __init__(self, url=None, timeout=WAIT_S + 30):
        self.url = (url or os.environ.get("SANDRUN_URL") or DEFAULT_URL).rstrip("/")
        self.timeout = timeout

    # Submitting

    def submit_code(self, code, interpreter, wait=None, **manifest):
        """Submit a snippet; the answer (queued, or the status document if it ended within `wait` s)."""
        body = json.dumps({"code": code, "interpreter": interpreter, **manifest}).encode()
        return self._json("POST", "/submit" + _query(wait=wait), body, {"Content-Type": "application/json"})

    def submit_directory(self, directory, entrypoint, wait=None, **manifest):
        """Submit a directory (packed as one .tar.gz); `entrypoint` is relative to it."""
        packed = io.BytesIO()
        with tarfile.open(fileobj=packed, mode="w:gz") as tar:
            for name in sorted(os.listdir(directory)):
                tar.add(os.path.join(directory, name), arcname=name)
        return self.submit_files([("project.tar.gz", packed.getvalue())], {"entrypoint": entrypoint, **manifest}, wait)

    def submit_files(self, files, manifest, wait=None):
        """Submit [(filename, bytes)], each a file or an archive, with a manifest dict."""
        body, content_type = _multipart({"manifest": json.dumps(manifest)}, files)
        return self._json("POST", "/submit" + _query(wait=wait), body, {"Content-Type": content_type})

    # Reading

    def info(self):
        """GET /: the service, its languages (with versions and python3's packages), limits and queue."""
        return self._json("GET", "/")

    def get_status(self, job_id, wait=None):
        return self._json("GET", f"/status/{job_id}" + _query(wait=wait))

    def wait_for_completion(self, job_id, timeout=None):
        """The status document once the job has ended; SandrunError(408) if `timeout` s pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_S if deadline is None else max(0, min(WAIT_S, deadline - time.monotonic()))
            status = self.get_status(job_id, wait=left)
            if status["status"] in ("completed", "failed"):
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise SandrunError(408, "timeout", f"{job_id} had not ended after {timeout} s")

    def get_logs(self, job_id):
        return self._json("GET", f"/logs/{job_id}")

    def follow(self, job_id):
        """(event, text) as the job writes: 'stdout' and 'stderr' events, then 'status' (its data is the document)."""
        with self._open("GET", f"/logs/{job_id}?follow=1") as response:
            event, data = None, []
            for raw in response:
                line = raw.decode("utf-8").rstrip("\n")
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: "):
                    data.append(line[len("data: "):])
                elif line == "" and event is not None:
                    yield event, "\n".join(data)
                    event, data = None, []

    def list_outputs(self, job_id):
        return self._json("GET", f"/outputs/{job_id}")

    def download_file(self, job_id, name, dest=None):
        """An output file's bytes; with `dest` (a file path or a directory) written there and the path returned."""
        with self._open("GET", f"/download/{job_id}/{urllib.parse.quote(name)}") as response:
            data = response.read()
        if dest is None:
            return data
        path = os.path.join(dest, name) if os.path.isdir(dest) else dest
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def delete(self, job_id):
        self._open("DELETE", f"/jobs/{job_id}").close()

    # All at once

    def run_and_wait(self, code=None, interpreter=None, directory=None, entrypoint=None, timeout=None, **manifest):
        """Submit code or a directory, wait for the end: {job_id, status, logs, output_files}."""
        if (code is None) == (directory is None):
            raise ValueError("give code= or directory=, not both")
        if code is not None:
            answer = self.submit_code(code, interpreter, wait=WAIT_S, **manifest)
        else:
            extra = {"interpreter": interpreter} if interpreter else {}
            answer = self.submit_directory(directory, entrypoint, wait=WAIT_S, **extra, **manifest)
        job_id = answer["job_id"]
        status = answer if answer["status"] in ("completed", "failed") else self.wait_for_completion(job_id, timeout)
        logs = self.get_logs(job_id)
        return {"job_id": job_id, "status": status, "logs": {"stdout": logs["stdout"], "stderr": logs["stderr"]},
                "output_files": self.list_outputs(job_id)["files"]}

    # HTTP

    def _open(self, method, path, body=None, headers=None):
        """One request, its response open. A server may answer before it has read the whole body
        (413 from Content-Length, 503 storage full) and close: then sending fails, and the
        answer, already on its way, is read rather than lost."""
        url = urllib.parse.urlsplit(self.url)
        kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = kind(url.hostname, url.port, timeout=self.timeout)
        try:
            conn.putrequest(method, url.path.rstrip("/") + path)
            for name, value in {**(headers or {}), "Content-Length": str(len(body or b""))}.items():
                conn.putheader(name, value)
            conn.endheaders()
            try:
                view = memoryview(body or b"")
                for at in range(0, len(view), 1 << 16):
                    conn.send(view[at : at + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered early: the answer is read below
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if response.status < 400:
            return response
        with response:
            raw = response.read()
        conn.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {"error": response.reason, "details": raw.decode(errors="replace")[:300]}
        retry = response.headers.get("Retry-After")
        raise SandrunError(response.status, doc.get("error", response.reason), doc.get("details", ""),
                           int(retry) if retry and retry.isdigit() else None)

    def _json(self, method, path, body=None, headers=None):
        with self._open(method, path, body, headers) as response:
            return json.loads(response.read())


def _query(**params):
    params = {k: v for k, v in params.items() if v is not None}
    return "?" + urllib.parse.urlencode(params) if params else ""


def _multipart(fields, files):
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{quoted}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# The command --------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sandrun_client.py", description="Run code on a Sandrun server ($SANDRUN_URL, "
                                     f"default {DEFAULT_URL}). The exit status is the job's.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a file, a directory (--dir) or stdin (-)")
    run.add_argument("file", nargs="?", help="the program; - reads it from stdin")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program")
    run.add_argument("--dir", help="a project directory to upload (with --entrypoint)")
    run.add_argument("--entrypoint", help="the program inside --dir")
    run.add_argument("--interpreter", help="python3, node, bash, ... (default: from the extension)")
    run.add_argument("--stdin", metavar="FILE", help="feed this file to the program's stdin")
    run.add_argument("--timeout", type=float, help="seconds")
    run.add_argument("--memory-mb", type=int)
    run.add_argument("--outputs", action="append", metavar="GLOB", help="which files to keep (repeatable)")
    run.add_argument("--download-to", metavar="DIR", help="download the output files here")
    run.add_argument("--follow", action="store_true", help="stream stdout and stderr as the job writes them")
    options = parser.parse_args(argv)
    client = SandrunClient()
    manifest = {k: v for k, v in (("timeout", options.timeout), ("memory_mb", options.memory_mb), ("outputs", options.outputs)) if v is not None}
    if options.stdin:
        with open(options.stdin, encoding="utf-8") as f:
            manifest["stdin"] = f.read()
    if options.interpreter:
        manifest["interpreter"] = options.interpreter
    try:
        if options.dir:
            if not options.entrypoint:
                parser.error("--dir needs --entrypoint")
            args = ([options.file] if options.file else []) + options.args
            answer = client.submit_directory(options.dir, options.entrypoint, args=args, **manifest)
        elif options.file == "-":
            answer = client.submit_code(sys.stdin.read(), manifest.pop("interpreter", "python3"), args=options.args, **manifest)
        elif options.file:
            with open(options.file, "rb") as f:
                source = f.read()
            name = os.path.basename(options.file)
            answer = client.submit_files([(name, source)], {"entrypoint": name, "args": options.args, **manifest})
        else:
            parser.error("give a file, - or --dir")
        job_id = answer["job_id"]
        if options.follow:
            for event, text in client.follow(job_id):
                if event in ("stdout", "stderr"):
                    stream = sys.stdout if event == "stdout" else sys.stderr
                    stream.write(text)
                    stream.flush()
            status = client.get_status(job_id)
        else:
            status = client.wait_for_completion(job_id)
            logs = client.get_logs(job_id)
            sys.stdout.write(logs["stdout"])
            sys.stderr.write(logs["stderr"])
        if options.download_to:
            os.makedirs(options.download_to, exist_ok=True)
            for output in client.list_outputs(job_id)["files"]:
                client.download_file(job_id, output["name"], os.path.join(options.download_to, output["name"]))
    except SandrunError as exc:
        print(f"sandrun: {exc.error}: {exc.details}" + (f" (retry in {exc.retry_after} s)" if exc.retry_after else ""), file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sandrun: cannot reach {client.url}: {exc}", file=sys.stderr)
        return 2
    if status["exit_code"] is not None:
        return status["exit_code"]
    if status["signal"] is not None:
        return 128 + status["signal"]
    print(f"sandrun: the job ended: {status['reason']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
