#!/usr/bin/env bash
# Build the Dockerfile with podman, run the image as a user would, and check what a user relies on:
#   - the HEALTHCHECK is kept in the image and passes,
#   - the generated dashboard password is in the log, and signs in,
#   - `exec ... python bridge.py keys create` and `tokens add` work on the volume's database,
#   - PID 1 is tini and the bridge runs as uid 10001,
#   - a chat through the emulator (tests/fake_arena.py, on this host) with reCAPTCHA required: Chromium
#     inside the container mints the token through the sidecar,
#   - nothing of the build's CA mount is left in the image; fonts cover CJK and emoji,
#   - `podman stop` (SIGTERM) lets an open stream finish inside the stop timeout, exit code 0,
#   - a new container on the same volume keeps the key, the account and the password, and with
#     BRIDGE_HEADFUL=1 a chat works with Chromium under Xvfb,
#   - a /data the image's user may not write is a one-line error with the fix, not a traceback.
# It prints the build time, the image size, and the container's memory: idle, with headless Chromium
# running, and headful.
#
#   deploy/test-image.sh          # as root; installs podman and runc (and mmdebstrap) with apt-get if missing
#
# When podman cannot run containers here, it says why and exits 0 ("SKIPPED"); IMAGE_TEST_REQUIRED=1 makes
# that a failure. Docker Hub may be unreachable (it is on the CI machines): then the base image is a stand-in
# made with mmdebstrap, a Debian rootfs of the Dockerfile's release with its Python at /usr/local/bin/python,
# as the official image has it, and with that image's apt and dpkg settings (no .deb cache, no docs).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

IMAGE=localhost/lm-arena-bridge:test
NAME=lm-arena-bridge-test-$$
VOLUME=lm-arena-bridge-test-$$
MODEL=gemini-3-pro
STOP_TIMEOUT=10            # podman's and docker's default for `stop`; the image gives streams 8 s of it
started=$(date +%s)
work=$(mktemp -d)
arena_pid=""

