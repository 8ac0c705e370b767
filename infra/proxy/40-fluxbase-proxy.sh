#!/bin/sh
# Run by the nginx image's entrypoint (/docker-entrypoint.d/) before nginx starts: TLS when a
# certificate and key are mounted in /etc/fluxbase/tls/, plain HTTP otherwise.
set -eu
# (The three folders can be moved for tests/test_deploy_manifests.py; the image uses the defaults.)
src=${FLUXBASE_PROXY_SRC:-/etc/fluxbase/proxy}
conf=${FLUXBASE_PROXY_CONF:-/etc/nginx/conf.d}
tls=${FLUXBASE_PROXY_TLS:-/etc/fluxbase/tls}
rm -f "$conf"/*.conf
cp "$src/fluxbase.conf" "$conf/fluxbase.conf"
if [ -s "$tls/tls.crt" ] && [ -s "$tls/tls.key" ]; then
    cp "$src/server-tls.conf" "$conf/server.conf"
    echo "fluxbase proxy: TLS on 443 with $tls/tls.crt, port 80 redirects"
elif [ -e "$tls/tls.crt" ] || [ -e "$tls/tls.key" ]; then
    # Half a certificate is a mistake, not a reason to serve plain HTTP.
    echo "fluxbase proxy: $tls needs both tls.crt and tls.key" >&2
    exit 1
else
    cp "$src/server-plain.conf" "$conf/server.conf"
    echo "fluxbase proxy: no certificate in $tls, plain HTTP on 80"
fi
