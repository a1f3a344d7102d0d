#!/bin/sh
# The Debian packages the native data plane builds against (setup.py). Installs the missing
# ones when it can (root with apt-get); otherwise stops and names them.
set -eu
missing=""
[ -e /usr/include/xxhash.h ] || missing="$missing libxxhash-dev"
[ -e /usr/include/zmq.h ] || missing="$missing libzmq3-dev"
[ -e /usr/include/openssl/evp.h ] || missing="$missing libssl-dev"
[ -e /usr/include/grpcpp/grpcpp.h ] || missing="$missing libgrpc++-dev"
command -v g++ >/dev/null || missing="$missing g++"
[ -z "$missing" ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing the native data plane's build dependencies:$missing" >&2
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    exit 0
fi
echo "kv-cache's native data plane needs:$missing" >&2
echo "install them (Debian/Ubuntu: sudo apt-get install$missing) and run make again" >&2
exit 1
