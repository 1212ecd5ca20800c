#!/bin/sh
# /init of the snaptree Linux test guest (busybox sh, PID 1 of the initramfs).
#
# Mounts the ext4 filesystem of the first virtio disk (/dev/vda) at /data and then
# appends numbered lines to /data/log.txt forever, fsyncing after each one:
#     <n> <uptime-seconds> <boot_id>
# so that every snapshot of the disk can be checked offline (tests/guest/linux/check.py).
#
# Console protocol (one line each, on the serial console):
#     SNAPTREE-GUEST boot_id=<boot_id> kernel=<uname -r>
#     SNAPTREE-GUEST agent=started|absent
#     SNAPTREE-GUEST workload=start n=<first n> interval_ms=<ms>
#     SNAPTREE-LINE <n>                 (printed only after line n is fsynced)
#     SNAPTREE-GUEST error=<what>       (then the guest powers off if it cannot go on)
#
# Kernel command line: snaptree.interval_ms=N sets the pause between two lines (default 20).
# build.py writes the virtio modules, in dependency order, into /etc/snaptree/modules.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin

say() { echo "SNAPTREE-GUEST $*"; }
fail() { say "error=$*"; sync; poweroff -f; sleep 3600; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/virtio-ports /run /tmp
# The initramfs carries a /dev/console node so that the kernel could give us a console;
# reopen it from devtmpfs anyway, and keep stdin off the console.
exec </dev/null >/dev/console 2>&1
# Keep kernel messages off the console so that they never split one of our lines.
echo 1 >/proc/sys/kernel/printk

interval_ms=20
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        snaptree.interval_ms=*) interval_ms=${arg#*=} ;;
    esac
done
case "$interval_ms" in
    '' | *[!0-9]*) say "error=bad-interval_ms=$interval_ms"; interval_ms=20 ;;
esac

# --- virtio drivers (modules in this kernel; ext4, the 8250 UART and the RTC are built in)
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || say "error=insmod-$mod"
done </etc/snaptree/modules

# --- the data disk
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 50000; i=$((i + 1)); done
[ -b /dev/vda ] || fail "no-data-disk"
mkdir -p /data
mount -t ext4 /dev/vda /data || fail "mount-data"

boot_id=$(cat /proc/sys/kernel/random/boot_id)
say "boot_id=$boot_id kernel=$(uname -r)"

# --- network: QEMU user-mode networking (slirp), a web page showing the last line
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi
mkdir -p /www/cgi-bin
cat >/www/cgi-bin/index.cgi <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
tail -n 1 /data/log.txt
EOF
cat >/www/cgi-bin/debug <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "--- dmesg"; dmesg | tail -n 40
echo "--- qemu-ga log"; tail -n 40 /run/qemu-ga.log
echo "--- mounts"; cat /proc/mounts
EOF
chmod 755 /www/cgi-bin/index.cgi /www/cgi-bin/debug
ln -s index.cgi /www/cgi-bin/last
# No /www/index.html: busybox httpd answers "/" with /cgi-bin/index.cgi.
httpd -p 80 -h /www || say "error=httpd"

# --- QEMU guest agent, on the virtio-serial port named org.qemu.guest_agent.0
agent_port=
find_agent_port() {
    for p in /sys/class/virtio-ports/*; do
        [ -f "$p/name" ] || continue
        if [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ]; then
            agent_port=/dev/${p##*/}
            return 0
        fi
    done
    return 1
}
has_virtio_serial() {
    # virtio device id 3 is the console/serial device; its ports and their names arrive
    # asynchronously from the host, so wait for them only when the device is there.
    grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null
}
if has_virtio_serial; then
    i=0
    until find_agent_port || [ $i -ge 60 ]; do usleep 50000; i=$((i + 1)); done
fi
if [ -n "$agent_port" ]; then
    # No udev here: make the symlink udev would make.
    ln -sf "$agent_port" /dev/virtio-ports/org.qemu.guest_agent.0
    (
        while :; do
            qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
                -t /run -f /run/qemu-ga.pid >>/run/qemu-ga.log 2>&1
            echo "qemu-ga exited with $?" >>/run/qemu-ga.log
            sleep 1
        done
    ) &
    say "agent=started"
else
    say "agent=absent"
fi

# --- the workload
last=$(tail -n 1 /data/log.txt 2>/dev/null)
n=${last%% *}
case "$n" in
    '' | *[!0-9]*) n=0 ;;
esac
n=$((n + 1))
sleep_us=$((interval_ms * 1000))
say "workload=start n=$n interval_ms=$interval_ms"
while :; do
    read -r up _ </proc/uptime
    if ! echo "$n $up $boot_id" >>/data/log.txt; then
        say "error=write n=$n"
    elif ! sync /data/log.txt; then
        say "error=fsync n=$n"
    else
        echo "SNAPTREE-LINE $n"
    fi
    n=$((n + 1))
    [ "$sleep_us" -gt 0 ] && usleep "$sleep_us"
done
