#!/usr/bin/env bash
# The Debian package's install test (tests/tests/package.rs runs it, as root):
#   package-install.sh DEB GUEST
# In a private mount namespace, a copy-on-write root (an overlay of this machine's / with its
# changes on a tmpfs) gets the package with dpkg -i; systemd-analyze verifies its units; then,
# as systemd would start them (each unit's ExecStart line with %i filled in, its
# CapabilityBoundingSet and NoNewPrivileges through setpriv, stdin from /dev/null, in /, its
# RuntimeDirectory made), a standalone guest from /etc/ftvmm/NAME.toml stopped by the unit's
# KillSignal, and a pair (ftvmm@ and ftvmm-backup@, one configuration file each) stopped by
# `ftvmm ctl stop`. Then the same under systemd itself, PID 1 of a pid namespace in that root
# with nothing started but the units (systemctl start and stop; the pair's primary killed, its
# backup taking over, the primary's unit restarted and refused by the lock). Then dpkg --purge, the test's own files removed, and the overlay's
# changes must hold nothing but dpkg's database and log. Nothing outside the namespace changes.
# Prints one `== step` line a step with its time; exits non-zero on the first failure.
set -euo pipefail

if [ "${1:-}" != --in-namespace ]; then
    [ $# -eq 2 ] || { echo "usage: $0 DEB GUEST" >&2; exit 2; }
    # Its mounts end with the namespace; the directory they were on, and the cgroups of the
    # systemd it runs (with whatever a failure left running in them), are removed here.
    t=$(mktemp -d /tmp/ftvmm-package.XXXXXX)
    # The cgroup hierarchies systemd is given: cgroup2 alone, or (hybrid, as on the
    # development machines) name=systemd, cgroup2 and devices, the others hidden from it.
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        cgroups=/sys/fs/cgroup/ftvmm-package-$$
    else
        cgroups="/sys/fs/cgroup/systemd/ftvmm-package-$$ /sys/fs/cgroup/unified/ftvmm-package-$$"
        cgroups+=" /sys/fs/cgroup/devices/ftvmm-package-$$"
    fi
    status=0
    unshare --mount --propagation private "$0" --in-namespace "$t" "$cgroups" "$@" || status=$?
    for try in 1 2 3 4 5; do
        left=0
        for d in $cgroups; do
            [ -d "$d" ] || continue
            find "$d" -name cgroup.procs -exec cat {} + | xargs -r kill -9 2>/dev/null || true
            find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
            [ ! -d "$d" ] || left=1
        done
        ((left)) || break
        sleep 0.5
    done
    ((!left)) || { echo "$0: cgroups $cgroups could not be removed" >&2; status=1; }
    rmdir "$t"
    exit "$status"
fi
t=$2
cgroups=$3
deb=$4
guest=$5
t0=${EPOCHREALTIME/[.,]/}
step() { local now=${EPOCHREALTIME/[.,]/}; printf '== %4d.%02ds %s\n' $(((now - t0) / 1000000)) $(((now - t0) / 10000 % 100)) "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# The copy-on-write root.
mount -t tmpfs -o mode=0755 ftvmm-package "$t"
mkdir "$t/upper" "$t/work" "$t/root"
mount -t overlay ftvmm-package -o "lowerdir=/,upperdir=$t/upper,workdir=$t/work" "$t/root"
r=$t/root
for d in dev proc sys; do mount --rbind "/$d" "$r/$d"; done
mount -t tmpfs -o mode=0755 run "$r/run"
mount -t tmpfs -o mode=1777 tmp "$r/tmp"
cp "$deb" "$r/tmp/ftvmm.deb"
in_root() { chroot "$r" "$@"; }

step "dpkg -i $(basename "$deb")"
in_root dpkg -i /tmp/ftvmm.deb >"$t/dpkg-i.log" 2>&1 || { cat "$t/dpkg-i.log" >&2; fail "dpkg -i"; }
for f in /usr/bin/ftvmm /usr/bin/ftvmm-log /usr/lib/systemd/system/ftvmm@.service \
         /usr/lib/systemd/system/ftvmm-backup@.service /usr/lib/systemd/system/ftvmm-standby@.service \
         /usr/share/doc/ftvmm/examples/example.toml /usr/share/doc/ftvmm/OPERATIONS.md; do
    [ -e "$r$f" ] || fail "the package did not install $f"
done
in_root ftvmm --version

step "systemd-analyze verify"
for u in ftvmm@pkg.service ftvmm-backup@pkg.service ftvmm-standby@pkg.service; do
    out=$(in_root systemd-analyze verify "$u" 2>&1) || fail "systemd-analyze verify $u: $out"
    [ -z "$out" ] || fail "systemd-analyze verify $u: $out"
done
in_root systemd-analyze security --offline=yes ftvmm@pkg.service 2>/dev/null | tail -n 1 || true

# The test's own files: a guest, a key, the configurations.
mkdir -p "$r/var/lib/ftvmm/pkg" "$r/etc/ftvmm"
cp "$guest" "$r/var/lib/ftvmm/pkg/guest.elf"
head -c 32 /dev/urandom >"$r/etc/ftvmm/pkg.key"
chmod 600 "$r/etc/ftvmm/pkg.key"
machine='kernel = "/var/lib/ftvmm/pkg/guest.elf"
memory = "16M"
key-file = "/etc/ftvmm/pkg.key"
lock = "file:/var/lib/ftvmm/pkg/pair.lock"
log-level = "info"'
printf 'role = "standalone"\n%s\n' "$machine" >"$r/etc/ftvmm/alone.toml"
# One file per host of a pair, each naming the other side: the unit decides the role.
printf 'role = "primary"\nlisten = "127.0.0.1:17901"\nprimary = "127.0.0.1:17902"\n%s\n' \
    "$machine" >"$r/etc/ftvmm/pka.toml"
printf 'role = "primary"\nlisten = "127.0.0.1:17902"\nprimary = "127.0.0.1:17901"\n%s\n' \
    "$machine" >"$r/etc/ftvmm/pkb.toml"

# A unit's directive, its last value (systemd's rule for these).
directive() { sed -n "s/^$2=//p" "$r/usr/lib/systemd/system/$1" | tail -n 1; }
# Starts UNIT@INSTANCE as systemd would; its output goes to $t/INSTANCE.out (the journal).
start_unit() {
    local unit=$1 instance=$2 exec caps
    exec=$(directive "$unit" ExecStart | sed "s/%i/$instance/g")
    caps=$(directive "$unit" CapabilityBoundingSet | tr 'A-Z' 'a-z' | sed 's/cap_/+/g; s/ /,/g')
    [ "$(directive "$unit" NoNewPrivileges)" = yes ] || fail "$unit: NoNewPrivileges"
    [ "$(directive "$unit" RuntimeDirectory)" = ftvmm ] || fail "$unit: RuntimeDirectory"
    mkdir -p -m "$(directive "$unit" RuntimeDirectoryMode)" "$r/run/ftvmm"
    echo "   $unit -> $exec (bounding set ${caps})"
    # shellcheck disable=SC2086 # ExecStart's words, as systemd splits them (no quotes here)
    (cd "$r" && exec chroot "$r" setpriv --no-new-privs --bounding-set="-all,$caps" \
        sh -c "cd / && umask $(directive "$unit" UMask) && exec \"\$@\"" sh $exec \
        </dev/null >"$t/$instance.out" 2>&1) &
    pid=$!
}
# Waits up to $2 seconds for `$1` (a shell condition) to hold.
wait_for() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do eval "$1" && return 0; sleep 0.1; done
    return 1
}
# SuccessExitStatus and RestartPreventExitStatus of a unit, as words.
success_statuses() { echo " 0 $(directive "$1" SuccessExitStatus) "; }

step "ftvmm@alone: a standalone guest from /etc/ftvmm/alone.toml, stopped by KillSignal"
start_unit ftvmm@.service alone
wait_for "grep -qs 'tick 10' '$t/alone.out'" 60 || { cat "$t/alone.out" >&2; fail "the standalone guest did not run"; }
sig=$(directive ftvmm@.service KillSignal)
kill -s "${sig#SIG}" "$pid"
status=0; wait "$pid" || status=$?
grep -q "ftvmm: exits=" "$t/alone.out" || { cat "$t/alone.out" >&2; fail "no digest line"; }
[[ $(success_statuses ftvmm@.service) == *" $status "* ]] ||
    fail "ftvmm@ stopped by $sig exited $status, which is not in SuccessExitStatus"
echo "   stopped by $sig: exit $status (a success for the unit)"

step "ftvmm@pka (primary) and ftvmm-backup@pkb: a pair, then ftvmm ctl stop"
start_unit ftvmm@.service pka
ppid=$pid
wait_for "[ -S '$r/run/ftvmm/pka.sock' ]" 30 || { cat "$t/pka.out" >&2; fail "no API socket /run/ftvmm/pka.sock"; }
start_unit ftvmm-backup@.service pkb
bpid=$pid
wait_for "in_root ftvmm ctl --api-socket /run/ftvmm/pka.sock status 2>/dev/null | grep -q '\"protected\": *true'" 60 ||
    { cat "$t/pka.out" "$t/pkb.out" >&2; fail "the backup did not attach"; }
in_root ftvmm ctl --api-socket /run/ftvmm/pkb.sock status | grep -q '"role": *"backup"' ||
    fail "ftvmm-backup@pkb is not a backup: $(in_root ftvmm ctl --api-socket /run/ftvmm/pkb.sock status)"
echo "   protected: the backup unit's --role backup overrode the file's role, and took its primary"
in_root ftvmm ctl --api-socket /run/ftvmm/pka.sock stop >/dev/null
pst=0; wait "$ppid" || pst=$?
bst=0; wait "$bpid" || bst=$?
[ "$pst" = 0 ] && [ "$bst" = 0 ] || { cat "$t/pka.out" "$t/pkb.out" >&2; fail "ctl stop: primary exited $pst, backup $bst"; }
echo "   ctl stop: both exited 0"

step "systemd: PID 1 of a pid namespace in the same root, the units started with systemctl"
# Only what the test's target and the units pull in starts: every unit another target wants
# is masked (sysinit.target's would set this machine's sysctls or load its modules), the
# generators are hidden, the journal stays in /run, /etc/machine-id is a copy. systemd's
# cgroups are made under ftvmm-package-PID in the hierarchies it is given (with devices, so
# that DeviceAllow= is enforced), and removed at the end.
sd=$r/run/systemd/system
mkdir -p "$sd" "$r/run/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$r/run/systemd/journald.conf.d/ftvmm-package.conf"
printf '[Unit]\nDescription=ftvmm package test\nDefaultDependencies=no\nWants=systemd-journald.socket systemd-journald-dev-log.socket systemd-journald.service\n' \
    >"$sd/ftvmm-package.target"
for u in $(cd "$r" && ls -d etc/systemd/system/*.wants/* usr/lib/systemd/system/*.wants/* \
        etc/systemd/system/*.requires/* usr/lib/systemd/system/*.requires/* 2>/dev/null |
        xargs -n 1 basename | sort -u); do
    case $u in systemd-journald.service | systemd-journald.socket | systemd-journald-dev-log.socket) continue ;; esac
    ln -sf /dev/null "$sd/$u"
done
for u in local-fs.target swap.target remote-fs.target cryptsetup.target modprobe@.service \
    systemd-journald-audit.socket; do
    ln -sf /dev/null "$sd/$u"
done
for d in $cgroups; do mkdir "$d"; done
sdns=
trap '[ -z "$sdns" ] || kill -9 "$sdns" 2>/dev/null || true' EXIT
boot="set -e
for c in $r/sys/fs/cgroup/*; do
    case \${c##*/} in systemd|unified|devices) continue ;; esac
    if mountpoint -q \$c; then umount -l \$c; fi
