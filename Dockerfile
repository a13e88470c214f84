# LM Arena Bridge in one container. State (one SQLite file, and the sidecar's socket beside it) lives
# on a volume at /data.
#
#   docker build -t lm-arena-bridge .            # podman: podman build --format docker (keeps HEALTHCHECK)
#   docker run -p 127.0.0.1:8000:8000 -v bridge-data:/data lm-arena-bridge
#
# The Python packages are locked with hashes (requirements.lock, every indirect one too). The base image
# and Debian's packages are whatever the tag and the mirror serve on the day of the build; pin the base by
# digest to fix the former: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
# deploy/test-image.sh builds and runs this file for real and checks what a user relies on.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# An ARG, not an ENV: apt-get stays quiet during the build and the running container is not affected.
ARG DEBIAN_FRONTEND=noninteractive

# chromium: Debian's build, driven by the sidecar through Playwright (no `playwright install` download).
# Fonts: a browser that draws emoji and CJK text as empty boxes is unlike any desktop one, and page
# scripts can measure rendered text. fonts-liberation (the metric-compatible Arial/Times/Courier that
# pages expect), fonts-noto-color-emoji, and fonts-wqy-microhei for Chinese, Japanese and Korean (5 MB,
# where fonts-noto-cjk takes 90 MB).
# xvfb, xauth: a virtual display for BRIDGE_HEADFUL=1; sidecar.py starts one with xvfb-run when DISPLAY
# is unset, and xvfb-run needs xauth (only a recommendation of xvfb's).
# tini: PID 1 that forwards SIGTERM to the bridge and reaps the browser's orphaned processes.
# libatomic1: needed by the Node.js binary inside the playwright wheel, and not pulled in by the above.
RUN apt-get update \
 && apt-get install -y --no-install-recommends chromium fonts-liberation fonts-noto-color-emoji \
      fonts-wqy-microhei xvfb xauth tini libatomic1 \
 && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid: a bind-mounted /data must be writable by 10001 (`chown 10001:10001 DIR`).
# Not --system: system ids end at 999, and useradd warns about 10001 there; --no-log-init: no lastlog
# and faillog entries for it.
# /tmp/.X11-unix exists so that Xvfb, started by that user, can create its socket there.
RUN groupadd --gid 10001 bridge \
 && useradd --uid 10001 --gid bridge --no-log-init --create-home --home-dir /home/bridge --shell /usr/sbin/nologin bridge \
 && mkdir -p /data /tmp/.X11-unix \
 && chown bridge:bridge /data \
 && chmod 1777 /tmp/.X11-unix

WORKDIR /app
# requirements.lock is requirements.txt resolved with every indirect package, each with its hashes
# (regenerate it as its header says): pip refuses any file whose hash differs.
COPY requirements.lock ./
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
      --require-hashes --no-deps -r requirements.lock
COPY bridge.py sidecar.py ./
# The bridge starts as a module from this bytecode (CMD below); PYTHONDONTWRITEBYTECODE only stops the
# running container from writing any, and /app is not the bridge user's to write.
RUN python -m compileall -q bridge.py

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
# `-m bridge`, not `bridge.py`: CPython keeps a script's whole syntax tree until the script returns, that
# is for the server's life (about 20 MB of the bridge's 70 MB idle), and parses it anew on every start; a
# module is loaded from the bytecode above, and `import`'s compiler drops the tree at once.
CMD ["python", "-m", "bridge"]
