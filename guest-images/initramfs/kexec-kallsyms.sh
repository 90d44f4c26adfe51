#!/bin/busybox sh
# /sbin/kexec on arm64 guests: the real kexec is /sbin/kexec.bin.
#
# kexec-tools (2.0.25, and master) builds the crash kernel's ELF core header
# from /proc/kallsyms: it needs `_text`. A kernel without CONFIG_KALLSYMS_ALL
# (Debian's 6.1 arm64 build) lists only symbols from _stext on, so kexec-tools
# computes the kernel-text PT_LOAD from _text = 0: a program header at a
# physical address far outside RAM, with a size that makes /proc/vmcore's size
# negative, and reading it takes a synchronous external abort in the crash
# kernel (dd is killed, no vmcore).
#
# On arm64 _text is the start of .head.text and _stext the next 64 KiB boundary
# (SEGMENT_ALIGN): when _text is missing, show kexec a kallsyms that has it.
# Nothing changes for a kernel that lists _text itself.
shadow=""
if ! grep -q ' _text$' /proc/kallsyms && s=$(sed -n 's/^\([0-9a-f]*\) [Tt] _stext$/\1/p' /proc/kallsyms) \
        && [ -n "$s" ]; then
    shadow=/tmp/.kallsyms-with-text
    { printf '%016x T _text\n' $((0x$s - 0x10000)); cat /proc/kallsyms; } > $shadow
    if mount --bind $shadow /proc/kallsyms; then
        echo "kdump-harness: /proc/kallsyms has no _text: kexec is shown _text = _stext - 64K" > /dev/console
    else
        rm -f $shadow
        shadow=""
    fi
fi
/sbin/kexec.bin "$@"
rc=$?
if [ -n "$shadow" ]; then
    umount /proc/kallsyms
    rm -f $shadow
fi
exit $rc
