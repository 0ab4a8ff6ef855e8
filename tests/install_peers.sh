#!/bin/sh
# Install the real syslog collectors tests/test_forward.py and tests/test_relp.py run (tests/peers.py calls this when they
# are missing; .ci/run calls it up front): rsyslog and rsyslog-relp from apt, and syslog-ng-core -- which conflicts
# with rsyslog as a package -- unpacked into a private prefix. Its libraries do not conflict and
# come from apt. Idempotent: only what is missing is fetched. Needs root (apt).
set -eu
SYSLOG_NG_PREFIX=/opt/peers/syslog-ng
peer_libs="libivykis0 libnet1 libwrap0 libpcre3 libjson-c5 libglib2.0-0 libcap2 libssl3 libsystemd0"
peer_need=""
command -v rsyslogd >/dev/null 2>&1 || [ -x /usr/sbin/rsyslogd ] || peer_need="rsyslog"
# imrelp, rsyslog's RELP input (tests/test_relp.py)
dpkg -s rsyslog-relp >/dev/null 2>&1 || peer_need="$peer_need rsyslog-relp"
for pkg in $peer_libs; do dpkg -s "$pkg" >/dev/null 2>&1 || peer_need="$peer_need $pkg"; done
if [ -n "$peer_need" ] || [ ! -x "$SYSLOG_NG_PREFIX/usr/sbin/syslog-ng" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    [ -z "$peer_need" ] || apt-get install -y -qq $peer_need
    if [ ! -x "$SYSLOG_NG_PREFIX/usr/sbin/syslog-ng" ]; then
        peer_tmp=$(mktemp -d) && chmod 755 "$peer_tmp"
        (cd "$peer_tmp" && apt-get download -o APT::Sandbox::User=root -qq syslog-ng-core)
        mkdir -p "$SYSLOG_NG_PREFIX" && dpkg -x "$peer_tmp"/syslog-ng-core_*.deb "$SYSLOG_NG_PREFIX"
        rm -rf "$peer_tmp"
    fi
fi
