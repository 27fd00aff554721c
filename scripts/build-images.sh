#!/usr/bin/env bash
# Build the project's container images for real with podman, from its own Dockerfiles,
# and save each as an OCI archive for containerd (`ctr -n k8s.io images import`):
#
#   localhost/modelplane/debian:bookworm  the base: debootstrap --variant=minbase bookworm
#                                         + ca-certificates + this host's extra CAs
#                                         (public registries cannot be pulled here)
#   $REGISTRY/adapter:$TAG                knative/images/adapter     (BASE = the base above)
#   $REGISTRY/control:$TAG                knative/images/control
#   $REGISTRY/python-base:$TAG            knative/images/python-base
#   $REGISTRY/r-base:$TAG                 knative/images/r-base
#   $REGISTRY/{name}:{version, + -> _}    knative/images/model, one per models/*/model.yaml
#                                         (BASE = python-base or r-base by `language`)
#
# stdout: one JSON object {short name: {"ref", "archive", "id"}} (short names: adapter,
# control, python-base, r-base and each model's name; id: the image ID, which is also the
# config digest containerd shows); progress on stderr, a line per step with its time. On
# failure: non-zero, and the end of the failing step's log (or the missing tool).
#
# Cached under ${XDG_CACHE_HOME:-~/.cache}/modelplane/: in images/ the debootstrap rootfs
# tarball, the OCI archives (named by ref and image ID: an unchanged image is not saved
# again), the build logs and the staged build context; in containers/ podman's storage
# (images and the build-layer cache) and the podman configuration. A second run with
# nothing changed takes seconds.
#
#   scripts/build-images.sh          build (or reuse) everything, print the JSON
#   scripts/build-images.sh --env    only write the podman configuration and print the
#                                    CONTAINERS_CONF=... and CONTAINERS_STORAGE_CONF=...
#                                    lines that make podman see these images
#
# Env: REGISTRY (default localhost/modelplane), TAG (default: the version in
#      pyproject.toml), DEBIAN_MIRROR (default: the Debian mirror of
#      /etc/apt/sources.list.d, else http://deb.debian.org/debian), MODELPLANE_CA_DIR
#      (extra CAs put into the local base, default /usr/local/share/ca-certificates).
# Needs: root; the Debian packages podman, runc and debootstrap (podman brings conmon and
#        the CNI plugins; tar, flock, sha256sum, findmnt and debian-archive-keyring are on
#        every Debian system).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_HOME="${XDG_CACHE_HOME:-$HOME/.cache}/modelplane"
CACHE="$CACHE_HOME/images"
STORE="$CACHE_HOME/containers"
CONF_DIR="$STORE/conf"
LOGS="$CACHE/logs"
ARCHIVES="$CACHE/archives"
SUITE=bookworm
MINBASE_REF="localhost/modelplane/debian-minbase:$SUITE"
BASE_REF="localhost/modelplane/debian:$SUITE"
CA_DIR="${MODELPLANE_CA_DIR:-/usr/local/share/ca-certificates}"
DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
START=$SECONDS
LOG=""  # the log of the step running now: its end is shown when the step fails

say() { echo "build-images.sh: $*" >&2; }
die() {
    say "FAILED: $*"
    if [[ -n "$LOG" && -s "$LOG" ]]; then
        say "last lines of $LOG:"
        tail -n 40 "$LOG" >&2 || true
    fi
    exit 1
}
trap 'die "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

need() {  # need TOOL DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install -y $2"
}

# Replace FILE with stdin only when the content differs (readers never see half a file,
# and an unchanged file keeps its mtime).
write_if_changed() {
    local file="$1" tmp
    tmp="$(mktemp "$file.XXXXXX")"
    cat >"$tmp"
    if cmp -s "$tmp" "$file"; then rm -f "$tmp"; else mv -f "$tmp" "$file"; fi
}

project_version() {
    awk '/^\[/{p = ($0 == "[project]")} p && /^version *=/{gsub(/^version *= *"|".*$/, ""); print; exit}' \
        "$ROOT/pyproject.toml"
}

yaml_scalar() {  # yaml_scalar FILE KEY: a top-level `key: value` of a model.yaml
    awk -v k="$2" '$0 ~ "^" k ":" {sub("^" k ": *", ""); sub(/ +#.*$/, ""); gsub(/^["'"'"']|["'"'"'] *$/, ""); print; exit}' "$1"
}

debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
    local m
    m="$({ grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
           grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
         } | grep -E '^https?://[^ ]*/debian/?$' | head -n 1 || true)"
    echo "${m:-http://deb.debian.org/debian}"
}

