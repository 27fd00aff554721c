#!/usr/bin/env bash
# Build (once) the test cluster's components from their Go modules, at the versions pinned in
# scripts/cluster-versions.env, and print the cache folder that holds them:
#
#   $ROOT/kubernetes-<v>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kube-proxy}
#   $ROOT/pause-<kubernetes v>/bin/pause   (the pod sandbox, from the same module's build/pause)
#   $ROOT/etcd-<v>/bin/etcd
#   $ROOT/serving-<v>/bin/{controller,webhook,activator,autoscaler,queue}   + config/ (the module's YAML)
#   $ROOT/eventing-<v>/bin/{controller,webhook,jobsink,requestreply,mtping,apiserver-receive-adapter,
#                           auth-proxy,broker-ingress,broker-filter,mtchannel-broker,
#                           imc-controller,imc-dispatcher}                    + config/
#   $ROOT/coredns-<v>/bin/coredns
#   $ROOT/traefik-<v>/bin/traefik
#
# Each component is built with the ordinary `go` client (GOTOOLCHAIN=local, modules from the
# module proxy), static (CGO_ENABLED=0), into its own folder with a `.built` stamp, so a version
# bump rebuilds that component only. Knative's binaries go into FROM-scratch images
# (scripts/cluster-images.sh); the others run on the host as a node's daemons do.
#
# Usage: scripts/cluster-build.sh [component ...]   (default: all; stdout: the cache root only)
# Env:   MODELPLANE_CLUSTER_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/modelplane/cluster)
set -Eeuo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=cluster-versions.env
source "$HERE/cluster-versions.env"
ROOT="${MODELPLANE_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelplane/cluster}"
mkdir -p "$ROOT"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$ROOT/gomod}" GOCACHE="$ROOT/gocache"
export GOMAXPROCS="${CLUSTER_BUILD_JOBS:-$(nproc)}"

