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

/// What a service's error means to its caller. Each service's `Error` says which one it is
/// ([`ServiceError::failure`]); the gRPC status is built from it here, once, and the gateway
/// turns that status into an HTTP problem with [`http_for`]: one mapping from error to status
/// to problem for every service.
pub enum Failure<'a> {
    /// The request's own values: `(field, message)`, named as the client sent them.
    Invalid(Vec<(&'a str, &'a str)>),
    /// The request as a whole (no one field to name).
    BadRequest(&'a str),
    NotFound(&'a str),
    /// The request conflicts with what is stored (ABORTED: 409).
    Conflict(&'a str),
    FailedPrecondition(&'a str),
    PermissionDenied(&'a str),
    Unauthenticated,
    /// A dependency (`what`: the database, the ERP...) did not answer; retrying is safe. The
    /// cause is logged, never sent.
    Unavailable {
        what: &'a str,
        cause: &'a dyn std::fmt::Display,
    },
    /// Ours. The cause is logged, never sent.
    Internal {
        cause: &'a dyn std::fmt::Display,
    },
}

/// A service error that knows what it means to the caller: `to_status` is the same for all.
pub trait ServiceError {
    fn failure(&self) -> Failure<'_>;

    /// The gRPC status (causes go to the log, never to the caller; messages are bounded).
    fn to_status(&self) -> tonic::Status {
        status_of(self.failure())
    }
}

/// The gRPC status of a [`Failure`].
pub fn status_of(failure: Failure<'_>) -> tonic::Status {
    use tonic::Status;
    use tonic_types::{ErrorDetails, StatusExt};
    match failure {
        Failure::Invalid(violations) => {
            let mut details = ErrorDetails::new();
            for (field, message) in violations.iter().take(100) {
                details.add_bad_request_violation(
                    bounded((*field).to_owned()),
                    bounded((*message).to_owned()),
                );
            }
            let message = violations
                .first()
                .map(|(field, message)| bounded(format!("{field}: {message}")))
                .unwrap_or_else(|| "invalid request".into());
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        Failure::BadRequest(m) => Status::invalid_argument(bounded(m.to_owned())),
        Failure::NotFound(what) => Status::not_found(bounded(format!("{what} not found"))),
        Failure::Conflict(m) => Status::aborted(bounded(m.to_owned())),
        Failure::FailedPrecondition(m) => Status::failed_precondition(bounded(m.to_owned())),
        Failure::PermissionDenied(m) => Status::permission_denied(bounded(m.to_owned())),
        Failure::Unauthenticated => Status::unauthenticated("the caller is not identified"),
        Failure::Unavailable { what, cause } => {
            tracing::error!(dependency = what, error = %format!("{cause:#}"), "dependency unavailable");
            Status::unavailable(format!("{what} unavailable, retry"))
        }
        Failure::Internal { cause } => {
            tracing::error!(error = %format!("{cause:#}"), "internal error");
            Status::internal("internal error")
        }
    }
}

/// How a field error names the JSON type a value has (`must be a string, not a number`), for
/// the gateway's REST input and erp-sync's ERP contract alike.
pub fn json_type(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
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
    fn each_failure_has_its_status_and_no_cause_leaks() {
        use tonic_types::StatusExt;
        let invalid = status_of(Failure::Invalid(vec![
            ("scans[0].quantity", "must be greater than zero"),
            ("scans[1].lot", "is required"),
        ]));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(
            invalid.message(),
            "scans[0].quantity: must be greater than zero"
        );
        let violations = invalid
            .get_error_details()
            .bad_request()
            .map(|b| b.field_violations.len());
        assert_eq!(violations, Some(2));
        let secret = "password=hunter2 at db:5432";
        for (failure, code) in [
            (
                Failure::BadRequest("no such adapter"),
                Code::InvalidArgument,
            ),
            (Failure::NotFound("lot X"), Code::NotFound),
            (Failure::Conflict("already voided"), Code::Aborted),
            (
                Failure::FailedPrecondition("held"),
                Code::FailedPrecondition,
            ),
            (
                Failure::PermissionDenied("not yours"),
                Code::PermissionDenied,
            ),
            (Failure::Unauthenticated, Code::Unauthenticated),
            (
                Failure::Unavailable {
                    what: "database",
                    cause: &secret,
                },
                Code::Unavailable,
            ),
            (Failure::Internal { cause: &secret }, Code::Internal),
        ] {
            let status = status_of(failure);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("hunter2"), "{status:?}");
        }
        assert_eq!(
            status_of(Failure::NotFound(&"x".repeat(5000)))
                .message()
                .len(),
            MAX_STATUS_MESSAGE
        );
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
