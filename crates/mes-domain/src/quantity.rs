//! Quantities: positive decimals written as strings (`"12.5"`), never floats.
//!
//! One rule everywhere: digits with an optional fraction, greater than zero, at most 6
//! decimal places, below 10^12. It is scan-ingest's rule (the system of record's): the gateway
//! used to let up to 12 decimals and 18 integer digits through only for scan-ingest to refuse
//! them, and erp-sync had a copy of its own.

use rust_decimal::Decimal;

/// Decimal places a quantity may have.
pub const MAX_SCALE: u32 = 6;

/// What a quantity must look like, as a field error says it.
pub const QUANTITY_SHAPE: &str = "must be a decimal string such as \"12.5\"";

/// Parses a quantity: positive, at most [`MAX_SCALE`] decimals, below 10^12.
pub fn parse_quantity(s: &str) -> Result<Decimal, &'static str> {
    let shaped = !s.is_empty()
        && !s.starts_with('.')
        && !s.ends_with('.')
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && s.bytes().filter(|b| *b == b'.').count() <= 1;
    if !shaped {
        return Err(QUANTITY_SHAPE);
    }
    // Digits only, so a long string is a huge number or a long fraction: refuse it before
    // asking `Decimal` (28 digits at most).
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > MAX_SCALE as usize {
        return Err("must have at most 6 decimal places");
    }
    if int.trim_start_matches('0').len() > 12 {
        return Err("is too large");
    }
    let d: Decimal = s.parse().map_err(|_| QUANTITY_SHAPE)?;
    if d <= Decimal::ZERO {
        return Err("must be greater than zero");
    }
    if d >= Decimal::from(1_000_000_000_000i64) {
        return Err("is too large");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_quantity_rule() {
        for (s, want) in [
            ("12.5", "12.5"),
            ("1", "1"),
            ("0.000001", "0.000001"),
            ("007", "7"),
            ("999999999999.999999", "999999999999.999999"),
        ] {
            assert_eq!(parse_quantity(s).unwrap().to_string(), want, "{s}");
        }
        for (s, why) in [
            ("", QUANTITY_SHAPE),
            (" 1", QUANTITY_SHAPE),
            ("1 ", QUANTITY_SHAPE),
            ("-1", QUANTITY_SHAPE),
            ("+1", QUANTITY_SHAPE),
            ("1e3", QUANTITY_SHAPE),
            (".5", QUANTITY_SHAPE),
            ("1.", QUANTITY_SHAPE),
            ("1.2.3", QUANTITY_SHAPE),
            ("0", "must be greater than zero"),
            ("0.000000", "must be greater than zero"),
            ("0.0000001", "must have at most 6 decimal places"),
            ("1000000000000", "is too large"),
            ("99999999999999999999999999999999999", "is too large"),
        ] {
            assert_eq!(parse_quantity(s), Err(why), "{s:?}");
        }
    }
}
