//! `application/problem+json` (RFC 9457) errors carrying the trace id, and the mapping of gRPC
//! statuses to them. An internal error's text never reaches the client: it is logged with the
//! trace id instead.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// One invalid field of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// Path of the field, e.g. `scans[3].quantity`.
    #[schema(example = "scans[0].quantity")]
    pub field: String,
    #[schema(example = "must be greater than zero")]
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The body of every 4xx/5xx response.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"type": "/problems/validation-failed", "title": "Invalid request", "status": 400,
    "code": "validation_failed", "detail": "quantity must be greater than zero",
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "errors": [{"field": "scans[0].quantity", "message": "must be greater than zero"}]}))]
pub struct ProblemBody {
    /// `/problems/<code with dashes>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// `validation_failed`, `malformed_json`, `unauthenticated`, `forbidden`, `not_found`,
    /// `conflict`, `payload_too_large`, `rate_limited`, `unavailable`, `timeout`,
    /// `not_implemented`, `method_not_allowed`, `internal`.
    pub code: String,
    pub detail: String,
    /// Trace id of the request (32 lowercase hex): hand it to support.
    pub trace_id: String,
    /// The invalid fields, for `validation_failed` and `malformed_json`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// An error response.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{} {}", one.field, one.message),
            _ => format!("{} fields are invalid", errors.len()),
        };
        Self {
            errors,
            ..Self::new(StatusCode::BAD_REQUEST, "validation_failed", detail)
        }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }

    pub fn malformed_json(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", detail)
    }

    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests, retry later",
            )
        }
    }

    pub fn unavailable(detail: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
        }
    }

    pub fn timeout(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the request did not complete in time; retrying is safe",
            )
        }
    }

    /// A 500 whose cause is logged (with the trace id) but never shown.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; quote the trace id to support",
        )
    }

    pub fn title(&self) -> &'static str {
        title_of(self.code)
    }

    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            kind: format!("/problems/{}", self.code.replace('_', "-")),
            title: self.title().to_owned(),
            status: self.status.as_u16(),
            code: self.code.to_owned(),
            detail: self.detail.clone(),
            trace_id: crate::trace::trace_id(),
            errors: self.errors.clone(),
        }
    }
}

pub fn title_of(code: &str) -> &'static str {
    match code {
        "validation_failed" => "Invalid request",
        "malformed_json" => "Malformed JSON",
        "unauthenticated" => "Unauthenticated",
        "forbidden" => "Forbidden",
        "not_found" => "Not found",
        "conflict" => "Conflict",
        "payload_too_large" => "Payload too large",
        "rate_limited" => "Too many requests",
        "unavailable" => "Service unavailable",
        "timeout" => "Timeout",
        "not_implemented" => "Not implemented",
        "method_not_allowed" => "Method not allowed",
        _ => "Internal error",
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut res = (self.status, body).into_response();
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mes\""),
            );
        }
        res
    }
}

/// Messages of the `google.rpc` error model, decoded by hand (only what the gateway reads).
mod rpc {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<prost_types::Any>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BadRequest {
        #[prost(message, repeated, tag = "1")]
        pub field_violations: Vec<FieldViolation>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FieldViolation {
        #[prost(string, tag = "1")]
        pub field: String,
        #[prost(string, tag = "2")]
        pub description: String,
    }

