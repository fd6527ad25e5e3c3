# scripts/install's secrets: the router.audio API key and the MQTT password,
# installed as the files edged.service loads as systemd credentials.
# shellcheck shell=bash

# Where edged.service's LoadCredential= lines read them (root only).
CREDENTIALS=${CREDENTIALS:-/etc/edged/credentials}

secret_fail() { echo "scripts/install: $*" >&2; exit 2; }

# read_secret WHAT FROM: the secret from file FROM, or from standard input
# when FROM is - (asked for, not shown, on a terminal), surrounding
# whitespace stripped as edged does, into SECRET. Never echoed, never on a
# command line (printf and read are shell builtins).
read_secret() {
    local what=$1 from=$2
    if [ "$from" = - ]; then
        if [ -t 0 ]; then
            IFS= read -r -s -p "$what (not shown): " SECRET || true
            echo >&2
        else
            SECRET=$(cat)
        fi
        from="standard input"
    else
        if [ ! -f "$from" ] || [ ! -r "$from" ]; then secret_fail "cannot read $from (the $what)"; fi
        SECRET=$(cat -- "$from")
    fi
    SECRET=${SECRET#"${SECRET%%[![:space:]]*}"}
    SECRET=${SECRET%"${SECRET##*[![:space:]]}"}
    [ -n "$SECRET" ] || secret_fail "the $what from $from is empty"
    case "$SECRET" in *$'\n'*) secret_fail "the $what from $from has more than one line" ;; esac
}

# install_credential NAME WHAT VALUE: $CREDENTIALS/NAME, root:root 0600 in a
# 0700 directory, written whole (a temporary file renamed over it). Says
# whether it was installed, unchanged or replaced; never shows the secret.
install_credential() {
    local name=$1 what=$2 value=$3 target=$CREDENTIALS/$1 temporary
    install -d -m 0700 -o root -g root "$CREDENTIALS"
    chmod 0700 "$CREDENTIALS"
    temporary=$(mktemp "$CREDENTIALS/.$name.XXXXXX")
    printf '%s\n' "$value" >"$temporary"
    chown root:root "$temporary"
    chmod 0600 "$temporary"
    if [ -e "$target" ] && cmp -s "$temporary" "$target"; then
        rm -f "$temporary"
        chown root:root "$target"
        chmod 0600 "$target"
        echo "    $what: $target unchanged"
    elif [ -e "$target" ]; then
        mv -f "$temporary" "$target"
        echo "    $what: $target replaced (it held a different one)"
    else
        mv "$temporary" "$target"
        echo "    $what: $target installed"
    fi
}
