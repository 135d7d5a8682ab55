#!/usr/bin/env bash
# Builds Prometheus and promtool from the Go module github.com/prometheus/prometheus at the
# version pinned in tests/prometheus/builder/go.mod (with its go.sum), into a cache directory
# outside the work tree (tests/support/gocache.sh):
# ${PODIAM_CACHE:-~/.cache/podiam}/prometheus/<version>-<hash>/bin, the hash being of this
# script, go.mod and go.sum. Does nothing when both binaries are there.
#
#   tests/prometheus/build.sh                 build if missing; print the bin directory
#   tests/prometheus/build.sh --print-bin-dir print the bin directory, build nothing
#
# The web UI is left out (no `builtinassets` tag): the tests use Prometheus's HTTP API only, and
# the UI's assets are built with npm, not Go.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../support/gocache.sh"
builder="$here/builder"
version="$(awk '$1 == "github.com/prometheus/prometheus" {print $2}' "$builder/go.mod")"

gocache_name=prometheus
gocache_entry="$version-$(gocache_hash 12 "$builder/go.mod" "$builder/go.sum")"
gocache_binaries=(prometheus promtool)

gocache_build() {
    local staging="$1" release ldflags
    echo "prometheus: building prometheus and promtool $version into $staging/bin" >&2
    # Prometheus stamps its version through common/version; without it `--version` says
    # nothing. Its Go module versions spell release 3.16.0 as v0.316.0.
    release="${version#v0.}"
    release="${release:0:1}.$((10#${release:1:2})).${release#*.}"
    ldflags="-s -w -X github.com/prometheus/common/version.Version=$release"
    ldflags+=" -X github.com/prometheus/common/version.Branch=podiam-build"
    # The committed go.sum pins every module; -mod=readonly refuses to drift from it. Pure Go,
    # stripped and without paths. nice: the build takes minutes of every core on a shared
    # machine.
    (cd "$builder" &&
        CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false" GOTOOLCHAIN=local \
            nice -n 19 go build -trimpath -ldflags="$ldflags" -o "$staging/bin/" tool)
    echo "github.com/prometheus/prometheus $version" >"$staging/VERSIONS"
}

gocache_run "$@"
