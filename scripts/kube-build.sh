#!/usr/bin/env bash
# Build (once) and print the folder of the Kubernetes binaries the cluster tests run:
# kube-apiserver, kubelet, kube-controller-manager, kube-scheduler, and the pod sandbox
# ("pause") binary.
#
# Debian bookworm ships kubernetes 1.20 only as a source package. We build it with
# Debian's Go, after swapping the vendored modern-go/reflect2 1.0.1 (crashes under
# Go >= 1.18 with "fatal error: fault" in aeshashbody) for Debian's 1.0.2. All four
# commands are built by one `make` so code generation and the Go build cache are shared
# (about 8 minutes on 2 cores the first time, measured on a fresh cache). The binaries are cached under
# ~/.cache/modelplane/kube/<version>/ and reused; the only thing printed on stdout is that
# folder, so `KUBE_BIN=$(scripts/kube-build.sh)`.
#
# Needs (CI): apt-get install -y dpkg-dev golang-go golang-github-modern-go-reflect2-dev
#             etcd-server make rsync gcc libc6-dev  (and a deb-src entry: added here when
#             missing, as root)
# Env: KUBE_VERSION (default 1.20.2, Debian's), MODELPLANE_KUBE_CACHE (default
#      ${XDG_CACHE_HOME:-~/.cache}/modelplane/kube), KUBE_BUILD_JOBS (default: nproc).
set -Eeuo pipefail

KUBE_VERSION="${KUBE_VERSION:-1.20.2}"
CACHE_ROOT="${MODELPLANE_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelplane/kube}"
DEST_DIR="$CACHE_ROOT/$KUBE_VERSION"
LOG="$DEST_DIR/build.log"
COMMANDS=(kube-apiserver kubelet kube-controller-manager kube-scheduler)
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2

say() { echo "kube-build.sh: $*" >&2; }
die() {
    say "FAILED: $*"
    if [[ -f "$LOG" ]]; then
        say "last lines of $LOG:"
        tail -n 40 "$LOG" >&2 || true
    fi
    exit 1
}
trap 'die "command failed at line $LINENO: $BASH_COMMAND"' ERR

built_already() {
    local c
    for c in "${COMMANDS[@]}"; do
        [[ -x "$DEST_DIR/$c" ]] && "$DEST_DIR/$c" --version >/dev/null 2>&1 || return 1
    done
    [[ -x "$DEST_DIR/pause" ]]
}
if built_already; then
    echo "$DEST_DIR"
    exit 0
fi

mkdir -p "$DEST_DIR"
# One build at a time: a second caller waits for the first and then reuses its binary.
exec 9>"$DEST_DIR/.lock"
flock 9
if built_already; then
    echo "$DEST_DIR"
    exit 0
fi

: >"$LOG"
say "building ${COMMANDS[*]} $KUBE_VERSION (about 8 minutes on 2 cores); log: $LOG"

for tool in go make dpkg-source apt-get rsync gcc; do
    command -v "$tool" >/dev/null || die "'$tool' not found: apt-get install -y golang-go make dpkg-dev rsync gcc"
done
[[ -f "$REFLECT2_SRC/reflect2.go" ]] \
    || die "$REFLECT2_SRC missing: apt-get install -y golang-github-modern-go-reflect2-dev"

# A deb-src entry for bookworm, in the deb822 format the image already uses.
has_deb_src() {
    grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}
if ! has_deb_src; then
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "no deb-src entry in /etc/apt, not root and no sudo: add one for bookworm"
        SUDO="sudo"
    fi
    say "adding /etc/apt/sources.list.d/modelplane-src.sources (deb-src bookworm main)"
    printf '%s\n' 'Types: deb-src' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm' 'Components: main' \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        | $SUDO tee /etc/apt/sources.list.d/modelplane-src.sources >/dev/null
    $SUDO apt-get update >>"$LOG" 2>&1 || die "apt-get update failed"
fi

