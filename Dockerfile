# LM Arena Bridge in one container. State (one SQLite file, and the sidecar's socket beside it) lives
# on a volume at /data.
#
#   docker build -t lm-arena-bridge .
#   docker run -p 8000:8000 -v bridge-data:/data lm-arena-bridge
#
# For byte-for-byte repeatable builds, pin the base image by digest:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# chromium: Debian's build, driven by the sidecar through Playwright (no `playwright install` download).
# fonts-liberation: the metric-compatible Arial/Times/Courier that pages expect (DejaVu comes as a dependency).
# xvfb: a virtual display for BRIDGE_HEADFUL=1; sidecar.py starts Xvfb itself when DISPLAY is unset.
# tini: PID 1 that forwards SIGTERM to the bridge and reaps the browser's orphaned processes.
# libatomic1: needed by the Node.js binary inside the playwright wheel, and not pulled in by the above.
RUN apt-get update \
 && apt-get install -y --no-install-recommends chromium fonts-liberation xvfb tini libatomic1 \
 && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid: a bind-mounted /data must be writable by 10001 (`chown 10001:10001 DIR`).
# /tmp/.X11-unix exists so that Xvfb, started by that user, can create its socket there.
RUN groupadd --system --gid 10001 bridge \
 && useradd --system --uid 10001 --gid bridge --create-home --home-dir /home/bridge --shell /usr/sbin/nologin bridge \
 && mkdir -p /data /tmp/.X11-unix \
 && chown bridge:bridge /data \
 && chmod 1777 /tmp/.X11-unix

WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore -r requirements.txt
COPY bridge.py sidecar.py ./

# PORT rather than BRIDGE_PORT, so that a platform which sets PORT wins, and so can -e BRIDGE_PORT.
# BRIDGE_SHUTDOWN_TIMEOUT=8 lets open streams finish inside `docker stop`'s default 10 s.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/bridge \
    BRIDGE_HOST=0.0.0.0 \
    PORT=8000 \
    BRIDGE_DB=/data/bridge.db \
    BRIDGE_BROWSER=/usr/bin/chromium \
    BRIDGE_HEADFUL=0 \
    BRIDGE_SHUTDOWN_TIMEOUT=8

VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000

# "degraded" (no usable account yet) is still 200: the container is healthy when the server answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('BRIDGE_PORT') or os.environ.get('PORT') or '8000'; urllib.request.urlopen('http://127.0.0.1:' + port + '/api/v1/health', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "-s", "--"]
CMD ["python", "bridge.py"]
