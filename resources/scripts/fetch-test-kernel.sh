#!/usr/bin/env bash
# Fetches the current Debian amd64 kernel for Mosaic's Linux boot tests.
#
# Leaves, in $MOSAIC_TEST_KERNEL_DIR (default: <workspace>/target/test-kernel):
#   vmlinuz   -> boot/vmlinuz-<version>   the bzImage, as Debian ships it
#   vmlinux                               the ELF kernel decompressed from that bzImage
#   boot/                                 config-*, System.map-* and the bzImage
#   PACKAGE                               name and version of the package used
#
# Run as root (it may need `apt-get update` and `apt-get install` of a decompressor).
# Idempotent: does nothing when the directory already holds a kernel from the
# package version apt offers now. Only the package's boot/ directory is unpacked
# (the modules are ~400 MB and not needed).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${MOSAIC_TEST_KERNEL_DIR:-$root/target/test-kernel}"

log() { echo "fetch-test-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The versioned image package that linux-image-amd64 currently depends on.
image_package() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

pkg="$(image_package || true)"
if [ -z "$pkg" ]; then
    log "apt lists do not know linux-image-amd64; running apt-get update"
    apt-get update -qq
    pkg="$(image_package || true)"
fi
[ -n "$pkg" ] || die "cannot find the package linux-image-amd64 depends on"

# Prefer the -unsigned flavour: same kernel, without the signature wrapper.
if apt-cache show "$pkg-unsigned" >/dev/null 2>&1; then
    pkg="$pkg-unsigned"
fi
version="$(apt-cache show --no-all-versions "$pkg" | awk '/^Version:/ { print $2; exit }')"
[ -n "$version" ] || die "apt-cache has no version for $pkg"
want="$pkg $version"

if [ -f "$out/PACKAGE" ] && [ "$(cat "$out/PACKAGE")" = "$want" ] \
    && [ -s "$out/vmlinuz" ] && [ -s "$out/vmlinux" ]; then
    log "up to date: $want in $out"
    exit 0
fi

# Installs Debian package $2 when command $1 is missing.
need_tool() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 for $1"
    apt-get install -y -qq "$2" >/dev/null
    command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}
need_tool dpkg-deb dpkg
need_tool od coreutils

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# apt-get download fetches as the _apt user, which must be able to write here.
if id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi

log "downloading $want"
(cd "$tmp" && apt-get download -qq "$pkg=$version") || die "apt-get download $pkg failed"
deb="$(ls "$tmp"/*.deb)"
log "downloaded $(basename "$deb") ($(stat -c %s "$deb") bytes)"

mkdir -p "$tmp/root"
# dpkg-deb -x would unpack the modules too; unpack the same data archive's boot/ only.
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/root" --wildcards './boot/*'
image="$(ls "$tmp"/root/boot/vmlinuz-* 2>/dev/null | head -n 1)"
[ -n "$image" ] || die "$pkg has no boot/vmlinuz-*"

# --- ELF vmlinux from the bzImage -------------------------------------------------
# Little-endian unsigned integer of $2 bytes at offset $3 of file $1.
le() { od -An -t "u$2" -j "$3" -N "$2" --endian=little "$1" | tr -d ' '; }

magic_of() { # file offset -> name of the compression whose magic starts there
    local hex
    hex="$(od -An -t x1 -j "$2" -N 6 "$1" | tr -d ' \n')"
    case "$hex" in
        fd377a585a00*) echo xz ;;
        28b52ffd*) echo zstd ;;
        1f8b08*) echo gzip ;;
        02214c18*) echo lz4 ;;
        425a68*) echo bzip2 ;;
        5d0000*) echo lzma ;;
        *) echo unknown ;;
    esac
}

decompress() { # kind < payload > vmlinux
    case "$1" in
        xz) need_tool xz xz-utils; xz -dc --single-stream ;;
        lzma) need_tool xz xz-utils; xz -dc --format=lzma ;;
        zstd) need_tool zstd zstd; zstd -dcq ;;
        gzip) need_tool gzip gzip; gzip -dc ;;
        lz4) need_tool lz4 lz4; lz4 -dc ;;
        bzip2) need_tool bzip2 bzip2; bzip2 -dc ;;
        *) return 1 ;;
    esac
}

is_elf() { [ "$(od -An -t x1 -N 4 "$1" | tr -d ' \n')" = "7f454c46" ]; }

extract_vmlinux() { # bzImage -> $tmp/vmlinux
    local img="$1" sects setup poff plen start kind len
    [ "$(od -An -c -j 514 -N 4 "$img" | tr -d ' \n')" = "HdrS" ] || return 1
    sects="$(le "$img" 1 497)"
    [ "$sects" -eq 0 ] && sects=4
    setup=$(( (sects + 1) * 512 ))
    # Boot protocol 2.08+: payload_offset/payload_length (relative to the protected-mode code).
    poff="$(le "$img" 4 584)"
    plen="$(le "$img" 4 588)"
    if [ "$plen" -gt 0 ]; then
        start=$((setup + poff))
        kind="$(magic_of "$img" "$start")"
        # The kernel build appends the uncompressed size (4 bytes) to every format but gzip.
        len=$plen
        [ "$kind" != gzip ] && len=$((plen - 4))
        log "payload: $kind, $plen bytes at $start"
        if dd if="$img" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$len" status=none \
            | decompress "$kind" >"$tmp/vmlinux" 2>"$tmp/err" \
            && is_elf "$tmp/vmlinux"; then
            return 0
        fi
        log "decompressing the header's payload failed: $(head -c 300 "$tmp/err")"
    fi
    # Older images: search for each format's magic and take the first that yields an ELF.
    local pat off
    for pat in 'xz:\xfd\x37\x7a\x58\x5a\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08' \
               'lz4:\x02\x21\x4c\x18' 'bzip2:BZh' 'lzma:\x5d\x00\x00'; do
        kind="${pat%%:*}"
        for off in $(LC_ALL=C grep -obUaP "${pat#*:}" "$img" | cut -d: -f1 | head -n 20); do
            if tail -c +$((off + 1)) "$img" | decompress "$kind" >"$tmp/vmlinux" 2>/dev/null; is_elf "$tmp/vmlinux"; then
                log "payload found by magic: $kind at $off"
                return 0
            fi
        done
    done
    return 1
}

extract_vmlinux "$image" || die "cannot extract an ELF vmlinux from $(basename "$image")"

mkdir -p "$out"
rm -rf "$out/boot" "$out/vmlinuz" "$out/vmlinux" "$out/PACKAGE"
mv "$tmp/root/boot" "$out/boot"
ln -s "boot/$(basename "$image")" "$out/vmlinuz"
mv "$tmp/vmlinux" "$out/vmlinux"
echo "$want" >"$out/PACKAGE"
log "done: $out/vmlinuz ($(stat -L -c %s "$out/vmlinuz") bytes), $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
