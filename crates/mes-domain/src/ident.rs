//! Plant identifiers: work orders, lots, serials, stations, materials, locations, defect codes.
//!
//! One rule everywhere (REST, gRPC, master data from the ERP): 1 to 64 characters of ASCII
//! letters, digits and `. _ : / # + -`. It is the rule the REST contract always had (the
//! gateway's); scan-ingest used to take up to 128 of almost anything over gRPC, which let an
//! identifier in that no REST client could ever name (a space, a `%`, a 100-character lot).

/// The longest identifier.
pub const IDENT_MAX: usize = 64;

/// What an identifier must be, as a field error says it.
pub const IDENT_RULE: &str = "must be 1 to 64 characters of letters, digits and . _ : / # + -";

/// Whether `s` is a plant identifier.
pub fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= IDENT_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/#+".contains(&b))
}

/// `Ok` for an identifier, the rule otherwise.
pub fn check_ident(s: &str) -> Result<(), &'static str> {
    if is_ident(s) { Ok(()) } else { Err(IDENT_RULE) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_letters_digits_and_a_few_marks_up_to_64() {
        for ok in [
            "WO-1001",
            "STEEL-L1",
            "ST-10",
            "a.b_c:d/e#f+g",
            &"x".repeat(64),
        ] {
            assert!(is_ident(ok), "{ok}");
        }
        for bad in [
            "",
            " WO-1",
            "WO 1",
            "WO-1\n",
            "lot%",
            "é",
            "WO\0",
            &"x".repeat(65),
        ] {
            assert!(!is_ident(bad), "{bad:?}");
            assert_eq!(check_ident(bad), Err(IDENT_RULE));
        }
    }
}
