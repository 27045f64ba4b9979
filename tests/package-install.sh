#!/usr/bin/env bash
# The Debian package's install test (tests/tests/package.rs runs it, as root):
#   package-install.sh DEB GUEST
# In a private mount namespace, a copy-on-write root (an overlay of this machine's / with its
# changes on a tmpfs) gets the package with dpkg -i; systemd-analyze verifies its units; then,
# as systemd would start them (each unit's ExecStart line with %i filled in, its
# CapabilityBoundingSet and NoNewPrivileges through setpriv, stdin from /dev/null, in /, its
# RuntimeDirectory made), a standalone guest from /etc/ftvmm/NAME.toml stopped by the unit's
# KillSignal, and a pair (ftvmm@ and ftvmm-backup@, one configuration file each) stopped by
# `ftvmm ctl stop`. Then dpkg --purge, the test's own files removed, and the overlay's
# changes must hold nothing but dpkg's database and log. Nothing outside the namespace changes.
# Prints one `== step` line a step with its time; exits non-zero on the first failure.
set -euo pipefail

if [ "${1:-}" != --in-namespace ]; then
    [ $# -eq 2 ] || { echo "usage: $0 DEB GUEST" >&2; exit 2; }
    # Its mounts end with the namespace; the directory they were on is removed here.
    t=$(mktemp -d /tmp/ftvmm-package.XXXXXX)
    status=0
    unshare --mount --propagation private "$0" --in-namespace "$t" "$@" || status=$?
    rmdir "$t"
    exit "$status"
fi
t=$2
deb=$3
guest=$4
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
