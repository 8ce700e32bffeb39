#!/usr/bin/env bash
# Installs what is missing for liveavatar; the README, CI and the Docker images all run this one script.
#   bash docker/install.sh          runtime: torch, the project and its Python dependencies
#   bash docker/install.sh --cluster  runtime plus Ray Serve (the `cluster` extra), for the hosts of a
#                                   cluster: its front door and its GPU hosts (docs/cluster.md)
#   bash docker/install.sh --dev    also test tools: pytest, playwright, marionette-driver, Ray Serve (the
#                                   cluster tests), and from Debian chromium, firefox-esr, coturn and
#                                   GStreamer's webrtcbin with python3-gi (the interop tests' peers)
#   bash docker/install.sh --deps-only   torch and the runtime dependencies, not the project itself (the
#                                   Dockerfile's first layer: the source changes far more often than they do)
# TORCH_SPEC picks the torch build (default torch==2.13.0, the CPU wheel of this workplace; GPU images
# pass e.g. "torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130").
# PIP_EDITABLE=0 installs the project as a regular package (the Docker image does).
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
cluster=0
deps_only=0
case "${1:-}" in
  "") ;;
  --dev) dev=1 ;;
  --cluster) cluster=1 ;;
  --deps-only) deps_only=1 ;;
  *) echo "usage: bash docker/install.sh [--dev | --cluster | --deps-only]" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
pip_q() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

# torch first: otherwise pip resolves "torch" to the newest CUDA build (several GB).
if ! "$py" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  pip_q ${TORCH_SPEC:-torch==2.13.0}
fi

if [ "$deps_only" = 1 ]; then
  mapfile -t deps < <("$py" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
  pip_q "${deps[@]}"
  exit 0
fi

extras=""
[ "$cluster" = 1 ] && extras="[cluster]"
[ "$dev" = 1 ] && extras="[dev]"  # includes [cluster]
stamp=".install-stamp$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$py" -c "import liveavatar, server, engines" 2>/dev/null; then
  if [ "${PIP_EDITABLE:-1}" = 1 ]; then pip_q -e ".$extras"; else pip_q ".$extras"; fi
  touch "$stamp"
fi

if [ "$dev" = 1 ]; then
  need=()
  command -v chromium >/dev/null || need+=(chromium)
  command -v firefox-esr >/dev/null || need+=(firefox-esr)
  command -v turnserver >/dev/null || need+=(coturn)
  # webrtcbin and its codecs, for Debian's own python3 (tests/gst_peer.py runs under it)
  gst_check="import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0'); \
from gi.repository import Gst, GstWebRTC; Gst.init(None); \
assert all(Gst.ElementFactory.find(e) for e in ('webrtcbin', 'nicesrc', 'vp8dec', 'avdec_h264', 'x264enc', 'opusenc'))"
  if ! /usr/bin/python3 -c "$gst_check" 2>/dev/null; then
    need+=(python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0
           gstreamer1.0-nice gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
           gstreamer1.0-plugins-ugly gstreamer1.0-libav)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
      # coturn's package starts a system service on some hosts; the tests start their own.
      (service coturn stop >/dev/null 2>&1 || true)
    else
      echo "install.sh: missing ${need[*]} (run as root or install them with apt-get)" >&2
    fi
  fi
fi
