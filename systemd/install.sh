#!/bin/sh
# Install cryptopi on a Raspberry Pi (Debian / Raspberry Pi OS) as systemd services:
#   cryptopi.service          the docker compose stack, up on boot
#   cryptopi-webhook.service  the Docker Hub deploy webhook (python -m webhook: hook on 127.0.0.1:8081,
#                             local-only API on 127.0.0.1:8082)
#   cloudflared.service       the Cloudflare tunnel, only with --with-cloudflared
#
# Run as root from the checkout at /opt/cryptopi:  sudo /opt/cryptopi/systemd/install.sh
# Idempotent: run it again after a `git pull`. Existing files in /etc/cryptopi are never overwritten.
#
# --root DIR (or DESTDIR=DIR) installs into DIR instead of / (the checkout must then be DIR/opt/cryptopi):
# nothing outside DIR is changed, and services are only enabled (`systemctl --root`), never started.
set -eu

usage() {
    cat <<'EOF'
usage: install.sh [--root DIR] [--with-cloudflared] [--no-enable]
  --root DIR          install under DIR instead of / (default: $DESTDIR, else /)
  --with-cloudflared  also install cloudflared.service (the tunnel outside compose; token in
                      /etc/cryptopi/cloudflared.token)
  --no-enable         install files only: no systemctl at all
EOF
}

ROOT=${DESTDIR:-}
WITH_CLOUDFLARED=no
ENABLE=yes
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || { usage >&2; exit 2; }; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#--root=}; shift ;;
        --with-cloudflared) WITH_CLOUDFLARED=yes; shift ;;
        --no-enable) ENABLE=no; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
ROOT=${ROOT%/}

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root: sudo $0"
fi
# Whatever root's own umask is, the venv and units must be readable by the services' (dynamic) users.
umask 022

SRC=$(cd "$(dirname "$0")" && pwd -P)  # this directory: the unit files
APP=$ROOT/opt/cryptopi                   # the checkout, and the venv in it
CONF=$ROOT/etc/cryptopi
UNITS=$ROOT/etc/systemd/system
DOCKER=$ROOT/usr/bin/docker              # the path cryptopi.service runs
CHANGED=no

# --- preconditions -------------------------------------------------------------------------------
if [ ! -f "$APP/pyproject.toml" ] || [ ! -f "$APP/compose.yaml" ]; then
    die "no cryptopi checkout at $APP (pyproject.toml and compose.yaml): git clone the repository to /opt/cryptopi"
fi
[ -x "$DOCKER" ] ||
    die "Docker is not installed ($DOCKER is missing; cryptopi.service runs it): curl -fsSL https://get.docker.com | sh"
# An empty DOCKER_CONFIG: a compose plugin in root's ~/.docker/cli-plugins is not seen by the services.
docker_config=$(mktemp -d)
if ! DOCKER_CONFIG=$docker_config "$DOCKER" compose version >/dev/null 2>&1; then
    rm -rf "$docker_config"
    die "the Docker Compose v2 plugin is missing ('docker compose version' fails): apt-get install docker-compose-plugin (from Docker's apt repository, https://docs.docker.com/engine/install/debian/)"
fi
rm -rf "$docker_config"
grep -q '^docker:' "$ROOT/etc/group" 2>/dev/null ||
    die "no 'docker' group in $ROOT/etc/group: the webhook reaches the Docker socket through it (reinstall Docker)"
for unit in cryptopi.service cryptopi-webhook.service cloudflared.service; do
    [ -f "$SRC/$unit" ] || die "$SRC/$unit is missing: run the install.sh of a complete checkout"
done

# --- /etc/cryptopi: templates, never overwritten -------------------------------------------------
# new_file PATH MODE: true (and creates PATH, empty, with MODE) if PATH did not exist.
new_file() {
    [ -e "$1" ] && { say "kept     $1"; return 1; }
    (umask 077 && : >"$1")
    chmod "$2" "$1"
    say "created  $1"
    CHANGED=yes
}

