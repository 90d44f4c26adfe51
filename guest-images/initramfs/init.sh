#!/bin/busybox sh
# /init of both kernels. The crash kernel is the one with /proc/vmcore.
. /lib/kh/lib.sh
setup_base
if [ -e /proc/vmcore ]; then log "crash kernel userspace"
elif grep -q "kh.role=second" /proc/cmdline; then log "second kernel userspace (after kexec)"
else log "first kernel userspace"; fi
load_boot_modules
find_port

first_kernel() {
    say boot role=first release=$(uname -r)
    sed 's/^/iomem /' /proc/iomem >&3
    for m in $KH_FIRST_LOAD; do load_mod "$m"; done
    start_dma
    pause_if first-boot

    # The crash kernel gets its image plus this run's settings appended as a
    # second cpio archive.
    mkdir -p /tmp/cc/etc/kh
    cp /etc/kh/run.env /tmp/cc/etc/kh/run.env
    (cd /tmp/cc && find . | cpio -o -H newc 2>/dev/null) > /tmp/crash-extra.cpio
    cat /boot/crash.cpio /tmp/crash-extra.cpio > /tmp/crash-initrd
    rm -f /tmp/crash-extra.cpio
    if [ "$KH_HANDOVER" = kexec ]; then
        kexec -l /boot/vmlinuz --initrd=/tmp/crash-initrd --append="$KH_CRASH_APPEND" > /tmp/kexec.out 2>&1
    else
        kexec -p /boot/vmlinuz --initrd=/tmp/crash-initrd --append="$KH_CRASH_APPEND" > /tmp/kexec.out 2>&1
    fi
    rc=$?
    cat /tmp/kexec.out > /dev/console
    if [ "$KH_HANDOVER" = kexec ]; then loaded=/sys/kernel/kexec_loaded; else loaded=/sys/kernel/kexec_crash_loaded; fi
    say armed rc=$rc loaded=$(cat $loaded 2>/dev/null)
    rm -f /tmp/crash-initrd
    echo 1 > /proc/sys/kernel/sysrq
    pause_if armed
    say ready
    if [ "$KH_HANDOVER" = kexec ]; then
        # a plain kexec reboot when the host says so; devices keep running into the next kernel
        read -t 3600 cmd <&3
        if [ "$cmd" = kexec ]; then
            say handover
            kexec -e
            say handover-failed rc=$?
        fi
    fi
}

crash_kernel() {
    if [ -e /proc/vmcore ]; then role=crash; else role=second; fi
    say boot role=$role release=$(uname -r)
    for m in $KH_CRASH_LOAD; do load_mod "$m"; done
    pause_if crash
    if [ "$KH_HOLD" = 1 ] && [ "$KH_PORT" != /dev/null ]; then
        # DMA is still arriving: the host fires its last transfers, then says go
        say crash-ready
        read -t 300 go <&3 || log "no go from the host after 300 s: dumping anyway"
    fi
    if [ "$role" = second ]; then
        say second-done   # nothing to dump: the host reads this kernel's memory from its side
        return
    fi
    disk=$(find_disk khdump) || { say error what=no-dump-disk; log "no dump disk"; poweroff -f; }
    size=$(stat -c %s /proc/vmcore)
    say capture-start format=$KH_DUMP_FORMAT vmcore_size=$size disk=$disk
    case "$KH_DUMP_FORMAT" in
        kdump)
            # makedumpfile's flattened format on stdout; -d 1 drops only zero pages,
            # so nothing a DMA could have written is filtered away.
            makedumpfile -F -l -d 1 /proc/vmcore > "$disk"
            rc=$? ;;
        *)
            dd if=/proc/vmcore of="$disk" bs=1M 2>/dev/null
            rc=$? ;;
    esac
    sync
    say captured rc=$rc format=$KH_DUMP_FORMAT bytes=$size
}

if [ -e /proc/vmcore ] || grep -q "kh.role=second" /proc/cmdline; then
    crash_kernel    # the crash kernel, or the kernel a plain kexec started
    poweroff -f
else
    first_kernel
    # Keep a shell on the console for people; the host panics the kernel when it likes.
    while true; do setsid cttyhack sh -l; done
fi