done
for d in $cgroups; do echo \$\$ >\$d/cgroup.procs; done
mount -t proc proc $r/proc
mount -t tmpfs -o mode=0755 nogenerators $r/usr/lib/systemd/system-generators
cp $r/etc/machine-id $t/machine-id && mount --bind $t/machine-id $r/etc/machine-id
exec chroot $r env container=ftvmm-package /lib/systemd/systemd --system --unit=ftvmm-package.target"
unshare --pid --fork --mount --propagation private --kill-child sh -c "$boot" >"$t/systemd.log" 2>&1 &
sdns=$!
wait_for "[ -n \"\$(pgrep -P $sdns)\" ] && [ -S '$r/run/systemd/private' ]" 30 ||
    { cat "$t/systemd.log" >&2; fail "systemd did not start"; }
sdpid=$(pgrep -P "$sdns")
in_sd() { nsenter -t "$sdpid" -p -m -r -w "$@"; }
wait_for "in_sd systemctl is-system-running 2>/dev/null | grep -q -E 'running|degraded'" 30 ||
    fail "systemd is $(in_sd systemctl is-system-running 2>&1)"
unit_prop() { in_sd systemctl show -P "$2" "$1"; }
journal_has() { in_sd journalctl -q -o cat -u "$1" 2>/dev/null | grep -q -e "$2"; }

