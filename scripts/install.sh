#!/usr/bin/env bash
# Builds the C library in release mode and installs it under a prefix:
#   PREFIX/lib/libmapialloc.so.X.Y.Z (+ the .so.X.Y and .so links), PREFIX/lib/libmapialloc.a,
#   PREFIX/include/mapialloc.h, PREFIX/lib/pkgconfig/mapialloc.pc
#
# Usage: scripts/install.sh PREFIX
# Environment:
#   LIBDIR      where the libraries and pkgconfig/ go (default PREFIX/lib)
#   DESTDIR     staging root for packagers: files land in DESTDIR/PREFIX, the .pc names PREFIX
#   CARGO       the cargo to run (default cargo)
#
# The library is built without the strategy lab (--no-default-features): the C library
# needs only the engine. Linux (ELF shared objects) only. The soname follows cargo-c's
# convention: libmapialloc.so.MAJOR, or libmapialloc.so.0.MINOR while the version is 0.x.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
if [ "$(uname -s)" != Linux ]; then
    echo "install.sh: only Linux is supported (ELF soname and rpath handling)" >&2
    exit 2
fi
PREFIX=$1
LIBDIR=${LIBDIR:-$PREFIX/lib}
INCLUDEDIR=$PREFIX/include
DESTDIR=${DESTDIR:-}
CARGO=${CARGO:-cargo}
cd "$(dirname "$0")/.."

# The package version, from `cargo pkgid` (…#mapialloc@0.1.0 or …#0.1.0).
VERSION=$("$CARGO" pkgid)
VERSION=${VERSION##*[#@]}
IFS=. read -r MAJOR MINOR _PATCH <<<"$VERSION"
if [ "$MAJOR" = 0 ]; then SOVERSION=0.$MINOR; else SOVERSION=$MAJOR; fi
SONAME=libmapialloc.so.$SOVERSION

# A target directory of its own: the soname'd, lab-free build must not replace the in-tree
# target/release/libmapialloc.so that examples/c/Makefile links against.
TARGET_DIR=$("$CARGO" metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/install
OUT=$TARGET_DIR/release

echo "install.sh: building mapialloc $VERSION (release, soname $SONAME)"
BUILD=("$CARGO" rustc --target-dir "$TARGET_DIR" --release --lib --no-default-features)
"${BUILD[@]}" --crate-type cdylib -- -C "link-arg=-Wl,-soname,$SONAME"
# The static library, and the system libraries it needs (for the .pc's Libs.private).
# (Printed to stderr with printf, not `tee /dev/stderr`: tee would reopen, and truncate, a
# log file that stderr is redirected to.)
BUILD_LOG=$("${BUILD[@]}" --crate-type staticlib -- --print native-static-libs 2>&1)
printf '%s\n' "$BUILD_LOG" >&2
NATIVE=$(printf '%s\n' "$BUILD_LOG" | sed -n 's/.*native-static-libs: //p' | tail -n 1)
if [ -z "$NATIVE" ]; then
    # The build was fresh and cargo did not replay rustc's note: the Linux default.
    NATIVE="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
fi

echo "install.sh: installing into ${DESTDIR}${PREFIX}"
install -d "$DESTDIR$LIBDIR/pkgconfig" "$DESTDIR$INCLUDEDIR"
install -m 755 "$OUT/libmapialloc.so" "$DESTDIR$LIBDIR/libmapialloc.so.$VERSION"
ln -sf "libmapialloc.so.$VERSION" "$DESTDIR$LIBDIR/$SONAME"
ln -sf "$SONAME" "$DESTDIR$LIBDIR/libmapialloc.so"
install -m 644 "$OUT/libmapialloc.a" "$DESTDIR$LIBDIR/libmapialloc.a"
install -m 644 include/mapialloc.h "$DESTDIR$INCLUDEDIR/mapialloc.h"
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@LIBDIR@|$LIBDIR|g" -e "s|@INCLUDEDIR@|$INCLUDEDIR|g" \
    -e "s|@VERSION@|$VERSION|g" -e "s|@LIBS_PRIVATE@|$NATIVE|g" \
    mapialloc.pc.in >"$DESTDIR$LIBDIR/pkgconfig/mapialloc.pc"

echo "install.sh: done. Build against it with:"
echo "  PKG_CONFIG_PATH=$LIBDIR/pkgconfig pkg-config --cflags --libs mapialloc"
