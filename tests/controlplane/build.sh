#!/usr/bin/env bash
# Builds the real Kubernetes control plane the tests run against (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, etcd, kwok) from their Go modules at
# the versions pinned in tests/controlplane/build/*/go.mod, into a cache directory outside
# the work tree (tests/support/gocache.sh). The directory is named by a hash of this script and
# those go.mod and go.sum files, so a version bump builds a new set and an unchanged pin builds
# nothing.
#
#   tests/controlplane/build.sh                 build if missing; print the bin directory
#   tests/controlplane/build.sh --print-bin-dir print the bin directory, build nothing
#
# PODIAM_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/podiam) is the cache root.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../support/gocache.sh"
modules=(kubernetes etcd kwok)
pins=()
for m in "${modules[@]}"; do pins+=("$here/build/$m/go.mod" "$here/build/$m/go.sum"); done

gocache_name=controlplane
gocache_entry="$(gocache_hash 16 "${pins[@]}")"
gocache_binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)

gocache_build() {
    local staging="$1" m ldflags pkg
    # A Kubernetes release build stamps its version into the binaries (hack/lib/version.sh);
    # without it /version says v0.0.0-master and version-aware clients (kubectl, Helm) misjudge
    # it.
    local kube_version kube_minor kube_ldflags=""
    kube_version="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$here/build/kubernetes/go.mod")"
    kube_minor="$(echo "$kube_version" | cut -d. -f2)"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        kube_ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1"
        kube_ldflags+=" -X $pkg.gitMinor=$kube_minor -X $pkg.gitTreeState=clean"
    done
    for m in "${modules[@]}"; do
        echo "controlplane: building $m tools into $staging/bin" >&2
        ldflags="-s -w"
        if [ "$m" = kubernetes ]; then ldflags+="$kube_ldflags"; fi
        # The committed go.sum pins every module; -mod=readonly refuses to drift from it.
        # Pure Go, stripped and without paths: smaller binaries, same on every machine. No VCS
        # stamp: these builder modules sit in podiam's work tree, whose state is not theirs.
        # nice: the build takes minutes of every core, and the machine is shared.
        (cd "$here/build/$m" &&
            CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false" GOTOOLCHAIN=local \
                nice -n 19 go build -trimpath -ldflags="$ldflags" -o "$staging/bin/" tool)
    done
    # etcd's main package is its server module, so go names the binary "server".
    mv "$staging/bin/server" "$staging/bin/etcd"
    for m in "${modules[@]}"; do
        awk '/^require / || /^\t[^ ]+ v/ {print}' "$here/build/$m/go.mod" |
            grep -E 'k8s.io/kubernetes |go.etcd.io/etcd/server/v3 |sigs.k8s.io/kwok ' |
            sed -E 's/^(require )?\t?//; s| // indirect||'
    done >"$staging/VERSIONS"
}

gocache_run "$@"
