# shellcheck shell=bash
# Sourced by scripts/test, scripts/demo and scripts/bench: make a fresh Debian machine ready.
# Installs the Debian packages sdnsup and its tests use (only those missing), and a .venv with
# sdnsup and its test dependencies. Runs as root without sudo (CI has no sudo binary).

APT_PACKAGES=(nftables libnftables1 iproute2 conntrack supervisor procps iputils-ping util-linux systemd
              python3 python3-venv)

bootstrap_apt() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    # python3/python3-venv are not needed when another python3 (e.g. pyenv) already has venv.
    if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
        local keep=()
        for pkg in "${missing[@]}"; do
            [[ $pkg == python3 || $pkg == python3-venv ]] || keep+=("$pkg")
        done
        missing=("${keep[@]}")
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]} (run as root to install them)" >&2
        return 1
    fi
    echo "installing: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
}

bootstrap_venv() {
    # SDNSUP_EXTRAS: the optional dependency groups of pyproject.toml to install (scripts/bench
    # adds "bench"); one stamp per set, so switching between test and bench installs once each.
    local extras=${SDNSUP_EXTRAS:-test}
    local stamp=.venv/.sdnsup-installed-${extras//,/-}
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # Reinstall when pyproject.toml changed since the last install.
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        # pip's own chatter goes to a log, shown only when the install fails.
        if ! { .venv/bin/python -m pip install -q --upgrade pip &&
               .venv/bin/python -m pip install -q -e ".[$extras]"; } >.venv/install.log 2>&1; then
            cat .venv/install.log >&2
            return 1
        fi
        touch "$stamp"
    fi
}

bootstrap() {
    bootstrap_apt
    bootstrap_venv
}
