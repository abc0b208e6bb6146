//! C enums that come in as `uint32_t`: one macro, [`c_enum!`], generates the check that turns a
//! number into the enum (with the same `InvalidArgument` message for every enum) and, when the
//! enum mirrors an SDK enum, the conversions in both directions.
//!
//! The enum itself stays written out in its module: cbindgen reads the source without expanding
//! macros, so an enum defined inside one would vanish from the header.

use crate::error::Failure;

/// A `#[repr(u32)]` enum of the header, passed from C as a plain `uint32_t` and checked.
pub(crate) trait CEnum: Copy + 'static {
    /// The C type name, for messages.
    const C_NAME: &'static str;
    /// Every variant, in declaration order.
    const ALL: &'static [Self];

    /// The number C uses for this variant.
    fn value(self) -> u32;

    /// The variant numbered `value`; `InvalidArgument` ("`what` is 7, which is not a
    /// zimage_x (0..=2)") for any other number.
    fn from_c(value: u32, what: &str) -> Result<Self, Failure> {
        if let Some(&variant) = Self::ALL.iter().find(|v| v.value() == value) {
            return Ok(variant);
        }
        let values = Self::ALL.iter().map(|v| v.value());
        let (low, high) = (values.clone().min().unwrap_or(0), values.max().unwrap_or(0));
        Err(Failure::invalid(format!("{what} is {value}, which is not a {} ({low}..={high})", Self::C_NAME)))
    }
}

/// Implements [`CEnum`] for a C enum, and with `<=> SdkEnum` also `From` in both directions.
///
/// ```ignore
/// c_enum!(zimage_device { Default, Cpu, Cuda, Tensorrt });
/// c_enum!(zimage_tf32 <=> Tf32 { LikePytorch <=> LikePyTorch, Off <=> Off, On <=> On });
/// ```
///
/// Every variant must be listed: the generated matches are exhaustive on both sides, so adding a
/// variant to the C enum or to the SDK enum without a counterpart does not compile.
macro_rules! c_enum {
    ($c:ident { $($variant:ident),+ $(,)? }) => {
        impl $crate::c_enum::CEnum for $c {
            const C_NAME: &'static str = stringify!($c);
            const ALL: &'static [Self] = &[$($c::$variant),+];

            fn value(self) -> u32 {
                // Exhaustive, so that a variant missing from ALL is a compile error.
                match self {
                    $($c::$variant => $c::$variant as u32),+
                }
            }
        }
    };
    ($c:ident <=> $sdk:ident { $($variant:ident <=> $sdk_variant:ident),+ $(,)? }) => {
        c_enum!($c { $($variant),+ });

        impl From<$c> for $sdk {
            fn from(value: $c) -> Self {
                match value {
                    $($c::$variant => $sdk::$sdk_variant),+
                }
            }
        }

        impl From<$sdk> for $c {
            fn from(value: $sdk) -> Self {
                match value {
                    $($sdk::$sdk_variant => $c::$variant),+
                }
            }
        }
    };
}
pub(crate) use c_enum;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::zimage_result;

    #[repr(u32)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum zimage_fruit {
        Apple = 0,
        Pear = 1,
        Plum = 2,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fruit {
        Apple,
        Pear,
        Prune,
    }

    c_enum!(zimage_fruit <=> Fruit { Apple <=> Apple, Pear <=> Pear, Plum <=> Prune });

    #[test]
    fn numbers_become_variants_or_a_message() {
        assert_eq!(zimage_fruit::ALL, [zimage_fruit::Apple, zimage_fruit::Pear, zimage_fruit::Plum]);
        assert_eq!(zimage_fruit::from_c(2, "p->fruit").unwrap(), zimage_fruit::Plum);
        let bad = zimage_fruit::from_c(3, "p->fruit").unwrap_err();
        assert_eq!(bad.code, zimage_result::InvalidArgument);
        assert_eq!(bad.message, "p->fruit is 3, which is not a zimage_fruit (0..=2)");
        assert_eq!(zimage_fruit::from_c(u32::MAX, "f").unwrap_err().code, zimage_result::InvalidArgument);
    }

    #[test]
    fn both_directions() {
        for (c, sdk) in
            [(zimage_fruit::Apple, Fruit::Apple), (zimage_fruit::Pear, Fruit::Pear), (zimage_fruit::Plum, Fruit::Prune)]
        {
            assert_eq!(Fruit::from(c), sdk);
            assert_eq!(zimage_fruit::from(sdk), c);
        }
    }
}
