#!/usr/bin/env bash
# One command: nginx terminating TLS in front of Ray Serve's gRPC proxy, in the foreground.
#
# Usage: deploy/tls/start.sh [--upstream HOST:PORT] [--listen HOST:PORT] [--certs DIR] [--mtls]
#                            [--run-dir DIR] [--access-log PATH|off] [--log-level LEVEL] [--check]
#   --upstream   Serve's gRPC proxy (grpc_options.port in serve_config.yaml)   default 127.0.0.1:50051
#   --listen     where robots connect with TLS                                 default 0.0.0.0:50443
#   --certs      a directory from deploy/tls/make_certs.sh: server.pem, server.key, ca.pem
#                (made there on first use if it does not exist)                default deploy/tls/certs
#   --mtls       require a client certificate signed by ca.pem from every robot
#   --run-dir    where the rendered nginx.conf, pid and temp files go          default: a new temp dir
#   --check      render the config, test it with `nginx -t`, and exit
# Needs nginx with http_v2 and ssl (Debian: apt-get install -y nginx-light). Nothing outside
# --run-dir is written; stop it with Ctrl-C or SIGTERM (nginx's fast shutdown).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

upstream=127.0.0.1:50051
listen=0.0.0.0:50443
certs=$here/certs
mtls=0
run_dir=
access_log=off
log_level=notice
check=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --upstream) upstream=$2; shift 2 ;;
        --listen) listen=$2; shift 2 ;;
        --certs) certs=$2; shift 2 ;;
        --mtls) mtls=1; shift ;;
        --run-dir) run_dir=$2; shift 2 ;;
        --access-log) access_log=$2; shift 2 ;;
        --log-level) log_level=$2; shift 2 ;;
        --check) check=1; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "start.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

nginx_bin=$(command -v nginx || true)
[[ -z $nginx_bin && -x /usr/sbin/nginx ]] && nginx_bin=/usr/sbin/nginx
[[ -n $nginx_bin ]] || { echo "start.sh: nginx not found; on Debian/Ubuntu: apt-get install -y nginx-light" >&2; exit 1; }

if [[ ! -f $certs/server.pem ]]; then
    echo "start.sh: no server certificate in $certs; making a CA, server and robot-1 certificates there" >&2
    "$here/make_certs.sh" "$certs" robot-1
fi
for f in server.pem server.key ca.pem; do
    [[ -f $certs/$f ]] || { echo "start.sh: $certs/$f missing (deploy/tls/make_certs.sh makes it)" >&2; exit 1; }
done
certs=$(cd "$certs" && pwd)

run_dir=${run_dir:-$(mktemp -d -t robot-tls.XXXXXX)}
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
for d in body proxy fastcgi uwsgi scgi; do mkdir -p "$run_dir/$d"; done

user_line=""
if [[ $(id -u) -eq 0 ]]; then
    # Workers drop to nobody; they only need the temp dirs (keys are read by the master).
    user_line="user nobody nogroup;"
    chown nobody "$run_dir"/{body,proxy,fastcgi,uwsgi,scgi} 2>/dev/null || true
fi
if [[ $mtls -eq 1 ]]; then
    client_verify="        ssl_client_certificate $certs/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;"
else
    client_verify="        ssl_verify_client off;"
fi

conf=$run_dir/nginx.conf
text=$(<"$here/nginx.conf.template")
for name in LISTEN UPSTREAM RUN_DIR SERVER_CERT SERVER_KEY ACCESS_LOG LOG_LEVEL USER_LINE CLIENT_VERIFY; do
    case $name in
        LISTEN) value=$listen ;; UPSTREAM) value=$upstream ;; RUN_DIR) value=$run_dir ;;
        SERVER_CERT) value=$certs/server.pem ;; SERVER_KEY) value=$certs/server.key ;;
        ACCESS_LOG) value=$access_log ;; LOG_LEVEL) value=$log_level ;; USER_LINE) value=$user_line ;;
        CLIENT_VERIFY) value=$client_verify ;;
    esac
    text=${text//"@$name@"/"$value"}
done
printf '%s\n' "$text" > "$conf"

"$nginx_bin" -t -q -p "$run_dir" -c "$conf"
if [[ $check -eq 1 ]]; then
    echo "start.sh: $conf is valid" >&2
    exit 0
fi
echo "start.sh: TLS$([[ $mtls -eq 1 ]] && echo ' (mutual)') on $listen -> Serve gRPC $upstream; config $conf" >&2
exec "$nginx_bin" -p "$run_dir" -c "$conf"
