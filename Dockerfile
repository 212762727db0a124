# The control plane: one image, several roles (docker/entrypoint.sh): `api` (the default), `worker`,
# `migrate`, `serve` (API and worker in one container), or any command (`gpusnap tokens create me`).
# compose.yaml runs api + worker + PostgreSQL + Redis. A worker in its own container must share the API's
# DATABASE_URL and REDIS_URL: with the SQLite defaults each container would have a database of its own.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends openssh-client tar \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 gpusnap \
    && install -d -m 0700 -o gpusnap /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY migrations ./migrations
COPY alembic.ini app.py gunicorn.conf.py ./
COPY docker/entrypoint.sh /usr/local/bin/gpusnap-entrypoint
# Editable: migrations/, alembic.ini and app.py are found beside src/ (see src/migrate.py). The app only:
# no test extras in the image.
RUN pip install --no-cache-dir -e . && chmod 0755 /usr/local/bin/gpusnap-entrypoint

USER gpusnap
# Defaults for a single container (`docker run -v gpusnap:/data ... serve`); compose.yaml overrides them.
ENV DATABASE_URL=sqlite:////data/gpusnap.db \
    QUEUE_PATH=/data/queue.db \
    GUNICORN_BIND=0.0.0.0:5000 \
    GPUSNAP_HOME=/app \
    SSH_KEY_PATH=/run/secrets/gpusnap_ssh_key
VOLUME /data
EXPOSE 5000
ENTRYPOINT ["gpusnap-entrypoint"]
CMD ["api"]
