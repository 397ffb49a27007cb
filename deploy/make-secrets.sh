#!/bin/sh
# One-off, before the first `docker compose up`: a random password for every MQTT login of
# docker-compose.yml, the broker's password file, the replay control token and Grafana's
# admin password, all in deploy/secrets/ (never committed; .gitignore). Run it again to add what is missing: it
# keeps existing passwords and rewrites the password file from them. To change a password,
# delete its file, run this again, then `docker compose restart` (docs/deploy.md).
set -eu
cd "$(dirname "$0")"
users="sim-1 aggregator-0 aggregator-1 aggregator-2 ticker operator"
image="${MOSQUITTO_IMAGE:-eclipse-mosquitto:2}"

umask 077
mkdir -p secrets
chmod 700 secrets   # the directory guards the files: only you can reach them on the host
random() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
for user in $users; do
    [ -s "secrets/$user.pw" ] || random 24 > "secrets/$user.pw"
done
[ -s secrets/control.token ] || random 32 > secrets/control.token
# Grafana's admin (the monitoring profile), not an MQTT login.
[ -s secrets/grafana-admin.pw ] || random 16 > secrets/grafana-admin.pw

# user:password lines, hashed in place (PBKDF2-SHA512) by the broker image's
# mosquitto_passwd -U, then owned by its mosquitto user, mode 600.
rm -f secrets/passwd
for user in $users; do
    printf '%s:%s\n' "$user" "$(cat "secrets/$user.pw")" >> secrets/passwd
done
docker run --rm --network none -v "$PWD/secrets:/secrets" --entrypoint /bin/sh "$image" -c \
    'mosquitto_passwd -U /secrets/passwd && chown mosquitto:mosquitto /secrets/passwd &&
     chmod 600 /secrets/passwd'

# The gmv containers run as an unprivileged user and read their file from /run/secrets;
# a file mounted on its own keeps its mode, so it must be readable by others (the 0700
# directory keeps other users of this machine out).
chmod 644 secrets/*.pw secrets/control.token
echo "deploy/secrets: logins for $users; the password file; control.token; grafana-admin.pw"
