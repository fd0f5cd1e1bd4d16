//! The ggml tensor types: ids, block sizes and bytes per block, as in ggml's `type_traits` table.

use std::fmt;

macro_rules! ggml_types {
    ($($name:ident = $id:literal, $block:literal, $bytes:literal, $supported:literal;)*) => {
        /// A ggml tensor element type. Ids are the on-disk `ggml_type` values.
        #[allow(non_camel_case_types, reason = "the names are ggml's, as they appear in GGUF tools")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum GgmlType { $($name = $id,)* }

        impl GgmlType {
            /// Every type known to this crate, in id order.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$name,)*];

            /// The type for an on-disk id, or `None` for ids ggml never assigned or removed.
            pub fn from_id(id: u32) -> Option<Self> {
                match id { $($id => Some(GgmlType::$name),)* _ => None }
            }

            /// Elements per block (1 for plain float and integer types).
            pub const fn block_size(self) -> u64 {
                match self { $(GgmlType::$name => $block,)* }
            }

            /// Bytes per block.
            pub const fn type_size(self) -> u64 {
                match self { $(GgmlType::$name => $bytes,)* }
            }

            /// Whether Realm has a dequantizer (and so, later, kernels) for the type.
            pub const fn is_supported(self) -> bool {
                match self { $(GgmlType::$name => $supported,)* }
            }

            /// The name ggml and gguf-py print, e.g. `Q4_K`.
            pub const fn name(self) -> &'static str {
                match self { $(GgmlType::$name => stringify!($name),)* }
            }
        }
    };
}

// Ids and sizes follow ggml/src/ggml.c `type_traits`; Q8_1 is ggml's 36-byte block
// (two f16 + 32 i8), not the stale 40 that gguf-py 0.19 lists.
ggml_types! {
    F32 = 0, 1, 4, true;
    F16 = 1, 1, 2, true;
    Q4_0 = 2, 32, 18, true;
    Q4_1 = 3, 32, 20, true;
    Q5_0 = 6, 32, 22, true;
    Q5_1 = 7, 32, 24, true;
    Q8_0 = 8, 32, 34, true;
    Q8_1 = 9, 32, 36, true;
    Q2_K = 10, 256, 84, true;
    Q3_K = 11, 256, 110, true;
    Q4_K = 12, 256, 144, true;
    Q5_K = 13, 256, 176, true;
    Q6_K = 14, 256, 210, true;
    Q8_K = 15, 256, 292, true;
    IQ2_XXS = 16, 256, 66, false;
    IQ2_XS = 17, 256, 74, false;
    IQ3_XXS = 18, 256, 98, false;
    IQ1_S = 19, 256, 50, false;
    IQ4_NL = 20, 32, 18, false;
    IQ3_S = 21, 256, 110, false;
    IQ2_S = 22, 256, 82, false;
    IQ4_XS = 23, 256, 136, false;
    I8 = 24, 1, 1, false;
    I16 = 25, 1, 2, false;
    I32 = 26, 1, 4, false;
    I64 = 27, 1, 8, false;
    F64 = 28, 1, 8, false;
    IQ1_M = 29, 256, 56, false;
    BF16 = 30, 1, 2, true;
    TQ1_0 = 34, 256, 54, false;
    TQ2_0 = 35, 256, 66, false;
    MXFP4 = 39, 32, 17, false;
}

impl GgmlType {
    /// Bytes taken by `n_elements` elements, or `None` when the count is not a whole number
    /// of blocks or the size overflows `u64`.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }

    /// Bytes of one row of `row_len` elements (`None` as for [`GgmlType::bytes_for`]).
    pub fn row_bytes(self, row_len: u64) -> Option<u64> {
        self.bytes_for(row_len)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_gaps_are_unknown() {
        for &ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty as u32), Some(ty));
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_id(removed), None, "id {removed}");
        }
    }

    #[test]
    fn row_bytes_checks_block_multiples() {
        assert_eq!(GgmlType::Q4_0.row_bytes(64), Some(36));
        assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(GgmlType::Q4_K.row_bytes(100), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
    }
}
