"""Production settings for `gunicorn app:app`. Workers are processes (the API is I/O- and
database-bound); threads let one slow client not hold a whole worker."""
import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:5000")
workers = int(os.environ.get("GUNICORN_WORKERS", min(2 * multiprocessing.cpu_count() + 1, 9)))
threads = int(os.environ.get("GUNICORN_THREADS", 4))
worker_class = "gthread"
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = "-"
access_log_format = '{"remote": "%(h)s", "request": "%(r)s", "status": %(s)s, "bytes": "%(b)s", "ms": %(M)s}'
errorlog = "-"
# Build the app in each worker after fork: database pools must not be shared across processes.
preload_app = False