if [ ! -d "$CONF" ]; then
    mkdir -p "$CONF"
    chmod 0755 "$CONF"
fi

if new_file "$CONF/cryptopi.env" 0644; then
    cat >"$CONF/cryptopi.env" <<'EOF'
# cryptopi compose variables: docker compose --env-file /etc/cryptopi/cryptopi.env (see compose.yaml).
# After changing the image or tag: systemctl reload cryptopi (a deploy through the webhook's health gate).
# After changing anything else: systemctl restart cryptopi.
CRYPTOPI_IMAGE=docker.io/cryptopi/appliance
CRYPTOPI_TAG=latest
CRYPTOPI_MQTT_URL=mqtt://127.0.0.1:1883
EOF
fi

# --- the host venv for the webhook ---------------------------------------------------------------
find_uv() {
    for uv in "$(command -v uv 2>/dev/null || true)" /usr/local/bin/uv "${HOME:-/root}/.local/bin/uv"; do
        [ -n "$uv" ] && [ -x "$uv" ] && { printf '%s\n' "$uv"; return 0; }
    done
    return 1
}
if ! UV=$(find_uv); then
    [ -z "$ROOT" ] || die "uv not found (with --root, install it first: python3 -m pip install --user uv)"
    say "uv not found: installing it for $(id -un) with pip"
    python3 -m pip --version >/dev/null 2>&1 || die "neither uv nor pip: apt-get install -y python3-pip"
    python3 -m pip install --user --break-system-packages uv || python3 -m pip install --user uv
    UV=$(find_uv) || die "uv was installed but is not in PATH, /usr/local/bin or ~/.local/bin"