say() { echo "cluster-build.sh: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }
# Go >= 1.25 (the Knative modules' go lines). Debian's golang-go (1.19, which kube-build.sh uses)
# may be first on PATH: take the toolchain installed under /usr/local/go then.
go_ok() { "$1" version 2>/dev/null | grep -qE 'go1\.(2[5-9]|[3-9][0-9])'; }
if ! go_ok go; then
    go_ok /usr/local/go/bin/go || die "Go >= 1.25 is needed (found: $(go version 2>&1 || true))"
    export PATH="/usr/local/go/bin:$PATH"
fi
# Nothing but the module proxy: no direct VCS fallback.
export GOPROXY="${GOPROXY_OVERRIDE:-$(go env GOPROXY | sed 's/,direct$//')}"

exec 9>"$ROOT/.lock"
flock 9

# build NAME VERSION FUNC: run FUNC in a fresh work dir unless NAME-VERSION/.built exists.
build() {
    local name=$1 version=$2 fn=$3 dest="$ROOT/$1-$2" t0=$SECONDS rc
    if [[ -f "$dest/.built" ]]; then return 0; fi
    rm -rf "$dest" && mkdir -p "$dest/bin" "$dest/work"
    say "building $name $version (log: $dest/build.log)"
    # errexit holds inside the subshell only outside an `if`/`!` context: take its status by hand.
    set +e
    ( set -e; cd "$dest/work"; "$fn" "$dest" "$version" ) >"$dest/build.log" 2>&1
    rc=$?
    set -e
    if [[ $rc != 0 ]]; then
        tail -n 40 "$dest/build.log" >&2
        die "$name $version did not build"
    fi
    rm -rf "$dest/work"
    echo "$((SECONDS - t0))" >"$dest/.built"
    say "built $name $version in $((SECONDS - t0)) s"
}

# modfield FIELD MODULE@VERSION: a field of `go mod download -json` (Dir: the source; GoMod: its go.mod).
modfield() {
    go mod download -json "$2" | sed -n "s/^\s*\"$1\": \"\(.*\)\",\$/\1/p"
}

# A wrapper module: go.mod requiring $1 at $2, plus any extra lines on stdin.
wrapper() {
    { echo "module modelplane.local/build"; echo; echo "go 1.25.0"; echo; echo "require $1 $2"; cat; } >go.mod
}

KUBE_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
build_kubernetes() {
    local dest=$1 v=$2 minor
    minor=$(echo "$v" | cut -d. -f2)
    # k8s.io/kubernetes points every k8s.io/<staging> module at ./staging/src/...; a module that
    # requires it replaces each with its published v0.MINOR.PATCH (kubernetes/kubernetes#79384).
    local gomod
    gomod=$(modfield GoMod "k8s.io/kubernetes@$v")
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" \
        | awk -v s="v0.${v#v1.}" '{print "replace " $1 " => " $1 " " s}' \
        | wrapper k8s.io/kubernetes "$v"
    cat go.mod
    local c
    { echo '//go:build tools'; echo; echo 'package build'; echo; echo 'import ('
      for c in $KUBE_COMMANDS; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done; echo ')'; } >tools.go
    go mod tidy
    local pkg=k8s.io/component-base/version cgo=k8s.io/client-go/pkg/version ld="-s -w"
    for p in $pkg $cgo; do
        ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
        ld+=" -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    for c in $KUBE_COMMANDS; do
        go build -trimpath -ldflags "$ld" -o "$dest/bin/$c" "k8s.io/kubernetes/cmd/$c"
    done
    "$dest/bin/kube-apiserver" --version
}

# The pod sandbox ("pause") binary, as the Kubernetes tree builds it (build/pause/Makefile): static C.
build_pause() {
    local dest=$1 v=$2 dir
    dir=$(modfield Dir "k8s.io/kubernetes@$v")
    gcc -Os -Wall -Werror -static -DVERSION="$v-modelplane" -o "$dest/bin/pause" "$dir/build/pause/linux/pause.c"
    strip "$dest/bin/pause"
}

build_etcd() {
    local dest=$1 v=$2
    wrapper go.etcd.io/etcd/server/v3 "$v" </dev/null
    # etcd's own main.go is this one call (go.etcd.io/etcd/v3 main.go).
    printf '%s\n' 'package main' 'import ("os"; "go.etcd.io/etcd/server/v3/etcdmain")' \
        'func main() { etcdmain.Main(os.Args) }' >main.go
    go mod tidy
    go build -trimpath -ldflags "-s -w" -o "$dest/bin/etcd" .
    "$dest/bin/etcd" --version
}

# A Knative module: its commands, built in a wrapper module that requires it (`go install
# pkg@version` would also ask the proxy for the module's version list, which it refuses for
# knative.dev/eventing), and its config/ YAML, copied so the cache does not depend on the module cache.
knative() {
    local module=$1 dest=$2 v=$3; shift 3
    local spec out pkg dir
    wrapper "$module" "$v" </dev/null
    { echo '//go:build tools'; echo; echo 'package build'; echo; echo 'import ('
      for spec in "$@"; do echo "	_ \"$module/${spec#*=}\""; done; echo ')'; } >tools.go
    go mod tidy
    for spec in "$@"; do
        out=${spec%%=*} pkg=${spec#*=}
        go build -trimpath -ldflags "-s -w" -o "$dest/bin/$out" "$module/$pkg"
        [[ -x "$dest/bin/$out" ]]
        # The image scripts/cluster-images.sh makes of it replaces `ko://$module/$pkg` in config/.
        echo "$out $module/$pkg" >>"$dest/ko-paths"
    done
    dir=$(modfield Dir "$module@$v")
    cp -r "$dir/config" "$dest/config"
    chmod -R u+w "$dest/config"
}
build_serving() {
    knative knative.dev/serving "$1" "$2" controller=cmd/controller webhook=cmd/webhook \
        activator=cmd/activator autoscaler=cmd/autoscaler queue=cmd/queue
    # Serving's config/ links some files from its vendored knative.dev/networking and
    # knative.dev/caching (the KIngress, ServerlessService, Certificate, ClusterDomainClaim and
    # Image CRDs, config-network); module zips drop links, so take them from those modules at the
    # versions serving's go.mod requires.
    local gomod dep v dir
    gomod=$(modfield GoMod "knative.dev/serving@$2")
    for dep in networking caching; do
        v=$(awk -v m="knative.dev/$dep" '$1 == m {print $2}' "$gomod")
        dir=$(modfield Dir "knative.dev/$dep@$v")
        mkdir -p "$1/config/deps/$dep"
        cp "$dir"/config/*.yaml "$1/config/deps/$dep/"
        echo "knative.dev/$dep $v" >>"$1/config/deps/versions"
    done
    chmod -R u+w "$1/config"
}
build_eventing() {
    knative knative.dev/eventing "$1" "$2" controller=cmd/controller webhook=cmd/webhook \
        jobsink=cmd/jobsink requestreply=cmd/requestreply mtping=cmd/mtping \
        apiserver-receive-adapter=cmd/apiserver_receive_adapter auth-proxy=cmd/auth_proxy \
        broker-ingress=cmd/broker/ingress broker-filter=cmd/broker/filter mtchannel-broker=cmd/mtchannel_broker \
        imc-controller=cmd/in_memory/channel_controller imc-dispatcher=cmd/in_memory/channel_dispatcher
    # Eventing's release puts two ConfigMaps the controller's env names (the images of
    # eventing-integrations) into config/core/configmaps/ from third_party/ (hack/release.sh
    # update_eventing_integrations_release_cms); do the same.
    local dir
    dir=$(modfield Dir "knative.dev/eventing@$2")
    cp "$dir"/third_party/eventing-integrations-latest/eventing-{integrations,transformations}-images.yaml \
        "$1/config/core/configmaps/"
    chmod u+w "$1"/config/core/configmaps/*.yaml
}

build_coredns() {
    GOBIN="$1/bin" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$2"
    "$1/bin/coredns" -version
}

build_traefik() {
    local dest=$1 v=$2 gomod
    # Traefik's go.mod replaces a few modules with its forks; a module that requires it must
    # repeat those lines (replace directives only apply in the main module).
    gomod=$(modfield GoMod "github.com/traefik/traefik/v3@$v")
    awk '/^replace \(/{r=1; next} r && /^\)/{r=0; next} r && /=>/{print "replace " $0} /^replace [^(]/{print}' "$gomod" \
        | wrapper github.com/traefik/traefik/v3 "$v"
    cat go.mod
    printf '%s\n' '//go:build tools' '' 'package build' '' 'import _ "github.com/traefik/traefik/v3/cmd/traefik"' >tools.go
    go mod tidy
    go build -trimpath -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$v" \
        -o "$dest/bin/traefik" github.com/traefik/traefik/v3/cmd/traefik
    "$dest/bin/traefik" version
}

want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=(etcd kubernetes pause serving eventing coredns traefik)
for c in "${want[@]}"; do
    case $c in
        kubernetes) build kubernetes "$KUBERNETES_VERSION" build_kubernetes ;;
        etcd) build etcd "$ETCD_VERSION" build_etcd ;;
        pause) build pause "$KUBERNETES_VERSION" build_pause ;;
        serving) build serving "$KNATIVE_SERVING_VERSION" build_serving ;;
        eventing) build eventing "$KNATIVE_EVENTING_VERSION" build_eventing ;;
        coredns) build coredns "$COREDNS_VERSION" build_coredns ;;
        traefik) build traefik "$TRAEFIK_VERSION" build_traefik ;;
        *) die "unknown component '$c' (etcd kubernetes pause serving eventing coredns traefik)" ;;
    esac
done
echo "$ROOT"