    pub const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";
}

/// Field violations (`google.rpc.BadRequest`) carried in a status' details.
pub fn field_violations(status: &tonic::Status) -> Vec<FieldError> {
    use prost::Message as _;
    let details = status.details();
    if details.is_empty() {
        return Vec::new();
    }
    let Ok(decoded) = rpc::Status::decode(details) else {
        return Vec::new();
    };
    decoded
        .details
        .iter()
        .filter(|any| any.type_url == rpc::BAD_REQUEST_TYPE)
        .filter_map(|any| rpc::BadRequest::decode(any.value.as_slice()).ok())
        .flat_map(|br| br.field_violations)
        .map(|v| FieldError::new(v.field, v.description))
        .collect()
}

/// Why a non-OK status did not come from the service's own handler: the call failed between
/// the gateway and the service, so the service may or may not have applied it.
fn transport_failure(status: &tonic::Status) -> bool {
    // Statuses tonic builds on the client side from a transport error carry that error as
    // their source; a status answered by a service (decoded from its trailers) has none.
    if std::error::Error::source(status).is_some() {
        return true;
    }
    // Statuses tonic's client builds without a source: a stream reset (h2), a body that ended
    // early, a response that ended without a grpc-status.
    let message = status.message();
    [
        "h2 protocol error",
        "transport error",
        "Unexpected EOF",
        // Answers tonic could not read (not a service's handler speaking).
        "protocol error",
        "grpc-status header missing",
        "Missing response message",
        "failed to decode Protobuf message",
        "Error decompressing",
    ]
    .iter()
    .any(|m| message.starts_with(m))
}

/// Whether a call failed because its connection did (closed by an instance shutting down,
/// reset, refused), not because the service answered it or the call timed out: a new
/// connection may well serve it. The service may or may not have applied it.
pub(crate) fn connection_failed(status: &tonic::Status) -> bool {
    let from_transport = status.metadata().is_empty();
    match status.code() {
        tonic::Code::Unavailable => from_transport && std::error::Error::source(status).is_some(),
        tonic::Code::Cancelled => from_transport && !timed_out(status),
        tonic::Code::Internal => transport_failure(status),
        _ => false,
    }
}

/// Whether the client's per-call timeout (a `Cancelled` status built from tonic's
/// `TimeoutExpired`) ended the call.
fn timed_out(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    status.message() == tonic::TimeoutExpired(()).to_string()
}

/// A signature failure of the gateway's own internal calls, answered by a service.
fn caller_signature_refused(status: &tonic::Status) -> bool {
    let message = status.message();
    message.contains("caller signature")
        || message.contains("MES_INTERNAL_KEY")
        || message.contains("caller is not identified")
}

fn outcome_unknown(service: &str, status: &tonic::Status, retry_after: u64) -> Problem {
    tracing::warn!(service, grpc_code = ?status.code(), error = %status.message(),
        "call to the service failed in transport; its outcome is unknown");
    metrics::counter!("gateway_backend_transport_failures_total", "service" => service.to_owned())
        .increment(1);
    Problem::unavailable(
        format!("{service} is unavailable; retrying is safe"),
        retry_after,
    )
}

/// Converts a service's gRPC status into a problem. `service` names the back end in messages.
///
/// - A call whose outcome is unknown (the connection or the stream failed: `Unknown`,
///   `Internal` or `Cancelled` built by the transport) is 503 `unavailable` with `Retry-After`:
///   every write is idempotent (scan ids, void ids), so retrying is safe. Only an `Internal`
///   answered by the service's own handler is 500.
/// - The gateway authenticates users itself: `Unauthenticated` from a service (or
///   `PermissionDenied` over the caller signature) is a failure of the internal trust between
///   the gateway and the service (a missing or rotated internal key, clock skew), not the
///   tablet's fault: 503 `unavailable`, logged at error level. A service's own role check
///   (`PermissionDenied`) stays 403.
pub fn from_status(service: &str, status: &tonic::Status, retry_after: u64) -> Problem {
    let (http, code) = mes_common::errors::http_for(status.code());
    let http = StatusCode::from_u16(http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            if status.code() == tonic::Code::Unauthenticated
                || caller_signature_refused(status) =>
        {
            tracing::error!(service, grpc_code = ?status.code(), error = %status.message(),
                "the service refused the gateway's internal call: check MES_INTERNAL_KEY and the clocks");
            metrics::counter!("gateway_backend_trust_failures_total", "service" => service.to_owned())
                .increment(1);
            Problem::unavailable(
                format!("{service} is unavailable; retrying is safe"),
                retry_after,
            )
        }
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::OutOfRange
        | tonic::Code::NotFound
        | tonic::Code::AlreadyExists
        | tonic::Code::Aborted
        | tonic::Code::PermissionDenied => {
            // Business answers of our own services: their message is meant for the client.
            let mut p = Problem::new(http, code, status.message().to_owned());
            p.errors = field_violations(status);
            if p.detail.is_empty() {
                p.detail = title_of(code).to_lowercase();
            }
            p
        }
        tonic::Code::Unavailable => {
            tracing::warn!(service, error = %status.message(), "service unavailable");
            Problem::unavailable(
                format!("{service} is unavailable; retrying is safe"),
                retry_after,
            )
        }
        tonic::Code::ResourceExhausted => {
            tracing::warn!(service, error = %status.message(), "service overloaded");
            Problem::rate_limited(retry_after)
        }
        tonic::Code::DeadlineExceeded => {
            tracing::warn!(service, error = %status.message(), "service call timed out");
            Problem::timeout(retry_after)
        }
        tonic::Code::Cancelled if timed_out(status) => {
            tracing::warn!(service, error = %status.message(), "service call timed out");
            Problem::timeout(retry_after)
        }
        // A cancelled stream (connection dropped, stream reset) or no status at all: the
        // service may or may not have applied the call.
        tonic::Code::Cancelled | tonic::Code::Unknown => {
            outcome_unknown(service, status, retry_after)
        }
        tonic::Code::Internal if transport_failure(status) => {
            outcome_unknown(service, status, retry_after)
        }
        tonic::Code::Unimplemented => {
            tracing::warn!(service, "operation not implemented by the service");
            Problem::new(
                StatusCode::NOT_IMPLEMENTED,
                "not_implemented",
                format!("{service} does not implement this operation yet"),
            )
        }
        _ => {
            tracing::error!(service, grpc_code = ?status.code(), error = %status.message(), "service error");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; quote the trace id to support",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn field_violations_are_decoded_from_status_details() {
        let br = rpc::BadRequest {
            field_violations: vec![rpc::FieldViolation {
                field: "scans[1].quantity".into(),
                description: "must be greater than zero".into(),
            }],
        };
        let st = rpc::Status {
            code: 3,
            message: "invalid scan".into(),
            details: vec![prost_types::Any {
                type_url: rpc::BAD_REQUEST_TYPE.into(),
                value: br.encode_to_vec(),
            }],
        };
        let status = tonic::Status::with_details(
            tonic::Code::InvalidArgument,
            "invalid scan",
            st.encode_to_vec().into(),
        );
        let p = from_status("scan-ingest", &status, 1);
        assert_eq!(p.status, StatusCode::BAD_REQUEST);
        assert_eq!(p.code, "validation_failed");
        assert_eq!(p.detail, "invalid scan");
        assert_eq!(
            p.errors,
            vec![FieldError::new(
                "scans[1].quantity",
                "must be greater than zero"
            )]
        );
    }

    #[test]
    fn internal_text_is_not_shown() {
        let p = from_status(
            "scan-ingest",
            &tonic::Status::internal("relation \"scans\" does not exist"),
            1,
        );
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!p.detail.contains("relation"));
        let p = from_status(
            "scan-ingest",
            &tonic::Status::unavailable("tcp connect error 127.0.0.1:1"),
            3,
        );
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(p.retry_after, Some(3));
        assert!(!p.detail.contains("127.0.0.1"));
        let p = from_status("erp-sync", &tonic::Status::unimplemented("x"), 1);
        assert_eq!(p.status, StatusCode::NOT_IMPLEMENTED);
        assert_eq!(p.code, "not_implemented");
    }

    #[test]
    fn outcome_unknown_failures_are_503_never_500() {
        // What tonic's client builds when the connection dies mid-call, a stream is reset or
        // the answer ends without a status.
        let transport = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        let reset = tonic::Status::internal("h2 protocol error: stream no longer needed");
        let cancelled = tonic::Status::cancelled("h2 protocol error: operation was canceled");
        for status in [
            tonic::Status::unknown("transport error"),
            transport,
            reset,
            cancelled,
            tonic::Status::internal("Unexpected EOF decoding stream."),
            tonic::Status::internal(
                "failed to decode Protobuf message: WorkOrder.number: invalid string value: data is not UTF-8 encoded",
            ),
            tonic::Status::internal(
                "protocol error: received message with invalid compression flag: 9 (valid flags are 0 and 1) while receiving response with status: 200 OK",
            ),
            tonic::Status::unknown(
                "protocol error: missing grpc-status trailer, stream was terminated without a final status",
            ),
        ] {
            let p = from_status("scan-ingest", &status, 2);
            assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE, "{status:?}");
            assert_eq!(p.code, "unavailable");
            assert_eq!(p.retry_after, Some(2));
        }
        // The client's own per-call timeout stays a 504.
        let timeout = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timeout.code(), tonic::Code::Cancelled);
        let p = from_status("scan-ingest", &timeout, 2);
        assert_eq!(p.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(p.retry_after, Some(2));
    }

