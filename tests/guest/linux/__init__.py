"""A small real Linux test guest built from Debian packages only, plus offline checkers.

    build.py   build_linux_guest(cache_dir) -> LinuxGuest   (kernel + initramfs, cached)
    init.sh    the initramfs /init: mounts /dev/vda at /data and appends fsynced lines forever
    disk.py    make_data_disk(path, size_mib=64)             (qcow2 holding an empty ext4)
    check.py   check_layer(layer, workdir) -> LayerCheck     (offline crash-consistency check)
    agent.py   GuestAgent(socket_path)                       (synchronous QEMU guest agent client)

The guest needs nothing on the host but the Debian packages below (the guest's own
packages are fetched with `apt-get download`, never installed on the host).
"""

# Host Debian packages that building the guest and checking its disks need,
# for the project's setup script (`apt-get install ${HOST_PACKAGES[@]}`).
HOST_PACKAGES = (
    "apt",                  # apt-get download, apt-cache show (fetch the guest's .debs)
    "dpkg",                 # dpkg-deb -x, dpkg-query (unpack the .debs, host library versions)
    "libc-bin",             # ldd (the libraries qemu-ga needs)
    "libglib2.0-0",         # libglib-2.0.so.0, libgmodule-2.0.so.0: copied into the initramfs for qemu-ga
    "libnuma1",             # libnuma.so.1: copied for qemu-ga
    "libudev1",             # libudev.so.1: copied for qemu-ga
    "liburing2",            # liburing.so.2: copied for qemu-ga
    "libpcre2-8-0",         # libpcre2-8.so.0: copied for qemu-ga (needed by glib)
    "e2fsprogs",            # mkfs.ext4, dumpe2fs, e2fsck, debugfs (data disk and offline checks)
    "qemu-utils",           # qemu-img (convert, check)
    "qemu-system-x86",      # qemu-system-x86_64 (the tests boot the guest)
    "ovmf",                 # /usr/share/OVMF/OVMF_CODE.fd, OVMF_VARS.fd (the UEFI boot test)
)
