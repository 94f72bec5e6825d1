//! Every way a request can be refused, and the one place where a refusal becomes an HTTP
//! status and a JSON `{code, message}` body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Why a request was refused. Messages name the field at fault and never carry a secret or a
/// payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("admin credentials required (HTTP Basic with an access key id and secret)")]
    Unauthorized,
    #[error("access key {0:?} may not use the admin API")]
    Forbidden(String),
    /// Bad input: `field` names the parameter, body field or header at fault.
    #[error("{field}: {message}")]
    BadRequest { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    /// What the request would create exists already.
    #[error("{0}")]
    Conflict(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("body: larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("Content-Type: expected application/json")]
    UnsupportedMediaType,
    /// The broker cannot answer now (stopping, busy, storage failure).
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// A 400 about `field`.
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable, machine-readable `code` of the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unavailable(_) => "unavailable",
        }
    }
}

/// Attached to every refusal response so that the logging layer can write its one line.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub code: &'static str,
    pub message: String,
}

#[derive(serde::Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let code = self.code();
        let mut response = (
            self.status(),
            Json(Body {
                code,
                message: &message,
            }),
        )
            .into_response();
        if self == ApiError::Unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="herald""#),
            );
        }
        response.extensions_mut().insert(Refused { code, message });
        response
    }
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
