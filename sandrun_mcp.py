#!/usr/bin/env python3
"""Sandrun for AI agents: a Model Context Protocol (MCP) server over sandrun_client.py.

    pip install -r requirements-mcp.txt          # the official MCP SDK; Sandrun itself does not need it
    SANDRUN_URL=http://127.0.0.1:8443 python3 sandrun_mcp.py          # stdio: an MCP client launches it
    python3 sandrun_mcp.py --http 127.0.0.1:8765                      # streamable HTTP at /mcp

Four tools, each a thin use of one or two of Sandrun's routes:

    run_code     submit code (with stdin, args, extra files, output globs, limits), wait for the end:
                 status, stdout, stderr, output files, and images inline
    get_job      a job's status and logs, for a run that outlived run_code's wait
    read_output  one output file: text, an image, or base64
    cancel_job   stop and delete a job

An error Sandrun answers (400, 404, 413, 429, 503) is a tool error that quotes
its `error` and `details`, and on a 429 when to retry. Every HTTP call goes
through sandrun_client.py; this file holds no HTTP of its own.
"""

import argparse
import base64
import json
import os
import sys
from typing import Annotated, Any, Literal

import anyio
import mcp_types as types
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import BaseModel, Field

from sandrun_client import SandrunClient, SandrunError

#: What a tool's answer carries at most: each log stream (in characters), one image, all images, one read file.
LOG_MAX_CHARS = 20_000
IMAGE_MAX_BYTES = 1 << 20
IMAGES_MAX_BYTES = 4 << 20
READ_MAX_BYTES = 1 << 20
#: Output files shown to the model as pictures.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")
#: The longest run_code or get_job waits before it answers with the job still running.
WAIT_MAX_S = 600
DEFAULT_WAIT_S = 120


class OutputFile(BaseModel):
    name: str = Field(description="its path in the work directory; read it with read_output")
    size: int = Field(description="bytes")
    mime_type: str


class Job(BaseModel):
    """A job as run_code and get_job answer it."""

    job_id: str = Field(description="for get_job, read_output and cancel_job; kept about ten minutes after the end")
    status: Literal["queued", "running", "completed", "failed"]
    reason: str | None = Field(description="why it ended: exit_code, compile_error, timeout, memory_limit, output_limit, cpu_limit, signal, ...")
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool = Field(description="stdout was cut here, or by the server's own cap")
    stderr_truncated: bool
    outputs: list[OutputFile]
    outputs_truncated: bool = Field(description="the server kept only some of the output files")
    wall_time_ms: int | None
    expires_at: str | None = Field(description="when the job and its files are deleted")


class Sandrun:
    """The tools' way to one Sandrun server: the client, and what the server said of itself at start."""

    def __init__(self, url):
        self.client = SandrunClient(url)
        try:
            self.info = self.client.info()
        except (OSError, SandrunError) as exc:  # the server may come up later: the tools say so then
            print(f"sandrun_mcp: {self.client.url} does not answer GET / ({exc}); languages unknown until it does", file=sys.stderr)
            self.info = {"languages": {}, "limits": {}}

    async def call(self, method, *args, **kwargs):
        """A client call in a worker thread (the client blocks); a Sandrun error becomes a tool error."""
        try:
            return await anyio.to_thread.run_sync(lambda: getattr(self.client, method)(*args, **kwargs))
        except SandrunError as exc:
            retry = f" Retry after {exc.retry_after} s." if exc.retry_after is not None else ""
            raise ToolError(f"Sandrun answered {exc.status} {exc.error}: {exc.details}.{retry}") from None
        except OSError as exc:
            raise ToolError(f"Sandrun at {self.client.url} cannot be reached: {exc}") from None

    def extension(self, language):
        """The entrypoint name's extension for a language, as GET / lists it (sh has none of its own)."""
        extensions = self.info["languages"].get(language, {}).get("extensions") or [".sh" if language == "sh" else ""]
        return extensions[0]

    def describe(self):
        """The server's facts an agent should know before it writes code, for the tool descriptions."""
        limits, parts = self.info.get("limits", {}), []
        for name, language in self.info["languages"].items():
            packages = ", ".join(f"{p} {v}" for p, v in language.get("packages", {}).items())
            parts.append(f"{name} {language['version']}" + (" (compiled)" if language["compiles"] else "") +
                         (f" with {packages}" if packages else ""))
        facts = [f"Languages: {'; '.join(parts)}." if parts else "Languages: see the server's GET /."]
        if limits:
            facts.append(f"Per job at most {limits['timeout_seconds_max']} s and {limits['memory_mb_max']} MB; per client "
                         f"{limits['concurrent_jobs_per_ip']} jobs at once and {limits['jobs_per_hour_per_ip']} an hour.")
        return " ".join(facts)


