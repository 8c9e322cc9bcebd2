#!/bin/bash
# The image's HEALTHCHECK: GET /health on this container's kaiwa, healthy on a 200 only (kaiwa
# answers 503 while it drains for shutdown or cannot write). The image has no curl or wget:
# bash's /dev/tcp does the request. The port is the one in KAIWA_BIND (or KAIWA_HEALTH_PORT
# when kaiwa is given --bind on the command line instead); the address is always loopback.
set -u
bind=${KAIWA_BIND:-127.0.0.1:8082}
port=${KAIWA_HEALTH_PORT:-${bind##*:}}
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
IFS=' ' read -r -t 4 _ status _ <&3 || exit 1
echo "GET /health: $status"
[ "$status" = 200 ]
