#!/usr/bin/env bash
# Build podiam's two images with podman from Dockerfile.agent and Dockerfile.server, as they are.
#
# Where a registry serves python:3.11-slim-bookworm, `podman build -f Dockerfile.server .` (or
# docker) is all it takes. This script is for machines that reach Debian's packages and PyPI but
# no container registry, such as CI: it makes a Python base image from Debian packages with
# debootstrap, from the same mirror apt uses here, and builds on it (--build-arg PYTHON_IMAGE).
# The base is cached by a hash of everything it is made from, as a tarball outside the work tree
# and as a local image: when they match, nothing slow runs.
#
#   images/build.sh                       # both images, tagged localhost/podiam-{agent,server}:dev
#   PODIAM_PYTHON_IMAGE=python:3.11-slim-bookworm images/build.sh   # on a registry's base
#
# Environment: PODIAM_IMAGE_TAG (dev), PODIAM_PYTHON_IMAGE (skip the Debian base),
# PODIAM_DEBIAN_MIRROR (default: apt's own), PODIAM_CACHE (/var/cache/podiam for root, else
# ~/.cache/podiam). pip inside the build uses this machine's pip configuration and CA bundle,
# handed over as build secrets, so neither stays in an image or its history.
set -euo pipefail

cd "$(dirname "$0")/.."
TAG=${PODIAM_IMAGE_TAG:-dev}
SUITE=bookworm
# python3-venv for the virtualenv, python3-pip for the build stage's pip, ca-certificates for
# TLS, python-is-python3 for the Dockerfiles' `python` (as in the official image).
PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
if [ "$(id -u)" = 0 ]; then
    CACHE=${PODIAM_CACHE:-/var/cache/podiam}
else
    CACHE=${PODIAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/podiam}
fi

log() { printf 'images: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc)"
# Without systemd (containers, CI sandboxes) podman's defaults cannot work: use the project's
# settings for such machines, unless told which to use.
if [ -z "${CONTAINERS_CONF:-}" ] && [ ! -d /run/systemd/system ]; then
    export CONTAINERS_CONF=$PWD/images/containers.conf
    log "no systemd here: podman reads $CONTAINERS_CONF"
fi

# The Debian mirror apt uses for $SUITE: the first deb822 URIs or one-line `deb` entry naming it.
apt_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { if (uri != "" && hit && deb) { print uri; exit } uri = ""; hit = 0; deb = 0; next }
            tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
            END { if (uri != "" && hit && deb) print uri }
        ' "$file" | head -n 1
    done | head -n 1
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk -v suite="$SUITE" '$1 == "deb" { for (i = 2; i < NF; i++) if ($i !~ /^\[/ && $(i + 1) == suite) { print $i; exit } }' \
        | head -n 1
}

# --- the base image ------------------------------------------------------------------------
# What the base's image config says, beside its files.
IMPORT_CHANGES=(
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    --change 'ENV LANG=C.UTF-8'
    --change 'CMD ["python3"]'
)

