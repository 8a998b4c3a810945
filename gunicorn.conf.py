"""gunicorn settings for Sandrun's HTTP front end.

Run:      gunicorn -c gunicorn.conf.py sandrun:app
Validate: gunicorn --check-config -c gunicorn.conf.py sandrun:app
Only non-default settings are here, each with its reason. Every value that
an operator may change is a SANDRUN_* environment variable read by
sandrun.py (README lists them), so this file stays declarative.
"""

import sys

import sandrun

# Server socket
bind = [sandrun.HTTP_BIND]  # SANDRUN_BIND; plain HTTP on loopback, TLS is the proxy's job

# Worker processes
# gthread (?wait long-polls park a thread, not a whole process; workers never fork), with a
# deadline for reading a request and a cap on the threads one address holds (sandrun.py 7.1)
worker_class = "sandrun.ThreadWorker"
workers = sandrun.HTTP_WORKERS  # no state lives in a worker: any worker answers any request
threads = sandrun.HTTP_THREADS
timeout = 30  # seconds of worker silence before it is restarted; gthread workers report in while requests wait
graceful_timeout = 10  # seconds; a long-poll is cut short at shutdown rather than held
keepalive = 5  # seconds

# Security
user = sandrun.HTTP_USER  # workers parse hostile HTTP, multipart and archives: never as root
group = sandrun.HTTP_USER
limit_request_line = 8190  # bytes; the longest valid line is a download path of 1024 bytes, escaped
limit_request_fields = 64
limit_request_field_size = 8190  # bytes
forwarded_allow_ips = sandrun.FORWARDED_ALLOW_IPS  # SANDRUN_FORWARDED_ALLOW_IPS; empty: trust no proxy

# Server mechanics
preload_app = True  # the app is imported by the root master, so workers need no read access to the checkout
control_socket_disable = True  # gunicorn 27's control socket runs a thread in the master, which forks the runner
worker_tmp_dir = "/dev/shm"  # heartbeat files on tmpfs, never on disk

# Logging
accesslog = None  # an access log would record client addresses; Sandrun keeps none
errorlog = "-"
loglevel = "info"


# Server hooks
def on_starting(server):
    """Refuse to serve on a host that cannot jail: check it, prepare state and cgroups."""
    try:
        sandrun.server_start()
    except sandrun.HostError as exc:
        server.log.error("sandrun cannot serve: %s", exc)
        sys.exit(1)


def when_ready(server):
    sandrun.runner_launch()  # before any worker thread exists; the master is single-threaded here


def post_worker_init(worker):
    sandrun.worker_start()


def on_exit(server):
    sandrun.server_stop()
