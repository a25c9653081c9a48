//! Fixed-width fields read from bytes that someone else wrote (a guest's frame or
//! descriptor, a kernel image, a dm-verity superblock). Every reader returns `None` when
//! the field does not fit: a length check that was missed must not read as a zero field.
//!
//! One module for the whole workspace, so that no parser grows its own zero-filling copy.

/// The `N` bytes at `at`, or `None` past the end.
#[must_use]
pub fn array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The byte at `at`.
#[must_use]
pub fn u8_at(bytes: &[u8], at: usize) -> Option<u8> {
    bytes.get(at).copied()
}

/// A little-endian `u16` at `at`.
#[must_use]
pub fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    array(bytes, at).map(u16::from_le_bytes)
}

/// A little-endian `u32` at `at`.
#[must_use]
pub fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    array(bytes, at).map(u32::from_le_bytes)
}

/// A little-endian `u64` at `at`.
#[must_use]
pub fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    array(bytes, at).map(u64::from_le_bytes)
}

/// A big-endian (network order) `u16` at `at`.
#[must_use]
pub fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    array(bytes, at).map(u16::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_inside_read_and_fields_past_the_end_are_none() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le_u16(&b, 0), Some(0x0201));
        assert_eq!(be_u16(&b, 0), Some(0x0102));
        assert_eq!(le_u32(&b, 1), Some(0x0504_0302));
        assert_eq!(le_u64(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(u8_at(&b, 8), Some(9));
        assert_eq!(array::<3>(&b, 6), Some([7, 8, 9]));
        // One byte short, and an offset that would overflow: never a zero field.
        assert_eq!(le_u16(&b, 8), None);
        assert_eq!(le_u64(&b, 2), None);
        assert_eq!(u8_at(&b, 9), None);
        assert_eq!(le_u32(&b, usize::MAX), None);
        assert_eq!(be_u16(&[], 0), None);
    }
}
