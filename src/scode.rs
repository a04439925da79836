//! SCODE values, as MAPI defines them.

/// A MAPI status code (`SCODE`, a signed 32-bit value). Errors have the top bit set.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scode(pub i32);

impl Scode {
    /// Success.
    pub const S_OK: Scode = Scode(0);
    /// The allocator could not get the memory (`0x8007000E`).
    pub const MAPI_E_NOT_ENOUGH_MEMORY: Scode = Scode(0x8007_000E_u32 as i32);
    /// A parameter was invalid: a NULL out pointer, or a parent that is not a live root (`0x80070057`).
    pub const MAPI_E_INVALID_PARAMETER: Scode = Scode(0x8007_0057_u32 as i32);

    /// True for `S_OK` and other success codes (top bit clear).
    pub const fn is_ok(self) -> bool {
        self.0 >= 0
    }
}

impl std::fmt::Debug for Scode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match *self {
            Scode::S_OK => "S_OK",
            Scode::MAPI_E_NOT_ENOUGH_MEMORY => "MAPI_E_NOT_ENOUGH_MEMORY",
            Scode::MAPI_E_INVALID_PARAMETER => "MAPI_E_INVALID_PARAMETER",
            _ => return write!(f, "Scode({:#010x})", self.0 as u32),
        };
        f.write_str(name)
    }
}

impl std::fmt::Display for Scode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for Scode {}