RUN_CODE = """Run a program in a fresh sandbox (no network; its own files only) and wait for it to end.

Returns the status ('completed', or 'failed' with a reason: exit_code, compile_error, timeout,
memory_limit, output_limit, cpu_limit, signal), the exit code, stdout and stderr (each cut to
20000 characters, saying so), and the output files (name, size, MIME type). PNG, JPEG and SVG
outputs also come back as images; read any output with read_output. C and C++ are compiled first.
The job and its files are deleted about ten minutes after it ends."""


def _cut(text, flag):
    return (text[:LOG_MAX_CHARS], True) if len(text) > LOG_MAX_CHARS else (text, flag)


async def job_answer(sandrun, job_id, status, with_images=True):
    """The tool result for a job: the Job as structured content, a summary and the same as JSON
    text, and image outputs as image content (each up to IMAGE_MAX_BYTES, all up to IMAGES_MAX_BYTES)."""
    ended = status["status"] in ("completed", "failed")
    logs = await sandrun.call("get_logs", job_id)
    outputs = await sandrun.call("list_outputs", job_id) if ended else {"files": [], "outputs_truncated": False}
    stdout, stdout_cut = _cut(logs["stdout"], logs.get("stdout_truncated", False))
    stderr, stderr_cut = _cut(logs["stderr"], logs.get("stderr_truncated", False))
    job = Job(job_id=job_id, status=status["status"], reason=status["reason"], exit_code=status["exit_code"],
              stdout=stdout, stderr=stderr, stdout_truncated=stdout_cut, stderr_truncated=stderr_cut,
              outputs=[OutputFile(name=f["name"], size=f["size"], mime_type=f["mime_type"]) for f in outputs["files"]],
              outputs_truncated=outputs.get("outputs_truncated", False),
              wall_time_ms=(status.get("execution_metadata") or {}).get("wall_time_ms"), expires_at=status["expires_at"])
    structured = job.model_dump(mode="json")
    if not ended:
        summary = f"Job {job_id} is still {job.status}; call get_job with its id to wait for the end."
    else:
        how = f"exit code {job.exit_code}" if job.exit_code is not None else job.reason
        summary = f"Job {job_id} {job.status} ({how}); {len(job.outputs)} output file(s)."
    content = [types.TextContent(type="text", text=summary), types.TextContent(type="text", text=json.dumps(structured))]
    budget = IMAGES_MAX_BYTES
    for f in job.outputs if with_images else ():
        if f.mime_type in IMAGE_TYPES and f.size <= min(IMAGE_MAX_BYTES, budget):
            data = await sandrun.call("download_file", job_id, f.name)
            budget -= len(data)
            content.append(types.ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=f.mime_type))
    return types.CallToolResult(content=content, structured_content=structured)


