#!/bin/sh
# The benchmark's app: nginx with one worker on 127.0.0.1:$PORT.
#   GET /     -> 200, a 13-byte body
#   GET /16k  -> 200, a 16 KiB body
# nginx cannot read $PORT, so this writes a config into a fresh directory under
# $BENCH_TMP (the harness removes that directory) and execs nginx in the foreground.
set -eu
: "${PORT:?PORT must be set}"
dir=$(mktemp -d -p "${BENCH_TMP:-/tmp}" nginx-app.XXXXXX)
# Started by root, nginx's worker would run as nobody and could not read a private temp dir.
user_line=""
if [ "$(id -u)" = 0 ]; then user_line="user root;"; fi
mkdir "$dir/www" "$dir/tmp"
head -c 16384 /dev/zero | tr '\0' 'x' > "$dir/www/16k"
cat > "$dir/nginx.conf" <<CONF
$user_line
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen 127.0.0.1:$PORT;
        root $dir/www;
        default_type application/octet-stream;
        location = / { default_type text/plain; return 200 "hello, mesh!\n"; }
        location = /16k { }
    }
}
CONF
exec nginx -c "$dir/nginx.conf" -p "$dir" -g "daemon off;"