WORK="$DEST_DIR/src"
rm -rf "$WORK"
mkdir -p "$WORK"
(
    cd "$WORK"
    apt-get source --only-source kubernetes >>"$LOG" 2>&1
) || die "apt-get source kubernetes failed (is there a deb-src entry? run apt-get update)"

SRC=$(find "$WORK" -maxdepth 1 -mindepth 1 -type d -name "kubernetes-*" | head -n 1)
[[ -n "$SRC" && -d "$SRC/cmd/kube-apiserver" && -f "$SRC/build/pause/linux/pause.c" ]] \
    || die "no kubernetes source tree under $WORK (apt-get source gave: $(ls "$WORK" | tr '\n' ' '))"
# Debian versions it 1.20.5+really1.20.2: the upstream version is the part after "really".
case "$SRC" in
    *"$KUBE_VERSION") ;;
    *) die "apt-get source gave $(basename "$SRC"), not kubernetes $KUBE_VERSION: set KUBE_VERSION" ;;
esac
say "source: $SRC"

VENDORED="$SRC/vendor/github.com/modern-go/reflect2"
[[ -d "$VENDORED" ]] || die "$VENDORED missing: unexpected source layout"
rm -rf "$VENDORED"
mkdir -p "$VENDORED"
# Copy (not link) the .go/.s files: the vendor tree must be self-contained.
find "$REFLECT2_SRC" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name LICENSE \) \
    -exec cp -L {} "$VENDORED/" \;
[[ -f "$VENDORED/go_above_118.go" ]] || die "Debian's reflect2 lacks go_above_118.go: need >= 1.0.2"

WHAT=""
for c in "${COMMANDS[@]}"; do WHAT+="cmd/$c "; done
(
    cd "$SRC"
    # Debian's tarball has no .git: give the version stamp explicitly.
    export KUBE_GIT_VERSION="v$KUBE_VERSION" KUBE_GIT_TREE_STATE=clean
    export GOFLAGS=-mod=vendor GO111MODULE=on GOTOOLCHAIN=local GOPROXY=off
    export GOCACHE="$DEST_DIR/gocache" GOPATH="$DEST_DIR/gopath"
    export GOMAXPROCS="${KUBE_BUILD_JOBS:-$(nproc)}"
    # kubelet needs cgo; the others are static either way.
    nice -n 10 make WHAT="${WHAT% }" >>"$LOG" 2>&1
) || die "make WHAT=\"${WHAT% }\" failed"

for c in "${COMMANDS[@]}"; do
    built=$(find "$SRC/_output" -type f -name "$c" -perm -u+x | head -n 1)
    [[ -n "$built" ]] || die "build finished but no $c binary under $SRC/_output"
    "$built" --version >>"$LOG" 2>&1 || die "built $c does not run"
    install -m 0755 "$built" "$DEST_DIR/$c.tmp"
    mv -f "$DEST_DIR/$c.tmp" "$DEST_DIR/$c"
done

# The pod sandbox image's one binary, as the Kubernetes tree builds it (build/pause/Makefile).
gcc -Os -Wall -Werror -static -DVERSION="v3.6-modelplane" -o "$DEST_DIR/pause.tmp" \
    "$SRC/build/pause/linux/pause.c" >>"$LOG" 2>&1 || die "building pause.c failed (gcc, libc6-dev)"
strip "$DEST_DIR/pause.tmp" 2>/dev/null || true
mv -f "$DEST_DIR/pause.tmp" "$DEST_DIR/pause"
say "built $("$DEST_DIR/kube-apiserver" --version) binaries in ${SECONDS}s"

# The source tree and Go caches are large; the binaries are all we keep.
trap - ERR
chmod -R u+w "$DEST_DIR/gopath" 2>/dev/null || true
rm -rf "$WORK" "$DEST_DIR/gocache" "$DEST_DIR/gopath" || say "warning: could not remove build leftovers in $DEST_DIR"
echo "$DEST_DIR"
