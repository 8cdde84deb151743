#!/usr/bin/env bash
# Prepare a Debian 12 host for virthotplug's tests, demo and benchmarks.
# Idempotent and quick when everything is already in place. Works without systemd.
#  1. Debian packages (libvirt, QEMU, the guest agent, busybox, build deps of libvirt-python;
#     debootstrap and qemu-utils for the second stack and the Debian guests; the Debian
#     package's build dependencies)
#  2. /dev/kvm permissions (no udev here: without them every define re-probes QEMU for ~64 s)
#  3. virtlogd and libvirtd, started by hand only when they are not already running
#  4. the unprivileged lab user whose session-mode libvirtd the flood tests use
#     (tests/lab/private_libvirtd.py), so that they never load the host's system daemon
# and says which accelerator lab guests will use (the same rule as tests/lab/lab.py).
set -euo pipefail

PACKAGES=(
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
    qemu-system-x86 qemu-guest-agent busybox-static
    libvirt-dev pkg-config gcc libc6-dev python3-dev python3-venv
    mandoc python3-docutils procps man-db groff-base
    debootstrap qemu-utils
    # Build dependencies of the Debian package (debian/control) and lintian: the e2e tier
    # builds the .deb for the service guest (tests/e2e/test_service_systemd.py) and must
    # not change the host's packages itself.
    debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel
    lintian
    prometheus  # promtool for the rules' unit tests; tests/e2e runs the server itself
)

log() { printf '[host-setup] %s\n' "$*" >&2; }

# KVM only with hardware virtualisation: a /dev/kvm without vmx/svm (a software KVM module)
# accepts VMs but cannot run a Debian kernel.
report_accelerator() {
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -e /dev/kvm ]; then
        log "accelerator: KVM (<domain type='kvm'>)"
    else
        log "accelerator: TCG (<domain type='qemu'>): no vmx/svm flag in /proc/cpuinfo"
    fi
}

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        log "missing Debian packages: ${missing[*]} (run as root to install them)"
        exit 1
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$(id -u)" != 0 ]; then
    log "not root: leaving /dev/kvm and the daemons as they are"
    report_accelerator
    exit 0
fi

# No udev: /dev/kvm stays root:root 0600 and libvirt cannot use it.
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || log "could not fix /dev/kvm permissions"
fi

start_daemon() {  # name
    if pgrep -x "$1" >/dev/null; then return 0; fi
    log "starting $1"
    "$1" -d
}
start_daemon virtlogd
start_daemon libvirtd

# No login, no groups beyond its own (no kvm: the session daemon runs TCG guests only).
LAB_USER=vhplab
if ! getent passwd "$LAB_USER" >/dev/null; then
    log "creating the lab user $LAB_USER"
    useradd --system --user-group --home-dir /var/lib/vhplab --shell /usr/sbin/nologin "$LAB_USER"
fi

report_accelerator
for _ in $(seq 1 50); do
    virsh -q -c qemu:///system version >/dev/null 2>&1 && exit 0
    sleep 0.2
done
log "libvirtd does not answer on qemu:///system"
exit 1
