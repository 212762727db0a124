# The control plane: API (gunicorn) and worker from one image; run the worker with `gpusnap worker`.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends openssh-client tar \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 gpusnap

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY migrations ./migrations
COPY alembic.ini app.py gunicorn.conf.py ./
# Editable: migrations/, alembic.ini and app.py are found beside src/ (see src/migrate.py).
RUN pip install --no-cache-dir -e .

USER gpusnap
ENV DATABASE_URL=sqlite:////home/gpusnap/gpusnap.db \
    QUEUE_PATH=/home/gpusnap/queue.db \
    GUNICORN_BIND=0.0.0.0:5000
EXPOSE 5000
# Migrate, then serve the API. Start workers from the same image: `docker run … gpusnap worker`.
CMD ["sh", "-c", "gpusnap db upgrade && exec gunicorn --config gunicorn.conf.py app:app"]
