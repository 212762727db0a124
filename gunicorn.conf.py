"""Production settings for `gunicorn app:app`. Workers are processes (the API is I/O- and
database-bound); threads let one slow client not hold a whole worker."""

import multiprocessing
import os
import shutil
import sys
import tempfile

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:5000")
workers = int(os.environ.get("GUNICORN_WORKERS", min(2 * multiprocessing.cpu_count() + 1, 9)))
# Each open event stream (GET /api/events, Server-Sent Events) holds one thread for its whole life: a
# worker serves at most EVENTS_MAX_STREAMS of them (default 8, more get 503 `too_many_streams`), so
# GUNICORN_THREADS must stay above it or streams would leave no thread for other requests. gthread's
# `timeout` watches the worker process, not a request, so a long stream does not get the worker killed.
threads = int(os.environ.get("GUNICORN_THREADS", 16))
worker_class = "gthread"
_event_streams = int(os.environ.get("EVENTS_MAX_STREAMS", 8))
if _event_streams >= threads:
    sys.stderr.write(
        f"warning: EVENTS_MAX_STREAMS ({_event_streams}) >= GUNICORN_THREADS ({threads}): open "
        "event streams can take every thread of a worker; raise GUNICORN_THREADS\n"
    )
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = "-"
logger_class = "src.access_log.RedactingLogger"  # writes `?token=[redacted]`: tokens in URLs stay out of logs
access_log_format = (
    '{"remote": "%(h)s", "request": "%(r)s", "status": %(s)s, "bytes": "%(b)s", "ms": %(M)s, "pid": "%(p)s"}'
)
errorlog = "-"
# Build the app in each worker after fork: database pools must not be shared across processes.
preload_app = False

# /metrics across workers: prometheus_client's multiprocess mode. Each worker writes its HTTP counters to
# files in PROMETHEUS_MULTIPROC_DIR and a scrape (on whichever worker) sums them, so counters never jump
# back between scrapes. Set here, in the master, before any worker imports prometheus_client. A directory
# we make is ours to delete at exit; one given is emptied at start (old files would add to new counts).
_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gpusnap-metrics-")


def on_starting(server):  # type: ignore[no-untyped-def]
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # its live gauges go; its counters stay in the sum


def on_exit(server):  # type: ignore[no-untyped-def]
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