    #[test]
    fn internal_trust_failures_are_503_and_role_checks_403() {
        for message in [
            "missing caller signature: internal calls must be signed with the deployment's internal key (MES_INTERNAL_KEY)",
            "caller signature outside the allowed clock skew: internal calls must be signed with the deployment's internal key (MES_INTERNAL_KEY)",
            "caller signature does not match: internal calls must be signed with the deployment's internal key (MES_INTERNAL_KEY)",
            "the caller is not identified",
        ] {
            let p = from_status("scan-ingest", &tonic::Status::unauthenticated(message), 3);
            assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
            assert_eq!(p.retry_after, Some(3));
            assert!(!p.detail.contains("signature"));
        }
        let p = from_status(
            "scan-ingest",
            &tonic::Status::permission_denied("caller signature replayed"),
            3,
        );
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        let p = from_status(
            "scan-ingest",
            &tonic::Status::permission_denied("only supervisors may void scans"),
            3,
        );
        assert_eq!(p.status, StatusCode::FORBIDDEN);
        assert_eq!(p.detail, "only supervisors may void scans");
    }

    #[test]
    fn problem_type_uses_dashes() {
        let p = Problem::field("scans", "at most 500 scans");
        let b = p.body();
        assert_eq!(b.kind, "/problems/validation-failed");
        assert_eq!(b.title, "Invalid request");
        assert_eq!(b.status, 400);
    }
}
