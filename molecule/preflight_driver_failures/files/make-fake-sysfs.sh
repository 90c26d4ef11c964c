#!/bin/sh
# Builds a fake sysfs PCI tree for the preflight facts script: make-fake-sysfs.sh ROOT GOOD [DROPPED]
#   GOOD     Cambricon (0xcabc) physical functions that answer normally
#   DROPPED  Cambricon functions that fell off the bus: vendor 0xffff, config space all ones
# plus one non-MLU device and one Cambricon virtual function (physfn link), neither of which counts.
set -eu
root=$1 good=$2 dropped=${3:-0}
rm -rf "$root"
devices="$root/bus/pci/devices"
mkdir -p "$devices"
add() { # address vendor device class config-bytes(octal escapes)
  d="$devices/$1"; mkdir -p "$d"
  printf '%s\n' "$2" > "$d/vendor"; printf '%s\n' "$3" > "$d/device"; printf '%s\n' "$4" > "$d/class"
  printf '0\n' > "$d/numa_node"; printf "$5" > "$d/config"
}
add 0000:00:00.0 0x8086 0x0d57 0x060000 '\206\200\127\015'
i=0
while [ "$i" -lt "$good" ]; do
  add "$(printf '0000:%02x:00.0' $((16 + i)))" 0xcabc 0x0370 0x120000 '\274\312\160\003'; i=$((i + 1))
done
i=0
while [ "$i" -lt "$dropped" ]; do
  add "$(printf '0000:%02x:00.0' $((128 + i)))" 0xffff 0xffff 0xffffff '\377\377\377\377'; i=$((i + 1))
done
add 0000:ff:00.1 0xcabc 0x0371 0x120000 '\274\312\161\003'
ln -s ../0000:10:00.0 "$devices/0000:ff:00.1/physfn"
