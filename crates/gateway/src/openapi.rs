//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations (the
//! router and the document come from the same `routes!` list), then completed with what every
//! operation shares: the bearer scheme, 401/429 on protected routes, 501/503/504 on routes that
//! call a service, 500 everywhere, and the `traceparent` / `x-trace-id` headers on every response.

use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Required};

use crate::problem::{FieldError, ProblemBody};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "MES gateway",
        description = "REST/JSON API of the Manufacturing Execution System for shop-floor tablets \
            and other systems. Quantities are decimal strings; times are RFC 3339. Every error is \
            `application/problem+json` carrying the request's `trace_id`; every response carries \
            `traceparent` and `x-trace-id`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(crate::routes::health::metrics_doc),
    components(schemas(ProblemBody, FieldError)),
    modifiers(&BearerScheme),
    tags(
        (name = "auth", description = "Tokens"),
        (name = "scans", description = "Recording production"),
        (name = "work-orders", description = "Work orders"),
        (name = "lots", description = "Lots and holds"),
        (name = "traceability", description = "Genealogy and history"),
        (name = "reports", description = "Production reports"),
        (name = "erp", description = "ERP integration"),
        (name = "operations", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "Access token from POST /api/v1/auth/token (HS256, 15 minutes)",
                    ))
                    .build(),
            ),
        );
    }
}

fn string_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .description(Some(description))
        .build()
}

fn problem(description: &str, retry_after: bool) -> Response {
    let mut b = ResponseBuilder::new().description(description).content(
        crate::problem::CONTENT_TYPE,
        ContentBuilder::new()
            .schema(Some(utoipa::openapi::Ref::from_schema_name("ProblemBody")))
            .build(),
    );
    if retry_after {
        b = b.header(
            "Retry-After",
            string_header("Seconds to wait before retrying (retrying is safe)"),
        );
    }
    b.build()
}

fn add(op: &mut Operation, status: &str, response: Response) {
    op.responses
        .responses
        .entry(status.to_owned())
        .or_insert(RefOr::T(response));
}

fn complete_operation(path: &str, op: &mut Operation) {
    let protected = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let calls_service = path.starts_with("/api/v1/")
        && !path.starts_with("/api/v1/auth/")
        && path != "/api/v1/health";
    if protected {
        add(
            op,
            "401",
            problem(
                "`unauthenticated`: missing, invalid, expired or revoked token",
                false,
            ),
        );
        add(
            op,
            "429",
            problem("`rate_limited`: per-user or per-device limit", true),
        );
    }
    if calls_service {
        add(
            op,
            "501",
            problem(
                "`not_implemented`: the service does not offer this yet",
                false,
            ),
        );
        add(
            op,
            "503",
            problem("`unavailable`: a service is down; retrying is safe", true),
        );
        add(
            op,
            "504",
            problem("`timeout`: the request did not complete in time", true),
        );
    }
    add(
        op,
        "500",
        problem("`internal`: quote the trace id to support", false),
    );
    for response in op.responses.responses.values_mut() {
        if let RefOr::T(r) = response {
            r.headers
                .entry("traceparent".to_owned())
                .or_insert_with(|| RefOr::T(string_header("W3C trace context of this request")));
            r.headers.entry("x-trace-id".to_owned()).or_insert_with(|| {
                RefOr::T(string_header("Trace id of this request (32 lowercase hex)"))
            });
        }
    }
    if let Some(RefOr::T(body)) = op.request_body.as_mut() {
        body.required = Some(Required::True);
    }
}

/// Adds what every operation shares (see the module documentation).
pub fn complete(doc: &mut utoipa::openapi::OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
        {
            complete_operation(path, op);
        }
    }
}
