# Shared by both kernels' /init (busybox ash). Sourced, not run.

KH_PORT=/dev/null

# The results port is opened once, as fd 3, and inherited by helpers: a
# virtio-serial port accepts a single opener at a time.
say() {  # one line on the results port: "event key=value ...", echoed for humans
    echo "kdump-harness: event $*" > /dev/console
    echo "$*" >&3
}

log() {  # for the human reading the console
    echo "kdump-harness: $*" > /dev/console
}

setup_base() {
    /bin/busybox mkdir -p /proc /sys /dev /tmp /run
    /bin/busybox mount -t proc proc /proc
    /bin/busybox mount -t sysfs sysfs /sys
    /bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
    /bin/busybox --install -s /bin
    export PATH=/bin:/sbin:/usr/bin:/usr/sbin
    [ -f /etc/kh/run.env ] && . /etc/kh/run.env
}

modparams() {  # "module.param=value" options of the kernel command line, as modprobe passes them
    for o in $(cat /proc/cmdline); do
        case "$o" in "$1".*=*) printf '%s ' "${o#"$1".}" ;; esac
    done
}

load_mod() {  # load a module and its dependencies, in the order the host resolved
    [ -f "/etc/kh/mod.$1" ] || { log "module $1 is not in this image"; return 1; }
    for f in $(cat "/etc/kh/mod.$1"); do
        name=$(basename "$f" .ko | tr - _)
        insmod "$f" $(modparams "$name") 2>/dev/null
    done
    return 0
}

load_boot_modules() {  # a modular IOMMU driver first: devices behind it wait for it to probe
    if [ -e /proc/vmcore ]; then iommu=$KH_CRASH_IOMMU_LOAD; else iommu=$KH_IOMMU_LOAD; fi
    for m in $iommu $(cat /etc/kh/boot-modules 2>/dev/null); do load_mod "$m"; done
}

find_port() {  # the virtio-serial port the host reads results from
    # 30 s: behind an IOMMU whose driver never loads, devices probe after the
    # kernel's deferred-probe timeout
    i=0
    while [ $i -lt 300 ]; do
        for p in /sys/class/virtio-ports/*; do
            [ -f "$p/name" ] || continue
            if [ "$(cat "$p/name")" = "org.kdump-harness.0" ]; then
                KH_PORT=/dev/${p##*/}
                exec 3<>"$KH_PORT"
                return 0
            fi
        done
        sleep 0.1
        i=$((i + 1))
    done
    log "results port not found: reporting on the console only"
    exec 3>/dev/null
    return 1
}

find_disk() {  # the virtio-blk disk whose serial is $1
    i=0
    while [ $i -lt 300 ]; do
        for b in /sys/block/*; do
            if [ -f "$b/serial" ] && [ "$(cat "$b/serial")" = "$1" ]; then
                echo "/dev/${b##*/}"
                return 0
            fi
        done
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

pause_if() {  # --interactive PHASE: a shell on the console until the person exits it
    if [ "$KH_PAUSE" = "$1" ]; then
        say paused phase=$1
        log "paused at $1: exit the shell to continue"
        setsid cttyhack sh -l
        say resumed phase=$1
    fi
}

crash_range() {  # "START END" of the crashkernel= reservation, as 0x... numbers
    r=$(sed -n 's/^ *\([0-9a-f]*\)-\([0-9a-f]*\) : Crash kernel$/0x\1 0x\2/p' /proc/iomem)
    echo "${r:-0 0}"
}

setup_nic() {  # the e1000e: largest receive ring, link up, no address (frames are dropped by the stack)
    dev=""
    for n in /sys/class/net/*; do
        [ "$(cat "$n/address" 2>/dev/null)" = "$KH_NIC_MAC" ] && dev=${n##*/}
    done
    if [ -z "$dev" ]; then
        say nic-ready rc=1 what=no-interface-with-mac-$KH_NIC_MAC
        return 1
    fi
    ethtool -G "$dev" rx 4096 > /dev/console 2>&1
    ip link set "$dev" up
    rc=$?
    rx=$(ethtool -g "$dev" 2>/dev/null | awk '/^Current/ {c = 1} c && /^RX:/ {print $2; exit}')
    say nic-ready rc=$rc dev=$dev rx=${rx:-unknown}
}

start_dma() {  # the first kernel's side of the scenario's DMA source, plus canary pages
    set -- $(crash_range)
    case "$KH_DMA" in
        edu)
            if [ "$KH_HANDOVER" = kexec ]; then
                # no driver, so the kexec shutdown leaves it running; aimed at the next kernel's image
                khdma edu-raw "$KH_EDU_BDF" "$KH_NONCE" 0x1000000 "$KH_CANARIES" >&3 2>/dev/console &
            else
                khdma edu "$KH_EDU_BDF" "$KH_NONCE" "$1" "$2" "$KH_CANARIES" >&3 2>/dev/console &
            fi
            ;;
        nic)
            setup_nic
            khdma canary "$KH_NONCE" "$KH_CANARIES" >&3 2>/dev/console &
            ;;
        *)
            [ "${KH_CANARIES:-0}" -gt 0 ] && khdma canary "$KH_NONCE" "$KH_CANARIES" >&3 2>/dev/console &
            ;;
    esac
}