# -- podman configuration ---------------------------------------------------------------
# containers.conf: runc (crun refuses this cgroup layout), rlimits root can set here
# (no CAP_SYS_RESOURCE), cgroupfs (no systemd), file events. storage.conf: graphroot in
# the cache (survives between CI runs). runroot and libpod's tmp_dir: fixed (podman records
# them in its database and refuses to start when they change) and short (`podman container
# cleanup`, which `podman run` waits for, refuses a runroot longer than 50 characters:
# every run would then hang 20 s), under /run, emptied when the machine rebooted (/run is
# not a tmpfs here), as a reboot would on a usual host. One per graphroot (two storages
# must not share run-time state).
RUN_DIR="/run/modelplane-podman/$(printf '%s' "$STORE" | sha256sum | cut -c1-8)"
CONTAINERS_CONF="$CONF_DIR/containers.conf"
CONTAINERS_STORAGE_CONF="$CONF_DIR/storage.conf"
export CONTAINERS_CONF CONTAINERS_STORAGE_CONF

write_storage_conf() {  # write_storage_conf DRIVER GRAPHROOT RUNROOT
    printf '[storage]\ndriver = "%s"\ngraphroot = "%s"\nrunroot = "%s"\n' "$1" "$2" "$3"
    if [[ "$1" == overlay ]]; then printf '\n[storage.options.overlay]\nmountopt = "nodev"\n'; fi
}

# Can this kernel and filesystem mount podman's overlay driver? Tried in a throwaway
# storage: import a one-file image, create a container, mount it, read the file.
overlay_works() {
    local t rc=0 cid mnt run
    t="$(mktemp -d "$STORE/probe.XXXXXX")"
    run="$(mktemp -d "$RUN_DIR/probe.XXXXXX")"
    mkdir -p "$t/rootfs/etc" && echo probe >"$t/rootfs/etc/probe"
    write_storage_conf overlay "$t/root" "$run" >"$t/storage.conf"
    local pm=(env CONTAINERS_STORAGE_CONF="$t/storage.conf" podman)
    {
        tar -C "$t/rootfs" -c . | "${pm[@]}" import --quiet - localhost/modelplane-probe:overlay \
        && cid="$("${pm[@]}" create localhost/modelplane-probe:overlay /probe)" \
        && mnt="$("${pm[@]}" mount "$cid")" \
        && grep -q probe "$mnt/etc/probe" \
        && "${pm[@]}" umount "$cid" && "${pm[@]}" rm "$cid"
    } >"$t/log" 2>&1 || rc=1
    [[ $rc == 0 ]] || { say "overlay storage does not work here:"; tail -n 5 "$t/log" >&2; }
    "${pm[@]}" rm -af >/dev/null 2>&1 || true
    "${pm[@]}" rmi -af >/dev/null 2>&1 || true
    findmnt -rn -o TARGET | grep -F -e "$t/" -e "$run/" | sort -r | xargs -r umount >/dev/null 2>&1 || true
    rm -rf "$t" "$run" 2>/dev/null || true
    return $rc
}

configure_podman() {
    mkdir -p "$CONF_DIR" "$STORE" "$RUN_DIR"
    local boot driver
    boot="$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)"
    if [[ "$(cat "$RUN_DIR/boot_id" 2>/dev/null || true)" != "$boot" ]]; then
        rm -rf "$RUN_DIR/storage" "$RUN_DIR/libpod"  # run-time state of an earlier boot
        echo "$boot" >"$RUN_DIR/boot_id"
    fi
    cat <<EOF | write_if_changed "$CONTAINERS_CONF"
# Written by scripts/build-images.sh.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$RUN_DIR/libpod"
EOF
    # The storage driver is chosen once per graphroot (a graphroot cannot change driver).
    driver="$(cat "$STORE/driver" 2>/dev/null || true)"
    if [[ -z "$driver" ]]; then
        if overlay_works; then driver=overlay; else driver=vfs; fi
        echo "$driver" >"$STORE/driver"
        say "podman storage driver: $driver (graphroot $STORE/storage)"
    fi
    local old_runroot
    old_runroot="$(grep -s '^runroot' "$CONTAINERS_STORAGE_CONF" || true)"
    { echo "# Written by scripts/build-images.sh."; write_storage_conf "$driver" "$STORE/storage" "$RUN_DIR/storage"; } \
        | write_if_changed "$CONTAINERS_STORAGE_CONF"
    if [[ -n "$old_runroot" && "$old_runroot" != "$(grep '^runroot' "$CONTAINERS_STORAGE_CONF")" ]]; then
        # podman refuses a database made with other run-time paths; it only lists
        # containers (all of ours are --rm), images live in the graphroot.
        rm -f "$STORE/storage/libpod/bolt_state.db"
        say "podman run-time paths moved to $RUN_DIR: container database reset"
    fi
}

# -- steps ------------------------------------------------------------------------------
image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null; }

