#!/bin/sh
# cla2 preflight probe: which OS this is and which Python Ansible would run modules with, in POSIX sh, so
# that it runs through ansible.builtin.raw before any fact gathering (a target whose Python is too old for
# ansible-core fails every module, the setup module included). Read-only.
#   CLA2_OS_RELEASE  os-release file to read (default /etc/os-release, else /usr/lib/os-release); a test hook
#   CLA2_PYTHONS     interpreters in the order Ansible tries them (names or paths), space separated
# Output: @@-headed sections (os-release, release-file, pythons, end), parsed by the role's preflight_probe filter.
echo "@@cla2-probe 1"
found=""
for f in ${CLA2_OS_RELEASE:-/etc/os-release /usr/lib/os-release}; do
    if [ -r "$f" ]; then
        echo "@@os-release $f"
        cat "$f"
        echo
        found=1
        break
    fi
done
if [ -z "$found" ]; then
    echo "@@os-release-missing ${CLA2_OS_RELEASE:-/etc/os-release}"
    for f in /etc/redhat-release /etc/lsb-release /etc/debian_version; do
        if [ -r "$f" ]; then
            echo "@@release-file $f"
            head -n 5 "$f"
        fi
    done
fi
echo "@@pythons"
for py in ${CLA2_PYTHONS:-python3}; do
    path=$(command -v "$py" 2>/dev/null) || continue
    case $path in
        /*) ;;
        *) continue ;;
    esac
    version=$("$path" -c 'import sys; sys.stdout.write("%d.%d.%d" % tuple(sys.version_info[:3]))' 2>/dev/null) || version=unknown
    [ -n "$version" ] || version=unknown
    echo "python $py $path $version"
done
echo "@@end"