say() { echo "test-image: $*"; }
since() {  # since T0: seconds from `date +%s.%N` T0 until now, to a tenth
  python3 -c "import time; print(f'{time.time() - $1:.1f}')"
}
json() {  # json EXPRESSION: a Python expression on the JSON document read from stdin, as `d`
  python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"
}
ok() { echo "test-image:   ok  $*"; }
skip() {
  say "SKIPPED: $*"
  [ "${IMAGE_TEST_REQUIRED:-0}" = 1 ] && exit 1
  exit 0
}
fail() {
  {
    say "FAILED: $*"
    if podman container exists "$NAME" 2>/dev/null; then
      say "--- container log (last 40 lines) ---"
      podman logs "$NAME" 2>&1 | tail -40 | cut -c1-300
    fi
    [ -s "$work/arena.log" ] && { say "--- emulator log (last 10 lines) ---"; tail -10 "$work/arena.log" | cut -c1-200; }
  } >&2
  exit 1
}
cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  [ -n "$arena_pid" ] && kill "$arena_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'fail "line $LINENO: \`$BASH_COMMAND\` failed"' ERR

# --- podman, and whether it can run containers here ---------------------------------------------------

install() {  # Debian packages, only as root on a machine with apt-get
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  say "installing $* with apt-get"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
    >"$work/apt.log" 2>&1 || { tail -5 "$work/apt.log"; return 1; }
}
# runc rather than crun (crun failed here); netavark and the iptables it runs (apt would otherwise pick CNI
# for the build's network, or netavark without iptables); slirp4netns lets the container reach the
# emulator on this host's loopback.
missing=()
for tool in podman runc netavark iptables slirp4netns curl; do
  if command -v dpkg-query >/dev/null; then
    dpkg-query -W -f='${Status}' "$tool" 2>/dev/null | grep -q 'ok installed' || missing+=("$tool")
  elif [ "$tool" != netavark ]; then
    command -v "$tool" >/dev/null || missing+=("$tool")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  install "${missing[@]}" || skip "podman is not installed and cannot be installed here (needs root and apt-get): ${missing[*]}"
fi
podman info >"$work/info.log" 2>&1 || skip "podman cannot start: $(tail -1 "$work/info.log")"

# podman asks for rlimits (nofile 1048576, nproc 4194304) above what root may set without CAP_SYS_RESOURCE,
# as in these VMs; explicit values within the host's hard limits work everywhere.
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ] && nofile=65536
LIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=16384:16384")
RUN=(podman --runtime runc run "${LIMITS[@]}")

# --- the base image -----------------------------------------------------------------------------------

base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
[[ $base =~ ^python:([0-9]+\.[0-9]+)-slim-([a-z]+)$ ]] || fail "cannot read the base image from the Dockerfile: '$base'"
python_version=${BASH_REMATCH[1]} suite=${BASH_REMATCH[2]}
build_args=()
if podman image exists "docker.io/library/$base" || timeout 60 podman pull -q "docker.io/library/$base" >/dev/null 2>&1
then
  say "base image: docker.io/library/$base"
else
  standin=localhost/lm-arena-bridge-base-standin:python$python_version-$suite
  say "base image: $base cannot be pulled; using the stand-in $standin"
  if ! podman image exists "$standin"; then
    command -v mmdebstrap >/dev/null || install mmdebstrap || skip "no base image: $base cannot be pulled and mmdebstrap cannot be installed"
    say "making $standin with mmdebstrap (Debian $suite, python$python_version in a venv at /usr/local)"
    t0=$(date +%s)
    # The official image's apt and dpkg settings: no .deb files kept after install, no docs or locales.
    mirror=http://deb.debian.org/debian
    mmdebstrap --variant=minbase --include="python$python_version,python$python_version-venv,ca-certificates,netbase,tzdata" \
      --aptopt='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; }' \
      --aptopt='APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; }' \
      --aptopt='Dir::Cache::pkgcache ""' --aptopt='Dir::Cache::srcpkgcache ""' \
      --aptopt='Acquire::Languages "none"' --aptopt='Acquire::GzipIndexes "true"' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/groff/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
      --customize-hook="chroot \"\$1\" python$python_version -m venv /usr/local" \
      --customize-hook='rm -f "$1"/usr/local/bin/activate* "$1"/usr/local/bin/Activate.ps1' \
      --format=tar "$suite" "$work/base.tar" \
      "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $mirror-security $suite-security main" \
      >"$work/mmdebstrap.log" 2>&1 || skip "no base image: $base cannot be pulled and mmdebstrap failed:" \
        "$(grep -m1 '^E:' "$work/mmdebstrap.log" || tail -1 "$work/mmdebstrap.log")"
    podman import --change "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" \
      --change "ENV LANG=C.UTF-8" --change 'CMD ["python3"]' "$work/base.tar" "$standin" >/dev/null 2>&1
    rm -f "$work/base.tar"
    say "stand-in made in $(( $(date +%s) - t0 )) s"
  fi
  base=$standin
  build_args=(--build-arg "PYTHON_IMAGE=$standin")
fi
"${RUN[@]}" --rm --network none "$base" true >"$work/probe.log" 2>&1 ||
  skip "podman cannot run a container here: $(grep -m1 -i error "$work/probe.log" || tail -1 "$work/probe.log")"

# --- build --------------------------------------------------------------------------------------------

# pip inside the build trusts the host's CA bundle (a TLS-inspecting egress proxy has its own CA), through
# a folder mounted over /root, root's home during RUN steps, with ~/.config/pip/pip.conf naming it. The
# mount exists during RUN steps only: its target is already in the base image, so nothing is left behind
# (a mount on a new path would leave an empty file or folder in the layer).
mounts=()
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$work/root/.config/pip"
  cp /etc/ssl/certs/ca-certificates.crt "$work/root/host-ca.crt"
  printf '[global]\ncert = /root/host-ca.crt\n' >"$work/root/.config/pip/pip.conf"
  mounts=(-v "$work/root:/root:ro")
fi
say "building $IMAGE (podman build --format docker, so that HEALTHCHECK is kept)"
t0=$(date +%s)
podman build --runtime runc --format docker "${LIMITS[@]}" "${build_args[@]}" "${mounts[@]}" \
  ${IMAGE_TEST_NO_CACHE:+--no-cache} -t "$IMAGE" . >"$work/build.log" 2>&1 ||
  { tail -30 "$work/build.log"; fail "podman build failed"; }
build_seconds=$(( $(date +%s) - t0 ))
cached=$(grep -c -- '--> Using cache' "$work/build.log" || true)
image_mb=$(( $(podman image inspect --format '{{.Size}}' "$IMAGE") / 1000000 ))
ok "built in ${build_seconds} s (steps from the layer cache: $cached), image ${image_mb} MB"
! grep -q -E 'useradd warning|groupadd warning|debconf: unable to initialize frontend' "$work/build.log" ||
  fail "the build warns: $(grep -m1 -E 'useradd warning|groupadd warning|debconf: unable' "$work/build.log")"

# --- the emulator on this host, and a container on a fresh volume ---------------------------------------

arena_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
arena=http://127.0.0.1:$arena_port
python3 tests/fake_arena.py --port "$arena_port" >"$work/arena.log" 2>&1 &
arena_pid=$!
for _ in $(seq 50); do curl -sf "$arena/__emulator/config" >/dev/null && break; sleep 0.1; done
[ "$(curl -sf "$arena/__emulator/config" | json 'd["recaptcha"]')" = required ] || fail "the emulator did not start with reCAPTCHA on"

start() {  # start NAME [OPTION...]: the README's `docker run`, on 127.0.0.1, pointed at the emulator
  local name=$1; shift
  # slirp4netns with allow_host_loopback: 10.0.2.2 in the container is this host's 127.0.0.1.
  "${RUN[@]}" -d --name "$name" --network slirp4netns:allow_host_loopback=true -p "127.0.0.1:$port:8000" \
    -v "$VOLUME:/data" -e "ARENA_URL=http://10.0.2.2:$arena_port" "$@" "$IMAGE" >/dev/null 2>"$work/run.log" ||
    { cat "$work/run.log"; fail "podman run failed"; }
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/api/v1/health" >/dev/null && return 0
    [ "$(podman inspect --format '{{.State.Running}}' "$name")" = true ] || fail "the container exited"
    sleep 0.1
  done
  fail "no answer on /api/v1/health within 30 s"
}
memory() {  # the container's memory use, as podman stats reports it
  podman stats --no-stream --format '{{.MemUsage}}' "$NAME" | cut -d/ -f1 | tr -d ' '
}
bridge=http://127.0.0.1:$port

say "starting a container on a new volume"
t0=$(date +%s.%N)
start "$NAME"
ok "health answers $(since "$t0") s after podman run"

podman healthcheck run "$NAME" >"$work/hc.log" 2>&1 || fail "the image's HEALTHCHECK fails: $(cat "$work/hc.log")"
ok "the HEALTHCHECK is in the image and passes"

password=$(podman logs "$NAME" 2>&1 | sed -n 's/.*generated dashboard password.*: \([A-Za-z0-9_-]*\)$/\1/p')
[ -n "$password" ] || fail "no generated dashboard password in the log"
signin() {
  curl -s -o /dev/null -w '%{http_code} %{redirect_url}' --data-urlencode "password=$password" "$bridge/login"
}
[[ $(signin) == 30[23]\ */dashboard ]] || fail "the logged password does not sign in: $(signin)"
ok "the generated password is in the log and signs in"

key=$(podman exec "$NAME" python bridge.py keys create ci --rpm 60 2>&1 | grep -o 'sk-arena-[A-Za-z0-9_-]*' | head -1)
[ -n "$key" ] || fail "podman exec ... keys create printed no key"
session=$(curl -sf -X POST -d '{}' "$arena/__emulator/session" | json 'd["value"]')
podman exec "$NAME" python bridge.py tokens add "$session" >"$work/tokens.log" 2>&1 ||
  fail "podman exec ... tokens add failed: $(cat "$work/tokens.log")"
accounts=$(curl -sf "$bridge/api/v1/health" | json 'd["checks"]["accounts"]["total"]')
[ "$accounts" = 1 ] || fail "tokens add: the bridge sees $accounts accounts"
ok "podman exec ... keys create and tokens add work"

# PID 1 is tini, its child is the bridge, running as 10001.
who=$(podman exec "$NAME" python -c '
import os
def status(pid):
    return dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
def cmdline(pid):
    return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
bridge = [p for p in pids if cmdline(p).endswith("-m bridge") and status(p)["PPid"] == "1"]
print(os.path.basename(cmdline(1).split()[0]), status(bridge[0])["Uid"].split()[0] if bridge else "none")')
[ "$who" = "tini 10001" ] || fail "expected tini as PID 1 and the bridge as uid 10001, got: $who"
ok "PID 1 is tini; the bridge runs as uid 10001"

# The build's CA bundle and pip configuration were mounts: nothing of them is in the image.
leftovers=$(podman exec --user 0 "$NAME" sh -c 'ls -A /root; ls -d /etc/pip.conf /root/host-ca.crt 2>/dev/null; true' | paste -sd' ')
[ "$leftovers" = ".bashrc .profile" ] || fail "the build left files behind in /root or /etc: $leftovers"
ok "nothing of the build's CA mount is in the image"

# Fonts the page may measure: CJK (Chinese, Japanese, Korean) and emoji (U+1F600) have a font.
for pattern in :lang=zh :lang=ja :lang=ko :charset=1f600; do
  [ -n "$(podman exec "$NAME" fc-list "$pattern" family)" ] || fail "no font in the image for $pattern"
done
ok "fonts cover CJK and emoji: $(podman exec "$NAME" fc-list : family | cut -d, -f1 | sort -u | paste -sd, | sed 's/,/, /g')"

for _ in $(seq 100); do
  curl -sf -H "Authorization: Bearer $key" "$bridge/v1/models" | grep -q "\"$MODEL\"" && break
  sleep 0.2
done
idle_memory=$(memory)

chat() {  # chat TEXT true|false: one chat completion with the key
  curl -s -N --max-time 90 -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL\", \"stream\": $2, \"messages\": [{\"role\": \"user\", \"content\": \"$1\"}]}" \
    "$bridge/v1/chat/completions"
}
recaptcha_chat() {  # recaptcha_chat TEXT HEADFUL: a chat whose token Chromium mints; sets $took
  local t0; t0=$(date +%s.%N)
  chat "$1" false >"$work/chat.json"
  reply=$(json 'd["choices"][0]["message"]["content"]' <"$work/chat.json" 2>/dev/null) ||
    fail "the chat failed: $(head -c 400 "$work/chat.json")"
  [[ $reply == *"$1"* ]] || fail "unexpected reply: $reply"
  sidecar=$(curl -sf -H "Authorization: Bearer $key" "$bridge/api/v1/health" | json 'd["checks"]["sidecar"]["state"], d["checks"]["sidecar"].get("headful")')
  [ "$sidecar" = "running $2" ] || fail "the sidecar after a chat that needed reCAPTCHA: $sidecar (expected running $2)"
  took=$(since "$t0")
}
recaptcha_chat "hello from the image" False
ok "a chat with reCAPTCHA required works: headless Chromium in the container minted the token ($took s)"
browser_memory=$(memory)

# SIGTERM during a ~3 s stream: the stream ends with [DONE], the container exits 0 before the stop timeout.
curl -sf -X POST -d '{"lines": 12, "line_delay": 0.25}' "$arena/__emulator/config" >/dev/null
chat "stream please" true >"$work/stream.txt" &
stream_pid=$!
for _ in $(seq 300); do grep -q 'line 1' "$work/stream.txt" && break; sleep 0.1; done
grep -q 'line 1' "$work/stream.txt" || fail "the stream did not start: $(head -c 400 "$work/stream.txt")"
! grep -q '\[DONE\]' "$work/stream.txt" || fail "the stream ended before SIGTERM: nothing to drain"
t0=$(date +%s.%N)
podman stop -t "$STOP_TIMEOUT" "$NAME" >/dev/null 2>>"$work/podman.log"
stop_seconds=$(since "$t0")
wait "$stream_pid" || true
code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
lines=$(grep -o 'line [0-9]*' "$work/stream.txt" | sort -u | wc -l)
[ "$code" = 0 ] || fail "the container exited with $code after SIGTERM (137: killed at the stop timeout)"
grep -q '^data: \[DONE\]' "$work/stream.txt" && [ "$lines" = 12 ] ||
  fail "the stream was cut by SIGTERM: $lines of 12 lines, $(tail -c 300 "$work/stream.txt")"
ok "SIGTERM: the open stream finished (12 of 12 lines, [DONE]), exit code 0 after ${stop_seconds} s (timeout ${STOP_TIMEOUT} s)"
curl -sf -X POST -d '{"lines": 0, "line_delay": 0}' "$arena/__emulator/config" >/dev/null

# A new container on the same volume: same key, same account, same password, none generated anew.
# This one is headful (BRIDGE_HEADFUL=1: Chromium with a window, under Xvfb).
podman rm "$NAME" >/dev/null 2>>"$work/podman.log"
start "$NAME" -e BRIDGE_HEADFUL=1
! podman logs "$NAME" 2>&1 | grep -q 'generated dashboard password' || fail "a new password was generated"
[[ $(signin) == 30[23]\ */dashboard ]] || fail "the password did not survive the new container"
status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" "$bridge/v1/models")
[ "$status" = 200 ] || fail "the key did not survive the new container: $status"
accounts=$(curl -sf "$bridge/api/v1/health" | json 'd["checks"]["accounts"]["total"]')
[ "$accounts" = 1 ] || fail "the account did not survive the new container: $accounts accounts"
ok "a new container on the same volume keeps the key, the account and the password"
recaptcha_chat "hello from a window" True
ok "with BRIDGE_HEADFUL=1 a chat works: Chromium under Xvfb minted the token ($took s)"
headful_memory=$(memory)

# A host folder the image's user may not write, as with a bind mount someone forgot to chown: one line
# that says what to do, exit code 1, no traceback.
mkdir "$work/data-root"
"${RUN[@]}" --rm --network none -v "$work/data-root:/data" "$IMAGE" >"$work/unwritable.log" 2>&1 && code=0 || code=$?
[ "$code" = 1 ] && grep -q 'chown 10001' "$work/unwritable.log" && ! grep -q Traceback "$work/unwritable.log" ||
  fail "an unwritable /data (exit code $code): $(grep -v systemd "$work/unwritable.log" | tail -5)"
ok "an unwritable /data is one line: $(grep 'chown 10001' "$work/unwritable.log" | cut -c1-200)"

say "PASSED in $(( $(date +%s) - started )) s: build ${build_seconds} s, image ${image_mb} MB," \
  "memory idle ${idle_memory}, with Chromium ${browser_memory}, headful ${headful_memory}"
