#!/usr/bin/env bash
# The test cluster's images, built with podman from the binaries scripts/cluster-build.sh made:
# each static binary alone in a FROM-scratch image, run as a non-root user as Knative's own
# images are (ko's default base runs as 65532), saved as an OCI archive for containerd.
#
#   localhost/<ko import path>:<module version>   for every Knative command, e.g.
#       localhost/knative.dev/serving/cmd/queue:v0.50.0 replaces ko://knative.dev/serving/cmd/queue
#   localhost/modelplane-cluster/traefik:<version>
#
# stdout: one line per image, "<ref> <archive>". Cached: an archive is rebuilt only when its
# binary changed (the archive is named by the binary's sha256).
# Usage: scripts/cluster-images.sh CLUSTER_CACHE_ROOT   (what scripts/cluster-build.sh printed)
set -Eeuo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="${1:?usage: cluster-images.sh CLUSTER_CACHE_ROOT}"
# shellcheck source=cluster-versions.env
source "$HERE/cluster-versions.env"
OUT="$ROOT/images"
mkdir -p "$OUT"
say() { echo "cluster-images.sh: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }
command -v podman >/dev/null || die "podman not found: apt-get install -y podman runc"
# podman's configuration for this host (runc, rlimits, storage in the cache): build-images.sh's.
eval "$("$HERE/build-images.sh" --env | sed 's/^/export /')"

exec 9>"$OUT/.lock"
flock 9

# image REF BINARY: a FROM-scratch image holding BINARY as /ko-app/<name>.
image() {
    local ref=$1 bin=$2 name sum archive ctx
    name=$(basename "$bin")
    sum=$(sha256sum "$bin" | cut -c1-16)
    archive="$OUT/$(echo "$ref" | tr '/:' '__')-$sum.tar"
    if [[ ! -s "$archive" ]]; then
        ctx=$(mktemp -d "$OUT/ctx.XXXXXX")
        cp "$bin" "$ctx/$name"
        printf '%s\n' 'FROM scratch' "COPY $name /ko-app/$name" 'USER 65532:65532' \
            'ENV KO_DATA_PATH=/var/run/ko' "ENTRYPOINT [\"/ko-app/$name\"]" >"$ctx/Containerfile"
        podman build --pull=never --format=oci -t "$ref" -f "$ctx/Containerfile" "$ctx" >"$ctx/log" 2>&1 \
            || { cat "$ctx/log" >&2; die "podman build of $ref failed"; }
        rm -f "$OUT/$(echo "$ref" | tr '/:' '__')"-*.tar
        podman save --quiet --format oci-archive -o "$archive.tmp" "$ref"
        mv "$archive.tmp" "$archive"
        rm -rf "$ctx"
        say "built $ref"
    fi
    echo "$ref $archive"
}

for component in "serving-$KNATIVE_SERVING_VERSION" "eventing-$KNATIVE_EVENTING_VERSION"; do
    [[ -f "$ROOT/$component/ko-paths" ]] || die "$ROOT/$component is not built: run scripts/cluster-build.sh"
    version=${component#*-}
    while read -r bin path; do
        image "localhost/$path:$version" "$ROOT/$component/bin/$bin"
    done <"$ROOT/$component/ko-paths"
done
image "localhost/modelplane-cluster/traefik:$TRAEFIK_VERSION" "$ROOT/traefik-$TRAEFIK_VERSION/bin/traefik"