in_sd systemctl list-units --no-legend --plain --state=active | awk '{print $1}' | tr "\n" " " | sed "s/^/   running under this systemd: /"; echo
echo "   systemctl start ftvmm@alone; systemctl stop ftvmm@alone"
in_sd systemctl start ftvmm@alone
wait_for "journal_has ftvmm@alone 'tick 10'" 60 ||
    fail "ftvmm@alone: $(in_sd systemctl status --no-pager ftvmm@alone 2>&1)"
[ "$(unit_prop ftvmm@alone ActiveState)" = active ] || fail "ftvmm@alone is not active"
in_sd systemctl stop ftvmm@alone
# An inactive unit is unloaded, and its exit status with it: the journal keeps both.
ended_well() {
    journal_has "$1" "^$1.service: Deactivated successfully" && ! journal_has "$1" "Failed with result"
}
wait_for "ended_well ftvmm@alone" 10 && journal_has ftvmm@alone '^ftvmm: exits=' ||
    fail "ftvmm@alone after systemctl stop: $(in_sd journalctl -q -o cat -u ftvmm@alone | tail -5)"
echo "   stopped by SIGTERM (exit 130): deactivated successfully, not restarted"

echo "   a pair: ftvmm@pka and ftvmm-backup@pkb; the primary's ftvmm killed (SIGKILL)"
in_sd systemctl start ftvmm@pka
wait_for "[ -S '$r/run/ftvmm/pka.sock' ]" 30 || fail "ftvmm@pka: no API socket"
in_sd systemctl start ftvmm-backup@pkb
wait_for "in_root ftvmm ctl --api-socket /run/ftvmm/pka.sock status 2>/dev/null | grep -q '\"protected\": *true'" 60 ||
    fail "the backup did not attach: $(in_sd journalctl -q -o cat -u ftvmm@pka -u ftvmm-backup@pkb | tail -20)"
