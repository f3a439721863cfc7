//! The one mapping from gRPC status codes to HTTP statuses and problem codes
//! (as grpc-gateway does), used by the gateway to render `application/problem+json`; and
//! what the services tell a caller whose own values PostgreSQL refused.

use tonic::Code;

/// Data exceptions that only a request's own values cause: a NUL character in text (22021),
/// a character the encoding cannot hold (22P05), a value too long (22001), a number or a date
/// out of range (22003, 22008). Other data exceptions, such as a text that does not convert
/// (22P02), mean our code sent something it should not have: they stay INTERNAL.
const BAD_INPUT: &[&str] = &["22021", "22P05", "22001", "22003", "22008"];

/// The message for a PostgreSQL error that the request's own values caused, never the server
/// ([`BAD_INPUT`]). The services answer it INVALID_ARGUMENT, not INTERNAL.
pub fn bad_input(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) if d.code().is_some_and(|c| BAD_INPUT.contains(&c.as_ref())) => {
            Some(bounded(format!("a value was refused: {}", d.message())))
        }
        _ => None,
    }
}

/// The longest status message a service sends. Messages that name the request's values (a
/// 40 KB lot number) must stay far below what clients accept in a header: hyper refuses a
/// header list over 16 KiB, which the caller would see as a protocol error.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `message`, cut to [`MAX_STATUS_MESSAGE`] bytes at a character boundary (marked with `…`).
pub fn bounded(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE {
        let mut end = MAX_STATUS_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// `(http status, problem code)` for a gRPC code.
pub fn http_for(code: Code) -> (u16, &'static str) {
    match code {
        Code::Ok => (200, "ok"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            (400, "validation_failed")
        }
        Code::Unauthenticated => (401, "unauthenticated"),
        Code::PermissionDenied => (403, "forbidden"),
        Code::NotFound => (404, "not_found"),
        Code::AlreadyExists | Code::Aborted => (409, "conflict"),
        Code::ResourceExhausted => (429, "rate_limited"),
        Code::Unavailable => (503, "unavailable"),
        Code::DeadlineExceeded => (504, "timeout"),
        Code::Unimplemented => (501, "not_implemented"),
        _ => (500, "internal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(bounded("lot X not found".into()), "lot X not found");
        let long = format!("lot {} not found", "é".repeat(5_000));
        let cut = bounded(long);
        assert!(cut.len() <= MAX_STATUS_MESSAGE, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with("lot éé"));
    }

    #[test]
    fn mapping_follows_grpc_gateway() {
        assert_eq!(http_for(Code::InvalidArgument), (400, "validation_failed"));
        assert_eq!(http_for(Code::FailedPrecondition).0, 400);
        assert_eq!(http_for(Code::Unauthenticated).0, 401);
        assert_eq!(http_for(Code::PermissionDenied).0, 403);
        assert_eq!(http_for(Code::NotFound).0, 404);
        assert_eq!(http_for(Code::AlreadyExists).0, 409);
        assert_eq!(http_for(Code::Aborted).0, 409);
        assert_eq!(http_for(Code::ResourceExhausted).0, 429);
        assert_eq!(http_for(Code::Unavailable).0, 503);
        assert_eq!(http_for(Code::DeadlineExceeded).0, 504);
        assert_eq!(http_for(Code::Internal).0, 500);
        assert_eq!(http_for(Code::Unknown).0, 500);
    }
}
