#!/usr/bin/env bash
# The API server's front-proxy CA and client certificate (API aggregation:
# the live flows API), in directory $1, once. Its own CA, so that no user's
# client certificate can pass for the API server's proxy. Used by
# local-cluster.sh and cluster.sh.
set -euo pipefail
pki="$1"
[[ -f "$pki/front-proxy-client.crt" ]] && exit 0
cd "$pki"
openssl ecparam -name prime256v1 -genkey -noout -out front-proxy-ca.key 2>/dev/null
openssl req -x509 -new -key front-proxy-ca.key -days 3650 -subj "/CN=flowlens-front-proxy-ca" \
  -out front-proxy-ca.crt 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out front-proxy-client.key 2>/dev/null
openssl req -new -key front-proxy-client.key -subj "/CN=front-proxy-client" -out front-proxy-client.csr 2>/dev/null
printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n' > front-proxy-client.ext
openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
  -CAcreateserial -days 3650 -extfile front-proxy-client.ext -out front-proxy-client.crt 2>/dev/null
rm -f front-proxy-client.csr front-proxy-client.ext
chmod 600 front-proxy-ca.key front-proxy-client.key
