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
        echo "==> installing edged[$extras] into $VENV" >&2
        if ! { "$VENV/bin/pip" install -q --upgrade pip &&
               "$VENV/bin/pip" install -q -e "$ROOT[$extras]"; } >"$VENV/.install.log" 2>&1; then
            cat "$VENV/.install.log" >&2
            echo "pip install failed (log above)" >&2
            return 1
        fi
        echo "$want" >"$stamp"
    fi
}
