package bpf

// The include paths are where Debian keeps asm/types.h for each host; clang
// ignores the one that does not exist. bpfel covers amd64 and arm64.
//go:generate go tool bpf2go -tags linux -target bpfel redirect redirect.c -- -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
//go:generate go tool bpf2go -tags linux -target bpfel keep keep.c -- -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
