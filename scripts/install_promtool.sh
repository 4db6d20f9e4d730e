#!/usr/bin/env bash
# Installs promtool from Debian's package `prometheus` (2.42 on Debian 12), as root, without leaving a Prometheus
# daemon running: the package's install script would start one on :9090 where an init system runs services, and
# that port belongs to the e2e tests' own Prometheus. Safe to run again: does nothing when promtool is there.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  echo "install_promtool: $(promtool --version 2>&1 | head -n 1)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_promtool: run as root (sudo bash $0)" >&2
  exit 1
fi

# policy-rc.d answering 101 ("action forbidden") makes invoke-rc.d and deb-systemd-invoke skip the start.
# Containers often ship one already; leave theirs alone, remove ours afterwards.
policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  ours=1
fi
trap '[ "$ours" -eq 0 ] || rm -f "$policy"' EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: the package recommends prometheus-node-exporter, another daemon (:9100).
apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# Where systemd runs, also keep the unit from starting at the next boot (and stop it, should it have started).
if [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
echo "install_promtool: $(promtool --version 2>&1 | head -n 1)"
