//! The C ABI: MAPI exports, the provider triple and stats for C (being built).