in_sd systemctl kill --kill-who=main --signal=KILL ftvmm@pka
wait_for "in_root ftvmm ctl --api-socket /run/ftvmm/pkb.sock status 2>/dev/null | grep -q '\"role\": *\"primary\"'" 30 ||
    fail "the backup did not take over: $(in_sd journalctl -q -o cat -u ftvmm-backup@pkb | tail -20)"
echo "   ftvmm-backup@pkb took over and runs the guest"
# systemd starts ftvmm@pka again 5 s later: the lock is the live side's, so it stops (exit 2).
wait_for "[ \"\$(unit_prop ftvmm@pka NRestarts)\" -ge 1 ] && journal_has ftvmm@pka 'is held by'" 30 ||
    fail "ftvmm@pka was not restarted, or ran: $(in_sd journalctl -q -o cat -u ftvmm@pka | tail -20)"
echo "   ftvmm@pka restarted by systemd, refused: $(in_sd journalctl -q -o cat -u ftvmm@pka | grep -m 1 'is held by')"
in_sd systemctl stop ftvmm@pka
in_root ftvmm ctl --api-socket /run/ftvmm/pkb.sock stop >/dev/null
wait_for "ended_well ftvmm-backup@pkb" 30 ||
    fail "ftvmm-backup@pkb after ctl stop: $(in_sd journalctl -q -o cat -u ftvmm-backup@pkb | tail -5)"
echo "   ftvmm ctl stop: ftvmm-backup@pkb deactivated successfully"
kill -9 "$sdns"
wait "$sdns" 2>/dev/null || true
sdns=

step "dpkg --purge ftvmm"
rm -rf "$r/etc/ftvmm" "$r/var/lib/ftvmm" "$r/tmp/ftvmm.deb"
in_root dpkg --purge ftvmm >"$t/dpkg-purge.log" 2>&1 || { cat "$t/dpkg-purge.log" >&2; fail "dpkg --purge"; }
if in_root dpkg-query -W ftvmm >/dev/null 2>&1; then fail "dpkg still knows ftvmm"; fi

step "what the package left behind"
# Every file the overlay holds beyond this machine's root, and every directory that is not
# also this machine's, but for dpkg's own database and log.
left=$(cd "$t/upper" && find . -mindepth 1 ! \( -type d -exec test -d "/{}" \; \) -print |
    sed 's|^\./|/|' | grep -v -E '^/var/lib/dpkg/|^/var/log/dpkg\.log$' || true)
[ -z "$left" ] || fail "left behind after purge:
$left"
echo "   nothing"
step "done"
