#!/usr/bin/env bash
# Installs the C library into a temporary prefix with scripts/install.sh, then builds and
# runs examples/c against the installed copy through pkg-config: shared, then static.
#
# Usage: .ci/c-install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
scripts/install.sh "$prefix"
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
pkg-config --exists mapialloc
echo "c-install: pkg-config mapialloc $(pkg-config --modversion mapialloc):" \
    "$(pkg-config --cflags --libs mapialloc)"

build=$(mktemp -d)
trap 'rm -rf "$prefix" "$build"; make -s -C examples/c clean' EXIT
# Shared, through the example's Makefile (it finds mapialloc with pkg-config).
make -s -C examples/c clean
make -C examples/c provider
examples/c/provider
case "$(ldd examples/c/provider)" in
*"$prefix/lib/libmapialloc.so"*) ;;
*) echo "c-install: the example is not linked to the installed library" >&2; exit 1 ;;
esac

# Static: the archive and Libs.private.
cc -std=c99 -Wall -Wextra -Werror -pedantic $(pkg-config --cflags mapialloc) \
    examples/c/provider.c -o "$build/provider-static" \
    "$(pkg-config --variable=libdir mapialloc)/libmapialloc.a" \
    $(pkg-config --static --libs-only-l mapialloc | sed 's/-lmapialloc//') -pthread
"$build/provider-static"
case "$(ldd "$build/provider-static")" in
*libmapialloc*) echo "c-install: the static example loads libmapialloc.so" >&2; exit 1 ;;
esac
echo "c-install: ok"
