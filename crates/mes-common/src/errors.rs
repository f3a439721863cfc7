//! The one mapping from gRPC status codes to HTTP statuses and problem codes
//! (as grpc-gateway does), used by the gateway to render `application/problem+json`.

use tonic::Code;

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
