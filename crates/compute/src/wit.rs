//! Conversions between this crate's types and the ones `realm:compute`'s bindings generate.
//! wasmtime's `bindgen!` (the native provider) and `wit-bindgen` (the guest, the WebAssembly
//! provider) name the types and variants alike, so one macro serves all three.

use crate::GgmlType;

/// The ggml types `realm:compute` has a `dtype` for, in the WIT enum's order.
pub const DTYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::BF16,
];

/// Defines, in the calling module, the conversions between `realm_compute`'s types and a
/// `realm:compute/types` binding module `wit` (`use …::realm::compute::types as wit;`
/// first): `from_wit_dtype`, `to_wit_dtype` (None: no dtype), `from_wit_rope`,
/// `to_wit_rope`, `from_wit_activation`, `to_wit_activation`, `from_wit_error`,
/// `to_wit_error`. Each side uses the ones it needs.
#[macro_export]
macro_rules! wit_conversions {
    ($wit:ident) => {
        $crate::wit_conversions!(@dtype $wit;
            F32 = F32, F16 = F16, Q40 = Q4_0, Q41 = Q4_1, Q50 = Q5_0, Q51 = Q5_1,
            Q80 = Q8_0, Q81 = Q8_1, Q2k = Q2_K, Q3k = Q3_K, Q4k = Q4_K, Q5k = Q5_K,
            Q6k = Q6_K, Q8k = Q8_K, Bf16 = BF16);
        $crate::wit_conversions!(@error $wit;
            InvalidArgument, NotFound, OutOfBounds, Unsupported, ResourceExhausted, Io);
        $crate::wit_conversions!(@enum from_wit_activation, to_wit_activation,
            $wit::Activation, $crate::Activation; Silu, GeluTanh);
        $crate::wit_conversions!(@enum from_wit_rope_mode, to_wit_rope_mode,
            $wit::RopeMode, $crate::RopeMode; Normal, Neox);
        $crate::wit_conversions!(@record from_wit_rope, to_wit_rope, $wit::RopeParams,
            $crate::RopeParams; head_dim, n_rot, freq_base, freq_scale, ext_factor,
            attn_factor, beta_fast, beta_slow, n_ctx_orig);
    };
    (@dtype $wit:ident; $($w:ident = $g:ident),*) => {
        #[allow(dead_code)]
        fn from_wit_dtype(d: $wit::Dtype) -> $crate::GgmlType {
            match d { $($wit::Dtype::$w => $crate::GgmlType::$g,)* }
        }
        #[allow(dead_code)]
        fn to_wit_dtype(t: $crate::GgmlType) -> Option<$wit::Dtype> {
            Some(match t { $($crate::GgmlType::$g => $wit::Dtype::$w,)* _ => return None })
        }
    };
    (@error $wit:ident; $($v:ident),*) => {
        #[allow(dead_code)]
        fn from_wit_error(e: $wit::Error) -> $crate::Error {
            match e { $($wit::Error::$v(m) => $crate::Error::$v(m),)* }
        }
        #[allow(dead_code)]
        fn to_wit_error(e: $crate::Error) -> $wit::Error {
            match e { $($crate::Error::$v(m) => $wit::Error::$v(m),)* }
        }
    };
    (@enum $from:ident, $to:ident, $w:path, $r:path; $($v:ident),*) => {
        #[allow(dead_code)]
        fn $from(a: $w) -> $r {
            use $w as W;
            use $r as R;
            match a { $(W::$v => R::$v,)* }
        }
        #[allow(dead_code)]
        fn $to(a: $r) -> $w {
            use $w as W;
            use $r as R;
            match a { $(R::$v => W::$v,)* }
        }
    };
    (@record $from:ident, $to:ident, $w:path, $r:path; $($f:ident),*) => {
        #[allow(dead_code)]
        fn $from(p: &$w) -> $r {
            $r { mode: from_wit_rope_mode(p.mode), $($f: p.$f,)* }
        }
        #[allow(dead_code)]
        fn $to(p: &$r) -> $w {
            $w { mode: to_wit_rope_mode(p.mode), $($f: p.$f,)* }
        }
    };
}

#[cfg(test)]
mod tests {
    /// Stand-ins for a binding's generated types, in the WIT's order.
    #[allow(dead_code)]
    mod wit {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Dtype {
            F32,
            F16,
            Q40,
            Q41,
            Q50,
            Q51,
            Q80,
            Q81,
            Q2k,
            Q3k,
            Q4k,
            Q5k,
            Q6k,
            Q8k,
            Bf16,
        }
        #[derive(Debug, PartialEq)]
        pub enum Error {
            InvalidArgument(String),
            NotFound(String),
            OutOfBounds(String),
            Unsupported(String),
            ResourceExhausted(String),
            Io(String),
        }
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub enum Activation {
            Silu,
            GeluTanh,
        }
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub enum RopeMode {
            Normal,
            Neox,
        }
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub struct RopeParams {
            pub head_dim: u32,
            pub n_rot: u32,
            pub mode: RopeMode,
            pub freq_base: f32,
            pub freq_scale: f32,
            pub ext_factor: f32,
            pub attn_factor: f32,
            pub beta_fast: f32,
            pub beta_slow: f32,
            pub n_ctx_orig: u32,
        }
    }

    crate::wit_conversions!(wit);

    #[test]
    fn dtypes_map_both_ways_in_the_wit_order() {
        for (i, &ty) in super::DTYPES.iter().enumerate() {
            let d = to_wit_dtype(ty).expect("a dtype");
            assert_eq!(d as usize, i, "{ty}");
            assert_eq!(from_wit_dtype(d), ty);
        }
        assert_eq!(to_wit_dtype(crate::GgmlType::IQ2_XXS), None);
    }

    #[test]
    fn records_and_errors_round_trip() {
        let p = crate::RopeParams {
            head_dim: 64,
            n_rot: 32,
            mode: crate::RopeMode::Neox,
            freq_base: 1e4,
            freq_scale: 0.25,
            ext_factor: 1.0,
            attn_factor: 1.1,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: 4096,
        };
        assert_eq!(from_wit_rope(&to_wit_rope(&p)), p);
        let e = crate::Error::OutOfBounds("row 9".into());
        assert_eq!(from_wit_error(to_wit_error(e.clone())), e);
        let a = crate::Activation::GeluTanh;
        assert_eq!(from_wit_activation(to_wit_activation(a)), a);
    }
}
