//! Byte sizes as people write them: the one parser and the one printer of the workspace.
//!
//! Every size the workspace reads (command-line options, scenario files, fio `bssplit`
//! mixes, benchmark options) goes through [`parse_size`], and every size it prints through
//! [`format_size`] (or [`human`]).
//!
//! # Grammar
//! ```text
//! size   = [ "+" ] digits [ spaces ] [ suffix ]      (spaces around the whole are ignored)
//! suffix = "B" | unit | unit "B" | unit "iB"         (any case)
//! unit   = "K" | "M" | "G" | "T"                     (2^10, 2^20, 2^30, 2^40)
//! ```
//! So `512`, `4096B`, `64K`, `64k`, `64KiB`, `64 KB`, `1M`, `1MiB`, `2G`, `2T` and `2TiB`
//! are sizes. Every multiple is binary, `KB` included (as fio reads it). Fractions
//! (`1.5G`), negative numbers, unknown suffixes (`8X`, `1P`) and sizes over `u64::MAX` are
//! refused with a [`SizeError`] that quotes the input.
//!
//! # Printing
//! [`SizeStyle`] picks one of three forms: `Approx` (`1.5 GiB`) for amounts people read,
//! `Exact` (`1536 MiB`) for capacities, where rounding would hide a size, and `Short`
//! (`1536M`) for table columns and option values: [`parse_size`] reads every `Short` form
//! back to the same number.
//!
//! # Limitations
//! No decimal (SI) multiples: `KB` is 1024 bytes, as in fio and the scenario files before
//! this grammar. No unit above `T`: a size of a PiB or more is written in `T` or bytes.
//!
//! ```
//! use workloads::size::{format_size, human, parse_size, SizeStyle};
//!
//! assert_eq!(parse_size("64KiB")?, 65536);
//! assert_eq!(parse_size("2T")?, 2 << 40);
//! assert!(parse_size("1.5G").is_err());
//! assert_eq!(human(1536 << 20), "1.5 GiB");
//! assert_eq!(format_size(1536 << 20, SizeStyle::Exact), "1536 MiB");
//! assert_eq!(format_size(1536 << 20, SizeStyle::Short), "1536M");
//! # Ok::<(), workloads::size::SizeError>(())
//! ```

/// The binary units, largest first: suffix letter and shift.
const UNITS: [(char, u32); 4] = [('T', 40), ('G', 30), ('M', 20), ('K', 10)];

/// Why a string is not a size. Each message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// No digits where the number should be (an empty string, `lots`, `K`).
    #[error("invalid size {input:?}: expected a whole number with an optional K/M/G/T suffix")]
    NotANumber {
        /// The input.
        input: String,
    },
    /// A decimal point or comma (`1.5G`).
    #[error("invalid size {input:?}: no fractions; expected a whole number with an optional K/M/G/T suffix")]
    Fraction {
        /// The input.
        input: String,
    },
    /// A minus sign.
    #[error("invalid size {input:?}: a size cannot be negative")]
    Negative {
        /// The input.
        input: String,
    },
    /// Something after the number that is not a suffix of the grammar.
    #[error("invalid size {input:?}: unknown suffix {suffix:?} (use K, M, G or T)")]
    UnknownSuffix {
        /// The input.
        input: String,
        /// What follows the number.
        suffix: String,
    },
    /// More than `u64::MAX` bytes.
    #[error("invalid size {input:?}: too large (the largest is {} bytes)", u64::MAX)]
    TooLarge {
        /// The input.
        input: String,
    },
}

/// Parses a size of the module's grammar into bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let input = || s.to_owned();
    let t = s.trim();
    if t.starts_with('-') {
        return Err(SizeError::Negative { input: input() });
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, rest) = t.split_at(digits);
    if num.is_empty() {
        return Err(SizeError::NotANumber { input: input() });
    }
    if rest.starts_with(['.', ',']) && rest[1..].starts_with(|c: char| c.is_ascii_digit()) {
        return Err(SizeError::Fraction { input: input() });
    }
    let suffix = rest.trim_start();
    let shift = suffix_shift(suffix).ok_or_else(|| SizeError::UnknownSuffix {
        input: input(),
        suffix: suffix.to_owned(),
    })?;
    let too_large = || SizeError::TooLarge { input: input() };
    let n: u64 = num.parse().map_err(|_| too_large())?;
    n.checked_mul(1 << shift).ok_or_else(too_large)
}

