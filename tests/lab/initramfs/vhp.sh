# Shell helpers shared by the lab guest's scripts (sourced).

# Create /dev/virtio-ports/<name> for every named virtio-serial port, as udev would.
link_ports() {
    mkdir -p /dev/virtio-ports
    for f in /sys/class/virtio-ports/vport*/name; do
        [ -s "$f" ] || continue
        dev=${f%/name}
        # The boot loop and the uevent handler may both link a port: a private name
        # renamed into place is atomic where "ln -sf" (unlink, then link) races.
        ln -s "../${dev##*/}" "/dev/virtio-ports/.$$" && mv -f "/dev/virtio-ports/.$$" "/dev/virtio-ports/$(cat "$f")"
    done
}

# Print the device path of port $1 once it exists: ports appear asynchronously after insmod.
wait_port() {
    n=0
    while :; do
        link_ports
        [ -e "/dev/virtio-ports/$1" ] && echo "/dev/virtio-ports/$1" && return 0
        n=$((n + 1))
        # Poll briskly during boot, then idle along for a port that may never come.
        if [ $n -lt 100 ]; then sleep 0.1; else sleep 2; fi
    done
}