# A minimal root filesystem with Python in $1, from mirror $2.
make_rootfs() {
    local root=$1 mirror=$2
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" \
        > "$CACHE/debootstrap.log" 2>&1 || {
        tail -n 20 "$CACHE/debootstrap.log" >&2
        die "debootstrap failed (log: $CACHE/debootstrap.log)"
    }
    # As slim as the official image: no package caches, lists, logs or documentation.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
        "$root"/usr/share/info/* "$root"/usr/share/locale/*
    # And so are packages installed on it later (the agent's iptables), as in Debian's slim
    # images: dpkg leaves out documentation but the copyright files.
    cat > "$root/etc/dpkg/dpkg.cfg.d/slim" <<'EXCLUDES'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EXCLUDES
}

# The base image's name, made first if no cached copy matches. The tag is a hash of what the
# base is made of (suite, packages, mirror, architecture, the recipe above), so a changed
# recipe makes a new base and an unchanged one is reused from podman's storage or the cache.
base_image() {
    local mirror hash tarball image started root
    mirror=${PODIAM_DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}
    [ -n "$mirror" ] || die "no Debian mirror for $SUITE in /etc/apt; set PODIAM_DEBIAN_MIRROR"
    hash=$( {
        printf '%s\n' "$SUITE" "$PACKAGES" "$mirror" \
            "$(dpkg --print-architecture 2>/dev/null || uname -m)" "${IMPORT_CHANGES[@]}"
        declare -f make_rootfs
    } | sha256sum | cut -c1-16)
    image=localhost/podiam-base:$hash
    tarball=$CACHE/base-$hash.tar
    if podman image exists "$image"; then
        log "base: $image (cached image)"
        echo "$image"
        return
    fi
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || die "debootstrap is not installed"
        [ "$(id -u)" = 0 ] || die "debootstrap needs root (or set PODIAM_PYTHON_IMAGE)"
        log "base: debootstrap $SUITE from $mirror ($PACKAGES)"
        started=$(now)
        mkdir -p "$CACHE"
        root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        # shellcheck disable=SC2064  # expand now: the directory is known now
        trap "rm -rf '$root'" EXIT
        make_rootfs "$root" "$mirror"
        tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
        trap - EXIT
        log "base: root filesystem in $(took "$started") s ($tarball)"
    fi
    started=$(now)
    podman import --quiet "${IMPORT_CHANGES[@]}" "$tarball" "$image" >/dev/null
    log "base: imported $image in $(took "$started") s"
    echo "$image"
}

# --- pip's configuration, as build secrets -------------------------------------------------
# The build stage's pip reads /etc/pip.conf (a secret mount): this machine's index settings,
# with `cert` pointing at this machine's CA bundle, mounted as a second secret.
SECRETS=()
pip_secrets() {
    local dir cert index extra trusted
    dir=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$dir'" EXIT
    cert=${PIP_CERT:-$(pip_setting cert)}
    index=${PIP_INDEX_URL:-$(pip_setting index-url)}
    extra=${PIP_EXTRA_INDEX_URL:-$(pip_setting extra-index-url)}
    trusted=${PIP_TRUSTED_HOST:-$(pip_setting trusted-host)}
    {
        echo "[global]"
        [ -z "$index" ] || echo "index-url = $index"
        [ -z "$extra" ] || echo "extra-index-url = $extra"
        [ -z "$trusted" ] || echo "trusted-host = $trusted"
        [ -z "$cert" ] || echo "cert = /run/secrets/pip-ca"
        echo "timeout = ${PIP_DEFAULT_TIMEOUT:-60}"
    } > "$dir/pip.conf"
    SECRETS=(--secret "id=pip.conf,src=$dir/pip.conf")
    if [ -n "$cert" ] && [ -f "$cert" ]; then
        SECRETS+=(--secret "id=pip-ca,src=$cert")
    fi
}

pip_setting() {
    local python
    python=$(command -v python3 || true)
    [ -n "$python" ] || return 0
    # `pip config list` prints every file's and the environment's settings as section.key='v'.
    "$python" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\\.$1='\\(.*\\)'\$/\\1/p" | head -n 1
}

# --- the two images ------------------------------------------------------------------------
build() {
    local what=$1 base=$2 started previous revision created
    started=$(now)
    revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    created=$(git log -1 --format=%cI 2>/dev/null || echo unknown)
    previous=$(podman image inspect --format '{{.Id}}' "localhost/podiam-$what:$TAG" 2>/dev/null || true)
    podman build --quiet --network host --pull="$PULL" \
        --build-arg "PYTHON_IMAGE=$base" \
        --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
        "${SECRETS[@]}" \
        -f "Dockerfile.$what" -t "localhost/podiam-$what:$TAG" . >/dev/null
    # The image this tag named before, now untagged, goes (unless a container still uses it).
    if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' \
        "localhost/podiam-$what:$TAG")" ]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
    log "$what: built localhost/podiam-$what:$TAG in $(took "$started") s"
}

size_mb() { podman image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.0f", $1 / 1e6 }'; }

main() {
    local base started
    started=$(now)
    if [ -n "${PODIAM_PYTHON_IMAGE:-}" ]; then
        base=$PODIAM_PYTHON_IMAGE
        PULL=missing
    else
        base=$(base_image)
        PULL=never  # a local image: never ask a registry for it
    fi
    pip_secrets
    build server "$base"
    build agent "$base"
    local base_mb agent_mb server_mb
    base_mb=$(size_mb "$base")
    agent_mb=$(size_mb "localhost/podiam-agent:$TAG")
    server_mb=$(size_mb "localhost/podiam-server:$TAG")
    printf '%-34s %6s MB\n' "$base" "$base_mb"
    printf '%-34s %6s MB (+%s over the base)\n' "localhost/podiam-agent:$TAG" "$agent_mb" \
        "$((agent_mb - base_mb))"
    printf '%-34s %6s MB (+%s over the base)\n' "localhost/podiam-server:$TAG" "$server_mb" \
        "$((server_mb - base_mb))"
    log "done in $(took "$started") s"
}

main "$@"