/// The shift of a suffix (`""` and `B`: 0), if the grammar has it.
fn suffix_shift(suffix: &str) -> Option<u32> {
    let upper = suffix.to_ascii_uppercase();
    if upper.is_empty() || upper == "B" {
        return Some(0);
    }
    let mut chars = upper.chars();
    let letter = chars.next()?;
    let (_, shift) = UNITS.iter().find(|u| u.0 == letter)?;
    matches!(chars.as_str(), "" | "B" | "IB").then_some(*shift)
}

/// How [`format_size`] writes a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeStyle {
    /// `1.5 GiB`, `64.0 KiB`, `512 B`: the largest unit not above the size, one decimal.
    /// For amounts (bytes written, read, stored).
    Approx,
    /// `1536 MiB`, `2 TiB`, `100000256 bytes`: the largest unit that divides the size, so
    /// nothing is rounded. For capacities and granularities.
    Exact,
    /// `1536M`, `2T`, `4K`, `100`: the largest unit that divides the size, with its letter
    /// only. [`parse_size`] reads it back exactly. For table columns and option values.
    Short,
}

/// Writes `bytes` in `style` (see [`SizeStyle`]).
pub fn format_size(bytes: u64, style: SizeStyle) -> String {
    let dividing = UNITS
        .iter()
        .find(|&&(_, shift)| bytes >= 1 << shift && bytes.is_multiple_of(1 << shift));
    match style {
        SizeStyle::Approx => match UNITS.iter().find(|&&(_, shift)| bytes >= 1 << shift) {
            Some(&(letter, shift)) => format!("{:.1} {letter}iB", bytes as f64 / (1u64 << shift) as f64),
            None => format!("{bytes} B"),
        },
        SizeStyle::Exact => match dividing {
            Some(&(letter, shift)) => format!("{} {letter}iB", bytes >> shift),
            None => format!("{bytes} bytes"),
        },
        SizeStyle::Short => match dividing {
            Some(&(letter, shift)) => format!("{}{letter}", bytes >> shift),
            None => bytes.to_string(),
        },
    }
}

