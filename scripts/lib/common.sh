# Shared by scripts/test, scripts/demo and scripts/bench: install what is missing.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV="$ROOT/.venv"
APT_PACKAGES=(mosquitto mosquitto-clients espeak-ng sox libasound2-dev alsa-utils gcc openssl tmux fuse3)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_apt_packages() {
    local missing=() package
    for package in "${APT_PACKAGES[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> installing ${missing[*]}" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# with_progress LOG MESSAGE COMMAND...: run COMMAND with its output in LOG,
# printing MESSAGE and the elapsed time every 10 s, so a slow step (a Pi
# compiling pyalsaaudio takes minutes) is not mistaken for a hang. On failure
# the log is shown.
with_progress() {
    local log=$1 message=$2 started=$SECONDS pid status
    shift 2
    echo "==> $message" >&2
    "$@" >"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if (( (SECONDS - started) % 10 == 0 )) && kill -0 "$pid" 2>/dev/null; then
            echo "    ... still $message ($((SECONDS - started)) s)" >&2
        fi
    done
    wait "$pid" && status=0 || status=$?
    if [ "$status" -ne 0 ]; then
        cat "$log" >&2
        echo "failed: $message (log above, also in $log)" >&2
        return "$status"
    fi
    echo "    done in $((SECONDS - started)) s" >&2
}

# ensure_venv EXTRAS: a virtual environment with the project installed editable.
# Reinstalls only when pyproject.toml changed since the last install.
ensure_venv() {
    local extras=$1 stamp="$VENV/.edged-installed"
    local want
    want="$extras $(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        with_progress "$VENV/.install.log" "installing edged[$extras] into $VENV (about a minute)" \
            sh -c '"$1/bin/pip" install --upgrade pip && "$1/bin/pip" install -e "$2[$3]"' \
            sh "$VENV" "$ROOT" "$extras" || return 1
        echo "$want" >"$stamp"
    fi
}
