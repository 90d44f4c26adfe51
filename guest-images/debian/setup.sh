#!/bin/sh
# Runs in the image's chroot after debootstrap, with the kernel under test
# already copied to /boot and /lib/modules/RELEASE, and the harness user's
# public key in /tmp/kh/authorized_keys.   Usage: setup.sh RELEASE
set -eu
REL=$1
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

echo "setup: harness user"
useradd --create-home --shell /bin/bash --comment "kdump-harness" harness
install -d -m 0700 -o harness -g harness /home/harness/.ssh
install -m 0600 -o harness -g harness /tmp/kh/authorized_keys /home/harness/.ssh/authorized_keys
chmod 0440 /etc/sudoers.d/kdump-harness
passwd --lock root >/dev/null

echo "setup: services"
# kexec-tools must not turn the crash kernel's `reboot -f` into a kexec
if [ -f /etc/default/kexec ]; then
    sed -i 's/^LOAD_KEXEC=.*/LOAD_KEXEC=false/' /etc/default/kexec
fi
systemctl enable systemd-networkd.service ssh.service kdump-tools.service
# nothing periodic during a test run
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         getty@tty1.service; do
    systemctl mask "$u" >/dev/null 2>&1 || true
done
# wait for the management link only, not for every link (the e1000e stays down)
mkdir -p /etc/systemd/system/systemd-networkd-wait-online.service.d
cat > /etc/systemd/system/systemd-networkd-wait-online.service.d/kdump-harness.conf <<'UNIT'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
UNIT

# kdump-tools' own crash command line, plus: the crash kernel leaves the e1000e
# alone. QEMU 7.2's e1000e model aborts (e1000e_intrmgr_on_throttling_timer:
# assertion) when a crash kernel's driver probes the NIC the panicked kernel left
# running. The harness lifts this for --crash-load-driver.
echo 'KDUMP_CMDLINE_APPEND="reset_devices systemd.unit=kdump-tools-dump.service nr_cpus=1 irqpoll usbcore.nousb modprobe.blacklist=e1000e"' \
    >> /etc/default/kdump-tools

echo "setup: kernel $REL"
depmod "$REL"
# what installing a kernel package runs: initramfs-tools builds the first
# kernel's initrd, kdump-tools builds its crash initrd in /var/lib/kdump
run-parts --verbose --exit-on-error --arg="$REL" --arg="/boot/vmlinuz-$REL" /etc/kernel/postinst.d
kdump-config symlinks "$REL"
# kdump-config load rebuilds the crash initrd when its sysctl file looks new
cp /etc/kdump/sysctl.conf "/var/lib/kdump/latest_sysctls-$REL"
test -s "/boot/initrd.img-$REL"
test -s "/var/lib/kdump/initrd.img-$REL"

echo "setup: clean up"
apt-get clean
rm -rf /tmp/kh /var/lib/apt/lists/* /var/log/*.log