/// `bytes` for a person: [`SizeStyle::Approx`] (`1.5 GiB`).
pub fn human(bytes: u64) -> String {
    format_size(bytes, SizeStyle::Approx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Each string parses to its number.
    fn all_parse(cases: &[(&str, u64)]) {
        for &(s, want) in cases {
            assert_eq!(parse_size(s), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn every_form_of_the_grammar_parses() {
        all_parse(&[
            ("512", 512),
            ("0", 0),
            ("4096B", 4096),
            ("4096b", 4096),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("64kib", 64 << 10),
            ("64KB", 64 << 10),
            ("64 K", 64 << 10),
            (" 8M ", 8 << 20),
            ("1M", 1 << 20),
            ("1MiB", 1 << 20),
            ("2G", 2 << 30),
            ("2gb", 2 << 30),
            ("2T", 2 << 40),
            ("2t", 2 << 40),
            ("2TiB", 2 << 40),
            ("+5", 5),
            ("18446744073709551615", u64::MAX),
            ("16777215T", 16_777_215 << 40),
        ]);
    }

    /// The tests of the four parsers this one replaced (the command line's, the scenarios',
    /// the workload generator's and the benchmarks'), together. One thing changed on
    /// purpose: `4t` was no size to the generator and is one now, as everywhere else.
    #[test]
    fn the_tests_of_the_parsers_it_replaced_still_pass() {
        all_parse(&[
            ("512", 512),
            ("64K", 65536),
            ("2t", 2 << 40),
            ("4K", 4096),
            ("64g", 64 << 30),
            ("2T", 2 << 40),
            ("4k", 4096),
            ("64KiB", 65536),
            ("2M", 2 << 20),
            ("1g", 1 << 30),
            ("4t", 4 << 40),
            ("8M", 8 << 20),
        ]);
        for bad in ["1.5G", "12Q", "", "99999999999T", "2X", "T", "k"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size("12Q").unwrap_err().to_string().contains("suffix"));
    }

    #[test]
    fn what_is_not_a_size_gets_a_typed_error_quoting_it() {
        let e = |s: &str| parse_size(s).unwrap_err();
        assert!(matches!(e(""), SizeError::NotANumber { .. }));
        assert!(matches!(e("K"), SizeError::NotANumber { .. }));
        assert!(matches!(e("lots"), SizeError::NotANumber { .. }));
        assert!(matches!(e("1.5G"), SizeError::Fraction { .. }));
        assert!(matches!(e("1,5G"), SizeError::Fraction { .. }));
        assert!(matches!(e("-5"), SizeError::Negative { .. }));
        assert!(matches!(e("-5K"), SizeError::Negative { .. }));
        assert!(matches!(e("99999999999T"), SizeError::TooLarge { .. }));
        assert!(matches!(e("18446744073709551616"), SizeError::TooLarge { .. }));
        assert!(matches!(e("16777216T"), SizeError::TooLarge { .. }));
        for bad in ["8X", "1P", "1KK", "1Ki", "1iB", "1 K B", "0x10", "1e3", "4."] {
            assert!(
                matches!(e(bad), SizeError::UnknownSuffix { .. }),
                "{bad:?}: {:?}",
                e(bad)
            );
        }
        assert_eq!(
            e("8X").to_string(),
            "invalid size \"8X\": unknown suffix \"X\" (use K, M, G or T)"
        );
        assert_eq!(
            e("1.5G").to_string(),
            "invalid size \"1.5G\": no fractions; expected a whole number with an optional K/M/G/T suffix"
        );
        assert!(e("-5").to_string().contains("negative"));
        assert!(e("99999999999T").to_string().contains("too large"));
    }

    #[test]
    fn the_three_styles() {
        let f = format_size;
        assert_eq!(f(0, SizeStyle::Approx), "0 B");
        assert_eq!(f(1023, SizeStyle::Approx), "1023 B");
        assert_eq!(f(65536, SizeStyle::Approx), "64.0 KiB");
        assert_eq!(f(1536 << 20, SizeStyle::Approx), "1.5 GiB");
        assert_eq!(f(3 << 40, SizeStyle::Approx), "3.0 TiB");
        assert_eq!(f(0, SizeStyle::Exact), "0 bytes");
        assert_eq!(f(512, SizeStyle::Exact), "512 bytes");
        assert_eq!(f(64 << 30, SizeStyle::Exact), "64 GiB");
        assert_eq!(f(1536 << 20, SizeStyle::Exact), "1536 MiB");
        assert_eq!(f(100_000_256, SizeStyle::Exact), "100000256 bytes");
        assert_eq!(f(2 << 40, SizeStyle::Exact), "2 TiB");
        assert_eq!(f(4096, SizeStyle::Short), "4K");
        assert_eq!(f(64 << 30, SizeStyle::Short), "64G");
        assert_eq!(f(62 << 40, SizeStyle::Short), "62T");
        assert_eq!(f(1536 << 20, SizeStyle::Short), "1536M");
        assert_eq!(f((1 << 30) + 1, SizeStyle::Short), "1073741825");
        assert_eq!(f(100, SizeStyle::Short), "100");
        assert_eq!(f(1 << 50, SizeStyle::Short), "1024T");
        assert_eq!(human(1536), "1.5 KiB");
    }

    proptest! {
        #[test]
        fn short_and_exact_forms_read_back(bytes in prop_oneof![
            any::<u64>(),
            (0u64..1 << 24, 0u32..41).prop_map(|(n, s)| n << s),
        ]) {
            prop_assert_eq!(parse_size(&format_size(bytes, SizeStyle::Short)), Ok(bytes));
            let exact = format_size(bytes, SizeStyle::Exact);
            let exact = exact.strip_suffix(" bytes").unwrap_or(&exact);
            prop_assert_eq!(parse_size(exact), Ok(bytes));
        }

        #[test]
        fn a_number_with_a_suffix_is_that_many_units(n in 0u64..1 << 24, unit in 0usize..5, form in 0usize..4) {
            let (letter, shift) = [('B', 0), ('K', 10), ('M', 20), ('G', 30), ('T', 40)][unit];
            let suffix = match (form, letter) {
                (0, _) => String::new(),
                (_, 'B') => "b".to_owned(),
                (1, l) => l.to_string(),
                (2, l) => format!("{}b", l.to_ascii_lowercase()),
                (_, l) => format!("{l}iB"),
            };
            let want = if form == 0 { n } else { n << shift };
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")), Ok(want));
        }
    }
}