# build SHORT REF DOCKERFILE CONTEXT [podman build args...]: prints nothing, sets BUILT_ID.
build() {
    local short="$1" ref="$2" dockerfile="$3" context="$4" t0=$SECONDS before
    shift 4
    LOG="$LOGS/$short.log"
    before="$(image_id "$ref" || true)"
    nice -n 10 podman build --layers --pull=never --network=host --format=oci \
        -f "$dockerfile" -t "$ref" "$@" "$context" >"$LOG" 2>&1 \
        || die "podman build of $ref ($dockerfile) failed"
    BUILT_ID="$(image_id "$ref")"
    if [[ "$BUILT_ID" == "$before" ]]; then
        say "$short: $ref unchanged (${BUILT_ID:0:12}, $((SECONDS - t0))s)"
    else
        say "$short: built $ref (${BUILT_ID:0:12}) in $((SECONDS - t0))s"
    fi
}

base_image() {
    local tarball="$CACHE/debian-$SUITE-minbase.tar" t0=$SECONDS sha current ctx
    if [[ ! -s "$tarball" ]]; then
        need debootstrap debootstrap
        local mirror rootfs
        mirror="$(debian_mirror)"
        rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
        LOG="$LOGS/debootstrap.log"
        say "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
        nice -n 10 debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$mirror" \
            >"$LOG" 2>&1 || die "debootstrap failed"
        # What the official debian:*-slim images do: no services started by package
        # installs, no apt caches, no docs/man pages/locales from later installs.
        printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" && chmod 755 "$rootfs/usr/sbin/policy-rc.d"
        cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
EOF
        cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
               "$rootfs"/var/log/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
        find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
        find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
        find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
        : >"$rootfs/etc/resolv.conf"
        echo localhost >"$rootfs/etc/hostname"
        tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.tmp" . && mv -f "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
        sha256sum "$tarball" | cut -d' ' -f1 >"$tarball.sha256"
        say "base: debootstrap done in $((SECONDS - t0))s ($(du -h "$tarball" | cut -f1) rootfs tarball)"
    fi
    [[ -s "$tarball.sha256" && "$tarball.sha256" -nt "$tarball" ]] || sha256sum "$tarball" | cut -d' ' -f1 >"$tarball.sha256"
    sha="$(cat "$tarball.sha256")"
    # Imported only when the tarball changed: a new import is a new image ID, which would
    # invalidate every layer built on it.
    current="$(podman image inspect --format '{{index .Labels "org.modelplane.rootfs"}}' "$MINBASE_REF" 2>/dev/null || true)"
    if [[ "$current" != "$sha" ]]; then
        LOG="$LOGS/import.log"
        podman import --change "LABEL org.modelplane.rootfs=$sha" --change "ENV PATH=$DEFAULT_PATH" \
            --change 'CMD ["/bin/bash"]' "$tarball" "$MINBASE_REF" >"$LOG" 2>&1 || die "podman import failed"
        say "base: imported $MINBASE_REF"
    fi
    # This machine's extra CAs (a TLS-intercepting egress proxy): test infrastructure only,
    # so they live here and not in the project's Dockerfiles.
    ctx="$CACHE/base-context"
    mkdir -p "$ctx"
    local want
    want="$(mktemp -d "$CACHE/ca.XXXXXX")"
    if [[ -d "$CA_DIR" ]]; then
        find "$CA_DIR" -type f -name '*.crt' -exec cp -p {} "$want/" \;
    fi
    if [[ ! -d "$ctx/ca" ]] || ! diff -r "$want" "$ctx/ca" >/dev/null 2>&1; then
        rm -rf "$ctx/ca" && mv "$want" "$ctx/ca"
    else
        rm -rf "$want"
    fi
    cat <<EOF | write_if_changed "$ctx/Containerfile"
# Written by scripts/build-images.sh: the local test base, $BASE_REF.
FROM $MINBASE_REF
COPY ca/ /usr/local/share/ca-certificates/host/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
EOF
    build debian "$BASE_REF" "$ctx/Containerfile" "$ctx"
}

