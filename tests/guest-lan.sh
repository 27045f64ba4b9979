#!/bin/sh
# Gives a stock-KVM machine (tests/tests/machines.rs) a guest LAN, then runs a command: a bridge
# `brg` takes the NIC that holds ADDR (the storage network) and its address, and a tap `tapg`
# for the guest's NIC joins it, as a hypervisor host bridges its guests onto a LAN.
# usage: guest-lan.sh ADDR/PREFIX COMMAND [ARG]...
set -eu
addr=$1
shift
dev=$(ip -o -4 addr show | awk -v a="$addr" '$4 == a { print $2; exit }')
[ -n "$dev" ] || { echo "guest-lan.sh: no NIC holds $addr" >&2; exit 2; }
ip link add brg type bridge
ip addr del "$addr" dev "$dev"
ip link set "$dev" master brg
ip addr add "$addr" dev brg
ip link set brg up
ip tuntap add dev tapg mode tap
ip link set tapg master brg
ip link set tapg up
exec "$@"
