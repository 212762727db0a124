"""`gunicorn app:app` (see gunicorn.conf.py). The worker runs separately: `gpusnap worker`."""

from src.app import create_app

app = create_app()