fi
say "syncing  $APP/.venv ($UV sync --locked --no-dev --extra webhook)"
(
    cd "$APP"
    # The Pi's own Python 3.11 (the lock's), never a downloaded one; the venv where the unit expects it.
    UV_PROJECT_ENVIRONMENT=$APP/.venv UV_PYTHON_DOWNLOADS=never UV_PYTHON=${UV_PYTHON:-python3.11} \
        UV_SYSTEM_CERTS=1 UV_COMPILE_BYTECODE=1 "$UV" sync --locked --no-dev --extra webhook
)
VENV_PY=$APP/.venv/bin/python
[ -x "$VENV_PY" ] || die "uv sync did not create $VENV_PY"
# The venv's python is a symlink to its interpreter: one under a home directory (pyenv, uv's own
# downloads) is invisible to cryptopi-webhook.service (ProtectHome=yes).
interpreter=$(readlink -f "$VENV_PY")
case ${interpreter#"$ROOT"} in
    /root/* | /home/*)
        die "$VENV_PY runs $interpreter, which the service cannot see (ProtectHome=yes): apt-get install python3.11, then rm -rf $APP/.venv and run again with UV_PYTHON=/usr/bin/python3.11" ;;
    *) ;;
esac

# --- webhook.env: the webhook's secret ------------------------------------------------------------
WEBHOOK_INIT=no
if [ ! -e "$CONF/webhook.env" ]; then
    # `python -m webhook init --env-file FILE` writes FILE (token, defaults) and prints the Docker Hub URL.
    if (cd "$APP" && umask 077 && "$VENV_PY" -m webhook init --env-file "$CONF/webhook.env") && [ -s "$CONF/webhook.env" ]; then
        chmod 0600 "$CONF/webhook.env"
        say "created  $CONF/webhook.env (python -m webhook init)"
        WEBHOOK_INIT=yes
        CHANGED=yes
    else
        rm -f "$CONF/webhook.env"
        say "note: 'python -m webhook init' is not available; writing a webhook.env template"
        token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
        new_file "$CONF/webhook.env" 0600
        cat >"$CONF/webhook.env" <<EOF
# cryptopi deploy webhook (cryptopi-webhook.service's EnvironmentFile). Mode 0600: it holds the secret.
# The secret in the URL that Docker Hub calls; anyone who has it can trigger a redeploy.
CRYPTOPI_WEBHOOK_TOKEN=$token
# The Docker Hub repository (namespace/name) whose pushes redeploy: the one of CRYPTOPI_IMAGE in cryptopi.env.
CRYPTOPI_WEBHOOK_REPOSITORY=cryptopi/appliance
EOF
    fi
else
    say "kept     $CONF/webhook.env"
fi

if [ "$WITH_CLOUDFLARED" = yes ] && new_file "$CONF/cloudflared.token" 0600; then
    :  # left empty: the token comes from the Cloudflare dashboard
fi

# --- units ---------------------------------------------------------------------------------------
install_unit() {
    dest=$UNITS/$1
    if [ -f "$dest" ] && cmp -s "$SRC/$1" "$dest"; then
        say "kept     $dest"
        return 0
    fi
    # Ours carry this script's name; anything else (say, `cloudflared service install`'s own unit) is kept.
    if [ -f "$dest" ] && ! grep -q 'systemd/install.sh' "$dest"; then
        die "$dest exists and was not installed by cryptopi: remove it (after 'systemctl disable --now $1') first"
    fi
    cp "$SRC/$1" "$dest.tmp"
    chmod 0644 "$dest.tmp"
    mv -f "$dest.tmp" "$dest"
    say "installed $dest"
    CHANGED=yes
    UNITS_CHANGED="$UNITS_CHANGED $1"
}

mkdir -p "$UNITS"
UNITS_CHANGED=
ENABLED="cryptopi.service cryptopi-webhook.service"
install_unit cryptopi.service
install_unit cryptopi-webhook.service
TUNNEL_WAITS=no
if [ "$WITH_CLOUDFLARED" = yes ]; then
    install_unit cloudflared.service
    if [ -s "$CONF/cloudflared.token" ]; then
        ENABLED="$ENABLED cloudflared.service"
    else
        TUNNEL_WAITS=yes
    fi
fi

if [ "$ENABLE" = no ]; then
    say "--no-enable: not running systemctl"
elif [ -n "$ROOT" ]; then
    # shellcheck disable=SC2086  # ENABLED is a list of unit names
    systemctl --root="$ROOT" --quiet enable $ENABLED
else
    [ -z "$UNITS_CHANGED" ] || systemctl daemon-reload
    # shellcheck disable=SC2086
    systemctl enable --now $ENABLED
    # A changed webhook unit only takes effect on a restart (the compose stack is left running).
    case $UNITS_CHANGED in
        *cryptopi-webhook.service*) systemctl try-restart cryptopi-webhook.service ;;
    esac
fi

# --- next steps ----------------------------------------------------------------------------------
[ "$CHANGED" = yes ] || say "nothing changed"
say ""
say "Next steps:"
say "  - Check /etc/cryptopi/cryptopi.env (image, tag, MQTT broker); then: systemctl restart cryptopi"
if [ "$WEBHOOK_INIT" = yes ]; then
    say "  - Paste the webhook URL printed above into Docker Hub (repository > Webhooks)."
else
    say "  - Set CRYPTOPI_WEBHOOK_REPOSITORY in /etc/cryptopi/webhook.env; the webhook URL for Docker Hub"
    say "    (repository > Webhooks) is your tunnel's hostname with the secret CRYPTOPI_WEBHOOK_TOKEN of that"
    say "    file in its path (see README.md); then: systemctl restart cryptopi-webhook"
fi
say "  - The webhook's hook listens on 127.0.0.1:8081: point the tunnel's hook hostname at http://127.0.0.1:8081"
say "    (path ^/hooks/dockerhub/). Never publish 127.0.0.1:8082: deployments, metrics, deploys by hand."
if [ "$TUNNEL_WAITS" = yes ]; then
    say "  - Put the tunnel token (Cloudflare dashboard) in /etc/cryptopi/cloudflared.token, then run"
    say "    this script again with --with-cloudflared (or: systemctl enable --now cloudflared)."
fi
say "  - Logs: journalctl -u cryptopi -u cryptopi-webhook -f   After a git pull: run this script again."
