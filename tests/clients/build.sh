#!/usr/bin/env bash
# Build the SDK matrix's client programs (tests/clients/<language>/) into a cache outside the
# work tree, one directory per language keyed by a hash of that language's sources, lock files
# and toolchain version; a language whose directory exists is up to date and is not rebuilt.
#
#   tests/clients/build.sh [language...]   build (default: every language)
#   tests/clients/build.sh --where LANG    print LANG's build directory (built or not)
#
# The cache is $PODIAM_CLIENTS_CACHE (default ~/.cache/podiam/sdk-clients). A missing toolchain
# skips its language with a message, or fails the build under CI=true. Builds run under
# `nice -n 19`: the machine is shared.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${PODIAM_CLIENTS_CACHE:-$HOME/.cache/podiam/sdk-clients}"
LANGUAGES=(go java rust js)

toolchain() {  # the tools LANG needs, first one's version goes into the key
    case "$1" in
        go) echo go ;;
        java) echo "java mvn" ;;
        rust) echo cargo ;;
        js) echo "node npm" ;;
    esac
}

tool_version() {
    case "$1" in
        go) go version ;;
        java) java -version 2>&1 | head -1 ;;
        rust) cargo --version ;;
        js) node --version ;;
    esac
}

sources() {  # every input file of LANG, relative to its directory, sorted
    (cd "$HERE/$1" && find . -type f -not -path './node_modules/*' -not -path './target/*' \
        | LC_ALL=C sort)
}

where() {
    local lang="$1" key
    key="$( (cd "$HERE/$lang" && sources "$lang" | xargs sha256sum; tool_version "$lang"; \
        sha256sum "$HERE/build.sh" | cut -d' ' -f1) | sha256sum | cut -c1-16)"
    echo "$CACHE/$lang-$key"
}

have_tools() {
    local tool
    for tool in $(toolchain "$1"); do
        command -v "$tool" >/dev/null || return 1
    done
}

build_one() {  # build LANG into $2 (a fresh directory)
    local lang="$1" out="$2"
    case "$lang" in
        go)
            # go.sum is committed: the default -mod=readonly refuses anything not pinned there.
            (cd "$HERE/go" && CGO_ENABLED=0 go build -trimpath -o "$out/whoami" .)
            ;;
        java)
            cp -r "$HERE/java/." "$out/src-tree"
            # Maven prints colour codes even when quiet; its output matters only on failure.
            (cd "$out/src-tree" && mvn -q -B -ntp package >"$out/mvn.log" 2>&1) \
                || { cat "$out/mvn.log" >&2; exit 1; }
            rm "$out/mvn.log"
            mv "$out/src-tree/target/classes" "$out/classes"
            mv "$out/src-tree/target/lib" "$out/lib"
            rm -rf "$out/src-tree"
            ;;
        rust)
            (cd "$HERE/rust" && CARGO_TARGET_DIR="$CACHE/rust-target" \
                cargo build --release --locked --quiet)
            cp "$CACHE/rust-target/release/whoami" "$out/whoami"
            ;;
        js)
            cp "$HERE/js/package.json" "$HERE/js/package-lock.json" "$HERE/js/whoami.mjs" "$out/"
            (cd "$out" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
            ;;
    esac
}

case "${1:-}" in
    --where) where "$2"; exit 0 ;;
    --build-one) build_one "$2" "$3"; exit 0 ;;  # internal: one build, run under nice
esac

status=0
for lang in "${@:-${LANGUAGES[@]}}"; do
    if ! have_tools "$lang"; then
        if [ "${CI:-}" = true ]; then
            echo "build.sh: $lang: missing toolchain ($(toolchain "$lang"))" >&2
            status=1
        else
            echo "build.sh: $lang: skipped, missing toolchain ($(toolchain "$lang"))" >&2
        fi
        continue
    fi
    out="$(where "$lang")"
    if [ -d "$out" ]; then
        echo "build.sh: $lang: up to date ($out)"
        continue
    fi
    mkdir -p "$CACHE"
    tmp="$(mktemp -d "$CACHE/.$lang.XXXXXX")"
    started=$SECONDS
    if nice -n 19 "$HERE/build.sh" --build-one "$lang" "$tmp"; then
        mv "$tmp" "$out"  # atomic: a directory that exists is complete
        echo "build.sh: $lang: built in $((SECONDS - started))s ($out)"
        # Builds of older sources nobody has used for a week (other work trees may still run
        # recent ones).
        find "$CACHE" -maxdepth 1 -name "$lang-*" -not -path "$out" -atime +7 \
            -exec rm -rf {} + 2>/dev/null || true
    else
        rm -rf "$tmp"
        echo "build.sh: $lang: build failed" >&2
        status=1
    fi
done
exit $status
