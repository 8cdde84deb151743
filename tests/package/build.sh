#!/usr/bin/env bash
# Build the Debian package from a copy of the working tree (tracked and new files, nothing
# ignored): dpkg-buildpackage writes beside the source tree and cleans it, which must not
# touch the checkout or its .venv.
#   tests/package/build.sh OUTDIR     -> OUTDIR/virthotplug_VERSION_all.deb, lintian.txt
# Installs the build dependencies (from debian/control) and lintian when missing.
set -euo pipefail
out=$(realpath -m "${1:?usage: build.sh OUTDIR}")
root=$(cd "$(dirname "$0")/../.." && pwd)
# The distribution's tools with the distribution's interpreter, whatever else is on PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive

log() { printf '[package] %s\n' "$*" >&2; }

mkdir -p "$out"
work=$(mktemp -d "$out/build.XXXXXX")
src="$work/virthotplug"
mkdir "$src"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and new files; a tracked file deleted in the work tree is simply not there.
    (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
        tar -C "$root" --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$src" -xf -
else  # an unpacked tarball
    tar -C "$root" --exclude=./.venv --exclude=./build --exclude=./.git -cf - . | tar -C "$src" -xf -
fi

if ! (cd "$src" && dpkg-checkbuilddeps) >/dev/null 2>&1 || ! command -v lintian >/dev/null; then
    log "installing build dependencies and lintian"
    [ -n "${VIRTHOTPLUG_APT_UPDATED:-}" ] || apt-get update -qq
    apt-get install -y -qq --no-install-recommends lintian >/dev/null
    (cd "$src" && apt-get build-dep -y -qq --no-install-recommends ./ >/dev/null)
fi

(cd "$src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log" >&2
    exit 1
}
rm -f "$out"/virthotplug_*.deb
mv "$work"/virthotplug_*_all.deb "$out"/
deb=$(ls "$out"/virthotplug_*_all.deb)
log "built $(basename "$deb")"
lintian --info --display-level '>=pedantic' "$deb" | tee "$out/lintian.txt" >&2 || true
if grep -q '^E: ' "$out/lintian.txt"; then
    log "lintian reports errors"
    exit 1
fi
rm -rf "$work"
echo "$deb"
