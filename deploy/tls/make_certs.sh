#!/usr/bin/env bash
# Make a private CA, a server certificate for the TLS proxy, and one client
# certificate per robot (for mutual TLS). Everything lands in OUT_DIR:
#
#   ca.pem ca.key                 the CA: robots trust ca.pem; keep ca.key offline
#   server.pem server.key         for nginx (SANs: localhost, 127.0.0.1, and $SERVER_SANS)
#   robots/NAME.pem NAME.key      one pair per robot, extendedKeyUsage clientAuth
#
# Usage: deploy/tls/make_certs.sh OUT_DIR [ROBOT_NAME ...]      (default robot: robot-1)
#   SERVER_SANS="DNS:policy.lab,IP:10.0.0.5"  extra names the server certificate is valid for
#   DAYS=825                                   validity of the leaf certificates
# An existing CA in OUT_DIR is reused, so robots can be added later.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
command -v openssl >/dev/null || { echo "make_certs: openssl not found (apt-get install -y openssl)" >&2; exit 1; }

out=$1; shift
robots=("$@")
[[ ${#robots[@]} -gt 0 ]] || robots=(robot-1)
days=${DAYS:-825}
sans="DNS:localhost,IP:127.0.0.1,IP:::1${SERVER_SANS:+,$SERVER_SANS}"
mkdir -p "$out/robots"
umask 077

if [[ ! -f $out/ca.pem ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=robot-policy-serve CA" -keyout "$out/ca.key" -out "$out/ca.pem" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# issue NAME CN EXTENSIONS: a P-256 key and a certificate signed by the CA.
issue() {
    local path=$1 cn=$2 ext=$3
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cn" \
        -keyout "$path.key" -out "$path.csr" 2>/dev/null
    openssl x509 -req -in "$path.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
        -days "$days" -out "$path.pem" -extfile <(printf '%s\n' "$ext") 2>/dev/null
    rm -f "$path.csr"
}

issue "$out/server" "robot-policy-serve" \
    "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans"
for robot in "${robots[@]}"; do
    issue "$out/robots/$robot" "$robot" \
        "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
done
chmod 644 "$out/ca.pem" "$out/server.pem" "$out"/robots/*.pem
echo "make_certs: CA, server ($sans) and robots (${robots[*]}) in $out" >&2