def build(sandrun):
    """The MCP server and its four tools, described with what this Sandrun offers."""
    server = MCPServer("sandrun", log_level="WARNING", instructions=(  # WARNING: no access log lines naming clients
        "Run code in Sandrun's sandbox: no network, no state between jobs, every job and its files deleted "
        "about ten minutes after it ends. " + sandrun.describe()))
    languages = sorted(sandrun.info["languages"])
    Language = Literal[tuple(languages)] if languages else str  # noqa: N806 (a type, made from the server's list)
    JobId = Annotated[str, Field(description="a job id from run_code (job-...); a bearer secret", pattern=r"^job-[a-z0-9-]+$")]  # noqa: N806

    @server.tool(description=f"{RUN_CODE}\n\nThis server: {sandrun.describe()}",
                 annotations=types.ToolAnnotations(destructive_hint=False, idempotent_hint=False, open_world_hint=False))
    async def run_code(
        code: Annotated[str, Field(description="the program's source, saved as main.<extension> in the work directory")],
        language: Annotated[Language, Field(description="the language; see this server's list in the tool description")],
        stdin: Annotated[str | None, Field(description="the program's standard input")] = None,
        args: Annotated[list[str] | None, Field(description="the program's command-line arguments")] = None,
        files: Annotated[dict[str, str] | None, Field(
            description="extra text files for the work directory: relative path -> content (a CSV, a module)")] = None,
        binary_files: Annotated[dict[str, str] | None, Field(
            description="extra binary files: relative path -> base64 of the bytes")] = None,
        outputs: Annotated[list[str] | None, Field(
            description="globs of output files to keep ('*.png', 'out/'); default: every file the job wrote")] = None,
        timeout: Annotated[float | None, Field(gt=0, description="seconds of wall time for the job")] = None,
        memory_mb: Annotated[int | None, Field(gt=0, description="memory limit in MB")] = None,
        wait_seconds: Annotated[int, Field(ge=0, le=WAIT_MAX_S, description=(
            "how long to wait for the end; if the job is still running then, the answer has its job_id "
            "for get_job"))] = DEFAULT_WAIT_S,
    ) -> Annotated[types.CallToolResult, Job]:
        manifest = {k: v for k, v in {"stdin": stdin, "args": args, "outputs": outputs, "timeout": timeout,
                                      "memory_mb": memory_mb}.items() if v is not None}
        wait = min(wait_seconds, 60)
        if files or binary_files:
            entrypoint = "main" + sandrun.extension(language)
            uploads = {entrypoint: code.encode()}
            for name, text in (files or {}).items():
                uploads[name] = text.encode()
            for name, data in (binary_files or {}).items():
                try:
                    uploads[name] = base64.b64decode(data, validate=True)
                except ValueError:
                    raise ToolError(f"binary_files[{name!r}] is not base64") from None
            if len(uploads) != 1 + len(files or {}) + len(binary_files or {}):
                raise ToolError(f"a file is named twice, or {entrypoint!r}, which is the code's own name")
            answer = await sandrun.call("submit_files", list(uploads.items()),
                                        {"entrypoint": entrypoint, "interpreter": language, **manifest}, wait)
        else:
            answer = await sandrun.call("submit_code", code, language, wait=wait, **manifest)
        return await job_answer(sandrun, answer["job_id"], await _wait(sandrun, answer, wait_seconds - wait))

    @server.tool(annotations=types.ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def get_job(
        job_id: JobId,
        wait_seconds: Annotated[int, Field(ge=0, le=WAIT_MAX_S, description="how long to wait for the end, if it has not")] = 0,
    ) -> Annotated[types.CallToolResult, Job]:
        """A job's status, stdout, stderr and output files, as run_code answers; images are not repeated.

        A job is kept about ten minutes after it ends; after that, or after cancel_job, this is an error.
        """
        status = await sandrun.call("get_status", job_id)
        return await job_answer(sandrun, job_id, await _wait(sandrun, status, wait_seconds), with_images=False)

    @server.tool(annotations=types.ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def read_output(
        job_id: JobId,
        path: Annotated[str, Field(description="the output file's name, as run_code or get_job listed it")],
        mode: Annotated[Literal["auto", "text", "base64"], Field(description=(
            "auto: text if it is UTF-8, an image if it is one, else base64; text; or base64"))] = "auto",
    ) -> list[types.TextContent | types.ImageContent]:
        """One output file of a job, up to 1 MiB: as text, as an image, or as base64 with its MIME type."""
        listed = {f["name"]: f for f in (await sandrun.call("list_outputs", job_id))["files"]}
        if path not in listed:
            raise ToolError(f"{job_id} has no output file {path!r}; it has: {', '.join(sorted(listed)) or 'none'}")
        meta = listed[path]
        if meta["size"] > READ_MAX_BYTES:
            raise ToolError(f"{path} is {meta['size']} bytes, more than the {READ_MAX_BYTES} this tool returns; "
                            f"download it from {sandrun.client.url}{meta['download_url']}")
        data = await sandrun.call("download_file", job_id, path)
        if mode == "auto" and meta["mime_type"] in IMAGE_TYPES:
            return [types.ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=meta["mime_type"])]
        if mode != "base64":
            try:
                return [types.TextContent(type="text", text=data.decode("utf-8"))]
            except UnicodeDecodeError:
                if mode == "text":
                    raise ToolError(f"{path} is not UTF-8 text; read it with mode 'base64'") from None
        encoded = json.dumps({"name": path, "mime_type": meta["mime_type"], "size": len(data), "base64": base64.b64encode(data).decode()})
        return [types.TextContent(type="text", text=encoded)]

    @server.tool(annotations=types.ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False))
    async def cancel_job(job_id: JobId) -> dict[str, Any]:
        """Stop a job if it runs, and delete it and its files now; its id is unknown afterwards."""
        await sandrun.call("delete", job_id)
        return {"job_id": job_id, "deleted": True}

    return server


async def _wait(sandrun, status, seconds):
    """The status document once the job has ended, or as it is after `seconds` (`status` may be
    the 202 answer to a submission, which is not one)."""
    if "reason" not in status:
        status = await sandrun.call("get_status", status["job_id"])
    left = seconds
    while status["status"] not in ("completed", "failed") and left > 0:
        step = min(left, 60)
        status = await sandrun.call("get_status", status["job_id"], wait=step)
        left -= step
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(description="Sandrun's MCP server (stdio unless --http).")
    parser.add_argument("--url", default=os.environ.get("SANDRUN_URL"), help="Sandrun's URL (default: SANDRUN_URL, else http://127.0.0.1:8443)")
    parser.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                        help="a Host header to accept over HTTP besides HOST:PORT itself (behind a proxy: its public name)")
    parser.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser Origin to accept over HTTP (none by default; clients that are not browsers send none)")
    options = parser.parse_args(argv)
    server = build(Sandrun(options.url))
    if options.http is None:
        server.run()
        return
    host, _, port = options.http.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--http takes HOST:PORT")
    bind = host.strip("[]")
    security = TransportSecuritySettings(  # DNS rebinding protection: only these Host and Origin headers
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{host}:{port}", *options.allowed_host],
        allowed_origins=options.allowed_origin,
    )
    server.run(transport="streamable-http", host=bind, port=int(port), transport_security=security)


if __name__ == "__main__":
    main()