# The build context of adapter and control: what their Dockerfiles COPY, copied to a fixed
# place in the cache. podman 4.3 keys the layer cache of a single-file COPY on the file's
# absolute path, so building from the checkout would re-install every dependency whenever
# the repository is checked out somewhere else (another CI workspace, a worktree).
stage_repo_context() {
    local stage="$CACHE/context/repo" srcs=()
    mapfile -t srcs < <(awk '$1 == "COPY" {for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i}' \
        "$ROOT/knative/images/adapter/Dockerfile" "$ROOT/knative/images/control/Dockerfile" | sort -u)
    [[ -f "$ROOT/.dockerignore" ]] && srcs+=(.dockerignore)
    LOG="$LOGS/context.log"
    rm -rf "$stage.new" && mkdir -p "$stage.new"
    (cd "$ROOT" && tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' "${srcs[@]}") \
        2>"$LOG" | tar -C "$stage.new" -x 2>>"$LOG" || die "copying the build context failed"
    rm -rf "$stage" && mv "$stage.new" "$stage"
    REPO_CONTEXT="$stage"
}

# save SHORT REF ID: the OCI archive of REF for containerd, named by ref and image ID so
# that an unchanged image is not saved again. Sets ARCHIVE.
save() {
    local short="$1" ref="$2" id="$3" t0=$SECONDS name
    name="$(echo "$ref" | tr '/:@' '___')"
    ARCHIVE="$ARCHIVES/$name@${id:0:12}.oci.tar"
    if [[ ! -s "$ARCHIVE" ]]; then
        LOG="$LOGS/$short.save.log"
        rm -f "$ARCHIVE.tmp"
        nice -n 10 podman save --format oci-archive -o "$ARCHIVE.tmp" "$ref" >"$LOG" 2>&1 || die "podman save of $ref failed"
        mv -f "$ARCHIVE.tmp" "$ARCHIVE"
        say "$short: saved $(du -h "$ARCHIVE" | cut -f1) OCI archive in $((SECONDS - t0))s"
    fi
    # Archives of earlier builds of the same ref.
    find "$ARCHIVES" -maxdepth 1 -name "$name@*.oci.tar" ! -name "${ARCHIVE##*/}" -delete
}

json_entries=()
record() {  # record SHORT REF ID
    save "$1" "$2" "$3"
    json_entries+=("$(printf '  "%s": {"ref": "%s", "archive": "%s", "id": "%s"}' "$1" "$2" "$ARCHIVE" "$3")")
}

# -- main -------------------------------------------------------------------------------
[[ "$(id -u)" == 0 ]] || die "needs root (rootful podman, debootstrap); run it with sudo"
need podman podman
need runc runc
need flock util-linux
mkdir -p "$CACHE" "$LOGS" "$ARCHIVES" "$STORE"
[[ $# == 0 || ( $# == 1 && "$1" == --env ) ]] || die "unknown arguments: $* (usage: $0 [--env])"
# One build at a time: a second caller waits, then finds everything cached. --env does not
# wait for a build, only for the (short) configuration step.
if [[ $# == 0 ]]; then
    exec 9>"$CACHE/.lock"
    flock 9
fi
exec 8>"$STORE/.conf.lock"
flock 8
configure_podman
flock -u 8
if [[ "${1:-}" == "--env" ]]; then
    echo "CONTAINERS_CONF=$CONTAINERS_CONF"
    echo "CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"
    exit 0
fi

REGISTRY="${REGISTRY:-localhost/modelplane}"
REGISTRY="${REGISTRY%/}"
TAG="${TAG:-$(project_version)}"
[[ -n "$TAG" ]] || die "no version in $ROOT/pyproject.toml and TAG not set"

base_image
stage_repo_context

declare -A lang_base
for short in adapter control python-base r-base; do
    case "$short" in
        adapter|control) context="$REPO_CONTEXT" ;;
        *) context="$ROOT/knative/images/$short" ;;
    esac
    ref="$REGISTRY/$short:$TAG"
    build "$short" "$ref" "$ROOT/knative/images/$short/Dockerfile" "$context" --build-arg "BASE=$BASE_REF"
    record "$short" "$ref" "$BUILT_ID"
done
lang_base[python]="$REGISTRY/python-base:$TAG"
lang_base[r]="$REGISTRY/r-base:$TAG"

for manifest in "$ROOT"/models/*/model.yaml; do
    [[ -f "$manifest" ]] || continue
    folder="$(dirname "$manifest")"
    name="$(yaml_scalar "$manifest" name)"
    version="$(yaml_scalar "$manifest" version)"
    language="$(yaml_scalar "$manifest" language)"
    [[ -n "$name" && -n "$version" ]] || die "$manifest: no name or version"
    case "$name" in adapter|control|python-base|r-base|debian)
        die "$manifest: model name $name is also a platform image's name" ;;
    esac
    [[ -n "${lang_base[$language]:-}" ]] || die "$manifest: language '$language' is neither python nor r"
    ref="$REGISTRY/$name:${version//+/_}"
    build "$name" "$ref" "$ROOT/knative/images/model/Dockerfile" "$folder" \
        --build-arg "BASE=${lang_base[$language]}" --ignorefile "$ROOT/scripts/model.dockerignore"
    record "$name" "$ref" "$BUILT_ID"
done

LOG=""
say "done in $((SECONDS - START))s"
{
    echo "{"
    for i in "${!json_entries[@]}"; do
        if (( i + 1 < ${#json_entries[@]} )); then echo "${json_entries[$i]},"; else echo "${json_entries[$i]}"; fi
    done
    echo "}"
}
