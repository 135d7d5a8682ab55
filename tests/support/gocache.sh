# Sourced by the scripts that build the Go tools the tests run (tests/controlplane/build.sh,
# tests/prometheus/build.sh): each keeps its recipe, this file the cache around it. An entry is
# a directory outside the work tree named by the recipe's version and hash; it is built once,
# under a lock, into a staging directory moved into place whole, so an entry that has every
# binary is complete, and a run that finds it builds nothing.
#
# The sourcing script sets, then calls `gocache_run "$@"`:
#   gocache_name      the cache's directory under the root, and the prefix of its messages
#   gocache_entry     the entry's directory name (with a hash from `gocache_hash`)
#   gocache_binaries  (array) what a complete entry has in bin/
#   gocache_build     (function) build into "$1/bin", and write what was built to "$1/VERSIONS"
# and gets the usage both scripts share:
#   build.sh                  build if missing; print the bin directory
#   build.sh --print-bin-dir  print the bin directory, build nothing
#
# PODIAM_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/podiam) is the cache root.

gocache_root() {
    echo "${PODIAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/podiam}/$gocache_name"
}

# LENGTH FILE...: a hash of the sourcing script and FILES (its pins). The recipe is part of the
# key: changing how the binaries are built builds them again. This file is not: where an entry
# goes does not change what is in it.
gocache_hash() {
    local length="$1"
    shift
    cat "$0" "$@" | sha256sum | cut -c1-"$length"
}

_gocache_complete() {
    local b
    for b in "${gocache_binaries[@]}"; do [ -x "$1/$b" ] || return 1; done
}

gocache_run() {
    local root bin_dir staging started
    root="$(gocache_root)"
    bin_dir="$root/$gocache_entry/bin"
    if [ "${1:-}" = --print-bin-dir ] || _gocache_complete "$bin_dir"; then
        echo "$bin_dir"
        return 0
    fi

    mkdir -p "$root"
    # Two CI jobs (or a developer and a test run) may start at once: one builds, the other
    # waits and then finds the binaries.
    exec 9>"$root/.lock"
    flock 9
    if _gocache_complete "$bin_dir"; then
        echo "$bin_dir"
        return 0
    fi

    staging="$root/$gocache_entry.partial"
    rm -rf "$staging"
    mkdir -p "$staging/bin"
    started=$SECONDS
    gocache_build "$staging"
    echo "built in $((SECONDS - started)) s" >>"$staging/VERSIONS"
    rm -rf "${bin_dir%/bin}"
    mv "$staging" "${bin_dir%/bin}"
    _gocache_complete "$bin_dir" || {
        echo "$gocache_name: the build left out one of: ${gocache_binaries[*]}" >&2
        return 1
    }
    echo "$gocache_name: built in $((SECONDS - started)) s" >&2
    echo "$bin_dir"
}
