#!/usr/bin/env bash
# The Debian package on this host, end to end (make package-test; CI runs it after make test):
#   1. build it from a copy of the tree (tests/package/build.sh) and run lintian: errors fail
#   2. apt-get install ./virthotplug_*.deb
#   3. the installed-package tests (tests/package) and the hook e2e test (tests/e2e/test_hook.py)
#      with the system python3, its python3-libvirt and the package's modules: no venv; among
#      them tests/package/test_stack3.py: the same .deb apt-installed in stack 3's forky root
#      (built if missing) and run there with forky's python3 against the root's libvirtd
#   4. apt-get remove keeps the conffiles (an admin's change survives; the hook's entry point
#      stays and never fails a VM, its program is gone), purge leaves nothing: no path of
#      the package that was not there before (directories shared with other packages stay)
# Needs root and a running libvirtd (make host). Refuses to run over an installed virthotplug
# or files of the package that something else put there.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/build/package"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin  # the distribution's python3 and tools only
export DEBIAN_FRONTEND=noninteractive
unset LIBVIRT_DEFAULT_URI PYTHONPATH VIRTUAL_ENV

HOOK=/etc/libvirt/hooks/qemu.d/virthotplug     # the /bin/sh entry point libvirtd runs
HOOK_PROGRAM=/usr/share/virthotplug/hooks/qemu # the Python hook program it runs
CONF=/etc/virthotplug/virthotplug.conf
# Everything the package may leave behind if removal went wrong.
LEFTOVERS=(
    /usr/bin/virthotplug "$HOOK" /etc/virthotplug /usr/share/virthotplug
    /lib/systemd/system/virthotplug.service /usr/lib/systemd/system/virthotplug.service
    /etc/systemd/system/multi-user.target.wants/virthotplug.service
    /var/lib/systemd/deb-systemd-helper-enabled/virthotplug.service.dsh-also
    /usr/share/bash-completion/completions/virthotplug
    /usr/share/man/man1/virthotplug.1.gz /usr/share/man/man5/virthotplug.conf.5.gz
    /usr/share/man/man8/virthotplug-hook.8.gz /usr/share/doc/virthotplug
    /usr/lib/python3/dist-packages/virthotplug
)

log() { printf '[package-test] %s\n' "$*" >&2; }
fail() {
    log "FAIL: $*"
    exit 1
}
stage_start=$(date +%s.%N)
elapsed() { awk -v since="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f s", now - since }'; }
state() { dpkg-query -W -f='${db:Status-Status}' virthotplug 2>/dev/null || true; }

case "$(state)" in
"" | not-installed) ;;
*) fail "virthotplug is $(state) on this host: purge it first" ;;
esac
for path in "${LEFTOVERS[@]}"; do
    [ ! -e "$path" ] || fail "$path exists but belongs to no package (a test in progress?)"
done
# The package's dependencies (and the build's) come from the archive: fresh lists, once.
apt-get update -qq
export VIRTHOTPLUG_APT_UPDATED=1
missing=()
# Test-only: pytest, and jsonschema for the e2e helpers these tests share (they validate
# every JSON document against the published schemas).
for p in python3-pytest python3-jsonschema; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

t=$(date +%s.%N)
deb=$(bash "$root/tests/package/build.sh" "$out")
log "built and linted $(basename "$deb") in $(elapsed "$t"); lintian: $(grep -c . "$out/lintian.txt" || true) lines ($out/lintian.txt)"
contents=$(dpkg-deb -c "$deb")
for path in "$HOOK" "$HOOK_PROGRAM"; do
    grep -q "^-rwxr-xr-x root/root .* \.$path\$" <<<"$contents" || fail "no $path (0755) in $deb"
done

# Every path the package ships, and which of them existed before (directories such as /etc
# or /etc/libvirt/hooks, owned by other packages): purge must remove all the others.
mapfile -t shipped < <(dpkg-deb --fsys-tarfile "$deb" | tar -t | sed -e 's|^\.||; s|/$||' | grep .)
declare -A existed=()
for path in "${shipped[@]}"; do
    [ ! -e "$path" ] || existed[$path]=1
done

purge() {
    case "$(state)" in
    "" | not-installed) ;;
    *) apt-get purge -y -qq virthotplug >/dev/null ;;
    esac
}
trap purge EXIT

t=$(date +%s.%N)
apt-get install -y -qq "$deb" >/dev/null
log "installed in $(elapsed "$t")"

# From outside the checkout: "python3 -m virthotplug" must find the package's modules.
t=$(date +%s.%N)
scratch=$(mktemp -d)
(cd "$scratch" && VIRTHOTPLUG_DEB=$deb python3 -m pytest -p no:cacheprovider --rootdir "$root" \
    "$root/tests/package" -v) || fail "installed-package tests"
(cd "$scratch" && python3 -m pytest -p no:cacheprovider --rootdir "$root" \
    "$root/tests/e2e/test_hook.py" -v) || fail "hook e2e test with the installed package"
rm -rf "$scratch"
log "tests against the installed package in $(elapsed "$t")"

t=$(date +%s.%N)
echo "# changed by the admin" >>"$CONF"
apt-get remove -y -qq virthotplug >/dev/null
[ -f "$CONF" ] && grep -q 'changed by the admin' "$CONF" || fail "remove dropped the changed $CONF"
[ ! -e /usr/bin/virthotplug ] || fail "remove left /usr/bin/virthotplug"
[ ! -e "$HOOK_PROGRAM" ] || fail "remove left $HOOK_PROGRAM"
# The entry point is a conffile and stays: without its program it must still let VMs start
# and live (a failing reconnect hook kills the guest), with nothing on stdout.
for operation in prepare start started reconnect migrate restore stopped; do
    got=$(env -i PATH=/usr/bin:/bin "$HOOK" vhp-removed "$operation" begin - </dev/null 2>/dev/null) ||
        fail "the kept $HOOK failed at $operation without its program"
    [ -z "$got" ] || fail "the kept $HOOK wrote to stdout at $operation"
done
apt-get purge -y -qq virthotplug >/dev/null
trap - EXIT
left=()
for path in "${LEFTOVERS[@]}"; do
    [ ! -e "$path" ] || left+=("$path")
done
for path in "${shipped[@]}"; do
    [ -n "${existed[$path]:-}" ] || [ ! -e "$path" ] || left+=("$path")
done
[ ${#left[@]} -eq 0 ] || fail "purge left ${left[*]}"
case "$(state)" in
"" | not-installed) ;;
*) fail "after purge dpkg says virthotplug is $(state)" ;;
esac
log "removed and purged in $(elapsed "$t"): nothing left"
log "package stage: $(elapsed "$stage_start")"
